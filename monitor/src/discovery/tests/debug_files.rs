//! Stripped binaries and their separate debug files.

use std::path::{Path, PathBuf};

use super::*;

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
