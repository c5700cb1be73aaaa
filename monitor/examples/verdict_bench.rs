//! The verdict engine at scale, for `cargo xtask bench`: 10,000 sites (half task spawn
//! sites, half heap callsites, a few of each leaking) sampled over a full window, then the
//! time of one more tick and the memory the histories hold.
//!
//! Prints one line of `key=value` pairs for xtask to read.

use std::time::Instant;

use leakscope::analysis::{AnalysisConfig, Analyzer};
use leakscope::export::api::{HeapGroupSnapshot, SiteSnapshot, Verdict};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let sites: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    // The daemon's defaults: a sample every 5 s over a 120 s window.
    let config = AnalysisConfig::new(5.0, 120.0);
    let samples_per_window = (config.thresholds.window / config.period) as usize + 1;
    let mut analyzer = Analyzer::new(AnalysisConfig {
        max_sites: sites,
        ..config
    });
    let rss_before = rss_kib();
    let mut tasks: Vec<SiteSnapshot> = (0..sites / 2)
        .map(|i| SiteSnapshot {
            pid: 1 + (i % 50) as u32,
            exe: "app".into(),
            site: format!("app::module{}::handler{i}::{{{{closure}}}}", i % 97),
            location: None,
            spawned: 0,
            completed: 0,
            alive: 0,
            oldest_alive_seconds: 0.0,
            alive_before_attach: 0,
            oldest_alive_at_least: false,
            completion_hooked: true,
            census_seen: None,
            census_gone: None,
        })
        .collect();
    let mut heap: Vec<HeapGroupSnapshot> = (0..sites - sites / 2)
        .map(|i| HeapGroupSnapshot {
            pid: 1 + (i % 50) as u32,
            exe: "app".into(),
            site: format!("app::state{}::insert{i}", i % 89),
            location: None,
            task_site: "none".into(),
            live_bytes: 4096,
            live_allocations: 1,
        })
        .collect();
    let mut tick_seconds = Vec::new();
    for step in 0..=samples_per_window {
        let t = step as f64 * config.period;
        for (i, row) in tasks.iter_mut().enumerate() {
            // One site in 100 leaks a task per second; the rest churn around a level.
            let leaking = i % 100 == 0;
            row.spawned += 50;
            row.completed += if leaking { 45 } else { 50 };
            row.alive = if leaking {
                row.spawned - row.completed
            } else {
                10 + (step % 3) as u64
            };
        }
        for (i, row) in heap.iter_mut().enumerate() {
            if i % 100 == 0 {
                row.live_bytes += 256 * 1024;
            } else {
                row.live_bytes = 4096 + (step % 4) as u64 * 512;
            }
        }
        let started = Instant::now();
        analyzer.observe(t, &tasks, &heap);
        tick_seconds.push(started.elapsed().as_secs_f64());
    }
    let suspects = analyzer
        .verdicts()
        .iter()
        .filter(|v| v.verdict == Verdict::Suspect)
        .count();
    tick_seconds.sort_by(f64::total_cmp);
    println!(
        "sites={sites} samples_held={} tick_ms_median={:.2} tick_ms_max={:.2} rss_kib_growth={} suspects={suspects}",
        analyzer.samples_held(),
        tick_seconds[tick_seconds.len() / 2] * 1e3,
        tick_seconds[tick_seconds.len() - 1] * 1e3,
        rss_kib().saturating_sub(rss_before),
    );
}
