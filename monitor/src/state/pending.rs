//! Task events of processes not registered yet, held and replayed when they are.

use std::collections::HashMap;

use monitor_common::TaskEvent;

/// Events from processes not registered yet, replayed when they are.
///
/// An `--exe` probe sits on the executable's file, so it reports a process from its exec
/// on, while the daemon registers that process only at its next scan (and after the process
/// has mapped its libraries). Holding those first events means the tasks a service spawns
/// at startup (its long-lived workers) are counted. Bounded by events and by age.
#[derive(Debug, Default)]
pub struct PendingEvents {
    by_pid: HashMap<u32, Vec<TaskEvent>>,
    held: usize,
}

/// At most this many events are held for unregistered processes, all pids together.
pub const PENDING_EVENTS_MAX: usize = 1 << 16;
/// Events held longer than this (their process was never registered) are dropped.
pub const PENDING_MAX_AGE_NS: u64 = 30_000_000_000;

impl PendingEvents {
    /// Holds `event`; false when the bound is reached and it was not held.
    pub fn hold(&mut self, event: &TaskEvent) -> bool {
        if self.held >= PENDING_EVENTS_MAX {
            return false;
        }
        self.by_pid.entry(event.pid).or_default().push(*event);
        self.held += 1;
        true
    }

    pub fn take(&mut self, pid: u32) -> Vec<TaskEvent> {
        let events = self.by_pid.remove(&pid).unwrap_or_default();
        self.held -= events.len();
        events
    }

    /// Drops the events of processes that are gone or whose first held event is too old;
    /// returns how many were dropped.
    pub fn expire(&mut self, now_ktime_ns: u64, is_alive: impl Fn(u32) -> bool) -> u64 {
        let before = self.held;
        self.by_pid.retain(|&pid, events| {
            is_alive(pid)
                && events
                    .first()
                    .is_some_and(|e| now_ktime_ns.saturating_sub(e.ktime_ns) < PENDING_MAX_AGE_NS)
        });
        self.held = self.by_pid.values().map(Vec::len).sum();
        (before - self.held) as u64
    }
}
