//! The shipped systemd unit, checked the way it can be without systemd as PID 1: it passes
//! `systemd-analyze verify`, its offline security exposure stays low, and the daemon runs
//! and attaches with exactly the capabilities the unit grants.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn unit_text() -> String {
    std::fs::read_to_string(workspace_root().join("monitor/deploy/systemd/leakscope.service"))
        .expect("the unit file")
}

/// The unit as installed, its ExecStart pointing at this build.
fn installed_copy() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("leakscope-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("leakscope.service");
    std::fs::write(
        &unit,
        unit_text().replace("/usr/local/bin/leakscope", env!("CARGO_BIN_EXE_leakscope")),
    )
    .unwrap();
    unit
}

fn systemd_analyze_available() -> bool {
    tool_available(
        "systemd-analyze",
        Command::new("systemd-analyze").arg("--version"),
    )
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    if !systemd_analyze_available() {
        return;
    }
    let unit = installed_copy();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("leakscope.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    // systemd rates 0-10; below 4 is "OK". A root daemon with no sandboxing is 9.6.
    assert!(exposure < 4.0, "exposure {exposure}:\n{text}");
}

#[test]
fn the_daemon_attaches_with_exactly_the_units_capabilities() {
    if !ebpf_available("unit capabilities") {
        return;
    }
    let unit = unit_text();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("a capability bounding set")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Proc {
        child: Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_leakscope"))
            .args(["daemon", "--heap", "exact", "--listen", &listen])
            .args(["--pid", &app.pid().to_string()])
            .spawn()
            .expect("starting the daemon under setpriv"),
        name: "leakscope (unit capabilities)".into(),
    };
    wait_attached(listen.parse().unwrap(), app.pid());
    drop(daemon);
}

/// With one of the unit's capabilities removed, `leakscope doctor` and the daemon agree: a
/// capability the doctor calls required makes the daemon refuse to start, naming it.
#[test]
fn without_a_required_capability_doctor_and_daemon_name_it() {
    if !ebpf_available("capability removed") {
        return;
    }
    let caps = unit_capabilities();
    let mut required = 0;
    for removed in &caps {
        let kept: Vec<String> = caps
            .iter()
            .filter(|c| *c != removed)
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        let setpriv = |args: &[&str]| {
            Command::new("setpriv")
                .arg(format!("--bounding-set=-all,{}", kept.join(",")))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_leakscope"))
                .args(args)
                .output()
                .expect("running setpriv")
        };
        let doctor = setpriv(&["doctor"]);
        let report = String::from_utf8_lossy(&doctor.stdout).to_string();
        let named = format!("FAIL CAP_{removed}: missing");
        if !report.contains(&named) {
            assert!(doctor.status.success(), "without CAP_{removed}:\n{report}");
            continue;
        }
        required += 1;
        assert!(!doctor.status.success(), "without CAP_{removed}:\n{report}");
        // Host-wide under a path nothing runs from: nothing to analyse before the check.
        let daemon = setpriv(&["daemon", "--all", "--all-under", "/leakscope-nothing-here"]);
        let error = String::from_utf8_lossy(&daemon.stderr);
        assert!(
            !daemon.status.success() && error.contains(&format!("CAP_{removed}: missing")),
            "the daemon without CAP_{removed}: {error}"
        );
    }
    // BPF, PERFMON and SYS_ADMIN at least are needed on every kernel leakscope supports.
    assert!(
        required >= 3,
        "only {required} capabilities were found required"
    );
}

/// The capability names a line of the unit or the manifest grants, as `BPF`, `PERFMON`, ...
fn unit_capabilities() -> std::collections::BTreeSet<String> {
    unit_text()
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("a capability bounding set")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect()
}

/// checkov passes every manifest: no failed check that is not skipped in the manifest
/// with a written reason.
#[test]
fn the_manifests_pass_checkov_but_for_reasoned_skips() {
    if !tool_available("checkov", Command::new("checkov").arg("--version")) {
        return;
    }
    let dir = workspace_root().join("monitor/deploy/kubernetes");
    let out = Command::new("checkov")
        .args([
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--skip-download",
        ])
        .arg("-d")
        .arg(&dir)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let results = &report["results"];
    let failed = results["failed_checks"].as_array().expect("failed_checks");
    let ids = |checks: &[serde_json::Value]| -> Vec<String> {
        checks
            .iter()
            .map(|c| format!("{} {}", c["check_id"], c["resource"]))
            .collect()
    };
    assert!(failed.is_empty(), "checkov failed: {:?}", ids(failed));
    assert!(
        results["passed_checks"]
            .as_array()
            .is_some_and(|p| p.len() > 50)
    );
    for skipped in results["skipped_checks"]
        .as_array()
        .expect("skipped_checks")
    {
        let reason = skipped["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or("");
        assert!(
            reason.split_whitespace().count() >= 5,
            "{} is skipped without a reason: {reason:?}",
            skipped["check_id"]
        );
    }
}

#[test]
fn the_daemonset_validates_and_grants_what_the_unit_does() {
    let manifest = workspace_root().join("monitor/deploy/kubernetes/leakscope.yaml");
    if !tool_available(
        "kubernetes-validate",
        Command::new("python3").args(["-m", "kubernetes_validate", "--version"]),
    ) {
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "-k", "1.30.0", "--strict"])
        .arg(&manifest)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !text.contains("ERROR"), "{text}");
    for kind in ["namespace", "serviceaccount", "daemonset"] {
        assert!(
            text.contains(&format!("passed for resource {kind}/leakscope")),
            "{text}"
        );
    }
    // The container gets exactly the unit's capabilities, and sees the host's processes.
    let yaml = std::fs::read_to_string(&manifest).unwrap();
    let added: std::collections::BTreeSet<String> = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .expect("capabilities added")
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_string())
        .collect();
    assert_eq!(added, unit_capabilities());
    assert!(yaml.contains("hostPID: true") && yaml.contains("privileged: false"));
    assert!(
        yaml.contains(r#"args: ["daemon", "--all""#),
        "host-wide mode"
    );
    // Beyond loopback, so behind the web config: mounted where --web-config points, and
    // probed over HTTPS.
    let web_config = yaml
        .split(r#""--web-config", ""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("--web-config in the args");
    let mounted = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mountPath: "))
        .any(|mount| web_config.starts_with(&format!("{mount}/")));
    assert!(mounted, "{web_config} is not under a volume mount");
    assert_eq!(yaml.matches("scheme: HTTPS").count(), 2, "both probes");
}

#[test]
fn a_config_file_sets_what_the_flags_do_and_flags_win() {
    if !ebpf_available("config file") {
        return;
    }
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let dir = std::env::temp_dir().join(format!("leakscope-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("leakscope.toml");
    std::fs::write(
        &config,
        format!(
            "# as an operator writes it\nlisten = \"127.0.0.1:1\"\nheap = \"exact\"\n\n\
             [targets]\npids = [{}]\n\n[verdicts]\nwindow_seconds = 30\nsample_seconds = 2\n",
            app.pid()
        ),
    )
    .unwrap();
    // --listen on the command line wins over the file's (unusable) port 1.
    let (_daemon, daemon) = start_daemon(&["--config".into(), config.display().to_string()]);
    wait_attached(daemon, app.pid());
    let client = Client::new(daemon);
    assert!(
        client.heap().expect("/api/v1/heap").enabled,
        "heap = exact from the file"
    );
    let sites = client.sites().expect("/api/v1/sites");
    assert_eq!((sites.window_seconds, sites.sample_seconds), (30.0, 2.0));

    // A mistake: one line, with the file, line and column, and the daemon does not start.
    std::fs::write(&config, "heap = \"exact\"\n\n[verdicts]\nwindow = 30\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .args(["daemon", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:4:1: unknown field `window`", config.display())),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_prometheus_rule_carries_exactly_the_shipped_rules() {
    // PyYAML comes with kubernetes-validate (`cargo xtask setup`).
    let compare = r#"
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))["groups"]
operator = yaml.safe_load(open(sys.argv[2]))
assert operator["kind"] == "PrometheusRule", operator["kind"]
assert operator["spec"]["groups"] == rules, "the PrometheusRule differs from leakscope-rules.yml"
print(sum(len(g["rules"]) for g in rules))
"#;
    let deploy = workspace_root().join("monitor/deploy");
    let out = Command::new("python3")
        .args(["-c", compare])
        .arg(deploy.join("prometheus/leakscope-rules.yml"))
        .arg(deploy.join("kubernetes/prometheusrule.yaml"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
}

/// The kernel unregisters uprobes one grace period at a time (about 80 ms each here), so
/// the bound grows with the hook count: about 2.5 s for this fixture's 30 task hooks, 4 s
/// with its heap hooks too.
const STOP_BOUND: Duration = Duration::from_secs(10);

#[test]
fn sigterm_detaches_and_exits_0() {
    if !ebpf_available("sigterm") {
        return;
    }
    let (app, _) = start_fixture(&fixture("axum-app"), &[]);
    let (mut daemon, _) = watch(app.pid(), &["--heap", "exact"]);
    let pid = daemon.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = eventually("the daemon exits", STOP_BOUND, || {
        daemon
            .child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or("still running".to_string())
    });
    assert!(status.success(), "{status}");
}

#[test]
fn check_config_validates_without_starting() {
    let dir = std::env::temp_dir().join(format!("leakscope-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "heap = \"sampled\"\n[targets]\nall = true\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Sampled"));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[targets]\npids = [\"x\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{}:2:", bad.display())),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
