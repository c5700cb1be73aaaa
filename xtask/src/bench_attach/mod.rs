//! `cargo xtask bench --attach`: how long leakscope takes to attach to a large tokio
//! service (issue #17: ≤ 1 s on a 50 MB binary).
//!
//! The large service is generated and built here (`generate`). For it, and for the axum
//! fixture as a small reference, three things are timed, each `--rounds` times (medians
//! shown, with the CPU time they took: on a busy machine wall time is partly waiting for a
//! core): `leakscope inspect BINARY`; `leakscope daemon --pid P` from its start until its
//! API lists the process attached; the same with `--heap exact` (which adds the allocator
//! search, the unwind table compiled from `.eh_frame`, the symbols and the heap probes).
//! Each daemon is then stopped with SIGTERM and waited for, which is timed too: the kernel
//! removes uprobes one at a time, and a large service has thousands (a `complete` hook per
//! task type). leakscope's own binary is a third reference row, inspect only. Where the
//! time goes comes from the daemon's own `leakscope::timing` lines (see
//! `monitor::timing`). The table is printed and written to `target/bench/attach.json`.

mod generate;
mod measure;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, anyhow};
use leakscope_testkit::start_fixture;

use crate::{cargo, run, workspace_root};
use measure::{Breakdown, Run, Work};

/// About 50 MB in the default release profile (1408 spawn sites, 176 of them
/// `spawn_blocking`).
pub const SHAPE: generate::Shape = generate::Shape {
    crates: 8,
    modules: 11,
    sites: 16,
};

/// Generates the large service and builds it (release, default profile) into the shared
/// target directory; returns its path and how long its last real build took (kept in
/// `build-seconds` beside it: a run that finds it built reports the build that made it).
pub fn build_app(shape: generate::Shape) -> anyhow::Result<(PathBuf, Option<f64>)> {
    let root = workspace_root();
    let dir = root.join("target/bench/attach-app");
    let app = root.join("target/release/attach-app");
    let kept = dir.join("build-seconds");
    generate::write(&dir, shape, &root.join("Cargo.lock"))?;
    let modified = || std::fs::metadata(&app).and_then(|m| m.modified()).ok();
    let before = modified();
    let started = Instant::now();
    run(cargo()
        .args(["build", "--release", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target")))
    .context("building the generated service")?;
    if modified() != before {
        std::fs::write(&kept, started.elapsed().as_secs_f64().to_string())?;
    }
    let build_seconds = std::fs::read_to_string(&kept)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Ok((app, build_seconds))
}

/// The measurements of one binary.
struct Row {
    name: String,
    binary: PathBuf,
    inspect: Vec<Run>,
    attach: Vec<Run>,
    attach_heap: Vec<Run>,
    /// Why the daemon could not attach with `--heap exact`, when it could not: a limit of
    /// the daemon is a result here, and the same on every round, so it is tried once.
    heap_failure: Option<String>,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn median_seconds(runs: &[Run]) -> f64 {
    median(runs.iter().map(|r| r.seconds).collect())
}

fn median_cpu(runs: &[Run]) -> f64 {
    median(runs.iter().map(|r| r.cpu_seconds).collect())
}

fn median_detach<'a>(runs: impl IntoIterator<Item = &'a Run>) -> f64 {
    median(runs.into_iter().filter_map(|r| r.detach_seconds).collect())
}

/// Per piece of work and phase, the median over `runs` in ms.
fn median_breakdown(runs: &[Run]) -> Breakdown {
    let mut out = Breakdown::new();
    let Some(first) = runs.first() else {
        return out;
    };
    for (what, (_, phases)) in &first.breakdown {
        let of = |pick: &dyn Fn(&Work) -> Option<f64>| {
            median(
                runs.iter()
                    .filter_map(|r| r.breakdown.get(what).and_then(pick))
                    .collect(),
            )
        };
        let total = of(&|b| Some(b.0));
        let phases = phases
            .iter()
            .map(|(name, _)| {
                let ms = of(&|b| b.1.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms));
                (name.clone(), ms)
            })
            .collect();
        out.insert(what.clone(), (total, phases));
    }
    out
}

/// Measures `binary`: inspect always, attach when `start` runs it (returning the process).
fn measure(
    leakscope: &Path,
    rounds: usize,
    name: &str,
    binary: &Path,
    start: Option<&dyn Fn() -> anyhow::Result<leakscope_testkit::Proc>>,
) -> anyhow::Result<Row> {
    let mut row = Row {
        name: name.to_string(),
        binary: binary.to_path_buf(),
        inspect: Vec::new(),
        attach: Vec::new(),
        attach_heap: Vec::new(),
        heap_failure: None,
    };
    // One unmeasured inspect first: the file in the page cache, as on a running host.
    measure::inspect(leakscope, binary)?;
    for _ in 0..rounds {
        row.inspect.push(measure::inspect(leakscope, binary)?);
    }
    let Some(start) = start else {
        return Ok(row);
    };
    let target = start()?;
    let log = workspace_root().join("target/bench/attach-daemon.log");
    for round in 1..=rounds {
        for heap in [false, true] {
            let (extra, runs): (&[&str], _) = if heap {
                if row.heap_failure.is_some() {
                    continue;
                }
                (&["--heap", "exact"], &mut row.attach_heap)
            } else {
                (&[], &mut row.attach)
            };
            let run = match measure::attach(leakscope, target.pid(), extra, &log) {
                Ok(run) => run,
                Err(err) if heap => {
                    // The daemon's last line says why (the timing lines come before it).
                    let why = err.to_string();
                    let why = why.lines().rev().find(|l| !l.trim().is_empty());
                    let why = why.unwrap_or("no reason given").trim().to_string();
                    eprintln!(
                        "xtask: {name}: the daemon could not attach with --heap exact: {why}"
                    );
                    row.heap_failure = Some(why);
                    continue;
                }
                Err(err) => return Err(err),
            };
            eprintln!(
                "xtask: {name}, round {round}/{rounds}, daemon {}: attached in {:.2} s \
                 ({:.2} s CPU), detached in {:.1} s",
                extra.join(" "),
                run.seconds,
                run.cpu_seconds,
                run.detach_seconds.unwrap_or(f64::NAN)
            );
            runs.push(run);
        }
    }
    Ok(row)
}

fn breakdown_text(b: &Breakdown) -> String {
    b.iter()
        .map(|(what, (total, phases))| {
            let phases: Vec<String> = phases
                .iter()
                .filter(|(_, ms)| *ms >= 1.0)
                .map(|(n, ms)| format!("{n} {ms:.0}"))
                .collect();
            format!("{what} {total:.0} ms ({})", phases.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn breakdown_json(b: &Breakdown) -> serde_json::Value {
    b.iter()
        .map(|(what, (total, phases))| {
            let phases: serde_json::Map<String, serde_json::Value> = phases
                .iter()
                .map(|(n, ms)| (n.clone(), serde_json::json!(ms)))
                .collect();
            (
                what.clone(),
                serde_json::json!({ "total_ms": total, "phases_ms": phases }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn attach_bench(leakscope: &Path, rounds: usize) -> anyhow::Result<()> {
    if !crate::util::is_root() {
        anyhow::bail!("bench --attach loads eBPF programs: run it as root");
    }
    let (app, build_seconds) = build_app(SHAPE)?;
    let root = workspace_root();
    let axum = crate::fixture_paths().axum_app;
    let start = |binary: PathBuf| {
        move || -> anyhow::Result<leakscope_testkit::Proc> {
            let (proc, _) = start_fixture(&binary, &[]).map_err(|e| anyhow!(e))?;
            Ok(proc)
        }
    };
    let start_app = start(app.clone());
    let start_axum = start(axum.clone());
    let rows = [
        measure(
            leakscope,
            rounds,
            "generated service",
            &app,
            Some(&start_app),
        )?,
        measure(
            leakscope,
            rounds,
            "axum-app fixture",
            &axum,
            Some(&start_axum),
        )?,
        measure(leakscope, rounds, "leakscope itself", leakscope, None)?,
    ];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");

    println!(
        "\nattach time, medians of {rounds} runs, wall (CPU) seconds (load average at the end: \
         {load}); the generated service has {} spawn sites and was built in {}:",
        SHAPE.spawn_sites(),
        build_seconds.map_or("(unknown)".to_string(), |s| format!("{s:.0} s"))
    );
    println!(
        "  {:20} {:>6} {:>13} {:>13} {:>13} {:>9}",
        "binary", "MB", "inspect", "attach", "heap exact", "detach"
    );
    let mut json_rows = Vec::new();
    for row in &rows {
        let mb = std::fs::metadata(&row.binary)?.len() as f64 / 1e6;
        let (inspect, attach, heap) = (
            median_seconds(&row.inspect),
            median_seconds(&row.attach),
            median_seconds(&row.attach_heap),
        );
        let shown = |runs: &[Run]| {
            if runs.is_empty()
                && row.heap_failure.is_some()
                && std::ptr::eq(runs, &*row.attach_heap)
            {
                "failed".to_string()
            } else if runs.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2} ({:.2})", median_seconds(runs), median_cpu(runs))
            }
        };
        let detach = median_detach(row.attach.iter().chain(&row.attach_heap));
        println!(
            "  {:20} {mb:>6.1} {:>13} {:>13} {:>13} {:>9}",
            row.name,
            shown(&row.inspect),
            shown(&row.attach),
            shown(&row.attach_heap),
            if detach.is_nan() {
                "-".to_string()
            } else {
                format!("{detach:.1}")
            }
        );
        let (bi, ba, bh) = (
            median_breakdown(&row.inspect),
            median_breakdown(&row.attach),
            median_breakdown(&row.attach_heap),
        );
        for (label, b) in [("inspect", &bi), ("attach", &ba), ("heap exact", &bh)] {
            if !b.is_empty() {
                println!("      {label}: {}", breakdown_text(b));
            }
        }
        if let Some(why) = &row.heap_failure {
            println!("      heap exact failed: {why}");
        }
        let runs = |r: &[Run]| {
            r.iter()
                .map(|r| {
                    serde_json::json!({
                        "wall": r.seconds,
                        "cpu": r.cpu_seconds,
                        "detach": r.detach_seconds,
                    })
                })
                .collect::<Vec<_>>()
        };
        json_rows.push(serde_json::json!({
            "binary": row.name,
            "path": row.binary.display().to_string(),
            "size_bytes": std::fs::metadata(&row.binary)?.len(),
            "inspect_s": { "median": inspect, "runs": runs(&row.inspect),
                           "breakdown": breakdown_json(&bi) },
            "attach_s": { "median": attach, "runs": runs(&row.attach),
                          "breakdown": breakdown_json(&ba) },
            "attach_heap_exact_s": { "median": heap, "runs": runs(&row.attach_heap),
                                     "breakdown": breakdown_json(&bh),
                                     "failed": row.heap_failure },
        }));
    }
    let summary = serde_json::json!({
        "rounds": rounds,
        "load_average": load,
        "generated": {
            "spawn_sites": SHAPE.spawn_sites(),
            "build_seconds": build_seconds,
        },
        "rows": json_rows,
    });
    let out = root.join("target/bench/attach.json");
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    std::fs::write(&out, serde_json::to_string_pretty(&summary)?)?;
    println!("  written to {}", out.display());
    Ok(())
}
