//! Keeps `state::health` current: every sampling tick, the loss counters of both streams
//! (userspace's sequence gaps and the kernel's failure counters) are read and whatever grew
//! marks the processes whose events share that stream.

use crate::export::Sources;
use crate::state::health::LossTotals;

/// Losses since start as the kernel and the ledgers count them.
///
/// A failed ring reservation in the kernel also leaves a sequence gap once a later event
/// of that CPU arrives, so the two count the same loss: the larger is taken, not the sum.
pub fn loss_totals(sources: &Sources) -> (LossTotals, Vec<u32>, Vec<u32>) {
    let (task_lost, task_pids) = {
        let ledger = sources.ledger.lock().unwrap_or_else(|e| e.into_inner());
        (
            ledger.stream.stats.lost,
            ledger.processes().map(|p| p.pid).collect::<Vec<_>>(),
        )
    };
    let (heap_lost, blocks_dropped, heap_pids) = match &sources.heap {
        Some(heap) => {
            let heap = heap.lock().unwrap_or_else(|e| e.into_inner());
            (
                heap.stream.stats.lost,
                heap.processes().map(|p| p.totals.blocks_dropped).sum(),
                heap.processes().map(|p| p.pid).collect(),
            )
        }
        None => (0, 0, Vec::new()),
    };
    let kernel = sources.kernel.as_deref();
    let ringbuf_full = kernel.map_or(0, |k| k.ringbuf_full());
    let (heap_ringbuf_full, heap_untracked) = kernel.map_or((0, 0), |k| {
        let failures = k.heap_failures();
        let by = |reason: &str| {
            failures
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| *n)
        };
        (
            by("ringbuf_full"),
            by("outstanding_full") + by("pending_full") + by("groups_full"),
        )
    });
    let totals = LossTotals {
        task_events: task_lost.max(ringbuf_full),
        heap_events: heap_lost.max(heap_ringbuf_full),
        heap_untracked: heap_untracked + blocks_dropped,
    };
    (totals, task_pids, heap_pids)
}

/// Marks the processes that lost data since the last call, at `t` seconds, and forgets
/// losses older than the verdict `window` and processes no longer watched.
pub fn observe_losses(sources: &Sources, t: f64, window: f64) {
    let (totals, task_pids, heap_pids) = loss_totals(sources);
    let mut health = sources.health.lock().unwrap_or_else(|e| e.into_inner());
    let before = health.all();
    health.observe_losses(t, window, totals, &task_pids, &heap_pids);
    health.retain(|pid| task_pids.contains(&pid));
    for (pid, reasons) in health.all() {
        for d in reasons {
            let new = before
                .get(&pid)
                .is_none_or(|old| !old.iter().any(|o| o.reason == d.reason));
            if new {
                log::warn!(
                    "pid {pid}: degraded ({}): {}; its sites are not judged meanwhile",
                    d.reason.as_str(),
                    d.detail
                );
            }
        }
    }
}
