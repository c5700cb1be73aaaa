//! `cargo xtask bench`'s census case: the task census of a service holding 100,000 tasks
//! spawned before leakscope attached (the axum fixture's `/leak/pending/batch`, tasks that
//! never wake): how long until they are all counted, what one census costs in wall time
//! and in the census thread's own CPU time, and the daemon's memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use leakscope_testkit::{poll, start_fixture};

use crate::util::{Client, metric, start_leakscope};
use crate::workspace_root;

const BATCHES: usize = 100;
const PER_BATCH: f64 = 1000.0;
/// Seconds between censuses in the measured daemon.
const INTERVAL: &str = "2";
const CENSUSES: f64 = 5.0;

/// User + system CPU time of the daemon's census thread (named `census`), from its
/// `/proc/PID/task/TID/stat`.
fn census_thread_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        if std::fs::read_to_string(task.join("comm"))?.trim() == "census" {
            let tid: u32 = task
                .file_name()
                .and_then(|n| n.to_str()?.parse().ok())
                .context("a task id")?;
            return crate::bench::process_cpu_ns_of(&format!("/proc/{pid}/task/{tid}/stat"));
        }
    }
    bail!("the daemon has no census thread")
}

pub fn census_bench(leakscope: &Path) -> anyhow::Result<()> {
    let (app, addr) = start_fixture(&workspace_root().join("target/release/axum-app"), &[])
        .map_err(|e| anyhow!(e))?;
    let client = Client::new(addr);
    let started = Instant::now();
    for _ in 0..BATCHES {
        client.get_ok("/leak/pending/batch")?;
    }
    let tasks = BATCHES as f64 * PER_BATCH;
    eprintln!(
        "census bench: {tasks} idle tasks spawned in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let attach = Instant::now();
    let (daemon, api) = start_leakscope(leakscope, app.pid(), &["--census-seconds", INTERVAL])?;
    let attached = attach.elapsed();
    poll("all tasks counted", Duration::from_secs(120), || {
        let counted =
            metric(&api, "leakscope_tasks_alive_before_attach").map_err(|e| e.to_string())?;
        (counted >= tasks)
            .then_some(())
            .ok_or(format!("{counted} counted"))
    })
    .map_err(|e| anyhow!(e))?;
    let counted_after = attach.elapsed();
    let cpu_before = census_thread_cpu_ns(daemon.pid())?;
    let runs_before = metric(&api, "leakscope_census_runs_total")?;
    poll("more censuses", Duration::from_secs(120), || {
        let runs = metric(&api, "leakscope_census_runs_total").map_err(|e| e.to_string())?;
        (runs >= runs_before + CENSUSES)
            .then_some(())
            .ok_or(format!("{runs} runs"))
    })
    .map_err(|e| anyhow!(e))?;
    let runs = metric(&api, "leakscope_census_runs_total")? - runs_before;
    let cpu = census_thread_cpu_ns(daemon.pid())? - cpu_before;
    let last = metric(&api, "leakscope_census_duration_seconds")?;
    let found = metric(&api, "leakscope_census_tasks_found")?;
    let invalid = metric(&api, "leakscope_census_links_invalid_total")?;
    let rss = crate::bench_host::rss_mib(daemon.pid()).unwrap_or(0.0);
    println!("\ntask census of {tasks} tasks spawned before attach (census every {INTERVAL} s):");
    println!(
        "  counted {:.1} s after the daemon started ({:.1} s of it attaching)",
        counted_after.as_secs_f64(),
        attached.as_secs_f64()
    );
    println!(
        "  one census: {:.0} ms wall (the last), {:.0} ms of the census thread's CPU \
         (mean of {runs}), {found} tasks found, {invalid} links failed validation",
        last * 1e3,
        cpu as f64 / runs / 1e6
    );
    println!("  daemon resident memory: {rss:.1} MiB");
    drop(daemon);
    drop(app);
    Ok(())
}
