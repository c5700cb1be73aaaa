//! `cargo xtask bench --http [--quick]`: what leakscope costs an HTTP service, as an operator
//! would measure it. The axum fixture serves three routes (a cheap one, one spawning a short
//! task, one allocating like a JSON handler) to `wrk` over loopback, with keep-alive and with
//! a connection per request, unmonitored and under each monitor: leakscope's task hooks,
//! `--heap exact` (aggregated in the kernel) and the same with an event per block (the path
//! it replaced), `--heap sampled`, `--heap adaptive` (its standing cost: these routes do not
//! leak, so no window should run), `--tasks census` (no task hook: the census alone), and
//! bcc's `memleak -p` for comparison. One more configuration puts empty BPF programs on
//! exactly leakscope's heap probe points: the traps alone, the floor under any heap tracking
//! that probes every call.
//! A second unmonitored service is measured like the others: its ratio to the first is the
//! noise of the run.
//!
//! The service and the monitor share CPU 0 and wrk has CPU 1, so the monitor's own work is
//! paid from the service's core, as on a busy host. Each round starts a fresh service per
//! configuration, all at once, and measures each route and connection mode under every
//! configuration back to back, rotating which goes first, so drift from other work on the
//! machine hits all alike. The report gives medians of requests per second and their ratio
//! to the unmonitored service in the same run, the daemon's CPU per event and its resident
//! memory. Numbers are printed and written to `target/bench/summary.{json,md,svg}`;
//! nothing asserts on them.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use leakscope_testkit::{DaemonLog, Proc, start_daemon_logging, start_fixture, wait_attached};
use serde_json::{Value, json};

use crate::bench::process_cpu_ns;
use crate::bench_host::rss_mib;
use crate::util::{Client, metric};
use crate::workspace_root;

mod bcc;
mod summary;
mod wrk;
use summary::Summary;
pub(crate) use wrk::{WRK_CONNECTIONS, WRK_THREADS, wrk};

/// A route of the axum fixture and what it does per request.
struct Route {
    key: &'static str,
    path: &'static str,
    what: &'static str,
}

const ROUTES: [Route; 4] = [
    Route {
        key: "hello",
        path: "/healthz",
        what: "no task, no allocation of its own",
    },
    Route {
        key: "spawn",
        path: "/ok/awaited",
        what: "spawns a short task and awaits it",
    },
    Route {
        key: "two_tasks",
        path: "/ok/two-tasks",
        what: "spawns two short tasks and awaits both",
    },
    Route {
        key: "json",
        path: "/json",
        what: "about 50 allocations, serialized as JSON",
    },
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Conn {
    KeepAlive,
    Close,
}

impl Conn {
    const ALL: [Conn; 2] = [Conn::KeepAlive, Conn::Close];
    fn key(self) -> &'static str {
        match self {
            Conn::KeepAlive => "keep_alive",
            Conn::Close => "close",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Conn::KeepAlive => "keep-alive",
            Conn::Close => "connection per request",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    Baseline,
    /// A second unmonitored service, measured like the others: its ratio to the baseline is
    /// the noise of the run (an A/A comparison).
    Control,
    Tasks,
    Heap,
    /// `--heap exact` with one event per allocation and free (`--heap-path events`), the
    /// path `Heap`'s in-kernel aggregation replaced: both in one run, for the comparison.
    HeapEvents,
    HeapSampled,
    /// `--heap adaptive`: heap probes only in windows, when memory grows beyond what the
    /// tasks hold (the benchmark's routes do not leak: this is its standing cost).
    HeapAdaptive,
    /// `--tasks census`: no task hook; the census alone counts tasks, every 10 s.
    TaskCensus,
    Memleak,
    /// Empty BPF programs on `--heap exact`'s probe points (bcc): the traps alone.
    HeapTrapFloor,
}

impl Config {
    const ALL: [Config; 10] = [
        Config::Baseline,
        Config::Control,
        Config::Tasks,
        Config::Heap,
        Config::HeapEvents,
        Config::HeapSampled,
        Config::HeapAdaptive,
        Config::TaskCensus,
        Config::Memleak,
        Config::HeapTrapFloor,
    ];
    /// Its key in `summary.json`.
    fn key(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::Control => "baseline_repeat",
            Config::Tasks => "tasks",
            Config::Heap => "heap",
            Config::HeapEvents => "heap_events",
            Config::HeapSampled => "heap_sampled",
            Config::HeapAdaptive => "heap_adaptive",
            Config::TaskCensus => "task_census",
            Config::Memleak => "memleak",
            Config::HeapTrapFloor => "heap_trap_floor",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::Control => "2nd unmonitored",
            Config::Tasks => "task hooks",
            Config::Heap => "--heap exact",
            Config::HeapEvents => "--heap exact, event per block",
            Config::HeapSampled => "--heap sampled",
            Config::HeapAdaptive => "--heap adaptive",
            Config::TaskCensus => "task census",
            Config::Memleak => "bcc memleak -p",
            Config::HeapTrapFloor => "heap probes, empty",
        }
    }
    /// Whether it is a bcc tool (which needs bcc and kernel headers).
    fn runs_bcc(self) -> bool {
        matches!(self, Config::Memleak | Config::HeapTrapFloor)
    }
    /// `leakscope daemon --pid P` arguments, for leakscope's configurations.
    fn daemon_args(self) -> Option<&'static [&'static str]> {
        match self {
            Config::Tasks => Some(&[]),
            Config::Heap => Some(&["--heap", "exact"]),
            Config::HeapEvents => Some(&["--heap", "exact", "--heap-path", "events"]),
            Config::HeapSampled => Some(&["--heap", "sampled"]),
            Config::HeapAdaptive => Some(&["--heap", "adaptive"]),
            Config::TaskCensus => Some(&["--tasks", "census"]),
            Config::Baseline | Config::Control | Config::Memleak | Config::HeapTrapFloor => None,
        }
    }
}

/// One wrk run as wrk reports it, and the monitor's work over it.
#[derive(Clone, Default)]
pub(crate) struct Run {
    pub(crate) rps: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// Socket errors (connect, read, write, timeout) and responses other than 2xx/3xx.
    pub(crate) errors: u64,
    /// CPU time of the monitor process over the run.
    monitor_cpu_ns: Option<u64>,
    /// Events leakscope read over the run (`leakscope_events_total` +
    /// `leakscope_heap_events_total`).
    events: Option<u64>,
}

/// A monitor attached to the service.
enum Monitor {
    None,
    Leakscope {
        daemon: Proc,
        client: Client,
    },
    /// A bcc tool: memleak, or the trap floor's empty programs.
    Bcc {
        process: Proc,
    },
}

impl Monitor {
    fn pid(&self) -> Option<u32> {
        match self {
            Monitor::None => None,
            Monitor::Leakscope { daemon, .. } => Some(daemon.pid()),
            Monitor::Bcc { process } => Some(process.pid()),
        }
    }
    fn events(&self) -> Option<u64> {
        match self {
            Monitor::Leakscope { client, .. } => Some(
                (metric(client, "leakscope_events_total").unwrap_or(0.0)
                    + metric(client, "leakscope_heap_events_total").unwrap_or(0.0))
                    as u64,
            ),
            _ => None,
        }
    }
}

/// Pins process `pid` and all its threads to CPU `cpu`; threads it starts later inherit it.
pub(crate) fn pin(pid: u32, cpu: u32) -> anyhow::Result<()> {
    crate::output(Command::new("taskset").args([
        "--all-tasks",
        "--cpu-list",
        "--pid",
        &cpu.to_string(),
        &pid.to_string(),
    ]))
    .map(|_| ())
    .with_context(|| format!("pinning pid {pid} to CPU {cpu} (taskset, util-linux)"))
}

/// What one configuration measured in one round.
struct ConfigRound {
    runs: BTreeMap<(usize, Conn), Run>,
    /// The monitor's resident memory after the last run.
    monitor_rss_mib: Option<f64>,
}

struct Bench {
    app: PathBuf,
    leakscope: PathBuf,
    out: PathBuf,
    seconds: u64,
}

/// A service on CPU 0 with `config`'s monitor attached.
struct Target {
    config: Config,
    addr: std::net::SocketAddr,
    // Dropped in this order: the monitor first, then the service.
    monitor: Monitor,
    _service: Proc,
}

impl Bench {
    /// Starts a fresh service on CPU 0, attaches `config`'s monitor and warms both up.
    fn start(&self, config: Config) -> anyhow::Result<Target> {
        let app = self.app.display().to_string();
        let (service, addr) = start_fixture(Path::new("taskset"), &["--cpu-list", "0", &app])
            .map_err(|e| anyhow!(e))
            .context("starting the axum fixture on CPU 0")?;
        let pid = service.pid();
        let monitor = match config {
            Config::Baseline | Config::Control => Monitor::None,
            Config::Memleak => Monitor::Bcc {
                process: bcc::start_memleak(&self.out, pid)?,
            },
            Config::HeapTrapFloor => Monitor::Bcc {
                process: bcc::start_trap_floor(&self.out, pid, &self.leakscope)?,
            },
            _ => {
                let mut args = vec!["--pid".to_string(), pid.to_string()];
                args.extend(
                    config
                        .daemon_args()
                        .unwrap_or(&[])
                        .iter()
                        .map(|s| s.to_string()),
                );
                let log = File::create(self.out.join(format!("leakscope-{}.log", config.key())))?;
                let (daemon, client) =
                    start_daemon_logging(&self.leakscope, &args, DaemonLog::File(&log))
                        .map_err(|e| anyhow!(e))?;
                wait_attached(&client, pid).map_err(|e| anyhow!(e))?;
                pin(daemon.pid(), 0)?;
                Monitor::Leakscope { daemon, client }
            }
        };
        // Warm up the service (and the monitor) on the cheap route; not measured.
        wrk(addr, ROUTES[0].path, Conn::KeepAlive, 1)?;
        Ok(Target {
            config,
            addr,
            monitor,
            _service: service,
        })
    }

    /// One wrk run against `target`, with its monitor's CPU time and events over it.
    fn measure(&self, target: &Target, route: &Route, conn: Conn) -> anyhow::Result<Run> {
        let monitor = &target.monitor;
        let cpu_before = monitor.pid().map(process_cpu_ns).transpose()?;
        let events_before = monitor.events();
        let mut run = wrk(target.addr, route.path, conn, self.seconds)?;
        // Let the daemon read what the run left in the ring buffer.
        if monitor.pid().is_some() {
            std::thread::sleep(Duration::from_millis(300));
        }
        if let (Some(pid), Some(before)) = (monitor.pid(), cpu_before) {
            run.monitor_cpu_ns = Some(process_cpu_ns(pid)?.saturating_sub(before));
        }
        if let (Some(after), Some(before)) = (monitor.events(), events_before) {
            run.events = Some(after.saturating_sub(before));
        }
        eprintln!(
            "  {:<12} {:<23} {:<15} {:>9.0} req/s{}{}",
            route.path,
            conn.label(),
            target.config.label(),
            run.rps,
            run.events
                .map(|e| format!(", {e} events"))
                .unwrap_or_default(),
            if run.errors > 0 {
                format!(", {} errors", run.errors)
            } else {
                String::new()
            }
        );
        Ok(run)
    }
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// All rounds' results, by configuration.
type Results = BTreeMap<Config, Vec<ConfigRound>>;

/// Median requests per second of `config` on a route and connection mode.
fn median_rps(results: &Results, config: Config, route: usize, conn: Conn) -> Option<f64> {
    let rps: Vec<f64> = results
        .get(&config)?
        .iter()
        .filter_map(|r| r.runs.get(&(route, conn)).map(|run| run.rps))
        .collect();
    median(&rps)
}

fn ratio(results: &Results, config: Config, route: usize, conn: Conn) -> Option<f64> {
    let base = median_rps(results, Config::Baseline, route, conn)?;
    Some(median_rps(results, config, route, conn)? / base)
}

/// The monitor's CPU per event in a round: its CPU over all runs of the round divided by the
/// events of all of them (clock ticks are 10 ms; the sum keeps that small).
fn cpu_per_event_ns(round: &ConfigRound, runs: &[(usize, Conn)]) -> Option<f64> {
    let (mut cpu, mut events) = (0u64, 0u64);
    for key in runs {
        let run = round.runs.get(key)?;
        cpu += run.monitor_cpu_ns?;
        events += run.events?;
    }
    (events > 0).then(|| cpu as f64 / events as f64)
}

fn opt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |x| json!(round2(x)))
}

pub struct Options {
    pub quick: bool,
    pub rounds: usize,
}

pub fn http_bench(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    if !crate::util::is_root() {
        bail!("the HTTP benchmark loads eBPF programs: run it as root");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!(
            "the HTTP benchmark pins the service to CPU 0 and wrk to CPU 1: it needs 2 CPUs, \
             this machine has {cpus}"
        );
    }
    let bcc_setup = crate::bench_tools::setup_bench()?;
    let (rounds, seconds) = if options.quick {
        (1, 5)
    } else {
        (options.rounds.max(1), 10)
    };
    crate::run(crate::cargo().args(["build", "--release", "-p", "monitor"]))?;
    let root = workspace_root();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let bench = Bench {
        app: crate::fixture_paths().axum_app,
        leakscope: root.join("target/release/leakscope"),
        out: out.clone(),
        seconds,
    };
    let load_start = load_average();
    let pinning = format!(
        "service (axum-app, 2 tokio workers) and monitor (pinned once attached) on CPU 0; \
         wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} on CPU 1 (taskset); loopback"
    );
    eprintln!(
        "xtask: HTTP benchmark, {rounds} round(s) of {seconds} s per run; {pinning}; load \
         average {load_start} on {cpus} CPUs"
    );
    // Configurations that cannot run here, and why: both bcc ones need bcc and kernel headers.
    let mut left_out: BTreeMap<Config, String> = BTreeMap::new();
    let memleak_note = match &bcc_setup {
        Ok(headers) => format!("{headers}; bcc 0.26 run with a shim for iovisor/bcc#5236"),
        Err(reason) => {
            for config in Config::ALL.into_iter().filter(|c| c.runs_bcc()) {
                left_out.insert(config, format!("cannot run here: {reason}"));
            }
            format!("memleak cannot run here: {reason}")
        }
    };
    let mut results: Results = BTreeMap::new();
    let cells: Vec<(usize, Conn)> = Summary::all_runs();
    for round in 0..rounds {
        eprintln!(
            "xtask: round {} of {rounds}: starting a service per configuration",
            round + 1
        );
        // Every configuration's service is up at once (idle ones cost next to nothing), so
        // each route is measured under all of them back to back: drift from other work on
        // the machine hits them alike.
        let mut targets = Vec::new();
        for config in Config::ALL {
            if left_out.contains_key(&config) {
                continue;
            }
            match bench.start(config) {
                Ok(target) => targets.push(target),
                Err(e) if config.runs_bcc() => {
                    eprintln!("xtask: {} left out: {e:#}", config.label());
                    left_out.insert(config, format!("could not run on this kernel: {e:#}"));
                }
                Err(e) => return Err(e.context(format!("starting {}", config.label()))),
            }
        }
        let mut measured: Vec<ConfigRound> = targets
            .iter()
            .map(|_| ConfigRound {
                runs: BTreeMap::new(),
                monitor_rss_mib: None,
            })
            .collect();
        for (c, &(index, conn)) in cells.iter().enumerate() {
            // Rotate which configuration goes first, cell by cell and round by round.
            let n = targets.len();
            for k in 0..n {
                let t = (k + c + round * cells.len()) % n;
                let run = bench.measure(&targets[t], &ROUTES[index], conn)?;
                measured[t].runs.insert((index, conn), run);
            }
        }
        for (target, m) in targets.iter().zip(&mut measured) {
            m.monitor_rss_mib = target.monitor.pid().map(rss_mib).transpose()?;
        }
        for (target, m) in targets.into_iter().zip(measured) {
            results.entry(target.config).or_default().push(m);
        }
    }
    let load_end = load_average();
    let summary = Summary {
        results,
        rounds,
        seconds,
        pinning,
        load_start,
        load_end,
        cpus,
        memleak_note,
        left_out,
        wall_seconds: started.elapsed().as_secs_f64(),
        quick: options.quick,
    };
    let json = summary.json();
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let markdown = summary.markdown();
    std::fs::write(out.join("summary.md"), &markdown)?;
    summary.svg(&out.join("summary.svg"))?;
    println!("\n{markdown}");
    println!(
        "written: {} (.md, .svg); wall time {:.0} s",
        out.join("summary.json").display(),
        summary.wall_seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary from made-up runs, heap adaptive and memleak missing: the files render and
    /// the columns not run (or not built) are `null`.
    #[test]
    fn writes_the_summary() {
        let mut results = Results::new();
        for (i, config) in Config::ALL.iter().take(4).enumerate() {
            let runs = Summary::all_runs()
                .into_iter()
                .map(|cell| {
                    let run = Run {
                        rps: 1000.0 / (i + 1) as f64 * if cell.0 == 0 { 1.3 } else { 1.0 },
                        monitor_cpu_ns: (i > 0).then_some(10_000_000),
                        events: (i > 0).then_some(20_000),
                        ..Run::default()
                    };
                    (cell, run)
                })
                .collect();
            results.entry(*config).or_default().push(ConfigRound {
                runs,
                monitor_rss_mib: (i > 0).then_some(20.0),
            });
        }
        let summary = Summary {
            results,
            rounds: 1,
            seconds: 5,
            pinning: "test".into(),
            load_start: "0 0 0".into(),
            load_end: "0 0 0".into(),
            cpus: 2,
            memleak_note: "not run in this test".into(),
            left_out: BTreeMap::from([(Config::HeapTrapFloor, "not run in this test".into())]),
            wall_seconds: 1.0,
            quick: true,
        };
        let json = summary.json();
        assert_eq!(json["ratios"]["heap_adaptive"], Value::Null);
        assert_eq!(json["ratios"]["task_census"], Value::Null);
        assert_eq!(json["ratios"]["memleak"], Value::Null);
        assert_eq!(json["ratios"]["heap_trap_floor"], Value::Null);
        assert_eq!(
            json["left_out"]["heap_trap_floor"],
            json!("not run in this test")
        );
        assert_eq!(json["ratios"]["baseline_repeat"], json!(0.5));
        assert_eq!(json["ratios"]["tasks"], json!(0.333));
        assert_eq!(
            json["routes"]["json"]["close"]["ratios"]["heap"],
            json!(0.25)
        );
        assert_eq!(json["daemon"]["tasks"]["cpu_ns_per_event"], json!(500.0));
        assert!(summary.markdown().contains("| `/json`"));
        let svg = std::env::temp_dir().join(format!("xtask-summary-{}.svg", std::process::id()));
        summary.svg(&svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("--heap sampled"));
        let _ = std::fs::remove_file(&svg);
    }
}
