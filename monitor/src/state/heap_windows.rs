//! What `--heap adaptive`'s windows add up to: per process, the blocks each window left
//! behind at each callsite, and the counters that say when and why windows ran and what
//! their probes cost. Pure bookkeeping; the controller (`daemon::heap_window`) fills it,
//! the analysis judges it (`analysis::windows`), the exports read it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use leakscope_api::types::{Degradation, DegradedReason};

/// Windows remembered per process: enough to see a callsite repeat across windows, and
/// a bound on memory (older windows are dropped and counted).
pub const WINDOWS_KEPT: usize = 16;

/// Callsites remembered per window (the largest survivors; the rest are counted).
pub const CALLSITES_PER_WINDOW: usize = 64;

/// Where a process's adaptive heap tracking stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowPhase {
    /// No heap probe attached: only the cheap signals are read.
    Idle,
    /// Every allocator hook attached: the window's allocations are recorded.
    Allocating,
    /// Only the free hook attached: the window's blocks are followed until freed.
    Following,
    /// Probes off; no new window before the cooldown ends.
    Cooldown,
}

impl WindowPhase {
    pub const ALL: [WindowPhase; 4] = [
        WindowPhase::Idle,
        WindowPhase::Allocating,
        WindowPhase::Following,
        WindowPhase::Cooldown,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            WindowPhase::Idle => "idle",
            WindowPhase::Allocating => "allocating",
            WindowPhase::Following => "following",
            WindowPhase::Cooldown => "cooldown",
        }
    }
}

/// Why a window was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpenReason {
    /// Anonymous memory rose (Mann–Kendall) by more than the task counts explain.
    AnonGrowth,
    /// The same, while an earlier window's survivors wait to be seen again (confirmation).
    Confirm,
}

impl OpenReason {
    pub const ALL: [OpenReason; 2] = [OpenReason::AnonGrowth, OpenReason::Confirm];

    pub const fn name(self) -> &'static str {
        match self {
            OpenReason::AnonGrowth => "anon_growth",
            OpenReason::Confirm => "confirm",
        }
    }
}

/// Why a window that the signals asked for did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The hour's probe-time budget would be exceeded.
    Budget,
    /// Attaching the probes failed.
    AttachFailed,
}

impl SkipReason {
    pub const ALL: [SkipReason; 2] = [SkipReason::Budget, SkipReason::AttachFailed];

    pub const fn name(self) -> &'static str {
        match self {
            SkipReason::Budget => "budget",
            SkipReason::AttachFailed => "attach_failed",
        }
    }
}

/// What one window's blocks at one callsite came to.
#[derive(Debug, Clone, PartialEq)]
pub struct CallsiteSurvivors {
    pub site: String,
    pub location: Option<String>,
    /// Live when the allocation hooks came off (allocated in the window, not yet freed).
    pub live_at_close_bytes: u64,
    /// Still live when the follow phase ended: they outlived it.
    pub survived_bytes: u64,
    pub survived_blocks: u64,
}

/// One finished window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRecord {
    /// Seconds since the session started, when the allocation hooks went on.
    pub started: f64,
    /// How long the allocation hooks were on.
    pub allocating_seconds: f64,
    /// How long the window's blocks were followed after that.
    pub following_seconds: f64,
    /// Largest first, at most [`CALLSITES_PER_WINDOW`].
    pub callsites: Vec<CallsiteSurvivors>,
    /// Heap data lost while it was open (events or untracked allocations), as the process's
    /// health said: its survivors may be short, so it is not judged from.
    pub losses: Option<String>,
}

impl WindowRecord {
    /// When its follow phase ended.
    pub fn ended(&self) -> f64 {
        self.started + self.allocating_seconds + self.following_seconds
    }
}

/// The windows of one process.
#[derive(Debug, Clone, Default)]
pub struct ProcessWindows {
    pub exe: String,
    pub phase: Option<WindowPhase>,
    /// Oldest first, at most [`WINDOWS_KEPT`].
    pub windows: VecDeque<WindowRecord>,
    /// Windows finished over the process's life (also those no longer kept).
    pub windows_finished: u64,
    /// Growth checks of the cheap signals made.
    pub checks: u64,
    /// Resident anonymous memory at the last check.
    pub rss_anon_bytes: u64,
}

impl ProcessWindows {
    /// Marks the windows that were open while one of `degraded`'s heap losses was seen
    /// (between its first and last sighting). Call it every sample: a loss stays in the
    /// process's health for a verdict window after it was last seen, far longer than a
    /// window takes to close, and a mark, once made, stays.
    pub fn mark_losses(&mut self, degraded: &[Degradation]) {
        for window in self.windows.iter_mut().filter(|w| w.losses.is_none()) {
            window.losses = degraded
                .iter()
                .filter(|d| {
                    matches!(
                        d.reason,
                        DegradedReason::HeapEventsLost | DegradedReason::HeapUntracked
                    )
                })
                .find(|d| d.since <= window.ended() && d.last_seen >= window.started)
                .map(|d| d.detail.clone());
        }
    }
}

/// Every process's windows, and the controller's counters.
#[derive(Debug, Default)]
pub struct HeapWindowStats {
    pub processes: HashMap<u32, ProcessWindows>,
    pub opened: BTreeMap<OpenReason, u64>,
    pub skipped: BTreeMap<SkipReason, u64>,
    /// Seconds spent in each phase with probes on, all processes together.
    pub probe_seconds: BTreeMap<WindowPhase, f64>,
    /// Wall time of attaching and of detaching heap probes, all windows together (the
    /// kernel's side: the daemon waits for it).
    pub attach_seconds: f64,
    pub detach_seconds: f64,
    /// Uprobes attached and detached by windows.
    pub probes_attached: u64,
    pub probes_detached: u64,
    /// Bound drops: `windows` (older than the last [`WINDOWS_KEPT`] of a process) and
    /// `callsites` (beyond [`CALLSITES_PER_WINDOW`] in a window).
    pub windows_dropped: u64,
    pub callsites_dropped: u64,
}

impl HeapWindowStats {
    pub fn process(&mut self, pid: u32, exe: &str) -> &mut ProcessWindows {
        self.processes.entry(pid).or_insert_with(|| ProcessWindows {
            exe: exe.to_string(),
            phase: Some(WindowPhase::Idle),
            ..ProcessWindows::default()
        })
    }

    /// Keeps a finished window of `pid`, within the bounds.
    pub fn record(&mut self, pid: u32, exe: &str, mut window: WindowRecord) {
        window
            .callsites
            .sort_by_key(|c| std::cmp::Reverse(c.survived_bytes));
        if window.callsites.len() > CALLSITES_PER_WINDOW {
            self.callsites_dropped += (window.callsites.len() - CALLSITES_PER_WINDOW) as u64;
            window.callsites.truncate(CALLSITES_PER_WINDOW);
        }
        let process = self.process(pid, exe);
        process.windows.push_back(window);
        process.windows_finished += 1;
        let excess = process.windows.len().saturating_sub(WINDOWS_KEPT);
        process.windows.drain(..excess);
        self.windows_dropped += excess as u64;
    }

    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(sizes: &[u64]) -> WindowRecord {
        WindowRecord {
            started: 0.0,
            allocating_seconds: 1.0,
            following_seconds: 1.0,
            callsites: sizes
                .iter()
                .enumerate()
                .map(|(i, &bytes)| CallsiteSurvivors {
                    site: format!("site{i}"),
                    location: None,
                    live_at_close_bytes: bytes,
                    survived_bytes: bytes,
                    survived_blocks: 1,
                })
                .collect(),
            losses: None,
        }
    }

    /// A loss seen while a window was open marks that window, and only that one; a mark
    /// stays once the loss is forgotten.
    #[test]
    fn losses_mark_the_windows_open_while_they_were_seen() {
        let mut process = ProcessWindows::default();
        for started in [0.0, 100.0, 200.0] {
            process.windows.push_back(WindowRecord {
                started,
                ..window(&[1])
            });
        }
        let loss = |reason, since, last_seen| Degradation {
            reason,
            detail: "12 allocations not tracked".into(),
            count: 12,
            since,
            last_seen,
        };
        // Task losses say nothing of the heap; a heap loss between windows marks none.
        process.mark_losses(&[
            loss(DegradedReason::TaskEventsLost, 0.0, 300.0),
            loss(DegradedReason::HeapUntracked, 50.0, 60.0),
        ]);
        assert!(process.windows.iter().all(|w| w.losses.is_none()));
        process.mark_losses(&[loss(DegradedReason::HeapUntracked, 101.5, 101.5)]);
        let marked: Vec<bool> = process.windows.iter().map(|w| w.losses.is_some()).collect();
        assert_eq!(marked, [false, true, false]);
        process.mark_losses(&[]);
        assert!(process.windows[1].losses.is_some());
    }

    #[test]
    fn windows_and_callsites_are_bounded_and_their_drops_counted() {
        let mut stats = HeapWindowStats::default();
        let many: Vec<u64> = (0..CALLSITES_PER_WINDOW as u64 + 3).collect();
        for _ in 0..WINDOWS_KEPT + 2 {
            stats.record(7, "app", window(&many));
        }
        let process = &stats.processes[&7];
        assert_eq!(process.windows.len(), WINDOWS_KEPT);
        assert_eq!(process.windows_finished, WINDOWS_KEPT as u64 + 2);
        assert_eq!(stats.windows_dropped, 2);
        assert_eq!(stats.callsites_dropped, 3 * (WINDOWS_KEPT as u64 + 2));
        // The largest survivors are the ones kept.
        let kept = &process.windows[0].callsites;
        assert_eq!(kept.len(), CALLSITES_PER_WINDOW);
        assert_eq!(kept[0].survived_bytes, CALLSITES_PER_WINDOW as u64 + 2);
    }
}
