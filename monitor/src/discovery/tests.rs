//! Fixture tests: run [`analyze`] on the axum fixture binary and check the ground truth from
//! `monitor/tests/fixtures/axum-app/src/main.rs`. They fail (not skip) when the fixture is
//! missing, because silently passing would hide a broken discovery.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use object::{Object, ObjectSection};

use super::*;

const BUILD_HINT: &str = "build fixtures first: cargo xtask fixtures";

/// `target/release/<name>`, which must exist.
fn release_fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    assert!(
        p.is_file(),
        "fixture binary {} is missing; {BUILD_HINT}",
        p.display()
    );
    p
}

fn fixture_path() -> PathBuf {
    release_fixture("axum-app")
}

fn analyzed(p: &Path) -> TargetImage {
    analyze(p).unwrap_or_else(|e| panic!("analyze({}) failed: {e}", p.display()))
}

fn fixture() -> &'static TargetImage {
    static T: OnceLock<TargetImage> = OnceLock::new();
    T.get_or_init(|| analyzed(&fixture_path()))
}

/// The same source built against tokio 1.47 (`monitor/tests/fixtures/axum-app-lts`).
fn lts_fixture() -> &'static TargetImage {
    static T: OnceLock<TargetImage> = OnceLock::new();
    T.get_or_init(|| analyzed(&release_fixture("axum-app-lts")))
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("leakscope-discovery-{}-{name}", std::process::id()))
}

fn sites<'a>(t: &'a TargetImage, site: &str) -> Vec<&'a TaskVtable> {
    t.vtables.iter().filter(|v| v.site == site).collect()
}

/// Async spawn sites whose future keeps its own poll function in this build.
const ASYNC_SITES: &[&str] = &[
    "axum_app::leak_forever::{{closure}}::{{closure}}",
    "axum_app::leak_stream::{{closure}}::{{closure}}",
    "axum_app::ok_stream::{{closure}}::{{closure}}",
    "axum_app::ok_bounded::{{closure}}::{{closure}}",
    "axum_app::ok_aborted::{{closure}}::{{closure}}",
    "axum_app::state_leak::{{closure}}::{{closure}}",
    "axum_app::housekeeping::{{closure}}",
    "axum::serve::handle_connection::{{closure}}::{{closure}}",
];

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

#[test]
fn fixture_every_vtable_is_named_and_lookups_work() {
    let t = fixture();
    assert!(!t.stripped);
    assert!(
        t.vtables.windows(2).all(|w| w[0].vaddr < w[1].vaddr),
        "not sorted"
    );
    for v in &t.vtables {
        assert_ne!(v.naming, NamingMethod::StrippedScan, "{v:?}");
        let hashed = v.site.split("::").any(|seg| {
            seg.len() == 17
                && seg.starts_with('h')
                && seg[1..].bytes().all(|b| b.is_ascii_hexdigit())
        });
        assert!(!hashed, "hash left in {}", v.site);
        assert!(!v.site.contains(".llvm."), "{}", v.site);
        assert_eq!(t.vtable_at(v.vaddr).map(|x| x.vaddr), Some(v.vaddr));
        assert!(v.complete_hooked, "{v:?}");
        assert!(v.location.is_none(), "fixture has no DWARF");
    }
    assert!(t.vtable_at(t.vtables[0].vaddr + 8).is_none());
    assert_eq!(t.link_base(), 0, "the fixture is PIE");
    let id = t.build_id.as_deref().expect("build id");
    assert_eq!(id.len(), 40, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn fixture_layout_comes_from_the_binary() {
    let t = fixture();
    assert_eq!(t.layout.vtable_offset, 16);
    assert!(t.layout.from_binary, "{:?}", t.warnings);
}

#[test]
fn fixture_hooks_cover_both_flavours_with_verified_registers() {
    let t = fixture();
    let owned: Vec<_> = t.hooks_of(HookKind::SpawnOwned).collect();
    assert!(!owned.is_empty(), "no bind_inner hook: {:?}", t.warnings);
    let served: HashSet<Scheduler> = owned.iter().flat_map(|h| h.schedulers.clone()).collect();
    assert!(
        served.contains(&Scheduler::CurrentThread) && served.contains(&Scheduler::MultiThread),
        "bind_inner instances serve only {served:?}: {owned:#?}"
    );
    for h in &owned {
        assert_eq!(
            h.symbol,
            "tokio::runtime::task::list::OwnedTasks<S>::bind_inner"
        );
        assert_eq!(h.header_arg, ArgReg::Rsi);
        assert!(h.header_arg_verified, "{h:?}");
    }

    let blocking: Vec<_> = t.hooks_of(HookKind::SpawnBlocking).collect();
    assert_eq!(blocking.len(), 1, "{blocking:?}");
    assert_eq!(
        blocking[0].symbol,
        "tokio::runtime::blocking::pool::Spawner::spawn_task"
    );
    assert_eq!(blocking[0].header_arg, ArgReg::Rsi);
    assert!(blocking[0].header_arg_verified);

    let complete: Vec<_> = t.hooks_of(HookKind::Complete).collect();
    assert!(!complete.is_empty());
    for h in &complete {
        assert_eq!(h.header_arg, ArgReg::Rdi);
        assert!(h.header_arg_verified, "{h:?}");
    }

    let addrs: HashSet<u64> = t.hooks.iter().map(|h| h.vaddr).collect();
    assert_eq!(addrs.len(), t.hooks.len(), "duplicate hook addresses");
    assert!(
        !t.warnings.iter().any(|w| w.contains("hook")),
        "{:#?}",
        t.warnings
    );
}

#[test]
fn fixture_file_offsets_match_section_headers() {
    // Cross-check the segment-based offsets against the section table.
    let t = fixture();
    let data = std::fs::read(fixture_path()).expect("read fixture");
    let file = object::File::parse(&*data).expect("parse fixture");
    for h in &t.hooks {
        assert_eq!(t.file_offset(h.vaddr), Some(h.file_offset));
        let section = file
            .sections()
            .find(|s| h.vaddr >= s.address() && h.vaddr < s.address() + s.size())
            .expect("hook inside a section");
        let (off, _) = section.file_range().expect("file-backed");
        assert_eq!(h.file_offset, off + (h.vaddr - section.address()), "{h:?}");
    }
    assert_eq!(t.file_offset(u64::MAX - 8), None);
}

#[test]
fn fixture_serializes() {
    let v = serde_json::to_value(fixture()).expect("serialize");
    assert_eq!(v["hooks"][0]["header_arg"], "rsi");
    assert!(v["vtables"][0]["naming"].is_string());
}

#[test]
fn stripped_copy_finds_the_same_vtables() {
    let t = fixture();
    let stripped = temp_path("axum-app-stripped");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(fixture_path())
        .status()
        .expect("run `strip` (binutils) to make a stripped copy");
    assert!(status.success(), "strip failed");
    let s = analyze(&stripped);
    let _ = std::fs::remove_file(&stripped);
    let s = s.expect("analyze stripped copy");
    assert!(s.stripped);
    assert_eq!(
        s.vtables.iter().map(|v| v.vaddr).collect::<Vec<_>>(),
        t.vtables.iter().map(|v| v.vaddr).collect::<Vec<_>>(),
        "shape scan and symbol scan disagree"
    );
    for v in &s.vtables {
        assert_eq!(v.naming, NamingMethod::StrippedScan);
        assert_eq!(v.site, format!("vtable@0x{:x}", v.vaddr));
    }
    assert!(s.hooks.is_empty());
    assert_eq!(s.debug_file, None);
    // No `.gnu_debuglink` in this copy: only the build-id path was searched, and the warning
    // says so and how to keep the symbols.
    let id = t.build_id.as_deref().expect("build id");
    let by_id = format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    let w = s
        .warnings
        .iter()
        .find(|w| w.contains("stripped"))
        .unwrap_or_else(|| panic!("no stripped warning: {:#?}", s.warnings));
    assert!(w.contains(&format!("searched: {by_id}")), "{w}");
    assert!(w.contains("no .gnu_debuglink"), "{w}");
    assert!(
        w.contains("objcopy --only-keep-debug app app.debug")
            && w.contains("objcopy --add-gnu-debuglink=app.debug app"),
        "{w}"
    );
    assert_eq!(s.layout.vtable_offset, t.layout.vtable_offset);
    assert!(s.layout.from_binary);
    assert_eq!(s.build_id, t.build_id);
}

/// An analysis as JSON, without what legitimately differs between copies (the paths).
fn comparable(t: &TargetImage) -> serde_json::Value {
    let mut v = serde_json::to_value(t).expect("serialize");
    let o = v.as_object_mut().expect("object");
    o.remove("path");
    o.remove("debug_file");
    v
}

/// The released fixture stripped and linked to `axum-app.debug` (`cargo xtask fixtures`):
/// symbols from the debug file, code and file offsets from the stripped file, and the
/// result is exactly that of the unstripped binary.
#[test]
fn debuglink_copy_equals_the_unstripped_analysis() {
    let t = fixture();
    let path = release_fixture("axum-app-stripped-debuglink");
    let s = analyzed(&path);
    let debug = release_fixture("axum-app.debug").canonicalize().unwrap();
    assert_eq!(s.debug_file.as_deref(), Some(debug.as_path()));
    assert!(!s.stripped, "{:#?}", s.warnings);
    assert_eq!(
        s.vtables
            .iter()
            .map(|v| (v.vaddr, v.site.as_str(), v.naming))
            .collect::<Vec<_>>(),
        t.vtables
            .iter()
            .map(|v| (v.vaddr, v.site.as_str(), v.naming))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.hooks
            .iter()
            .map(|h| (h.kind, h.vaddr, h.file_offset))
            .collect::<Vec<_>>(),
        t.hooks
            .iter()
            .map(|h| (h.kind, h.vaddr, h.file_offset))
            .collect::<Vec<_>>()
    );
    assert!(!s.hooks.is_empty());
    // Everything else too: layout, schedulers, verified registers, warnings, TLS slot.
    assert_eq!(comparable(&s), comparable(t));
    // The offsets are right for the file that is attached to, not just equal.
    let data = std::fs::read(&path).expect("read fixture");
    let file = object::File::parse(&*data).expect("parse fixture");
    for h in &s.hooks {
        let section = file
            .sections()
            .find(|sec| h.vaddr >= sec.address() && h.vaddr < sec.address() + sec.size())
            .expect("hook inside a section");
        let (off, _) = section.file_range().expect("file-backed");
        assert_eq!(h.file_offset, off + (h.vaddr - section.address()), "{h:?}");
    }
}

/// The same for the line-tables build: DWARF comes from the debug file too.
#[test]
fn debuglink_copy_of_dwarf_build_keeps_source_lines() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures-dwarf/release");
    let (full, linked) = (
        dir.join("axum-app"),
        dir.join("axum-app-stripped-debuglink"),
    );
    assert!(
        linked.is_file(),
        "{} is missing; {BUILD_HINT}",
        linked.display()
    );
    let t = analyzed(&full);
    let s = analyzed(&linked);
    assert!(s.debug_file.is_some());
    assert!(s.vtables.iter().any(|v| v.location.is_some()));
    assert_eq!(comparable(&s), comparable(&t));
}

/// A copy of `from` in a fresh temporary directory, named `name`.
fn copy_to_temp_dir(dir: &str, from: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_path(dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let to = dir.join(name);
    std::fs::copy(from, &to).expect("copy");
    (dir, to)
}

/// The debuglinked binary without its debug file: each place gdb would look is named.
#[test]
fn missing_debug_file_warning_names_every_searched_path() {
    let (dir, app) = copy_to_temp_dir(
        "lonely",
        &release_fixture("axum-app-stripped-debuglink"),
        "app",
    );
    let dir = dir.canonicalize().expect("canonical temp dir");
    let s = analyze(&app);
    let _ = std::fs::remove_dir_all(&dir);
    let s = s.expect("analyze");
    assert!(s.stripped);
    assert!(s.hooks.is_empty());
    assert_eq!(s.vtables.len(), fixture().vtables.len());
    let w = s
        .warnings
        .iter()
        .find(|w| w.contains("no separate debug file was found"))
        .unwrap_or_else(|| panic!("{:#?}", s.warnings));
    let id = s.build_id.as_deref().unwrap();
    let expected = [
        format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]),
        format!("{}/axum-app.debug", dir.display()),
        format!("{}/.debug/axum-app.debug", dir.display()),
        format!("/usr/lib/debug{}/axum-app.debug", dir.display()),
    ];
    assert!(
        w.contains(&format!("searched: {}", expected.join(", "))),
        "{w}"
    );
    assert!(
        w.contains("objcopy --add-gnu-debuglink=app.debug app"),
        "{w}"
    );
}

/// The debug file of the tokio 1.47 build: a real debug file, of another build.
fn foreign_debug_file(name: &str) -> PathBuf {
    let p = temp_path(name);
    let status = std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(release_fixture("axum-app-lts"))
        .arg(&p)
        .status()
        .expect("run `objcopy` (binutils)");
    assert!(status.success(), "objcopy failed");
    p
}

#[test]
fn explicit_debug_file_of_another_build_is_rejected() {
    let wrong = foreign_debug_file("wrong.debug");
    let stripped = release_fixture("axum-app-stripped");
    let r = analyze_with_debug_file(&stripped, Some(&wrong));
    let _ = std::fs::remove_file(&wrong);
    let id = elf::build_id_of(&std::fs::read(&stripped).expect("read fixture")).unwrap();
    match r {
        Err(e @ DiscoveryError::DebugFileMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("build-id mismatch"), "{msg}");
            assert!(msg.contains(&id), "{msg}");
        }
        other => panic!("expected DebugFileMismatch, got {other:?}"),
    }

    let not_elf = temp_path("not-elf.debug");
    std::fs::write(&not_elf, "nope").expect("write temp");
    let r = analyze_with_debug_file(&release_fixture("axum-app-stripped"), Some(&not_elf));
    let _ = std::fs::remove_file(&not_elf);
    assert!(
        matches!(r, Err(DiscoveryError::InvalidDebugFile { .. })),
        "{r:?}"
    );
}

/// An explicit debug file works for a stripped binary that has no `.gnu_debuglink`.
#[test]
fn explicit_debug_file_names_a_plain_stripped_binary() {
    let debug = release_fixture("axum-app.debug");
    let s = analyze_with_debug_file(&release_fixture("axum-app-stripped"), Some(&debug))
        .expect("analyze with debug file");
    assert_eq!(s.debug_file.as_deref(), Some(debug.as_path()));
    assert_eq!(comparable(&s), comparable(fixture()));
}

/// A debug file found by `.gnu_debuglink` that belongs to another build is skipped (as gdb
/// does) and the warning says why.
#[test]
fn linked_debug_file_of_another_build_is_skipped() {
    let (dir, app) = copy_to_temp_dir(
        "stale",
        &release_fixture("axum-app-stripped-debuglink"),
        "app",
    );
    let wrong = foreign_debug_file("stale.debug");
    std::fs::rename(&wrong, dir.join("axum-app.debug"))
        .or_else(|_| std::fs::copy(&wrong, dir.join("axum-app.debug")).map(|_| ()))
        .expect("place the foreign debug file");
    let _ = std::fs::remove_file(&wrong);
    let s = analyze(&app);
    let _ = std::fs::remove_dir_all(&dir);
    let s = s.expect("analyze");
    assert!(s.stripped);
    assert_eq!(s.debug_file, None);
    assert!(s.hooks.is_empty());
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("not used:") && w.contains("build-id mismatch")),
        "{:#?}",
        s.warnings
    );
}

#[test]
fn bad_inputs_give_typed_errors() {
    let missing = temp_path("does-not-exist");
    match analyze(&missing) {
        Err(e @ DiscoveryError::Io { .. }) => assert!(e.to_string().contains("cannot read")),
        other => panic!("expected Io, got {other:?}"),
    }

    let script = temp_path("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho not a binary\n").expect("write temp");
    let r = analyze(&script);
    let _ = std::fs::remove_file(&script);
    assert!(matches!(r, Err(DiscoveryError::NotElf { .. })), "{r:?}");

    let data = std::fs::read(fixture_path()).expect("read fixture");
    let truncated = temp_path("truncated");
    std::fs::write(&truncated, &data[..100]).expect("write temp");
    let r = analyze(&truncated);
    let _ = std::fs::remove_file(&truncated);
    assert!(matches!(r, Err(DiscoveryError::Malformed { .. })), "{r:?}");

    // An x86_64 ELF without tokio.
    let sh = Path::new("/bin/sh");
    assert!(sh.exists(), "/bin/sh is needed as a non-tokio ELF");
    match analyze(sh) {
        Err(e @ DiscoveryError::NoTaskVtables { .. }) => assert!(
            e.to_string()
                .starts_with("/bin/sh does not look like a tokio binary: no task vtables found"),
            "{e}"
        ),
        other => panic!("expected NoTaskVtables, got {other:?}"),
    }
}

/// The line of the first line at or after `async fn {function}(` that contains `needle`, in
/// the fixture's source, so the test follows edits of the fixture.
pub(crate) fn fixture_line(function: &str, needle: &str) -> u64 {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/axum-app/src/main.rs"),
    )
    .expect("fixture source");
    let start = src
        .lines()
        .position(|l| l.contains(&format!("async fn {function}(")))
        .expect("function in fixture");
    let offset = src
        .lines()
        .skip(start)
        .position(|l| l.contains(needle))
        .expect("needle after function");
    (start + offset + 1) as u64
}

/// The fixture built with line tables (`cargo xtask fixtures` builds it into
/// `target/fixtures-dwarf`): spawn sites get the `file:line` of their async block.
#[test]
fn dwarf_build_gets_source_lines() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures-dwarf/release/axum-app");
    assert!(
        p.is_file(),
        "{} is missing: build fixtures first with `cargo xtask fixtures`",
        p.display()
    );
    let t = analyze(&p).expect("analyze");
    let src = "monitor/tests/fixtures/axum-app/src/main.rs";
    let expect = [
        (
            "axum_app::leak_forever::{{closure}}::{{closure}}",
            fixture_line("leak_forever", "tokio::spawn("),
        ),
        (
            "axum_app::leak_stream::{{closure}}::{{closure}}",
            fixture_line("leak_stream", "tokio::spawn("),
        ),
        (
            "axum_app::housekeeping::{{closure}}",
            fixture_line("housekeeping", "async fn housekeeping("),
        ),
    ];
    for (site, line) in expect {
        let found = sites(&t, site);
        assert_eq!(found.len(), 2, "{site}");
        for v in found {
            assert_eq!(
                v.location.as_deref(),
                Some(format!("{src}:{line}").as_str()),
                "{site}"
            );
        }
    }
}

#[test]
fn link_base_is_the_page_of_file_offset_zero() {
    let seg = |vaddr, file_offset| LoadSegment {
        vaddr,
        mem_size: 0x1000,
        file_offset,
        file_size: 0x1000,
        executable: false,
    };
    let mut t = TargetImage {
        segments: vec![seg(0x400000, 0), seg(0x401000, 0x1000)],
        ..Default::default()
    };
    assert_eq!(t.link_base(), 0x400000);
    t.segments = vec![seg(0x201040, 0x1040)];
    assert_eq!(t.link_base(), 0x200000);
    t.segments.clear();
    assert_eq!(t.link_base(), 0);
}
