//! `--tasks census` end to end: no task hook in the process (the kernel's description of the
//! daemon's links says so), and the census alone counts the axum fixture's tasks at
//! their sites: those leaked before attach and after, a bounded route's that come and go,
//! and a leak growing between censuses becomes a suspect.

mod support;

use std::time::Duration;

use leakscope_testkit::types::{Verdict, VerdictsResponse};
use support::*;

/// The census interval under test: short, so a test waits for a few of them.
const CENSUS_SECONDS: &str = "0.5";
/// A census lands within its interval; the rest is the scrape and a busy machine.
const WITHIN_A_CENSUS: Duration = Duration::from_secs(5);

fn site(handler: &str) -> String {
    format!("axum_app::{handler}::{{{{closure}}}}::{{{{closure}}}}")
}

fn alive(daemon: std::net::SocketAddr, pid: u32, site: &str) -> (f64, f64) {
    let samples = scrape(daemon);
    (
        site_value(&samples, "leakscope_tasks_alive", pid, site),
        site_value(&samples, "leakscope_tasks_alive_before_attach", pid, site),
    )
}

fn expect_alive(daemon: std::net::SocketAddr, pid: u32, site: &str, expected: (f64, f64)) {
    eventually(
        &format!("{site}: (alive, alive before attach) == {expected:?}"),
        WITHIN_A_CENSUS,
        || {
            let got = alive(daemon, pid, site);
            (got == expected)
                .then_some(())
                .ok_or(format!("got {got:?}"))
        },
    );
}

#[test]
fn census_mode_counts_tasks_with_no_task_hook_and_finds_the_leak() {
    if !ebpf_available("census-only mode") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    const BEFORE: usize = 5;
    for _ in 0..BEFORE {
        get_ok(addr, "/leak/forever");
    }
    let (daemon_proc, daemon) = watch(
        pid,
        &[
            "--tasks",
            "census",
            "--census-seconds",
            CENSUS_SECONDS,
            "--verdict-window-seconds",
            "20",
            "--verdict-sample-seconds",
            "1",
        ],
    );

    // No task hook: none counted by the daemon, none held by the kernel, no task event.
    let samples = scrape(daemon);
    let of_pid = [("pid", pid.to_string())];
    let of_pid: Vec<(&str, &str)> = of_pid.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(sum(&samples, "leakscope_task_hook_points", &of_pid), 0.0);
    let mut census_mode = of_pid.clone();
    census_mode.push(("mode", "census"));
    assert_eq!(sum(&samples, "leakscope_task_mode", &census_mode), 1.0);
    assert_eq!(
        uprobes_of(daemon_proc.pid()),
        0,
        "the kernel holds no uprobe link of the daemon (--heap off, --tasks census)"
    );

    let leak = site("leak_forever");
    let n = BEFORE as f64;
    expect_alive(daemon, pid, &leak, (n, n));

    // Leaked after attach: counted within a census, apart from those from before.
    const AFTER: usize = 10;
    for _ in 0..AFTER {
        get_ok(addr, "/leak/forever");
    }
    expect_alive(daemon, pid, &leak, (n + AFTER as f64, n));
    let samples = scrape(daemon);
    assert_eq!(
        site_value(&samples, "leakscope_tasks_census_seen_total", pid, &leak),
        AFTER as f64,
        "the ones since attach are seen, those from before are not 'seen since'"
    );
    assert!(
        !samples
            .iter()
            .any(|s| s.name == "leakscope_tasks_spawned_total"
                && s.labels.get("pid") == Some(&pid.to_string())),
        "no spawn count is claimed without a spawn hook"
    );
    assert_eq!(sum(&samples, "leakscope_events_total", &[]), 0.0);

    // Steady traffic: the leak grows between censuses; `/ok/slow`'s 3 s tasks come and go
    // (about five requests a second at most, so about fifteen alive at once).
    let slow = site("ok_slow");
    let _traffic = Traffic::start(addr, &["/leak/forever", "/ok/slow"], &[]);
    let mut slow_peak = 0.0f64;
    let client = Client::new(daemon);
    let verdicts: VerdictsResponse = eventually(
        "the task leak is a suspect in census mode",
        Duration::from_secs(90),
        || {
            slow_peak = slow_peak.max(alive(daemon, pid, &slow).0);
            let verdicts: VerdictsResponse =
                client.json("/api/v1/sites").map_err(|e| e.to_string())?;
            verdicts
                .sites
                .iter()
                .any(|v| v.pid == pid && v.site == leak && v.verdict == Verdict::Suspect)
                .then_some(verdicts.clone())
                .ok_or(format!(
                    "{:?}",
                    verdicts
                        .sites
                        .iter()
                        .filter(|v| v.pid == pid)
                        .map(|v| (&v.site, v.verdict, &v.reason))
                        .collect::<Vec<_>>()
                ))
        },
    );
    let slow_verdict = verdicts
        .sites
        .iter()
        .find(|v| v.pid == pid && v.site == slow)
        .unwrap_or_else(|| panic!("{slow} judged: {:?}", verdicts.sites));
    assert_ne!(slow_verdict.verdict, Verdict::Suspect, "{slow_verdict:?}");
    assert!(
        slow_peak > 0.0 && slow_peak <= 20.0,
        "the bounded site is seen and does not grow: at most {slow_peak} alive"
    );
    let leak_verdict = verdicts
        .sites
        .iter()
        .find(|v| v.pid == pid && v.site == leak)
        .expect("the leak's verdict");
    assert!(
        leak_verdict.reason.contains("the censuses listed"),
        "the reason says what was counted: {}",
        leak_verdict.reason
    );
}
