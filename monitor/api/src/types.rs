//! The JSON bodies of the daemon's API, one type per endpoint.

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
    pub alive: u64,
    pub oldest_alive_seconds: f64,
}

/// One watched process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub exe: String,
    /// All its probes are in place: events from it are being counted.
    pub attached: bool,
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
