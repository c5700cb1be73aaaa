//! Task lifetimes end to end: real fixture services, real uprobes, exact counts.
//!
//! Each test starts its own fixture process and its own `leakscope daemon --pid`, drives
//! loopback traffic, and polls `/metrics` with a deadline until the numbers a user relies on
//! hold (or fails with the last numbers seen).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

fn oldest_age(daemon: SocketAddr, pid: u32, site: &str) -> f64 {
    site_value(
        &scrape(daemon),
        "leakscope_task_oldest_alive_seconds",
        pid,
        site,
    )
}

/// The seed's patterns and their remedies, against one fixture build and runtime flavour.
fn leaks_and_remedies(binary: &str, krate: &str, flavor: &str) {
    let test = format!("{binary} {flavor}");
    if !ebpf_available(&test) {
        return;
    }
    let (app, addr) = start_fixture(&fixture(binary), &["--flavor", flavor]);
    let pid = app.pid();
    let (_daemon, daemon) = start_daemon(&["--pid".into(), pid.to_string()]);
    wait_attached(daemon, pid);
    let site = |handler: &str| format!("{krate}::{handler}::{{{{closure}}}}::{{{{closure}}}}");

    const LEAKS: usize = 20;
    for _ in 0..LEAKS {
        get_ok(addr, "/leak/forever");
        get_ok(addr, "/ok/bounded");
        get_ok(addr, "/ok/awaited");
        get_ok(addr, "/ok/two-tasks");
        get_ok(addr, "/ok/aborted");
        get_ok(addr, "/ok/blocking");
    }
    for _ in 0..10 {
        stream_then_disconnect(addr, "/leak/stream");
        stream_then_disconnect(addr, "/ok/stream");
    }
    let n = LEAKS as f64;
    // Leaks: one task per request stays alive.
    expect_site(daemon, pid, &site("leak_forever"), (n, 0.0, n));
    expect_site(daemon, pid, &site("leak_stream"), (10.0, 0.0, 10.0));
    // Remedies: every task spawned also completed.
    expect_site(daemon, pid, &site("ok_bounded"), (n, n, 0.0));
    expect_site(daemon, pid, &site("ok_awaited"), (n, n, 0.0));
    // A handler's fan-out: each of its two tasks is a site of its own, and both complete.
    for task in ["lookup_user", "lookup_quota"] {
        expect_site(
            daemon,
            pid,
            &format!("{krate}::{task}::{{{{closure}}}}"),
            (n, n, 0.0),
        );
    }
    expect_site(daemon, pid, &site("ok_aborted"), (n, n, 0.0));
    expect_site(daemon, pid, &site("ok_blocking"), (n, n, 0.0));
    expect_site(daemon, pid, &site("ok_stream"), (10.0, 10.0, 0.0));
    // axum's per-connection tasks end with their connections.
    eventually("connection tasks back to 0", DEADLINE, || {
        let samples = scrape(daemon);
        let conn: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == "leakscope_tasks_alive"
                    && s.labels
                        .get("site")
                        .is_some_and(|l| l.contains("handle_connection"))
            })
            .collect();
        (!conn.is_empty() && conn.iter().all(|s| s.value == 0.0))
            .then_some(())
            .ok_or(format!("{conn:?}"))
    });
    // The leaking site's oldest task ages; a healthy site reports no age.
    let first = oldest_age(daemon, pid, &site("leak_forever"));
    std::thread::sleep(Duration::from_millis(1100));
    let later = oldest_age(daemon, pid, &site("leak_forever"));
    assert!(
        later >= first + 1.0,
        "oldest age did not grow: {first} -> {later}"
    );
    assert_eq!(oldest_age(daemon, pid, &site("ok_bounded")), 0.0);

    // The fixture's own count agrees with leakscope's.
    let stats = get_ok(addr, "/stats");
    assert!(
        stats.contains(&format!("alive_forever={LEAKS}")),
        "fixture says {stats}"
    );
}

#[test]
fn multi_thread_leaks_are_counted_exactly() {
    leaks_and_remedies("axum-app", "axum_app", "multi_thread");
}

#[test]
fn current_thread_leaks_are_counted_exactly() {
    leaks_and_remedies("axum-app", "axum_app", "current_thread");
}

#[test]
fn tokio_lts_leaks_are_counted_exactly() {
    leaks_and_remedies("axum-app-lts", "axum_app_lts", "multi_thread");
}

#[test]
fn exited_process_is_detached_and_forgotten() {
    if !ebpf_available("exited_process_is_detached_and_forgotten") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = start_daemon(&["--pid".into(), pid.to_string()]);
    wait_attached(daemon, pid);
    get_ok(addr, "/leak/forever");
    expect_site(
        daemon,
        pid,
        "axum_app::leak_forever::{{closure}}::{{closure}}",
        (1.0, 0.0, 1.0),
    );
    drop(app);
    eventually("the exited process leaves /metrics", DEADLINE, || {
        let samples = scrape(daemon);
        let attached = samples
            .iter()
            .find(|s| s.name == "leakscope_attached_processes")
            .map(|s| s.value);
        let stale = samples
            .iter()
            .filter(|s| s.labels.get("pid") == Some(&pid.to_string()))
            .count();
        (attached == Some(0.0) && stale == 0)
            .then_some(())
            .ok_or(format!("attached {attached:?}, {stale} series left"))
    });
}

#[test]
fn spawns_are_counted_where_bind_inner_was_inlined_and_older_tasks_are_not() {
    if !ebpf_available("spawns_are_counted_where_bind_inner_was_inlined") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    let mut child = Command::new(fixture("one-task-type"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting one-task-type");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let app = Proc {
        child,
        name: "one-task-type".into(),
    };
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let mut command = |c: &str| {
        writeln!(stdin, "{c}").unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "after {c}");
    };
    // Long-lived workers spawned before attach, polled every 100 ms: their first polls
    // after attach are not spawns (their ids predate attach); they are alive, found by the
    // task census, and counted once.
    command("tick 6");
    let (_daemon, daemon) = start_daemon(&["--pid".into(), app.pid().to_string()]);
    wait_attached(daemon, app.pid());
    command("leak 25");
    command("done 40");
    let site = "one_task_type::main::{{closure}}::{{closure}}::{{closure}}";
    expect_site(daemon, app.pid(), site, (65.0, 40.0, 25.0 + 6.0));
    assert_eq!(
        site_value(
            &scrape(daemon),
            "leakscope_tasks_alive_before_attach",
            app.pid(),
            site
        ),
        6.0
    );
}

/// A stripped production binary with its symbols in a separate debug file, linked by
/// `.gnu_debuglink` (`cargo xtask fixtures` makes it): the daemon finds the debug file next
/// to the binary, hooks it and names its sites as it does the unstripped build.
#[test]
fn stripped_binary_with_debuglink_is_counted_exactly() {
    if !ebpf_available("stripped_binary_with_debuglink_is_counted_exactly") {
        return;
    }
    let (app, addr) = start_fixture(
        &fixture("axum-app-stripped-debuglink"),
        &["--flavor", "multi_thread"],
    );
    let pid = app.pid();
    let (_daemon, daemon) = start_daemon(&["--pid".into(), pid.to_string()]);
    wait_attached(daemon, pid);
    for _ in 0..7 {
        get_ok(addr, "/leak/forever");
        get_ok(addr, "/ok/bounded");
    }
    expect_site(
        daemon,
        pid,
        "axum_app::leak_forever::{{closure}}::{{closure}}",
        (7.0, 0.0, 7.0),
    );
    expect_site(
        daemon,
        pid,
        "axum_app::ok_bounded::{{closure}}::{{closure}}",
        (7.0, 7.0, 0.0),
    );
}
