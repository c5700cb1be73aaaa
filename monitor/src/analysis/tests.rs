//! The analyzer over whole snapshots: sampling, folding a leaked task's memory into its
//! task suspect, forgetting exited processes.

use super::*;

fn task_row(site: &str, alive: u64, spawned: u64, completed: u64) -> SiteSnapshot {
    SiteSnapshot {
        pid: 7,
        exe: "app".into(),
        site: site.into(),
        location: None,
        spawned,
        completed,
        alive,
        oldest_alive_seconds: 30.0,
        alive_before_attach: 0,
        oldest_alive_at_least: false,
        completion_hooked: true,
        census_seen: None,
        census_gone: None,
    }
}

fn heap_row(site: &str, task_site: &str, live_bytes: u64) -> HeapGroupSnapshot {
    HeapGroupSnapshot {
        pid: 7,
        exe: "app".into(),
        site: site.into(),
        location: None,
        task_site: task_site.into(),
        live_bytes,
        live_allocations: 1,
    }
}

const LEAK: &str = "app::leak::{{closure}}";
const OK: &str = "app::ok::{{closure}}";
const STATE: &str = "app::state::remember";

/// One minute of samples, one a second: a task leak with growing cells, a healthy site,
/// and state that only grows.
fn analyzer_after_a_minute() -> Analyzer {
    let mut analyzer = Analyzer::new(AnalysisConfig::new(1.0, 30.0));
    for i in 0..60u64 {
        let t = i as f64;
        let tasks = [
            task_row(LEAK, 2 * i, 2 * i, 0),
            task_row(OK, 1, 50 * i + 1, 50 * i),
        ];
        let heap = [
            heap_row(&format!("{TASK_CELL}{LEAK}"), "none", 2 * i * 512),
            heap_row("tokio::sync::mpsc::bounded::channel", LEAK, 2 * i * 40_000),
            heap_row(STATE, STATE, 262_144 * i),
            heap_row("app::ok::buffer", OK, 4096),
        ];
        analyzer.observe(t, &tasks, &heap);
    }
    analyzer
}

#[test]
fn a_leak_is_one_suspect_with_the_memory_its_tasks_hold() {
    let analyzer = analyzer_after_a_minute();
    let suspects = analyzer.suspects();
    let names: Vec<(SiteKind, &str)> = suspects
        .sites
        .iter()
        .map(|v| (v.kind, v.site.as_str()))
        .collect();
    assert_eq!(
        names.len(),
        2,
        "{:#?}",
        analyzer
            .sites()
            .sites
            .iter()
            .map(|v| (&v.site, v.verdict, &v.reason))
            .collect::<Vec<_>>()
    );
    assert!(names.contains(&(SiteKind::Task, LEAK)), "{names:?}");
    assert!(names.contains(&(SiteKind::Heap, STATE)), "{names:?}");
    let leak = suspects.sites.iter().find(|v| v.site == LEAK).unwrap();
    assert!(leak.reason.contains("they hold"), "{}", leak.reason);
    assert!(leak.suspect_since.is_some_and(|t| t < 59.0));
    // The leaked tasks' cells and channels are reported under the task suspect only.
    let sites = analyzer.sites();
    let cell = sites
        .sites
        .iter()
        .find(|v| v.site.starts_with(TASK_CELL))
        .unwrap();
    assert_eq!(cell.verdict, Verdict::Ok);
    assert!(
        cell.reason.contains("held by the leaked tasks of"),
        "{}",
        cell.reason
    );
    let ok = sites.sites.iter().find(|v| v.site == OK).unwrap();
    assert_eq!(ok.verdict, Verdict::Ok, "{ok:?}");
    assert!(ok.samples.len() <= 32, "{}", ok.samples.len());
}

#[test]
fn sites_of_an_exited_process_are_forgotten() {
    let mut analyzer = analyzer_after_a_minute();
    analyzer.observe(61.0, &[], &[]);
    assert!(analyzer.sites().sites.is_empty());
    assert_eq!(analyzer.samples_held(), 0);
}

/// A process that lost task events in the window has its task sites judged `cannot_judge`
/// with the reason, never suspects; its heap sites, whose stream lost nothing, are judged.
#[test]
fn a_process_that_lost_events_is_not_judged_from_them() {
    use leakscope_api::types::{Degradation, DegradedReason};
    let mut analyzer = analyzer_after_a_minute();
    let lost = Degradation {
        reason: DegradedReason::TaskEventsLost,
        detail: "12 task events lost".into(),
        count: 12,
        since: 55.0,
        last_seen: 59.0,
    };
    analyzer.set_degraded(HashMap::from([(7, vec![lost])]));
    analyzer.observe(
        60.0,
        &[task_row(LEAK, 120, 120, 0)],
        &[
            heap_row(&format!("{TASK_CELL}{LEAK}"), "none", 120 * 512),
            heap_row(STATE, STATE, 262_144 * 60),
        ],
    );
    let sites = analyzer.sites();
    let leak = sites.sites.iter().find(|v| v.site == LEAK).unwrap();
    assert_eq!(leak.verdict, Verdict::CannotJudge, "{leak:?}");
    assert!(
        leak.reason
            .contains("task_events_lost: 12 task events lost"),
        "{}",
        leak.reason
    );
    let state = sites.sites.iter().find(|v| v.site == STATE).unwrap();
    assert_eq!(state.verdict, Verdict::Suspect, "{state:?}");
    // The leaked tasks' cells are named after their task site: not judged either, rather
    // than paged on their own while their task site cannot be.
    let cell = format!("{TASK_CELL}{LEAK}");
    let cell = sites.sites.iter().find(|v| v.site == cell).unwrap();
    assert_eq!(cell.verdict, Verdict::CannotJudge, "{cell:?}");
    // Once the process's figures are whole again, the site is judged again.
    analyzer.set_degraded(HashMap::new());
    analyzer.observe(
        61.0,
        &[task_row(LEAK, 122, 122, 0)],
        &[heap_row(STATE, STATE, 262_144 * 61)],
    );
    let leak = analyzer
        .sites()
        .sites
        .into_iter()
        .find(|v| v.site == LEAK)
        .unwrap();
    assert_eq!(leak.verdict, Verdict::Suspect, "{leak:?}");
}
