//! `cargo xtask bench --scale`: the daemon's own cost at the sizes issue #17 names, one
//! process holding 100 000 live tasks and 1 000 000 live heap blocks under `--heap exact`:
//! the daemon's resident memory, the kernel memory its maps hold, and its CPU per event
//! while the tasks and blocks arrive.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use leakscope_testkit::poll;

use crate::bench::process_cpu_ns;
use crate::bench_host::{rss_mib, status_mib};
use crate::util::{Client, kill_on_drop, metric, start_leakscope};
use crate::workspace_root;

const TASKS: usize = 100_000;
const BLOCKS: usize = 1_000_000;

/// Kernel memory held by the BPF maps of process `pid` (its map descriptors' `memlock`),
/// in MiB.
fn bpf_map_mib(pid: u32) -> anyhow::Result<f64> {
    let mut bytes = 0u64;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// Resident and own memory, as shown.
fn memory(pid: u32) -> anyhow::Result<String> {
    Ok(format!(
        "daemon {:.1} MiB resident ({:.1} MiB its own heap and stacks; the rest is its executable's pages and \
         the ring buffers' (kernel memory mapped into it))",
        rss_mib(pid)?,
        status_mib(pid, "RssAnon")?
    ))
}

/// One command to the scale fixture, and its `ok …` answer.
fn ask(
    stdin: &mut impl std::io::Write,
    stdout: &mut impl std::io::BufRead,
    command: &str,
) -> anyhow::Result<String> {
    writeln!(stdin, "{command}")?;
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if !line.starts_with("ok") {
        bail!("scale-app answered {command:?} with {line:?}");
    }
    Ok(line.trim().to_string())
}

/// Waits until `family`'s sum reaches `at_least` and the daemon's event count stands still
/// (it has read everything), returning the value.
fn settle(client: &Client, family: &str, at_least: f64) -> anyhow::Result<f64> {
    let mut last_events = -1.0;
    poll(
        &format!("{family} at {at_least}"),
        Duration::from_secs(300),
        || {
            let value = metric(client, family).map_err(|e| e.to_string())?;
            let events = metric(client, "leakscope_events_total").map_err(|e| e.to_string())?
                + metric(client, "leakscope_heap_events_total").map_err(|e| e.to_string())?;
            let still = events == last_events;
            last_events = events;
            (value >= at_least && still)
                .then_some(value)
                .ok_or(format!("{family} {value}, events {events}"))
        },
    )
    .map_err(|e| anyhow!(e))
}

pub fn scale_bench(leakscope: &Path) -> anyhow::Result<()> {
    let fixture = workspace_root().join("target/release/scale-app");
    let mut child = Command::new(&fixture)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} (cargo xtask fixtures)", fixture.display()))?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut stdin = child.stdin.take().context("stdin")?;
    let pid = child.id();
    let _app = kill_on_drop(child, "scale-app");
    let mut line = String::new();
    stdout.read_line(&mut line)?;

    let attaching = Instant::now();
    // Room in the kernel's block table for every block held, and some.
    let max_blocks = (BLOCKS * 2).to_string();
    let (daemon, client) = start_leakscope(
        leakscope,
        pid,
        &["--heap", "exact", "--heap-max-blocks", &max_blocks],
    )?;
    let attach_seconds = attaching.elapsed().as_secs_f64();
    let daemon_pid = daemon.pid();
    let rss_attached = memory(daemon_pid)?;
    let maps_attached = bpf_map_mib(daemon_pid)?;

    let cpu_before = process_cpu_ns(daemon_pid)?;
    let events_before = metric(&client, "leakscope_events_total")?;
    ask(&mut stdin, &mut stdout, &format!("park {TASKS}"))?;
    let alive = settle(&client, "leakscope_tasks_alive", TASKS as f64)?;
    let task_events = metric(&client, "leakscope_events_total")? - events_before;
    let task_cpu = process_cpu_ns(daemon_pid)? - cpu_before;
    let rss_tasks = memory(daemon_pid)?;

    let cpu_before = process_cpu_ns(daemon_pid)?;
    let heap_before = metric(&client, "leakscope_heap_events_total")?;
    ask(&mut stdin, &mut stdout, &format!("hold {BLOCKS}"))?;
    let live = settle(&client, "leakscope_heap_live_allocations", BLOCKS as f64)?;
    let heap_events = metric(&client, "leakscope_heap_events_total")? - heap_before;
    let heap_cpu = process_cpu_ns(daemon_pid)? - cpu_before;
    let rss_loaded = memory(daemon_pid)?;
    let maps_loaded = bpf_map_mib(daemon_pid)?;
    drop(daemon);

    println!(
        "\none process with {TASKS} live tasks and {BLOCKS} live 32-byte blocks, --heap exact \
         (target: daemon RSS ≤ 64 MiB):"
    );
    println!(
        "  attached in {attach_seconds:.2} s: {rss_attached}, BPF maps \
         {maps_attached:.1} MiB of kernel memory"
    );
    println!(
        "  {alive:.0} tasks alive: {rss_tasks}; {:.2} µs of daemon CPU \
         per task event ({task_events:.0} events)",
        task_cpu as f64 / 1e3 / task_events.max(1.0)
    );
    // With the kernel's aggregates (the default path) only new groups are events: the
    // daemon's CPU is shown per block then, for the whole phase.
    println!(
        "  {live:.0} heap blocks live: {rss_loaded}, BPF maps {maps_loaded:.1} MiB; daemon CPU \
         {:.0} ms while {BLOCKS} blocks were allocated ({:.3} µs per block; {heap_events:.0} heap \
         events; 10 ms clock ticks)",
        heap_cpu as f64 / 1e6,
        heap_cpu as f64 / 1e3 / BLOCKS as f64
    );
    Ok(())
}
