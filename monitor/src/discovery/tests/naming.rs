//! Naming spawn sites: by the poll walk, by elimination, on both fixtures.

use super::*;

#[test]
fn fixture_async_sites_are_named_by_their_poll_function() {
    let t = fixture();
    for site in ASYNC_SITES {
        let found = sites(t, site);
        assert_eq!(
            found.len(),
            2,
            "expected one vtable per scheduler for {site}; sites: {:#?}",
            t.vtables.iter().map(|v| &v.site).collect::<Vec<_>>()
        );
        let schedulers: HashSet<_> = found.iter().map(|v| v.scheduler).collect();
        assert_eq!(
            schedulers,
            HashSet::from([Some(Scheduler::CurrentThread), Some(Scheduler::MultiThread)]),
            "{site}"
        );
        for v in found {
            assert_eq!(v.naming, NamingMethod::FuturePollCall, "{site}: {v:?}");
            assert!(!v.blocking, "{site}");
            assert!(v.complete_hooked, "{site}: completion hook not reachable");
            assert_eq!(v.scheduler_offset, 32, "{site}");
        }
    }
}

#[test]
fn fixture_inlined_and_blocking_sites_are_named() {
    let t = fixture();
    // `ok_awaited`'s tiny future is inlined into the task glue in release builds.
    let awaited = sites(t, "axum_app::ok_awaited::{{closure}}::{{closure}}");
    assert_eq!(awaited.len(), 2, "{:#?}", t.vtables);
    for v in awaited {
        assert!(
            matches!(
                v.naming,
                NamingMethod::FuturePollCall | NamingMethod::CellDropGlue
            ),
            "{v:?}"
        );
    }
    // spawn_blocking: labelled with the closure, one vtable (BlockingSchedule).
    let blocking = sites(t, "axum_app::ok_blocking::{{closure}}::{{closure}}");
    assert_eq!(blocking.len(), 1, "{:#?}", t.vtables);
    let b = blocking[0];
    assert!(b.blocking);
    assert_eq!(b.scheduler, Some(Scheduler::Blocking));
    assert!(matches!(
        b.naming,
        NamingMethod::FuturePollCall | NamingMethod::CellDropGlue
    ));
    assert!(b.complete_hooked);
}

/// Handlers of the fixture that spawn one async task each.
const HANDLERS: &[&str] = &[
    "leak_forever",
    "leak_stream",
    "ok_stream",
    "ok_bounded",
    "ok_awaited",
    "ok_aborted",
    "state_leak",
    "leak_pending",
    "ok_slow",
];

/// Every spawn site of the fixture source has exactly its vtables, whichever tokio it was
/// built against: one per scheduler for async tasks, one for the `spawn_blocking` closure.
fn check_fixture_sites(t: &TargetImage, krate: &str) {
    let all = || t.vtables.iter().map(|v| &v.site).collect::<Vec<_>>();
    let per_scheduler = |site: &str| {
        let found = sites(t, site);
        assert_eq!(found.len(), 2, "{krate}: {site}: {:#?}", all());
        let schedulers: HashSet<_> = found.iter().map(|v| v.scheduler).collect();
        assert_eq!(
            schedulers,
            HashSet::from([Some(Scheduler::CurrentThread), Some(Scheduler::MultiThread)]),
            "{krate}: {site}"
        );
    };
    for h in HANDLERS {
        per_scheduler(&format!("{krate}::{h}::{{{{closure}}}}::{{{{closure}}}}"));
    }
    per_scheduler(&format!("{krate}::housekeeping::{{{{closure}}}}"));
    let blocking = sites(
        t,
        &format!("{krate}::ok_blocking::{{{{closure}}}}::{{{{closure}}}}"),
    );
    assert_eq!(blocking.len(), 1, "{krate}: {:#?}", all());
    assert_eq!(blocking[0].scheduler, Some(Scheduler::Blocking));
    for v in &t.vtables {
        assert!(!v.site.contains(" | "), "{krate}: still ambiguous: {v:?}");
        assert_ne!(v.naming, NamingMethod::StrippedScan, "{krate}: {v:?}");
    }
}

#[test]
fn fixture_every_handler_has_one_site_per_scheduler() {
    check_fixture_sites(fixture(), "axum_app");
}

#[test]
fn lts_every_handler_has_one_site_per_scheduler() {
    check_fixture_sites(lts_fixture(), "axum_app_lts");
}

/// tokio 1.47 build: `ok_bounded`'s `async { sleep(20ms).await }` is inlined into the task
/// glue, so the poll walk reaches `<Sleep as Future>::poll`; and its drop glue is folded
/// with `housekeeping`'s. The site must still be the async block, never `Sleep`.
#[test]
fn lts_inlined_sleep_block_is_not_named_after_sleep() {
    let t = lts_fixture();
    for v in &t.vtables {
        assert!(
            !v.site.contains("tokio::time::sleep::Sleep"),
            "named after a library future: {v:?}"
        );
    }
    let bounded = sites(t, "axum_app_lts::ok_bounded::{{closure}}::{{closure}}");
    assert_eq!(bounded.len(), 2, "{:#?}", t.vtables);
    let schedulers: HashSet<_> = bounded.iter().map(|v| v.scheduler).collect();
    assert_eq!(
        schedulers,
        HashSet::from([Some(Scheduler::CurrentThread), Some(Scheduler::MultiThread)])
    );
    let housekeeping = sites(t, "axum_app_lts::housekeeping::{{closure}}");
    assert_eq!(housekeeping.len(), 2, "{:#?}", t.vtables);
    for v in bounded.iter().chain(&housekeeping) {
        assert_eq!(v.naming, NamingMethod::CellDropGlue, "{v:?}");
        assert!(v.complete_hooked, "{v:?}");
    }
    // The two folded sites are told apart, so no doubt is left to warn about.
    assert!(
        !t.warnings
            .iter()
            .any(|w| w.contains("Sleep") || w.contains("tell apart")),
        "{:#?}",
        t.warnings
    );
}

fn site(scheduler: Option<Scheduler>, candidates: &[&str]) -> resolve::Site {
    resolve::Site {
        scheduler,
        candidates: candidates.iter().map(|c| c.to_string()).collect(),
    }
}

#[test]
fn elimination_narrows_folded_candidates_to_a_fixed_point() {
    use Scheduler::{CurrentThread as Ct, MultiThread as Mt};
    let mut sites = vec![
        // Known, per scheduler.
        site(Some(Ct), &["app::a"]),
        site(Some(Mt), &["app::b"]),
        // {a, b} on Ct: a is taken on Ct → b.
        site(Some(Ct), &["app::a", "app::b"]),
        // {b, c} on Ct: only resolvable once the site above became b → c (second round).
        site(Some(Ct), &["app::b", "app::c"]),
        // {a, b} on Mt: b is taken on Mt → a.
        site(Some(Mt), &["app::a", "app::b"]),
        // Two sites with the same two candidates and nothing known: stays ambiguous.
        site(Some(Mt), &["app::x", "app::y"]),
        site(Some(Mt), &["app::x", "app::y"]),
        // Unknown scheduler: not touched.
        site(None, &["app::a", "app::z"]),
        // Generic arguments do not matter for comparing labels.
        site(Some(Mt), &["app::G<X>", "app::b<T>"]),
    ];
    resolve::eliminate(&mut sites);
    let got: Vec<Vec<&str>> = sites
        .iter()
        .map(|s| s.candidates.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        got,
        vec![
            vec!["app::a"],
            vec!["app::b"],
            vec!["app::b"],
            vec!["app::c"],
            vec!["app::a"],
            vec!["app::x", "app::y"],
            vec!["app::x", "app::y"],
            vec!["app::a", "app::z"],
            vec!["app::G<X>"],
        ]
    );
}

#[test]
fn elimination_never_empties_a_candidate_set() {
    use Scheduler::CurrentThread as Ct;
    // Every candidate is taken: a contradiction, the set is kept rather than emptied.
    let mut sites = vec![
        site(Some(Ct), &["app::a"]),
        site(Some(Ct), &["app::b"]),
        site(Some(Ct), &["app::a", "app::b"]),
    ];
    let before = sites.clone();
    resolve::eliminate(&mut sites);
    assert_eq!(sites, before);
}

#[test]
fn elimination_is_off_where_known_labels_repeat() {
    use Scheduler::CurrentThread as Ct;
    // Two vtables already say `app::a` on one scheduler: the one-vtable-per-(T, S) rule does
    // not hold here (e.g. duplicated across codegen units), so nothing is inferred from it.
    let mut sites = vec![
        site(Some(Ct), &["app::a"]),
        site(Some(Ct), &["app::a"]),
        site(Some(Ct), &["app::a", "app::b"]),
    ];
    let before = sites.clone();
    resolve::eliminate(&mut sites);
    assert_eq!(sites, before);
}

#[test]
fn poll_walk_labels_must_be_task_cell_types() {
    use Scheduler::{CurrentThread as Ct, MultiThread as Mt};
    let cell = |label: &str, scheduler| resolve::CellType {
        label: label.to_string(),
        scheduler,
    };
    let universe = vec![
        cell("app::ok_bounded::{{closure}}::{{closure}}", Some(Ct)),
        cell("app::housekeeping::{{closure}}", Some(Ct)),
        cell("app::only_mt::{{closure}}", Some(Mt)),
        cell("app::work", Some(Scheduler::Blocking)),
        cell("hyper::proto::h2::server::H2Stream<F,B>", Some(Ct)),
    ];
    let check = |labels: &[&str], s| {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        resolve::confirmed_labels(&labels, s, &universe)
    };
    // A library future reached through an inlined async block is never a label...
    assert!(check(&["tokio::time::sleep::Sleep"], Some(Ct)).is_empty());
    assert!(
        check(
            &["<(&str, u16) as std::net::socket_addr::ToSocketAddrs>::to_socket_addrs"],
            Some(Scheduler::Blocking)
        )
        .is_empty()
    );
    // ... unless a task cell holds exactly it.
    assert_eq!(
        check(&["hyper::proto::h2::server::H2Stream<X,Y>"], Some(Ct)),
        vec!["hyper::proto::h2::server::H2Stream<X,Y>"]
    );
    // User futures: the cell type itself, or nested in / around one.
    assert_eq!(
        check(&["app::ok_bounded::{{closure}}::{{closure}}"], Some(Ct)).len(),
        1
    );
    assert_eq!(
        check(&["app::housekeeping::{{closure}}::{{closure}}"], Some(Ct)).len(),
        1
    );
    assert_eq!(check(&["app::work"], Some(Scheduler::Blocking)).len(), 1);
    assert!(check(&["app::elsewhere::{{closure}}"], Some(Ct)).is_empty());
    // Scheduler must agree when both are known.
    assert!(check(&["app::only_mt::{{closure}}"], Some(Ct)).is_empty());
    assert_eq!(check(&["app::only_mt::{{closure}}"], None).len(), 1);
    // Folded poll fns: only the labels that pass are kept.
    assert_eq!(
        check(
            &[
                "tokio::time::sleep::Sleep",
                "app::housekeeping::{{closure}}"
            ],
            Some(Ct)
        ),
        vec!["app::housekeeping::{{closure}}"]
    );
    // No task cell names in the binary at all: only library labels are dropped.
    let none: Vec<String> = vec![
        "tokio::time::sleep::Sleep".into(),
        "app::f::{{closure}}".into(),
    ];
    assert_eq!(
        resolve::confirmed_labels(&none, Some(Ct), &[]),
        vec!["app::f::{{closure}}"]
    );
}
