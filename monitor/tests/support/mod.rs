//! Shared pieces of the integration tests: fixture and daemon processes that are killed when
//! dropped, a loopback HTTP client, an OpenMetrics reader, and polling with a deadline.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fixture binary built by `cargo xtask fixtures`; panics with the fix when it is missing.
pub fn fixture(name: &str) -> PathBuf {
    let path = workspace_root().join("target/release").join(name);
    assert!(
        path.exists(),
        "fixture {} is missing: build fixtures first with `cargo xtask fixtures` \
         (`cargo xtask test` does it)",
        path.display()
    );
    path
}

/// Whether eBPF tests can run here. In CI they must: a skip there is a failure.
pub fn ebpf_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: eBPF integration tests must run in CI, but this is not root");
    }
    eprintln!("{test}: SKIPPED: not root, so eBPF programs cannot be loaded (run as root)");
    false
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a fixture server and waits for its "listening on ADDR" line.
pub fn start_fixture(binary: &PathBuf, args: &[&str]) -> (Proc, SocketAddr) {
    let mut child = Command::new(binary)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the fixture's first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("fixture printed {line:?}, expected 'listening on ADDR'"));
    (
        Proc {
            child,
            name: binary.display().to_string(),
        },
        addr,
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts `leakscope daemon` with `args` and waits until /healthz answers.
pub fn start_daemon(args: &[String]) -> (Proc, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .arg("daemon")
        .args(args)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--rescan-seconds")
        .arg("0.2")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting leakscope");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("polling leakscope") {
            panic!(
                "leakscope daemon exited early with {status}: probes could not be loaded or attached"
            );
        }
        if http_get(listen, "/healthz").is_ok_and(|(status, _)| status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leakscope /healthz did not answer within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (
        Proc {
            child,
            name: "leakscope".into(),
        },
        listen,
    )
}

/// A plain HTTP/1.1 GET over loopback; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    parse_response(&response)
}

fn parse_response(response: &str) -> std::io::Result<(u16, String)> {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// GET that must succeed with 200.
pub fn get_ok(addr: SocketAddr, path: &str) -> String {
    match http_get(addr, path) {
        Ok((200, body)) => body,
        other => panic!("GET {path} on {addr}: {other:?}"),
    }
}

/// Opens a streaming response, reads its first bytes, then hangs up like an impatient client.
pub fn stream_then_disconnect(addr: SocketAddr, path: &str) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data") {
        let n = stream.read(&mut buf).expect("reading the stream");
        assert!(n > 0, "stream {path} closed before sending data");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
}

/// One sample of an OpenMetrics family: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses OpenMetrics/Prometheus text (label values without escaped quotes suffice here).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                let end = after.find('"')?;
                map.insert(
                    key.trim_start_matches(',').to_string(),
                    after[..end].to_string(),
                );
                rest = &after[end + 1..];
            }
            Some(Sample {
                name: name.to_string(),
                labels: map,
                value,
            })
        })
        .collect()
}

/// Scrapes `/metrics` and returns the value of `family` for the series whose `site` label is
/// exactly `site` and `pid` is `pid` (0 when absent).
pub fn site_value(samples: &[Sample], family: &str, pid: u32, site: &str) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == family
                && s.labels.get("pid").map(String::as_str) == Some(&pid.to_string())
                && s.labels.get("site").map(String::as_str) == Some(site)
        })
        .fold(0.0, |sum, s| sum + s.value)
}

pub fn scrape(daemon: SocketAddr) -> Vec<Sample> {
    parse_metrics(&get_ok(daemon, "/metrics"))
}

/// Waits until the daemon at `daemon` reports exactly one attached process.
pub fn wait_attached(daemon: SocketAddr, pid: u32) {
    // Per pid, not a count: an `--exe` daemon may also attach to other tests' processes
    // running the same fixture, and a process counts only once all its probes are in.
    eventually(
        &format!("pid {pid} attached"),
        Duration::from_secs(30),
        || {
            let (_, body) = http_get(daemon, "/api/v1/tasks").map_err(|e| e.to_string())?;
            let tasks: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let attached = tasks["processes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["pid"] == pid && p["attached"] == true);
            attached
                .then_some(())
                .ok_or(format!("processes: {}", tasks["processes"]))
        },
    );
}

/// Polls `check` until it returns Ok or the deadline passes; panics with the last reason.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(reason) if Instant::now() >= deadline => {
                panic!("{what}: still not true after {timeout:?}: {reason}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Live bytes per (site, task_site) from `/metrics`, for one pid.
pub fn live_bytes(daemon: SocketAddr, pid: u32) -> BTreeMap<(String, String), f64> {
    scrape(daemon)
        .into_iter()
        .filter(|s| {
            s.name == "leakscope_heap_live_bytes" && s.labels.get("pid") == Some(&pid.to_string())
        })
        .map(|s| {
            (
                (s.labels["site"].clone(), s.labels["task_site"].clone()),
                s.value,
            )
        })
        .collect()
}

/// The seed's third pattern in the axum fixture after `requests` calls each of `/state/leak`
/// and `/state/ok` (256 KiB pushed per call): the leaking handler's series (as site or task
/// site) hold at least 90 % of what it pushed, the remedy's under 10 %.
pub fn expect_state_leak_found(daemon: SocketAddr, pid: u32, requests: usize) {
    let pushed = (requests * 256 * 1024) as f64;
    let leak = "axum_app::state_leak::{{closure}}::{{closure}}";
    let remedy = "axum_app::state_ok::{{closure}}::{{closure}}";
    eventually(
        "the leaking handler holds what it pushed",
        Duration::from_secs(30),
        || {
            let live = live_bytes(daemon, pid);
            let held_by = |handler: &str| -> f64 {
                live.iter()
                    .filter(|((site, task), _)| site == handler || task == handler)
                    .map(|(_, v)| v)
                    .sum()
            };
            let (leaked, remedied) = (held_by(leak), held_by(remedy));
            (leaked >= 0.9 * pushed && remedied < 0.1 * pushed)
                .then_some(())
                .ok_or(format!(
                    "leak {leaked} of {pushed} pushed, remedy {remedied}: {live:?}"
                ))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_samples() {
        let samples = parse_metrics(
            "# TYPE x gauge\nleakscope_tasks_alive{pid=\"1\",exe=\"a\",site=\"m::f::{{closure}}\"} 3\nleakscope_events_total 5\n# EOF\n",
        );
        assert_eq!(samples.len(), 2);
        assert_eq!(
            site_value(&samples, "leakscope_tasks_alive", 1, "m::f::{{closure}}"),
            3.0
        );
    }
}
