//! The JSON bodies of the daemon's API, one type per endpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /api/v1/tasks`: every spawn site of every watched process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TasksResponse {
    pub sites: Vec<SiteSnapshot>,
    pub stream: StreamStats,
    /// Processes whose probes are all in place.
    pub attached_processes: usize,
    pub processes: Vec<ProcessSummary>,
}

/// `GET /api/v1/heap`: live heap by (allocation callsite, task site).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeapResponse {
    /// Heap tracking is on (`--heap exact|sampled`); when off, the rest is empty.
    pub enabled: bool,
    /// Largest first.
    pub groups: Vec<HeapGroupSnapshot>,
    pub stream: StreamStats,
}

/// One row of the task table: a spawn site of one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSnapshot {
    pub pid: u32,
    pub exe: String,
    /// The spawned future's type, demangled.
    pub site: String,
    /// `file:line` of the async block, when the binary has DWARF line info.
    pub location: Option<String>,
    pub spawned: u64,
    pub completed: u64,
    /// Alive now, including `alive_before_attach`.
    pub alive: u64,
    /// Of `alive`, the tasks spawned before leakscope attached, found by the task census
    /// (read from the runtime's own task lists).
    #[serde(default)]
    pub alive_before_attach: u64,
    pub oldest_alive_seconds: f64,
    /// The oldest alive task was spawned before leakscope attached, so its age is not known:
    /// `oldest_alive_seconds` counts from the attach and is a lower bound ("at least").
    #[serde(default)]
    pub oldest_alive_at_least: bool,
    /// Completions of this site's tasks are observed (a completion hook is reachable from
    /// every vtable of the site). When false, `alive` only grows and says nothing.
    pub completion_hooked: bool,
    /// `--tasks census` (no task hook): `spawned` and `completed` stay 0; these count the
    /// tasks since attach that a census listed for the first time, and those a later
    /// census no longer listed. Not spawns and completions: a task that comes and goes
    /// between two censuses is in neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census_seen: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census_gone: Option<u64>,
}

/// One watched process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub exe: String,
    /// All its probes are in place: events from it are being counted.
    pub attached: bool,
    /// Its systemd unit, container and pod, where known (`unit`, `container_id`, `pod_uid`,
    /// `namespace`, `pod`, `container`): the same labels as its Prometheus series.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Why its figures cannot be trusted right now (empty when they can): while any of
    /// these holds, its sites are `cannot_judge`, never suspects.
    #[serde(default)]
    pub degraded: Vec<Degradation>,
    /// Times its task hooks were placed again because they delivered nothing while tokio
    /// spawned tasks in it (see [`DegradedReason::SilentProbes`]).
    #[serde(default)]
    pub probe_reattaches: u64,
}

/// Why a process's figures are incomplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DegradedReason {
    /// Task events were lost (the task ring was full) within the verdict window. The
    /// kernel counts losses per CPU, not per process, so every process whose task events
    /// share that ring is marked.
    TaskEventsLost,
    /// Heap events were lost (the heap ring was full) within the verdict window.
    HeapEventsLost,
    /// Allocations went untracked within the verdict window: the kernel's map of
    /// outstanding blocks (`--heap-max-blocks`) or of pending allocations was full.
    HeapUntracked,
    /// tokio spawned tasks in the process (its task id counter advanced) but its probes
    /// delivered no event, even after they were placed again.
    SilentProbes,
}

impl DegradedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskEventsLost => "task_events_lost",
            Self::HeapEventsLost => "heap_events_lost",
            Self::HeapUntracked => "heap_untracked",
            Self::SilentProbes => "silent_probes",
        }
    }

    /// Whether the figures of sites of `kind` rest on what this reason made incomplete.
    pub fn affects(self, kind: SiteKind) -> bool {
        match self {
            Self::TaskEventsLost => kind == SiteKind::Task,
            Self::HeapEventsLost | Self::HeapUntracked => kind == SiteKind::Heap,
            Self::SilentProbes => true,
        }
    }
}

/// One reason a process's figures are incomplete, with the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Degradation {
    pub reason: DegradedReason,
    /// The evidence and what to do, in plain words.
    pub detail: String,
    /// How many: events lost, allocations untracked, or silent checks, while it lasted.
    pub count: u64,
    /// Seconds since the daemon started when this was first and last seen.
    pub since: f64,
    pub last_seen: f64,
}

/// One row of the heap table: live memory of one (callsite, task site) of one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapGroupSnapshot {
    pub pid: u32,
    pub exe: String,
    /// The allocation callsite: the first frame outside allocator and standard-library
    /// code, or `task cell: <spawn site>` for a task's own cell.
    pub site: String,
    /// `"path:line"` of the allocating call in `site`, when the binary has DWARF line info.
    pub location: Option<String>,
    /// Spawn site of the task that was polled when the block was allocated (`none`
    /// outside tasks).
    pub task_site: String,
    pub live_bytes: u64,
    pub live_allocations: u64,
}

/// Event-stream health: how many events arrived and how many were lost on the way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    pub events: u64,
    /// Events the kernel numbered but userspace never received (per-CPU sequence gaps).
    pub lost: u64,
    /// Events received but not counted: undecodable, of an unknown kind, or for a process
    /// that was not registered in time.
    pub ignored: u64,
}

/// What a verdict is about: a spawn site's tasks, or a callsite's heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    Task,
    Heap,
}

impl SiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Heap => "heap",
        }
    }
}

/// The judgement on one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A leak suspect: see `pattern`, `reason` and `remedy`.
    Suspect,
    /// Watched long enough, and nothing grows without bound.
    Ok,
    /// Not enough samples yet to judge.
    WarmingUp,
    /// leakscope cannot judge this site (e.g. its tasks' completion hook could not be
    /// placed, so completions would go unseen): `reason` says why.
    CannotJudge,
}

/// The leak pattern a suspect shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakPattern {
    /// Tasks spawned here keep piling up and none of those spawned in the window finished:
    /// a loop that never ends, a producer outliving its consumer, or a task awaiting
    /// something nobody completes.
    TasksNeverComplete,
    /// Tasks spawned here do finish, but a growing share never does: some calls await
    /// something that never resolves.
    TasksAccumulate,
    /// Live heap allocated here only grows: state that is added to and never evicted.
    HeapGrows,
}

/// One sample of a site's history: seconds since the daemon started, and the value judged
/// (alive tasks, or live bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistorySample {
    pub t: f64,
    pub value: f64,
}

/// A site with its verdict and the evidence for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteVerdict {
    pub pid: u32,
    pub exe: String,
    /// The process's unit, container and pod, where known (see [`ProcessSummary::labels`]).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub kind: SiteKind,
    /// The spawn site (task) or allocation callsite (heap).
    pub site: String,
    pub location: Option<String>,
    pub verdict: Verdict,
    /// In (0, 1] for a suspect: how sure and how strong; 0 otherwise.
    pub score: f64,
    pub pattern: Option<LeakPattern>,
    /// The evidence in plain words, with numbers.
    pub reason: String,
    /// What to change in the code, for a suspect.
    pub remedy: Option<String>,
    /// Growth over the window, per second (tasks or bytes; Theil–Sen slope).
    pub growth_per_second: f64,
    /// Alive tasks (task) or live bytes (heap) now.
    pub current: f64,
    /// Task sites: the age of the oldest alive task.
    pub oldest_alive_seconds: Option<f64>,
    /// Task sites: alive tasks spawned before leakscope attached (found by the task
    /// census), not in `current` (growth is judged on the tasks seen since attach).
    #[serde(default)]
    pub alive_before_attach: u64,
    /// Seconds since the daemon started when this site first became a suspect (kept while
    /// it stays one).
    pub suspect_since: Option<f64>,
    /// The samples the verdict was made from, oldest first.
    pub samples: Vec<HistorySample>,
}

/// `GET /api/v1/suspects` (suspects only, highest score first) and `GET /api/v1/sites`
/// (every site judged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictsResponse {
    /// The window verdicts look at, and the sampling period, in seconds.
    pub window_seconds: f64,
    pub sample_seconds: f64,
    pub sites: Vec<SiteVerdict>,
    /// Sites not judged because the bound on tracked sites was reached.
    pub sites_dropped: u64,
}
