//! The table is checked against real stacks: this test binary builds the table for itself,
//! captures its own registers deep in a call chain, copies its own stack and walks it with
//! the same code the BPF program runs, then symbolizes the result.

use std::hint::black_box;
use std::path::Path;
use std::sync::OnceLock;

use monitor_common::unwind::{
    CFA_END, CFA_RSP, MAX_FRAMES, RBP_UNCHANGED, ROW_CALLSITE, Regs, UnwindRow, bucket_count, step,
};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use super::{BuildStats, UnwindTable, build_with_stats};

fn own_table() -> &'static (UnwindTable, BuildStats) {
    static TABLE: OnceLock<(UnwindTable, BuildStats)> = OnceLock::new();
    TABLE.get_or_init(|| build_with_stats(Path::new("/proc/self/exe")).expect("own unwind table"))
}

fn own_symbols() -> &'static Symbols {
    static SYMBOLS: OnceLock<Symbols> = OnceLock::new();
    SYMBOLS.get_or_init(|| Symbols::load(Path::new("/proc/self/exe")))
}

/// Function symbols of an ELF file, by link-time address.
struct Symbols {
    /// (address, size, demangled name without hash), sorted by address.
    functions: Vec<(u64, u64, String)>,
}

impl Symbols {
    fn load(path: &Path) -> Self {
        let data = std::fs::read(path).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let mut functions: Vec<_> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                let name = format!("{:#}", rustc_demangle::demangle(name));
                Some((s.address(), s.size(), name))
            })
            .collect();
        functions.sort_by_key(|&(address, ..)| address);
        Self { functions }
    }

    /// The function containing link-time `pc`, and `pc`'s offset in it.
    fn lookup(&self, pc: u64) -> Option<(&str, u64)> {
        let index = self
            .functions
            .partition_point(|&(address, ..)| address <= pc);
        let (address, size, name) = self.functions.get(index.checked_sub(1)?)?;
        (pc < address + size.max(&1)).then_some((name.as_str(), pc - address))
    }

    fn address_of(&self, name: &str) -> Option<u64> {
        let mut matches = self.functions.iter().filter(|(_, _, n)| n == name);
        let (address, ..) = matches.next()?;
        assert!(matches.next().is_none(), "{name} is ambiguous");
        Some(*address)
    }
}

/// One line of `/proc/self/maps`.
struct Mapping {
    start: u64,
    end: u64,
    executable: bool,
    offset: u64,
    path: String,
}

fn own_mappings() -> Vec<Mapping> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (range, perms, offset) = (fields.next(), fields.next(), fields.next());
            let (start, end) = range.unwrap().split_once('-').unwrap();
            let path = fields.nth(2).unwrap_or_default().to_owned();
            Mapping {
                start: u64::from_str_radix(start, 16).unwrap(),
                end: u64::from_str_radix(end, 16).unwrap(),
                executable: perms.unwrap().contains('x'),
                offset: u64::from_str_radix(offset.unwrap(), 16).unwrap(),
                path,
            }
        })
        .collect()
}

/// Runtime minus link-time address of this executable's code, from its executable mapping
/// and the program header it maps (what the daemon does for a target process).
fn own_bias() -> u64 {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let data = std::fs::read(&exe).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let mapping = own_mappings()
        .into_iter()
        .find(|m| m.executable && Path::new(&m.path) == exe)
        .expect("executable mapping of /proc/self/exe");
    // The PT_LOAD segment whose file offset, rounded down to the page, the mapping starts at;
    // its link-time address rounded the same way is mapped at `mapping.start`.
    let segment = file
        .segments()
        .find(|s| s.file_range().0 & !0xfff == mapping.offset)
        .expect("segment of the executable mapping");
    let link_start = segment.address() - (segment.file_range().0 - mapping.offset);
    mapping.start.wrapping_sub(link_start)
}

/// The registers at a point inside the current function: `pc` is the address of the
/// instruction right after `lea` (the second `mov` here), and `rsp`/`rbp` are their values at
/// that very instruction, since nothing in between changes them. So the table row for `pc`
/// describes exactly the captured `rsp`/`rbp`: this is a first frame (looked up at `pc`, not
/// `pc - 1`), like a uprobe hit in the middle of a function. A macro, so the capture is in
/// the caller's body in every profile.
macro_rules! capture_regs {
    () => {{
        let (pc, rsp, rbp): (u64, u64, u64);
        // SAFETY: only reads registers.
        unsafe {
            std::arch::asm!(
                "lea {pc}, [rip]",
                "mov {rsp}, rsp",
                "mov {rbp}, rbp",
                pc = out(reg) pc,
                rsp = out(reg) rsp,
                rbp = out(reg) rbp,
                options(nomem, nostack, preserves_flags),
            );
        }
        Regs { pc, rsp, rbp }
    }};
}

/// A copy of the current thread's stack from some `rsp` up, like the BPF side reads it.
struct StackCopy {
    base: u64,
    words: Vec<u64>,
}

impl StackCopy {
    /// Copies `[rsp, rsp + 1 MiB)`, clipped to the mapping holding `rsp`. Must be called
    /// while the frames above `rsp` are live (from the function that captured `rsp`); its
    /// own frames are below `rsp`.
    #[inline(never)]
    fn take(rsp: u64) -> Self {
        let mapping = own_mappings()
            .into_iter()
            .find(|m| m.start <= rsp && rsp < m.end)
            .expect("mapping of the stack");
        let end = mapping.end.min(rsp + (1 << 20));
        let words = (rsp..end)
            .step_by(8)
            // SAFETY: `[rsp, end)` is mapped, readable stack of this thread, and the frames
            // there stay live (our callers) while we copy.
            .map(|address| unsafe { std::ptr::read_volatile(address as *const u64) })
            .collect();
        Self { base: rsp, words }
    }

    fn read_u64(&self, address: u64) -> Option<u64> {
        let offset = address.checked_sub(self.base)?;
        if offset % 8 != 0 {
            return None;
        }
        self.words.get(usize::try_from(offset / 8).ok()?).copied()
    }
}

struct Captured {
    regs: Regs,
    stack: StackCopy,
}

#[inline(never)]
fn outer(x: u64) -> Captured {
    // Work after the call keeps it from being a tail call (which would drop this frame).
    let captured = middle(black_box(x) + 1);
    black_box(captured)
}

#[inline(never)]
fn middle(x: u64) -> Captured {
    let captured = inner(black_box(x) * 3);
    black_box(captured)
}

#[inline(never)]
fn inner(x: u64) -> Captured {
    let regs = capture_regs!();
    let stack = StackCopy::take(regs.rsp);
    black_box(x);
    Captured { regs, stack }
}

fn names(pcs: &[u64], bias: u64) -> Vec<String> {
    pcs.iter()
        .map(|&pc| {
            // Return addresses: name the call instruction (pc - 1), in the caller.
            let link = pc.wrapping_sub(bias) - 1;
            match own_symbols().lookup(link) {
                Some((name, _)) => name.to_owned(),
                None => format!("?{pc:#x}"),
            }
        })
        .collect()
}

fn position(names: &[String], prefix: &str) -> Option<usize> {
    names.iter().position(|n| n.starts_with(prefix))
}

/// Asserts `names` starts with `middle`, `outer`, the test function, and reaches libtest's
/// `__rust_begin_short_backtrace` (std/libtest are optimized code without frame pointers
/// even in a debug build, so this crosses frames only `.eh_frame` can unwind).
fn assert_chain(names: &[String], test_fn: &str) {
    let module = module_path!();
    assert_eq!(
        names.first(),
        Some(&format!("{module}::middle")),
        "{names:#?}"
    );
    assert_eq!(
        names.get(1),
        Some(&format!("{module}::outer")),
        "{names:#?}"
    );
    // The test function, or the #[test] closure it was inlined into.
    let test_fn = format!("{module}::{test_fn}");
    assert!(
        names.get(2).is_some_and(|n| n.starts_with(&test_fn)),
        "{names:#?}"
    );
    assert!(
        position(names, "test::__rust_begin_short_backtrace").is_some(),
        "{names:#?}"
    );
}

#[test]
fn unwinds_own_stack() {
    let (table, _) = own_table();
    let bias = own_bias();
    // The bias from /proc/self/maps agrees with the symbol table.
    let inner_link = own_symbols()
        .address_of(&format!("{}::inner", module_path!()))
        .expect("inner's symbol");
    assert_eq!(
        inner_link.wrapping_add(bias),
        inner as fn(u64) -> Captured as usize as u64
    );

    let captured = outer(black_box(1));
    let (_, offset) = own_symbols().lookup(captured.regs.pc - bias).unwrap();
    assert!(offset > 0, "captured inside inner, not at its entry");

    let mut out = [0; MAX_FRAMES];
    let n = table.unwind(
        &captured.regs,
        bias,
        |a| captured.stack.read_u64(a),
        &mut out,
    );
    let chain = names(&out[..n], bias);
    assert_chain(&chain, "unwinds_own_stack");
}

/// With the rows of callsite code marked, as the daemon loads them, the walk ends at the
/// first frame the callsite rule would pick instead of going on to libtest; every pc keeps
/// its unwind rule.
#[test]
fn walk_stops_at_the_callsite_frame() {
    use crate::discovery::symbolize::Symbolizer;
    let (table, _) = own_table();
    let symbolizer = Symbolizer::load(Path::new("/proc/self/exe"), None).expect("own symbols");
    let mut marked = table.clone();
    marked.mark_callsite_code(&symbolizer.callsite_code());
    assert_well_formed(&marked);
    assert!(marked.rows.iter().any(|r| r.flags == ROW_CALLSITE));
    assert!(
        marked.rows.len() < table.rows.len() * 2,
        "{}",
        marked.rows.len()
    );
    // Every pc keeps its rule; only the flag says whether the callsite rule would pick it.
    for row in &table.rows {
        for pc in [row.pc, row.pc + 1] {
            let (Some(before), Some(after)) = (table.find(pc), marked.find(pc)) else {
                panic!("{pc:#x} lost its row");
            };
            assert!(
                UnwindRow {
                    pc: 0,
                    flags: 0,
                    ..*before
                } == UnwindRow {
                    pc: 0,
                    flags: 0,
                    ..*after
                },
                "{pc:#x}: {before:?} became {after:?}"
            );
            let picked = symbolizer
                .name(pc)
                .is_some_and(|name| !crate::discovery::symbolize::is_runtime_frame(name));
            assert_eq!(
                after.flags == ROW_CALLSITE,
                picked && after.cfa_reg != CFA_END,
                "{pc:#x} {:?}",
                symbolizer.name(pc)
            );
        }
    }

    let bias = own_bias();
    let captured = outer(black_box(3));
    let read = |a| captured.stack.read_u64(a);
    let mut out = [0; MAX_FRAMES];
    // The capture is in `inner`, itself callsite code: nothing to unwind.
    assert_eq!(marked.unwind(&captured.regs, bias, read, &mut out), 0);
    // With only `outer` counted as callsite code, `inner` and `middle` are walked through
    // and the walk ends at the return address into `outer`.
    let outer_name = format!("{}::outer", module_path!());
    let &(outer_start, outer_size, _) = own_symbols()
        .functions
        .iter()
        .find(|(_, _, name)| *name == outer_name)
        .expect("outer's symbol");
    let mut only_outer = table.clone();
    only_outer.mark_callsite_code(&[(outer_start, outer_start + outer_size)]);
    assert_well_formed(&only_outer);
    let n = only_outer.unwind(&captured.regs, bias, read, &mut out);
    let module = module_path!();
    assert_eq!(
        names(&out[..n], bias),
        [format!("{module}::middle"), format!("{module}::outer")]
    );
}

/// The uprobe case: at a function's entry the return address is at `rsp` (CFA = `rsp + 8`)
/// and `rbp` is still the caller's. Rebuild exactly that state for `inner` from the live
/// capture (its CFA and the caller's `rbp` come from one unwinding step) and walk again.
#[test]
fn unwinds_from_function_entry() {
    let (table, _) = own_table();
    let bias = own_bias();
    let captured = outer(black_box(2));
    let read = |a| captured.stack.read_u64(a);

    let mut caller = captured.regs;
    let row = table.find(caller.pc - bias).expect("row for the capture");
    assert!(step(row, &mut caller, read));
    let entry = Regs {
        pc: inner as fn(u64) -> Captured as usize as u64,
        rsp: caller.rsp - 8,
        rbp: caller.rbp,
    };
    let entry_row = table.find(entry.pc - bias).expect("row for inner's entry");
    assert_eq!((entry_row.cfa_reg, entry_row.cfa_offset), (CFA_RSP, 8));
    assert_eq!(entry_row.rbp_rule, RBP_UNCHANGED);

    let mut from_entry = [0; MAX_FRAMES];
    let n = table.unwind(&entry, bias, read, &mut from_entry);
    let mut from_inside = [0; MAX_FRAMES];
    let m = table.unwind(&captured.regs, bias, read, &mut from_inside);
    assert_eq!(&from_entry[..n], &from_inside[..m]);
    assert_chain(
        &names(&from_entry[..n], bias),
        "unwinds_from_function_entry",
    );
}

/// Every function whose unwind info begins at its entry starts with the entry rule the
/// uprobe case relies on, but for hand-written assembly that is jumped to with a frame
/// already built: aws-lc's AVX2 ChaCha20-Poly1305 bodies declare CFA = rsp+384 at their
/// first instruction, and rightly (their caller allocated the frame).
const ENTERED_WITH_A_FRAME: [&str; 2] =
    ["chacha20_poly1305_open_avx2", "chacha20_poly1305_seal_avx2"];
#[test]
fn function_entries_have_entry_rows() {
    let (table, _) = own_table();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (address, size, name) in &own_symbols().functions {
        if *size == 0 || *address < table.text_range.0 || *address >= table.text_range.1 {
            continue;
        }
        let Some(row) = table.find(*address) else {
            continue;
        };
        if row.cfa_reg == CFA_END || ENTERED_WITH_A_FRAME.contains(&name.as_str()) {
            continue;
        }
        checked += 1;
        if (row.cfa_reg, row.cfa_offset, row.rbp_rule) != (CFA_RSP, 8, RBP_UNCHANGED) {
            wrong.push((name, row));
        }
    }
    assert!(checked > 1000, "only {checked} functions checked");
    assert!(
        wrong.is_empty(),
        "{} of {checked}: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
}

fn assert_well_formed(table: &UnwindTable) {
    let rows = &table.rows;
    assert!(!rows.is_empty());
    for pair in rows.windows(2) {
        assert!(pair[0].pc < pair[1].pc, "sorted, unique: {pair:?}");
        assert!(!pair[0].same_rule(&pair[1]), "merged: {pair:?}");
    }
    assert_eq!(rows.first().unwrap().pc, table.text_range.0);
    let last = rows.last().unwrap();
    assert_eq!((last.pc, last.cfa_reg), (table.text_range.1, CFA_END));
    assert!(rows.iter().all(|r| r._pad == [0; 5]));
    assert!(
        rows.iter()
            .all(|r| r.flags & !ROW_CALLSITE == 0 && (r.cfa_reg != CFA_END || r.flags == 0))
    );
    assert!(table.find(table.text_range.0 - 1).is_none());
    assert!(table.find(u64::MAX).is_none());
    // The bucketed search finds every row at its own pc and just before the next one.
    for pair in rows.windows(2) {
        assert_eq!(table.find(pair[0].pc), Some(&pair[0]));
        assert_eq!(table.find(pair[1].pc - 1), Some(&pair[0]));
    }
    assert_eq!(
        table.buckets.len() as u64,
        bucket_count(table.text_range.0, table.text_range.1) + 1
    );
    // The end row is found at its own pc, like every other row.
    assert_eq!(table.find(table.text_range.1), Some(last));
}

#[test]
fn own_table_is_well_formed() {
    let (table, stats) = own_table();
    eprintln!("own table: {stats:?}");
    assert_well_formed(table);
    assert_eq!(stats.rows, table.rows.len());
    assert!(stats.fdes > 1000, "{stats:?}");
    assert_eq!(stats.bad_fdes, 0, "{stats:?}");
}

/// The release fixture the daemon targets: size and build time of its table. Skipped when
/// the fixture was not built (`cargo build --release -p axum-app`).
#[test]
fn axum_fixture_table_is_compact() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/axum-app");
    if !path.exists() {
        eprintln!("skipped: {} not built", path.display());
        return;
    }
    let (table, stats) = build_with_stats(&path).unwrap();
    eprintln!(
        "{}: {stats:?}, text {:x?}",
        path.display(),
        table.text_range
    );
    assert_well_formed(&table);
    assert!(table.rows.len() < 200_000, "{stats:?}");
}

#[test]
fn find_on_empty_and_tiny_tables() {
    let empty = UnwindTable::default();
    assert_eq!(empty.find(0x1000), None);
    let table = UnwindTable::new(
        vec![
            UnwindRow {
                pc: 0x1000,
                cfa_offset: 8,
                rbp_offset: 0,
                cfa_reg: CFA_RSP,
                rbp_rule: RBP_UNCHANGED,
                flags: 0,
                _pad: [0; 5],
            },
            UnwindRow::end(0x1010),
        ],
        (0x1000, 0x1010),
    );
    assert_eq!(table.find(0xfff), None);
    assert_eq!(table.find(0x1000), Some(&table.rows[0]));
    assert_eq!(table.find(0x100f), Some(&table.rows[0]));
    assert_eq!(table.find(0x1010), Some(&table.rows[1]));
    // Code exactly one bucket long: its end row is still indexed.
    let mut rows = table.rows.clone();
    rows[1] = UnwindRow::end(0x2000);
    let bucket_long = UnwindTable::new(rows, (0x1000, 0x2000));
    assert_eq!(bucket_long.find(0x1fff), Some(&bucket_long.rows[0]));
    assert_eq!(bucket_long.find(0x2000), Some(&bucket_long.rows[1]));
}

#[test]
fn rejects_non_elf_and_missing_files() {
    use super::{UnwindTableError, build};
    let missing = build(Path::new("/nonexistent/leakscope-test"));
    assert!(
        matches!(missing, Err(UnwindTableError::Io { .. })),
        "{missing:?}"
    );
    let not_elf = build(Path::new("/proc/self/maps"));
    assert!(
        matches!(not_elf, Err(UnwindTableError::Elf { .. })),
        "{not_elf:?}"
    );
}

/// One CIE (`CFA = rsp + 8`, return address at `CFA - 8`, absolute 8-byte pointers) and one
/// FDE for `[pc, pc + len)`, as `.eh_frame` bytes.
fn one_fde(pc: u64, len: u64) -> Vec<u8> {
    let mut cie: Vec<u8> = vec![0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 16, 1, 0x00];
    cie.extend([0x0c, 7, 8, 0x90, 1]); // def_cfa rsp+8; offset r16 (ra) at cfa-8
    cie.resize(20, 0); // DW_CFA_nop padding
    let mut out = (cie.len() as u32).to_le_bytes().to_vec();
    out.extend(cie);
    let mut fde = (out.len() as u32 + 4).to_le_bytes().to_vec(); // back to the CIE
    fde.extend(pc.to_le_bytes());
    fde.extend(len.to_le_bytes());
    fde.push(0); // no augmentation data
    fde.resize(24, 0);
    out.extend((fde.len() as u32).to_le_bytes());
    out.extend(fde);
    out.extend([0; 4]); // terminator
    out
}

#[test]
fn compiles_eh_frame_bytes() {
    let (table, stats) =
        super::compile_eh_frame(&one_fde(0x1000, 0x40), 0x100, &[(0x1000, 0x2000)]).unwrap();
    assert_eq!(stats.fdes, 1, "{stats:?}");
    assert_eq!(table.text_range, (0x1000, 0x1040));
    let row = table.find(0x1010).expect("a row");
    assert_eq!((row.cfa_reg, row.cfa_offset), (CFA_RSP, 8));
    assert_eq!(table.find(0x1040).map(|r| r.cfa_reg), Some(CFA_END));
}

/// An FDE claiming a terabyte inside a section header that claims as much would have
/// made the bucket index (a u32 per 4 KiB) 1 GiB, built by a quarter of a billion binary
/// searches.
#[test]
fn an_fde_over_a_huge_code_span_is_refused() {
    let err =
        super::compile_eh_frame(&one_fde(0x1000, 1 << 40), 0x100, &[(0, u64::MAX)]).unwrap_err();
    assert!(
        matches!(err, super::EhFrameError::CodeSpanTooLarge { bytes, .. } if bytes == 1 << 40),
        "{err:?}"
    );
}
