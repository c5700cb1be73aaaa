//! Tasks spawned before attach, as the task census finds them in the runtime's own lists,
//! merged with what the hooks see (see `targets::census`).
//!
//! The two sources never count a task twice because they are split by tokio's task id:
//! tasks with an id at or above the id counter's value once the hooks were all in
//! (`census_boundary`) come from the hooks only; below it, the census takes in those no hook
//! saw spawn (spawned before attach, or while the hooks were going in), and a spawn event
//! for one it took in first only hands it over to the hooks. A census-found task that
//! completes leaves at once by its completion event; one whose completion was seen while a
//! census was reading (so that census may still have found it) is not taken in again; one
//! that a complete census no longer finds is taken out. No count can go negative: a task
//! leaves only what it was added to.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use super::{LiveTask, MAX_LIVE_TASKS_PER_PROCESS, ProcessTasks, TaskLedger};
use crate::discovery::TargetImage;
use crate::targets::census::{CensusFigures, CensusOutcome};

/// Completions of tasks no hook saw spawn remembered (by header) at most.
const RECENT_COMPLETIONS: usize = 1 << 16;

/// A bounded set of values (task headers), the oldest forgotten first.
#[derive(Debug, Default)]
pub(super) struct RecentIds {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentIds {
    pub fn insert(&mut self, id: u64) {
        if id == 0 || !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_COMPLETIONS
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }
}

/// What a census of one process needs from the ledger.
#[derive(Debug, Clone)]
pub struct CensusTarget {
    pub pid: u32,
    /// Tells this registration of the pid from a later one (see `registered_ns`).
    pub registered_ns: u64,
    pub image: Arc<TargetImage>,
    pub load_bias: u64,
    /// Headers of live tasks the hooks saw: a way into the runtime without a scan.
    pub hints: Vec<u64>,
}

/// Hook-seen headers handed to a census, at most.
const HINTS: usize = 8;

impl ProcessTasks {
    /// Merges one census of this process, read at `now_ktime_ns` (see the module docs, and
    /// `census_only` for a process without task hooks); `figures` are its costs.
    pub fn apply_census(
        &mut self,
        outcome: &CensusOutcome,
        figures: CensusFigures,
        now_ktime_ns: u64,
    ) {
        self.census = figures;
        if self.census_only {
            self.apply_census_only(outcome, now_ktime_ns);
            return;
        }
        let Some(boundary) = self.census_boundary.or(self.first_task_id_after_attach) else {
            return;
        };
        // Below the boundary a task may have been spawned before its hook was in; those
        // the hooks did see are in `live` by their header and left alone.
        let before_attach = |id: u64| id != 0 && id < boundary;
        // A task spawned before attach holds its header since: an unseen completion at that
        // header since attach was its own. (One spawned while the hooks went in may sit on
        // the header of a task that completed meanwhile: a complete census sorts it out.)
        let first = self.first_task_id_after_attach.unwrap_or(boundary);
        let mut found = HashSet::new();
        for task in outcome.tasks.iter().filter(|t| before_attach(t.task_id)) {
            found.insert(task.task_id);
            if (task.task_id < first && self.completed_unseen_headers.contains(task.header))
                || self.live.contains_key(&task.header)
            {
                continue;
            }
            if self.live.len() >= MAX_LIVE_TASKS_PER_PROCESS {
                self.spawned_untracked += 1;
                continue;
            }
            let site = self.site_for(task.vtable);
            self.live.insert(
                task.header,
                LiveTask {
                    site,
                    spawned_ktime_ns: self.registered_ns,
                    task_id: Some(task.task_id),
                    before_attach: true,
                },
            );
            let site_tasks = &mut self.sites[site];
            site_tasks.live.insert((self.registered_ns, task.header));
            site_tasks.alive_before_attach += 1;
            self.site_by_task_id.insert(task.task_id, site);
        }
        let vanished: Vec<(u64, u64)> = self
            .live
            .iter()
            .filter_map(|(&header, task)| {
                let id = task.task_id?;
                (task.before_attach && outcome.covers(id) && !found.contains(&id))
                    .then_some((header, id))
            })
            .collect();
        for (header, id) in vanished {
            self.forget_live(header);
            self.site_by_task_id.remove(&id);
            self.census_vanished += 1;
        }
    }

    /// What a census of this process needs, if tasks may predate its hooks (tokio's id
    /// counter was read at attach; without it the two sources could not be told apart).
    pub fn census_target(&self) -> Option<CensusTarget> {
        self.first_task_id_after_attach?;
        Some(CensusTarget {
            pid: self.pid,
            registered_ns: self.registered_ns,
            image: self.image.clone(),
            load_bias: self.load_bias,
            hints: self
                .live
                .iter()
                .filter(|(_, t)| !t.before_attach)
                .map(|(&header, _)| header)
                .take(HINTS)
                .collect(),
        })
    }
}

impl TaskLedger {
    /// The processes a census should read now.
    pub fn census_targets(&self) -> Vec<CensusTarget> {
        self.processes
            .values()
            .filter_map(ProcessTasks::census_target)
            .collect()
    }

    /// Merges a census of `target`'s process read at `now_ktime_ns`, unless that
    /// registration is gone (the process exited or exec'd while it was read).
    pub fn apply_census(
        &mut self,
        target: &CensusTarget,
        outcome: &CensusOutcome,
        figures: CensusFigures,
        now_ktime_ns: u64,
    ) {
        if let Some(process) = self.processes.get_mut(&target.pid)
            && process.registered_ns == target.registered_ns
        {
            process.apply_census(outcome, figures, now_ktime_ns);
        }
    }
}
