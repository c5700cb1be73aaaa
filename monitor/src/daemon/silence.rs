//! The silent-probe check: a process whose task hooks deliver nothing while tokio evidently
//! spawns tasks in it is not "0 alive, all fine".
//!
//! The independent signal is tokio's own task id counter (`Id::next::NEXT_ID`), read from
//! the process's memory: every spawned task takes the next id, so it advancing is proof of
//! spawns that no probe is involved in. CPU time (`/proc/PID/stat`), context switches or RSS
//! would also rise for work that spawns nothing (a busy task, keep-alive connections served
//! by one long-lived task, a non-tokio thread), so they would flag healthy services; an
//! idle service's counter does not move, so it is never flagged.
//!
//! A process whose counter advanced by [`MIN_SPAWNS`] over a sampling period in which none
//! of its task events arrived has its task hooks placed again, once; silent again after
//! that, it is degraded (`silent_probes`) until its events flow again.

use std::collections::HashMap;

use log::{info, warn};

use super::registry::ProcessRegistry;
use crate::export::Sources;
use crate::state::health::DegradedReason;
use crate::targets::procfs;

/// Spawns in one period, with no event, that count as silence (a few spawns could land in
/// the instant between the drain's last pass and the check).
pub const MIN_SPAWNS: u64 = 8;

/// What to do about one process after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to say: events flow, or tokio spawned nothing.
    None,
    /// Silent for the first time: place the task hooks again.
    Reattach { spawned: u64 },
    /// Silent again after its hooks were placed again: degraded.
    Degrade { spawned: u64 },
    /// Events flow again after it was found silent.
    Recovered,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    next_id: u64,
    events: u64,
    reattached: bool,
    silent: bool,
}

/// The last reading of each watched process.
#[derive(Debug, Default)]
pub struct SilenceWatch {
    seen: HashMap<u32, Seen>,
}

impl SilenceWatch {
    /// Takes in process `pid`'s task id counter (`next_id`) and the task events received
    /// from it so far (`events`), and says what to do.
    pub fn check(&mut self, pid: u32, next_id: u64, events: u64) -> Action {
        let Some(before) = self.seen.get_mut(&pid) else {
            self.seen.insert(
                pid,
                Seen {
                    next_id,
                    events,
                    reattached: false,
                    silent: false,
                },
            );
            return Action::None;
        };
        if next_id < before.next_id || events < before.events {
            // Another program under this pid (it exec'd and was attached again): start over,
            // and what was said of the old program's probes no longer holds.
            let was_silent = before.silent;
            *before = Seen {
                next_id,
                events,
                reattached: false,
                silent: false,
            };
            return if was_silent {
                Action::Recovered
            } else {
                Action::None
            };
        }
        let spawned = next_id - before.next_id;
        let received = events.saturating_sub(before.events);
        before.next_id = next_id;
        before.events = events;
        if received > 0 {
            let was_silent = std::mem::replace(&mut before.silent, false);
            return if was_silent {
                Action::Recovered
            } else {
                Action::None
            };
        }
        if spawned < MIN_SPAWNS {
            return Action::None;
        }
        before.silent = true;
        if std::mem::replace(&mut before.reattached, true) {
            Action::Degrade { spawned }
        } else {
            Action::Reattach { spawned }
        }
    }

    /// Forgets processes no longer watched (a new process under a reused pid starts over).
    pub fn retain(&mut self, watched: impl Fn(u32) -> bool) {
        self.seen.retain(|&pid, _| watched(pid));
    }
}

/// Checks every attached process whose task id counter is known, at `t` seconds: places
/// silent hooks again once, then marks the process degraded (`silent_probes`) while it
/// stays silent, and clears that when its events flow again.
pub fn check_all(
    watch: &mut SilenceWatch,
    registry: &mut ProcessRegistry,
    sources: &Sources,
    t: f64,
) {
    let readings: Vec<(u32, u64, u64)> = {
        let ledger = sources.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger
            .processes()
            // With no task hook (`--tasks census`) there is nothing to be silent.
            .filter(|p| p.probes_ready && !p.census_only)
            .filter_map(|p| Some((p.pid, p.task_id_counter()?, p.events)))
            .collect()
    };
    watch.retain(|pid| readings.iter().any(|&(p, _, _)| p == pid));
    for (pid, counter, events) in readings {
        // Unreadable: the process is exiting (the next reap detaches it).
        let Ok(next_id) = procfs::read_u64(pid, counter) else {
            continue;
        };
        match watch.check(pid, next_id, events) {
            Action::None => {}
            Action::Reattach { spawned } => {
                warn!(
                    "pid {pid}: tokio spawned {spawned} tasks since the last check but its \
                     probes delivered no event: placing its task hooks again"
                );
                sources
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .count_reattach(pid);
                if let Err(err) = registry.reattach_task_hooks(pid) {
                    warn!("pid {pid}: placing its task hooks again: {err:#}");
                }
            }
            Action::Degrade { spawned } => {
                let mut health = sources.health.lock().unwrap_or_else(|e| e.into_inner());
                let first = !health
                    .degraded(pid)
                    .iter()
                    .any(|d| d.reason == DegradedReason::SilentProbes);
                health.mark(pid, DegradedReason::SilentProbes, t, 1, |checks| {
                    format!(
                        "tokio spawned {spawned} tasks since the previous check and its probes \
                         delivered no event ({checks} check(s) in a row), even after they were \
                         placed again: its counts are missing, not zero; run `leakscope \
                         doctor`, and restart leakscope"
                    )
                });
                if first {
                    warn!(
                        "pid {pid}: its probes are still silent after they were placed again: \
                         degraded (silent_probes); its sites are not judged"
                    );
                }
            }
            Action::Recovered => {
                sources
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear(pid, DegradedReason::SilentProbes);
                info!("pid {pid}: its probes deliver events again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_process_is_never_silent() {
        let mut watch = SilenceWatch::default();
        for _ in 0..10 {
            assert_eq!(watch.check(7, 100, 0), Action::None);
        }
    }

    #[test]
    fn spawns_without_events_reattach_once_then_degrade_until_events_flow() {
        let mut watch = SilenceWatch::default();
        assert_eq!(watch.check(7, 100, 5), Action::None);
        assert_eq!(watch.check(7, 120, 5), Action::Reattach { spawned: 20 });
        assert_eq!(watch.check(7, 140, 5), Action::Degrade { spawned: 20 });
        assert_eq!(watch.check(7, 160, 5), Action::Degrade { spawned: 20 });
        assert_eq!(watch.check(7, 170, 9), Action::Recovered);
        assert_eq!(watch.check(7, 180, 12), Action::None);
    }

    #[test]
    fn a_few_spawns_or_flowing_events_are_not_silence() {
        let mut watch = SilenceWatch::default();
        watch.check(7, 100, 0);
        assert_eq!(watch.check(7, 100 + MIN_SPAWNS - 1, 0), Action::None);
        assert_eq!(watch.check(7, 1000, 1), Action::None);
    }

    #[test]
    fn a_reused_pid_starts_over() {
        let mut watch = SilenceWatch::default();
        watch.check(7, 100, 0);
        assert_eq!(watch.check(7, 200, 0), Action::Reattach { spawned: 100 });
        watch.retain(|_| false);
        assert_eq!(watch.check(7, 5, 0), Action::None);
        assert_eq!(watch.check(7, 50, 0), Action::Reattach { spawned: 45 });
    }

    #[test]
    fn another_program_under_the_pid_is_not_the_silent_one() {
        let mut watch = SilenceWatch::default();
        watch.check(7, 100, 3);
        watch.check(7, 200, 3);
        assert_eq!(watch.check(7, 300, 3), Action::Degrade { spawned: 100 });
        // It exec'd: a new counter and a new ledger entry.
        assert_eq!(watch.check(7, 4, 0), Action::Recovered);
        assert_eq!(watch.check(7, 40, 0), Action::Reattach { spawned: 36 });
    }
}
