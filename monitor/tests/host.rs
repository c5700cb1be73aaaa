//! Host-wide mode (`--all`): every tokio service is watched, whether it ran before the
//! daemon or started after it, and nothing else is.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use leakscope_testkit::types::TasksResponse;
use support::*;

#[test]
fn all_watches_every_tokio_service_and_nothing_else() {
    if !ebpf_available("host-wide") {
        return;
    }
    // A process that is not a tokio service, under the scanned tree like the fixtures.
    let dir = workspace_root().join(format!("target/host-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sleep = dir.join("sleep");
    std::fs::copy("/bin/sleep", &sleep).expect("copying /bin/sleep");
    let other = Proc {
        child: leakscope_testkit::spawn_fresh_copy(
            Command::new(&sleep).arg("120").stdout(Stdio::null()),
        )
        .expect("starting sleep"),
        name: "sleep".into(),
    };
    let (before, _) = start_fixture(&fixture("axum-app"), &[]);
    // No --pid, no --exe: host-wide mode. Only this workspace's build tree is scanned: the
    // test must not attach to the machine's own services.
    let (_daemon, daemon) = start_daemon(&[
        "--all-under".into(),
        workspace_root().join("target").display().to_string(),
    ]);
    wait_attached(daemon, before.pid());
    let (after, addr) = start_fixture(&fixture("axum-app"), &[]);
    wait_attached(daemon, after.pid());
    // Attached from the kernel's report of its exec, within a second (the periodic scan
    // alone would take one to two: a scan a second, then a second of settling).
    let exec_to_attach = sum(
        &scrape(daemon),
        "leakscope_host_exec_to_attach_seconds",
        &[],
    );
    assert!(
        exec_to_attach > 0.0 && exec_to_attach < 1.0,
        "the service started after the daemon was attached {exec_to_attach} s after its exec"
    );
    for _ in 0..5 {
        get_ok(addr, "/leak/forever");
    }
    eventually(
        "the service started after the daemon is counted",
        Duration::from_secs(30),
        || {
            let spawned = site_value(
                &scrape(daemon),
                "leakscope_tasks_spawned_total",
                after.pid(),
                "axum_app::leak_forever::{{closure}}::{{closure}}",
            );
            (spawned == 5.0)
                .then_some(())
                .ok_or(format!("spawned {spawned}"))
        },
    );
    let tasks: TasksResponse = Client::new(daemon).tasks().expect("/api/v1/tasks");
    assert!(
        tasks.processes.iter().all(|p| p.pid != other.pid()),
        "a process that is not a tokio service was attached: {:?}",
        tasks.processes
    );
    // The self-metrics say so: scans ran, and at least the sleep copy was skipped.
    let samples = scrape(daemon);
    let value = |family: &str| sum(&samples, family, &[]);
    assert!(value("leakscope_host_scans_total") >= 1.0);
    assert!(value("leakscope_host_executables_skipped") >= 1.0);
    assert!(value("leakscope_host_scan_seconds") > 0.0);
    drop(other);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn max_processes_bounds_what_is_watched_and_frees_a_slot_on_exit() {
    if !ebpf_available("max processes") {
        return;
    }
    // Copies of the fixture in a directory of this test's own, outside the build tree the
    // other host-wide test scans.
    let dir = std::env::temp_dir().join(format!("leakscope-host-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = dir.join("axum-app");
    std::fs::copy(fixture("axum-app"), &app).expect("copying the fixture");
    let (first, _) = start_fixture(&app, &[]);
    let (second, _) = start_fixture(&app, &[]);
    let (_daemon, daemon) = start_daemon(&[
        "--all".into(),
        "--all-under".into(),
        dir.display().to_string(),
        "--max-processes".into(),
        "1".into(),
    ]);
    let state = |state: &str| {
        sum(
            &scrape(daemon),
            "leakscope_host_processes",
            &[("state", state)],
        )
    };
    eventually(
        "one watched, one over the limit",
        Duration::from_secs(30),
        || {
            let (watched, over) = (state("watched"), state("over_limit"));
            (watched == 1.0 && over == 1.0)
                .then_some(())
                .ok_or(format!("watched {watched}, over_limit {over}"))
        },
    );
    let tasks: TasksResponse = Client::new(daemon).tasks().expect("/api/v1/tasks");
    let watched = tasks.processes[0].pid;
    let (gone, waiting) = if watched == first.pid() {
        (first, second)
    } else {
        (second, first)
    };
    drop(gone);
    wait_attached(daemon, waiting.pid());
    assert_eq!(state("over_limit"), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}
