//! Drains the kernel's ring buffer into the task ledger.

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use monitor_common::{TaskEvent, TaskEventKind};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::state::heap::{HeapLedger, TaskSites};
use crate::state::tasks::TaskLedger;
use monitor_common::heap::HeapEvent;

/// Decodes one ring-buffer record; `None` for a record of the wrong size.
pub fn decode(bytes: &[u8]) -> Option<TaskEvent> {
    if bytes.len() < size_of::<TaskEvent>() {
        return None;
    }
    // SAFETY: TaskEvent is repr(C) plain data of exactly this size (asserted in
    // monitor-common); read_unaligned copes with any alignment of the record.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TaskEvent>()) })
}

/// Calls `apply` with every record (batch by batch, as the kernel signals the buffer
/// readable) until the ring buffer's fd fails.
async fn drain_records(
    ring: RingBuf<MapData>,
    mut apply: impl FnMut(&mut RingBuf<MapData>),
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it (and
    // deregisters) before the fd is closed.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut tick = tokio::time::interval(DRAIN_PERIOD);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => guard?.clear_ready(),
            _ = tick.tick() => {}
        }
        apply(fd.get_mut());
    }
}

/// The probes wake the reader only for batches (see `monitor_common::RINGBUF_WAKEUP_BYTES`),
/// so the rings are also drained this often.
const DRAIN_PERIOD: std::time::Duration = std::time::Duration::from_millis(20);

/// Applies every task event to `ledger`.
pub async fn drain(ring: RingBuf<MapData>, ledger: Arc<Mutex<TaskLedger>>) -> std::io::Result<()> {
    drain_records(ring, |ring| {
        let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        drain_task_records(ring, &mut ledger, |_, _| {});
    })
    .await
}

/// Decodes one heap ring-buffer record.
pub fn decode_heap(bytes: &[u8]) -> Option<HeapEvent> {
    if bytes.len() < size_of::<HeapEvent>() {
        return None;
    }
    // SAFETY: as in `decode`: repr(C) plain data, size checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<HeapEvent>()) })
}

/// Drains the task and heap rings together, tasks first on every wakeup: a task's spawn
/// event is written before any of its allocations can happen, so draining the task ring
/// first means an allocation's task id always finds its spawn site. Locks tasks before heap,
/// the order every reader of both uses.
pub async fn drain_tasks_and_heap(
    task_ring: RingBuf<MapData>,
    heap_ring: RingBuf<MapData>,
    tasks: Arc<Mutex<TaskLedger>>,
    heap: Arc<Mutex<HeapLedger>>,
) -> std::io::Result<()> {
    // SAFETY: as in `drain_records`: each ring buffer owns its fd and moves into its AsyncFd.
    let mut task_fd = unsafe { AsyncFd::register_with_interest(task_ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut heap_fd = unsafe { AsyncFd::register_with_interest(heap_ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut tick = tokio::time::interval(DRAIN_PERIOD);
    loop {
        tokio::select! {
            guard = task_fd.readable_mut() => guard?.clear_ready(),
            guard = heap_fd.readable_mut() => guard?.clear_ready(),
            _ = tick.tick() => {}
        }
        let mut tasks = tasks.lock().unwrap_or_else(|e| e.into_inner());
        let task_ring = task_fd.get_mut();
        let mut heap = heap.lock().unwrap_or_else(|e| e.into_inner());
        drain_task_records_for_heap(task_ring, &mut tasks, &mut heap);
        let heap_ring = heap_fd.get_mut();
        while let Some(record) = heap_ring.next() {
            let Some(event) = decode_heap(&record) else {
                heap.stream.ignored += 1;
                continue;
            };
            drop(record);
            // The task's spawn event may have landed after the task ring was drained
            // above (the allocation came later still): drain it again before giving up.
            if event.task_id != 0 && tasks.task_site(event.pid, event.task_id).is_none() {
                // Spawns drained here are applied before the allocation that follows them.
                drain_task_records_for_heap(task_ring, &mut tasks, &mut heap);
            }
            heap.apply(&event, &*tasks);
        }
    }
}

/// [`drain_task_records`], then the cells of the tasks just spawned: a task's cell is
/// allocated just before its spawn event is written, so when the allocation was read in an
/// earlier batch, its block is relabelled as the task's cell here (see
/// `ProcessHeap::claim_task_cell`).
fn drain_task_records_for_heap(
    ring: &mut RingBuf<MapData>,
    tasks: &mut TaskLedger,
    heap: &mut HeapLedger,
) {
    let mut spawned = Vec::new();
    drain_task_records(ring, tasks, |pid, header| spawned.push((pid, header)));
    for (pid, header) in spawned {
        if let Some(site) = tasks.process(pid).and_then(|p| p.site_of_live_task(header)) {
            heap.claim_task_cell(pid, header, site);
        }
    }
}

/// Applies every waiting task event, calling `on_spawn(pid, header)` after each spawn.
fn drain_task_records(
    ring: &mut RingBuf<MapData>,
    tasks: &mut TaskLedger,
    mut on_spawn: impl FnMut(u32, u64),
) {
    while let Some(record) = ring.next() {
        match decode(&record) {
            Some(event) => {
                tasks.apply(&event);
                if matches!(
                    TaskEventKind::from_u32(event.kind),
                    Some(TaskEventKind::Spawn | TaskEventKind::FirstPoll)
                ) {
                    on_spawn(event.pid, event.header);
                }
            }
            None => tasks.stream.ignored += 1,
        }
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
            task_id: 8,
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
