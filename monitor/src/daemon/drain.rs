//! The one drain loop: task and heap records from the kernel's rings into the ledgers.

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use monitor_common::heap::HeapEvent;
use monitor_common::{ExecEvent, TaskEvent, TaskEventKind};
use tokio::sync::mpsc::UnboundedSender;

use crate::bpf::heap_aggregates::HeapAggregates;
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

/// How often the kernel's heap aggregates are read (a read walks the group map, two
/// syscalls a group).
const AGGREGATES_PERIOD: std::time::Duration = std::time::Duration::from_millis(200);

/// The heap side of the drain, when heap tracking is on.
pub struct HeapStream {
    pub ring: RingBuf<MapData>,
    pub ledger: Arc<Mutex<HeapLedger>>,
    /// The kernel's live-heap aggregates, for processes tracked by them.
    pub aggregates: HeapAggregates,
}

/// Execs, as the kernel reports them: read by the drain in order with the task events, and
/// passed on to whoever follows processes (`Session`).
pub struct ExecStream {
    pub ring: RingBuf<MapData>,
    pub notify: UnboundedSender<ExecEvent>,
}

/// Applies every task (and heap) event to its ledger until a ring's fd fails.
///
/// Tasks are drained first on every wakeup: a task's spawn event is written before any of
/// its allocations can happen, so draining the task ring first means an allocation's task
/// id always finds its spawn site. Locks tasks before heap, the order every reader of both
/// uses.
///
/// An exec ends its process's old program: its events stop counting for that program at
/// the exec, and what the new program does is held until the daemon registers it (see
/// [`apply_in_order`]).
pub async fn drain(
    task_ring: RingBuf<MapData>,
    tasks: Arc<Mutex<TaskLedger>>,
    heap: Option<HeapStream>,
    execs: ExecStream,
) -> std::io::Result<()> {
    let mut task_reader = RingReader::new(task_ring)?;
    let mut exec_reader = RingReader::new(execs.ring)?;
    let notify = execs.notify;
    let (mut heap_reader, heap_ledger, aggregates) = match heap {
        Some(h) => (
            Some(RingReader::new(h.ring)?),
            Some(h.ledger),
            Some(h.aggregates),
        ),
        None => (None, None, None),
    };
    let mut aggregates_read = std::time::Instant::now();
    let mut tick = tokio::time::interval(DRAIN_PERIOD);
    loop {
        tokio::select! {
            ready = task_reader.readable() => ready?,
            ready = exec_reader.readable() => ready?,
            ready = async { heap_reader.as_mut().expect("guarded").readable().await },
                if heap_reader.is_some() => ready?,
            _ = tick.tick() => {}
        }
        let mut tasks = tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut rings = TaskRings {
            tasks: task_reader.ring(),
            execs: exec_reader.ring(),
            notify: &notify,
        };
        match (&mut heap_reader, &heap_ledger) {
            (Some(heap_reader), Some(heap)) => {
                let mut heap = heap.lock().unwrap_or_else(|e| e.into_inner());
                drain_both(&mut rings, heap_reader.ring(), &mut tasks, &mut heap);
                // After the rings: the new groups' stacks and the tasks' spawns read first.
                if let Some(aggregates) = &aggregates
                    && aggregates_read.elapsed() >= AGGREGATES_PERIOD
                    && heap.has_aggregated()
                {
                    aggregates_read = std::time::Instant::now();
                    heap.apply_aggregates(&aggregates.read(), &*tasks);
                }
            }
            _ => {
                drain_tasks(&mut rings, &mut tasks, |_, _| {});
            }
        }
    }
}

/// The task ring and the exec ring, drained together.
struct TaskRings<'a> {
    tasks: &'a mut RingBuf<MapData>,
    execs: &'a mut RingBuf<MapData>,
    notify: &'a UnboundedSender<ExecEvent>,
}

fn drain_both(
    task_ring: &mut TaskRings<'_>,
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
fn drain_tasks_for_heap(ring: &mut TaskRings<'_>, tasks: &mut TaskLedger, heap: &mut HeapLedger) {
    let mut spawned = Vec::new();
    drain_tasks(ring, tasks, |pid, header| spawned.push((pid, header)));
    claim_task_cells(tasks, heap, &spawned);
}

/// Applies every waiting task event, calling `on_spawn(pid, header)` after each spawn, with
/// the execs in their place among them.
fn drain_tasks(rings: &mut TaskRings<'_>, tasks: &mut TaskLedger, on_spawn: impl FnMut(u32, u64)) {
    let mut events = Vec::new();
    while let Some(record) = rings.tasks.next() {
        match decode::<TaskEvent>(&record) {
            Some(event) => events.push(event),
            None => tasks.stream.ignore(1),
        }
    }
    // Read after the task ring: an exec is written before its new program runs, so the
    // exec behind any task event read above is already in its ring.
    let mut execs = Vec::new();
    while let Some(record) = rings.execs.next() {
        if let Some(exec) = decode::<ExecEvent>(&record) {
            execs.push(exec);
        }
    }
    apply_in_order(&events, &execs, tasks, on_spawn, |exec| {
        // The receiver is gone only when the session is: nothing to tell then.
        let _ = rings.notify.send(exec);
    });
}

/// Applies `events` with `execs` (each in kernel order) interleaved by time. At an exec the
/// process's old program ends: it is dropped from the ledger before the first event that
/// follows the exec, so what the new program does (its startup tasks, before the daemon has
/// even looked at it) is held for it as for any process not registered yet, never counted
/// under the old program. `exec_seen` is called for every exec.
fn apply_in_order(
    events: &[TaskEvent],
    execs: &[ExecEvent],
    tasks: &mut TaskLedger,
    mut on_spawn: impl FnMut(u32, u64),
    mut exec_seen: impl FnMut(ExecEvent),
) {
    let mut execs = execs.iter().peekable();
    for event in events {
        while let Some(exec) = execs.next_if(|exec| exec.ktime_ns <= event.ktime_ns) {
            tasks.exec(exec.pid, exec.ktime_ns);
            exec_seen(*exec);
        }
        if silenced_pid() == Some(event.pid) {
            tasks.stream.receive(event.cpu, event.seq);
            continue;
        }
        tasks.apply(event);
        if matches!(
            TaskEventKind::from_u32(event.kind),
            Some(TaskEventKind::Spawn | TaskEventKind::FirstPoll)
        ) {
            on_spawn(event.pid, event.header);
        }
    }
    for exec in execs {
        tasks.exec(exec.pid, exec.ktime_ns);
        exec_seen(*exec);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::discovery::TargetImage;
    use crate::state::tasks::ProcessTasks;

    fn spawn(ktime_ns: u64, seq: u64) -> TaskEvent {
        TaskEvent {
            ktime_ns,
            seq,
            header: 0x1000 * seq,
            vtable: 0x40,
            pid: 7,
            tid: 7,
            cpu: 0,
            kind: TaskEventKind::Spawn as u32,
            task_id: seq,
        }
    }

    fn process() -> ProcessTasks {
        ProcessTasks::new(7, "app".into(), Arc::new(TargetImage::default()), 0)
    }

    /// What a program does after its process execs another is held for the new program,
    /// never counted under the old one, even when both arrive in one batch.
    #[test]
    fn an_exec_ends_the_old_programs_count_before_the_new_programs_events() {
        let mut tasks = TaskLedger::new();
        tasks.add_process(process());
        let exec = ExecEvent {
            ktime_ns: 20,
            pid: 7,
            _pad: 0,
        };
        let mut seen = Vec::new();
        apply_in_order(
            &[spawn(10, 1), spawn(30, 2), spawn(40, 3)],
            &[exec],
            &mut tasks,
            |_, _| {},
            |exec| seen.push(exec.pid),
        );
        assert_eq!(seen, [7]);
        assert!(
            tasks.process(7).is_none(),
            "the old program's state is gone"
        );
        // Registered again (the new program): the two spawns after the exec are its own.
        tasks.add_process(process());
        let spawned: u64 = tasks.snapshot(50).iter().map(|row| row.spawned).sum();
        assert_eq!(spawned, 2);
    }
}
