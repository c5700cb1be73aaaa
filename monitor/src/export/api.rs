//! The JSON API's bodies, built from the ledgers. The types themselves live in the
//! `leakscope-api` crate, which the tests, `cargo xtask` and leakscope's own clients read
//! them back with.

pub use leakscope_api::types::*;

use std::collections::BTreeMap;

use super::Sources;
use crate::targets::procfs::monotonic_ns;

/// The unit, container and pod labels of process `pid`.
fn labels_of(sources: &Sources, pid: u32) -> BTreeMap<String, String> {
    let workload = sources.workloads.get(pid);
    workload
        .labels()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// `GET /api/v1/tasks`.
pub fn tasks(sources: &Sources) -> TasksResponse {
    let ledger = sources.ledger.lock().unwrap_or_else(|e| e.into_inner());
    let health = sources.health.lock().unwrap_or_else(|e| e.into_inner());
    TasksResponse {
        sites: ledger.snapshot(monotonic_ns()),
        stream: ledger.stream.stats,
        attached_processes: ledger.attached_processes(),
        processes: ledger
            .process_summaries()
            .into_iter()
            .map(|mut p| {
                p.labels = labels_of(sources, p.pid);
                p.degraded = health.degraded(p.pid);
                p.probe_reattaches = health.reattaches(p.pid);
                p
            })
            .collect(),
    }
}

/// `GET /api/v1/heap`.
pub fn heap(sources: &Sources) -> HeapResponse {
    match &sources.heap {
        None => HeapResponse {
            enabled: false,
            groups: Vec::new(),
            stream: StreamStats::default(),
        },
        Some(heap) => {
            let heap = heap.lock().unwrap_or_else(|e| e.into_inner());
            HeapResponse {
                enabled: true,
                groups: heap.snapshot(),
                stream: heap.stream.stats,
            }
        }
    }
}

/// `GET /api/v1/suspects`.
pub fn suspects(sources: &Sources) -> VerdictsResponse {
    verdicts(sources, crate::analysis::Analyzer::suspects)
}

/// `GET /api/v1/sites`.
pub fn sites(sources: &Sources) -> VerdictsResponse {
    verdicts(sources, crate::analysis::Analyzer::sites)
}

fn verdicts(
    sources: &Sources,
    select: fn(&crate::analysis::Analyzer) -> VerdictsResponse,
) -> VerdictsResponse {
    match &sources.analysis {
        Some(analysis) => {
            let mut response = select(&analysis.lock().unwrap_or_else(|e| e.into_inner()));
            for site in &mut response.sites {
                site.labels = labels_of(sources, site.pid);
            }
            response
        }
        None => VerdictsResponse {
            window_seconds: 0.0,
            sample_seconds: 0.0,
            sites: Vec::new(),
            sites_dropped: 0,
        },
    }
}
