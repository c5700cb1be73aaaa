//! wrk, the load generator: one run on CPU 1, and what it reports.

use std::process::Command;

use anyhow::Context as _;

use super::{Conn, Run};

pub(crate) const WRK_THREADS: u32 = 1;
pub(crate) const WRK_CONNECTIONS: u32 = 32;

/// Parses wrk's durations: `123.45us`, `1.20ms`, `2.00s`, `1.00m`.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(value * scale)
}

/// Requests per second, latency percentiles and errors from wrk's `--latency` report.
fn parse_wrk(out: &str) -> anyhow::Result<Run> {
    let mut run = Run::default();
    let mut rps = None;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50_us = wrk_duration_us(v.trim());
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_us = wrk_duration_us(v.trim());
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            run.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    run.rps = rps.with_context(|| format!("wrk printed no Requests/sec:\n{out}"))?;
    Ok(run)
}

/// One wrk run on CPU 1 against `addr` + `path`.
pub(crate) fn wrk(
    addr: std::net::SocketAddr,
    path: &str,
    conn: Conn,
    seconds: u64,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new("taskset");
    cmd.args(["--cpu-list", "1", "wrk"])
        .arg(format!("--threads={WRK_THREADS}"))
        .arg(format!("--connections={WRK_CONNECTIONS}"))
        .arg(format!("--duration={seconds}s"))
        .args(["--timeout=2s", "--latency"]);
    if conn == Conn::Close {
        cmd.args(["--header", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}{path}"));
    parse_wrk(&crate::output(&mut cmd).context("running wrk (cargo xtask setup --bench)")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_reports() {
        let out = "Running 5s test @ http://127.0.0.1:1/healthz
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   210.50us  100.00us   5.00ms   90.00%
  Latency Distribution
     50%  180.00us
     75%  250.00us
     90%  300.00us
     99%    1.20ms
  1000 requests in 5.00s, 100.00KB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  200000.50
Transfer/sec:     20.00KB
";
        let run = parse_wrk(out).unwrap();
        assert_eq!(run.rps, 200000.5);
        assert_eq!(run.p50_us, Some(180.0));
        assert_eq!(run.p99_us, Some(1200.0));
        assert_eq!(run.errors, 9);
        assert!(parse_wrk("nothing").is_err());
    }
}
