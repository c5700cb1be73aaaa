//! The task census end to end: tasks a fixture spawned *before* leakscope attached, read
//! from the runtime's own task lists, counted at their sites once and only once, on the
//! real kernel and the real fixtures (tokio 1.54 and the 1.47 LTS build).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// The fixture's `/stats`: `key=value` pairs.
fn stats(addr: SocketAddr) -> BTreeMap<String, f64> {
    get_ok(addr, "/stats")
        .split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn pid_value(daemon: SocketAddr, family: &str, pid: u32) -> f64 {
    sum(&scrape(daemon), family, &[("pid", &pid.to_string())])
}

fn site(krate: &str, handler: &str) -> String {
    format!("{krate}::{handler}::{{{{closure}}}}::{{{{closure}}}}")
}

/// Every task leakscope counts alive in `pid` is one tokio counts alive, and the other
/// way round: the sum over its sites equals `num_alive_tasks` less the connection task
/// that serves the `/stats` request itself.
fn expect_total_matches_tokio(daemon: SocketAddr, addr: SocketAddr, pid: u32) {
    eventually(
        "leakscope's alive tasks == tokio's num_alive_tasks - 1 (the /stats connection)",
        DEADLINE,
        || {
            let tokio = stats(addr)["num_alive_tasks"] - 1.0;
            let samples = scrape(daemon);
            let ours = sum(
                &samples,
                "leakscope_tasks_alive",
                &[("pid", &pid.to_string())],
            );
            let sites: Vec<String> = samples
                .iter()
                .filter(|s| {
                    s.name.starts_with("leakscope_tasks_alive")
                        || s.name.starts_with("leakscope_census")
                        || s.name.starts_with("leakscope_events")
                        || s.name.starts_with("leakscope_bound_drops")
                        || s.name.starts_with("leakscope_tasks_completed_untracked")
                })
                .filter(|s| s.value != 0.0)
                .map(|s| format!("{} {:?} {}", s.name, s.labels.get("site"), s.value))
                .collect();
            (ours == tokio)
                .then_some(())
                .ok_or(format!("leakscope {ours}, tokio {tokio}: {sites:#?}"))
        },
    );
}

fn leaked_before_attach(binary: &str, krate: &str, flavor: &str) {
    if !ebpf_available(&format!("census {binary} {flavor}")) {
        return;
    }
    let (app, addr) = start_fixture(&fixture(binary), &["--flavor", flavor]);
    let pid = app.pid();
    const LEAKS: usize = 20;
    for _ in 0..LEAKS {
        get_ok(addr, "/leak/forever");
    }
    // Each leaked task counts itself when it first runs, which may be after its request
    // was answered.
    eventually("the fixture's 20 leaked tasks running", DEADLINE, || {
        let running = stats(addr)["alive_forever"];
        (running == LEAKS as f64)
            .then_some(())
            .ok_or(format!("{running} running"))
    });
    let (daemon_proc, daemon) = start_daemon(&["--pid".into(), pid.to_string()]);
    wait_attached(daemon, pid);
    // The hook points the daemon says it placed are the kernel's uprobe links (what the
    // census-only test counts to be none).
    let hooks = pid_value(daemon, "leakscope_task_hook_points", pid);
    assert!(hooks > 0.0);
    assert_eq!(uprobes_of(daemon_proc.pid()) as f64, hooks);
    let leak = site(krate, "leak_forever");
    let n = LEAKS as f64;
    expect_alive(daemon, pid, &leak, (n, n), CENSUS_INTERVAL);
    let samples = scrape(daemon);
    assert_eq!(
        site_value(&samples, "leakscope_tasks_spawned_total", pid, &leak),
        0.0,
        "no spawn was seen: they all came before attach"
    );
    assert_eq!(pid_value(daemon, "leakscope_census_runtimes", pid), 1.0);
    assert_eq!(
        pid_value(daemon, "leakscope_census_not_found_total", pid),
        0.0
    );
    expect_total_matches_tokio(daemon, addr, pid);

    // The JSON API says the same, and that their ages are lower bounds.
    let tasks = Client::new(daemon).tasks().expect("/api/v1/tasks");
    let row = tasks
        .sites
        .iter()
        .find(|r| r.pid == pid && r.site == leak)
        .unwrap_or_else(|| panic!("no {leak} in {:?}", tasks.sites));
    assert_eq!((row.alive, row.alive_before_attach), (20, 20));
    assert!(row.oldest_alive_at_least, "{row:?}");

    // Tasks spawned since are the hooks', added to the same site once.
    get_ok(addr, "/leak/forever");
    expect_alive(daemon, pid, &leak, (n + 1.0, n), DEADLINE);
}

#[test]
fn tasks_leaked_before_attach_are_counted_at_their_site() {
    leaked_before_attach("axum-app", "axum_app", "multi_thread");
}

#[test]
fn tasks_leaked_before_attach_are_counted_current_thread() {
    leaked_before_attach("axum-app", "axum_app", "current_thread");
}

#[test]
fn tasks_leaked_before_attach_are_counted_tokio_lts() {
    leaked_before_attach("axum-app-lts", "axum_app_lts", "multi_thread");
}

#[test]
fn the_census_under_load_counts_the_leaked_tasks_exactly() {
    if !ebpf_available("census under load") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    for _ in 0..20 {
        get_ok(addr, "/leak/forever");
    }
    // Tasks spawn and complete all through the censuses, in every shard.
    let traffic = Traffic::start(
        addr,
        &["/ok/bounded", "/ok/awaited", "/ok/aborted", "/ok/blocking"],
        &["/ok/stream"],
    );
    let clients = KeepAliveClients::start(addr, 8, "/ok/bounded");
    let (_daemon, daemon) = start_daemon(&[
        "--pid".into(),
        pid.to_string(),
        "--census-seconds".into(),
        "0.5".into(),
    ]);
    wait_attached(daemon, pid);
    let leak = site("axum_app", "leak_forever");
    expect_alive(daemon, pid, &leak, (20.0, 20.0), CENSUS_INTERVAL);
    // Several censuses later, under the same load, still exactly those 20.
    let runs = pid_value(daemon, "leakscope_census_runs_total", pid);
    eventually("four more censuses", DEADLINE, || {
        let now = pid_value(daemon, "leakscope_census_runs_total", pid);
        (now >= runs + 4.0)
            .then_some(())
            .ok_or(format!("{now} runs"))
    });
    expect_alive(daemon, pid, &leak, (20.0, 20.0), DEADLINE);
    drop(clients);
    drop(traffic);
    expect_total_matches_tokio(daemon, addr, pid);
}

#[test]
fn a_census_seen_task_that_completes_leaves_once() {
    if !ebpf_available("census completion") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    for _ in 0..3 {
        get_ok(addr, "/leak/pending");
    }
    let (_daemon, daemon) = start_daemon(&[
        "--pid".into(),
        pid.to_string(),
        "--census-seconds".into(),
        "0.5".into(),
    ]);
    wait_attached(daemon, pid);
    let pending = site("axum_app", "leak_pending");
    expect_alive(daemon, pid, &pending, (3.0, 3.0), CENSUS_INTERVAL);
    let untracked = pid_value(daemon, "leakscope_tasks_completed_untracked_total", pid);
    assert_eq!(get_ok(addr, "/pending/release"), "released 1\n");
    expect_alive(daemon, pid, &pending, (2.0, 2.0), DEADLINE);
    assert_eq!(
        pid_value(daemon, "leakscope_tasks_completed_untracked_total", pid),
        untracked + 1.0,
        "its completion, seen by the hook, counts once"
    );
    assert_eq!(
        site_value(
            &scrape(daemon),
            "leakscope_tasks_completed_total",
            pid,
            &pending
        ),
        0.0,
        "not a completion of a task spawned since attach"
    );
    // Later censuses neither bring it back nor take another away.
    let runs = pid_value(daemon, "leakscope_census_runs_total", pid);
    eventually("two more censuses", DEADLINE, || {
        let now = pid_value(daemon, "leakscope_census_runs_total", pid);
        (now >= runs + 2.0)
            .then_some(())
            .ok_or(format!("{now} runs"))
    });
    expect_alive(daemon, pid, &pending, (2.0, 2.0), DEADLINE);
    assert_eq!(
        pid_value(daemon, "leakscope_census_vanished_total", pid),
        0.0
    );
}

/// `leakscope report` names the tasks alive from before it attached, though they are no
/// growth to judge.
#[test]
fn report_lists_tasks_alive_since_before_attach() {
    if !ebpf_available("census report") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    for _ in 0..20 {
        get_ok(addr, "/leak/forever");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .args(["report", "--pid", &app.pid().to_string(), "--duration", "3"])
        .output()
        .expect("running leakscope report");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no suspect: nothing grew while it watched\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Tasks alive since before leakscope attached"))
        .find(|l| l.contains(&site("axum_app", "leak_forever")))
        .unwrap_or_else(|| panic!("the leaked site is not listed:\n{stdout}"));
    assert_eq!(listed.split_whitespace().next(), Some("20"), "{listed}");
}
