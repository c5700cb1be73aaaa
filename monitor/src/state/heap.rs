//! Live heap per (allocation callsite, task site), fed by heap events.
//!
//! The kernel only reports frees of blocks it saw allocated, with their size; here each
//! block is remembered with the group it was counted in, so a free subtracts from the right
//! series even after the allocating task is gone. Bounded like the task ledger: blocks per
//! process and groups per process are capped, and what does not fit is counted.

use std::collections::HashMap;
use std::sync::Arc;

pub use leakscope_api::types::HeapGroupSnapshot;
use monitor_common::heap::{HeapEvent, HeapEventKind};
use serde::Serialize;

use super::intern::BoundedLabels;
use super::stream::EventStream;
use crate::discovery::symbolize::{CallsiteCache, Symbolizer};

/// Blocks tracked per process (the kernel map is bounded too).
pub const MAX_BLOCKS_PER_PROCESS: usize = 1 << 22;
/// (callsite, task site) groups per process; further groups share [`OVERFLOW_GROUP`].
pub const MAX_GROUPS_PER_PROCESS: usize = 1024;
pub const OVERFLOW_GROUP: &str = "other (callsite limit reached)";
/// `task_site` of allocations made outside any tokio task.
pub const NO_TASK: &str = "none";
/// `task_site` of every allocation of a process whose tokio tasks cannot be read (an
/// unknown task layout): whether a task made it is not known.
pub const TASKS_UNREAD: &str = "unknown (tasks not read)";
/// `task_site` of allocations by a task whose spawn leakscope did not see (before attach).
pub const UNKNOWN_TASK: &str = "unknown (spawned before attach)";

/// A group's live figures; its name is the [`GroupKey`] at the same index.
#[derive(Debug, Default)]
pub(super) struct HeapGroup {
    pub(super) live_bytes: u64,
    pub(super) live_allocations: u64,
}

/// Per-process totals, exported as counters.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct HeapTotals {
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    /// Frees the daemon could not match to a tracked block.
    pub untracked_frees: u64,
    /// Allocations not tracked because the per-process block limit was reached.
    pub blocks_dropped: u64,
}

/// Prefix of the `site` of a tokio task's own allocation (its cell: header, scheduler and
/// the future's state), followed by the task's spawn site.
pub const TASK_CELL: &str = "task cell: ";

/// What the heap ledger asks of the task ledger.
pub trait TaskSites {
    /// The spawn-site label of the task with tokio id `task_id` (as the allocation probe
    /// read it from the polling thread).
    fn task_site(&self, pid: u32, task_id: u64) -> Option<String>;
    /// The spawn-site label of the live task whose header is at `addr` and that was
    /// spawned at or after `allocated_ns` (ktime): a block allocated there then is that
    /// task's cell. (A block allocated at that address after the spawn is not: it reuses
    /// the address of a task whose end was not read yet.)
    fn task_cell_site(&self, pid: u32, addr: u64, allocated_ns: u64) -> Option<String>;
    /// The spawn-site label of the tasks whose vtable is at link-time address
    /// `link_vtable` (the kernel's aggregates name a task by its vtable).
    fn vtable_site(&self, pid: u32, link_vtable: u64) -> Option<String>;
}

/// (callsite label, callsite location, task site).
pub(super) type GroupKey = (String, Option<String>, String);

#[derive(Debug)]
pub struct ProcessHeap {
    pub pid: u32,
    pub exe: String,
    pub(super) load_bias: u64,
    pub(super) symbolizer: Arc<Symbolizer>,
    pub(super) callsites: CallsiteCache,
    pub(super) keys: BoundedLabels<GroupKey>,
    pub(super) groups: Vec<HeapGroup>,
    /// addr → (group, size, allocation ktime).
    blocks: HashMap<u64, (usize, u64, u64)>,
    /// Figures come from the kernel's aggregates (`heap_groups`), not from block events.
    pub(super) aggregated: bool,
    /// The kernel's groups (aggregated processes only), by their label's index once named.
    pub(super) kernel_groups: HashMap<monitor_common::heap::GroupKey, usize>,
    pub totals: HeapTotals,
    /// Blocks stand for this many (sampling); figures are scaled by it on export.
    scale: u64,
    /// The process's tasks cannot be read: every allocation's task site is [`TASKS_UNREAD`].
    pub(super) tasks_unread: bool,
}

impl ProcessHeap {
    /// Allocations of (callsite, task site) groups beyond [`MAX_GROUPS_PER_PROCESS`],
    /// counted under the overflow group.
    pub fn groups_folded(&self) -> u64 {
        self.keys.folded
    }

    pub fn new(
        pid: u32,
        exe: String,
        load_bias: u64,
        symbolizer: Arc<Symbolizer>,
        scale: u64,
    ) -> Self {
        Self {
            pid,
            exe,
            load_bias,
            symbolizer,
            callsites: CallsiteCache::default(),
            keys: BoundedLabels::new(
                MAX_GROUPS_PER_PROCESS,
                (OVERFLOW_GROUP.to_string(), None, OVERFLOW_GROUP.to_string()),
            ),
            groups: Vec::new(),
            blocks: HashMap::new(),
            aggregated: false,
            kernel_groups: HashMap::new(),
            totals: HeapTotals::default(),
            scale: scale.max(1),
            tasks_unread: false,
        }
    }

    pub(super) fn group(&mut self, key: GroupKey) -> usize {
        let index = self.keys.intern(key);
        if index == self.groups.len() {
            self.groups.push(HeapGroup::default());
        }
        index
    }

    /// Counts the block at `header`, if one is live, was allocated no later than the task's
    /// spawn (`spawned_ns`, ktime) and is not yet labelled so, as the cell of the task
    /// spawned at `spawn_site` (keeping the task site it was allocated from).
    /// Marks the process as one whose tasks cannot be read (see [`TASKS_UNREAD`]).
    pub fn with_tasks_unread(mut self, unread: bool) -> Self {
        self.tasks_unread = unread;
        self
    }

    pub fn claim_task_cell(&mut self, header: u64, spawn_site: &str, spawned_ns: u64) {
        let Some(&(old_group, size, allocated_ns)) = self.blocks.get(&header) else {
            return;
        };
        if allocated_ns > spawned_ns {
            return;
        }
        let (old_site, _, old_task_site) = self.keys.get(old_group);
        if old_site.starts_with(TASK_CELL) {
            return;
        }
        let key = (
            format!("{TASK_CELL}{spawn_site}"),
            None,
            old_task_site.clone(),
        );
        let group = self.group(key);
        let old = &mut self.groups[old_group];
        old.live_bytes = old.live_bytes.saturating_sub(size);
        old.live_allocations = old.live_allocations.saturating_sub(1);
        let new = &mut self.groups[group];
        new.live_bytes = new.live_bytes.saturating_add(size);
        new.live_allocations += 1;
        self.blocks.insert(header, (group, size, allocated_ns));
    }

    /// Byte counts saturate: `size` is whatever the program passed its allocator, and a
    /// request near `u64::MAX` must cost a wrong total, not a panic or a wrap.
    pub fn apply(&mut self, event: &HeapEvent, tasks: &dyn TaskSites) {
        match HeapEventKind::from_u32(event.kind) {
            Some(HeapEventKind::Alloc) => {
                self.totals.allocated_bytes =
                    self.totals.allocated_bytes.saturating_add(event.size);
                if self.blocks.len() >= MAX_BLOCKS_PER_PROCESS {
                    self.totals.blocks_dropped += 1;
                    return;
                }
                let frames = self.stack_frames(event);
                let callsite = self
                    .callsites
                    .callsite(&self.symbolizer, event.stack_hash, &frames)
                    .clone();
                let task_site = match event.task_id {
                    _ if self.tasks_unread => TASKS_UNREAD.to_string(),
                    0 => NO_TASK.to_string(),
                    id => tasks.task_site(self.pid, id).unwrap_or_else(|| {
                        log::debug!("pid {}: allocation by unknown task id {id}", self.pid);
                        UNKNOWN_TASK.to_string()
                    }),
                };
                // A task's cell is allocated just before its spawn event; when that event
                // comes later, `claim_task_cell` relabels the block.
                let (label, location) =
                    match tasks.task_cell_site(self.pid, event.addr, event.ktime_ns) {
                        Some(spawned) => (format!("{TASK_CELL}{spawned}"), None),
                        None => (callsite.label, callsite.location),
                    };
                let group = self.group((label, location, task_site));
                if let Some((old_group, old_size, _)) = self
                    .blocks
                    .insert(event.addr, (group, event.size, event.ktime_ns))
                {
                    // The kernel reported no free for a reused address: drop the stale block.
                    let g = &mut self.groups[old_group];
                    g.live_bytes = g.live_bytes.saturating_sub(old_size);
                    g.live_allocations = g.live_allocations.saturating_sub(1);
                }
                let g = &mut self.groups[group];
                g.live_bytes = g.live_bytes.saturating_add(event.size);
                g.live_allocations += 1;
            }
            Some(HeapEventKind::Free) => match self.blocks.remove(&event.addr) {
                Some((group, size, _)) => {
                    self.totals.freed_bytes = self.totals.freed_bytes.saturating_add(size);
                    let g = &mut self.groups[group];
                    g.live_bytes = g.live_bytes.saturating_sub(size);
                    g.live_allocations = g.live_allocations.saturating_sub(1);
                }
                None => self.totals.untracked_frees += 1,
            },
            Some(HeapEventKind::NewGroup) => self.name_stack(event),
            None => {}
        }
    }

    /// The event's stack, link-time addresses, innermost first. `first_pc` is a pc inside
    /// the allocator's caller (where it returned to); the rest are return addresses. All
    /// are looked up at `pc - 1`, which for `first_pc` too lands inside the call
    /// instruction, in the caller.
    pub(super) fn stack_frames(&self, event: &HeapEvent) -> Vec<u64> {
        let nframes = (event.nframes as usize).min(event.frames.len());
        std::iter::once(event.first_pc)
            .chain(event.frames[..nframes].iter().copied())
            .map(|pc| pc.wrapping_sub(self.load_bias))
            .collect()
    }

    pub fn snapshot(&self) -> Vec<HeapGroupSnapshot> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.live_allocations > 0 || g.live_bytes > 0)
            .map(|(index, g)| {
                let (site, location, task_site) = self.keys.get(index).clone();
                HeapGroupSnapshot {
                    pid: self.pid,
                    exe: self.exe.clone(),
                    site,
                    location,
                    task_site,
                    live_bytes: g.live_bytes.saturating_mul(self.scale),
                    live_allocations: g.live_allocations.saturating_mul(self.scale),
                }
            })
            .collect()
    }

    /// Totals as exported: scaled like the groups under sampling.
    pub fn scaled_totals(&self) -> HeapTotals {
        HeapTotals {
            allocated_bytes: self.totals.allocated_bytes.saturating_mul(self.scale),
            freed_bytes: self.totals.freed_bytes.saturating_mul(self.scale),
            ..self.totals
        }
    }
}

/// All watched processes' heap state.
#[derive(Debug, Default)]
pub struct HeapLedger {
    processes: HashMap<u32, ProcessHeap>,
    pub stream: EventStream,
}

impl HeapLedger {
    pub fn add_process(&mut self, process: ProcessHeap) {
        self.processes.insert(process.pid, process);
    }

    pub fn remove_process(&mut self, pid: u32) -> Option<ProcessHeap> {
        self.processes.remove(&pid)
    }

    pub fn processes(&self) -> impl Iterator<Item = &ProcessHeap> {
        self.processes.values()
    }

    pub(super) fn processes_mut(&mut self) -> impl Iterator<Item = &mut ProcessHeap> {
        self.processes.values_mut()
    }

    pub fn apply(&mut self, event: &HeapEvent, tasks: &dyn TaskSites) {
        self.stream.receive(event.cpu, event.seq);
        match self.processes.get_mut(&event.pid) {
            Some(process) => process.apply(event, tasks),
            None => self.stream.ignore(1),
        }
    }

    /// See [`ProcessHeap::claim_task_cell`].
    pub fn claim_task_cell(&mut self, pid: u32, header: u64, spawn_site: &str, spawned_ns: u64) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process.claim_task_cell(header, spawn_site, spawned_ns);
        }
    }

    pub fn snapshot(&self) -> Vec<HeapGroupSnapshot> {
        let mut rows: Vec<HeapGroupSnapshot> = self
            .processes
            .values()
            .flat_map(ProcessHeap::snapshot)
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.live_bytes));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoTasks;
    impl TaskSites for NoTasks {
        fn task_site(&self, _: u32, id: u64) -> Option<String> {
            (id == 7).then(|| "app::handler::{{closure}}".to_string())
        }
        fn task_cell_site(&self, _: u32, addr: u64, _: u64) -> Option<String> {
            (addr == 0xce11).then(|| "app::worker::{{closure}}".to_string())
        }
        fn vtable_site(&self, _: u32, vtable: u64) -> Option<String> {
            (vtable == 0x1000).then(|| "app::worker::{{closure}}".to_string())
        }
    }

    fn event(kind: HeapEventKind, addr: u64, size: u64, task_id: u64) -> HeapEvent {
        HeapEvent {
            ktime_ns: 0,
            seq: 0,
            addr,
            size,
            stack_hash: 1,
            task_id,
            pid: 1,
            tid: 1,
            cpu: 0,
            kind: kind as u32,
            nframes: 0,
            _pad: 0,
            first_pc: 0,
            frames: [0; monitor_common::heap::HEAP_FRAMES],
        }
    }

    #[test]
    fn frees_leave_the_group_they_were_counted_in() {
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 1);
        heap.apply(&event(HeapEventKind::Alloc, 0x10, 100, 7), &NoTasks);
        heap.apply(&event(HeapEventKind::Alloc, 0x20, 50, 0), &NoTasks);
        heap.apply(&event(HeapEventKind::Free, 0x10, 100, 7), &NoTasks);
        heap.apply(&event(HeapEventKind::Free, 0x99, 1, 0), &NoTasks);
        let rows = heap.snapshot();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].task_site, NO_TASK);
        assert_eq!((rows[0].live_bytes, rows[0].live_allocations), (50, 1));
        assert_eq!(heap.totals.allocated_bytes, 150);
        assert_eq!(heap.totals.freed_bytes, 100);
        assert_eq!(heap.totals.untracked_frees, 1);
    }

    #[test]
    fn sampled_figures_are_scaled() {
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 16);
        heap.apply(&event(HeapEventKind::Alloc, 0x10, 100, 0), &NoTasks);
        let rows = heap.snapshot();
        assert_eq!((rows[0].live_bytes, rows[0].live_allocations), (1600, 16));
        assert_eq!(heap.scaled_totals().allocated_bytes, 1600);
    }

    /// A size is whatever the program asked its allocator for: sums of huge ones saturate.
    #[test]
    fn huge_sizes_saturate_the_byte_counts() {
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 16);
        heap.apply(
            &event(HeapEventKind::Alloc, 0x10, u64::MAX - 1, 0),
            &NoTasks,
        );
        heap.apply(
            &event(HeapEventKind::Alloc, 0x20, u64::MAX - 1, 0),
            &NoTasks,
        );
        heap.claim_task_cell(0x20, "app::worker::{{closure}}", u64::MAX);
        heap.apply(&event(HeapEventKind::Free, 0x10, 0, 0), &NoTasks);
        heap.apply(&event(HeapEventKind::Free, 0x20, 0, 0), &NoTasks);
        assert_eq!(heap.totals.allocated_bytes, u64::MAX);
        assert_eq!(heap.totals.freed_bytes, u64::MAX);
        assert_eq!(heap.scaled_totals().allocated_bytes, u64::MAX);
        heap.apply(
            &event(HeapEventKind::Alloc, 0x30, u64::MAX / 8, 0),
            &NoTasks,
        );
        assert_eq!(heap.snapshot()[0].live_bytes, u64::MAX, "scaled by 16");
    }

    #[test]
    fn groups_carry_the_callsite_location() {
        use crate::discovery::symbolize::tests::{allocating_marker, own_function};
        let symbolizer =
            Symbolizer::load(std::path::Path::new("/proc/self/exe"), None).expect("own symbols");
        let marker = own_function(&symbolizer, "symbolize::tests::allocating_marker");
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(symbolizer), 1);
        let mut alloc = event(HeapEventKind::Alloc, 0x10, 100, 0);
        alloc.first_pc = marker + 1;
        heap.apply(&alloc, &NoTasks);
        let rows = heap.snapshot();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0].site.ends_with("allocating_marker"), "{rows:?}");
        assert_eq!(
            rows[0].location,
            Some(format!(
                "monitor/src/discovery/symbolize.rs:{}",
                allocating_marker().1
            ))
        );
        // Without line info, no location.
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 1);
        heap.apply(&alloc, &NoTasks);
        assert_eq!(heap.snapshot()[0].location, None);
    }

    #[test]
    fn a_task_cell_is_named_by_the_task_it_holds() {
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 1);
        // The spawn was seen before the allocation was read: labelled at once.
        heap.apply(&event(HeapEventKind::Alloc, 0xce11, 256, 7), &NoTasks);
        let rows = heap.snapshot();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].site, "task cell: app::worker::{{closure}}");
        assert_eq!(rows[0].task_site, "app::handler::{{closure}}");
        // The allocation was read first: the spawn relabels it, keeping its task site,
        // once only, and its free leaves the cell's group.
        heap.apply(&event(HeapEventKind::Alloc, 0x40, 128, 7), &NoTasks);
        heap.claim_task_cell(0x40, "app::late::{{closure}}", u64::MAX);
        heap.claim_task_cell(0x40, "app::other::{{closure}}", u64::MAX);
        heap.claim_task_cell(0x999, "app::nothing::{{closure}}", u64::MAX);
        let late = |heap: &ProcessHeap| {
            heap.snapshot()
                .into_iter()
                .filter(|r| r.site == "task cell: app::late::{{closure}}")
                .map(|r| (r.live_bytes, r.live_allocations, r.task_site))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            late(&heap),
            vec![(128, 1, "app::handler::{{closure}}".to_string())]
        );
        assert_eq!(heap.snapshot().len(), 2, "{:?}", heap.snapshot());
        heap.apply(&event(HeapEventKind::Free, 0x40, 128, 0), &NoTasks);
        assert!(late(&heap).is_empty());
        assert_eq!(heap.totals.freed_bytes, 128);
    }

    #[test]
    fn allocations_carry_their_task_site() {
        let mut heap = ProcessHeap::new(1, "app".into(), 0, Arc::new(Symbolizer::default()), 1);
        heap.apply(&event(HeapEventKind::Alloc, 0x10, 100, 7), &NoTasks);
        let rows = heap.snapshot();
        assert_eq!(rows[0].task_site, "app::handler::{{closure}}");
    }
}
