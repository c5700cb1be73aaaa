//! The integration tests' view of `leakscope-testkit`: the same helpers, panicking with
//! their reason (a test's failure message), plus the expectations several tests share.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use leakscope_testkit::openmetrics::{Sample, sum};
#[allow(unused_imports)]
pub use leakscope_testkit::{Client, Proc, workspace_root};

use leakscope_testkit as kit;

/// A fixture binary in `target/release` built by `cargo xtask fixtures`; panics with the
/// fix when it is missing.
pub fn fixture(name: &str) -> PathBuf {
    kit::fixture(&format!("release/{name}")).unwrap_or_else(|e| panic!("{e}"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether eBPF tests can run here. In CI they must: a skip there is a failure.
pub fn ebpf_available(test: &str) -> bool {
    if kit::is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test}: eBPF integration tests must run in CI, but this is not root");
    }
    eprintln!("{test}: SKIPPED: not root, so eBPF programs cannot be loaded (run as root)");
    false
}

/// Whether the outside tool `name` runs here (`probe` succeeds). In CI it must, since
/// `cargo xtask setup` installs it: a skip there is a failure.
pub fn tool_available(name: &str, probe: &mut std::process::Command) -> bool {
    let found = probe
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        if in_ci() {
            panic!("{name} is missing: `cargo xtask setup` installs it");
        }
        eprintln!("SKIPPED: {name} is not installed (`cargo xtask setup` installs it)");
    }
    found
}

/// Starts a fixture server and waits for its "listening on ADDR" line.
pub fn start_fixture(binary: &Path, args: &[&str]) -> (Proc, SocketAddr) {
    kit::start_fixture(binary, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `leakscope daemon` with `args` (rescanning every 0.2 s) and waits until /healthz
/// answers.
pub fn start_daemon(args: &[String]) -> (Proc, SocketAddr) {
    let mut args = args.to_vec();
    args.extend(["--rescan-seconds".to_string(), "0.2".to_string()]);
    let (daemon, client) = kit::start_daemon(env!("CARGO_BIN_EXE_leakscope").as_ref(), &args)
        .unwrap_or_else(|e| panic!("{e}"));
    (daemon, client.addr)
}

/// Starts `leakscope daemon` with `args` (rescanning every 0.2 s) and waits until
/// `ready(address)`.
pub fn start_daemon_until(
    args: &[String],
    ready: impl FnMut(SocketAddr) -> Result<(), String>,
) -> (Proc, SocketAddr) {
    let mut args = args.to_vec();
    args.extend(["--rescan-seconds".to_string(), "0.2".to_string()]);
    kit::start_daemon_until(
        env!("CARGO_BIN_EXE_leakscope").as_ref(),
        &args,
        kit::DaemonLog::Inherit,
        ready,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `leakscope daemon` with `args` (rescanning every 0.2 s) and `env` added to its
/// environment, and waits until /healthz answers.
pub fn start_daemon_env(args: &[String], env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let mut args = args.to_vec();
    args.extend(["--rescan-seconds".to_string(), "0.2".to_string()]);
    kit::start_daemon_with_env(
        env!("CARGO_BIN_EXE_leakscope").as_ref(),
        &args,
        env,
        kit::DaemonLog::Inherit,
        kit::healthz_answers,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The `one-task-type` fixture, driven by its stdin commands (`leak N`, `done N`, `tick N`,
/// `exec PATH ARGS...`), each answered `ok` (an exec answers nothing: the program is gone).
pub struct OneTaskType {
    pub app: Proc,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl OneTaskType {
    /// The spawn site of all its tasks.
    pub const SITE: &'static str = "one_task_type::main::{{closure}}::{{closure}}::{{closure}}";

    pub fn start() -> Self {
        Self::start_binary(&fixture("one-task-type"))
    }

    /// Starts `binary` (a copy of the fixture, or the fixture itself) and waits for `ready`.
    pub fn start_binary(binary: &Path) -> Self {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let app = Proc {
            child,
            name: binary.display().to_string(),
        };
        Self { app, stdin, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.app.pid()
    }

    /// Sends `command` and waits for its `ok`.
    pub fn command(&mut self, command: &str) {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "after {command}");
    }

    /// The next line the process prints (after an exec, the new program's).
    pub fn read_line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    /// Sends `command` without waiting for an answer (an exec gives none).
    pub fn send(&mut self, command: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{command}").unwrap();
    }
}

/// A daemon watching `pid` with `extra` arguments, once the process is attached.
pub fn watch(pid: u32, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["--pid".to_string(), pid.to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let (daemon, addr) = start_daemon(&args);
    wait_attached(addr, pid);
    (daemon, addr)
}

/// A daemon watching `pid` whose verdicts look at `window` seconds sampled every `sample`
/// (short, for tests), with exact heap tracking when `heap`; once the process is attached.
pub fn watch_verdicts(pid: u32, window: &str, sample: &str, heap: bool) -> (Proc, SocketAddr) {
    let mut args = vec![
        "--verdict-window-seconds",
        window,
        "--verdict-sample-seconds",
        sample,
    ];
    if heap {
        args.extend(["--heap", "exact"]);
    }
    watch(pid, &args)
}

/// GET that must succeed with 200.
pub fn get_ok(addr: SocketAddr, path: &str) -> String {
    Client::new(addr)
        .get_ok(path)
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// Opens a streaming response, reads its first bytes, then hangs up like an impatient client.
pub fn stream_then_disconnect(addr: SocketAddr, path: &str) {
    kit::stream_then_disconnect(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
}

/// The value of `family` for the series of process `pid` whose `site` label is exactly
/// `site` (summed over its other labels; 0 when absent).
pub fn site_value(samples: &[Sample], family: &str, pid: u32, site: &str) -> f64 {
    sum(
        samples,
        family,
        &[("pid", &pid.to_string()), ("site", site)],
    )
}

pub fn scrape(daemon: SocketAddr) -> Vec<Sample> {
    Client::new(daemon)
        .metrics()
        .unwrap_or_else(|e| panic!("scraping {daemon}: {e}"))
}

/// Waits until the daemon at `daemon` lists `pid` as attached.
pub fn wait_attached(daemon: SocketAddr, pid: u32) {
    kit::wait_attached(&Client::new(daemon), pid).unwrap_or_else(|e| panic!("{e}"));
}

/// Polls `check` until it returns Ok or the deadline passes; panics with the last reason.
pub fn eventually<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    kit::poll(what, timeout, check).unwrap_or_else(|e| panic!("{e}"))
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

/// A free loopback port.
pub fn free_port() -> u16 {
    kit::free_loopback_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port()
}

/// Steady loopback traffic to a fixture, until dropped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    /// GETs every route in `routes`, and reads then hangs up on every stream in
    /// `streams`, about five rounds a second, until dropped.
    pub fn start(addr: SocketAddr, routes: &[&'static str], streams: &[&'static str]) -> Self {
        let routes = routes.to_vec();
        let streams = streams.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let client = Client::new(addr);
            while !flag.load(Ordering::Relaxed) {
                for route in &routes {
                    client.get_ok(route).expect("fixture route answers");
                }
                for route in &streams {
                    stream_then_disconnect(addr, route);
                }
                // Pacing, not synchronisation: the load is "steady traffic".
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `connections` HTTP/1.1 keep-alive clients, each on one connection for its whole life,
/// requesting `path` about five times a second until dropped: the connection tasks of
/// steady clients, alive all along.
pub struct KeepAliveClients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl KeepAliveClients {
    pub fn start(addr: SocketAddr, connections: usize, path: &'static str) -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|_| {
                let flag = stop.clone();
                std::thread::spawn(move || {
                    let stream = std::net::TcpStream::connect(addr).expect("keep-alive connect");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    while !flag.load(Ordering::Relaxed) {
                        write!(writer, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            reader.read_line(&mut line).expect("keep-alive response");
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap_or(0);
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0u8; length];
                        reader.read_exact(&mut body).expect("keep-alive body");
                        // Pacing: a steady client, not a load test.
                        std::thread::sleep(Duration::from_millis(200));
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for KeepAliveClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The daemon's default `--census-seconds`: the first census runs at attach, so the tasks
/// from before attach must be in within this (polled, not slept).
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(10);

/// Polls until `site` of `pid` has (alive, alive before attach) == `expected`.
pub fn expect_alive(
    daemon: SocketAddr,
    pid: u32,
    site: &str,
    expected: (f64, f64),
    within: Duration,
) {
    eventually(
        &format!("{site}: (alive, alive before attach) == {expected:?}"),
        within,
        || {
            let samples = scrape(daemon);
            let got = (
                site_value(&samples, "leakscope_tasks_alive", pid, site),
                site_value(&samples, "leakscope_tasks_alive_before_attach", pid, site),
            );
            (got == expected)
                .then_some(())
                .ok_or(format!("got {got:?}"))
        },
    );
}

/// Uprobes attached through the links process `pid` holds, as the kernel describes each
/// link fd (`/proc/PID/fdinfo`: `link_type: perf`, `event_type: uprobe` or `uretprobe`).
pub fn uprobes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("the daemon's fdinfo")
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| {
            info.lines().any(|line| {
                line.strip_prefix("event_type:")
                    .is_some_and(|t| t.trim().contains("uprobe"))
            })
        })
        .count()
}

/// The heap fixture (`heap-app`, one of its allocator builds), driven through its stdin
/// protocol (see its `main.rs`).
pub struct HeapApp {
    pub proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeapApp {
    pub fn start(binary: PathBuf) -> Self {
        assert!(
            binary.exists(),
            "{} is missing: build fixtures first with `cargo xtask fixtures`",
            binary.display()
        );
        let mut child = Command::new(&binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "fixture said {line:?}");
        Self {
            proc: Proc {
                child,
                name: binary.display().to_string(),
            },
            stdin,
            stdout,
        }
    }

    /// Runs a command; returns what the fixture holds per callsite function, in bytes.
    pub fn command(&mut self, command: &str) -> BTreeMap<String, f64> {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let rest = line
            .trim()
            .strip_prefix("ok ")
            .unwrap_or_else(|| panic!("{command}: fixture said {line:?}"));
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (format!("heap_app::{k}"), v.parse().unwrap()))
            .collect()
    }
}

/// Polls until (spawned, completed, alive) of `site` in `pid` equal `expected`.
pub fn expect_site(daemon: SocketAddr, pid: u32, site: &str, expected: (f64, f64, f64)) {
    eventually(
        &format!("{site}: (spawned, completed, alive) == {expected:?}"),
        Duration::from_secs(30),
        || {
            let samples = scrape(daemon);
            let got = (
                site_value(&samples, "leakscope_tasks_spawned_total", pid, site),
                site_value(&samples, "leakscope_tasks_completed_total", pid, site),
                site_value(&samples, "leakscope_tasks_alive", pid, site),
            );
            (got == expected)
                .then_some(())
                .ok_or(format!("got {got:?}"))
        },
    );
}
