//! Fixture tests: run [`analyze`] on the axum fixture binary and check the ground truth from
//! `monitor/tests/fixtures/axum-app/src/main.rs`. They fail (not skip) when the fixture is
//! missing, because silently passing would hide a broken discovery.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use object::{Object, ObjectSection};

use super::*;

mod bounds;
mod debug_files;
mod lines;
mod mutations;
mod naming;

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

#[test]
fn one_generic_site_has_one_spelling() {
    let vtable = |vaddr: u64, site: &str| TaskVtable {
        vaddr,
        site: site.to_string(),
        ..TaskVtable::default()
    };
    let mut vtables = vec![
        vtable(
            1,
            "axum::serve::WithGracefulShutdown<L,M,S,F>::run::{{closure}}::{{closure}}",
        ),
        vtable(
            2,
            "axum::serve::WithGracefulShutdown<tokio::net::tcp::listener::TcpListener,axum::routing::Router,axum::routing::Router,app::shutdown::{{closure}}>::run::{{closure}}::{{closure}}",
        ),
        vtable(3, "app::handler::{{closure}}::{{closure}}"),
        vtable(4, "app::a::{{closure}} | app::b<T>::{{closure}}"),
    ];
    unify_generic_spellings(&mut vtables);
    let sites: Vec<&str> = vtables.iter().map(|v| v.site.as_str()).collect();
    assert_eq!(
        sites,
        [
            "axum::serve::WithGracefulShutdown<L,M,S,F>::run::{{closure}}::{{closure}}",
            "axum::serve::WithGracefulShutdown<L,M,S,F>::run::{{closure}}::{{closure}}",
            "app::handler::{{closure}}::{{closure}}",
            // Ambiguous labels keep their candidates as they are.
            "app::a::{{closure}} | app::b<T>::{{closure}}",
        ]
    );
}
