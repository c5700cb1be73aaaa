//! The one drain loop: task and heap records from the kernel's rings into the ledgers.

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use monitor_common::heap::HeapEvent;
use monitor_common::{TaskEvent, TaskEventKind};

use crate::bpf::ring::{RingReader, decode};
use crate::state::attribution::claim_task_cells;
use crate::state::heap::{HeapLedger, TaskSites};
use crate::state::tasks::TaskLedger;

/// The probes wake the reader only for batches (see `monitor_common::RINGBUF_WAKEUP_BYTES`),
/// so the rings are also drained this often.
const DRAIN_PERIOD: std::time::Duration = std::time::Duration::from_millis(20);

/// Test-only: the task events of this pid are received (their sequence numbers count, so
/// nothing looks lost) but not applied, as if its probes had gone silent; the silent-probe
/// check (`daemon::silence`) must then notice.
pub const SILENT_PID_ENV: &str = "LEAKSCOPE_TEST_SILENT_PID";

/// The pid [`SILENT_PID_ENV`] names, read once.
fn silenced_pid() -> Option<u32> {
    static PID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        let pid = std::env::var(SILENT_PID_ENV).ok()?.trim().parse().ok()?;
        log::warn!("{SILENT_PID_ENV}: the task events of pid {pid} are dropped (a test setting)");
        Some(pid)
    })
}

/// The heap side of the drain, when heap tracking is on.
pub struct HeapStream {
    pub ring: RingBuf<MapData>,
    pub ledger: Arc<Mutex<HeapLedger>>,
}

/// Applies every task (and heap) event to its ledger until a ring's fd fails.
///
/// Tasks are drained first on every wakeup: a task's spawn event is written before any of
/// its allocations can happen, so draining the task ring first means an allocation's task
/// id always finds its spawn site. Locks tasks before heap, the order every reader of both
/// uses.
pub async fn drain(
    task_ring: RingBuf<MapData>,
    tasks: Arc<Mutex<TaskLedger>>,
    heap: Option<HeapStream>,
) -> std::io::Result<()> {
    let mut task_reader = RingReader::new(task_ring)?;
    let (mut heap_reader, heap_ledger) = match heap {
        Some(h) => (Some(RingReader::new(h.ring)?), Some(h.ledger)),
        None => (None, None),
    };
    let mut tick = tokio::time::interval(DRAIN_PERIOD);
    loop {
        tokio::select! {
            ready = task_reader.readable() => ready?,
            ready = async { heap_reader.as_mut().expect("guarded").readable().await },
                if heap_reader.is_some() => ready?,
            _ = tick.tick() => {}
        }
        let mut tasks = tasks.lock().unwrap_or_else(|e| e.into_inner());
        match (&mut heap_reader, &heap_ledger) {
            (Some(heap_reader), Some(heap)) => {
                let mut heap = heap.lock().unwrap_or_else(|e| e.into_inner());
                drain_both(
                    task_reader.ring(),
                    heap_reader.ring(),
                    &mut tasks,
                    &mut heap,
                );
            }
            _ => {
                drain_tasks(task_reader.ring(), &mut tasks, |_, _| {});
            }
        }
    }
}

fn drain_both(
    task_ring: &mut RingBuf<MapData>,
    heap_ring: &mut RingBuf<MapData>,
    tasks: &mut TaskLedger,
    heap: &mut HeapLedger,
) {
    drain_tasks_for_heap(task_ring, tasks, heap);
    while let Some(record) = heap_ring.next() {
        let Some(event) = decode::<HeapEvent>(&record) else {
            heap.stream.ignore(1);
            continue;
        };
        drop(record);
        // The task's spawn event may have landed after the task ring was drained above
        // (the allocation came later still): drain it again before giving up.
        if event.task_id != 0 && tasks.task_site(event.pid, event.task_id).is_none() {
            // Spawns drained here are applied before the allocation that follows them.
            drain_tasks_for_heap(task_ring, tasks, heap);
        }
        heap.apply(&event, &*tasks);
    }
}

/// [`drain_tasks`], then the cells of the tasks just spawned (see
/// `state::attribution::claim_task_cells`).
fn drain_tasks_for_heap(
    ring: &mut RingBuf<MapData>,
    tasks: &mut TaskLedger,
    heap: &mut HeapLedger,
) {
    let mut spawned = Vec::new();
    drain_tasks(ring, tasks, |pid, header| spawned.push((pid, header)));
    claim_task_cells(tasks, heap, &spawned);
}

/// Applies every waiting task event, calling `on_spawn(pid, header)` after each spawn.
fn drain_tasks(
    ring: &mut RingBuf<MapData>,
    tasks: &mut TaskLedger,
    mut on_spawn: impl FnMut(u32, u64),
) {
    while let Some(record) = ring.next() {
        match decode::<TaskEvent>(&record) {
            Some(event) if silenced_pid() == Some(event.pid) => {
                tasks.stream.receive(event.cpu, event.seq);
            }
            Some(event) => {
                tasks.apply(&event);
                if matches!(
                    TaskEventKind::from_u32(event.kind),
                    Some(TaskEventKind::Spawn | TaskEventKind::FirstPoll)
                ) {
                    on_spawn(event.pid, event.header);
                }
            }
            None => tasks.stream.ignore(1),
        }
    }
}
