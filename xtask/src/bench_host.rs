//! Host-wide mode at scale: 50 watched services. How long the daemon takes to find and
//! attach them all, and what it holds in memory doing so (task mode and sampled heap
//! mode), before and after each service has leaked tasks and heap.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use leakscope_testkit::{Proc, poll, start_daemon, start_fixture};

use crate::util::{Client, metric};
use crate::workspace_root;

const SERVICES: usize = 50;

/// Resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmRSS")
}

/// A memory line of `/proc/PID/status` (`VmRSS`, `RssAnon`, …), in MiB.
pub fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .with_context(|| format!("no {field} line in /proc/{pid}/status"))
}

struct Scale {
    attach_seconds: f64,
    rss_attached_mib: f64,
    rss_loaded_mib: f64,
    tasks_alive: f64,
    stop_seconds: f64,
}

fn one_mode(
    leakscope: &Path,
    dir: &Path,
    heap: &str,
    services: &[(Proc, std::net::SocketAddr)],
) -> anyhow::Result<Scale> {
    let started = Instant::now();
    let args: Vec<String> = [
        "--all",
        "--all-under",
        &dir.display().to_string(),
        "--heap",
        heap,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (daemon, client) = start_daemon(leakscope, &args).map_err(|e| anyhow!(e))?;
    poll(
        &format!("{SERVICES} services attached"),
        Duration::from_secs(120),
        || {
            let n = metric(&client, "leakscope_attached_processes").map_err(|e| e.to_string())?;
            (n as usize == SERVICES)
                .then_some(())
                .ok_or(format!("{n} attached"))
        },
    )
    .map_err(|e| anyhow!(e))?;
    let attach_seconds = started.elapsed().as_secs_f64();
    let rss_attached_mib = rss_mib(daemon.pid())?;
    // Each service leaks 100 tasks and some state.
    for (_, addr) in services {
        let service = Client::new(*addr);
        for _ in 0..100 {
            service.get_ok("/leak/forever").map_err(|e| anyhow!(e))?;
        }
        for _ in 0..20 {
            service.get_ok("/state/leak").map_err(|e| anyhow!(e))?;
        }
    }
    let expected = (SERVICES * 100) as f64;
    let alive = |client: &Client| -> Result<f64, String> {
        let samples = client.metrics().map_err(|e| e.to_string())?;
        Ok(crate::util::sum(
            &samples,
            "leakscope_tasks_alive",
            &[("site", "axum_app::leak_forever::{{closure}}::{{closure}}")],
        ))
    };
    let tasks_alive = poll("the leaked tasks counted", Duration::from_secs(60), || {
        let n = alive(&client)?;
        (n >= expected)
            .then_some(n)
            .ok_or(format!("{n} of {expected}"))
    })
    .map_err(|e| anyhow!(e))?;
    let rss_loaded_mib = rss_mib(daemon.pid())?;
    // SIGTERM, as systemd or the kubelet stop it: it detaches everything, then exits.
    let mut daemon = daemon;
    let stopping = Instant::now();
    crate::run(Command::new("kill").args(["-TERM", &daemon.pid().to_string()]))?;
    daemon.child.wait()?;
    let stop_seconds = stopping.elapsed().as_secs_f64();
    Ok(Scale {
        attach_seconds,
        rss_attached_mib,
        rss_loaded_mib,
        tasks_alive,
        stop_seconds,
    })
}

/// Starts 50 copies of the axum fixture from a directory of their own and measures the
/// daemon over them, in task mode and sampled heap mode.
pub fn host_bench(leakscope: &Path) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("leakscope-bench-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let app = dir.join("axum-app");
    std::fs::copy(workspace_root().join("target/release/axum-app"), &app)
        .context("copying the axum-app fixture (cargo xtask fixtures builds it)")?;
    let services: Vec<(Proc, std::net::SocketAddr)> = (0..SERVICES)
        .map(|_| start_fixture(&app, &[]).map_err(|e| anyhow!(e)))
        .collect::<anyhow::Result<_>>()?;
    let service_rss: f64 = services
        .iter()
        .map(|(p, _)| rss_mib(p.pid()).unwrap_or(0.0))
        .sum::<f64>()
        / SERVICES as f64;
    println!(
        "\nhost-wide mode over {SERVICES} axum services (each {service_rss:.1} MiB resident):"
    );
    for heap in ["off", "sampled"] {
        let scale = one_mode(leakscope, &dir, heap, &services)?;
        println!(
            "  --heap {heap:7}: all attached in {:.1} s; daemon {:.1} MiB resident attached, \
             {:.1} MiB with {:.0} leaked tasks alive; stopped (SIGTERM) in {:.1} s",
            scale.attach_seconds,
            scale.rss_attached_mib,
            scale.rss_loaded_mib,
            scale.tasks_alive,
            scale.stop_seconds
        );
    }
    drop(services);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
