//! `cargo xtask soak --minutes N`: the remedied axum fixture under bounded loopback load for N
//! minutes, watched all along by one steady daemon (`--heap exact`) while churn daemons
//! attach, detach (SIGTERM), get SIGKILLed and start again on it in a loop.
//!
//! Fails when: the fixture dies; any response differs from an unmonitored run's for the same
//! request (status and body); a churn daemon does not attach or leaves a BPF program or link
//! behind once it is gone (the ids it held, read from its `/proc/PID/fdinfo`, must vanish
//! from `bpftool prog/link show`); the steady daemon's RSS keeps growing (least-squares
//! slope over the second half of a long soak above [`MAX_RSS_SLOPE_KIB_PER_MIN`]; a short
//! one has a looser bound, see [`SHORT_SOAK_MAX_RSS_SLOPE_KIB_PER_MIN`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use leakscope_testkit::{DaemonLog, poll, start_daemon_logging, start_fixture, wait_attached};

use crate::util::{Client, Proc, is_root};
use crate::{cargo, fixture_paths, workspace_root};

/// Requests whose answers must not change under monitoring: the remedied fixture's
/// deterministic routes (every leaky path serves its remedy there, so memory stays bounded
/// however long the soak runs).
const ROUTES: [&str; 10] = [
    "/leak/forever",
    "/leak/pending",
    "/state/leak",
    "/leak/conn",
    "/ok/bounded",
    "/ok/awaited",
    "/ok/aborted",
    "/ok/blocking",
    "/state/ok",
    "/ok/cache",
];

/// Growth of the steady daemon's RSS over the second half of a long soak (at least
/// [`LONG_SOAK_MINUTES`]) above which it fails. By then its bounded tables are full: a
/// per-event leak of even 8 bytes would add about 300 KiB/min at this load (600 events a
/// second).
const MAX_RSS_SLOPE_KIB_PER_MIN: f64 = 256.0;

/// A shorter soak cannot tell a leak from the daemon's bounded tables filling up: the
/// 65,536 completed task ids kept for late heap events (about 2.5 MiB with their map) take
/// about 4 minutes to fill at this load, growing RSS in steps of about 1 MiB. Its bound only
/// catches gross leaks.
const SHORT_SOAK_MAX_RSS_SLOPE_KIB_PER_MIN: f64 = 3072.0;
const LONG_SOAK_MINUTES: f64 = 8.0;

/// How long a gone daemon's programs and links may take to be freed (the kernel drops
/// uprobes one RCU grace period at a time: seconds with the heap's hooks).
const FREED_WITHIN: Duration = Duration::from_secs(30);

/// (status, body) of a request.
type Answer = (u16, String);

/// Which build of the daemon soaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// The release build, as deployed (`cargo xtask soak`).
    Release,
    /// The debug build `cargo test` just made (`cargo xtask test`: a release build of the
    /// daemon would add minutes to CI; the debug one is slower per event, which only makes
    /// the soak harder).
    Debug,
}

pub fn soak(minutes: f64, build: Build) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the soak loads eBPF programs: run it as root (e.g. `sudo -E cargo xtask soak`)");
    }
    let leakscope = match build {
        Build::Release => {
            crate::run(cargo().args(["build", "--release", "-p", "monitor"]))?;
            workspace_root().join("target/release/leakscope")
        }
        Build::Debug => {
            crate::run(cargo().args(["build", "-p", "monitor"]))?;
            workspace_root().join("target/debug/leakscope")
        }
    };
    let fixture = fixture_paths().axum_app;
    let duration = Duration::from_secs_f64(minutes * 60.0);

    let expected = unmonitored_answers(&fixture)?;
    eprintln!(
        "soak: unmonitored answers recorded for {} routes",
        expected.len()
    );

    let (mut app, addr) = start_fixture(&fixture, &["--remedied"])
        .map_err(|e| anyhow!("starting the fixture: {e}"))?;
    let app_pid = app.pid();
    let load = Load::start(addr, expected);

    let steady_args = vec![
        "--pid".to_string(),
        app_pid.to_string(),
        "--heap".into(),
        "exact".into(),
        // Histories fill within the warm-up, so a flat RSS is expected after it.
        "--verdict-window-seconds".into(),
        "20".into(),
        "--verdict-sample-seconds".into(),
        "1".into(),
    ];
    let (mut steady, steady_client) =
        start_daemon_logging(&leakscope, &steady_args, DaemonLog::Discard)
            .map_err(|e| anyhow!("the steady daemon: {e}"))?;
    wait_attached(&steady_client, app_pid).map_err(|e| anyhow!(e))?;
    let steady_pid = steady.pid();

    let started = Instant::now();
    let mut rss: Vec<(f64, f64)> = Vec::new();
    let mut cycles = Cycles::default();
    let mut cycle = 0u64;
    while started.elapsed() < duration {
        rss.push((started.elapsed().as_secs_f64(), rss_kib(steady_pid)?));
        churn_once(&leakscope, app_pid, cycle, &mut cycles)
            .with_context(|| format!("churn cycle {cycle}"))?;
        if let Some(status) = app.child.try_wait()? {
            bail!("the fixture (pid {app_pid}) died during the soak: {status}");
        }
        if let Some(status) = steady.child.try_wait().ok().flatten() {
            bail!("the steady daemon died during the soak: {status}");
        }
        load.check()?;
        cycle += 1;
        eprintln!(
            "soak: {:.1} min: {cycle} churn daemons ended, fixture alive, answers identical, \
             steady daemon RSS {:.1} MiB",
            started.elapsed().as_secs_f64() / 60.0,
            rss.last().map_or(0.0, |(_, kib)| kib / 1024.0),
        );
    }
    rss.push((started.elapsed().as_secs_f64(), rss_kib(steady_pid)?));
    let steady_tasks = steady_client.tasks()?;
    let requests = load.stop()?;
    let held = held_bpf_ids(steady_pid)?;
    end(steady, false);
    wait_freed("the steady daemon", &held)?;
    if let Some(status) = app.child.try_wait()? {
        bail!("the fixture (pid {app_pid}) died at the end of the soak: {status}");
    }
    drop(app);

    let long = minutes >= LONG_SOAK_MINUTES;
    let (from, bound) = if long {
        (rss.len() / 2, MAX_RSS_SLOPE_KIB_PER_MIN)
    } else {
        (rss.len() / 3, SHORT_SOAK_MAX_RSS_SLOPE_KIB_PER_MIN)
    };
    let slope = slope_per_minute(&rss[from..]);
    let judged = if long {
        "over the second half"
    } else {
        "after the first third; a short soak, bounded tables still filling"
    };
    let (first, last) = (rss[0].1, rss[rss.len() - 1].1);
    println!(
        "\nsoak summary ({:.1} min, fixture pid {app_pid} alive throughout):\n\
         \x20 churn cycles:      {} ({} ended with SIGTERM, {} with SIGKILL; {} with --heap exact)\n\
         \x20 requests:          {requests}, every answer identical to the unmonitored run\n\
         \x20 BPF left behind:   none ({} programs and {} links checked freed)\n\
         \x20 steady daemon RSS: {:.1} MiB at start, {:.1} MiB at end, slope {judged} \
         {:+.1} KiB/min (bound {bound} KiB/min); samples (s, MiB): {}\n\
         \x20 steady daemon:     {} task events, {} lost; {} process(es) attached\n",
        started.elapsed().as_secs_f64() / 60.0,
        cycle,
        cycles.terminated,
        cycles.killed,
        cycles.heap,
        cycles.programs_checked + held.programs.len(),
        cycles.links_checked + held.links.len(),
        first / 1024.0,
        last / 1024.0,
        slope,
        rss.iter()
            .step_by((rss.len() / 12).max(1))
            .map(|(t, kib)| format!("{t:.0}:{:.1}", kib / 1024.0))
            .collect::<Vec<_>>()
            .join(" "),
        steady_tasks.stream.events,
        steady_tasks.stream.lost,
        steady_tasks.attached_processes,
    );
    if slope > bound {
        bail!(
            "the steady daemon's RSS grows by {slope:.0} KiB/min {judged} (bound {bound}): \
             something it keeps is not bounded"
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Cycles {
    terminated: u64,
    killed: u64,
    heap: u64,
    programs_checked: usize,
    links_checked: usize,
}

/// One churn daemon: started on the fixture, waited for until attached, left running a
/// moment, ended by SIGTERM or SIGKILL (alternately), and checked to leave nothing behind.
fn churn_once(
    leakscope: &Path,
    app_pid: u32,
    cycle: u64,
    cycles: &mut Cycles,
) -> anyhow::Result<()> {
    let heap = cycle % 3 == 2;
    let mut args = vec!["--pid".to_string(), app_pid.to_string()];
    if heap {
        args.extend(["--heap".to_string(), "exact".to_string()]);
        cycles.heap += 1;
    }
    let (daemon, client) = start_daemon_logging(leakscope, &args, DaemonLog::Discard)
        .map_err(|e| anyhow!("a churn daemon: {e}"))?;
    wait_attached(&client, app_pid).map_err(|e| anyhow!(e))?;
    // A different moment in each cycle: 1 to 4 s attached.
    std::thread::sleep(Duration::from_millis(1000 + (cycle * 700) % 3000));
    let held = held_bpf_ids(daemon.pid())?;
    if held.programs.is_empty() || held.links.is_empty() {
        bail!("the churn daemon holds no BPF program or link: {held:?}");
    }
    let kill = cycle % 2 == 1;
    end(daemon, kill);
    if kill {
        cycles.killed += 1;
    } else {
        cycles.terminated += 1;
    }
    wait_freed("a churn daemon", &held)?;
    cycles.programs_checked += held.programs.len();
    cycles.links_checked += held.links.len();
    Ok(())
}

/// Ends a daemon: SIGKILL, or SIGTERM and its orderly detach (then reaped).
fn end(mut daemon: Proc, kill: bool) {
    if kill {
        let _ = daemon.child.kill();
    } else {
        let _ = Command::new("kill")
            .args(["-TERM", &daemon.pid().to_string()])
            .status();
    }
    let _ = daemon.child.wait();
}

/// The BPF programs and links a process holds, by kernel id (from its fds' fdinfo, as
/// bpftool's own pid column reads them).
#[derive(Debug, Default)]
struct HeldIds {
    programs: BTreeSet<u64>,
    links: BTreeSet<u64>,
}

fn held_bpf_ids(pid: u32) -> anyhow::Result<HeldIds> {
    let mut held = HeldIds::default();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        for line in info.lines() {
            let id = |prefix: &str| line.strip_prefix(prefix)?.trim().parse::<u64>().ok();
            if let Some(id) = id("prog_id:") {
                held.programs.insert(id);
            }
            if let Some(id) = id("link_id:") {
                held.links.insert(id);
            }
        }
    }
    Ok(held)
}

/// Kernel ids listed by `bpftool KIND show --json` (KIND: prog or link).
fn bpftool_ids(kind: &str) -> Result<BTreeSet<u64>, String> {
    let out = Command::new("bpftool")
        .args([kind, "show", "--json"])
        .output()
        .map_err(|e| format!("running bpftool (`cargo xtask setup` installs it): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bpftool {kind} show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Only the ids are needed: every object's first key is `"id":N`.
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split("{\"id\":")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect())
}

/// Waits until none of `held`'s programs and links is loaded any more.
fn wait_freed(who: &str, held: &HeldIds) -> anyhow::Result<()> {
    poll(
        &format!("{who}'s BPF programs and links freed"),
        FREED_WITHIN,
        || {
            let programs = bpftool_ids("prog")?;
            let links = bpftool_ids("link")?;
            let left_programs: Vec<_> = held.programs.intersection(&programs).collect();
            let left_links: Vec<_> = held.links.intersection(&links).collect();
            (left_programs.is_empty() && left_links.is_empty())
                .then_some(())
                .ok_or(format!(
                    "programs {left_programs:?} and links {left_links:?} still loaded"
                ))
        },
    )
    .map_err(|e| anyhow!(e))
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Least-squares slope of (seconds, KiB) points, in KiB per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mt, mv) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, v)| (a + t / n, b + v / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (t, v)| {
        (num + (t - mt) * (v - mv), den + (t - mt) * (t - mt))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// Each route's answer from the remedied fixture with nothing attached, asked five times:
/// the routes must answer the same each time, or they cannot be compared.
fn unmonitored_answers(fixture: &Path) -> anyhow::Result<BTreeMap<&'static str, Answer>> {
    let (_app, addr) = start_fixture(fixture, &["--remedied"]).map_err(|e| anyhow!(e))?;
    let client = Client::new(addr);
    let mut answers = BTreeMap::new();
    for _ in 0..5 {
        for route in ROUTES {
            let answer = client.get(route)?;
            if let Some(previous) = answers.insert(route, answer.clone())
                && previous != answer
            {
                bail!(
                    "{route} answers differently each time ({previous:?}, {answer:?}): not comparable"
                );
            }
        }
    }
    Ok(answers)
}

/// Steady loopback requests to the fixture in a thread, each answer compared with the
/// unmonitored one; the first difference or error is kept.
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr, expected: BTreeMap<&'static str, Answer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, requests, failure) = (stop.clone(), requests.clone(), failure.clone());
            std::thread::spawn(move || {
                let client = Client::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    for (route, want) in &expected {
                        let got = client.get(route);
                        requests.fetch_add(1, Ordering::Relaxed);
                        let wrong = match got {
                            Ok(answer) if answer == *want => None,
                            Ok(answer) => {
                                Some(format!("{route}: {answer:?}, unmonitored {want:?}"))
                            }
                            Err(err) => Some(format!("{route}: {err}")),
                        };
                        if let Some(wrong) = wrong {
                            failure.lock().unwrap().get_or_insert(wrong);
                        }
                    }
                    if let Err(err) = leakscope_testkit::stream_then_disconnect(addr, "/ok/stream")
                    {
                        failure
                            .lock()
                            .unwrap()
                            .get_or_insert(format!("/ok/stream: {err}"));
                    }
                    // Bounded: about 200 requests a second, not a load test.
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Self {
            stop,
            requests,
            failure,
            thread,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        match self.failure.lock().unwrap().as_ref() {
            Some(wrong) => bail!("an answer changed under monitoring: {wrong}"),
            None => Ok(()),
        }
    }

    /// Stops the load; the requests made.
    fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let Load {
            requests,
            failure,
            thread,
            ..
        } = self;
        let _ = thread.join();
        if let Some(wrong) = failure.lock().unwrap().as_ref() {
            bail!("an answer changed under monitoring: {wrong}");
        }
        Ok(requests.load(Ordering::Relaxed))
    }
}
