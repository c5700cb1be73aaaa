//! The task census, run on a thread of its own so a large census never holds up the drain,
//! attaching or serving: each watched process whose tasks may predate its hooks is read at
//! once when it registers, then every `interval` (see `targets::census`), and each outcome
//! is merged into the task ledger (see `state::tasks::census`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::discovery::TargetImage;
use crate::state::tasks::TaskLedger;
use crate::targets::census::memory::ProcessMemory;
use crate::targets::census::{self, CensusBudget, ProcessCensus, RuntimeLayout, TOKIO};
use crate::targets::procfs;

/// Who counts a process's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskMode {
    /// Spawn and completion hooks (two traps per task): exact spawn and completion counts
    /// and ages; the census adds the tasks from before attach.
    #[default]
    Hooks,
    /// No task hook at all: every census lists the tasks alive at each site; tasks that
    /// come and go between two censuses are not seen, ages count from the first census
    /// that listed a task (`state::tasks::census_only`).
    Census,
}

impl TaskMode {
    /// The value of the `mode` label.
    pub fn name(self) -> &'static str {
        match self {
            TaskMode::Hooks => "hooks",
            TaskMode::Census => "census",
        }
    }
}

/// How often the thread looks for processes registered since (their first census is due
/// at once) and for a stop.
const POLL: Duration = Duration::from_millis(100);

/// The census thread; stopped when dropped.
pub struct CensusRunner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CensusRunner {
    /// Starts censuses of the ledger's processes every `interval`; `None` when the interval
    /// is zero (no census).
    pub fn start(ledger: Arc<Mutex<TaskLedger>>, interval: Duration) -> Option<Self> {
        if interval.is_zero() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("census".into())
            .spawn({
                let stop = stop.clone();
                move || run(&ledger, interval, &stop)
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CensusRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The layout of the runtime `image` was built with: one for tokio 1.23 on, whose owned
/// list's shape (sharded from 1.35, single before) each process's own list settles. On an
/// older line no vtable leads to the runtime, which the census logs and counts
/// (`leakscope_census_not_found_total`).
fn layout_for(_image: &TargetImage) -> RuntimeLayout {
    TOKIO
}

/// One process's censuses: by (pid, registration), so a pid that exec'd starts afresh.
struct Watched {
    census: ProcessCensus,
    next: Instant,
    /// Wait before the next census: the interval, doubled after each census that found no
    /// runtime (each of those scans memory again), up to [`MAX_BACKOFF`].
    wait: Duration,
}

/// The longest wait between censuses of a process whose runtime was not found.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

fn run(ledger: &Mutex<TaskLedger>, interval: Duration, stop: &AtomicBool) {
    let lock = || ledger.lock().unwrap_or_else(|e| e.into_inner());
    let mut watched: HashMap<(u32, u64), Watched> = HashMap::new();
    let budget = CensusBudget::default();
    while !stop.load(Ordering::Relaxed) {
        let targets = lock().census_targets();
        watched.retain(|key, _| targets.iter().any(|t| (t.pid, t.registered_ns) == *key));
        for target in targets {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let key = (target.pid, target.registered_ns);
            let first = !watched.contains_key(&key);
            if watched.get(&key).is_some_and(|w| Instant::now() < w.next) {
                continue;
            }
            let entry = watched.entry(key).or_insert_with(|| Watched {
                census: ProcessCensus::new(
                    &target.image,
                    target.load_bias,
                    layout_for(&target.image),
                ),
                next: Instant::now(),
                wait: interval,
            });
            let pid = target.pid;
            let outcome = entry.census.run(
                &ProcessMemory { pid },
                &target.hints,
                || census::anonymous_regions(pid),
                &budget,
            );
            if !outcome.found {
                entry.wait = (entry.wait * 2).min(MAX_BACKOFF.max(interval));
            } else {
                entry.wait = interval;
            }
            entry.next = Instant::now() + entry.wait;
            let figures = entry.census.figures;
            let mut ledger = lock();
            ledger.apply_census(&target, &outcome, figures, procfs::monotonic_ns());
            if first {
                let before = ledger.process(pid).map_or(0, |p| {
                    p.snapshot(0).iter().map(|s| s.alive_before_attach).sum()
                });
                drop(ledger);
                if outcome.found {
                    info!(
                        "pid {pid}: task census: {before} tasks alive that were spawned before \
                         attach ({} runtime lists read in {:.1} ms, {} links failed validation)",
                        figures.runtimes,
                        figures.last_seconds * 1e3,
                        figures.links_invalid
                    );
                } else if let Some(why) = entry.census.unreadable() {
                    warn!(
                        "pid {pid}: no task census of {}: {why}; tasks spawned before attach \
                         are not counted (leakscope_census_not_found_total)",
                        target.image.path.display()
                    );
                } else {
                    warn!(
                        "pid {pid}: the task census found no tokio runtime in its memory \
                         ({} bytes scanned); tasks spawned before attach are not counted \
                         (leakscope_census_not_found_total)",
                        figures.scan_bytes
                    );
                }
            }
        }
        std::thread::sleep(POLL);
    }
}
