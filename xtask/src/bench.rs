//! `cargo xtask bench`: overhead of leakscope's task and heap hooks, measured side by side in
//! one run.
//!
//! The spawn microbenchmark (`spawn-bench`, a fixture) spawns and awaits N trivial tasks;
//! each task fires two hooks (spawn, complete). Rounds alternate baseline and monitored runs
//! so drift on the machine hits both alike; the report is the ratio of medians and the
//! per-hook cost derived from it, plus a check that every hook actually fired.
//!
//! The heap benchmark does the same for allocate+free loops, then one more monitored run per
//! workload with `leakscope daemon --probe-stats` (the kernel's BPF run-time statistics),
//! which splits the cost into each hook's own BPF time (the rest of a hit is the trap). That
//! run is kept out of the ratios: the statistics add their own clock reads to every run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::util::{Client, is_root, kill_on_drop, metric, start_leakscope};
use crate::{cargo, workspace_root};

const TASKS: u64 = 200_000;

/// One run of spawn-bench; with `monitored`, leakscope is attached before it starts.
/// Returns elapsed nanoseconds and, when monitored, the events leakscope received.
fn one_run(monitored: bool) -> anyhow::Result<(u64, Option<u64>)> {
    let root = workspace_root();
    let mut child = Command::new(root.join("target/release/spawn-bench"))
        .arg(TASKS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting spawn-bench")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut stdin = child.stdin.take().context("stdin")?;
    let pid = child.id();
    let _bench = kill_on_drop(child, "spawn-bench");
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("spawn-bench said {line:?}");
    }
    let daemon = if monitored {
        Some(start_leakscope(
            &root.join("target/release/leakscope"),
            pid,
            &[],
        )?)
    } else {
        None
    };
    writeln!(stdin, "go")?;
    line.clear();
    stdout.read_line(&mut line)?;
    let elapsed: u64 = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("elapsed_ns="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("spawn-bench said {line:?}"))?;
    let events = match &daemon {
        Some((_, client)) => {
            // Let the ring buffer drain before reading the count.
            std::thread::sleep(std::time::Duration::from_millis(300));
            Some(metric(client, "leakscope_events_total")? as u64)
        }
        None => None,
    };
    Ok((elapsed, events))
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

const ALLOCATIONS: u64 = 200_000;

/// A heap-app build and one of its benchmark loops.
#[derive(Clone, Copy)]
struct HeapWorkload {
    /// The fixture binary, relative to the workspace root.
    binary: &'static str,
    /// Its global allocator, for the report.
    allocator: &'static str,
    /// The heap-app command that runs the loop.
    command: &'static str,
    /// What the loop allocates, for the report.
    what: &'static str,
}

const SYSTEM_HEAP_APP: &str = "target/release/heap-app";

/// Compared baseline vs monitored: each allocator, and one loop that passes through
/// `alloc::raw_vec` (more frames to walk).
const HEAP_WORKLOADS: [HeapWorkload; 4] = [
    HeapWorkload {
        binary: SYSTEM_HEAP_APP,
        allocator: "system allocator",
        command: "bench",
        what: "64-byte Box::new (the allocator's caller is the callsite)",
    },
    HeapWorkload {
        binary: SYSTEM_HEAP_APP,
        allocator: "system allocator",
        command: "bench-vec",
        what: "64-byte Vec::reserve_exact (alloc::raw_vec frames before the callsite)",
    },
    HeapWorkload {
        binary: "target/fixtures-jemalloc/release/heap-app",
        allocator: "jemalloc",
        command: "bench",
        what: "64-byte Box::new",
    },
    HeapWorkload {
        binary: "target/fixtures-mimalloc/release/heap-app",
        allocator: "mimalloc",
        command: "bench",
        what: "64-byte Box::new",
    },
];

/// Profiled only: every libc hook fires.
const MIXED_WORKLOAD: HeapWorkload = HeapWorkload {
    binary: SYSTEM_HEAP_APP,
    allocator: "system allocator",
    command: "bench-mix",
    what: "calloc, malloc + realloc and posix_memalign, each freed (every libc hook)",
};

/// Per heap program name: hits and BPF nanoseconds.
type HookTimes = BTreeMap<String, (u64, u64)>;

/// Runs and run time of each heap program, as the daemon exports them with
/// `--probe-stats` (the kernel's own statistics).
fn heap_program_stats(client: &Client) -> anyhow::Result<HookTimes> {
    let mut stats = HookTimes::new();
    for sample in client.metrics()? {
        let Some(program) = sample.label("program").filter(|p| p.starts_with("heap_")) else {
            continue;
        };
        let entry = stats.entry(program.to_string()).or_default();
        match sample.name.as_str() {
            "leakscope_probe_runs_total" => entry.0 = sample.value as u64,
            "leakscope_probe_run_seconds_total" => entry.1 = (sample.value * 1e9) as u64,
            _ => {}
        }
    }
    Ok(stats)
}

/// What the profiled run measures besides elapsed time.
#[derive(Default)]
struct Profile {
    hooks: HookTimes,
    /// CPU time the daemon spent while the loop ran and until it had read every event.
    daemon_cpu_ns: u64,
    /// Heap events the daemon read in that time.
    heap_events: u64,
}

/// User + system CPU time of process `pid` so far, from `/proc/PID/stat`.
pub fn process_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    process_cpu_ns_of(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time so far of the process or thread whose `stat` file is `path`.
pub fn process_cpu_ns_of(path: &str) -> anyhow::Result<u64> {
    // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    Ok(stat_ticks(path, &[11, 12])? * 10_000_000)
}

/// The sum of the clock-tick fields at `indexes` of the `stat` file at `path`, counted from
/// the state (field 3) at index 0: the fields after the command, which may hold spaces.
pub fn stat_ticks(path: &str, indexes: &[usize]) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(path)?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .with_context(|| format!("malformed {path}"))?
        .1
        .split_whitespace()
        .collect();
    let mut sum = 0;
    for &i in indexes {
        sum += fields
            .get(i)
            .with_context(|| format!("short {path}"))?
            .parse::<u64>()
            .with_context(|| format!("{path} field {}", i + 3))?;
    }
    Ok(sum)
}

fn heap_events(client: &Client) -> u64 {
    metric(client, "leakscope_heap_events_total").unwrap_or(0.0) as u64
}

fn heap_allocated_bytes(client: &Client) -> u64 {
    metric(client, "leakscope_heap_allocated_bytes_total").unwrap_or(0.0) as u64
}

/// One run of heap-app's allocation loop `workload` (in its allocator's build); with `mode`,
/// leakscope `--heap MODE --heap-path PATH` is attached first. Returns elapsed nanoseconds
/// and, when `profile`, what [`Profile`] holds.
fn one_heap_run(
    workload: HeapWorkload,
    mode: Option<(&str, &str)>,
    profile: bool,
) -> anyhow::Result<(u64, Profile)> {
    let root = workspace_root();
    let mut child = Command::new(root.join(workload.binary))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting heap-app")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut stdin = child.stdin.take().context("stdin")?;
    let pid = child.id();
    let _app = kill_on_drop(child, "heap-app");
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let daemon = match mode {
        Some((mode, path)) => {
            let mut args = vec!["--heap", mode, "--heap-path", path];
            if profile {
                args.push("--probe-stats");
            }
            Some(start_leakscope(
                &root.join("target/release/leakscope"),
                pid,
                &args,
            )?)
        }
        None => None,
    };
    let profiled = match &daemon {
        Some((process, client)) if profile => Some((process.pid(), *client)),
        _ => None,
    };
    let before = match profiled {
        Some((daemon_pid, client)) => Some((
            heap_program_stats(&client)?,
            process_cpu_ns(daemon_pid)?,
            heap_events(&client),
            heap_allocated_bytes(&client),
        )),
        None => None,
    };
    writeln!(stdin, "{} {ALLOCATIONS}", workload.command)?;
    line.clear();
    stdout.read_line(&mut line)?;
    let elapsed = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("bench_ns="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("heap-app said {line:?}"))?;
    let mut result = Profile::default();
    if let (Some((daemon_pid, client)), Some((programs, cpu, events, allocated))) =
        (profiled, before)
    {
        for (name, (runs, ns)) in heap_program_stats(&client)? {
            let (runs_before, ns_before) = programs.get(&name).copied().unwrap_or_default();
            result
                .hooks
                .insert(name, (runs - runs_before, ns.saturating_sub(ns_before)));
        }
        // At least a byte allocated per round: wait until the daemon has counted them all
        // and its count stands still for longer than it takes to read the kernel's
        // aggregates again (200 ms).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut last = heap_allocated_bytes(&client);
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = heap_allocated_bytes(&client);
            if now == last && now >= allocated + ALLOCATIONS {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("the daemon did not count all allocations within 60 s");
            }
            last = now;
        }
        result.daemon_cpu_ns = process_cpu_ns(daemon_pid)? - cpu;
        result.heap_events = heap_events(&client) - events;
    }
    Ok((elapsed, result))
}

/// Each heap hook's own BPF time per hit in one `--heap exact --probe-stats` run of
/// `workload` per heap path (aggregated in the kernel, an event per block), and the
/// daemon's CPU per allocation+free round and per event.
fn heap_hook_times(workload: HeapWorkload) -> anyhow::Result<()> {
    for path in ["aggregate", "events"] {
        let (_, profile) = one_heap_run(workload, Some(("exact", path)), true)?;
        println!(
            "  BPF time per hook hit (one more --heap exact --heap-path {path} run, with \
             --probe-stats):"
        );
        for (name, (runs, ns)) in profile
            .hooks
            .iter()
            .filter(|(_, (runs, _))| *runs >= ALLOCATIONS)
        {
            println!(
                "    {name:<26} {:6.0} ns  ({runs} hits)",
                *ns as f64 / *runs as f64
            );
        }
        println!(
            "  daemon CPU ({path}): {:.0} ns per allocation+free round, {:.0} ns per heap \
             event ({} events, {:.0} ms; 10 ms clock ticks)",
            profile.daemon_cpu_ns as f64 / ALLOCATIONS as f64,
            profile.daemon_cpu_ns as f64 / profile.heap_events.max(1) as f64,
            profile.heap_events,
            profile.daemon_cpu_ns as f64 / 1e6
        );
    }
    Ok(())
}

pub fn heap_bench(rounds: usize) -> anyhow::Result<()> {
    for workload in HEAP_WORKLOADS {
        let mut baseline = Vec::new();
        let mut monitored = Vec::new();
        let mut sampled = Vec::new();
        for round in 1..=rounds {
            let (b, _) = one_heap_run(workload, None, false)?;
            let (m, _) = one_heap_run(workload, Some(("exact", "aggregate")), false)?;
            let (s, _) = one_heap_run(workload, Some(("sampled", "aggregate")), false)?;
            eprintln!(
                "{} {} round {round}: baseline {:.0}, exact {:.0}, sampled {:.0} ns/alloc",
                workload.allocator,
                workload.command,
                b as f64 / ALLOCATIONS as f64,
                m as f64 / ALLOCATIONS as f64,
                s as f64 / ALLOCATIONS as f64
            );
            baseline.push(b);
            monitored.push(m);
            sampled.push(s);
        }
        let b = median(&mut baseline) as f64 / ALLOCATIONS as f64;
        let m = median(&mut monitored) as f64 / ALLOCATIONS as f64;
        let s = median(&mut sampled) as f64 / ALLOCATIONS as f64;
        println!(
            "\nallocate + free of {ALLOCATIONS} blocks, {}, {}, median of {rounds}:",
            workload.what, workload.allocator
        );
        println!("  baseline   {b:8.0} ns/alloc");
        println!("  --heap exact {m:6.0} ns/alloc   (ratio {:.1}x)", m / b);
        println!("  --heap sampled {s:4.0} ns/alloc   (ratio {:.1}x)", s / b);
        println!(
            "  cost per allocation+free ≈ {:.2} µs exact, {:.2} µs sampled (3 probe hits: \
             entry, return with stack walk, free)",
            (m - b) / 1000.0,
            (s - b) / 1000.0
        );
        heap_hook_times(workload)?;
    }
    println!(
        "\n{ALLOCATIONS} rounds of {}, {}:",
        MIXED_WORKLOAD.what, MIXED_WORKLOAD.allocator
    );
    heap_hook_times(MIXED_WORKLOAD)
}

pub fn bench(rounds: usize) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    // Only the daemon: building the fixtures in the same invocation would unify their
    // dependencies' features with the daemon's and change the fixture binaries.
    crate::run(cargo().args(["build", "--release", "-p", "monitor"]))?;
    let mut baseline = Vec::new();
    let mut monitored = Vec::new();
    let mut events = Vec::new();
    for round in 1..=rounds {
        let (b, _) = one_run(false)?;
        let (m, e) = one_run(true)?;
        eprintln!(
            "round {round}: baseline {:.0} ns/task, monitored {:.0} ns/task, events {e:?}",
            b as f64 / TASKS as f64,
            m as f64 / TASKS as f64
        );
        baseline.push(b);
        monitored.push(m);
        events.push(e.unwrap_or(0));
    }
    let b = median(&mut baseline) as f64 / TASKS as f64;
    let m = median(&mut monitored) as f64 / TASKS as f64;
    let min_events = events.iter().copied().min().unwrap_or(0);
    println!("\nspawn+await of {TASKS} trivial tasks, median of {rounds} alternating rounds:");
    println!("  baseline   {b:8.0} ns/task");
    println!("  monitored  {m:8.0} ns/task   (ratio {:.2}x)", m / b);
    println!(
        "  cost per hook hit ≈ {:.2} µs (2 hooks per task: spawn + complete)",
        (m - b) / 2.0 / 1000.0
    );
    println!(
        "  events received: at least {min_events} of {} expected per monitored run",
        2 * TASKS
    );
    if min_events < 2 * TASKS {
        bail!("hooks missed events: {min_events} < {}", 2 * TASKS);
    }
    heap_bench(rounds)?;
    verdict_bench()?;
    crate::bench_census::census_bench(&root_leakscope())?;
    crate::bench_host::host_bench(&root_leakscope())?;
    crate::bench_scale::scale_bench(&root_leakscope())
}

fn root_leakscope() -> std::path::PathBuf {
    workspace_root().join("target/release/leakscope")
}

/// The verdict engine at 10,000 sites (the `verdict_bench` example of the daemon's crate):
/// time of one sampling tick with a full window of history, and the memory it holds.
fn verdict_bench() -> anyhow::Result<()> {
    crate::run(cargo().args([
        "build",
        "--release",
        "-p",
        "monitor",
        "--example",
        "verdict_bench",
    ]))?;
    let out = crate::output(
        Command::new(workspace_root().join("target/release/examples/verdict_bench")).arg("10000"),
    )?;
    let field = |key: &str| -> anyhow::Result<f64> {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("verdict_bench printed no {key}: {out}"))
    };
    println!("\nverdicts over 10,000 sites (defaults: a sample every 5 s, 120 s window):");
    println!(
        "  one tick: median {:.1} ms, max {:.1} ms ({:.2} % of a core at one tick per 5 s)",
        field("tick_ms_median")?,
        field("tick_ms_max")?,
        field("tick_ms_median")? / 5000.0 * 100.0
    );
    println!(
        "  memory: {:.1} MiB more resident for {} samples held",
        field("rss_kib_growth")? / 1024.0,
        field("samples_held")?
    );
    println!(
        "  suspects found: {} of the 100 sites made to leak",
        field("suspects")?
    );
    Ok(())
}
