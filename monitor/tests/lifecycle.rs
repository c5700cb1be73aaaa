//! A watched process's identity over its life: an exec replaces the program under the same
//! pid, a pid is reused by another process, a target restarts, and leakscope itself
//! restarts. Counts are never carried from one program or process to another.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// (spawned, alive) of `site` in process `pid`, from `/metrics`.
fn counts(daemon: SocketAddr, pid: u32, site: &str) -> (f64, f64) {
    let samples = scrape(daemon);
    (
        site_value(&samples, "leakscope_tasks_spawned_total", pid, site),
        site_value(&samples, "leakscope_tasks_alive", pid, site),
    )
}

fn expect_counts(daemon: SocketAddr, pid: u32, site: &str, want: (f64, f64)) {
    eventually(
        &format!("pid {pid}: {site} at (spawned, alive) {want:?}"),
        DEADLINE,
        || {
            let got = counts(daemon, pid, site);
            (got == want).then_some(()).ok_or(format!("{got:?}"))
        },
    );
}

/// The pids the daemon lists and the sites it has series for, of process `pid`.
fn listed(daemon: SocketAddr, pid: u32) -> (Option<String>, Vec<String>) {
    let tasks = Client::new(daemon).tasks().expect("GET /api/v1/tasks");
    let exe = tasks
        .processes
        .iter()
        .find(|p| p.pid == pid && p.attached)
        .map(|p| p.exe.clone());
    let sites = tasks
        .sites
        .into_iter()
        .filter(|s| s.pid == pid)
        .map(|s| s.site)
        .collect();
    (exe, sites)
}

/// A `--pid` target that execs a program leakscope does not watch: the old program's probes
/// and tasks go at once (the process lives on, so this is the exec, not the exit), and
/// nothing is counted for the pid afterwards.
#[test]
fn exec_into_an_unwatched_program_drops_the_old_programs_state() {
    if !ebpf_available("exec_into_an_unwatched_program_drops_the_old_programs_state") {
        return;
    }
    let mut app = OneTaskType::start();
    let pid = app.pid();
    let (_daemon, daemon) = watch(pid, &[]);
    app.command("leak 5");
    expect_counts(daemon, pid, OneTaskType::SITE, (5.0, 5.0));
    app.send("exec /bin/sleep 600");
    eventually("the old program forgotten", DEADLINE, || {
        match listed(daemon, pid) {
            (None, sites) if sites.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the process lives on");
    assert!(exe.ends_with("sleep"), "{}", exe.display());
    let samples = scrape(daemon);
    assert!(
        samples
            .iter()
            .all(|s| s.labels.get("pid") != Some(&pid.to_string())),
        "series left for pid {pid}"
    );
}

/// A process of one `--exe` target that execs another `--exe` target under the same pid:
/// it is attached again as the new program, whose tasks are counted from its exec on (its
/// startup worker included), exactly, and never under the old program's sites.
#[test]
fn exec_into_another_watched_service_counts_only_the_new_program() {
    if !ebpf_available("exec_into_another_watched_service_counts_only_the_new_program") {
        return;
    }
    let axum = fixture("axum-app");
    let one = fixture("one-task-type");
    let (_daemon, daemon) = start_daemon(&[
        "--exe".into(),
        one.display().to_string(),
        "--exe".into(),
        axum.display().to_string(),
    ]);
    let mut app = OneTaskType::start_binary(&one);
    let pid = app.pid();
    wait_attached(daemon, pid);
    app.command("leak 5");
    expect_counts(daemon, pid, OneTaskType::SITE, (5.0, 5.0));
    app.send(&format!("exec {}", axum.display()));
    let line = app.read_line();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("axum-app printed {line:?}"));
    eventually("attached again as axum-app", DEADLINE, || {
        match listed(daemon, pid) {
            (Some(exe), sites)
                if exe == "axum-app" && !sites.iter().any(|s| s.contains("one_task_type")) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    for _ in 0..3 {
        get_ok(addr, "/leak/forever");
    }
    expect_counts(
        daemon,
        pid,
        "axum_app::leak_forever::{{closure}}::{{closure}}",
        (3.0, 3.0),
    );
    expect_counts(
        daemon,
        pid,
        "axum_app::housekeeping::{{closure}}",
        (1.0, 1.0),
    );
    let (_, sites) = listed(daemon, pid);
    assert!(
        sites.iter().all(|s| !s.contains("one_task_type")),
        "old program's sites under the new one: {sites:?}"
    );
}

/// Writes `last` to `/proc/sys/kernel/ns_last_pid`: the next process forked in this pid
/// namespace gets `last + 1` if it is free.
fn set_last_pid(last: u32) {
    std::fs::write("/proc/sys/kernel/ns_last_pid", last.to_string())
        .expect("writing /proc/sys/kernel/ns_last_pid (root)");
}

/// An `--exe` target killed and its pid given to a new process of the same executable
/// (forced with `ns_last_pid`; other processes forking meanwhile may take it first, so
/// this retries): the new process is a new process to leakscope, its counts start from
/// zero and the old one's tasks are never attributed to it. Before that, the same with a
/// plain restart (a new pid).
#[test]
fn a_restarted_target_and_a_reused_pid_start_from_zero() {
    if !ebpf_available("a_restarted_target_and_a_reused_pid_start_from_zero") {
        return;
    }
    let one = fixture("one-task-type");
    let (_daemon, daemon) = start_daemon(&["--exe".into(), one.display().to_string()]);
    let mut first = OneTaskType::start_binary(&one);
    let old_pid = first.pid();
    wait_attached(daemon, old_pid);
    first.command("leak 5");
    expect_counts(daemon, old_pid, OneTaskType::SITE, (5.0, 5.0));
    drop(first);

    // Restarted: a new pid, attached again, from zero.
    let mut second = OneTaskType::start_binary(&one);
    let pid = second.pid();
    wait_attached(daemon, pid);
    second.command("leak 2");
    expect_counts(daemon, pid, OneTaskType::SITE, (2.0, 2.0));
    eventually("the exited process forgotten", DEADLINE, || {
        match listed(daemon, old_pid) {
            (None, sites) if sites.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    second.command("leak 3");
    expect_counts(daemon, pid, OneTaskType::SITE, (5.0, 5.0));

    // The same pid for a new process, as soon as the old one is reaped.
    drop(second);
    let mut reused = None;
    for _ in 0..200 {
        set_last_pid(pid - 1);
        let candidate = OneTaskType::start_binary(&one);
        if candidate.pid() == pid {
            reused = Some(candidate);
            break;
        }
    }
    let mut third = reused.unwrap_or_else(|| panic!("pid {pid} was not given again in 200 tries"));
    eventually(
        "the new process under the old pid attached from zero",
        DEADLINE,
        || match listed(daemon, pid) {
            // Its runtime's worker launches may be its only tasks so far.
            (Some(_), sites) if !sites.iter().any(|s| s == OneTaskType::SITE) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    third.command("leak 1");
    expect_counts(daemon, pid, OneTaskType::SITE, (1.0, 1.0));
}

/// leakscope restarted while the target runs with tasks alive: the second daemon attaches,
/// says how many tasks came before it (`leakscope_tasks_spawned_before_attach`, and the
/// log), counts those still alive once, from the task census and not as spawns
/// (`leakscope_tasks_alive_before_attach`), tells the long-lived workers' first polls apart
/// (`leakscope_tasks_seen_before_attach_total`), and counts new tasks exactly.
#[test]
fn a_restarted_daemon_says_which_counts_started_again() {
    if !ebpf_available("a_restarted_daemon_says_which_counts_started_again") {
        return;
    }
    let mut app = OneTaskType::start();
    let pid = app.pid();
    let (first, first_addr) = watch(pid, &[]);
    app.command("tick 4");
    app.command("leak 3");
    expect_counts(first_addr, pid, OneTaskType::SITE, (7.0, 7.0));
    drop(first); // SIGKILL

    let (_second, daemon) = watch(pid, &[]);
    let pid_label = pid.to_string();
    let before = sum(
        &scrape(daemon),
        "leakscope_tasks_spawned_before_attach",
        &[("pid", &pid_label)],
    );
    // The runtime's two worker launches (spawn_blocking at startup), the 4 workers and
    // the 3 leaked tasks.
    assert_eq!(
        before, 9.0,
        "tasks spawned before the second daemon attached"
    );
    eventually("the workers' first polls told apart", DEADLINE, || {
        let seen = sum(
            &scrape(daemon),
            "leakscope_tasks_seen_before_attach_total",
            &[("pid", &pid_label)],
        );
        (seen == 4.0).then_some(()).ok_or(format!("{seen}"))
    });
    // The 4 workers and the 3 leaked tasks are alive, none of them a spawn seen.
    expect_counts(daemon, pid, OneTaskType::SITE, (0.0, 7.0));
    assert_eq!(
        site_value(
            &scrape(daemon),
            "leakscope_tasks_alive_before_attach",
            pid,
            OneTaskType::SITE
        ),
        7.0
    );
    app.command("leak 2");
    expect_counts(daemon, pid, OneTaskType::SITE, (2.0, 9.0));
}
