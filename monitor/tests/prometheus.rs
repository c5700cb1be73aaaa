//! The shipped Prometheus files, the way operators run them: the alert rules pass
//! `promtool check rules` and their own `promtool test rules` cases, and a real Prometheus
//! scraping a daemon attached to the leaky fixture sees the suspect series, takes the
//! alerts to `firing`, and answers every query of the Grafana dashboard with data.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("monitor/deploy").join(path)
}

/// `tool --version` runs here (in CI it must).
fn has(tool: &str) -> bool {
    tool_available(tool, Command::new(tool).arg("--version"))
}

fn promtool(args: &[&str], dir: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_own_tests() {
    if !has("promtool") {
        return;
    }
    let dir = deploy("prometheus");
    promtool(&["check", "rules", "leakscope-rules.yml"], &dir);
    promtool(&["test", "rules", "leakscope-rules.test.yml"], &dir);
}

/// Every PromQL expression of the dashboard, its `$instance` variable matching all.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/leakscope-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            target["expr"]
                .as_str()
                .expect("expr")
                .replace("$instance", ".*")
        })
        .collect()
}

/// `s` as a URL query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn prometheus_api(prometheus: SocketAddr, path: &str) -> Result<Value, String> {
    let body = Client::new(prometheus)
        .get_ok(path)
        .map_err(|e| e.to_string())?;
    let value: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    (value["status"] == "success")
        .then(|| value["data"].clone())
        .ok_or(format!("{path}: {body}"))
}

fn query(prometheus: SocketAddr, promql: &str) -> Result<Vec<Value>, String> {
    let data = prometheus_api(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    )?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// Starts a real Prometheus that scrapes `daemon` every second and evaluates the shipped
/// rules every second, their `for:` shortened to seconds.
fn start_prometheus(daemon: SocketAddr, dir: &Path) -> (Proc, SocketAddr) {
    let rules = std::fs::read_to_string(deploy("prometheus/leakscope-rules.yml")).unwrap();
    let shortened: String = rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 3s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("rules.yml"), shortened).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: leakscope\n    static_configs:\n      - targets: ['{daemon}']\n"
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting prometheus");
    let prometheus = Proc {
        child,
        name: "prometheus".into(),
    };
    let addr: SocketAddr = listen.parse().unwrap();
    eventually("prometheus is ready", Duration::from_secs(30), || {
        Client::new(addr)
            .get_ok("/-/ready")
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    (prometheus, addr)
}

#[test]
fn a_real_prometheus_fires_the_leak_alerts_and_answers_every_dashboard_query() {
    if !ebpf_available("prometheus") || !has("prometheus") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = watch_verdicts(pid, "10", "0.5", true);
    let _traffic = Traffic::start(addr, &["/leak/forever", "/state/leak", "/ok/bounded"], &[]);
    let dir = std::env::temp_dir().join(format!("leakscope-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (_prometheus, prometheus) = start_prometheus(daemon, &dir);

    let leak_forever = "axum_app::leak_forever::{{closure}}::{{closure}}";
    let state_leak = "axum_app::state_leak::{{closure}}::{{closure}}";
    eventually(
        "Prometheus has the suspect series",
        Duration::from_secs(90),
        || {
            let series: BTreeSet<String> = query(prometheus, "leakscope_leak_suspect")?
                .iter()
                .filter_map(|r| r["metric"]["site"].as_str().map(str::to_string))
                .collect();
            (series.contains(leak_forever) && series.contains(state_leak))
                .then_some(())
                .ok_or(format!("suspect series: {series:?}"))
        },
    );
    eventually(
        "the task and heap leak alerts fire",
        Duration::from_secs(60),
        || {
            let alerts = prometheus_api(prometheus, "/api/v1/alerts")?;
            let firing: BTreeSet<(String, String)> = alerts["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["state"] == "firing")
                .map(|a| {
                    (
                        a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                        a["labels"]["site"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            let wanted = [
                ("LeakscopeTaskLeak".to_string(), leak_forever.to_string()),
                ("LeakscopeHeapLeak".to_string(), state_leak.to_string()),
            ];
            wanted
                .iter()
                .all(|w| firing.contains(w))
                .then_some(())
                .ok_or(format!("firing: {firing:?}"))
        },
    );
    for promql in dashboard_queries() {
        eventually(
            &format!("dashboard query {promql} returns data"),
            Duration::from_secs(30),
            || {
                let result = query(prometheus, &promql)?;
                (!result.is_empty())
                    .then_some(())
                    .ok_or("empty".to_string())
            },
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
