//! Live heap from the kernel's aggregates: for a process tracked that way, the probes keep
//! each group's running counts (process, stack or task cell, allocating task's vtable; see
//! `monitor_common::heap::GroupKey`) and report only a group's creation, with its stack. Here
//! each kernel group is named once (callsite from that stack, task site from the vtable) and
//! its live figures are added into the labelled group it belongs to, on every read.
//!
//! Totals follow from the counts: allocated bytes are what callsite groups ever received;
//! freed bytes what any group ever released, less the moves into task cells (a move releases
//! from a callsite group and allocates in a cell, and frees nothing).

use std::collections::HashMap;

use monitor_common::heap::{GroupCounters, GroupKey, HeapEvent, group_kind, group_task};

use super::heap::{
    GroupKey as LabelKey, HeapGroup, HeapLedger, NO_TASK, ProcessHeap, TASK_CELL, TASKS_UNREAD,
    TaskSites, UNKNOWN_TASK,
};

/// Site of a group whose stack never reached the daemon (its new-group event was lost, or
/// is not read yet).
pub const UNNAMED_CALLSITE: &str = "unnamed callsite (its stack was not received)";

impl ProcessHeap {
    /// Tracks this process by the kernel's aggregates.
    pub fn aggregated(mut self) -> Self {
        self.aggregated = true;
        self
    }

    /// A new group's stack, named now so that the group can be.
    pub(super) fn name_stack(&mut self, event: &HeapEvent) {
        let frames = self.stack_frames(event);
        self.callsites
            .callsite(&self.symbolizer, event.stack_hash, &frames);
    }

    /// The label of kernel group `key`; `None` when it cannot be named for good yet (the
    /// stack or the task ledger's process is missing), then the label to use meanwhile.
    fn label(&self, key: &GroupKey, tasks: &dyn TaskSites) -> (LabelKey, bool) {
        let site_of =
            |vtable: u64| tasks.vtable_site(self.pid, vtable.wrapping_sub(self.load_bias));
        let (task_site, task_known) = match key.task {
            // No task hooks on this binary: the kernel never learns a task, so "no task"
            // would be a claim the daemon cannot make.
            _ if self.tasks_unread => (TASKS_UNREAD.to_string(), true),
            group_task::NONE => (NO_TASK.to_string(), true),
            group_task::UNKNOWN => (UNKNOWN_TASK.to_string(), true),
            vtable => match site_of(vtable) {
                Some(site) => (site, true),
                None => (UNKNOWN_TASK.to_string(), false),
            },
        };
        let (site, location, site_known) = match key.kind {
            group_kind::TASK_CELL => match site_of(key.site) {
                Some(spawned) => (format!("{TASK_CELL}{spawned}"), None, true),
                None => (format!("{TASK_CELL}{UNKNOWN_TASK}"), None, false),
            },
            _ => match self.callsites.get(key.site) {
                Some(callsite) => (callsite.label.clone(), callsite.location.clone(), true),
                None => (UNNAMED_CALLSITE.to_string(), None, false),
            },
        };
        ((site, location, task_site), task_known && site_known)
    }

    /// Sets the live figures and totals from the kernel's counts of this process's groups.
    pub fn apply_aggregates(&mut self, rows: &[(GroupKey, GroupCounters)], tasks: &dyn TaskSites) {
        for group in &mut self.groups {
            *group = HeapGroup::default();
        }
        let (mut allocated, mut released, mut moved) = (0u64, 0u64, 0u64);
        for (key, counts) in rows {
            if key.kind == group_kind::TASK_CELL {
                moved = moved.saturating_add(counts.allocated_bytes);
            } else {
                allocated = allocated.saturating_add(counts.allocated_bytes);
            }
            released = released.saturating_add(counts.released_bytes);
            let index = match self.kernel_groups.get(key) {
                Some(&index) => index,
                None => {
                    let (label, for_good) = self.label(key, tasks);
                    let index = self.group(label);
                    if for_good {
                        self.kernel_groups.insert(*key, index);
                    }
                    index
                }
            };
            let group = &mut self.groups[index];
            // Each count is read at its own moment: a release can be seen before the
            // allocation it matches.
            group.live_bytes = group
                .live_bytes
                .saturating_add(counts.allocated_bytes.saturating_sub(counts.released_bytes));
            group.live_allocations = group.live_allocations.saturating_add(
                counts
                    .allocated_blocks
                    .saturating_sub(counts.released_blocks),
            );
        }
        self.totals.allocated_bytes = allocated;
        self.totals.freed_bytes = released.saturating_sub(moved);
    }
}

impl HeapLedger {
    /// Applies a read of the kernel's aggregates to every process tracked by them.
    pub fn apply_aggregates(&mut self, rows: &[(GroupKey, GroupCounters)], tasks: &dyn TaskSites) {
        let mut by_pid: HashMap<u32, Vec<(GroupKey, GroupCounters)>> = HashMap::new();
        for row in rows {
            by_pid.entry(row.0.pid).or_default().push(*row);
        }
        for process in self.processes_mut().filter(|p| p.aggregated) {
            let rows = by_pid.remove(&process.pid).unwrap_or_default();
            process.apply_aggregates(&rows, tasks);
        }
    }

    /// Whether any process is tracked by aggregates (else there is nothing to read).
    pub fn has_aggregated(&self) -> bool {
        self.processes().any(|p| p.aggregated)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use monitor_common::heap::{HEAP_FRAMES, HeapEventKind};

    use super::*;
    use crate::discovery::symbolize::Symbolizer;

    struct Sites;
    impl TaskSites for Sites {
        fn task_site(&self, _: u32, _: u64) -> Option<String> {
            None
        }
        fn task_cell_site(&self, _: u32, _: u64, _: u64) -> Option<String> {
            None
        }
        fn vtable_site(&self, _: u32, vtable: u64) -> Option<String> {
            (vtable == 0x1000).then(|| "app::worker::{{closure}}".to_string())
        }
    }

    fn new_group(stack_hash: u64) -> HeapEvent {
        HeapEvent {
            ktime_ns: 0,
            seq: 0,
            addr: 0,
            size: 0,
            stack_hash,
            task_id: 0,
            pid: 1,
            tid: 1,
            cpu: 0,
            kind: HeapEventKind::NewGroup as u32,
            nframes: 0,
            _pad: 0,
            first_pc: 0x40 + (stack_hash << 12),
            frames: [0; HEAP_FRAMES],
        }
    }

    fn key(kind: u32, site: u64, task: u64) -> GroupKey {
        GroupKey {
            pid: 1,
            kind,
            site,
            task,
        }
    }

    fn counts(allocated: (u64, u64), released: (u64, u64)) -> GroupCounters {
        GroupCounters {
            allocated_blocks: allocated.0,
            allocated_bytes: allocated.1,
            released_blocks: released.0,
            released_bytes: released.1,
        }
    }

    /// The kernel's counts become live figures per labelled group, a cell's move counts as
    /// neither an allocation nor a free, and each read replaces the last.
    #[test]
    fn aggregates_become_live_groups_and_totals() {
        let mut heap =
            ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 1).aggregated();
        heap.apply(&new_group(7), &Sites);
        let rows = [
            // 3 blocks of 100 allocated by task 0x1000, one freed, one moved to a cell.
            (
                key(group_kind::CALLSITE, 7, 0x1000),
                counts((3, 300), (2, 200)),
            ),
            (
                key(group_kind::TASK_CELL, 0x1000, 0x1000),
                counts((1, 100), (0, 0)),
            ),
            // A group whose stack was not received yet.
            (
                key(group_kind::CALLSITE, 8, group_task::NONE),
                counts((1, 10), (0, 0)),
            ),
        ];
        heap.apply_aggregates(&rows, &Sites);
        let mut live: Vec<_> = heap
            .snapshot()
            .into_iter()
            .map(|r| (r.site, r.task_site, r.live_bytes, r.live_allocations))
            .collect();
        live.sort();
        let callsite = heap.callsites.get(7).expect("named").label.clone();
        let worker = "app::worker::{{closure}}".to_string();
        let mut expected = vec![
            (callsite, worker.clone(), 100, 1),
            (format!("{TASK_CELL}{worker}"), worker.clone(), 100, 1),
            (UNNAMED_CALLSITE.to_string(), NO_TASK.to_string(), 10, 1),
        ];
        expected.sort();
        assert_eq!(live, expected);
        assert_eq!(heap.totals.allocated_bytes, 310);
        assert_eq!(heap.totals.freed_bytes, 100);

        // The late stack names its group; the freed cell leaves its group empty.
        heap.apply(&new_group(8), &Sites);
        let rows = [
            (
                key(group_kind::CALLSITE, 7, 0x1000),
                counts((3, 300), (2, 200)),
            ),
            (
                key(group_kind::TASK_CELL, 0x1000, 0x1000),
                counts((1, 100), (1, 100)),
            ),
            (
                key(group_kind::CALLSITE, 8, group_task::NONE),
                counts((1, 10), (0, 0)),
            ),
        ];
        heap.apply_aggregates(&rows, &Sites);
        let live = heap.snapshot();
        assert_eq!(live.len(), 2, "{live:?}");
        assert!(live.iter().all(|r| r.site != UNNAMED_CALLSITE), "{live:?}");
        assert_eq!(heap.totals.freed_bytes, 200);
    }
}
