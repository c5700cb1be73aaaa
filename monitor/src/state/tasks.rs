//! Task lifetimes per spawn site: the state that task events update and exports read.
//!
//! A spawn site is keyed by the task's vtable (tokio builds one vtable per spawned future
//! type), so counting needs no stack and no symbol lookup on the hot path: the label is
//! resolved once, the first time a vtable is seen.
//!
//! Every table here is bounded: live tasks per process, sites per process. What does not fit
//! is counted, never silently dropped, so an export can say how much it does not know.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

pub use leakscope_api::types::{ProcessSummary, SiteSnapshot};
use monitor_common::{TaskEvent, TaskEventKind};

use super::intern::BoundedLabels;
use super::pending::PendingEvents;
use super::stream::EventStream;
use crate::discovery::TargetImage;

/// Live tasks tracked per process before new spawns are only counted, not tracked.
pub const MAX_LIVE_TASKS_PER_PROCESS: usize = 1 << 20;
/// Distinct spawn-site labels per process; further sites share the label [`OVERFLOW_SITE`].
pub const MAX_SITES_PER_PROCESS: usize = 512;
/// Completed tasks whose id → site binding is kept, for heap events that arrive after the
/// task's completion event (the two streams are separate ring buffers).
pub const RETAINED_COMPLETED_IDS: usize = 1 << 16;
/// Completed tasks whose header → site binding is kept, for the allocation of a task's cell
/// read after the task's completion (the heap ring is read after the task ring, and a
/// short task spawns and completes within one drain: a `spawn_blocking` task, say).
pub const RETAINED_COMPLETED_CELLS: usize = 1 << 16;
/// Label of the site that absorbs spawn sites beyond [`MAX_SITES_PER_PROCESS`].
pub const OVERFLOW_SITE: &str = "other (site limit reached)";

/// One spawn site of one process: where tasks of one future type come from. Its name is
/// the [`SiteLabel`] at the same index.
#[derive(Debug)]
pub struct SpawnSite {
    /// Every vtable of the site has a reachable completion hook.
    pub completion_hooked: bool,
    pub spawned: u64,
    pub completed: u64,
    /// Live tasks ordered by spawn time, so the oldest is the first entry.
    live: BTreeSet<(u64, u64)>,
}

/// A spawn site's name: the demangled future type (e.g.
/// `myapp::handler::{{closure}}::{{closure}}`) and, when the binary has DWARF line info, the
/// `file:line` of the async block.
pub type SiteLabel = (String, Option<String>);

#[derive(Debug, Clone, Copy)]
struct LiveTask {
    site: usize,
    spawned_ktime_ns: u64,
    task_id: Option<u64>,
}

/// What one attached process is running: its tasks by spawn site.
#[derive(Debug)]
pub struct ProcessTasks {
    pub pid: u32,
    /// File name of the executable, used as the `exe` label.
    pub exe: String,
    image: Arc<TargetImage>,
    /// Runtime address minus link-time address of the executable's mapping.
    load_bias: u64,
    labels: BoundedLabels<SiteLabel>,
    sites: Vec<SpawnSite>,
    site_by_vtable: HashMap<u64, usize>,
    live: HashMap<u64, LiveTask>,
    /// tokio task id → site, for live tasks and the most recently completed ones.
    site_by_task_id: HashMap<u64, usize>,
    completed_ids: VecDeque<u64>,
    /// header → (site, spawn ktime) of the most recently completed tasks, oldest first in
    /// `completed_cells`.
    completed_cell_sites: HashMap<u64, (usize, u64)>,
    completed_cells: VecDeque<(u64, u64)>,
    /// Completions of tasks spawned before leakscope attached: they are not counted against
    /// any site, so a site's alive count never goes negative.
    pub completed_untracked: u64,
    /// Spawns not tracked because [`MAX_LIVE_TASKS_PER_PROCESS`] was reached.
    pub spawned_untracked: u64,
    /// A header reused by a new spawn while still live: its completion event was lost.
    pub completions_missed: u64,
    /// tokio's next task id when leakscope attached: a first poll of a task with a smaller
    /// id is a task spawned before attach (not counted, as those seen by no hook are not).
    pub first_task_id_after_attach: Option<u64>,
    /// First polls of tasks spawned before attach (see `first_task_id_after_attach`).
    pub seen_spawned_before_attach: u64,
    /// All of the process's probes are in place. The process is registered before they go
    /// in (so their first events find it), but only counts as attached once they are: a
    /// client that waits for `leakscope_attached_processes` must not act before events flow.
    pub probes_ready: bool,
    /// Task events received from this process (the silent-probe check compares it with
    /// tokio's own task id counter).
    pub events: u64,
    /// CLOCK_MONOTONIC (the kernel's event time) when the process was registered: an exec
    /// reported with an earlier time happened before, to the program registered here.
    pub registered_ns: u64,
}

impl ProcessTasks {
    /// Events of spawn sites beyond [`MAX_SITES_PER_PROCESS`], counted under
    /// [`OVERFLOW_SITE`].
    pub fn sites_folded(&self) -> u64 {
        self.labels.folded
    }

    pub fn new(pid: u32, exe: String, image: Arc<TargetImage>, load_bias: u64) -> Self {
        Self {
            pid,
            exe,
            image,
            load_bias,
            labels: BoundedLabels::new(MAX_SITES_PER_PROCESS, (OVERFLOW_SITE.to_string(), None)),
            sites: Vec::new(),
            site_by_vtable: HashMap::new(),
            live: HashMap::new(),
            site_by_task_id: HashMap::new(),
            completed_ids: VecDeque::new(),
            completed_cell_sites: HashMap::new(),
            completed_cells: VecDeque::new(),
            completed_untracked: 0,
            spawned_untracked: 0,
            completions_missed: 0,
            first_task_id_after_attach: None,
            seen_spawned_before_attach: 0,
            probes_ready: false,
            registered_ns: 0,
            events: 0,
        }
    }

    /// Spawn-site label of the live task whose header is at runtime address `header`.
    pub fn site_of_live_task(&self, header: u64) -> Option<&str> {
        self.live_task(header).map(|(site, _)| site)
    }

    /// Spawn-site label and spawn time (ktime) of the live task whose header is at
    /// `header`.
    pub fn live_task(&self, header: u64) -> Option<(&str, u64)> {
        self.live
            .get(&header)
            .map(|task| (self.labels.get(task.site).0.as_str(), task.spawned_ktime_ns))
    }

    /// Spawn-site label and spawn time (ktime) of the task whose cell is at `header`: live,
    /// or among the most recently completed (whose cell may outlive it: freed later, or
    /// never, as tokio 1.10.0's `spawn_blocking` leaked them). A block is that cell only if
    /// allocated before the spawn; the caller checks.
    pub fn task_of_cell(&self, header: u64) -> Option<(&str, u64)> {
        self.live_task(header).or_else(|| {
            self.completed_cell_sites
                .get(&header)
                .map(|&(site, spawned)| (self.labels.get(site).0.as_str(), spawned))
        })
    }

    /// Spawn-site label of the task with tokio id `task_id` (live or recently completed).
    pub fn site_of_task(&self, task_id: u64) -> Option<&str> {
        self.site_by_task_id
            .get(&task_id)
            .map(|&i| self.labels.get(i).0.as_str())
    }

    /// Where tokio's next task id (`Id::next::NEXT_ID`) lives in the process, if the binary
    /// has such a counter leakscope knows.
    pub fn task_id_counter(&self) -> Option<u64> {
        self.image
            .next_task_id
            .map(|link| link.wrapping_add(self.load_bias))
    }

    pub fn image(&self) -> &TargetImage {
        &self.image
    }

    fn site_for(&mut self, vtable: u64) -> usize {
        if let Some(&index) = self.site_by_vtable.get(&vtable) {
            return index;
        }
        let link_address = vtable.wrapping_sub(self.load_bias);
        let (label, completion_hooked) = match self.image.vtable_at(link_address) {
            Some(known) => (
                (known.site.clone(), known.location.clone()),
                known.complete_hooked,
            ),
            // Not a vtable discovery found: its completion path is unknown.
            None => ((format!("vtable@{link_address:#x}"), None), false),
        };
        // Distinct vtables may carry the same label (one per scheduler flavour, or identical
        // code folded by the linker): they are one site to the user.
        let index = self.labels.intern(label);
        if index == self.sites.len() {
            self.sites.push(SpawnSite {
                completion_hooked,
                spawned: 0,
                completed: 0,
                live: BTreeSet::new(),
            });
        }
        self.sites[index].completion_hooked &= completion_hooked;
        self.site_by_vtable.insert(vtable, index);
        index
    }

    fn apply(&mut self, event: &TaskEvent, kind: TaskEventKind) {
        match kind {
            TaskEventKind::FirstPoll
                if self
                    .live
                    .get(&event.header)
                    .is_some_and(|t| self.site_by_vtable.get(&event.vtable) == Some(&t.site)) =>
            {
                // Already known: seen spawning, or re-reported after the BPF side forgot it.
            }
            TaskEventKind::FirstPoll
                if event.task_id != 0
                    && self
                        .first_task_id_after_attach
                        .is_some_and(|first| event.task_id < first) =>
            {
                // Spawned before attach, polled since: not a spawn leakscope saw. Its
                // completion will count as untracked, like any pre-attach task's.
                self.seen_spawned_before_attach += 1;
            }
            TaskEventKind::Spawn | TaskEventKind::FirstPoll => {
                let site = self.site_for(event.vtable);
                self.sites[site].spawned += 1;
                if let Some(previous) = self.live.remove(&event.header) {
                    self.completions_missed += 1;
                    self.sites[previous.site]
                        .live
                        .remove(&(previous.spawned_ktime_ns, event.header));
                }
                if self.live.len() >= MAX_LIVE_TASKS_PER_PROCESS {
                    self.spawned_untracked += 1;
                    return;
                }
                if event.task_id != 0 {
                    log::debug!(
                        "pid {}: task id {} spawned at site {site}",
                        self.pid,
                        event.task_id
                    );
                    self.site_by_task_id.insert(event.task_id, site);
                }
                self.live.insert(
                    event.header,
                    LiveTask {
                        site,
                        spawned_ktime_ns: event.ktime_ns,
                        task_id: (event.task_id != 0).then_some(event.task_id),
                    },
                );
                self.sites[site].live.insert((event.ktime_ns, event.header));
            }
            TaskEventKind::Complete => match self.live.remove(&event.header) {
                Some(task) => {
                    self.completed_cell_sites
                        .insert(event.header, (task.site, task.spawned_ktime_ns));
                    self.completed_cells
                        .push_back((event.header, task.spawned_ktime_ns));
                    if self.completed_cells.len() > RETAINED_COMPLETED_CELLS
                        && let Some((header, spawned)) = self.completed_cells.pop_front()
                        && self
                            .completed_cell_sites
                            .get(&header)
                            .is_some_and(|&(_, s)| s == spawned)
                    {
                        self.completed_cell_sites.remove(&header);
                    }
                    let site = &mut self.sites[task.site];
                    site.completed += 1;
                    site.live.remove(&(task.spawned_ktime_ns, event.header));
                    if let Some(id) = task.task_id {
                        self.completed_ids.push_back(id);
                        if self.completed_ids.len() > RETAINED_COMPLETED_IDS
                            && let Some(oldest) = self.completed_ids.pop_front()
                        {
                            self.site_by_task_id.remove(&oldest);
                        }
                    }
                }
                None => self.completed_untracked += 1,
            },
        }
    }

    /// Per-site figures at `now_ktime_ns` (CLOCK_MONOTONIC, the clock BPF stamps events with).
    pub fn snapshot(&self, now_ktime_ns: u64) -> Vec<SiteSnapshot> {
        self.sites
            .iter()
            .enumerate()
            .map(|(index, site)| SiteSnapshot {
                pid: self.pid,
                exe: self.exe.clone(),
                site: self.labels.get(index).0.clone(),
                location: self.labels.get(index).1.clone(),
                spawned: site.spawned,
                completed: site.completed,
                alive: site.live.len() as u64,
                oldest_alive_seconds: site
                    .live
                    .first()
                    .map(|&(t, _)| now_ktime_ns.saturating_sub(t) as f64 / 1e9)
                    .unwrap_or(0.0),
                completion_hooked: site.completion_hooked,
            })
            .collect()
    }
}

/// All attached processes' task state, fed by the event stream.
#[derive(Debug, Default)]
pub struct TaskLedger {
    processes: HashMap<u32, ProcessTasks>,
    pending: PendingEvents,
    pub stream: EventStream,
}

impl TaskLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a process and replays the events it sent before (see [`PendingEvents`]).
    pub fn add_process(&mut self, mut process: ProcessTasks) {
        for event in self.pending.take(process.pid) {
            if let Some(kind) = TaskEventKind::from_u32(event.kind) {
                process.events += 1;
                process.apply(&event, kind);
            }
        }
        self.processes.insert(process.pid, process);
    }

    /// Drops events held for processes that exited or were never registered in time.
    pub fn expire_pending(&mut self, now_ktime_ns: u64, is_alive: impl Fn(u32) -> bool) {
        self.stream
            .ignore(self.pending.expire(now_ktime_ns, is_alive));
    }

    /// Process `pid` exec'd at `ktime_ns`: the program registered before then is over and
    /// forgotten; one registered since is the new program and stays.
    pub fn exec(&mut self, pid: u32, ktime_ns: u64) {
        if self
            .processes
            .get(&pid)
            .is_some_and(|p| p.registered_ns <= ktime_ns)
        {
            self.processes.remove(&pid);
        }
    }

    /// Forget a process (it exited or was detached): its sites leave the exports.
    pub fn remove_process(&mut self, pid: u32) -> Option<ProcessTasks> {
        self.processes.remove(&pid)
    }

    pub fn processes(&self) -> impl Iterator<Item = &ProcessTasks> {
        self.processes.values()
    }

    /// Marks `pid`'s probes as all in place (see [`ProcessTasks::probes_ready`]).
    pub fn mark_probes_ready(&mut self, pid: u32) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process.probes_ready = true;
        }
    }

    /// Processes whose probes are all in place.
    pub fn attached_processes(&self) -> usize {
        self.processes.values().filter(|p| p.probes_ready).count()
    }

    /// The processes known to the ledger, by pid, and whether their probes are in place.
    pub fn process_summaries(&self) -> Vec<ProcessSummary> {
        let mut rows: Vec<ProcessSummary> = self
            .processes
            .values()
            .map(|p| ProcessSummary {
                pid: p.pid,
                exe: p.exe.clone(),
                attached: p.probes_ready,
                labels: Default::default(),
                degraded: Vec::new(),
                probe_reattaches: 0,
            })
            .collect();
        rows.sort_by_key(|r| r.pid);
        rows
    }

    pub fn apply(&mut self, event: &TaskEvent) {
        self.stream.receive(event.cpu, event.seq);
        let Some(kind) = TaskEventKind::from_u32(event.kind) else {
            self.stream.ignore(1);
            return;
        };
        match self.processes.get_mut(&event.pid) {
            Some(process) => {
                process.events += 1;
                process.apply(event, kind);
            }
            None => {
                if !self.pending.hold(event) {
                    self.stream.ignore(1);
                }
            }
        }
    }

    pub fn process(&self, pid: u32) -> Option<&ProcessTasks> {
        self.processes.get(&pid)
    }

    pub fn snapshot(&self, now_ktime_ns: u64) -> Vec<SiteSnapshot> {
        let mut rows: Vec<SiteSnapshot> = self
            .processes
            .values()
            .flat_map(|p| p.snapshot(now_ktime_ns))
            .collect();
        rows.sort_by(|a, b| (a.pid, &a.site).cmp(&(b.pid, &b.site)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{NamingMethod, TaskVtable};

    fn image() -> Arc<TargetImage> {
        let vtable = |vaddr: u64, site: &str| TaskVtable {
            vaddr,
            site: site.to_string(),
            naming: NamingMethod::FuturePollCall,
            complete_hooked: true,
            ..TaskVtable::default()
        };
        Arc::new(TargetImage {
            vtables: vec![
                vtable(0x1000, "app::leak::{{closure}}"),
                vtable(0x2000, "app::ok::{{closure}}"),
                vtable(0x3000, "app::ok::{{closure}}"),
            ],
            ..TargetImage::default()
        })
    }

    fn event(kind: TaskEventKind, header: u64, vtable: u64, seq: u64) -> TaskEvent {
        TaskEvent {
            ktime_ns: seq * 1_000_000_000,
            seq,
            header,
            vtable,
            pid: 7,
            tid: 7,
            cpu: 0,
            kind: kind as u32,
            task_id: header,
        }
    }

    const BIAS: u64 = 0x5555_0000_0000;

    fn ledger() -> TaskLedger {
        let mut ledger = TaskLedger::new();
        ledger.add_process(ProcessTasks::new(7, "app".into(), image(), BIAS));
        ledger
    }

    fn row<'a>(rows: &'a [SiteSnapshot], site: &str) -> &'a SiteSnapshot {
        rows.iter()
            .find(|r| r.site == site)
            .unwrap_or_else(|| panic!("no row for {site} in {rows:?}"))
    }

    #[test]
    fn counts_alive_per_site_and_oldest_age() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 2));
        ledger.apply(&event(TaskEventKind::Spawn, 0xc0, BIAS + 0x2000, 3));
        ledger.apply(&event(TaskEventKind::Complete, 0xc0, BIAS + 0x2000, 4));
        let rows = ledger.snapshot(10_000_000_000);
        let leak = row(&rows, "app::leak::{{closure}}");
        assert_eq!((leak.spawned, leak.completed, leak.alive), (2, 0, 2));
        assert_eq!(leak.oldest_alive_seconds, 9.0);
        let ok = row(&rows, "app::ok::{{closure}}");
        assert_eq!((ok.spawned, ok.completed, ok.alive), (1, 1, 0));
        assert_eq!(ok.oldest_alive_seconds, 0.0);
    }

    #[test]
    fn a_process_counts_as_attached_only_once_its_probes_are_in() {
        let mut ledger = ledger();
        // Registered (events already find it) but its probes are still going in.
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
        assert_eq!(ledger.attached_processes(), 0);
        ledger.mark_probes_ready(7);
        assert_eq!(ledger.attached_processes(), 1);
        ledger.remove_process(7);
        assert_eq!(ledger.attached_processes(), 0);
    }

    #[test]
    fn vtables_with_one_label_are_one_site() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x2000, 1));
        ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x3000, 2));
        let rows = ledger.snapshot(3_000_000_000);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].alive, 2);
    }

    #[test]
    fn completion_of_a_task_spawned_before_attach_never_goes_negative() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Complete, 0xdead, BIAS + 0x1000, 1));
        assert!(ledger.snapshot(0).is_empty());
        let process = ledger.processes().next().unwrap();
        assert_eq!(process.completed_untracked, 1);
    }

    #[test]
    fn sites_beyond_the_limit_share_one_label_and_are_counted() {
        let mut ledger = ledger();
        let extra = 20;
        for i in 0..(MAX_SITES_PER_PROCESS + extra) as u64 {
            ledger.apply(&event(
                TaskEventKind::Spawn,
                0xa0 + 0x100 * i,
                BIAS + 0x10_0000 + 0x40 * i,
                i + 1,
            ));
        }
        let rows = ledger.snapshot(1);
        assert_eq!(rows.len(), MAX_SITES_PER_PROCESS + 1);
        assert_eq!(row(&rows, OVERFLOW_SITE).spawned, extra as u64);
        assert_eq!(ledger.process(7).unwrap().sites_folded(), extra as u64);
    }

    #[test]
    fn unknown_vtable_gets_an_address_label() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x9000, 1));
        let rows = ledger.snapshot(1);
        assert_eq!(rows[0].site, "vtable@0x9000");
    }

    #[test]
    fn sequence_gaps_count_as_lost_events() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 5));
        assert_eq!(ledger.stream.stats.lost, 3);
        assert_eq!(ledger.stream.stats.events, 2);
    }

    #[test]
    fn reused_header_counts_a_missed_completion() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x2000, 2));
        let rows = ledger.snapshot(3_000_000_000);
        assert_eq!(row(&rows, "app::leak::{{closure}}").alive, 0);
        assert_eq!(row(&rows, "app::ok::{{closure}}").alive, 1);
        assert_eq!(ledger.processes().next().unwrap().completions_missed, 1);
    }

    #[test]
    fn first_poll_counts_as_spawn_once() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::FirstPoll, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::FirstPoll, 0xa0, BIAS + 0x1000, 2));
        ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 3));
        ledger.apply(&event(TaskEventKind::FirstPoll, 0xb0, BIAS + 0x1000, 4));
        let rows = ledger.snapshot(5_000_000_000);
        let leak = row(&rows, "app::leak::{{closure}}");
        assert_eq!((leak.spawned, leak.alive), (2, 2));
        assert_eq!(leak.oldest_alive_seconds, 4.0);
    }

    #[test]
    fn first_polls_of_tasks_spawned_before_attach_are_not_spawns() {
        let mut ledger = TaskLedger::new();
        let mut process = ProcessTasks::new(7, "app".into(), image(), BIAS);
        process.first_task_id_after_attach = Some(0xb0);
        ledger.add_process(process);
        // Task 0xa0 predates attach; 0xb0 and 0xc0 do not.
        ledger.apply(&event(TaskEventKind::FirstPoll, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::FirstPoll, 0xb0, BIAS + 0x1000, 2));
        ledger.apply(&event(TaskEventKind::FirstPoll, 0xc0, BIAS + 0x1000, 3));
        ledger.apply(&event(TaskEventKind::Complete, 0xa0, BIAS + 0x1000, 4));
        let rows = ledger.snapshot(5_000_000_000);
        let leak = row(&rows, "app::leak::{{closure}}");
        assert_eq!((leak.spawned, leak.alive), (2, 2));
        let process = ledger.process(7).unwrap();
        assert_eq!(process.seen_spawned_before_attach, 1);
        assert_eq!(process.completed_untracked, 1);
    }

    #[test]
    fn task_ids_resolve_to_sites_after_completion() {
        let mut ledger = ledger();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::Complete, 0xa0, BIAS + 0x1000, 2));
        let process = ledger.process(7).unwrap();
        assert_eq!(process.site_of_task(0xa0), Some("app::leak::{{closure}}"));
        assert_eq!(process.site_of_task(0xb0), None);
        assert_eq!(process.site_of_live_task(0xa0), None);
    }

    #[test]
    fn events_before_registration_are_replayed_when_the_process_registers() {
        let mut ledger = TaskLedger::new();
        ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
        ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 2));
        ledger.apply(&event(TaskEventKind::Complete, 0xb0, BIAS + 0x1000, 3));
        assert!(ledger.snapshot(0).is_empty());
        ledger.add_process(ProcessTasks::new(7, "app".into(), image(), BIAS));
        let rows = ledger.snapshot(4_000_000_000);
        let leak = row(&rows, "app::leak::{{closure}}");
        assert_eq!((leak.spawned, leak.completed, leak.alive), (2, 1, 1));
        assert_eq!(ledger.stream.stats.ignored, 0);
    }

    #[test]
    fn events_of_processes_never_registered_expire() {
        let mut ledger = TaskLedger::new();
        let mut e = event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1);
        e.pid = 99;
        ledger.apply(&e);
        e.pid = 100;
        ledger.apply(&e);
        // pid 99 exited; pid 100 lives but is held for less than the age bound.
        ledger.expire_pending(e.ktime_ns + 1, |pid| pid == 100);
        assert_eq!(ledger.stream.stats.ignored, 1);
        ledger.expire_pending(
            e.ktime_ns + crate::state::pending::PENDING_MAX_AGE_NS,
            |_| true,
        );
        assert_eq!(ledger.stream.stats.ignored, 2);
        ledger.add_process(ProcessTasks::new(100, "app".into(), image(), BIAS));
        assert!(ledger.snapshot(0).is_empty());
    }
}
