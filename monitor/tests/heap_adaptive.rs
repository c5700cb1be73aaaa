//! `--heap adaptive` end to end: heap probes go on only when a process's memory grows
//! beyond what its tasks hold, and windows that keep leaving blocks behind at one callsite
//! make it a heap suspect. Short windows (flags) keep the tests quick.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use leakscope_testkit::types::{SiteKind, Verdict};
use support::*;

const LEAK: &str = "axum_app::state_leak::{{closure}}::{{closure}}";
const REMEDY: &str = "axum_app::state_ok::{{closure}}::{{closure}}";

/// A daemon on `pid` with `--heap adaptive`, sampling every 0.5 s, growth judged over 3 s,
/// windows of 3 s allocating + 3 s following and 1 s of cooldown.
fn watch_adaptive(pid: u32) -> (Proc, SocketAddr) {
    watch(
        pid,
        &[
            "--heap",
            "adaptive",
            "--verdict-sample-seconds",
            "0.5",
            "--verdict-window-seconds",
            "10",
            "--heap-window-seconds",
            "3",
            "--heap-follow-seconds",
            "3",
            "--heap-window-cooldown-seconds",
            "1",
            "--heap-growth-lookback-seconds",
            "3",
        ],
    )
}

/// The seed's growing-state leak under steady traffic (it and its remedy, about five
/// calls a second each): memory grows, windows run, and the leaking handler's callsite
/// becomes a heap suspect with the windows as evidence and its bytes extrapolated; the
/// remedy's callsite, seen in the same windows, is judged and is not a suspect.
#[test]
fn growing_state_opens_windows_and_its_callsite_becomes_a_suspect() {
    if !ebpf_available("growing_state_opens_windows_and_its_callsite_becomes_a_suspect") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = watch_adaptive(pid);
    let _traffic = Traffic::start(addr, &["/state/leak", "/state/ok"], &[]);
    let suspect = eventually(
        "the state leak's callsite is a heap suspect",
        Duration::from_secs(90),
        || {
            let suspects = Client::new(daemon).suspects().map_err(|e| e.to_string())?;
            suspects
                .sites
                .into_iter()
                .find(|v| v.pid == pid && v.kind == SiteKind::Heap && v.site == LEAK)
                .ok_or_else(|| format!("no heap suspect at {LEAK} yet"))
        },
    );
    assert!(
        suspect.reason.contains("heap windows") && suspect.reason.contains("extrapolated"),
        "the suspect's reason gives the windows as evidence and labels its extrapolation: {}",
        suspect.reason
    );
    assert!(
        suspect.samples.len() >= 2,
        "a suspect from at least two windows: {suspect:?}"
    );
    let sites = Client::new(daemon).sites().expect("GET /api/v1/sites");
    let remedy = sites
        .sites
        .iter()
        .find(|v| v.pid == pid && v.kind == SiteKind::Heap && v.site == REMEDY)
        .unwrap_or_else(|| panic!("the remedy's callsite was not judged: {sites:?}"));
    assert_eq!(
        remedy.verdict,
        Verdict::Ok,
        "the remedy is not a suspect: {}",
        remedy.reason
    );
    let metrics = scrape(daemon);
    assert!(
        sum(
            &metrics,
            "leakscope_heap_windows_total",
            &[("reason", "anon_growth")]
        ) >= 1.0,
        "the first window says it ran because memory grew"
    );
    assert!(
        sum(
            &metrics,
            "leakscope_heap_window_finished_total",
            &[("pid", &pid.to_string())]
        ) >= 2.0
    );
}

/// `RssAnon` of `pid`, in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Steady traffic whose memory stays bounded (the remedy and a health check), once the
/// service has warmed up under it (its arenas and buffers grown: memory flat for 2 s): the
/// signals are read again and again, and no window runs, so no heap probe is ever attached.
#[test]
fn bounded_memory_runs_no_window() {
    if !ebpf_available("bounded_memory_runs_no_window") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let _traffic = Traffic::start(addr, &["/state/ok", "/healthz"], &[]);
    let mut seen: Vec<(std::time::Instant, u64)> = Vec::new();
    eventually(
        "the service's memory levels off under the traffic",
        Duration::from_secs(60),
        || {
            let now = std::time::Instant::now();
            seen.push((now, rss_anon_kib(pid)));
            seen.retain(|&(t, _)| now.duration_since(t) <= Duration::from_secs(2));
            let (low, high) = seen.iter().fold((u64::MAX, 0), |(lo, hi), &(_, kib)| {
                (lo.min(kib), hi.max(kib))
            });
            let span = now.duration_since(seen[0].0);
            (span >= Duration::from_millis(1900) && high - low < 256)
                .then_some(())
                .ok_or(format!("RssAnon {low}..{high} KiB over {span:?}"))
        },
    );
    let (_daemon, daemon) = watch_adaptive(pid);
    let pid_label = pid.to_string();
    // 30 checks at 0.5 s: the 3 s lookback filled five times over.
    eventually(
        "the signals checked 30 times",
        Duration::from_secs(60),
        || {
            let checks = sum(
                &scrape(daemon),
                "leakscope_heap_window_checks_total",
                &[("pid", &pid_label)],
            );
            (checks >= 30.0)
                .then_some(())
                .ok_or(format!("{checks} checks so far"))
        },
    );
    let metrics = scrape(daemon);
    assert_eq!(
        sum(&metrics, "leakscope_heap_windows_total", &[]),
        0.0,
        "no window ran"
    );
    assert_eq!(
        sum(
            &metrics,
            "leakscope_heap_window_probes_total",
            &[("op", "attach")]
        ),
        0.0,
        "no heap probe was attached"
    );
    assert_eq!(
        sum(
            &metrics,
            "leakscope_heap_window_state",
            &[("pid", &pid_label), ("state", "idle")]
        ),
        1.0,
        "the process is idle"
    );
}
