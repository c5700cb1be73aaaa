//! `--heap adaptive`'s series: when and why windows ran, what their probes cost, where
//! each process stands, and what its latest window left behind.

use std::sync::Mutex;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Labels, family, process_labels, site_labels};
use crate::state::heap_windows::{HeapWindowStats, OpenReason, SkipReason, WindowPhase};
use crate::targets::workload::Workloads;

pub(super) fn encode(
    encoder: &mut DescriptorEncoder,
    stats: &Mutex<HeapWindowStats>,
    workloads: &Workloads,
) -> std::fmt::Result {
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    let by = |label: &'static str, key: &'static str| -> Labels { vec![(label, key.to_string())] };
    family(
        encoder,
        "leakscope_heap_windows",
        "Heap windows opened (--heap adaptive), by why: anon_growth (a process's anonymous \
         memory rose beyond what its tasks hold) or confirm (the same, while the previous \
         window's survivors wait to be seen again).",
        MetricType::Counter,
        OpenReason::ALL.map(|r| {
            (
                by("reason", r.name()),
                ConstCounter::new(stats.opened.get(&r).copied().unwrap_or(0)),
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_windows_skipped",
        "Heap windows the signals asked for that did not run: budget (the process's probe \
         seconds per 10 minutes were spent) or attach_failed.",
        MetricType::Counter,
        SkipReason::ALL.map(|r| {
            (
                by("reason", r.name()),
                ConstCounter::new(stats.skipped.get(&r).copied().unwrap_or(0)),
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_window_seconds",
        "Seconds heap probes were on in windows, all processes together: allocating (every \
         allocator hook) and following (the free hook alone).",
        MetricType::Counter,
        [WindowPhase::Allocating, WindowPhase::Following].map(|phase| {
            (
                by("phase", phase.name()),
                ConstCounter::new(stats.probe_seconds.get(&phase).copied().unwrap_or(0.0)),
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_window_probe_seconds",
        "Wall time the daemon spent attaching and detaching heap uprobes for windows (the \
         kernel serializes uprobe removal).",
        MetricType::Counter,
        [
            (by("op", "attach"), ConstCounter::new(stats.attach_seconds)),
            (by("op", "detach"), ConstCounter::new(stats.detach_seconds)),
        ],
    )?;
    family(
        encoder,
        "leakscope_heap_window_probes",
        "Heap uprobes attached and detached for windows.",
        MetricType::Counter,
        [
            (by("op", "attach"), ConstCounter::new(stats.probes_attached)),
            (by("op", "detach"), ConstCounter::new(stats.probes_detached)),
        ],
    )?;
    family(
        encoder,
        "leakscope_heap_window_bound_drops",
        "What the windows' bounds left out: windows (older than the 16 kept per process) and \
         callsites (beyond the 64 largest of a window).",
        MetricType::Counter,
        [
            (
                by("bound", "windows"),
                ConstCounter::new(stats.windows_dropped),
            ),
            (
                by("bound", "callsites"),
                ConstCounter::new(stats.callsites_dropped),
            ),
        ],
    )?;
    let mut processes: Vec<(u32, &crate::state::heap_windows::ProcessWindows)> =
        stats.processes.iter().map(|(&pid, p)| (pid, p)).collect();
    processes.sort_by_key(|&(pid, _)| pid);
    family(
        encoder,
        "leakscope_heap_window_state",
        "Where each process's adaptive heap tracking stands (1 for the current state): idle \
         (no heap probe), allocating, following, cooldown (no heap probe).",
        MetricType::Gauge,
        processes.iter().flat_map(|&(pid, p)| {
            WindowPhase::ALL.map(|phase| {
                let mut labels = process_labels(workloads, pid, &p.exe);
                labels.push(("state", phase.name().to_string()));
                (labels, ConstGauge::new(i64::from(p.phase == Some(phase))))
            })
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_window_checks",
        "Checks of a process's cheap signals (anonymous memory, live tasks) for growth.",
        MetricType::Counter,
        processes.iter().map(|&(pid, p)| {
            (
                process_labels(workloads, pid, &p.exe),
                ConstCounter::new(p.checks),
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_window_finished",
        "Heap windows finished for a process.",
        MetricType::Counter,
        processes.iter().map(|&(pid, p)| {
            (
                process_labels(workloads, pid, &p.exe),
                ConstCounter::new(p.windows_finished),
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_process_rss_anon_bytes",
        "Resident anonymous memory of a process at its last check (RssAnon).",
        MetricType::Gauge,
        processes.iter().map(|&(pid, p)| {
            (
                process_labels(workloads, pid, &p.exe),
                ConstGauge::new(p.rss_anon_bytes as i64),
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_window_survived_bytes",
        "Bytes allocated at this callsite in a process's latest heap window that outlived \
         its follow phase (measured, not extrapolated).",
        MetricType::Gauge,
        processes.iter().flat_map(|&(pid, p)| {
            p.windows.back().into_iter().flat_map(move |w| {
                w.callsites.iter().map(move |c| {
                    (
                        site_labels(workloads, pid, &p.exe, &c.site, c.location.as_deref()),
                        ConstGauge::new(c.survived_bytes as i64),
                    )
                })
            })
        }),
    )?;
    Ok(())
}
