//! Drains the kernel's ring buffer into the task ledger.

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use monitor_common::TaskEvent;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::tasks::TaskLedger;

/// Decodes one ring-buffer record; `None` for a record of the wrong size.
pub fn decode(bytes: &[u8]) -> Option<TaskEvent> {
    if bytes.len() < size_of::<TaskEvent>() {
        return None;
    }
    // SAFETY: TaskEvent is repr(C) plain data of exactly this size (asserted in
    // monitor-common); read_unaligned copes with any alignment of the record.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TaskEvent>()) })
}

/// Applies every event to `ledger` as soon as the kernel signals the buffer readable. Runs
/// until the ring buffer's fd fails.
pub async fn drain(ring: RingBuf<MapData>, ledger: Arc<Mutex<TaskLedger>>) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it (and
    // deregisters) before the fd is closed.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        {
            let ring = guard.get_inner_mut();
            let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(record) = ring.next() {
                match decode(&record) {
                    Some(event) => ledger.apply(&event),
                    None => ledger.stream.ignored += 1,
                }
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_record_and_rejects_a_short_one() {
        let event = TaskEvent {
            ktime_ns: 1,
            seq: 2,
            header: 3,
            vtable: 4,
            pid: 5,
            tid: 6,
            cpu: 7,
            kind: 1,
        };
        // SAFETY: viewing a repr(C) POD value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&event as *const TaskEvent).cast::<u8>(),
                size_of::<TaskEvent>(),
            )
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[..10]), None);
    }
}
