//! The cheap signals that decide when a window is worth its price: a process's resident
//! anonymous memory and its live task count, sampled by the daemon.

use std::collections::VecDeque;

use super::HeapWindowConfig;
use crate::analysis::stats::mann_kendall;

/// Memory a new live task may account for when judging growth: a task's cell is hundreds
/// of bytes, but what it allocates while alive is not; growth below this per new task is
/// left to the task verdicts.
const BYTES_PER_TASK: u64 = 64 << 10;

/// One-sided Mann–Kendall p-value below which the anonymous memory counts as rising. The
/// lookback holds few samples (6 rising samples give p ≈ 0.004), so the verdicts' 0.01
/// would need a long lookback; the growth floor in bytes guards against noise instead.
const GROWTH_P_VALUE: f64 = 0.05;

/// Growth samples kept per process (a bound on memory whatever the lookback and period).
pub const SIGNAL_SAMPLES_MAX: usize = 256;

/// One cheap-signal sample: (seconds, RssAnon bytes, live tasks).
pub type SignalSample = (f64, u64, u64);

/// True when `signal` shows anonymous memory rising beyond what new tasks hold.
pub fn unexplained_growth(config: &HeapWindowConfig, signal: &VecDeque<SignalSample>) -> bool {
    let (Some(&(t0, anon0, tasks0)), Some(&(t1, anon1, tasks1))) = (signal.front(), signal.back())
    else {
        return false;
    };
    if signal.len() < 4 || t1 - t0 < 0.8 * config.lookback_seconds {
        return false;
    }
    let explained = tasks1.saturating_sub(tasks0).saturating_mul(BYTES_PER_TASK);
    let gained = anon1.saturating_sub(anon0);
    if gained.saturating_sub(explained) < config.min_growth_bytes {
        return false;
    }
    let values: Vec<f64> = signal.iter().map(|&(_, anon, _)| anon as f64).collect();
    mann_kendall(&values).p_rising < GROWTH_P_VALUE
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Samples every 5 s over 30 s: anonymous memory and live tasks at each.
    fn signal(points: &[(u64, u64)]) -> VecDeque<SignalSample> {
        points
            .iter()
            .enumerate()
            .map(|(i, &(anon, tasks))| (i as f64 * 5.0, anon, tasks))
            .collect()
    }

    #[test]
    fn memory_rising_beyond_its_tasks_asks_for_a_window() {
        let config = HeapWindowConfig::default();
        let rising: Vec<(u64, u64)> = (0..7).map(|i| (100 * MIB + i * MIB, 10)).collect();
        assert!(unexplained_growth(&config, &signal(&rising)));
        // Flat memory with noise: no window.
        let flat: Vec<(u64, u64)> = (0..7)
            .map(|i| (100 * MIB + (i % 2) * 512 * 1024, 10))
            .collect();
        assert!(!unexplained_growth(&config, &signal(&flat)));
        // The same rise while 100 tasks more are alive: the tasks account for 6.25 MiB of it.
        let with_tasks: Vec<(u64, u64)> =
            (0..7).map(|i| (100 * MIB + i * MIB, 10 + i * 17)).collect();
        assert!(!unexplained_growth(&config, &signal(&with_tasks)));
        // Too short a history (the process was just attached): not yet.
        assert!(!unexplained_growth(&config, &signal(&rising[..3])));
    }
}
