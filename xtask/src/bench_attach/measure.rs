//! One measured run of `leakscope inspect` or of `leakscope daemon --pid` until attached,
//! with the phases the daemon logs under `leakscope::timing` (see `monitor::timing`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use leakscope_testkit::{Client, Proc, free_loopback_addr};

/// One piece of work's total and its phases, in milliseconds.
pub type Work = (f64, Vec<(String, f64)>);

/// What the timing lines of one run said, per piece of work (`analysis`, `daemon start`,
/// `heap tables`, …).
pub type Breakdown = BTreeMap<String, Work>;

/// One run: its wall time in seconds, the CPU time it took (wall time on a busy machine
/// is partly waiting for a core; 10 ms clock ticks), and the daemon's own account of it.
pub struct Run {
    pub seconds: f64,
    pub cpu_seconds: f64,
    /// For a daemon: from SIGTERM until it exited, having detached every probe.
    pub detach_seconds: Option<f64>,
    pub breakdown: Breakdown,
}

/// CPU time of this process's children that have been waited for (`cutime` + `cstime`
/// of `/proc/self/stat`), in seconds.
fn children_cpu_seconds() -> anyhow::Result<f64> {
    // Fields 16 and 17; USER_HZ ticks.
    Ok(crate::bench::stat_ticks("/proc/self/stat", &[13, 14])? as f64 / 100.0)
}

/// Only the timing lines, and the rest of the log at warn level.
const LOG_FILTER: &str = "warn,leakscope::timing=debug";

/// The timing lines in a log: `[… DEBUG leakscope::timing] WHAT: TOTAL ms = P MS + P MS`.
/// `WHAT` loses its object (`analysis of /proc/1/exe` → `analysis`) so runs compare.
pub fn breakdown(log: &str) -> Breakdown {
    let mut out = Breakdown::new();
    for line in log.lines() {
        let Some((_, message)) = line.split_once("leakscope::timing] ") else {
            continue;
        };
        let Some((what, rest)) = message.rsplit_once(": ") else {
            continue;
        };
        let Some((total, phases)) = rest.split_once(" ms = ") else {
            continue;
        };
        let what = what.split(" of ").next().unwrap_or(what).to_string();
        let phases = phases
            .split(" + ")
            .filter_map(|p| {
                let (name, ms) = p.rsplit_once(' ')?;
                Some((name.to_string(), ms.parse().ok()?))
            })
            .collect();
        out.insert(what, (total.parse().unwrap_or(f64::NAN), phases));
    }
    out
}

/// `leakscope inspect BINARY`, its wall time.
pub fn inspect(leakscope: &Path, binary: &Path) -> anyhow::Result<Run> {
    let cpu_before = children_cpu_seconds()?;
    let started = Instant::now();
    let out = Command::new(leakscope)
        .env("RUST_LOG", LOG_FILTER)
        .arg("inspect")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .context("running leakscope inspect")?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = children_cpu_seconds()? - cpu_before;
    if !out.status.success() {
        bail!(
            "leakscope inspect {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Run {
        seconds,
        cpu_seconds,
        detach_seconds: None,
        breakdown: breakdown(&String::from_utf8_lossy(&out.stderr)),
    })
}

/// How often the daemon is asked whether it has attached: the resolution of the wall time.
const POLL: Duration = Duration::from_millis(5);

/// How long a daemon may take to attach, or to fail: a daemon that cannot attach removes
/// the probes it placed before it exits and says why, minutes for thousands of uprobes.
const ATTACH_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// `leakscope daemon --pid PID EXTRA…` from its start until its API lists `pid` as
/// attached (the daemon serves its API only once every `--pid` is attached, so the first
/// answer is usually already yes), then stopped with SIGTERM as a service manager would,
/// and waited for: its probes are gone before the next run places them again.
pub fn attach(leakscope: &Path, pid: u32, extra: &[&str], log: &Path) -> anyhow::Result<Run> {
    let listen = free_loopback_addr().map_err(anyhow::Error::msg)?;
    let log_file = std::fs::File::create(log)?;
    let started = Instant::now();
    let child = Command::new(leakscope)
        .env("RUST_LOG", LOG_FILTER)
        .args(["daemon", "--pid", &pid.to_string(), "--listen"])
        .arg(listen.to_string())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .context("starting leakscope daemon")?;
    let mut daemon = Proc {
        child,
        name: "leakscope daemon".into(),
    };
    let client = Client::new(listen);
    let deadline = started + ATTACH_DEADLINE;
    let seconds = loop {
        if let Ok(tasks) = client.tasks()
            && tasks.processes.iter().any(|p| p.pid == pid && p.attached)
        {
            break started.elapsed().as_secs_f64();
        }
        if let Some(status) = daemon.child.try_wait()? {
            bail!(
                "leakscope daemon exited with {status} before attaching: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "pid {pid} not attached after {ATTACH_DEADLINE:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(POLL);
    };
    let cpu_seconds = crate::bench::process_cpu_ns(daemon.pid())? as f64 / 1e9;
    let stopping = Instant::now();
    Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .context("running kill")?;
    daemon.child.wait()?;
    Ok(Run {
        seconds,
        cpu_seconds,
        detach_seconds: Some(stopping.elapsed().as_secs_f64()),
        breakdown: breakdown(&std::fs::read_to_string(log)?),
    })
}

#[cfg(test)]
mod tests {
    use super::breakdown;

    #[test]
    fn reads_timing_lines_only() {
        let log = "[2026-12-06T21:00:00Z WARN  leakscope] something\n\
                   [2026-12-06T21:00:00Z DEBUG leakscope::timing] analysis of /proc/7/exe: \
                   812.5 ms = load 40.0 + vtables 100.5\n";
        let b = breakdown(log);
        assert_eq!(b.len(), 1);
        let (total, phases) = &b["analysis"];
        assert_eq!(*total, 812.5);
        assert_eq!(
            phases,
            &[("load".to_string(), 40.0), ("vtables".to_string(), 100.5)]
        );
    }
}
