use super::*;
use crate::discovery::{NamingMethod, TaskVtable};

fn image() -> Arc<TargetImage> {
    let vtable = |vaddr: u64, site: &str| TaskVtable {
        vaddr,
        site: site.to_string(),
        naming: NamingMethod::FuturePollCall,
        complete_hooked: true,
        ..TaskVtable::default()
    };
    Arc::new(TargetImage {
        vtables: vec![
            vtable(0x1000, "app::leak::{{closure}}"),
            vtable(0x2000, "app::ok::{{closure}}"),
            vtable(0x3000, "app::ok::{{closure}}"),
        ],
        ..TargetImage::default()
    })
}

fn event(kind: TaskEventKind, header: u64, vtable: u64, seq: u64) -> TaskEvent {
    TaskEvent {
        ktime_ns: seq * 1_000_000_000,
        seq,
        header,
        vtable,
        pid: 7,
        tid: 7,
        cpu: 0,
        kind: kind as u32,
        task_id: header,
    }
}

const BIAS: u64 = 0x5555_0000_0000;

fn ledger() -> TaskLedger {
    let mut ledger = TaskLedger::new();
    ledger.add_process(ProcessTasks::new(7, "app".into(), image(), BIAS));
    ledger
}

fn row<'a>(rows: &'a [SiteSnapshot], site: &str) -> &'a SiteSnapshot {
    rows.iter()
        .find(|r| r.site == site)
        .unwrap_or_else(|| panic!("no row for {site} in {rows:?}"))
}

#[test]
fn counts_alive_per_site_and_oldest_age() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 2));
    ledger.apply(&event(TaskEventKind::Spawn, 0xc0, BIAS + 0x2000, 3));
    ledger.apply(&event(TaskEventKind::Complete, 0xc0, BIAS + 0x2000, 4));
    let rows = ledger.snapshot(10_000_000_000);
    let leak = row(&rows, "app::leak::{{closure}}");
    assert_eq!((leak.spawned, leak.completed, leak.alive), (2, 0, 2));
    assert_eq!(leak.oldest_alive_seconds, 9.0);
    let ok = row(&rows, "app::ok::{{closure}}");
    assert_eq!((ok.spawned, ok.completed, ok.alive), (1, 1, 0));
    assert_eq!(ok.oldest_alive_seconds, 0.0);
}

#[test]
fn a_process_counts_as_attached_only_once_its_probes_are_in() {
    let mut ledger = ledger();
    // Registered (events already find it) but its probes are still going in.
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
    assert_eq!(ledger.attached_processes(), 0);
    ledger.mark_probes_ready(7, 0);
    assert_eq!(ledger.attached_processes(), 1);
    ledger.remove_process(7);
    assert_eq!(ledger.attached_processes(), 0);
}

#[test]
fn vtables_with_one_label_are_one_site() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x2000, 1));
    ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x3000, 2));
    let rows = ledger.snapshot(3_000_000_000);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].alive, 2);
}

#[test]
fn completion_of_a_task_spawned_before_attach_never_goes_negative() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Complete, 0xdead, BIAS + 0x1000, 1));
    assert!(ledger.snapshot(0).is_empty());
    let process = ledger.processes().next().unwrap();
    assert_eq!(process.completed_untracked, 1);
}

#[test]
fn sites_beyond_the_limit_share_one_label_and_are_counted() {
    let mut ledger = ledger();
    let extra = 20;
    for i in 0..(MAX_SITES_PER_PROCESS + extra) as u64 {
        ledger.apply(&event(
            TaskEventKind::Spawn,
            0xa0 + 0x100 * i,
            BIAS + 0x10_0000 + 0x40 * i,
            i + 1,
        ));
    }
    let rows = ledger.snapshot(1);
    assert_eq!(rows.len(), MAX_SITES_PER_PROCESS + 1);
    assert_eq!(row(&rows, OVERFLOW_SITE).spawned, extra as u64);
    assert_eq!(ledger.process(7).unwrap().sites_folded(), extra as u64);
}

#[test]
fn unknown_vtable_gets_an_address_label() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x9000, 1));
    let rows = ledger.snapshot(1);
    assert_eq!(rows[0].site, "vtable@0x9000");
}

#[test]
fn sequence_gaps_count_as_lost_events() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 5));
    assert_eq!(ledger.stream.stats.lost, 3);
    assert_eq!(ledger.stream.stats.events, 2);
}

#[test]
fn reused_header_counts_a_missed_completion() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x2000, 2));
    let rows = ledger.snapshot(3_000_000_000);
    assert_eq!(row(&rows, "app::leak::{{closure}}").alive, 0);
    assert_eq!(row(&rows, "app::ok::{{closure}}").alive, 1);
    assert_eq!(ledger.processes().next().unwrap().completions_missed, 1);
}

#[test]
fn first_poll_counts_as_spawn_once() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::FirstPoll, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::FirstPoll, 0xa0, BIAS + 0x1000, 2));
    ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 3));
    ledger.apply(&event(TaskEventKind::FirstPoll, 0xb0, BIAS + 0x1000, 4));
    let rows = ledger.snapshot(5_000_000_000);
    let leak = row(&rows, "app::leak::{{closure}}");
    assert_eq!((leak.spawned, leak.alive), (2, 2));
    assert_eq!(leak.oldest_alive_seconds, 4.0);
}

#[test]
fn first_polls_of_tasks_spawned_before_attach_are_not_spawns() {
    let mut ledger = TaskLedger::new();
    let mut process = ProcessTasks::new(7, "app".into(), image(), BIAS);
    process.first_task_id_after_attach = Some(0xb0);
    ledger.add_process(process);
    // Task 0xa0 predates attach; 0xb0 and 0xc0 do not.
    ledger.apply(&event(TaskEventKind::FirstPoll, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::FirstPoll, 0xb0, BIAS + 0x1000, 2));
    ledger.apply(&event(TaskEventKind::FirstPoll, 0xc0, BIAS + 0x1000, 3));
    ledger.apply(&event(TaskEventKind::Complete, 0xa0, BIAS + 0x1000, 4));
    let rows = ledger.snapshot(5_000_000_000);
    let leak = row(&rows, "app::leak::{{closure}}");
    assert_eq!((leak.spawned, leak.alive), (2, 2));
    let process = ledger.process(7).unwrap();
    assert_eq!(process.seen_spawned_before_attach, 1);
    assert_eq!(process.completed_untracked, 1);
}

#[test]
fn task_ids_resolve_to_sites_after_completion() {
    let mut ledger = ledger();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::Complete, 0xa0, BIAS + 0x1000, 2));
    let process = ledger.process(7).unwrap();
    assert_eq!(process.site_of_task(0xa0), Some("app::leak::{{closure}}"));
    assert_eq!(process.site_of_task(0xb0), None);
    assert_eq!(process.site_of_live_task(0xa0), None);
}

#[test]
fn events_before_registration_are_replayed_when_the_process_registers() {
    let mut ledger = TaskLedger::new();
    ledger.apply(&event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1));
    ledger.apply(&event(TaskEventKind::Spawn, 0xb0, BIAS + 0x1000, 2));
    ledger.apply(&event(TaskEventKind::Complete, 0xb0, BIAS + 0x1000, 3));
    assert!(ledger.snapshot(0).is_empty());
    ledger.add_process(ProcessTasks::new(7, "app".into(), image(), BIAS));
    let rows = ledger.snapshot(4_000_000_000);
    let leak = row(&rows, "app::leak::{{closure}}");
    assert_eq!((leak.spawned, leak.completed, leak.alive), (2, 1, 1));
    assert_eq!(ledger.stream.stats.ignored, 0);
}

#[test]
fn events_of_processes_never_registered_expire() {
    let mut ledger = TaskLedger::new();
    let mut e = event(TaskEventKind::Spawn, 0xa0, BIAS + 0x1000, 1);
    e.pid = 99;
    ledger.apply(&e);
    e.pid = 100;
    ledger.apply(&e);
    // pid 99 exited; pid 100 lives but is held for less than the age bound.
    ledger.expire_pending(e.ktime_ns + 1, |pid| pid == 100);
    assert_eq!(ledger.stream.stats.ignored, 1);
    ledger.expire_pending(
        e.ktime_ns + crate::state::pending::PENDING_MAX_AGE_NS,
        |_| true,
    );
    assert_eq!(ledger.stream.stats.ignored, 2);
    ledger.add_process(ProcessTasks::new(100, "app".into(), image(), BIAS));
    assert!(ledger.snapshot(0).is_empty());
}

mod census {
    use super::*;
    use crate::targets::census::{CensusFigures, CensusOutcome, CensusTask};

    const ATTACH_NS: u64 = 1_000_000_000;
    /// tokio's next task id when the process was attached.
    const FIRST_AFTER_ATTACH: u64 = 100;

    fn attached_late() -> TaskLedger {
        let mut ledger = TaskLedger::new();
        let mut process = ProcessTasks::new(7, "app".into(), image(), BIAS);
        process.first_task_id_after_attach = Some(FIRST_AFTER_ATTACH);
        process.registered_ns = ATTACH_NS;
        ledger.add_process(process);
        ledger
    }

    fn found(ids: &[u64]) -> Vec<CensusTask> {
        ids.iter()
            .map(|&id| CensusTask {
                header: 0x1000 * id,
                vtable: BIAS + 0x1000,
                task_id: id,
            })
            .collect()
    }

    fn census(ledger: &mut TaskLedger, ids: &[u64], complete: bool) {
        let target = ledger.census_targets().pop().expect("a census target");
        let outcome = CensusOutcome::of_one_list(found(ids), complete);
        ledger.apply_census(&target, &outcome, CensusFigures::default(), 0);
    }

    fn complete(ledger: &mut TaskLedger, id: u64, seq: u64) {
        // Completion events carry no task id (the probe reads it at spawn only).
        let mut e = event(TaskEventKind::Complete, 0x1000 * id, BIAS + 0x1000, seq);
        e.task_id = 0;
        ledger.apply(&e);
    }

    fn leak(ledger: &TaskLedger) -> SiteSnapshot {
        row(&ledger.snapshot(11 * ATTACH_NS), "app::leak::{{closure}}").clone()
    }

    #[test]
    fn tasks_from_before_attach_are_alive_once_and_a_completion_takes_one_away() {
        let mut ledger = attached_late();
        // Task 150 was spawned since attach: the hooks count it, the census leaves it.
        let mut spawn = event(TaskEventKind::Spawn, 0x1000 * 150, BIAS + 0x1000, 1);
        spawn.task_id = 150;
        spawn.ktime_ns = 5 * ATTACH_NS;
        ledger.apply(&spawn);
        census(&mut ledger, &[5, 6, 150], true);
        census(&mut ledger, &[5, 6, 150], true);
        let row = leak(&ledger);
        assert_eq!((row.alive, row.alive_before_attach, row.spawned), (3, 2, 1));
        assert!(row.oldest_alive_at_least);
        assert_eq!(row.oldest_alive_seconds, 10.0, "at least since attach");
        complete(&mut ledger, 5, 2);
        let row = leak(&ledger);
        assert_eq!(
            (row.alive, row.alive_before_attach, row.completed),
            (2, 1, 0)
        );
        assert_eq!(ledger.process(7).unwrap().completed_untracked, 1);
        assert_eq!(
            ledger.process(7).unwrap().site_of_task(6),
            Some("app::leak::{{closure}}")
        );
    }

    #[test]
    fn a_task_whose_completion_was_seen_during_a_census_is_not_taken_in() {
        let mut ledger = attached_late();
        complete(&mut ledger, 7, 1);
        census(&mut ledger, &[7, 8], true);
        let row = leak(&ledger);
        assert_eq!((row.alive, row.alive_before_attach), (1, 1));
        assert_eq!(ledger.process(7).unwrap().completed_untracked, 1);
    }

    #[test]
    fn a_task_a_complete_census_no_longer_finds_is_taken_out() {
        let mut ledger = attached_late();
        census(&mut ledger, &[5, 6], true);
        // A list not read to its end says nothing about what it did not reach.
        census(&mut ledger, &[6], false);
        assert_eq!(leak(&ledger).alive, 2);
        census(&mut ledger, &[6], true);
        let row = leak(&ledger);
        assert_eq!((row.alive, row.alive_before_attach), (1, 1));
        assert_eq!(ledger.process(7).unwrap().census_vanished, 1);
        // Its completion, arriving late, is untracked and takes nothing more away.
        complete(&mut ledger, 5, 1);
        assert_eq!(leak(&ledger).alive, 1);
    }

    #[test]
    fn a_first_poll_of_a_census_found_task_is_no_spawn() {
        let mut ledger = attached_late();
        census(&mut ledger, &[5], true);
        let mut poll = event(TaskEventKind::FirstPoll, 0x1000 * 5, BIAS + 0x1000, 1);
        poll.task_id = 5;
        ledger.apply(&poll);
        let row = leak(&ledger);
        assert_eq!((row.spawned, row.alive, row.alive_before_attach), (0, 1, 1));
        assert_eq!(ledger.process(7).unwrap().seen_spawned_before_attach, 1);
    }

    #[test]
    fn tasks_spawned_while_the_hooks_went_in_are_taken_in_once() {
        let mut ledger = attached_late();
        // The id counter read 110 once every hook was in: 100..110 may have been missed.
        ledger.set_census_boundary(7, 110);
        // 104's spawn hook fired (its event not read yet); 105's did not.
        census(&mut ledger, &[104, 105, 120], true);
        assert_eq!(leak(&ledger).alive, 2, "120 is the hooks' alone");
        let mut spawn = event(TaskEventKind::Spawn, 0x1000 * 104, BIAS + 0x1000, 1);
        spawn.task_id = 104;
        ledger.apply(&spawn);
        let row = leak(&ledger);
        assert_eq!((row.spawned, row.alive, row.alive_before_attach), (1, 2, 1));
        assert_eq!(ledger.process(7).unwrap().completions_missed, 0);
        census(&mut ledger, &[104, 105], true);
        assert_eq!(leak(&ledger).alive, 2);
    }

    /// `--tasks census`: the census alone, no hook.
    fn census_only() -> TaskLedger {
        let mut ledger = TaskLedger::new();
        let mut process = ProcessTasks::new(7, "app".into(), image(), BIAS);
        process.first_task_id_after_attach = Some(FIRST_AFTER_ATTACH);
        process.registered_ns = ATTACH_NS;
        process.census_only = true;
        ledger.add_process(process);
        ledger
    }

    fn census_at(ledger: &mut TaskLedger, ids: &[u64], complete: bool, now_ns: u64) {
        let target = ledger.census_targets().pop().expect("a census target");
        let outcome = CensusOutcome::of_one_list(found(ids), complete);
        ledger.apply_census(&target, &outcome, CensusFigures::default(), now_ns);
    }

    #[test]
    fn census_only_every_listed_task_is_alive_and_an_unlisted_one_gone() {
        let mut ledger = census_only();
        census_at(&mut ledger, &[5, 150, 151], true, 2 * ATTACH_NS);
        let row = leak(&ledger);
        assert_eq!((row.alive, row.alive_before_attach), (3, 1));
        assert_eq!((row.census_seen, row.census_gone), (Some(2), Some(0)));
        assert_eq!(
            (row.spawned, row.completed),
            (0, 0),
            "no hook, no spawn counted"
        );
        assert!(row.oldest_alive_at_least && row.completion_hooked);
        // Listed again: the same tasks, not new ones; an unread list removes nothing.
        census_at(&mut ledger, &[5, 150, 151, 152], true, 4 * ATTACH_NS);
        census_at(&mut ledger, &[152], false, 5 * ATTACH_NS);
        let row = leak(&ledger);
        assert_eq!(
            (row.alive, row.census_seen, row.census_gone),
            (4, Some(3), Some(0))
        );
        census_at(&mut ledger, &[150, 152], true, 6 * ATTACH_NS);
        let row = leak(&ledger);
        assert_eq!((row.alive, row.alive_before_attach), (2, 0));
        assert_eq!((row.census_seen, row.census_gone), (Some(3), Some(1)));
        assert_eq!(ledger.process(7).unwrap().completed_untracked, 1);
        // 150's age counts from the census that first listed it.
        assert_eq!(row.oldest_alive_seconds, 9.0);
    }

    #[test]
    fn census_only_a_new_task_on_a_freed_header_replaces_the_old() {
        let mut ledger = census_only();
        census_at(&mut ledger, &[150], true, 2 * ATTACH_NS);
        // Task 150's header taken by task 160 (same vtable) between two censuses.
        let mut reused = found(&[160]);
        reused[0].header = 0x1000 * 150;
        let target = ledger.census_targets().pop().unwrap();
        let outcome = CensusOutcome::of_one_list(reused, true);
        ledger.apply_census(&target, &outcome, CensusFigures::default(), 3 * ATTACH_NS);
        let row = leak(&ledger);
        assert_eq!(
            (row.alive, row.census_seen, row.census_gone),
            (1, Some(2), Some(1))
        );
    }

    #[test]
    fn no_census_where_every_task_was_seen_from_exec() {
        let ledger = ledger();
        assert!(ledger.census_targets().is_empty());
    }
}
