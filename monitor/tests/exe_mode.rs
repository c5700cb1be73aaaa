//! `--exe` mode. An `--exe` daemon attaches to every process running the fixture, so
//! this test waits for *its* process to be attached, by pid.

mod support;

use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A process started after the daemon is counted from its exec on: the worker it spawns
/// as it starts (before the daemon registers it) included, and its leaks exactly.
#[test]
fn exe_mode_follows_processes_started_later() {
    if !ebpf_available("exe_mode_follows_processes_started_later") {
        return;
    }
    let binary = fixture("axum-app");
    let (_daemon, daemon) = start_daemon(&["--exe".into(), binary.display().to_string()]);
    let (app, addr) = start_fixture(&binary, &[]);
    let pid = app.pid();
    wait_attached(daemon, pid);
    for _ in 0..3 {
        get_ok(addr, "/leak/forever");
    }
    let site = "axum_app::leak_forever::{{closure}}::{{closure}}";
    eventually("3 leaked tasks counted", DEADLINE, || {
        let samples = scrape(daemon);
        let got = (
            site_value(&samples, "leakscope_tasks_spawned_total", pid, site),
            site_value(&samples, "leakscope_tasks_alive", pid, site),
        );
        (got == (3.0, 3.0)).then_some(()).ok_or(format!("{got:?}"))
    });
    let samples = scrape(daemon);
    let worker = "axum_app::housekeeping::{{closure}}";
    let got = (
        site_value(&samples, "leakscope_tasks_spawned_total", pid, worker),
        site_value(&samples, "leakscope_tasks_alive", pid, worker),
    );
    assert_eq!(got, (1.0, 1.0), "the worker spawned at startup");
}

/// Heap tracking follows `--exe` processes too: the seed's third pattern in a process
/// started after the daemon.
#[test]
fn exe_mode_tracks_the_heap_of_processes_started_later() {
    if !ebpf_available("exe_mode_tracks_the_heap_of_processes_started_later") {
        return;
    }
    let binary = fixture("axum-app");
    let (_daemon, daemon) = start_daemon(&[
        "--exe".into(),
        binary.display().to_string(),
        "--heap".into(),
        "exact".into(),
    ]);
    let (app, addr) = start_fixture(&binary, &[]);
    let pid = app.pid();
    wait_attached(daemon, pid);
    // The remedy keeps its last few buffers: enough requests that they are under 10 %.
    const REQUESTS: usize = 60;
    for _ in 0..REQUESTS {
        get_ok(addr, "/state/leak");
        get_ok(addr, "/state/ok");
    }
    expect_state_leak_found(daemon, pid, REQUESTS);
}
