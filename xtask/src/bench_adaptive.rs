//! `cargo xtask bench --adaptive [--minutes N]`: `--heap adaptive` as it is meant to run,
//! left on for the whole run (10 minutes by default), on a service whose memory starts
//! growing part way through.
//!
//! Two copies of the axum fixture share CPU 0 with the daemon, which watches one of them
//! with `--heap adaptive` (defaults) from the start; wrk has CPU 1. Both copies are loaded
//! at once, each by its own wrk (`GET /healthz`, keep-alive), in back-to-back slices: the
//! scheduler shares CPU 0 between them, so whatever a window costs the watched copy, in
//! whichever slice it falls, shows as fewer of its requests in that slice. (Alternating the
//! load between the copies, as `bench --http` does, left a window's cost to chance: it
//! counted only when the window fell in one of the watched copy's slices.) Both copies get the same trickle of the seed's state routes: from 30 %
//! of the run, `/state/leak` (its growing-state leak: 256 KiB a call, never freed) and
//! `/state/ok` (its remedy), five calls a second each. Reported: the watched copy's
//! throughput relative to the unwatched one, averaged over the run and before and after
//! the growth starts; when the leak's callsite became a heap suspect, counted from the first
//! leaking call; whether anything else was ever a suspect; what the windows cost (when and
//! why they ran, probe seconds, attach and detach time) and the daemon's CPU and memory.
//! Written to `target/bench/adaptive.{json,md}`; nothing asserts on the numbers.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use leakscope_testkit::types::SiteKind;
use leakscope_testkit::{Client, DaemonLog, start_daemon_logging, start_fixture, wait_attached};
use serde_json::json;

use crate::bench::process_cpu_ns;
use crate::bench_host::{rss_mib, status_mib};
use crate::bench_http::{Conn, WRK_CONNECTIONS, WRK_THREADS, pin, wrk};
use crate::workspace_root;

const LEAK: &str = "axum_app::state_leak::{{closure}}::{{closure}}";
const REMEDY: &str = "axum_app::state_ok::{{closure}}::{{closure}}";
/// Length of one wrk run; a pair of slices (one per copy) is the unit of comparison.
const SLICE_SECONDS: u64 = 10;
/// Where in the run the state routes' trickle starts (the growth the windows must find).
const LEAK_STARTS_AT: f64 = 0.3;
/// Calls a second to each state route, per copy.
const TRICKLE_PER_SECOND: u64 = 5;
/// How often the daemon's verdicts are read.
const VERDICT_POLL: Duration = Duration::from_secs(2);

pub struct Options {
    pub minutes: f64,
}

/// What the verdict watcher saw, in seconds since the run started.
#[derive(Default)]
struct Seen {
    /// When the leak's callsite was first a heap suspect.
    leak_suspect_at: Option<f64>,
    /// Whether it was one at the latest read (a suspect must stay one while it leaks).
    leak_suspect_last: bool,
    /// Every other site that was ever a suspect, with when it first was.
    other_suspects: Vec<(String, f64)>,
    /// Whether the remedy's callsite was ever judged (it is seen only in windows).
    remedy_judged: bool,
}

/// One slice pair: the unwatched copy's and the watched copy's requests per second.
struct Pair {
    at_seconds: f64,
    unwatched: f64,
    watched: f64,
}

/// GETs `paths` on every address, `per_second` times a second each, until stopped.
fn trickle(
    addrs: Vec<SocketAddr>,
    paths: &'static [&'static str],
    per_second: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let period = Duration::from_millis(1000 / per_second.max(1));
        let mut next = Instant::now();
        let mut failed = 0;
        while !stop.load(Ordering::Relaxed) {
            for addr in &addrs {
                for path in paths {
                    if !matches!(Client::new(*addr).get(path), Ok((200, _))) {
                        failed += 1;
                    }
                }
            }
            next += period;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        failed
    })
}

/// Reads the daemon's verdicts every [`VERDICT_POLL`] until stopped.
fn watch_verdicts(
    daemon: Client,
    pid: u32,
    started: Instant,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let at = started.elapsed().as_secs_f64();
            if let Ok(sites) = daemon.sites() {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.leak_suspect_last = false;
                for v in sites.sites.iter().filter(|v| v.pid == pid) {
                    let suspect = v.verdict == leakscope_testkit::types::Verdict::Suspect;
                    if v.kind == SiteKind::Heap && v.site == REMEDY {
                        seen.remedy_judged = true;
                    }
                    if !suspect {
                        continue;
                    }
                    if v.kind == SiteKind::Heap && v.site == LEAK {
                        seen.leak_suspect_at.get_or_insert(at);
                        seen.leak_suspect_last = true;
                    } else if !seen.other_suspects.iter().any(|(s, _)| *s == v.site) {
                        seen.other_suspects.push((v.site.clone(), at));
                    }
                }
            }
            std::thread::sleep(VERDICT_POLL);
        }
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The watched copy's mean throughput over the unwatched copy's, over `pairs`.
fn ratio_of_means<'a>(pairs: impl Iterator<Item = &'a Pair> + Clone) -> Option<f64> {
    Some(mean(pairs.clone().map(|p| p.watched))? / mean(pairs.map(|p| p.unwatched))?)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn adaptive_bench(options: Options, leakscope: &Path) -> anyhow::Result<()> {
    if !crate::util::is_root() {
        bail!("the adaptive benchmark loads eBPF programs: run it as root");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!(
            "the adaptive benchmark pins the services to CPU 0 and wrk to CPU 1: it needs 2 CPUs"
        );
    }
    // wrk (bcc's tools come along; this benchmark does not use them).
    let _ = crate::bench_tools::setup_bench()?;
    let run_seconds = (options.minutes * 60.0).max(4.0 * SLICE_SECONDS as f64);
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let app = crate::fixture_paths().axum_app.display().to_string();
    let start_copy = || {
        start_fixture(Path::new("taskset"), &["--cpu-list", "0", &app])
            .map_err(|e| anyhow!(e))
            .context("starting the axum fixture on CPU 0")
    };
    let (_unwatched, unwatched_addr) = start_copy()?;
    let (watched, watched_addr) = start_copy()?;
    let pid = watched.pid();
    let log = File::create(out.join("leakscope-adaptive-run.log"))?;
    let args = [
        "--pid".to_string(),
        pid.to_string(),
        "--heap".into(),
        "adaptive".into(),
    ];
    let (daemon, client) =
        start_daemon_logging(leakscope, &args, DaemonLog::File(&log)).map_err(|e| anyhow!(e))?;
    wait_attached(&client, pid).map_err(|e| anyhow!(e))?;
    pin(daemon.pid(), 0)?;
    for addr in [unwatched_addr, watched_addr] {
        wrk(addr, "/healthz", Conn::KeepAlive, 1)?;
    }
    let load_start = crate::bench_http::load_average();
    eprintln!(
        "xtask: adaptive benchmark, {:.1} min: two axum-app copies and the daemon (--heap \
         adaptive, watching pid {pid}) on CPU 0, wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} on \
         CPU 1, {SLICE_SECONDS} s slices of GET /healthz keep-alive, both copies at once; the state \
         routes' trickle starts at {:.0} s; load average {load_start}",
        run_seconds / 60.0,
        run_seconds * LEAK_STARTS_AT
    );

    let started = Instant::now();
    let daemon_cpu_before = process_cpu_ns(daemon.pid())?;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = watch_verdicts(
        Client::new(client.addr),
        pid,
        started,
        seen.clone(),
        stop.clone(),
    );
    let mut trickle_thread = None;
    let mut leak_started_at = None;
    let mut pairs: Vec<Pair> = Vec::new();
    while started.elapsed().as_secs_f64() + SLICE_SECONDS as f64 <= run_seconds {
        let at = started.elapsed().as_secs_f64();
        if trickle_thread.is_none() && at >= run_seconds * LEAK_STARTS_AT {
            leak_started_at = Some(at);
            trickle_thread = Some(trickle(
                vec![unwatched_addr, watched_addr],
                &["/state/leak", "/state/ok"],
                TRICKLE_PER_SECOND,
                stop.clone(),
            ));
            eprintln!("xtask: {at:.0} s: the state routes' trickle starts");
        }
        let runs = std::thread::scope(|scope| {
            let unwatched =
                scope.spawn(|| wrk(unwatched_addr, "/healthz", Conn::KeepAlive, SLICE_SECONDS));
            let watched = wrk(watched_addr, "/healthz", Conn::KeepAlive, SLICE_SECONDS);
            [
                unwatched
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("the wrk thread panicked"))),
                watched,
            ]
        });
        let mut rps = [0.0; 2];
        for (i, run) in runs.into_iter().enumerate() {
            let run = run?;
            if run.errors > 0 {
                eprintln!("xtask: {} wrk errors in a slice", run.errors);
            }
            rps[i] = run.rps;
        }
        let state = window_state(&client, pid);
        eprintln!(
            "  {at:>5.0} s  unwatched {:>8.0} req/s  watched {:>8.0} req/s  ratio {:.3}  ({state})",
            rps[0],
            rps[1],
            rps[1] / rps[0]
        );
        pairs.push(Pair {
            at_seconds: at,
            unwatched: rps[0],
            watched: rps[1],
        });
    }
    stop.store(true, Ordering::Relaxed);
    let trickle_failures = trickle_thread
        .map(|t| t.join().unwrap_or(u64::MAX))
        .unwrap_or(0);
    let _ = watcher.join();
    let wall = started.elapsed().as_secs_f64();
    let daemon_cpu_s = process_cpu_ns(daemon.pid())?.saturating_sub(daemon_cpu_before) as f64 / 1e9;
    let family = |name: &str, label: Option<(&str, &str)>| -> f64 {
        client
            .metrics()
            .map(|samples| {
                samples
                    .iter()
                    .filter(|s| s.name == name)
                    .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).is_some_and(|x| x == v)))
                    .map(|s| s.value)
                    .sum()
            })
            .unwrap_or(f64::NAN)
    };
    let windows = json!({
        "opened_anon_growth": family("leakscope_heap_windows_total", Some(("reason", "anon_growth"))),
        "opened_confirm": family("leakscope_heap_windows_total", Some(("reason", "confirm"))),
        "skipped_budget": family("leakscope_heap_windows_skipped_total", Some(("reason", "budget"))),
        "skipped_attach_failed": family("leakscope_heap_windows_skipped_total", Some(("reason", "attach_failed"))),
        "allocating_seconds": round3(family("leakscope_heap_window_seconds_total", Some(("phase", "allocating")))),
        "following_seconds": round3(family("leakscope_heap_window_seconds_total", Some(("phase", "following")))),
        "probe_attach_seconds": round3(family("leakscope_heap_window_probe_seconds_total", Some(("op", "attach")))),
        "probe_detach_seconds": round3(family("leakscope_heap_window_probe_seconds_total", Some(("op", "detach")))),
    });
    let daemon_rss = rss_mib(daemon.pid())?;
    let daemon_own = status_mib(daemon.pid(), "RssAnon")?;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let leak_at = leak_started_at.unwrap_or(f64::NAN);
    let before: Vec<&Pair> = pairs.iter().filter(|p| p.at_seconds < leak_at).collect();
    let after: Vec<&Pair> = pairs.iter().filter(|p| p.at_seconds >= leak_at).collect();
    let mut per_pair: Vec<f64> = pairs.iter().map(|p| p.watched / p.unwatched).collect();
    per_pair.sort_by(f64::total_cmp);
    let detection = seen.leak_suspect_at.map(|t| t - leak_at);
    let summary = json!({
        "ratio": ratio_of_means(pairs.iter()).map(round3),
        "ratio_before_growth": ratio_of_means(before.iter().copied()).map(round3),
        "ratio_after_growth": ratio_of_means(after.iter().copied()).map(round3),
        "ratio_per_pair_median": per_pair.get(per_pair.len() / 2).copied().map(round3),
        "ratio_per_pair_min": per_pair.first().copied().map(round3),
        "rps_unwatched_mean": mean(pairs.iter().map(|p| p.unwatched)).map(f64::round),
        "rps_watched_mean": mean(pairs.iter().map(|p| p.watched)).map(f64::round),
        "pairs": pairs.len(),
        "growth_started_at_seconds": leak_started_at.map(round3),
        "leak_suspect_after_seconds": detection.map(round3),
        "leak_suspect": LEAK,
        "leak_suspect_at_end": seen.leak_suspect_last,
        "remedy_judged": seen.remedy_judged,
        "other_suspects": seen.other_suspects.iter().map(|(s, t)| json!({"site": s, "at_seconds": round3(*t)})).collect::<Vec<_>>(),
        "trickle_failures": trickle_failures,
        "windows": windows,
        "daemon": {
            "cpu_seconds": round3(daemon_cpu_s),
            "cpu_percent_of_a_core": round3(daemon_cpu_s / wall * 100.0),
            "rss_mib": round3(daemon_rss),
            "rss_anon_mib": round3(daemon_own),
        },
        "setup": {
            "minutes": round3(wall / 60.0),
            "slice_seconds": SLICE_SECONDS,
            "trickle_per_second_per_route": TRICKLE_PER_SECOND,
            "load_average_start": load_start,
            "load_average_end": crate::bench_http::load_average(),
            "kernel": crate::bench_tools::kernel_release(),
        },
    });
    std::fs::write(
        out.join("adaptive.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let md = markdown(&summary);
    std::fs::write(out.join("adaptive.md"), &md)?;
    println!("\n{md}");
    println!("written: {}", out.join("adaptive.json").display());
    Ok(())
}

/// The watched process's window phase now, for the progress line.
fn window_state(client: &Client, pid: u32) -> String {
    let Ok(samples) = client.metrics() else {
        return "state unknown".into();
    };
    let pid = pid.to_string();
    samples
        .iter()
        .find(|s| {
            s.name == "leakscope_heap_window_state"
                && s.value == 1.0
                && s.labels.get("pid") == Some(&pid)
        })
        .and_then(|s| s.labels.get("state").cloned())
        .unwrap_or_else(|| "idle".into())
}

fn markdown(s: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("–".into(), |x| format!("{x:.3}"));
    let w = &s["windows"];
    format!(
        "`--heap adaptive` left on for {} min (GET /healthz keep-alive, {} s slices, a \
         watched and an unwatched copy loaded at once, {} pairs; load average {} at the \
         start, {} at the end).\n\n\
         | | watched / unwatched throughput |\n|---|---|\n\
         | whole run (ratio of means) | {} |\n| before the growth | {} |\n\
         | after the growth started | {} |\n| median pair | {} |\n| worst pair | {} |\n\n\
         The seed's growing-state leak (`/state/leak`, 5 calls/s from {} s) was a heap suspect \
         **{} s** after its first call, and still one at the end: {}; the remedy's callsite was judged: {}; other suspects: {}.\n\n\
         Windows: {} opened on anonymous-memory growth, {} to confirm, {} skipped (budget), \
         {} skipped (attach failed); probes on {} s allocating and {} s following; attach \
         {} s, detach {} s in all. Daemon: {} CPU seconds ({} % of a core), {} MiB resident \
         ({} MiB its own).\n",
        s["setup"]["minutes"],
        s["setup"]["slice_seconds"],
        s["pairs"],
        s["setup"]["load_average_start"].as_str().unwrap_or("?"),
        s["setup"]["load_average_end"].as_str().unwrap_or("?"),
        f(&s["ratio"]),
        f(&s["ratio_before_growth"]),
        f(&s["ratio_after_growth"]),
        f(&s["ratio_per_pair_median"]),
        f(&s["ratio_per_pair_min"]),
        s["growth_started_at_seconds"],
        s["leak_suspect_after_seconds"]
            .as_f64()
            .map_or("never".into(), |x| format!("{x:.0}")),
        s["leak_suspect_at_end"],
        s["remedy_judged"],
        s["other_suspects"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map_or("none".into(), |a| format!("{a:?}")),
        w["opened_anon_growth"],
        w["opened_confirm"],
        w["skipped_budget"],
        w["skipped_attach_failed"],
        w["allocating_seconds"],
        w["following_seconds"],
        w["probe_attach_seconds"],
        w["probe_detach_seconds"],
        s["daemon"]["cpu_seconds"],
        s["daemon"]["cpu_percent_of_a_core"],
        s["daemon"]["rss_mib"],
        s["daemon"]["rss_anon_mib"],
    )
}
