//! How the state is shown: Prometheus text (`prometheus`), the JSON API's bodies (`api`),
//! text tables (`inspect`). Every export reads the ledgers as they are at that moment, so a
//! process that exited disappears from all of them at once.

pub mod api;
pub mod inspect;
pub mod prometheus;
pub mod report;
pub mod top;

use std::sync::{Arc, Mutex};

use crate::analysis::Analyzer;
use crate::bpf::counters::{KernelCounters, ProbeStats};
use crate::state::health::Health;
use crate::state::heap::HeapLedger;
use crate::state::heap_windows::HeapWindowStats;
use crate::state::tasks::TaskLedger;
use crate::targets::HostScanStats;
use crate::targets::workload::Workloads;

/// What the exporter reads on each scrape.
#[derive(Clone)]
pub struct Sources {
    pub ledger: Arc<Mutex<TaskLedger>>,
    pub kernel: Option<Arc<KernelCounters>>,
    /// Present when heap tracking is on.
    pub heap: Option<Arc<Mutex<HeapLedger>>>,
    /// Present with `--probe-stats`.
    pub probe_stats: Option<Arc<ProbeStats>>,
    /// The leak verdicts (present in a daemon; absent in unit tests of other exports).
    pub analysis: Option<Arc<Mutex<Analyzer>>>,
    /// Present in host-wide mode.
    pub host: Option<Arc<Mutex<HostScanStats>>>,
    /// The unit, container and pod of each attached process.
    pub workloads: Workloads,
    /// Which processes' figures are incomplete now, and why. Locked after the ledger when
    /// both are.
    pub health: Arc<Mutex<Health>>,
    /// Present with `--heap adaptive`: its windows, and what they found.
    pub heap_windows: Option<Arc<Mutex<HeapWindowStats>>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}
