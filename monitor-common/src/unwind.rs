//! Stack unwinding with tables compiled from `.eh_frame`, shared by the BPF side (which walks
//! the user stack in the allocation's return probe, from the allocator's caller) and
//! userspace (which builds the tables and tests the walker against real stacks).
//!
//! Userspace (`monitor::discovery::unwind_table`) turns every FDE of a binary's `.eh_frame`
//! into [`UnwindRow`]s sorted by link-time pc. Each row says, for the pcs from its own `pc` up
//! to the next row's `pc`, how to find the canonical frame address (CFA) and the caller's
//! `rbp`; the return address is always at `CFA - 8` (rows where it is not are [`CFA_END`]).
//!
//! Everything here is written for the BPF verifier: no allocation, no recursion, no panics,
//! no slice indexing that could panic, and only loops with constant bounds
//! ([`FIND_ROW_MAX_ITERATIONS`], [`MAX_FRAMES`]).
//!
//! Addresses: the table holds *link-time* pcs (the addresses in the ELF file). A process maps
//! the binary at `runtime = link + bias` (the bias is non-zero for PIE), so [`unwind`] takes
//! the bias, looks rows up with `runtime_pc - bias`, and emits *runtime* return addresses.
//!
//! Limits: x86_64 only; frames whose CFA is a DWARF expression (PLT stubs), signal frames and
//! code without unwind info (JIT, other objects not in the table) stop the walk. A table
//! covers one binary, so the first frame must be in it. The BPF walk therefore starts in the
//! allocator's caller (as it is right after the allocator returned), which lets the
//! allocator itself live in libc; an allocation made from another object yields no frames
//! beyond that return address. A return address into another object is still emitted (as
//! the last one), since it is read from the frame that called it.

/// CFA = `rsp + cfa_offset`.
pub const CFA_RSP: u8 = 0;
/// CFA = `rbp + cfa_offset`.
pub const CFA_RBP: u8 = 1;
/// No usable unwind information for these pcs (gap between functions, CFA expression,
/// return address not at `CFA - 8`, outermost frame): the walk stops here.
pub const CFA_END: u8 = 2;

/// The caller's `rbp` is the current `rbp`.
pub const RBP_UNCHANGED: u8 = 0;
/// The caller's `rbp` was saved at `CFA + rbp_offset`.
pub const RBP_SAVED: u8 = 1;

/// Row flag: the row's pcs belong to a function that is an allocation's callsite (user code,
/// not allocator or standard-library plumbing). [`unwind`] stops once it reaches such a
/// frame, after emitting the return address into it: that frame is what the callsite rule
/// (`monitor::discovery::symbolize`) picks, so the frames above it are never needed, and the
/// walk usually ends after one to three frames instead of [`MAX_FRAMES`].
pub const ROW_CALLSITE: u8 = 1;

/// Frames [`unwind`] emits at most.
pub const MAX_FRAMES: usize = 16;

/// Iterations [`find_row`] performs at most: a table of up to [`MAX_ROWS`] rows is searched
/// completely.
pub const FIND_ROW_MAX_ITERATIONS: u32 = 24;

/// The largest table [`find_row`] can search within [`FIND_ROW_MAX_ITERATIONS`].
pub const MAX_ROWS: u32 = (1 << FIND_ROW_MAX_ITERATIONS) - 1;

/// How to unwind one frame, for link-time pcs in `[pc, next row's pc)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindRow {
    /// First link-time pc the row applies to.
    pub pc: u64,
    /// Added to the register selected by `cfa_reg` to get the CFA.
    pub cfa_offset: i32,
    /// With [`RBP_SAVED`]: the caller's `rbp` is stored at `CFA + rbp_offset`.
    pub rbp_offset: i32,
    /// [`CFA_RSP`], [`CFA_RBP`] or [`CFA_END`].
    pub cfa_reg: u8,
    /// [`RBP_UNCHANGED`] or [`RBP_SAVED`].
    pub rbp_rule: u8,
    /// [`ROW_CALLSITE`] or 0.
    pub flags: u8,
    pub _pad: [u8; 5],
}

const _: () = assert!(core::mem::size_of::<UnwindRow>() == 24);

impl UnwindRow {
    /// A row that stops the walk for pcs from `pc` on.
    pub const fn end(pc: u64) -> Self {
        Self {
            pc,
            cfa_offset: 0,
            rbp_offset: 0,
            cfa_reg: CFA_END,
            rbp_rule: RBP_UNCHANGED,
            flags: 0,
            _pad: [0; 5],
        }
    }

    /// Whether `self` and `other` unwind the same way and carry the same flags (everything
    /// but `pc` equal), so that `other` following `self` is redundant.
    pub const fn same_rule(&self, other: &Self) -> bool {
        self.cfa_reg == other.cfa_reg
            && self.cfa_offset == other.cfa_offset
            && self.rbp_rule == other.rbp_rule
            && self.rbp_offset == other.rbp_offset
            && self.flags == other.flags
    }
}

/// The registers unwinding needs, all runtime values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub pc: u64,
    pub rsp: u64,
    pub rbp: u64,
}

const _: () = assert!(core::mem::size_of::<Regs>() == 24);

/// The pc to look the row up with. The first frame's pc is the instruction the frame is at
/// (for the BPF walk: the allocator's return address, the caller's next instruction once
/// the allocator has returned). Every other frame's pc is a return address, which points
/// *after* the call and may already be the next function (calls to `noreturn` functions end
/// a function), so those are looked up at `pc - 1`, inside the call instruction. [`unwind`]
/// applies this; callers of [`find_row`]/[`step`] that walk by hand must do the same.
#[inline(always)]
pub const fn lookup_pc(pc: u64, first_frame: bool) -> u64 {
    if first_frame { pc } else { pc.wrapping_sub(1) }
}

/// The row covering link-time `pc` in a table of `len` rows sorted by `pc`, read with
/// `row_at(index)`: the last row whose `pc` is `<= pc`. `None` if `pc` is before the first
/// row, `row_at` fails, or the search did not finish within [`FIND_ROW_MAX_ITERATIONS`]
/// (possible only for tables larger than [`MAX_ROWS`]). The returned row may be a
/// [`CFA_END`] row (after the last function, or in a gap); [`step`] stops on it.
#[inline(always)]
pub fn find_row(len: u32, row_at: impl Fn(u32) -> Option<UnwindRow>, pc: u64) -> Option<UnwindRow> {
    find_row_in(0, len, row_at, pc)
}

/// Link-time code per bucket of the index [`find_row_bucketed`] narrows a search with: 4 KiB,
/// a few dozen rows in Rust code.
pub const BUCKET_SHIFT: u32 = 12;

/// [`find_row`] narrowed by a bucket index, which is what the BPF walker uses: a search over
/// the whole table touches a page of it per halving, which cost about 1.2 µs a frame in the
/// probe (measured; TLB and cache misses after the trap, we believe), while a bucket's rows
/// sit together.
///
/// `bucket_at(b)`, for `b` in `0..=buckets`, is the index of the row covering link-time pc
/// `text_start + (b << BUCKET_SHIFT)` (see [`bucket_index`]), so a pc in bucket `b` is
/// covered by one of rows `bucket_at(b) ..= bucket_at(b + 1)`. `None` for a pc outside the
/// indexed code or a failed read.
#[inline(always)]
pub fn find_row_bucketed(
    text_start: u64,
    buckets: u32,
    bucket_at: impl Fn(u32) -> Option<u32>,
    row_at: impl Fn(u32) -> Option<UnwindRow>,
    pc: u64,
) -> Option<UnwindRow> {
    let bucket = pc.checked_sub(text_start)? >> BUCKET_SHIFT;
    if bucket >= buckets as u64 {
        return None;
    }
    let bucket = bucket as u32;
    let first = bucket_at(bucket)?;
    let last = bucket_at(bucket + 1)?;
    find_row_in(first, last.saturating_add(1), row_at, pc)
}

/// The bucket index of a table (`rows` sorted by `pc`, starting at `text_start`, ending with
/// the row at the end of the covered code): `buckets + 1` row indexes, see
/// [`find_row_bucketed`]. Userspace builds it; the iterator yields the indexes in order.
pub fn bucket_index(
    rows: &[UnwindRow],
    text_start: u64,
    text_end: u64,
) -> impl Iterator<Item = u32> + '_ {
    (0..=bucket_count(text_start, text_end)).map(move |b| {
        let pc = text_start.saturating_add(b << BUCKET_SHIFT);
        // The last row at or before `pc`; rows[0] starts the text, so there is one.
        let covering = rows.partition_point(|r| r.pc <= pc).saturating_sub(1);
        covering as u32
    })
}

/// Buckets of the index of code `[text_start, text_end)`: enough that `text_end` itself, the
/// end row's pc, is in one.
pub const fn bucket_count(text_start: u64, text_end: u64) -> u64 {
    (text_end.saturating_sub(text_start) >> BUCKET_SHIFT) + 1
}

/// [`find_row`] over rows `first..end` only: the last of them whose `pc` is `<= pc`.
#[inline(always)]
pub fn find_row_in(
    first: u32,
    end: u32,
    row_at: impl Fn(u32) -> Option<UnwindRow>,
    pc: u64,
) -> Option<UnwindRow> {
    // Invariant: rows before `lo` have `row.pc <= pc`, rows from `hi` on have `row.pc > pc`.
    let mut lo: u32 = first;
    let mut hi: u32 = end;
    for _ in 0..FIND_ROW_MAX_ITERATIONS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if row_at(mid)?.pc <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo != hi || lo == first {
        return None;
    }
    row_at(lo - 1)
}

/// Unwinds one frame: computes the CFA from `row`, reads the return address at `CFA - 8`
/// and (with [`RBP_SAVED`]) the caller's `rbp`, and makes `regs` the caller's registers
/// (`pc` = return address, `rsp` = CFA). `read_u64` reads 8 bytes of the target's memory at
/// a runtime address. Returns false, leaving `regs` untouched, when the walk must stop:
/// [`CFA_END`] or unknown row, failed read, a CFA not above `rsp` (corrupt or looping
/// stack), or a zero return address (outermost frame).
#[inline(always)]
pub fn step(
    row: &UnwindRow,
    regs: &mut Regs,
    mut read_u64: impl FnMut(u64) -> Option<u64>,
) -> bool {
    let base = match row.cfa_reg {
        CFA_RSP => regs.rsp,
        CFA_RBP => regs.rbp,
        _ => return false,
    };
    let cfa = base.wrapping_add(row.cfa_offset as i64 as u64);
    // The stack grows down, so a caller's frame is always above: this also bounds garbage.
    if cfa <= regs.rsp {
        return false;
    }
    let Some(return_address) = read_u64(cfa.wrapping_sub(8)) else {
        return false;
    };
    if return_address == 0 {
        return false;
    }
    let rbp = if row.rbp_rule == RBP_SAVED {
        match read_u64(cfa.wrapping_add(row.rbp_offset as i64 as u64)) {
            Some(rbp) => rbp,
            None => return false,
        }
    } else {
        regs.rbp
    };
    regs.pc = return_address;
    regs.rsp = cfa;
    regs.rbp = rbp;
    true
}

/// Walks the stack from `regs` (runtime registers of the first frame; the BPF side passes
/// the allocator's caller as it is right after the return) and writes the return addresses
/// of up to `max_frames` (at most [`MAX_FRAMES`]) frames into `out`: `out[0]` is where the
/// first frame's function returns to (the callsite in its caller), `out[1]` the caller's
/// return address, and so on. Returns how many were written.
///
/// `bias` translates addresses: runtime = link-time + `bias`. `find` gets the *link-time*
/// lookup pc (already adjusted by [`lookup_pc`]) and returns its row, with [`find_row`] or,
/// as the BPF walker does, [`find_row_bucketed`]. `read_u64` reads the target's memory
/// (`bpf_probe_read_user` in BPF).
///
/// The walk stops at the first frame without a usable row, so a return address into code
/// the table does not cover (another shared object) is still emitted, as the last one. It
/// also stops at the first frame whose row is marked [`ROW_CALLSITE`], without unwinding it:
/// the return address into that frame is the last one emitted (none, when the first frame
/// is already one).
#[inline(always)]
pub fn unwind(
    regs: &Regs,
    bias: u64,
    max_frames: usize,
    mut find: impl FnMut(u64) -> Option<UnwindRow>,
    mut read_u64: impl FnMut(u64) -> Option<u64>,
    out: &mut [u64; MAX_FRAMES],
) -> usize {
    let mut regs = *regs;
    let mut written = 0;
    for i in 0..MAX_FRAMES {
        if i >= max_frames {
            break;
        }
        let Some(row) = find(lookup_pc(regs.pc, i == 0).wrapping_sub(bias)) else {
            break;
        };
        if row.flags & ROW_CALLSITE != 0 {
            break;
        }
        if !step(&row, &mut regs, &mut read_u64) {
            break;
        }
        let Some(slot) = out.get_mut(i) else {
            break;
        };
        *slot = regs.pc;
        written = i + 1;
    }
    written
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::Regs {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pc: u64, cfa_reg: u8, cfa_offset: i32, rbp_rule: u8, rbp_offset: i32) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset,
            rbp_offset,
            cfa_reg,
            rbp_rule,
            flags: 0,
            _pad: [0; 5],
        }
    }

    fn find_in(rows: &[UnwindRow], pc: u64) -> Option<UnwindRow> {
        find_row(rows.len() as u32, |i| rows.get(i as usize).copied(), pc)
    }

    #[test]
    fn find_row_empty_table() {
        assert_eq!(find_in(&[], 0), None);
        assert_eq!(find_in(&[], u64::MAX), None);
    }

    #[test]
    fn find_row_single_row() {
        let rows = [row(0x1000, CFA_RSP, 8, RBP_UNCHANGED, 0)];
        assert_eq!(find_in(&rows, 0xfff), None);
        assert_eq!(find_in(&rows, 0x1000), Some(rows[0]));
        assert_eq!(find_in(&rows, u64::MAX), Some(rows[0]));
    }

    #[test]
    fn find_row_boundaries() {
        let rows: [UnwindRow; 5] =
            core::array::from_fn(|i| row(0x1000 + 0x10 * i as u64, CFA_RSP, 8 * i as i32, 0, 0));
        assert_eq!(find_in(&rows, 0), None);
        assert_eq!(find_in(&rows, 0xfff), None);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(find_in(&rows, r.pc), Some(*r), "row {i} start");
            assert_eq!(find_in(&rows, r.pc + 0xf), Some(*r), "row {i} end");
        }
        assert_eq!(find_in(&rows, 0x2000), Some(rows[4]));
    }

    #[test]
    fn find_row_every_size_and_pc() {
        // Exhaustive on small tables: every size, every pc in and around them.
        let mut rows = [UnwindRow::end(0); 40];
        for (i, r) in rows.iter_mut().enumerate() {
            r.pc = 100 + 3 * i as u64;
        }
        for len in 0..=rows.len() {
            let table = &rows[..len];
            for pc in 90..250 {
                let expected = table.iter().rev().find(|r| r.pc <= pc).copied();
                assert_eq!(find_in(table, pc), expected, "len {len} pc {pc}");
            }
        }
    }

    #[test]
    fn find_row_largest_table() {
        // A virtual table of MAX_ROWS rows with pc = 2 * index is searched completely.
        let at = |i: u32| (i < MAX_ROWS).then(|| UnwindRow::end(2 * i as u64));
        for pc in [0, 1, 2, 77_777, 2 * (MAX_ROWS as u64 - 1), u64::MAX] {
            let expected = (pc / 2).min(MAX_ROWS as u64 - 1) * 2;
            assert_eq!(find_row(MAX_ROWS, at, pc).map(|r| r.pc), Some(expected));
        }
        // One row more cannot always be searched within the iteration bound (pc 0 needs one
        // more halving): refused, not wrong.
        let at = |i: u32| Some(UnwindRow::end(2 * i as u64));
        assert_eq!(find_row(MAX_ROWS + 1, at, 0), None);
        // A failing read is a miss.
        assert_eq!(find_row(10, |_| None, 5), None);
    }

    #[test]
    fn bucketed_search_agrees_with_the_full_search() {
        // Rows at irregular pcs over several buckets, one bucket without any row start, and
        // the end row not on a bucket boundary.
        let text_start = 0x10_0000u64;
        let mut rows: [UnwindRow; 41] = core::array::from_fn(|i| {
            let gap = if i > 20 { 0x1800 } else { 0 };
            row(
                text_start + 0x3a7 * i as u64 + gap,
                CFA_RSP,
                8 * i as i32,
                0,
                0,
            )
        });
        let text_end = rows[40].pc;
        rows[40] = UnwindRow::end(text_end);
        let index: [u32; 16] = {
            let mut index = [u32::MAX; 16];
            for (slot, value) in index
                .iter_mut()
                .zip(bucket_index(&rows, text_start, text_end))
            {
                *slot = value;
            }
            index
        };
        let buckets = bucket_count(text_start, text_end) as u32;
        assert_eq!(index[buckets as usize + 1], u32::MAX, "buckets + 1 entries");
        let row_at = |i: u32| rows.get(i as usize).copied();
        let bucket_at = |b: u32| index.get(b as usize).copied();
        for pc in (text_start - 16..text_end + 0x2000).step_by(3) {
            let full = find_row(rows.len() as u32, row_at, pc);
            let bucketed = find_row_bucketed(text_start, buckets, bucket_at, row_at, pc);
            match bucketed {
                Some(found) => assert_eq!(Some(found), full, "pc {pc:#x}"),
                // Outside the indexed code: the full search finds nothing or the end row.
                None => assert!(
                    pc < text_start || (pc > text_end && full == Some(rows[40])),
                    "pc {pc:#x}: {full:?}"
                ),
            }
        }
    }

    /// A fake stack: 8-byte words from `base`.
    fn reader(base: u64, words: &[u64]) -> impl FnMut(u64) -> Option<u64> + '_ {
        move |addr| {
            let offset = addr.checked_sub(base)?;
            if offset % 8 != 0 {
                return None;
            }
            words.get((offset / 8) as usize).copied()
        }
    }

    #[test]
    fn step_at_function_entry() {
        // At entry: return address at [rsp], CFA = rsp + 8.
        let words = [0x4242, 0xdead];
        let mut regs = Regs {
            pc: 0x1000,
            rsp: 0x7000,
            rbp: 0x9999,
        };
        assert!(step(
            &row(0x1000, CFA_RSP, 8, RBP_UNCHANGED, 0),
            &mut regs,
            reader(0x7000, &words)
        ));
        assert_eq!(
            regs,
            Regs {
                pc: 0x4242,
                rsp: 0x7008,
                rbp: 0x9999
            }
        );
    }

    #[test]
    fn step_rbp_frame() {
        // push rbp; mov rbp, rsp; sub rsp, 0x20: CFA = rbp + 16, saved rbp at CFA - 16.
        let base = 0x7000;
        let mut words = [0u64; 8];
        words[4] = 0x5555; // saved rbp at 0x7020
        words[5] = 0x4242; // return address at 0x7028
        let mut regs = Regs {
            pc: 0x1010,
            rsp: base,
            rbp: base + 0x20,
        };
        let r = row(0x1004, CFA_RBP, 16, RBP_SAVED, -16);
        assert!(step(&r, &mut regs, reader(base, &words)));
        assert_eq!(
            regs,
            Regs {
                pc: 0x4242,
                rsp: base + 0x30,
                rbp: 0x5555
            }
        );
    }

    #[test]
    fn step_stops() {
        let words = [0x4242, 0x1111];
        let start = Regs {
            pc: 0x1000,
            rsp: 0x7000,
            rbp: 0x7000,
        };
        let cases = [
            (row(0, CFA_END, 8, 0, 0), "end row"),
            (row(0, 7, 8, 0, 0), "unknown cfa register"),
            (row(0, CFA_RSP, 0, 0, 0), "cfa not above rsp"),
            (row(0, CFA_RSP, -8, 0, 0), "cfa below rsp"),
            (row(0, CFA_RSP, 0x100, 0, 0), "unreadable return address"),
            (row(0, CFA_RSP, 8, RBP_SAVED, 0x100), "unreadable saved rbp"),
        ];
        for (r, what) in cases {
            let mut regs = start;
            assert!(!step(&r, &mut regs, reader(0x7000, &words)), "{what}");
            assert_eq!(regs, start, "{what}: registers untouched");
        }
        let mut regs = start;
        assert!(
            !step(&row(0, CFA_RSP, 8, 0, 0), &mut regs, reader(0x7000, &[0])),
            "zero return"
        );
    }

    #[test]
    fn unwind_synthetic_stack() {
        // Link-time layout: f at 0x1000 (frameless, 0x18 bytes of locals), g at 0x2000
        // (rbp frame), h at 0x3000 (caller of g), nothing after 0x4000. Runtime = link + bias.
        let bias = 0x5555_0000_0000;
        let rows = [
            row(0x1000, CFA_RSP, 8, RBP_UNCHANGED, 0),
            row(0x1004, CFA_RSP, 0x20, RBP_UNCHANGED, 0),
            row(0x2000, CFA_RSP, 8, RBP_UNCHANGED, 0),
            row(0x2001, CFA_RSP, 16, RBP_SAVED, -16),
            row(0x2004, CFA_RBP, 16, RBP_SAVED, -16),
            row(0x3000, CFA_RSP, 0x10, RBP_UNCHANGED, 0),
            // The next function starts at 0x3010; with its rule h's caller would be lost.
            row(0x3010, CFA_RSP, 8, RBP_UNCHANGED, 0),
            UnwindRow::end(0x4000),
        ];
        let base = 0x7000u64;
        let mut words = [0u64; 16];
        // f's frame: 0x18 bytes of locals, then its return address into g (0x2050).
        words[3] = bias + 0x2050;
        // g's frame (rsp = 0x7020): 0x10 bytes, then saved rbp (h's), then the return into
        // h, right after a call that ends h: it is looked up at pc - 1, inside h.
        words[6] = 0xabcd;
        words[7] = bias + 0x3010;
        // h's frame (rsp = 0x7040): 8 bytes, then a return address into another object.
        words[9] = 0x7fff_0000_1234;
        let regs = Regs {
            pc: bias + 0x1008,
            rsp: base,
            rbp: base + 0x30,
        };
        // The return addresses a walk from `regs` over `table` emits, at most `max`.
        let walk = |table: &[UnwindRow], regs: &Regs, max: usize| {
            let mut out = [0; MAX_FRAMES];
            let n = unwind(
                regs,
                bias,
                max,
                |pc| find_in(table, pc),
                reader(base, &words),
                &mut out,
            );
            (out, n)
        };
        let (out, n) = walk(&rows, &regs, MAX_FRAMES);
        assert_eq!(&out[..n], &[bias + 0x2050, bias + 0x3010, 0x7fff_0000_1234]);
        // With g marked as callsite code, the walk ends at the return address into g.
        let mut marked = rows;
        for r in &mut marked[2..5] {
            r.flags = ROW_CALLSITE;
        }
        let (out, n) = walk(&marked, &regs, MAX_FRAMES);
        assert_eq!(&out[..n], &[bias + 0x2050]);
        // With f itself marked, the first frame is the callsite: nothing to unwind.
        marked[0].flags = ROW_CALLSITE;
        marked[1].flags = ROW_CALLSITE;
        assert_eq!(walk(&marked, &regs, MAX_FRAMES).1, 0);
        // max_frames bounds the walk.
        assert_eq!(walk(&rows, &regs, 2).1, 2);
        // First frame at 0x4000 (the end row) gives nothing.
        let at_end = Regs {
            pc: bias + 0x4000,
            ..regs
        };
        assert_eq!(walk(&rows, &at_end, MAX_FRAMES).1, 0);
    }

    #[test]
    fn lookup_pc_adjusts_return_addresses_only() {
        assert_eq!(lookup_pc(0x1000, true), 0x1000);
        assert_eq!(lookup_pc(0x1000, false), 0xfff);
        assert_eq!(lookup_pc(0, false), u64::MAX);
    }
}
