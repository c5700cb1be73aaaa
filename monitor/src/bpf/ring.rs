//! Reading the kernel's ring buffers: one decoder for every record type, and the wait for
//! a ring to have data.

use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Decodes one ring-buffer record as `T`; `None` for a record shorter than `T`.
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` is plain data with no invalid bit patterns (every record type is
    // repr(C) without padding, asserted in monitor-common), the length is checked, and
    // read_unaligned copes with any alignment of the record.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A ring buffer registered with the async runtime, to wait until the kernel signals it
/// readable.
pub struct RingReader(AsyncFd<RingBuf<MapData>>);

impl RingReader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it (and
        // deregisters) before the fd is closed.
        let fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self(fd))
    }

    /// Waits until the kernel signals the ring readable (the probes do so only for batches:
    /// see `monitor_common::RINGBUF_WAKEUP_BYTES`).
    pub async fn readable(&mut self) -> std::io::Result<()> {
        self.0.readable_mut().await?.clear_ready();
        Ok(())
    }

    pub fn ring(&mut self) -> &mut RingBuf<MapData> {
        self.0.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::TaskEvent;

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
            task_id: 8,
        };
        // SAFETY: viewing a repr(C) POD value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&event as *const TaskEvent).cast::<u8>(),
                size_of::<TaskEvent>(),
            )
        };
        assert_eq!(decode::<TaskEvent>(bytes), Some(event));
        assert_eq!(decode::<TaskEvent>(&bytes[..10]), None);
    }
}
