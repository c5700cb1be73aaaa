//! Whether each watched process's figures can be trusted right now: the reasons they are
//! incomplete (events lost, allocations untracked, probes silent), each with when it was
//! first and last seen. The analysis reads this and says `cannot_judge` instead of judging a
//! site from incomplete data; the exports show it.
//!
//! Losses are counted by the kernel per CPU (sequence gaps, failed ring reservations), not
//! per process: a lost record could have come from any process whose probes write to that
//! ring. So a loss marks every process sharing the ring. Claiming less would be a guess.
//!
//! A loss stops mattering once the verdict window no longer holds any sample taken while
//! it happened: the reason is kept for one window after it was last seen. Silent probes are
//! different: they stay until the process's events flow again.

use std::collections::{BTreeMap, HashMap};

pub use leakscope_api::types::{Degradation, DegradedReason};

/// Every loss counter that says a process's figures may be short, as totals since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LossTotals {
    /// Task events lost: sequence gaps plus failed reservations in the task ring.
    pub task_events: u64,
    /// Heap events lost: sequence gaps plus failed reservations in the heap ring.
    pub heap_events: u64,
    /// Allocations the kernel did not track: outstanding or pending map full.
    pub heap_untracked: u64,
}

/// The health of every watched process.
#[derive(Debug, Default)]
pub struct Health {
    processes: HashMap<u32, BTreeMap<DegradedReason, Degradation>>,
    /// Loss totals at the previous observation.
    previous: LossTotals,
    /// Times each process's task hooks were placed again because they were silent.
    reattaches: HashMap<u32, u64>,
}

impl Health {
    /// Marks `pid` as degraded for `reason` at `t` (seconds since the daemon started), `count`
    /// more times; `detail(total)` says what happened, given the count so far.
    pub fn mark(
        &mut self,
        pid: u32,
        reason: DegradedReason,
        t: f64,
        count: u64,
        detail: impl Fn(u64) -> String,
    ) {
        let reasons = self.processes.entry(pid).or_default();
        let entry = reasons.entry(reason).or_insert_with(|| Degradation {
            reason,
            detail: String::new(),
            count: 0,
            since: t,
            last_seen: t,
        });
        entry.count += count;
        entry.detail = detail(entry.count);
        entry.last_seen = t;
    }

    /// Clears `reason` for `pid` (the condition is over).
    pub fn clear(&mut self, pid: u32, reason: DegradedReason) {
        if let Some(reasons) = self.processes.get_mut(&pid) {
            reasons.remove(&reason);
        }
    }

    /// Takes in the loss totals at `t`: whatever grew since the last call marks the
    /// processes whose events go through that ring (`task_pids`: every watched process;
    /// `heap_pids`: those with heap tracking). Losses last seen more than `window` seconds
    /// ago are forgotten (no sample in the verdict window comes from that time any more).
    pub fn observe_losses(
        &mut self,
        t: f64,
        window: f64,
        totals: LossTotals,
        task_pids: &[u32],
        heap_pids: &[u32],
    ) {
        let grew = |now: u64, before: u64| now.saturating_sub(before);
        let task = grew(totals.task_events, self.previous.task_events);
        let heap = grew(totals.heap_events, self.previous.heap_events);
        let untracked = grew(totals.heap_untracked, self.previous.heap_untracked);
        self.previous = totals;
        let marks = [
            (
                task,
                DegradedReason::TaskEventsLost,
                task_pids,
                "task events lost (the task ring buffer was full; the kernel does not say \
                 whose): alive and spawned counts may be off",
            ),
            (
                heap,
                DegradedReason::HeapEventsLost,
                heap_pids,
                "heap events lost (the heap ring buffer was full; the kernel does not say \
                 whose): live bytes may be off",
            ),
            (
                untracked,
                DegradedReason::HeapUntracked,
                heap_pids,
                "allocations not tracked (the kernel's map of outstanding blocks was full: \
                 raise --heap-max-blocks, or use --heap sampled): live bytes and totals \
                 leave them out",
            ),
        ];
        for (lost, reason, pids, what) in marks {
            if lost == 0 {
                continue;
            }
            for &pid in pids {
                self.mark(pid, reason, t, lost, |total| {
                    format!(
                        "{total} {what}; verdicts resume once a whole window passes without loss"
                    )
                });
            }
        }
        for reasons in self.processes.values_mut() {
            reasons.retain(|reason, d| {
                *reason == DegradedReason::SilentProbes || t - d.last_seen <= window
            });
        }
    }

    /// Counts one re-placement of `pid`'s task hooks.
    pub fn count_reattach(&mut self, pid: u32) {
        *self.reattaches.entry(pid).or_default() += 1;
    }

    /// Times `pid`'s task hooks were placed again.
    pub fn reattaches(&self, pid: u32) -> u64 {
        self.reattaches.get(&pid).copied().unwrap_or(0)
    }

    /// Forgets processes not in `watched` (they exited, or exec'd another program).
    pub fn retain(&mut self, watched: impl Fn(u32) -> bool) {
        self.processes.retain(|&pid, _| watched(pid));
        self.reattaches.retain(|&pid, _| watched(pid));
    }

    /// Why `pid`'s figures are incomplete now (empty when they are not).
    pub fn degraded(&self, pid: u32) -> Vec<Degradation> {
        self.processes
            .get(&pid)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every degraded process, by pid.
    pub fn all(&self) -> HashMap<u32, Vec<Degradation>> {
        self.processes
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(&pid, r)| (pid, r.values().cloned().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(task: u64, heap: u64, untracked: u64) -> LossTotals {
        LossTotals {
            task_events: task,
            heap_events: heap,
            heap_untracked: untracked,
        }
    }

    #[test]
    fn a_task_loss_marks_every_process_on_the_ring_for_one_window() {
        let mut health = Health::default();
        health.observe_losses(1.0, 10.0, totals(0, 0, 0), &[7, 8], &[7]);
        assert!(health.all().is_empty());
        health.observe_losses(2.0, 10.0, totals(5, 0, 0), &[7, 8], &[7]);
        health.observe_losses(3.0, 10.0, totals(7, 0, 0), &[7, 8], &[7]);
        for pid in [7, 8] {
            let d = health.degraded(pid);
            assert_eq!(d.len(), 1, "{d:?}");
            assert_eq!(d[0].reason, DegradedReason::TaskEventsLost);
            assert_eq!((d[0].since, d[0].last_seen), (2.0, 3.0));
            assert_eq!(d[0].count, 7);
            assert!(
                d[0].detail.starts_with("7 task events lost"),
                "{}",
                d[0].detail
            );
        }
        // No loss for a whole window after the last one: the window is complete again.
        health.observe_losses(13.0, 10.0, totals(7, 0, 0), &[7, 8], &[7]);
        assert_eq!(health.degraded(7).len(), 1);
        health.observe_losses(13.5, 10.0, totals(7, 0, 0), &[7, 8], &[7]);
        assert!(health.all().is_empty(), "{:?}", health.all());
    }

    #[test]
    fn heap_losses_mark_only_heap_tracked_processes() {
        let mut health = Health::default();
        health.observe_losses(1.0, 10.0, totals(0, 2, 3), &[7, 8], &[7]);
        let reasons: Vec<_> = health.degraded(7).iter().map(|d| d.reason).collect();
        assert_eq!(
            reasons,
            [
                DegradedReason::HeapEventsLost,
                DegradedReason::HeapUntracked
            ]
        );
        assert!(health.degraded(8).is_empty());
    }

    #[test]
    fn silent_probes_stay_until_cleared_and_exited_processes_are_forgotten() {
        let mut health = Health::default();
        health.mark(7, DegradedReason::SilentProbes, 1.0, 1, |_| "silent".into());
        health.count_reattach(7);
        health.observe_losses(100.0, 10.0, LossTotals::default(), &[7], &[]);
        assert_eq!(health.degraded(7).len(), 1);
        health.clear(7, DegradedReason::SilentProbes);
        assert!(health.degraded(7).is_empty());
        assert_eq!(health.reattaches(7), 1);
        health.retain(|pid| pid != 7);
        assert_eq!(health.reattaches(7), 0);
    }
}
