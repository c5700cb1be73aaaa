//! `--tasks census`: the census is the only source of a process's tasks (no task hook is
//! placed, so no task event comes).
//!
//! Each census that read a task's lists to the end (`CensusOutcome::covers`) is the truth
//! about it: a task it lists is alive at its site, one it no longer lists is gone. A task
//! whose id is below tokio's id counter at attach is "before attach" (as in hook mode, left
//! out of the verdicts' growth); every other one counts as seen since attach. What the
//! hooks would count exactly is only approximated, and named so: `seen` is tasks first
//! listed by a census, `gone` those no longer listed; a task spawned and completed between
//! two censuses is in neither, and an age counts from the census that first listed the task
//! (from the attach for one from before), so it is a lower bound.

use std::collections::HashSet;

use super::{LiveTask, MAX_LIVE_TASKS_PER_PROCESS, ProcessTasks};
use crate::targets::census::CensusOutcome;

impl ProcessTasks {
    /// Merges one census of a process with no task hook, read at `now_ktime_ns`.
    pub(super) fn apply_census_only(&mut self, outcome: &CensusOutcome, now_ktime_ns: u64) {
        if !outcome.found {
            return;
        }
        let boundary = self
            .census_boundary
            .or(self.first_task_id_after_attach)
            .unwrap_or(0);
        let mut listed = HashSet::with_capacity(outcome.tasks.len());
        for task in &outcome.tasks {
            listed.insert(task.header);
            match self.live.get(&task.header) {
                // The same task as the last census found there.
                Some(known) if known.task_id == Some(task.task_id) => continue,
                // Another task on a freed header: the one before is gone.
                Some(_) => self.forget_census_task(task.header),
                None => {}
            }
            if self.live.len() >= MAX_LIVE_TASKS_PER_PROCESS {
                self.spawned_untracked += 1;
                continue;
            }
            let before_attach = task.task_id != 0 && task.task_id < boundary;
            let site = self.site_for(task.vtable);
            let first_seen = if before_attach {
                self.registered_ns
            } else {
                now_ktime_ns
            };
            self.live.insert(
                task.header,
                LiveTask {
                    site,
                    spawned_ktime_ns: first_seen,
                    task_id: Some(task.task_id),
                    before_attach,
                },
            );
            let site_tasks = &mut self.sites[site];
            site_tasks.live.insert((first_seen, task.header));
            if before_attach {
                site_tasks.alive_before_attach += 1;
            } else {
                site_tasks.census_seen += 1;
            }
            self.site_by_task_id.insert(task.task_id, site);
        }
        let gone: Vec<u64> = self
            .live
            .iter()
            .filter(|(header, task)| {
                !listed.contains(header) && task.task_id.is_some_and(|id| outcome.covers(id))
            })
            .map(|(&header, _)| header)
            .collect();
        for header in gone {
            self.forget_census_task(header);
        }
    }

    /// A task a census listed before is no longer there: it completed (or was cancelled)
    /// since.
    fn forget_census_task(&mut self, header: u64) {
        let Some(task) = self.forget_live(header) else {
            return;
        };
        if let Some(id) = task.task_id {
            self.site_by_task_id.remove(&id);
        }
        if task.before_attach {
            self.completed_untracked += 1;
        } else {
            self.sites[task.site].census_gone += 1;
        }
    }
}
