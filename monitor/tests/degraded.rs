//! Telling the truth when the data is incomplete: events lost to a full ring, allocations
//! the kernel could not track, probes that deliver nothing. Each is counted, the process is
//! marked degraded (metric and API), and none of its affected sites is called a suspect.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use leakscope_testkit::types::{DegradedReason, Verdict};
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// Verdicts over 8 s sampled every 0.5 s: judged after 4 s.
const VERDICT_ARGS: [&str; 4] = [
    "--verdict-window-seconds",
    "8",
    "--verdict-sample-seconds",
    "0.5",
];

/// A load that leaks 5 tasks per round and runs a burst of 1500 short tasks beside them
/// (3000 events at once: far more than a one-page ring holds, nothing for the default ring).
fn leaky_burst(app: &mut OneTaskType) {
    app.command("leak 5");
    app.command("done 1500");
}

/// The verdict on `pid`'s only site, if judged.
fn site_verdict(daemon: SocketAddr, pid: u32) -> Option<(Verdict, String)> {
    let sites = Client::new(daemon).sites().expect("GET /api/v1/sites");
    sites
        .sites
        .into_iter()
        .find(|v| v.pid == pid && v.site == OneTaskType::SITE)
        .map(|v| (v.verdict, v.reason))
}

fn degraded_reasons(daemon: SocketAddr, pid: u32) -> Vec<DegradedReason> {
    let tasks = Client::new(daemon).tasks().expect("GET /api/v1/tasks");
    tasks
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .map(|p| p.degraded.iter().map(|d| d.reason).collect())
        .unwrap_or_default()
}

/// The same leaky load, watched once through the default ring (a suspect, nothing lost: the
/// load alone is a leak leakscope finds) and once through a ring of one page: there events
/// are lost, both loss counters say so, the process is degraded with reason
/// `task_events_lost` in the metrics and the API, and its site is `cannot_judge`, never a
/// suspect, for as long as the losses go on.
#[test]
fn a_ring_too_small_for_the_load_counts_its_losses_and_judges_nothing() {
    if !ebpf_available("a_ring_too_small_for_the_load_counts_its_losses_and_judges_nothing") {
        return;
    }
    // Control: the default ring keeps up and the leak is found.
    let mut app = OneTaskType::start();
    let (daemon_proc, daemon) = watch(app.pid(), &VERDICT_ARGS);
    let pid = app.pid();
    eventually("a suspect through the default ring", DEADLINE, || {
        leaky_burst(&mut app);
        match site_verdict(daemon, pid) {
            Some((Verdict::Suspect, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let samples = scrape(daemon);
    assert_eq!(sum(&samples, "leakscope_events_lost_total", &[]), 0.0);
    assert!(degraded_reasons(daemon, pid).is_empty());
    drop(daemon_proc);
    drop(app);

    // A ring of one page (64 task events) under the same load.
    let mut app = OneTaskType::start();
    let pid = app.pid();
    let mut args: Vec<String> = vec!["--pid".into(), pid.to_string()];
    args.extend(VERDICT_ARGS.iter().map(|a| a.to_string()));
    let (_daemon, daemon) = start_daemon_env(&args, &[("LEAKSCOPE_TEST_RING_BYTES", "4096")]);
    wait_attached(daemon, pid);
    eventually("losses counted and the process degraded", DEADLINE, || {
        leaky_burst(&mut app);
        let samples = scrape(daemon);
        let lost = sum(&samples, "leakscope_events_lost_total", &[]);
        let failed = sum(&samples, "leakscope_ringbuf_reserve_failures_total", &[]);
        let degraded = sum(
            &samples,
            "leakscope_process_degraded",
            &[("pid", &pid.to_string()), ("reason", "task_events_lost")],
        );
        let api = degraded_reasons(daemon, pid);
        (lost > 0.0 && failed > 0.0 && degraded == 1.0 && api == [DegradedReason::TaskEventsLost])
            .then_some(())
            .ok_or(format!(
                "lost {lost}, reserve failures {failed}, degraded metric {degraded}, API {api:?}"
            ))
    });
    // Past the time a verdict needs (half the window) and a whole window more: never a
    // suspect, and cannot_judge naming the loss once judged.
    let until = Instant::now() + Duration::from_secs(14);
    let mut last = None;
    while Instant::now() < until {
        leaky_burst(&mut app);
        let verdict = site_verdict(daemon, pid);
        if let Some((verdict, reason)) = &verdict {
            assert_ne!(
                *verdict,
                Verdict::Suspect,
                "a suspect from lossy data: {reason}"
            );
        }
        let suspects = Client::new(daemon)
            .suspects()
            .expect("GET /api/v1/suspects");
        assert!(
            suspects.sites.iter().all(|v| v.pid != pid),
            "{:?}",
            suspects.sites
        );
        last = verdict;
    }
    let (verdict, reason) = last.expect("the site was judged");
    assert_eq!(verdict, Verdict::CannotJudge, "{reason}");
    assert!(reason.contains("task_events_lost"), "{reason}");
}

/// `--heap-max-blocks 1024` under a real leak of more blocks than that: the kernel's
/// outstanding map fills, the allocations it could not track are counted
/// (`leakscope_heap_untracked_allocations_total{reason="outstanding_full"}`), the process is
/// degraded (`heap_untracked`) and its heap sites are not judged from the short totals.
#[test]
fn a_full_outstanding_map_is_counted_and_degrades_the_heap_verdicts() {
    if !ebpf_available("a_full_outstanding_map_is_counted_and_degrades_the_heap_verdicts") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let mut extra = VERDICT_ARGS.to_vec();
    extra.extend(["--heap", "exact", "--heap-max-blocks", "1024"]);
    let (_daemon, daemon) = watch(pid, &extra);
    // Each leaked task keeps its cell and its timer: 2000 of them outlive 1024 slots.
    eventually(
        "the outstanding map full, counted and degrading",
        DEADLINE,
        || {
            for _ in 0..200 {
                get_ok(addr, "/leak/forever");
            }
            let samples = scrape(daemon);
            let full = sum(
                &samples,
                "leakscope_heap_untracked_allocations_total",
                &[("reason", "outstanding_full")],
            );
            let degraded = sum(
                &samples,
                "leakscope_process_degraded",
                &[("pid", &pid.to_string()), ("reason", "heap_untracked")],
            );
            (full > 0.0 && degraded == 1.0)
                .then_some(())
                .ok_or(format!("outstanding_full {full}, degraded {degraded}"))
        },
    );
    let api = degraded_reasons(daemon, pid);
    assert!(api.contains(&DegradedReason::HeapUntracked), "{api:?}");
    eventually("heap sites judged cannot_judge", DEADLINE, || {
        get_ok(addr, "/leak/forever");
        let sites = Client::new(daemon).sites().expect("GET /api/v1/sites");
        let heap: Vec<_> = sites
            .sites
            .iter()
            .filter(|v| v.pid == pid && v.kind == leakscope_testkit::types::SiteKind::Heap)
            .collect();
        assert!(
            heap.iter().all(|v| v.verdict != Verdict::Suspect),
            "{heap:?}"
        );
        (!heap.is_empty()
            && heap
                .iter()
                .all(|v| v.verdict == Verdict::CannotJudge && v.reason.contains("heap_untracked")))
        .then_some(())
        .ok_or(format!(
            "{:?}",
            heap.iter()
                .map(|v| (&v.site, v.verdict))
                .collect::<Vec<_>>()
        ))
    });
}

/// A process whose task events stop arriving (simulated where they arrive: the drain drops
/// its pid's events, `LEAKSCOPE_TEST_SILENT_PID`) while tokio spawns tasks in it: idle, it
/// is left alone (an idle service spawns nothing); under load its hooks are placed again
/// once (counted in `leakscope_probe_reattaches_total` and the API), and, still silent, it
/// is degraded with reason `silent_probes`, not shown as a healthy process with no tasks.
#[test]
fn silent_probes_are_placed_again_then_the_process_is_degraded() {
    if !ebpf_available("silent_probes_are_placed_again_then_the_process_is_degraded") {
        return;
    }
    let mut app = OneTaskType::start();
    let pid = app.pid();
    let mut args: Vec<String> = vec!["--pid".into(), pid.to_string()];
    args.extend(VERDICT_ARGS.iter().map(|a| a.to_string()));
    let (_daemon, daemon) =
        start_daemon_env(&args, &[("LEAKSCOPE_TEST_SILENT_PID", &pid.to_string())]);
    wait_attached(daemon, pid);
    let process = || {
        Client::new(daemon)
            .tasks()
            .expect("GET /api/v1/tasks")
            .processes
            .into_iter()
            .find(|p| p.pid == pid)
            .expect("the process is listed")
    };
    // Idle for six checks (one per 0.5 s sample): silent, but tokio spawns nothing.
    let idle_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < idle_until {
        let p = process();
        assert!(p.degraded.is_empty() && p.probe_reattaches == 0, "{p:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let placed_again = eventually("the hooks placed again once", DEADLINE, || {
        app.command("done 20");
        let p = process();
        (p.probe_reattaches == 1)
            .then_some(p)
            .ok_or(format!("{:?}", process()))
    });
    assert!(placed_again.degraded.is_empty(), "{placed_again:?}");
    eventually("degraded: silent_probes", DEADLINE, || {
        app.command("done 20");
        let samples = scrape(daemon);
        let pid_label = pid.to_string();
        let degraded = sum(
            &samples,
            "leakscope_process_degraded",
            &[("pid", &pid_label), ("reason", "silent_probes")],
        );
        let reattaches = sum(
            &samples,
            "leakscope_probe_reattaches_total",
            &[("pid", &pid_label)],
        );
        let p = process();
        let reasons: Vec<_> = p.degraded.iter().map(|d| d.reason).collect();
        (degraded == 1.0 && reattaches == 1.0 && reasons == [DegradedReason::SilentProbes])
            .then_some(())
            .ok_or(format!(
                "degraded metric {degraded}, reattaches {reattaches}, API {:?}",
                p.degraded
            ))
    });
    let samples = scrape(daemon);
    let lost = sum(&samples, "leakscope_events_lost_total", &[]);
    assert_eq!(lost, 0.0, "the simulated silence is not a loss");
    // The hooks placed again do fire: their events reach the drain (which drops them).
    let before = sum(&samples, "leakscope_events_total", &[]);
    app.command("done 20");
    eventually("the new hooks' events received", DEADLINE, || {
        let events = sum(&scrape(daemon), "leakscope_events_total", &[]);
        (events >= before + 40.0)
            .then_some(())
            .ok_or(format!("{events} events, {before} before 20 tasks ran"))
    });
}
