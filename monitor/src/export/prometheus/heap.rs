//! The heap ledger's series: live bytes and blocks per callsite and task site, what each
//! process allocated and freed, and what the heap path could not track or receive.

use std::sync::Mutex;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Labels, bound_counters, family, process_labels, scalar, site_labels};
use crate::bpf::counters::KernelCounters;
use crate::state::heap::HeapLedger;
use crate::targets::workload::Workloads;

pub(super) fn encode_heap(
    encoder: &mut DescriptorEncoder,
    heap: &Mutex<HeapLedger>,
    kernel: Option<&KernelCounters>,
    workloads: &Workloads,
) -> std::fmt::Result {
    let heap = heap.lock().unwrap_or_else(|e| e.into_inner());
    let rows = heap.snapshot();
    let labels = |r: &crate::state::heap::HeapGroupSnapshot| -> Labels {
        let mut l = site_labels(workloads, r.pid, &r.exe, &r.site, r.location.as_deref());
        l.push(("task_site", r.task_site.clone()));
        l
    };
    family(
        encoder,
        "leakscope_heap_live_bytes",
        "Bytes allocated since attach and not freed, by allocation callsite (location: its \
         file:line, when the binary has DWARF line info) and by the spawn site of the tokio \
         task that allocated (task_site=\"none\" outside tasks).",
        MetricType::Gauge,
        rows.iter()
            .map(|r| (labels(r), ConstGauge::new(r.live_bytes as i64))),
    )?;
    family(
        encoder,
        "leakscope_heap_live_allocations",
        "Blocks allocated since attach and not freed, by callsite and task site.",
        MetricType::Gauge,
        rows.iter()
            .map(|r| (labels(r), ConstGauge::new(r.live_allocations as i64))),
    )?;
    let per_process =
        |value: &dyn Fn(&crate::state::heap::ProcessHeap) -> u64| -> Vec<(Labels, ConstCounter)> {
            heap.processes()
                .map(|p| {
                    (
                        process_labels(workloads, p.pid, &p.exe),
                        ConstCounter::new(value(p)),
                    )
                })
                .collect()
        };
    family(
        encoder,
        "leakscope_heap_allocated_bytes",
        "Bytes allocated since attach, of the allocations tracked: those counted in \
         leakscope_heap_untracked_allocations_total are not in it, and the process is \
         degraded (heap_untracked) while they happen.",
        MetricType::Counter,
        per_process(&|p| p.scaled_totals().allocated_bytes),
    )?;
    family(
        encoder,
        "leakscope_heap_freed_bytes",
        "Bytes freed since attach, of blocks allocated since attach.",
        MetricType::Counter,
        per_process(&|p| p.scaled_totals().freed_bytes),
    )?;
    family(
        encoder,
        "leakscope_heap_bound_drops",
        "What a per-process heap bound kept out of the per-callsite figures: allocations of \
         groups beyond the group limit, counted under the overflow group (bound=\"groups\"); \
         allocations not tracked once four million blocks were live (bound=\"blocks\").",
        MetricType::Counter,
        heap.processes().flat_map(|p| {
            let labels = process_labels(workloads, p.pid, &p.exe);
            bound_counters(
                &labels,
                [
                    ("groups", p.groups_folded()),
                    ("blocks", p.totals.blocks_dropped),
                ],
            )
        }),
    )?;
    family(
        encoder,
        "leakscope_heap_untracked_frees",
        "Frees of blocks allocated before leakscope attached (not counted anywhere else).",
        MetricType::Counter,
        per_process(&|p| kernel.map(|k| k.untracked_frees(p.pid)).unwrap_or(0)),
    )?;
    family(
        encoder,
        "leakscope_heap_events",
        "Heap events received from the kernel.",
        MetricType::Counter,
        scalar(heap.stream.stats.events),
    )?;
    family(
        encoder,
        "leakscope_heap_events_lost",
        "Heap events numbered by the kernel but never received.",
        MetricType::Counter,
        scalar(heap.stream.stats.lost),
    )?;
    family(
        encoder,
        "leakscope_heap_untracked_allocations",
        "Allocations not tracked, by reason (ring buffer full, outstanding map full, ...).",
        MetricType::Counter,
        kernel
            .map(|k| k.heap_failures().to_vec())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason.to_string())], ConstCounter::new(n))),
    )
}
