//! Running settings: SIGHUP reads the config file again and applies the rules that can
//! change while running (a bad file keeps the running settings), and `--log-format json`
//! writes one JSON object per log line, for log pipelines.

mod support;

use std::time::Duration;

use leakscope_testkit::types::TasksResponse;
use support::*;

/// The pids the daemon lists (an error, polled again, while it is busy detaching).
fn attached(daemon: std::net::SocketAddr) -> Result<Vec<u32>, String> {
    let tasks: TasksResponse = Client::new(daemon)
        .tasks()
        .map_err(|e| format!("/api/v1/tasks: {e}"))?;
    Ok(tasks.processes.iter().map(|p| p.pid).collect())
}

#[test]
fn sighup_applies_new_rules_and_a_bad_file_keeps_the_running_ones() {
    if !ebpf_available("reload") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let under = workspace_root().join("target").display().to_string();
    let rules = |exclude: &str| {
        format!("[targets]\nall = true\nall_under = {under:?}\nexclude = [{exclude}]\n")
    };
    std::fs::write(&config, rules("")).unwrap();
    let (service, _) = start_fixture(&fixture("axum-app"), &[]);
    let log = dir.path().join("daemon.log");
    let (daemon, client) = leakscope_testkit::start_daemon_logging(
        env!("CARGO_BIN_EXE_leakscope").as_ref(),
        &[
            "--config".into(),
            config.display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--rescan-seconds".into(),
            "0.2".into(),
        ],
        leakscope_testkit::DaemonLog::File(&std::fs::File::create(&log).unwrap()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = client.addr;
    wait_attached(addr, service.pid());
    let hangup = || {
        // SAFETY: sending a signal to the daemon child, which is alive (owned by `daemon`).
        assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) }, 0);
    };

    // A rule that excludes the service: it is detached.
    std::fs::write(&config, rules("\"exe=**/axum-app\"")).unwrap();
    hangup();
    eventually(
        "the excluded service is detached",
        Duration::from_secs(10),
        || {
            let pids = attached(addr)?;
            (!pids.contains(&service.pid()))
                .then_some(())
                .ok_or(format!("attached: {pids:?}"))
        },
    );

    // A broken file: the daemon says so and keeps running with the rules it has.
    std::fs::write(&config, "[targets]\nall = tru\n").unwrap();
    hangup();
    eventually("the bad reload is logged", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        text.contains("keeping the running settings")
            .then_some(())
            .ok_or("not yet".to_string())
    });
    assert!(
        Client::new(addr).get_ok("/healthz").is_ok(),
        "the daemon stopped"
    );

    // Back without the rule: attached again.
    std::fs::write(&config, rules("")).unwrap();
    hangup();
    wait_attached(addr, service.pid());

    // Every log line is one JSON object with a level and a message.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 4, "{text}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            value["level"].is_string() && value["msg"].is_string(),
            "{line}"
        );
    }
}
