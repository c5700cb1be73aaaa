//! The task census's series: tasks alive since before attach per site, and what each
//! process's censuses cost and could not read (see `targets::census`).

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Labels, family, process_labels, site_labels};
use crate::state::tasks::{ProcessTasks, SiteSnapshot, TaskLedger};
use crate::targets::census::CensusFigures;
use crate::targets::workload::Workloads;

pub(super) fn encode_census(
    encoder: &mut DescriptorEncoder,
    ledger: &TaskLedger,
    rows: &[SiteSnapshot],
    workloads: &Workloads,
) -> std::fmt::Result {
    family(
        encoder,
        "leakscope_tasks_alive_before_attach",
        "Of leakscope_tasks_alive, the tasks spawned before leakscope attached, found by the \
         task census in the runtime's own task lists; their ages count from the attach (so \
         leakscope_task_oldest_alive_seconds is a lower bound while this is above 0).",
        MetricType::Gauge,
        rows.iter().map(|r| {
            (
                site_labels(workloads, r.pid, &r.exe, &r.site, r.location.as_deref()),
                ConstGauge::new(r.alive_before_attach as i64),
            )
        }),
    )?;
    let census_only = |pick: fn(&SiteSnapshot) -> Option<u64>| {
        rows.iter().filter_map(move |r| {
            Some((
                site_labels(workloads, r.pid, &r.exe, &r.site, r.location.as_deref()),
                ConstCounter::new(pick(r)?),
            ))
        })
    };
    family(
        encoder,
        "leakscope_tasks_census_seen",
        "--tasks census (no task hook): tasks since attach that a census listed at this site \
         for the first time. Not spawns: a task that came and went between two censuses is \
         not seen.",
        MetricType::Counter,
        census_only(|r| r.census_seen),
    )?;
    family(
        encoder,
        "leakscope_tasks_census_gone",
        "--tasks census (no task hook): tasks since attach listed at this site by one census \
         and no longer by a later one (completed or cancelled in between).",
        MetricType::Counter,
        census_only(|r| r.census_gone),
    )?;
    family(
        encoder,
        "leakscope_task_mode",
        "Who counts this process's tasks (always 1): mode=\"hooks\" (spawn and completion \
         hooks, exact) or mode=\"census\" (the census alone, --tasks census).",
        MetricType::Gauge,
        ledger.processes().map(|p| {
            let mut labels = process_labels(workloads, p.pid, &p.exe);
            let mode = if p.census_only { "census" } else { "hooks" };
            labels.push(("mode", mode.to_string()));
            (labels, ConstGauge::new(1))
        }),
    )?;
    family(
        encoder,
        "leakscope_task_hook_points",
        "Task hook points (uprobes) placed that report this process's tasks, its own and its \
         executable's; 0 with --tasks census.",
        MetricType::Gauge,
        ledger.processes().filter(|p| p.probes_ready).map(|p| {
            (
                process_labels(workloads, p.pid, &p.exe),
                ConstGauge::new(p.task_hook_points as i64),
            )
        }),
    )?;
    let censused: Vec<&ProcessTasks> = ledger.processes().filter(|p| p.census.runs > 0).collect();
    let per_process = |pick: fn(&ProcessTasks) -> u64| {
        censused
            .iter()
            .map(move |p| (process_labels(workloads, p.pid, &p.exe), pick(p)))
            .collect::<Vec<(Labels, u64)>>()
    };
    let counter = |encoder: &mut DescriptorEncoder,
                   name: &str,
                   help: &str,
                   pick: fn(&ProcessTasks) -> u64| {
        family(
            encoder,
            name,
            help,
            MetricType::Counter,
            per_process(pick)
                .into_iter()
                .map(|(l, v)| (l, ConstCounter::new(v))),
        )
    };
    let gauge = |encoder: &mut DescriptorEncoder,
                 name: &str,
                 help: &str,
                 pick: fn(&CensusFigures) -> f64| {
        family(
            encoder,
            name,
            help,
            MetricType::Gauge,
            censused.iter().map(|p| {
                (
                    process_labels(workloads, p.pid, &p.exe),
                    ConstGauge::new(pick(&p.census)),
                )
            }),
        )
    };
    counter(
        encoder,
        "leakscope_census_runs",
        "Task censuses of this process (the first at attach, then every --census-seconds).",
        |p| p.census.runs,
    )?;
    gauge(
        encoder,
        "leakscope_census_duration_seconds",
        "Wall time of the last task census of this process.",
        |c| c.last_seconds,
    )?;
    gauge(
        encoder,
        "leakscope_census_tasks_found",
        "Live tasks (from before attach and since) the last census found in the runtime's \
         lists.",
        |c| c.last_tasks_found as f64,
    )?;
    gauge(
        encoder,
        "leakscope_census_nodes_read",
        "Task nodes the last census read, completed tasks and lists read again included.",
        |c| c.last_nodes_read as f64,
    )?;
    gauge(
        encoder,
        "leakscope_census_runtimes",
        "tokio runtimes (owned-task lists) the census knows in this process.",
        |c| c.runtimes as f64,
    )?;
    counter(
        encoder,
        "leakscope_census_scanned_bytes",
        "Bytes of the process's anonymous memory scanned for a first task header.",
        |p| p.census.scan_bytes,
    )?;
    counter(
        encoder,
        "leakscope_census_links_invalid",
        "List links that failed validation (the list changed as it was read, or a node was \
         not a task of that list): the list was read again.",
        |p| p.census.links_invalid,
    )?;
    counter(
        encoder,
        "leakscope_census_retries",
        "Lists read again after a link failed validation.",
        |p| p.census.retries,
    )?;
    counter(
        encoder,
        "leakscope_census_lists_unread",
        "Lists not read to their end once their retries were used up (or the census's time \
         or task bound was hit): what they held beyond is not counted that time.",
        |p| p.census.lists_unread,
    )?;
    counter(
        encoder,
        "leakscope_census_not_found",
        "Censuses that found no tokio runtime in the process's memory (tasks spawned before \
         attach are then not counted).",
        |p| p.census.not_found,
    )?;
    counter(
        encoder,
        "leakscope_census_vanished",
        "Tasks from before attach that a census found and a later complete census did not, \
         without their completion being seen (taken out of the alive count).",
        |p| p.census_vanished,
    )?;
    Ok(())
}
