//! `cargo xtask demo`: the leaky fixture under bounded loopback load, leakscope attached, and
//! a refreshing table of spawn sites, leaks on top.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use leakscope_testkit::{start_fixture, stream_then_disconnect};

use crate::util::{Client, is_root, start_leakscope};
use crate::{cargo, fixture_paths, workspace_root};

pub fn demo(seconds: u64) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs: run it as root (e.g. `sudo -E cargo xtask demo`)");
    }
    crate::run(cargo().args(["build", "--release", "-p", "monitor"]))?;
    let leakscope = workspace_root().join("target/release/leakscope");

    let (app, app_addr) = start_fixture(&fixture_paths().axum_app, &[]).map_err(|e| anyhow!(e))?;
    let app_pid = app.pid();
    let fixture = Client::new(app_addr);
    // A verdict window short enough to judge within the demo (the daemon's default is 120 s).
    let window = (seconds as f64 * 0.6).clamp(10.0, 120.0).to_string();
    let (_daemon, daemon) = start_leakscope(
        &leakscope,
        app_pid,
        &[
            "--heap",
            "exact",
            "--verdict-window-seconds",
            &window,
            "--verdict-sample-seconds",
            "1",
        ],
    )?;
    let listen = daemon.addr;

    println!(
        "\nfixture axum-app (pid {app_pid}) on {app_addr}; leakscope on {listen}\n\
         load for {seconds} s: every 0.5 s one request to each leaky route (/leak/forever, \
         /leak/stream, /state/leak) and to each remedy (/ok/*, /state/ok).\n"
    );
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next_table = Instant::now();
    while Instant::now() < end {
        for path in [
            "/leak/forever",
            "/ok/bounded",
            "/ok/awaited",
            "/ok/aborted",
            "/ok/blocking",
            "/state/leak",
            "/state/ok",
        ] {
            fixture.get_ok(path)?;
        }
        for path in ["/leak/stream", "/ok/stream"] {
            stream_then_disconnect(app_addr, path).with_context(|| format!("GET {path}"))?;
        }
        if Instant::now() >= next_table {
            print_table(&daemon)?;
            next_table = Instant::now() + Duration::from_secs(3);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(500));
    print_table(&daemon)?;
    println!(
        "\nThe fire-and-forget loop (leak_forever) and the producer that outlives its client \
         (leak_stream) climb; their remedies (ok_*) stay at 0.\n\
         While leakscope runs, Prometheus scrapes http://{listen}/metrics \
         (JSON: http://{listen}/api/v1/tasks). Excerpt:\n"
    );
    let metrics = daemon.get_ok("/metrics")?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("leakscope_tasks_alive") && l.contains("axum_app::"))
    {
        println!("  {line}");
    }
    print_heap(&daemon)?;
    print_suspects(&daemon)?;
    println!(
        "\nThe same against your own service: leakscope daemon --pid <PID> --listen 127.0.0.1:9464\n\
         or, once: leakscope report --pid <PID> --duration 120"
    );
    Ok(())
}

/// The verdicts: each suspect with its evidence and remedy (GET /api/v1/suspects).
fn print_suspects(daemon: &Client) -> anyhow::Result<()> {
    let suspects = daemon.suspects()?;
    println!(
        "\nLeak suspects (GET /api/v1/suspects; {} s window):\n",
        suspects.window_seconds
    );
    if suspects.sites.is_empty() {
        println!("  none yet: run the demo longer (--seconds 60)");
    }
    for v in &suspects.sites {
        println!("  [{} {:.2}] {}", v.kind.as_str(), v.score, v.site);
        println!("      evidence: {}", v.reason);
        if let Some(remedy) = &v.remedy {
            println!("      remedy:   {remedy}");
        }
    }
    Ok(())
}

/// The heap callsites holding the most memory.
fn print_heap(daemon: &Client) -> anyhow::Result<()> {
    let heap = daemon.heap()?;
    println!(
        "\nHeap (--heap exact): live bytes by allocation callsite and allocating task. The \
         un-awaited task of /state/leak keeps 256 KiB per request; its remedy /state/ok stays \
         bounded. The leaked tasks' own memory shows as their task cells.\n"
    );
    let shown = &heap.groups[..heap.groups.len().min(8)];
    let width = shown.iter().map(|g| g.site.len()).max().unwrap_or(0).max(8);
    println!(
        "{:>12} {:>7}  {:<width$}  task",
        "live bytes", "blocks", "callsite"
    );
    for group in shown {
        println!(
            "{:>12} {:>7}  {:<width$}  {}",
            group.live_bytes, group.live_allocations, group.site, group.task_site,
        );
    }
    Ok(())
}

fn print_table(daemon: &Client) -> anyhow::Result<()> {
    let tasks = daemon.tasks()?;
    let mut rows = tasks.sites;
    rows.sort_by_key(|row| std::cmp::Reverse(row.alive));
    println!(
        "{:>7} {:>8} {:>10}  {:<}",
        "alive", "spawned", "oldest(s)", "spawn site"
    );
    for row in rows {
        let site = &row.site;
        let short: String = if site.len() > 90 {
            format!("{}…", &site[..site.floor_char_boundary(89)])
        } else {
            site.to_string()
        };
        println!(
            "{:>7} {:>8} {:>10.1}  {}",
            row.alive, row.spawned, row.oldest_alive_seconds, short
        );
    }
    println!(
        "events {}  lost {}\n",
        tasks.stream.events, tasks.stream.lost
    );
    Ok(())
}
