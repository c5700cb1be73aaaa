//! `cargo xtask demo`: the leaky fixture under bounded loopback load, leakscope attached, and
//! a refreshing table of spawn sites, leaks on top.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{cargo, fixture_paths, workspace_root};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// Opens a stream, reads its first chunk and hangs up: a client that went away.
fn stream_and_leave(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let _ = stream.read(&mut buf)?;
    Ok(())
}

pub fn run(seconds: u64) -> anyhow::Result<()> {
    // Root check without libc: the effective uid is the second field of `Uid:`.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
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

    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let daemon = Command::new(&leakscope)
        .args([
            "daemon",
            "--pid",
            &app_pid.to_string(),
            "--listen",
            &listen.to_string(),
        ])
        .spawn()
        .context("starting leakscope")?;
    let mut daemon = KillOnDrop(daemon);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(listen, "/healthz").is_err() {
        if let Some(status) = daemon.0.try_wait()? {
            bail!("leakscope exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("leakscope did not come up on {listen}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    println!(
        "\nfixture axum-app (pid {app_pid}) on {app_addr}; leakscope on {listen}\n\
         load for {seconds} s: every 0.5 s one request to each leaky route (/leak/forever, \
         /leak/stream) and to each remedy (/ok/*).\n"
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
    println!(
        "\nThe same against your own service: leakscope daemon --pid <PID> --listen 127.0.0.1:9464"
    );
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
