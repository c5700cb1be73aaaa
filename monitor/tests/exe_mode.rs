//! `--exe` mode, in a test binary of its own: probes attached while another process tears
//! its uprobes down (the other tests' daemons being killed) were seen, on this 6.18 kernel,
//! to stay silent about one time in three; alone, never in dozens of runs. cargo runs test
//! binaries one after another, so this one attaches with nothing else going on.

mod support;

use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn exe_mode_follows_processes_started_later() {
    if !ebpf_available("exe_mode_follows_processes_started_later") {
        return;
    }
    // A private copy (its own inode), so fixtures of tests running in parallel are not
    // attached too. Copies of earlier runs are removed now rather than at the end of each
    // run: deleting a file right as the uprobes on it are torn down (the daemon is killed)
    // and creating the next copy at once was seen to leave the new copy's probes silent
    // (the kernel reusing the freed inode while the old uprobes were still being freed).
    let dir = workspace_root().join("target");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("exe-mode-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let binary = dir.join(format!("exe-mode-{}", std::process::id()));
    std::fs::copy(fixture("axum-app"), &binary).expect("copying the fixture");
    let (_daemon, daemon) = start_daemon(&["--exe".into(), binary.display().to_string()]);
    let (app, addr) = start_fixture(&binary, &[]);
    wait_attached(daemon);
    for _ in 0..3 {
        get_ok(addr, "/leak/forever");
    }
    let pid = app.pid();
    let site = "axum_app::leak_forever::{{closure}}::{{closure}}";
    eventually("3 leaked tasks counted", DEADLINE, || {
        let samples = scrape(daemon);
        let got = (
            site_value(&samples, "leakscope_tasks_spawned_total", pid, site),
            site_value(&samples, "leakscope_tasks_alive", pid, site),
        );
        (got == (3.0, 3.0)).then_some(()).ok_or(format!("{got:?}"))
    });
}
