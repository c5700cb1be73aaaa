use std::path::PathBuf;

use super::*;

/// (address, file, line) rows of a sequence, and its end address.
type TestSequence<'a> = (&'a [(u64, u32, u32)], u64);

/// An index over hand-made rows: `sequences` of (address, file, line) rows, each closed at
/// its end address; `inlined` calls as (start, end, file, line).
fn index(
    files: &[&str],
    sequences: &[TestSequence<'_>],
    inlined: &[(u64, u64, u32, u32)],
) -> LineIndex {
    let mut rows = Vec::new();
    for (seq, end) in sequences {
        rows.extend(
            seq.iter()
                .map(|&(addr, file, line)| LineRow { addr, file, line }),
        );
        rows.push(LineRow {
            addr: *end,
            file: END_OF_SEQUENCE,
            line: 0,
        });
    }
    LineIndex {
        files: files.iter().map(|f| f.to_string()).collect(),
        rows,
        inlined: inlined
            .iter()
            .map(|&(start, end, file, line)| InlinedCall {
                start,
                end,
                file,
                line,
            })
            .collect(),
    }
}

fn at(index: &LineIndex, addr: u64) -> Option<String> {
    index.location(addr)
}

#[test]
fn an_address_takes_the_last_row_at_or_before_it_within_its_sequence() {
    let index = index(
        &["src/a.rs", "src/b.rs"],
        &[
            (
                &[(0x100, 0, 10), (0x108, 0, 11), (0x108, 1, 3), (0x110, 0, 0)],
                0x120,
            ),
            (&[(0x120, 1, 7)], 0x130),
            (&[(0x200, 0, 20)], 0x210),
        ],
        &[],
    );
    assert_eq!(at(&index, 0xff), None, "before any sequence");
    assert_eq!(at(&index, 0x100).as_deref(), Some("src/a.rs:10"));
    assert_eq!(at(&index, 0x107).as_deref(), Some("src/a.rs:10"));
    // Two rows at one address: the later one describes the code.
    assert_eq!(at(&index, 0x108).as_deref(), Some("src/b.rs:3"));
    assert_eq!(at(&index, 0x110), None, "a row with line 0");
    // A sequence that starts where the previous one ends.
    assert_eq!(at(&index, 0x120).as_deref(), Some("src/b.rs:7"));
    assert_eq!(at(&index, 0x12f).as_deref(), Some("src/b.rs:7"));
    assert_eq!(at(&index, 0x130), None, "between sequences");
    assert_eq!(at(&index, 0x1ff), None, "between sequences");
    assert_eq!(at(&index, 0x20f).as_deref(), Some("src/a.rs:20"));
    assert_eq!(at(&index, 0x210), None, "past the last sequence");
    assert_eq!(
        index.lookup(0x104),
        Some(("src/a.rs".to_string(), 10)),
        "lookup splits path and line"
    );
}

#[test]
fn inlined_code_resolves_to_the_line_that_called_it() {
    let index = index(
        &["src/main.rs", "/rustc/x/library/alloc/src/alloc.rs"],
        &[(
            &[(0x100, 0, 5), (0x108, 0, 0), (0x110, 1, 95), (0x120, 0, 6)],
            0x130,
        )],
        &[(0x110, 0x120, 0, 7), (0x124, 0x128, 0, 0)],
    );
    assert_eq!(at(&index, 0x107).as_deref(), Some("src/main.rs:5"));
    // Line 0 takes the location of the code that follows, here the inlined call.
    assert_eq!(at(&index, 0x10f).as_deref(), Some("src/main.rs:7"));
    assert_eq!(index.line_row(0x10f), None, "the raw row has no line");
    assert_eq!(at(&index, 0x118).as_deref(), Some("src/main.rs:7"));
    assert_eq!(
        index.line_row(0x118),
        Some(("/rustc/x/library/alloc/src/alloc.rs".to_string(), 95)),
        "the raw row is the innermost line"
    );
    assert_eq!(at(&index, 0x120).as_deref(), Some("src/main.rs:6"));
    assert_eq!(at(&index, 0x124), None, "an inlined call of unknown line");
    assert_eq!(at(&index, 0x128).as_deref(), Some("src/main.rs:6"));
}

#[test]
fn no_debug_line_gives_an_empty_index() {
    let img = super::super::elf::code_image(0x1000, &[0xc3]);
    let index = LineIndex::build(&img).expect("build");
    assert!(index.is_empty());
    assert_eq!(index.lookup(0x1000), None);
}

/// The only line of this function is the one `line!()` reports.
#[rustfmt::skip]
#[inline(never)]
fn one_line_marker() -> u32 { std::hint::black_box(line!()) }

/// An allocating function inlined into its caller even without optimizations.
#[rustfmt::skip]
#[inline(always)]
fn inlined_helper(n: usize) -> (Vec<u8>, u32) { (vec![7u8; std::hint::black_box(n)], line!()) }

#[rustfmt::skip]
#[inline(never)]
fn calls_inlined_helper() -> (Vec<u8>, u32, u32) { let (v, inner) = inlined_helper(3); (v, inner, line!()) }

/// Link-time start and end of the function of this test binary whose name ends in `name`.
fn own_function(img: &Image, name: &str) -> (u64, u64) {
    let start = img
        .functions
        .iter()
        .find(|(_, f)| f.names.iter().any(|n| n.ends_with(name)))
        .map(|(&a, _)| a)
        .unwrap_or_else(|| panic!("no symbol {name}"));
    img.function_extent(start).expect("extent")
}

#[test]
fn locates_functions_of_this_test_binary() {
    let exe = Path::new("/proc/self/exe");
    let index = LineIndex::load(exe, None).expect("own line tables");
    assert!(!index.is_empty(), "test binaries are built with debug info");
    let img = Image::load(exe).expect("own image");
    let this = "monitor/src/discovery/dwarf/tests.rs";

    let (start, _) = own_function(&img, "dwarf::tests::one_line_marker");
    assert_eq!(
        index.lookup(start),
        Some((this.to_string(), u64::from(one_line_marker()))),
        "paths of workspace code are relative to the workspace root"
    );

    // Every address of the caller resolves to its own line, also inside the inlined
    // helper, whose own line the raw row gives.
    let (_, inner, outer) = calls_inlined_helper();
    let (start, end) = own_function(&img, "dwarf::tests::calls_inlined_helper");
    let mut inner_rows = 0;
    for addr in start..end {
        let Some((path, line)) = index.lookup(addr) else {
            continue;
        };
        assert_eq!((path.as_str(), line), (this, u64::from(outer)), "{addr:#x}");
        if index.line_row(addr) == Some((this.to_string(), u64::from(inner))) {
            inner_rows += 1;
        }
    }
    assert!(inner_rows > 0, "no code of the inlined helper found");
}

fn dwarf_fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fixtures-dwarf/release")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: build fixtures first with `cargo xtask fixtures`",
        p.display()
    );
    p
}

use super::super::tests::fixture_line;

/// The release fixture with line tables: `vec![…; 256 * 1024]` in `state_leak`'s task is
/// inlined down to the `__rust_alloc` call, whose row is a line of `alloc.rs`; the index
/// puts the call on the `vec!` line. The stripped copy with a debuglink finds the same
/// lines in its debug file.
#[test]
fn inlined_allocation_in_the_dwarf_fixture_gets_its_source_line() {
    let full = dwarf_fixture("axum-app");
    let linked = dwarf_fixture("axum-app-stripped-debuglink");
    let index = LineIndex::load(&full, None).expect("line tables");
    let img = Image::load(&full).expect("image");
    let (start, end) = own_function(&img, "axum_app::state_leak::{{closure}}::{{closure}}");
    // The return addresses of the task's calls of the allocator.
    let returns: Vec<u64> = super::super::disasm::decode_range(&img, start, end)
        .iter()
        .filter(|i| {
            super::super::disasm::static_target(&img, i)
                .is_some_and(|t| img.names_at(t).iter().any(|n| n.ends_with("__rust_alloc")))
        })
        .map(|i| i.next_ip())
        .collect();
    assert_eq!(returns.len(), 1, "one __rust_alloc call in the task");
    let call = returns[0] - 1;
    let (raw_path, _) = index.line_row(call).expect("a row for the call");
    assert!(
        raw_path.ends_with("library/alloc/src/alloc.rs"),
        "the call's own row is inlined library code: {raw_path}"
    );
    let vec_line = fixture_line("state_leak", "let payload = vec![0x5au8; 256 * 1024];");
    assert_eq!(
        index.lookup(call),
        Some((
            "monitor/tests/fixtures/axum-app/src/main.rs".to_string(),
            vec_line
        ))
    );
    // Every address of the task resolves to a line of the fixture.
    for addr in start..end {
        if let Some((path, _)) = index.lookup(addr) {
            assert!(path.ends_with("axum-app/src/main.rs"), "{addr:#x}: {path}");
        }
    }

    let stripped = LineIndex::load(&linked, None).expect("line tables of the debug file");
    assert!(!stripped.is_empty());
    for addr in start..end {
        assert_eq!(stripped.lookup(addr), index.lookup(addr), "{addr:#x}");
    }
}

/// The fuzz target's entry point reads the same lines as the index built from the file:
/// the fuzzer exercises the readers discovery runs, not a copy of them.
#[test]
fn the_fuzzing_entry_reads_what_the_file_index_reads() {
    let full = dwarf_fixture("axum-app");
    let img = Image::load(&full).expect("image");
    let index = LineIndex::build(&img).expect("line tables");
    let (start, end) = own_function(&img, "axum_app::state_leak::{{closure}}::{{closure}}");
    let addrs: Vec<u64> = (start..end).step_by(16).collect();
    let sections: Vec<(&str, Vec<u8>)> = [".debug_info", ".debug_abbrev", ".debug_line"]
        .into_iter()
        .chain([
            ".debug_str",
            ".debug_line_str",
            ".debug_rnglists",
            ".debug_ranges",
        ])
        .filter_map(|name| Some((name, img.section_data(name)?.into_owned())))
        .collect();
    let section = |name: &str| {
        sections
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, data)| data.as_slice())
    };
    let from_file = addrs.iter().filter(|&&a| index.lookup(a).is_some()).count()
        + line_locations(&img, &addrs).unwrap().len();
    assert!(from_file > addrs.len(), "{from_file} of {}", addrs.len());
    assert_eq!(
        super::super::fuzzing::dwarf_lines(&section, &addrs),
        from_file
    );
}
