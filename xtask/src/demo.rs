//! `cargo xtask demo`: the leaky fixture under bounded loopback load, leakscope attached, and
//! a refreshing table of spawn sites, leaks on top.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::util::{KillOnDrop, get, is_root, start_leakscope_with, stream_and_leave};
use crate::{cargo, fixture_paths, workspace_root};

pub fn demo(seconds: u64) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs: run it as root (e.g. `sudo -E cargo xtask demo`)");
    }
    crate::run(cargo().args(["build", "--release", "-p", "monitor"]))?;
    let leakscope = workspace_root().join("target/release/leakscope");

    let mut app = Command::new(fixture_paths().axum_app)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the fixture")?;
    let mut first_line = String::new();
    {
        use std::io::BufRead;
        let stdout = app.stdout.take().context("fixture stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut first_line)?;
    }
    let app_pid = app.id();
    let _app = KillOnDrop(app);
    let app_addr: SocketAddr = first_line
        .trim()
        .strip_prefix("listening on ")
        .context("fixture did not say where it listens")?
        .parse()?;

    let (_daemon, listen) = start_leakscope_with(&leakscope, app_pid, &["--heap", "exact"])?;

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
            get(app_addr, path).with_context(|| format!("GET {path}"))?;
        }
        stream_and_leave(app_addr, "/leak/stream")?;
        stream_and_leave(app_addr, "/ok/stream")?;
        if Instant::now() >= next_table {
            print_table(listen)?;
            next_table = Instant::now() + Duration::from_secs(3);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(500));
    print_table(listen)?;
    println!(
        "\nSites whose alive count keeps climbing are leak suspects: above, the fire-and-forget \
         loop (leak_forever) and the producer that outlives its client (leak_stream); their \
         remedies (ok_*) stay at 0.\n\
         While leakscope runs, Prometheus scrapes http://{listen}/metrics \
         (JSON: http://{listen}/api/v1/tasks). Excerpt:\n"
    );
    let metrics = get(listen, "/metrics")?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("leakscope_tasks_alive") && l.contains("axum_app::"))
    {
        println!("  {line}");
    }
    print_heap(listen)?;
    println!(
        "\nThe same against your own service: leakscope daemon --pid <PID> --listen 127.0.0.1:9464"
    );
    Ok(())
}

/// The heap callsites holding the most memory.
fn print_heap(listen: SocketAddr) -> anyhow::Result<()> {
    let body = get(listen, "/api/v1/heap")?;
    let json: serde_json::Value = serde_json::from_str(&body).context("parsing /api/v1/heap")?;
    println!(
        "\nHeap (--heap exact): live bytes by allocation callsite and allocating task. The \
         un-awaited task of /state/leak keeps 256 KiB per request; its remedy /state/ok stays \
         bounded. The leaked tasks' own memory shows as their task cells.\n"
    );
    let groups = json["groups"].as_array().cloned().unwrap_or_default();
    let shown = &groups[..groups.len().min(8)];
    let site = |group: &serde_json::Value| group["site"].as_str().unwrap_or("?").to_string();
    let width = shown
        .iter()
        .map(|g| site(g).len())
        .max()
        .unwrap_or(0)
        .max(8);
    println!(
        "{:>12} {:>7}  {:<width$}  task",
        "live bytes", "blocks", "callsite"
    );
    for group in shown {
        println!(
            "{:>12} {:>7}  {:<width$}  {}",
            group["live_bytes"].as_u64().unwrap_or(0),
            group["live_allocations"].as_u64().unwrap_or(0),
            site(group),
            group["task_site"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

fn print_table(listen: SocketAddr) -> anyhow::Result<()> {
    let body = get(listen, "/api/v1/tasks")?;
    let json: serde_json::Value = serde_json::from_str(&body).context("parsing /api/v1/tasks")?;
    let mut rows: Vec<&serde_json::Value> = json["sites"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    rows.sort_by(|a, b| {
        let alive = |v: &serde_json::Value| v["alive"].as_u64().unwrap_or(0);
        alive(b).cmp(&alive(a))
    });
    println!(
        "{:>7} {:>8} {:>10}  {:<}",
        "alive", "spawned", "oldest(s)", "spawn site"
    );
    for row in rows {
        let site = row["site"].as_str().unwrap_or("?");
        let short: String = if site.len() > 90 {
            format!("{}…", &site[..site.floor_char_boundary(89)])
        } else {
            site.to_string()
        };
        println!(
            "{:>7} {:>8} {:>10.1}  {}",
            row["alive"].as_u64().unwrap_or(0),
            row["spawned"].as_u64().unwrap_or(0),
            row["oldest_alive_seconds"].as_f64().unwrap_or(0.0),
            short
        );
    }
    println!(
        "events {}  lost {}\n",
        json["stream"]["events"], json["stream"]["lost"]
    );
    Ok(())
}
