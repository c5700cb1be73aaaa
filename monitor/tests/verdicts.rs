//! Leak verdicts end to end: the axum fixture under steady loopback traffic to every leaky
//! route and every remedy, a daemon (or `leakscope report`) attached with heap tracking,
//! and the verdicts a user pages on: exactly the three leaks of the seed are suspects,
//! each with its evidence and remedy, and none of the remedies is.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use leakscope_testkit::types::{LeakPattern, SiteKind, Verdict, VerdictsResponse};
use support::*;

const LEAKY: [&str; 2] = ["/leak/forever", "/state/leak"];
const REMEDIES: [&str; 5] = [
    "/ok/bounded",
    "/ok/awaited",
    "/ok/aborted",
    "/ok/blocking",
    "/state/ok",
];

fn site(handler: &str) -> String {
    format!("axum_app::{handler}::{{{{closure}}}}::{{{{closure}}}}")
}

/// The three leaks: (kind, site, pattern).
fn seed_leaks() -> BTreeSet<(SiteKind, String)> {
    [
        (SiteKind::Task, site("leak_forever")),
        (SiteKind::Task, site("leak_stream")),
        (SiteKind::Heap, site("state_leak")),
    ]
    .into_iter()
    .collect()
}

/// Every leaky route and every remedy.
fn mixed_routes() -> Vec<&'static str> {
    LEAKY.iter().chain(REMEDIES.iter()).copied().collect()
}

fn suspects(verdicts: &VerdictsResponse) -> BTreeSet<(SiteKind, String)> {
    verdicts
        .sites
        .iter()
        .filter(|v| v.verdict == Verdict::Suspect)
        .map(|v| (v.kind, v.site.clone()))
        .collect()
}

#[test]
fn under_mixed_traffic_exactly_the_seed_leaks_are_suspects() {
    if !ebpf_available("verdicts") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = watch_verdicts(pid, "20", "1", true);
    let routes = mixed_routes();
    let _traffic = Traffic::start(addr, &routes, &["/leak/stream", "/ok/stream"]);
    let client = Client::new(daemon);
    let verdicts = eventually(
        "the three seed leaks are suspects",
        Duration::from_secs(90),
        || {
            let verdicts: VerdictsResponse =
                client.json("/api/v1/suspects").map_err(|e| e.to_string())?;
            let found = suspects(&verdicts);
            seed_leaks()
                .is_subset(&found)
                .then_some(verdicts.clone())
                .ok_or(format!("suspects so far: {found:?}"))
        },
    );
    assert_eq!(suspects(&verdicts), seed_leaks(), "and nothing else");
    for v in &verdicts.sites {
        let pattern = v.pattern.expect("a suspect has a pattern");
        let expected = match v.kind {
            SiteKind::Task => LeakPattern::TasksNeverComplete,
            SiteKind::Heap => LeakPattern::HeapGrows,
        };
        assert_eq!(pattern, expected, "{v:?}");
        assert!(v.score > 0.5 && v.score <= 1.0, "{v:?}");
        assert!(v.remedy.is_some(), "{v:?}");
        assert!(v.reason.contains("/min for"), "{}", v.reason);
    }
    // Every remedy was judged, and is fine.
    let sites: VerdictsResponse = client.json("/api/v1/sites").expect("/api/v1/sites");
    for handler in ["ok_bounded", "ok_awaited", "ok_aborted", "ok_stream"] {
        let judged = sites
            .sites
            .iter()
            .find(|v| v.kind == SiteKind::Task && v.site == site(handler))
            .unwrap_or_else(|| panic!("{handler} was not judged"));
        assert_eq!(judged.verdict, Verdict::Ok, "{judged:?}");
    }
    // The same verdicts in /metrics, one series per suspect.
    let series: BTreeSet<(String, String)> = scrape(daemon)
        .into_iter()
        .filter(|s| s.name == "leakscope_leak_suspect" && s.value > 0.0)
        .map(|s| (s.labels["kind"].clone(), s.labels["site"].clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = seed_leaks()
        .into_iter()
        .map(|(kind, site)| (kind.as_str().to_string(), site))
        .collect();
    assert_eq!(series, expected);
}

fn report(pid: u32, seconds: u32) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .args([
            "report",
            "--pid",
            &pid.to_string(),
            "--duration",
            &seconds.to_string(),
            "--json",
        ])
        .output()
        .expect("running leakscope report")
}

#[test]
fn report_gates_a_leaky_build_and_passes_its_remedied_twin() {
    if !ebpf_available("report") {
        return;
    }
    // Leaky traffic: exit 1, the leaks in the JSON.
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let routes = mixed_routes();
    let traffic = Traffic::start(addr, &routes, &["/leak/stream", "/ok/stream"]);
    let out = report(app.pid(), 25);
    drop(traffic);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("watching"),
        "a progress indicator on stderr: {stderr}"
    );
    let verdicts: VerdictsResponse = serde_json::from_slice(&out.stdout).expect("report JSON");
    assert_eq!(suspects(&verdicts), seed_leaks());

    // The remedied twin (every leaky route serves its remedy) under the same traffic:
    // exit 0.
    let (app, addr) = start_fixture(&fixture("axum-app"), &["--remedied"]);
    let routes = mixed_routes();
    let traffic = Traffic::start(addr, &routes, &["/leak/stream", "/ok/stream"]);
    let out = report(app.pid(), 25);
    drop(traffic);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: VerdictsResponse = serde_json::from_slice(&out.stdout).expect("report JSON");
    assert!(suspects(&verdicts).is_empty());
    assert!(
        verdicts
            .sites
            .iter()
            .any(|v| v.site == site("ok_bounded") && v.verdict == Verdict::Ok)
    );

    // An error is 2, with one line saying what to do.
    let out = report(4_194_303, 2);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no process with pid 4194303"));
}

#[test]
fn real_crate_leaks_are_flagged_and_bounded_shapes_are_not() {
    if !ebpf_available("verdicts: real-crate patterns") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = watch_verdicts(pid, "20", "1", true);
    // Leaks: a task per call awaiting a oneshot nobody completes; a session record per
    // connection. Not leaks: a cache that fills then stays, steady keep-alive clients,
    // slow (3 s) tasks arriving in bursts that drain.
    let _traffic = Traffic::start(addr, &["/leak/pending", "/leak/conn", "/ok/cache"], &[]);
    let _clients = KeepAliveClients::start(addr, 4, "/ok/bounded");
    let bursts = Traffic::start(addr, &["/ok/slow"; 20], &[]);
    let client = Client::new(daemon);
    let is_leak = |kind: SiteKind, site: &str| {
        (kind == SiteKind::Task && site == "axum_app::leak_pending::{{closure}}::{{closure}}")
            || (kind == SiteKind::Heap && site.starts_with("axum_app::remember_session"))
    };
    let suspects_now = || -> Result<BTreeSet<(SiteKind, String)>, String> {
        let verdicts: VerdictsResponse =
            client.json("/api/v1/suspects").map_err(|e| e.to_string())?;
        Ok(suspects(&verdicts))
    };
    eventually("both leaks are suspects", Duration::from_secs(90), || {
        let found = suspects_now()?;
        let leaks = found.iter().filter(|(k, s)| is_leak(*k, s)).count();
        (leaks == 2)
            .then_some(())
            .ok_or(format!("suspects so far: {found:?}"))
    });
    // For another half window under the same traffic, nothing else becomes a suspect.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        let found = suspects_now().expect("suspects");
        let others: Vec<_> = found.iter().filter(|(k, s)| !is_leak(*k, s)).collect();
        assert!(others.is_empty(), "not leaks, yet suspects: {others:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(bursts);
    let sites: VerdictsResponse = client.json("/api/v1/sites").expect("/api/v1/sites");
    let slow = sites
        .sites
        .iter()
        .find(|v| v.site == site("ok_slow"))
        .expect("ok_slow judged");
    assert_eq!(slow.verdict, Verdict::Ok, "{slow:?}");
}
