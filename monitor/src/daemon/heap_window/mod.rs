//! `--heap adaptive`: heap probes only when cheap signals say they are worth their price.
//!
//! Every sample, each watched process's resident anonymous memory (`RssAnon`, a counter
//! the kernel keeps: no mapping walk) and its live task count are read. When the memory
//! rises (Mann–Kendall, the verdict engine's trend test) by more than its new tasks could
//! hold, a window opens:
//! 1. *allocating*: every allocator hook goes on (exact tracking, as `--heap exact`) for
//!    `--heap-window-seconds`;
//! 2. *following*: the allocation hooks come off and only the free hook stays (one trap
//!    per free, instead of three traps per allocate+free pair), so the window's blocks are
//!    seen being freed, for `--heap-follow-seconds`, until none is left, or until none has
//!    been freed for `--heap-follow-quiet-seconds`: what is left has then outlived the
//!    window's typical lifetimes, and following it longer would only cost the service;
//! 3. every heap probe comes off; what outlived the follow phase is kept per callsite
//!    (`state::heap_windows`) and judged across windows (`analysis::windows`).
//!
//! Windows are bounded: a cooldown after each, a budget of probe seconds per process in
//! any 10 minutes, and a bound on windows open at once across processes (each window attaches and
//! detaches every heap uprobe once; the kernel serializes uprobe removal).

mod config;
mod signal;

pub use config::{BUDGET_PERIOD, HeapWindowConfig};
use signal::{SIGNAL_SAMPLES_MAX, SignalSample};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leakscope_api::types::HeapGroupSnapshot;
use log::{info, warn};

use super::heap::HeapTracker;
use crate::bpf::attach::AttachedLink;
use crate::bpf::loader::Probes;
use crate::bpf::plan::{HeapAttachPoint, HeapProgram};
use crate::discovery::TargetImage;
use crate::state::heap_windows::{
    CallsiteSurvivors, HeapWindowStats, OpenReason, SkipReason, WindowPhase, WindowRecord,
};
use crate::targets::procfs::{self, ProcessInfo};

/// Where one process's window stands, with what that phase holds.
enum Phase {
    Idle,
    Allocating {
        since: Instant,
        started: f64,
        alloc_links: Vec<AttachedLink>,
        free_links: Vec<AttachedLink>,
    },
    Following {
        since: Instant,
        started: f64,
        allocating_seconds: f64,
        free_links: Vec<AttachedLink>,
        live_at_close: Vec<HeapGroupSnapshot>,
        /// The window's live bytes at the last look, and since when they have not moved
        /// (no block of the window freed).
        last_live: u64,
        quiet_since: Instant,
    },
    Cooldown {
        until: Instant,
    },
}

impl Phase {
    fn name(&self) -> WindowPhase {
        match self {
            Phase::Idle => WindowPhase::Idle,
            Phase::Allocating { .. } => WindowPhase::Allocating,
            Phase::Following { .. } => WindowPhase::Following,
            Phase::Cooldown { .. } => WindowPhase::Cooldown,
        }
    }

    fn is_open(&self) -> bool {
        matches!(self, Phase::Allocating { .. } | Phase::Following { .. })
    }
}

/// A process `--heap adaptive` watches.
struct Watched {
    info: ProcessInfo,
    image: Arc<TargetImage>,
    load_bias: u64,
    phase: Phase,
    signal: VecDeque<SignalSample>,
    /// Probe-on periods of the last [`BUDGET_PERIOD`]: (end, seconds).
    probe_time: VecDeque<(Instant, f64)>,
    /// The latest window left survivors at a leak's rate (the next window confirms).
    pending_confirmation: bool,
    /// Where its heap probes go, found at its first window: finding the allocator reads
    /// the executable's symbols (about a second for the axum fixture, measured).
    points: Option<Vec<HeapAttachPoint>>,
}

/// The adaptive controller: owned by the process registry, which hands it the probes and
/// the heap tracker on each tick.
pub struct HeapWindows {
    config: HeapWindowConfig,
    /// Survivors per second of allocation hooks at which a callsite leaks (the verdicts'
    /// heap threshold): such a window is confirmed by the next.
    leak_rate: f64,
    processes: HashMap<u32, Watched>,
    pub stats: Arc<Mutex<HeapWindowStats>>,
}

impl HeapWindows {
    pub fn new(config: HeapWindowConfig, leak_rate: f64) -> Self {
        Self {
            config: config.bounded(),
            leak_rate,
            processes: HashMap::new(),
            stats: Arc::default(),
        }
    }

    pub fn config(&self) -> &HeapWindowConfig {
        &self.config
    }

    /// Starts watching an attached process's signals; no probe is placed.
    pub fn watch(&mut self, info: &ProcessInfo, image: Arc<TargetImage>, load_bias: u64) {
        lock(&self.stats).process(info.pid, &info.exe_name());
        self.processes.insert(
            info.pid,
            Watched {
                info: info.clone(),
                image,
                load_bias,
                phase: Phase::Idle,
                signal: VecDeque::new(),
                probe_time: VecDeque::new(),
                pending_confirmation: false,
                points: None,
            },
        );
    }

    /// Stops watching `pid` (it exited or was detached): its window's probes come off.
    /// The heap tracker's own state is the caller's to drop.
    pub fn forget(&mut self, probes: &mut Probes, pid: u32) {
        if let Some(watched) = self.processes.remove(&pid) {
            match watched.phase {
                Phase::Allocating {
                    alloc_links,
                    free_links,
                    ..
                } => {
                    probes.detach(alloc_links);
                    probes.detach(free_links);
                }
                Phase::Following { free_links, .. } => probes.detach(free_links),
                Phase::Idle | Phase::Cooldown { .. } => {}
            }
        }
        lock(&self.stats).forget(pid);
    }

    /// Every window's probes, for one detach of everything at shutdown.
    pub fn take_all_links(&mut self) -> Vec<AttachedLink> {
        let mut links = Vec::new();
        for watched in self.processes.values_mut() {
            match std::mem::replace(&mut watched.phase, Phase::Idle) {
                Phase::Allocating {
                    alloc_links,
                    free_links,
                    ..
                } => links.extend(alloc_links.into_iter().chain(free_links)),
                Phase::Following { free_links, .. } => links.extend(free_links),
                Phase::Idle | Phase::Cooldown { .. } => {}
            }
        }
        links
    }

    /// One step for every process, at `t` seconds since the session started: reads the
    /// signals, moves windows on, opens the ones the signals ask for. `alive`: live tasks
    /// per pid.
    pub fn tick(
        &mut self,
        probes: &mut Probes,
        tracker: &mut HeapTracker,
        t: f64,
        alive: &HashMap<u32, u64>,
    ) {
        let now = Instant::now();
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for &pid in &pids {
            self.sample_signal(pid, t, alive.get(&pid).copied().unwrap_or(0));
            self.advance(probes, tracker, pid, now);
        }
        let open = self
            .processes
            .values()
            .filter(|w| w.phase.is_open())
            .count();
        let mut room = self.config.max_open.saturating_sub(open);
        for pid in pids {
            if room == 0 {
                break;
            }
            if self.maybe_open(probes, tracker, pid, now, t) {
                room -= 1;
            }
        }
        self.publish_phases();
    }

    /// Moves open windows on whose phase is over, between samples (the daemon's rescan
    /// tick): a phase then lasts its setting to within a rescan, not a sampling period.
    pub fn advance_all(&mut self, probes: &mut Probes, tracker: &mut HeapTracker) {
        let now = Instant::now();
        let open: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, w)| w.phase.is_open())
            .map(|(&pid, _)| pid)
            .collect();
        if open.is_empty() {
            return;
        }
        for pid in open {
            self.advance(probes, tracker, pid, now);
        }
        self.publish_phases();
    }

    fn publish_phases(&self) {
        let mut stats = lock(&self.stats);
        for (pid, watched) in &self.processes {
            if let Some(p) = stats.processes.get_mut(pid) {
                p.phase = Some(watched.phase.name());
            }
        }
    }

    fn sample_signal(&mut self, pid: u32, t: f64, alive: u64) {
        let Ok(anon) = procfs::rss_anon_bytes(pid) else {
            return; // exited: the registry's reap forgets it
        };
        let lookback = self.config.lookback_seconds;
        let Some(watched) = self.processes.get_mut(&pid) else {
            return;
        };
        watched.signal.push_back((t, anon, alive));
        while watched.signal.len() > SIGNAL_SAMPLES_MAX
            || watched
                .signal
                .front()
                .is_some_and(|&(t0, _, _)| t - t0 > lookback)
        {
            watched.signal.pop_front();
        }
        let mut stats = lock(&self.stats);
        let exe = self.processes[&pid].info.exe_name();
        let process = stats.process(pid, &exe);
        process.checks += 1;
        process.rss_anon_bytes = anon;
    }

    /// Opens a window for `pid` when its signals ask for one and the bounds allow it;
    /// true when one was opened.
    fn maybe_open(
        &mut self,
        probes: &mut Probes,
        tracker: &mut HeapTracker,
        pid: u32,
        now: Instant,
        t: f64,
    ) -> bool {
        let config = self.config;
        let Some(watched) = self.processes.get_mut(&pid) else {
            return false;
        };
        match watched.phase {
            Phase::Idle => {}
            Phase::Cooldown { until } if until <= now => watched.phase = Phase::Idle,
            _ => return false,
        }
        if !signal::unexplained_growth(&config, &watched.signal) {
            return false;
        }
        while watched
            .probe_time
            .front()
            .is_some_and(|&(end, _)| now.duration_since(end) > BUDGET_PERIOD)
        {
            watched.probe_time.pop_front();
        }
        let used: f64 = watched.probe_time.iter().map(|&(_, s)| s).sum();
        let exe = watched.info.exe_name();
        if used + config.window_seconds + config.follow_seconds > config.budget_seconds {
            *lock(&self.stats)
                .skipped
                .entry(SkipReason::Budget)
                .or_default() += 1;
            return false;
        }
        let reason = if watched.pending_confirmation {
            OpenReason::Confirm
        } else {
            OpenReason::AnonGrowth
        };
        let attach_started = Instant::now();
        let attached = match &watched.points {
            Some(points) => Ok(points),
            None => HeapTracker::points(&watched.info).map(|p| &*watched.points.insert(p)),
        }
        .and_then(|points| {
            tracker.attach_at(
                probes,
                &watched.info,
                &watched.image,
                watched.load_bias,
                points,
            )
        });
        let attach_seconds = attach_started.elapsed().as_secs_f64();
        let links = match attached {
            Ok(links) => links,
            Err(err) => {
                warn!("pid {pid}: heap window not opened: {err:#}");
                *lock(&self.stats)
                    .skipped
                    .entry(SkipReason::AttachFailed)
                    .or_default() += 1;
                // Not tried again before a cooldown.
                watched.phase = Phase::Cooldown {
                    until: now + Duration::from_secs_f64(config.cooldown_seconds),
                };
                return false;
            }
        };
        let probes_attached = links.len() as u64;
        let (free_links, alloc_links): (Vec<_>, Vec<_>) = links
            .into_iter()
            .partition(|link| link.program() == HeapProgram::FreeEntry.name());
        info!(
            "pid {pid} ({exe}): heap window opened ({}): anonymous memory grew beyond what its \
             tasks hold; {probes_attached} heap probes attached in {:.0} ms",
            reason.name(),
            attach_seconds * 1000.0
        );
        watched.phase = Phase::Allocating {
            since: Instant::now(),
            started: t,
            alloc_links,
            free_links,
        };
        let mut stats = lock(&self.stats);
        *stats.opened.entry(reason).or_default() += 1;
        stats.attach_seconds += attach_seconds;
        stats.probes_attached += probes_attached;
        true
    }

    /// Moves `pid`'s open window to its next phase when its time is up.
    fn advance(&mut self, probes: &mut Probes, tracker: &mut HeapTracker, pid: u32, now: Instant) {
        let config = self.config;
        let Some(watched) = self.processes.get_mut(&pid) else {
            return;
        };
        let phase = std::mem::replace(&mut watched.phase, Phase::Idle);
        watched.phase = match phase {
            Phase::Allocating {
                since,
                started,
                alloc_links,
                free_links,
            } if now.duration_since(since).as_secs_f64() >= config.window_seconds => {
                let live_at_close = live_groups(tracker, pid);
                let allocating_seconds = now.duration_since(since).as_secs_f64();
                let detached = alloc_links.len() as u64;
                let detach_started = Instant::now();
                probes.detach(alloc_links);
                let detach_seconds = detach_started.elapsed().as_secs_f64();
                let mut stats = lock(&self.stats);
                stats.detach_seconds += detach_seconds;
                stats.probes_detached += detached;
                *stats
                    .probe_seconds
                    .entry(WindowPhase::Allocating)
                    .or_default() += allocating_seconds;
                let following_from = Instant::now();
                Phase::Following {
                    since: following_from,
                    started,
                    allocating_seconds,
                    free_links,
                    last_live: live_bytes(&live_at_close),
                    live_at_close,
                    quiet_since: following_from,
                }
            }
            Phase::Following {
                since,
                started,
                allocating_seconds,
                free_links,
                live_at_close,
                last_live,
                quiet_since,
            } => {
                let survivors = live_groups(tracker, pid);
                let live = live_bytes(&survivors);
                let quiet_since = if live == last_live { quiet_since } else { now };
                let quiet = config.follow_quiet_seconds > 0.0
                    && now.duration_since(quiet_since).as_secs_f64() >= config.follow_quiet_seconds;
                let over = now.duration_since(since).as_secs_f64() >= config.follow_seconds
                    || survivors.is_empty()
                    || quiet;
                if !over {
                    watched.phase = Phase::Following {
                        since,
                        started,
                        allocating_seconds,
                        free_links,
                        live_at_close,
                        last_live: live,
                        quiet_since,
                    };
                    return;
                }
                let following_seconds = now.duration_since(since).as_secs_f64();
                let detached = free_links.len() as u64;
                let detach_started = Instant::now();
                probes.detach(free_links);
                tracker.detach(probes, pid);
                let detach_seconds = detach_started.elapsed().as_secs_f64();
                let record = WindowRecord {
                    started,
                    allocating_seconds,
                    following_seconds,
                    callsites: by_callsite(&live_at_close, &survivors),
                    // Marked by the session from the process's health (see
                    // `ProcessWindows::mark_losses`).
                    losses: None,
                };
                let exe = watched.info.exe_name();
                let leaking = record.callsites.iter().any(|c| {
                    c.survived_bytes as f64 / allocating_seconds.max(1e-3) >= self.leak_rate
                });
                watched.pending_confirmation = leaking;
                // Counted at its planned length, so the budget is exact in windows (with
                // the defaults, two per 10 minutes: what a suspect needs). The real time, a
                // rescan tick or a detach longer, is exported as probe seconds.
                watched
                    .probe_time
                    .push_back((now, config.window_seconds + config.follow_seconds));
                info!(
                    "pid {pid} ({exe}): heap window closed after {allocating_seconds:.0} s + \
                     {following_seconds:.0} s; {} of the window's bytes outlived it; probes \
                     detached in {:.0} ms",
                    crate::analysis::verdict::bytes(
                        record
                            .callsites
                            .iter()
                            .map(|c| c.survived_bytes)
                            .sum::<u64>() as f64
                    ),
                    detach_seconds * 1000.0
                );
                let mut stats = lock(&self.stats);
                stats.detach_seconds += detach_seconds;
                stats.probes_detached += detached;
                *stats
                    .probe_seconds
                    .entry(WindowPhase::Following)
                    .or_default() += following_seconds;
                stats.record(pid, &exe, record);
                Phase::Cooldown {
                    until: now + Duration::from_secs_f64(config.cooldown_seconds),
                }
            }
            other => other,
        };
    }
}

fn lock(stats: &Mutex<HeapWindowStats>) -> std::sync::MutexGuard<'_, HeapWindowStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes live in `groups`, together.
fn live_bytes(groups: &[HeapGroupSnapshot]) -> u64 {
    groups.iter().map(|g| g.live_bytes).sum()
}

/// The heap ledger's live groups of `pid` (what the current window allocated and has not
/// seen freed).
fn live_groups(tracker: &HeapTracker, pid: u32) -> Vec<HeapGroupSnapshot> {
    tracker
        .ledger
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .processes()
        .find(|p| p.pid == pid)
        .map(|p| p.snapshot())
        .unwrap_or_default()
}

/// Per callsite (over task sites): live when the allocation hooks came off, and survived.
fn by_callsite(
    live_at_close: &[HeapGroupSnapshot],
    survivors: &[HeapGroupSnapshot],
) -> Vec<CallsiteSurvivors> {
    let mut callsites: HashMap<(String, Option<String>), CallsiteSurvivors> = HashMap::new();
    for (g, survived) in live_at_close
        .iter()
        .map(|g| (g, false))
        .chain(survivors.iter().map(|g| (g, true)))
    {
        let c = callsites
            .entry((g.site.clone(), g.location.clone()))
            .or_insert_with(|| CallsiteSurvivors {
                site: g.site.clone(),
                location: g.location.clone(),
                live_at_close_bytes: 0,
                survived_bytes: 0,
                survived_blocks: 0,
            });
        if survived {
            c.survived_bytes += g.live_bytes;
            c.survived_blocks += g.live_allocations;
        } else {
            c.live_at_close_bytes += g.live_bytes;
        }
    }
    callsites.into_values().collect()
}
