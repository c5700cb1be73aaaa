//! Prometheus/OpenMetrics exposition of the task and heap ledgers and of leakscope's own
//! health.
//!
//! A collector, not registered metric objects: every scrape reads the ledger as it is, so a
//! process that exited disappears from the output at once instead of leaving stale series.

use std::fmt::Write as _;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use leakscope_api::types::{SiteVerdict, Verdict};

use super::Sources;
use crate::analysis::Analyzer;
use crate::state::tasks::TaskLedger;
use crate::targets::procfs::monotonic_ns;
use crate::targets::workload::Workloads;

mod census;
mod heap;
mod heap_windows;

#[derive(Debug)]
struct TaskCollector(Sources);

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The labels of a process's series: pid, exe, and the unit, container and pod it runs
/// in where those are known (see `targets::workload`), so an alert names the service.
fn process_labels(workloads: &Workloads, pid: u32, exe: &str) -> Labels {
    let mut labels = vec![("pid", pid.to_string()), ("exe", exe.to_string())];
    labels.extend(workloads.get(pid).labels());
    labels
}

/// The labels of a site's series: `location` only when the binary has line info.
fn site_labels(
    workloads: &Workloads,
    pid: u32,
    exe: &str,
    site: &str,
    location: Option<&str>,
) -> Labels {
    let mut labels = process_labels(workloads, pid, exe);
    labels.push(("site", site.to_string()));
    if let Some(location) = location {
        labels.push(("location", location.to_string()));
    }
    labels
}

/// One gauge per key, labelled `label=key`, its value from `counts` (0 for a key absent):
/// every key is exported, so a state with nothing in it reads 0, not "no data".
fn keyed_gauges<const N: usize>(
    label: &'static str,
    keys: [&'static str; N],
    counts: &std::collections::BTreeMap<&'static str, u64>,
) -> [(Labels, ConstGauge); N] {
    keys.map(|key| {
        let n = counts.get(key).copied().unwrap_or(0);
        (vec![(label, key.to_string())], ConstGauge::new(n as i64))
    })
}

/// A process's counters of what its bounds kept out, one per `bound` label.
fn bound_counters<const N: usize>(
    process: &Labels,
    bounds: [(&'static str, u64); N],
) -> [(Labels, ConstCounter); N] {
    bounds.map(|(bound, n)| {
        let mut labels = process.clone();
        labels.push(("bound", bound.to_string()));
        (labels, ConstCounter::new(n))
    })
}

/// A counter family with one unlabelled sample.
fn scalar(value: u64) -> [(Labels, ConstCounter); 1] {
    [(Labels::new(), ConstCounter::new(value))]
}

impl Collector for TaskCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let ledger = self.0.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let rows = ledger.snapshot(monotonic_ns());
        let labels = |r: &crate::state::tasks::SiteSnapshot| -> Labels {
            site_labels(
                &self.0.workloads,
                r.pid,
                &r.exe,
                &r.site,
                r.location.as_deref(),
            )
        };
        family(
            &mut encoder,
            "leakscope_tasks_spawned",
            "Tasks spawned at this site since leakscope attached.",
            MetricType::Counter,
            // Not counted without task hooks (leakscope_tasks_census_seen instead).
            rows.iter()
                .filter(|r| r.census_seen.is_none())
                .map(|r| (labels(r), ConstCounter::new(r.spawned))),
        )?;
        family(
            &mut encoder,
            "leakscope_tasks_completed",
            "Tasks from this site whose future finished or was cancelled (only tasks spawned \
             since attach).",
            MetricType::Counter,
            rows.iter()
                .filter(|r| r.census_gone.is_none())
                .map(|r| (labels(r), ConstCounter::new(r.completed))),
        )?;
        family(
            &mut encoder,
            "leakscope_tasks_alive",
            "Tasks of this site alive now: spawned since attach and not completed, and those \
             spawned before attach that the task census found \
             (leakscope_tasks_alive_before_attach).",
            MetricType::Gauge,
            rows.iter()
                .map(|r| (labels(r), ConstGauge::new(r.alive as i64))),
        )?;
        family(
            &mut encoder,
            "leakscope_task_oldest_alive_seconds",
            "Age of the oldest alive task from this site (0 when none is alive); a lower bound, \
             counted from the attach, while leakscope_tasks_alive_before_attach is above 0.",
            MetricType::Gauge,
            rows.iter()
                .map(|r| (labels(r), ConstGauge::new(r.oldest_alive_seconds))),
        )?;
        family(
            &mut encoder,
            "leakscope_tasks_completed_untracked",
            "Completions of tasks spawned before leakscope attached (not counted per site).",
            MetricType::Counter,
            ledger.processes().map(|p| {
                (
                    process_labels(&self.0.workloads, p.pid, &p.exe),
                    ConstCounter::new(p.completed_untracked),
                )
            }),
        )?;

        family(
            &mut encoder,
            "leakscope_tasks_seen_before_attach",
            "First polls of tasks spawned before leakscope attached (told apart by their \
             tokio ids where only first-poll hooks see spawns); not counted per site.",
            MetricType::Counter,
            ledger.processes().map(|p| {
                (
                    process_labels(&self.0.workloads, p.pid, &p.exe),
                    ConstCounter::new(p.seen_spawned_before_attach),
                )
            }),
        )?;
        family(
            &mut encoder,
            "leakscope_bound_drops",
            "What a per-process bound kept out of the per-site figures: spawns of sites beyond \
             the site limit, counted under the site \"other (site limit reached)\" \
             (bound=\"sites\"); spawns not tracked once a million tasks were live \
             (bound=\"live_tasks\"); completions missed because a task header was reused \
             while live (bound=\"missed_completions\").",
            MetricType::Counter,
            ledger.processes().flat_map(|p| {
                let labels = process_labels(&self.0.workloads, p.pid, &p.exe);
                bound_counters(
                    &labels,
                    [
                        ("sites", p.sites_folded()),
                        ("live_tasks", p.spawned_untracked),
                        ("missed_completions", p.completions_missed),
                    ],
                )
            }),
        )?;
        family(
            &mut encoder,
            "leakscope_tasks_spawned_before_attach",
            "Tasks tokio had spawned in this process before leakscope attached (from its task \
             id counter; absent when that is unknown or every task was seen from exec): \
             after leakscope restarts, alive counts start again from zero and this says how \
             many tasks came before.",
            MetricType::Gauge,
            ledger.processes().filter_map(|p| {
                let before = p.first_task_id_after_attach?.checked_sub(1)?;
                Some((
                    process_labels(&self.0.workloads, p.pid, &p.exe),
                    ConstGauge::new(before as i64),
                ))
            }),
        )?;
        census::encode_census(&mut encoder, &ledger, &rows, &self.0.workloads)?;
        encode_health(&mut encoder, &self.0, &ledger)?;
        let stream = ledger.stream.stats;
        let attached = ledger.attached_processes() as i64;
        drop(ledger);
        family(
            &mut encoder,
            "leakscope_events",
            "Task events received from the kernel.",
            MetricType::Counter,
            scalar(stream.events),
        )?;
        family(
            &mut encoder,
            "leakscope_events_lost",
            "Task events the kernel emitted or tried to emit but userspace never received \
             (ring buffer full); counts built from them may be off by this much.",
            MetricType::Counter,
            scalar(stream.lost),
        )?;
        family(
            &mut encoder,
            "leakscope_events_ignored",
            "Task events received but not counted: from a process that was not registered \
             within 30 s (or exited first), beyond the bound on events held for processes \
             about to be registered, or of an unknown kind.",
            MetricType::Counter,
            scalar(stream.ignored),
        )?;
        let (ringbuf_full, read_failed) = self
            .0
            .kernel
            .as_ref()
            .map(|k| (k.ringbuf_full(), k.read_failed()))
            .unwrap_or((0, 0));
        family(
            &mut encoder,
            "leakscope_ringbuf_reserve_failures",
            "Ring buffer reservations that failed in the kernel because it was full.",
            MetricType::Counter,
            scalar(ringbuf_full),
        )?;
        family(
            &mut encoder,
            "leakscope_probe_read_failures",
            "Probe hits whose task header could not be read from the target's memory.",
            MetricType::Counter,
            scalar(read_failed),
        )?;
        family(
            &mut encoder,
            "leakscope_build_info",
            "leakscope's version and the kernel it runs on (always 1).",
            MetricType::Gauge,
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("kernel", kernel_release()),
                ],
                ConstGauge::new(1),
            )],
        )?;
        family(
            &mut encoder,
            "leakscope_attached_processes",
            "Processes leakscope is attached to.",
            MetricType::Gauge,
            [(Labels::new(), ConstGauge::new(attached))],
        )?;
        if let Some(heap) = &self.0.heap {
            heap::encode_heap(
                &mut encoder,
                heap,
                self.0.kernel.as_deref(),
                &self.0.workloads,
            )?;
        }
        if let Some(windows) = &self.0.heap_windows {
            heap_windows::encode(&mut encoder, windows, &self.0.workloads)?;
        }
        if let Some(stats) = &self.0.probe_stats {
            let runs = stats.read();
            let program =
                |r: &crate::bpf::counters::ProgramRuns| vec![("program", r.program.clone())];
            family(
                &mut encoder,
                "leakscope_probe_runs",
                "Runs of each of leakscope's BPF programs (one per probe hit), counted by the \
                 kernel while --probe-stats is on.",
                MetricType::Counter,
                runs.iter().map(|r| (program(r), ConstCounter::new(r.runs))),
            )?;
            family(
                &mut encoder,
                "leakscope_probe_run_seconds",
                "Time each of leakscope's BPF programs ran, in the probed threads (the traps \
                 around them not included).",
                MetricType::Counter,
                runs.iter()
                    .map(|r| (program(r), ConstCounter::new(r.seconds))),
            )?;
        }
        if let Some(analysis) = &self.0.analysis {
            encode_verdicts(&mut encoder, analysis, &self.0.workloads)?;
        }
        if let Some(host) = &self.0.host {
            let host = host.lock().unwrap_or_else(|e| e.into_inner()).clone();
            family(
                &mut encoder,
                "leakscope_host_scans",
                "Host-wide scans of /proc for tokio services (--all).",
                MetricType::Counter,
                scalar(host.scans),
            )?;
            family(
                &mut encoder,
                "leakscope_host_scan_seconds",
                "How long the last host-wide scan took (listing /proc, judging new executables, \
                 attaching).",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(host.last_scan_seconds))],
            )?;
            family(
                &mut encoder,
                "leakscope_host_executables_skipped",
                "Executables not watched (each judged once), by reason: not_tokio, or \
                 not_analysable (tokio, but its tasks cannot be found; the log says why).",
                MetricType::Gauge,
                keyed_gauges(
                    "reason",
                    ["not_tokio", "not_analysable"],
                    &host.executables_skipped,
                ),
            )?;
            family(
                &mut encoder,
                "leakscope_host_processes",
                "Tokio services running now, by state: watched, excluded (--include/--exclude), \
                 failed (attaching failed; the log says why), over_limit (--max-processes).",
                MetricType::Gauge,
                keyed_gauges(
                    "state",
                    ["watched", "excluded", "failed", "over_limit"],
                    &host.processes,
                ),
            )?;
            family(
                &mut encoder,
                "leakscope_host_exec_to_attach_seconds",
                "From the last exec of a tokio service, as the kernel reported it, to its \
                 probes being in place.",
                MetricType::Gauge,
                [(
                    Labels::new(),
                    ConstGauge::new(host.last_exec_to_attach_seconds),
                )],
            )?;
            family(
                &mut encoder,
                "leakscope_host_execs_lost",
                "Execs the kernel could not report (its exec ring was full); those processes \
                 are found by the next scan instead.",
                MetricType::Counter,
                scalar(self.0.kernel.as_ref().map_or(0, |k| k.execs_lost())),
            )?;
        }
        Ok(())
    }
}

/// Which processes' figures are incomplete and why, and the re-placements of silent probes.
fn encode_health(
    encoder: &mut DescriptorEncoder,
    sources: &Sources,
    ledger: &TaskLedger,
) -> std::fmt::Result {
    let health = sources.health.lock().unwrap_or_else(|e| e.into_inner());
    let mut degraded = Vec::new();
    let mut reattaches = Vec::new();
    for p in ledger.processes() {
        let labels = process_labels(&sources.workloads, p.pid, &p.exe);
        for d in health.degraded(p.pid) {
            let mut labels = labels.clone();
            labels.push(("reason", d.reason.as_str().to_string()));
            degraded.push((labels, ConstGauge::new(1)));
        }
        reattaches.push((labels, ConstCounter::new(health.reattaches(p.pid))));
    }
    family(
        encoder,
        "leakscope_process_degraded",
        "Present (1) while this process's figures are incomplete, by reason: task or heap \
         events lost within the verdict window, allocations untracked, or probes silent \
         while tokio spawns tasks. Its affected sites are cannot_judge meanwhile; \
         /api/v1/tasks has the evidence.",
        MetricType::Gauge,
        degraded,
    )?;
    family(
        encoder,
        "leakscope_probe_reattaches",
        "Times this process's task hooks were placed again because they delivered no event \
         while tokio's task id counter advanced.",
        MetricType::Counter,
        reattaches,
    )
}

/// The verdicts: a suspect series per leak (present only while it is one), and every
/// judged site's growth.
fn encode_verdicts(
    encoder: &mut DescriptorEncoder,
    analysis: &Mutex<Analyzer>,
    workloads: &Workloads,
) -> std::fmt::Result {
    let analysis = analysis.lock().unwrap_or_else(|e| e.into_inner());
    let verdicts = analysis.verdicts();
    let labels = |v: &SiteVerdict| -> Labels {
        let mut labels = process_labels(workloads, v.pid, &v.exe);
        labels.push(("kind", v.kind.as_str().to_string()));
        labels.push(("site", v.site.clone()));
        labels
    };
    family(
        encoder,
        "leakscope_leak_suspect",
        "Present while this site is a leak suspect; the value is the score in (0, 1]. \
         /api/v1/suspects has the evidence and the remedy.",
        MetricType::Gauge,
        verdicts
            .iter()
            .filter(|v| v.verdict == Verdict::Suspect)
            .map(|v| (labels(v), ConstGauge::new(v.score))),
    )?;
    family(
        encoder,
        "leakscope_leak_growth_per_second",
        "Growth of the judged series over the verdict window (Theil-Sen slope): alive tasks \
         per second for kind=task, live bytes per second for kind=heap.",
        MetricType::Gauge,
        verdicts
            .iter()
            .filter(|v| matches!(v.verdict, Verdict::Suspect | Verdict::Ok))
            .map(|v| (labels(v), ConstGauge::new(v.growth_per_second))),
    )?;
    family(
        encoder,
        "leakscope_verdict_sites_dropped",
        "Sites not judged because the bound on sites the analysis tracks was reached.",
        MetricType::Counter,
        scalar(analysis.sites_dropped()),
    )
}

/// Renders all families in OpenMetrics text format.
pub fn render(sources: &Sources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TaskCollector(sources.clone())));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn empty_ledger_still_exports_self_metrics_with_help() {
        let sources = Sources {
            ledger: Arc::new(Mutex::new(TaskLedger::new())),
            kernel: None,
            heap: None,
            probe_stats: None,
            analysis: None,
            host: None,
            workloads: Workloads::default(),
            health: Default::default(),
            heap_windows: None,
        };
        let text = render(&sources);
        for family in [
            "leakscope_events_total 0",
            "leakscope_events_lost_total 0",
            "leakscope_events_ignored_total 0",
            "leakscope_attached_processes 0",
            "leakscope_build_info{version=\"",
            "# HELP leakscope_tasks_alive ",
            "# TYPE leakscope_tasks_spawned counter",
            "# EOF",
        ] {
            assert!(text.contains(family), "missing {family:?} in:\n{text}");
        }
    }
}
