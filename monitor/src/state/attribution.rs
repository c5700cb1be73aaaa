//! Which tokio task a heap block belongs to: the one place where task state and heap state
//! meet, so that `tasks` and `heap` never import each other.
//!
//! Two ties, both by the task ledger's answers:
//! - an allocation made while a task was polled carries that task's id, which names the
//!   task's spawn site (`task_site`);
//! - a block that starts at a live task's header is that task's own cell (header, scheduler
//!   and the future's state), labelled `task cell: <spawn site>` so a leaked task's memory
//!   is named after it. The cell is allocated just before its spawn event is written, so
//!   whichever of the two is read first, the other completes the label; a block allocated
//!   at that address *after* the spawn is not the cell (the task ended and its address was
//!   reused before its end was read), so allocation and spawn times are compared.

use super::heap::{HeapLedger, TaskSites};
use super::tasks::TaskLedger;

impl TaskSites for TaskLedger {
    fn task_site(&self, pid: u32, task_id: u64) -> Option<String> {
        self.process(pid)?.site_of_task(task_id).map(str::to_string)
    }

    fn task_cell_site(&self, pid: u32, addr: u64, allocated_ns: u64) -> Option<String> {
        let (site, spawned_ns) = self.process(pid)?.task_of_cell(addr)?;
        (spawned_ns >= allocated_ns).then(|| site.to_string())
    }

    fn vtable_site(&self, pid: u32, link_vtable: u64) -> Option<String> {
        let process = self.process(pid)?;
        // Labelled as the ledger labels a spawn site (`ProcessTasks::site_for`).
        Some(match process.image().vtable_at(link_vtable) {
            Some(known) => known.site.clone(),
            None => format!("vtable@{link_vtable:#x}"),
        })
    }
}

/// Relabels, as task cells, the blocks of tasks whose spawn events were just applied
/// (`spawned`: `(pid, header)` pairs) when their allocations were read in an earlier batch.
pub fn claim_task_cells(tasks: &TaskLedger, heap: &mut HeapLedger, spawned: &[(u32, u64)]) {
    for &(pid, header) in spawned {
        if let Some((site, spawned_ns)) = tasks.process(pid).and_then(|p| p.live_task(header)) {
            heap.claim_task_cell(pid, header, site, spawned_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use monitor_common::heap::{HEAP_FRAMES, HeapEvent, HeapEventKind};
    use monitor_common::{TaskEvent, TaskEventKind};

    use super::*;
    use crate::discovery::symbolize::Symbolizer;
    use crate::discovery::{NamingMethod, TargetImage, TaskVtable};
    use crate::state::heap::{ProcessHeap, TASK_CELL};
    use crate::state::tasks::ProcessTasks;

    const PID: u32 = 7;

    fn ledgers() -> (TaskLedger, HeapLedger) {
        let image = TargetImage {
            vtables: vec![TaskVtable {
                vaddr: 0x1000,
                site: "app::worker::{{closure}}".to_string(),
                naming: NamingMethod::FuturePollCall,
                complete_hooked: true,
                ..TaskVtable::default()
            }],
            ..TargetImage::default()
        };
        let mut tasks = TaskLedger::new();
        tasks.add_process(ProcessTasks::new(PID, "app".into(), Arc::new(image), 0));
        let mut heap = HeapLedger::default();
        heap.add_process(ProcessHeap::new(
            PID,
            "app".into(),
            0,
            Arc::new(Symbolizer::default()),
            1,
        ));
        (tasks, heap)
    }

    fn spawn(header: u64, task_id: u64) -> TaskEvent {
        TaskEvent {
            ktime_ns: 1,
            seq: 1,
            header,
            vtable: 0x1000,
            pid: PID,
            tid: PID,
            cpu: 0,
            kind: TaskEventKind::Spawn as u32,
            task_id,
        }
    }

    fn alloc(addr: u64, size: u64, task_id: u64) -> HeapEvent {
        HeapEvent {
            ktime_ns: 0,
            seq: 1,
            addr,
            size,
            stack_hash: 1,
            task_id,
            pid: PID,
            tid: PID,
            cpu: 0,
            kind: HeapEventKind::Alloc as u32,
            nframes: 0,
            _pad: 0,
            first_pc: 0,
            frames: [0; HEAP_FRAMES],
        }
    }

    fn sites(heap: &HeapLedger) -> Vec<(String, String, u64)> {
        let mut rows: Vec<_> = heap
            .snapshot()
            .into_iter()
            .map(|r| (r.site, r.task_site, r.live_bytes))
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn a_task_cell_is_named_after_its_task_whichever_event_is_read_first() {
        // Spawn read first: the allocation at the header is the cell at once.
        let (mut tasks, mut heap) = ledgers();
        tasks.apply(&spawn(0xa000, 1));
        heap.apply(&alloc(0xa000, 256, 0), &tasks);
        // An allocation made while task 1 was polled is attributed to its spawn site.
        heap.apply(&alloc(0xb000, 64, 1), &tasks);
        let cell = "task cell: app::worker::{{closure}}".to_string();
        let worker = "app::worker::{{closure}}".to_string();
        let rows = sites(&heap);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(
            rows.iter()
                .any(|(site, task, bytes)| !site.starts_with("task cell")
                    && *task == worker
                    && *bytes == 64),
            "{rows:?}"
        );
        assert!(
            rows.contains(&(cell.clone(), "none".into(), 256)),
            "{rows:?}"
        );

        // Allocation read first: the spawn relabels it.
        let (mut tasks, mut heap) = ledgers();
        heap.apply(&alloc(0xa000, 256, 0), &tasks);
        tasks.apply(&spawn(0xa000, 1));
        claim_task_cells(&tasks, &mut heap, &[(PID, 0xa000)]);
        assert_eq!(sites(&heap), vec![(cell, "none".into(), 256)]);
    }

    #[test]
    fn a_block_allocated_after_the_spawn_at_a_live_tasks_address_is_not_its_cell() {
        // The task at 0xa000 finished and its cell was freed, but its completion is not read
        // yet when a plain 72-byte block reusing the address is: not a phantom cell.
        let (mut tasks, mut heap) = ledgers();
        tasks.apply(&spawn(0xa000, 1));
        let mut reuse = alloc(0xa000, 72, 0);
        reuse.ktime_ns = 5;
        heap.apply(&reuse, &tasks);
        // Nor does a later spawn event at that address claim it unless it came first.
        claim_task_cells(&tasks, &mut heap, &[(PID, 0xa000)]);
        let rows = sites(&heap);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(!rows[0].0.starts_with(TASK_CELL), "{rows:?}");
        assert_eq!(rows[0].2, 72);
    }

    #[test]
    fn a_cell_read_after_its_task_completed_is_still_named_after_it() {
        // A short task (a `spawn_blocking` closure) spawns and completes within one drain of
        // the task ring; its cell's allocation is read from the heap ring afterwards. On
        // tokio 1.10.0 that cell is never freed: it must show as the task's cell.
        let (mut tasks, mut heap) = ledgers();
        tasks.apply(&spawn(0xa000, 0));
        let mut complete = spawn(0xa000, 0);
        complete.kind = TaskEventKind::Complete as u32;
        complete.ktime_ns = 3;
        tasks.apply(&complete);
        heap.apply(&alloc(0xa000, 128, 0), &tasks);
        let cell = "task cell: app::worker::{{closure}}".to_string();
        assert_eq!(sites(&heap), vec![(cell, "none".into(), 128)]);
        // A block at that address allocated after the spawn is someone else's.
        let mut reuse = alloc(0xa000, 72, 0);
        reuse.ktime_ns = 5;
        let mut free = alloc(0xa000, 0, 0);
        free.kind = HeapEventKind::Free as u32;
        heap.apply(&free, &tasks);
        heap.apply(&reuse, &tasks);
        let rows = sites(&heap);
        assert!(
            !rows
                .iter()
                .any(|(site, _, bytes)| site.starts_with(TASK_CELL) && *bytes > 0),
            "the cell was freed: {rows:?}"
        );
        assert!(
            rows.iter()
                .any(|(site, _, bytes)| !site.starts_with(TASK_CELL) && *bytes == 72),
            "{rows:?}"
        );
    }
}
