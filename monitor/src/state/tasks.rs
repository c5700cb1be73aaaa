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
use crate::targets::census::CensusFigures;

mod census;
mod census_only;

pub use census::CensusTarget;

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
    /// Of `live`, tasks spawned before attach (found by the census).
    alive_before_attach: u64,
    /// `--tasks census`: tasks since attach first listed by a census, and those a census
    /// no longer listed (see `census_only`).
    census_seen: u64,
    census_gone: u64,
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
    /// For a task spawned before attach (found by the census): the attach time, so its
    /// age is a lower bound.
    spawned_ktime_ns: u64,
    task_id: Option<u64>,
    /// Spawned before attach, found by the census: its completion is not this site's.
    before_attach: bool,
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
    /// tokio's next task id once every task hook was in place: tasks with a smaller id may
    /// have been spawned before a hook could see it, so the census takes in those no hook
    /// saw (`None`: `first_task_id_after_attach` is the boundary).
    pub census_boundary: Option<u64>,
    /// What the task census of this process costs and could not read.
    pub census: CensusFigures,
    /// Tasks spawned before attach that a census found, then no longer found, without
    /// their completion being seen (its event lost, or the task released another way).
    pub census_vanished: u64,
    /// Headers of tasks no hook saw spawn whose completion was seen, so a census that read
    /// one just before it completed does not take it in (bounded). Completion events carry
    /// no task id; the header is as good here: a task from before attach still alive has
    /// held its header since before attach, so a completion at that header since was its
    /// own.
    completed_unseen_headers: census::RecentIds,
    /// `--tasks census`: no task hook is placed; the census alone lists its tasks.
    pub census_only: bool,
    /// Task hook points placed that report this process's tasks (its own and its
    /// executable's), once its probes are ready.
    pub task_hook_points: u64,
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
            census_boundary: None,
            census: CensusFigures::default(),
            census_vanished: 0,
            completed_unseen_headers: census::RecentIds::default(),
            census_only: false,
            task_hook_points: 0,
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
                alive_before_attach: 0,
                census_seen: 0,
                census_gone: 0,
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
                // Already known: seen spawning, found by the census, or re-reported after the
                // BPF side forgot it. A census-found task's first poll since attach is still
                // one of a task spawned before, whichever came first.
                if self
                    .live
                    .get(&event.header)
                    .is_some_and(|t| t.before_attach)
                {
                    self.seen_spawned_before_attach += 1;
                }
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
                match self.forget_live(event.header) {
                    // The census took it in before its spawn's event came through: the
                    // hook saw it after all, and counts it from now on.
                    Some(previous)
                        if previous.before_attach && previous.task_id == Some(event.task_id) => {}
                    Some(_) => self.completions_missed += 1,
                    None => {}
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
                        before_attach: false,
                    },
                );
                self.sites[site].live.insert((event.ktime_ns, event.header));
            }
            TaskEventKind::Complete => match self.forget_live(event.header) {
                Some(task) => {
                    // Its cell may be read after this (a heap event that comes later, or a
                    // cell its task leaves behind, as tokio 1.10.0's spawn_blocking does): it
                    // is still this task's, for a while.
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
                    if task.before_attach {
                        // Not spawned since attach: not this site's completion to count.
                        self.completed_untracked += 1;
                        self.completed_unseen_headers.insert(event.header);
                    } else {
                        self.sites[task.site].completed += 1;
                    }
                    if let Some(id) = task.task_id {
                        self.completed_ids.push_back(id);
                        if self.completed_ids.len() > RETAINED_COMPLETED_IDS
                            && let Some(oldest) = self.completed_ids.pop_front()
                        {
                            self.site_by_task_id.remove(&oldest);
                        }
                    }
                }
                None => {
                    self.completed_untracked += 1;
                    if self.first_task_id_after_attach.is_some() {
                        self.completed_unseen_headers.insert(event.header);
                    }
                }
            },
        }
    }

    /// Takes the live task at `header` out of its site.
    fn forget_live(&mut self, header: u64) -> Option<LiveTask> {
        let task = self.live.remove(&header)?;
        let site = &mut self.sites[task.site];
        site.live.remove(&(task.spawned_ktime_ns, header));
        if task.before_attach {
            site.alive_before_attach -= 1;
        }
        Some(task)
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
                alive_before_attach: site.alive_before_attach,
                // Without hooks an age counts from the census that first listed the task.
                oldest_alive_at_least: site.alive_before_attach > 0
                    || (self.census_only && !site.live.is_empty()),
                oldest_alive_seconds: site
                    .live
                    .first()
                    .map(|&(t, _)| now_ktime_ns.saturating_sub(t) as f64 / 1e9)
                    .unwrap_or(0.0),
                // A census that no longer lists a task sees it gone, hooked or not.
                completion_hooked: site.completion_hooked || self.census_only,
                census_seen: self.census_only.then_some(site.census_seen),
                census_gone: self.census_only.then_some(site.census_gone),
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

    /// Sets `pid`'s census boundary (see [`ProcessTasks::census_boundary`]).
    pub fn set_census_boundary(&mut self, pid: u32, next_task_id: u64) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process.census_boundary = Some(next_task_id);
        }
    }

    /// Marks `pid`'s probes as all in place (see [`ProcessTasks::probes_ready`]), with
    /// `task_hook_points` of them reporting its tasks.
    pub fn mark_probes_ready(&mut self, pid: u32, task_hook_points: u64) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process.probes_ready = true;
            process.task_hook_points = task_hook_points;
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
mod tests;
