//! The heap probes' two ways of reporting, side by side on one process: aggregated in the
//! kernel (`--heap-path aggregate`, the default: live figures per group kept by the probes,
//! an event only per new group) and one event per allocation and per free (`--heap-path
//! events`, applied by the daemon). Two daemons watch the heap fixture at once, one each
//! way; every callsite must show the same live bytes and blocks in both, at the fixture's
//! own figures, and the aggregating daemon must receive only a small share of the events.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// (live bytes, live blocks) per (site, task site) of the fixture's own callsites.
type Live = BTreeMap<(String, String), (f64, f64)>;

fn fixture_series(daemon: SocketAddr, pid: u32) -> Live {
    let mut live = Live::new();
    for sample in scrape(daemon) {
        let (Some(site), Some(task_site)) =
            (sample.labels.get("site"), sample.labels.get("task_site"))
        else {
            continue;
        };
        if sample.labels.get("pid") != Some(&pid.to_string()) || !site.starts_with("heap_app::") {
            continue;
        }
        let key = (site.clone(), task_site.clone());
        match sample.name.as_str() {
            "leakscope_heap_live_bytes" => live.entry(key).or_default().0 = sample.value,
            "leakscope_heap_live_allocations" => live.entry(key).or_default().1 = sample.value,
            _ => {}
        }
    }
    live
}

fn heap_events(daemon: SocketAddr) -> f64 {
    sum(&scrape(daemon), "leakscope_heap_events_total", &[])
}

/// Polls until both daemons report the same figures for every fixture callsite, and those
/// figures are the fixture's (`held`, bytes per callsite).
fn expect_same(aggregated: SocketAddr, events: SocketAddr, pid: u32, held: &BTreeMap<String, f64>) {
    eventually("both paths agree with the fixture", DEADLINE, || {
        let (a, e) = (fixture_series(aggregated, pid), fixture_series(events, pid));
        let nonzero = |live: &Live| {
            live.iter()
                .filter(|(_, v)| **v != (0.0, 0.0))
                .map(|(k, v)| (k.clone(), *v))
                .collect::<Live>()
        };
        if nonzero(&a) != nonzero(&e) {
            return Err(format!("aggregates {a:?}\nevents {e:?}"));
        }
        for (site, &bytes) in held {
            let got: f64 = a
                .iter()
                .filter(|((s, _), _)| s == site)
                .map(|(_, v)| v.0)
                .sum();
            if got != bytes {
                return Err(format!("{site}: fixture holds {bytes}, both say {got}"));
            }
        }
        Ok(())
    });
}

#[test]
fn aggregates_in_the_kernel_match_the_event_path_per_callsite() {
    if !ebpf_available("heap aggregates against heap events") {
        return;
    }
    let mut app = HeapApp::start(workspace_root().join("target/release/heap-app"));
    let pid = app.proc.pid();
    let watch = |path: &str| {
        let (proc, daemon) = start_daemon(&[
            "--pid".into(),
            pid.to_string(),
            "--heap".into(),
            "exact".into(),
            "--heap-path".into(),
            path.into(),
        ]);
        wait_attached(daemon, pid);
        (proc, daemon)
    };
    let (_aggregating, aggregated) = watch("aggregate");
    let (_reporting, events) = watch("events");

    app.command("grow 100000");
    app.command("cache 200");
    app.command("big 3");
    app.command("zeroed 2");
    app.command("aligned 5");
    app.command("cmalloc 6");
    let held = app.command("cross 4");
    expect_same(aggregated, events, pid, &held);

    // Blocks freed and replaced (the cache's plateau) leave the groups they were counted in.
    let held = app.command("cache 500");
    expect_same(aggregated, events, pid, &held);
    let events_before_release = (heap_events(aggregated), heap_events(events));

    let released = app.command("release");
    assert!(released.values().all(|&v| v == 0.0), "{released:?}");
    expect_same(
        aggregated,
        events,
        pid,
        &held.keys().map(|k| (k.clone(), 0.0)).collect(),
    );

    // Thousands of allocations and frees reached the event daemon; the aggregating one was
    // told of new groups only.
    let (aggregate_events, block_events) = events_before_release;
    assert!(
        block_events > 1000.0 && aggregate_events * 20.0 < block_events,
        "heap events received: {aggregate_events} aggregating, {block_events} per block"
    );
}
