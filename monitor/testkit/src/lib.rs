//! What the daemon's integration tests, `cargo xtask bench` and `cargo xtask demo` share:
//! child processes killed when dropped, the fixture binaries, a daemon started on a free
//! loopback port and waited for, loopback clients that act like users, and polling with a
//! deadline instead of sleeps.
//!
//! Functions return errors rather than panic, so xtask can report them; tests `expect` them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use leakscope_api::client::{Client, ClientError};
pub use leakscope_api::openmetrics::{self, Sample};
pub use leakscope_api::types;

/// The workspace root (this crate lives in `monitor/testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testkit lives two levels below the workspace root")
        .to_path_buf()
}

/// A fixture binary built by `cargo xtask fixtures` under `target/`, e.g. `release/axum-app`.
pub fn fixture(relative: &str) -> Result<PathBuf, String> {
    let path = workspace_root().join("target").join(relative);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "fixture {} is missing: build fixtures first with `cargo xtask fixtures` \
             (`cargo xtask test` does it)",
            path.display()
        ))
    }
}

/// Root, read without libc: the effective uid is the second field of `Uid:`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
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

/// Spawns `command`, again while its executable is "busy": a test that has just copied a
/// fixture cannot exec the copy while another thread's fork still holds the copy's write
/// descriptor, until that child execs (ETXTBSY; rust-lang/rust#114554).
pub fn spawn_fresh_copy(command: &mut Command) -> std::io::Result<Child> {
    const ETXTBSY: i32 = 26;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Starts a fixture server and waits for its "listening on ADDR" line.
pub fn start_fixture(binary: &Path, args: &[&str]) -> Result<(Proc, SocketAddr), String> {
    let mut child = spawn_fresh_copy(Command::new(binary).args(args).stdout(Stdio::piped()))
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let stdout = child.stdout.take();
    let proc = Proc {
        child,
        name: binary.display().to_string(),
    };
    let mut line = String::new();
    BufReader::new(stdout.ok_or("fixture stdout not piped")?)
        .read_line(&mut line)
        .map_err(|e| format!("reading {}'s first line: {e}", proc.name))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            format!(
                "{} printed {line:?}, expected 'listening on ADDR'",
                proc.name
            )
        })?;
    Ok((proc, addr))
}

/// A loopback address nobody listens on yet.
pub fn free_loopback_addr() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// Where a daemon started by these helpers logs (its stderr).
#[derive(Debug, Clone, Copy)]
pub enum DaemonLog<'a> {
    /// The caller's stderr (a test's output).
    Inherit,
    Discard,
    /// Appended to this file.
    File(&'a std::fs::File),
}

impl DaemonLog<'_> {
    fn stdio(self) -> Result<Stdio, String> {
        Ok(match self {
            Self::Inherit => Stdio::inherit(),
            Self::Discard => Stdio::null(),
            Self::File(file) => Stdio::from(file.try_clone().map_err(|e| e.to_string())?),
        })
    }
}

/// Starts `leakscope daemon ARGS --listen <free port>` and waits until `/healthz` answers;
/// fails if the daemon exits first (probes refused, bad target) or does not answer in 30 s.
pub fn start_daemon(leakscope: &Path, args: &[String]) -> Result<(Proc, Client), String> {
    start_daemon_logging(leakscope, args, DaemonLog::Inherit)
}

/// [`start_daemon`], with the daemon's log (its stderr) going to `log`.
pub fn start_daemon_logging(
    leakscope: &Path,
    args: &[String],
    log: DaemonLog<'_>,
) -> Result<(Proc, Client), String> {
    let (daemon, listen) = start_daemon_until(leakscope, args, log, healthz_answers)?;
    Ok((daemon, Client::new(listen)))
}

/// The readiness of a daemon without TLS: `/healthz` answers 200.
pub fn healthz_answers(listen: SocketAddr) -> Result<(), String> {
    match Client::new(listen).get("/healthz") {
        Ok((200, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// Starts `leakscope daemon ARGS --listen <free port>`, its log going to `log`, and waits
/// until `ready(address)` (a daemon behind TLS is not asked in plain HTTP).
pub fn start_daemon_until(
    leakscope: &Path,
    args: &[String],
    log: DaemonLog<'_>,
    ready: impl FnMut(SocketAddr) -> Result<(), String>,
) -> Result<(Proc, SocketAddr), String> {
    start_daemon_with_env(leakscope, args, &[], log, ready)
}

/// [`start_daemon_until`], with `env` added to the daemon's environment (test-only
/// settings such as `LEAKSCOPE_TEST_RING_BYTES`); fails if the daemon exits first or is
/// not ready in 30 s.
///
/// The port is free when chosen but may be taken before the daemon binds it (tests run in
/// parallel): a daemon that exits is started again on another port, twice at most; its
/// last failure is the error.
pub fn start_daemon_with_env(
    leakscope: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: DaemonLog<'_>,
    mut ready: impl FnMut(SocketAddr) -> Result<(), String>,
) -> Result<(Proc, SocketAddr), String> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listen = free_loopback_addr()?;
        let child = Command::new(leakscope)
            .envs(env.iter().copied())
            .arg("daemon")
            .args(args)
            .arg("--listen")
            .arg(listen.to_string())
            .stdout(Stdio::inherit())
            .stderr(log.stdio()?)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", leakscope.display()))?;
        let mut daemon = Proc {
            child,
            name: "leakscope".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.try_wait().map_err(|e| e.to_string())? {
                if attempt < ATTEMPTS {
                    break;
                }
                return Err(format!(
                    "leakscope daemon exited early with {status} ({attempt} attempts): its \
                     log says why"
                ));
            }
            match ready(listen) {
                Ok(()) => return Ok((daemon, listen)),
                Err(reason) if Instant::now() >= deadline => {
                    return Err(format!("leakscope is not ready after 30 s: {reason}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// Waits until the daemon lists `pid` as attached (all its probes in place). Per pid, not a
/// count: an `--exe` daemon may also attach to other processes running the same binary.
pub fn wait_attached(daemon: &Client, pid: u32) -> Result<(), String> {
    poll(
        &format!("pid {pid} attached"),
        Duration::from_secs(30),
        || {
            let tasks = daemon.tasks().map_err(|e| e.to_string())?;
            tasks
                .processes
                .iter()
                .any(|p| p.pid == pid && p.attached)
                .then_some(())
                .ok_or(format!("processes: {:?}", tasks.processes))
        },
    )
}

/// Polls `check` every 100 ms until it returns Ok or `timeout` passes; the error then says
/// what was awaited and the last reason it was not true.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(reason) if Instant::now() >= deadline => {
                return Err(format!(
                    "{what}: still not true after {timeout:?}: {reason}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Opens a streaming response, reads until its first `data` line, then hangs up like an
/// impatient client.
pub fn stream_then_disconnect(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data") {
        // A signal interrupts a socket read with a timeout with EINTR even under
        // SA_RESTART (seen once in a 12-minute soak, sender unknown): read again, as
        // `read_exact` would.
        let n = match stream.read(&mut buf) {
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "stream {path} closed before sending data"
            )));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
