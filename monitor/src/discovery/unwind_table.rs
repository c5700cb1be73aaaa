//! Unwind tables compiled from `.eh_frame` for the BPF unwinder.
//!
//! Release Rust binaries have no frame pointers, but always carry `.eh_frame` (the unwinder
//! needs it for panics). [`build`] evaluates every FDE's call frame program once, in
//! userspace, and keeps only what a stack walk needs: per pc range, how to find the CFA
//! (`rsp`/`rbp` + offset) and where the caller's `rbp` was saved. The result is a sorted
//! array of [`UnwindRow`]s (24 bytes each) that goes into a BPF array map, searched and
//! walked by the shared code in [`monitor_common::unwind`].
//!
//! Rows that cannot be expressed that way become [`CFA_END`] rows and stop the walk there:
//! CFA expressions (PLT stubs), CFA relative to other registers (stack realignment through
//! another register, and the few instructions of inline stack probing loops in functions
//! with frames of a page or more, where CFA = `r11 + n`), a return address not at `CFA - 8`
//! or undefined (the outermost frame), an `rbp` recovered other than from the stack, and
//! signal trampolines. Gaps between functions and the end of the covered code are
//! [`CFA_END`] rows too.
//!
//! All pcs are link-time addresses (as in the ELF file); the walker translates with the
//! mapping's bias.
//!
//! [`CFA_END`]: monitor_common::unwind::CFA_END

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, EhFrame, EndianSlice,
    FrameDescriptionEntry, LittleEndian, RegisterRule, UnwindContext, UnwindSection,
    UnwindTableRow, X86_64,
};
use monitor_common::unwind::{
    CFA_END, CFA_RBP, CFA_RSP, MAX_FRAMES, MAX_ROWS, RBP_SAVED, RBP_UNCHANGED, ROW_CALLSITE, Regs,
    UnwindRow, bucket_index, find_row_bucketed, unwind,
};
use object::{Architecture, Object, ObjectSection, SectionKind};

use super::DiscoveryError;

/// A binary's unwind rows, sorted by link-time `pc`, each `pc` unique and no row repeating
/// its predecessor's rule. The last row is a `CFA_END` row at the end of the covered code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindTable {
    rows: Vec<UnwindRow>,
    /// Link-time `[start, end)` of the code the table covers (lowest FDE start, highest FDE
    /// end); pcs outside it have no unwind information.
    pub text_range: (u64, u64),
    /// The rows' bucket index (see [`monitor_common::unwind::find_row_bucketed`]), kept in
    /// step with `rows`.
    buckets: Vec<u32>,
}

/// What [`build_with_stats`] found, for logs and tuning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// FDEs compiled into the table.
    pub fdes: usize,
    /// FDEs ignored: empty, or not inside an executable section (left over from discarded
    /// code).
    pub skipped_fdes: usize,
    /// FDEs whose call frame program gimli could not evaluate: their range is `CFA_END`.
    pub bad_fdes: usize,
    /// Rows produced by evaluating the FDEs' call frame programs.
    pub cfi_rows: usize,
    /// CFI rows whose CFA is a DWARF expression (PLT stubs).
    pub cfa_expression_rows: usize,
    /// CFI rows marking the outermost frame (return address undefined).
    pub outermost_rows: usize,
    /// CFI rows not expressible as an [`UnwindRow`] for another reason.
    pub unsupported_rows: usize,
    /// Rows in the final table.
    pub rows: usize,
    /// Wall time of reading, parsing and compiling.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindTableError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing ELF {path}: {source}")]
    Elf {
        path: PathBuf,
        source: object::Error,
    },
    #[error("{path}: unsupported architecture {architecture:?}: only x86_64 can be unwound")]
    UnsupportedArchitecture {
        path: PathBuf,
        architecture: Architecture,
    },
    #[error("{path}: no .eh_frame section")]
    NoEhFrame { path: PathBuf },
    #[error("{path}: {source}")]
    EhFrame { path: PathBuf, source: EhFrameError },
    /// Not a regular file, or too large to read (see `discovery::read_bounded`).
    #[error(transparent)]
    File(DiscoveryError),
}

/// Why `.eh_frame` contents could not be compiled into a table ([`compile_eh_frame`]).
#[derive(Debug, thiserror::Error)]
pub enum EhFrameError {
    #[error("malformed .eh_frame: {0}")]
    Malformed(#[from] gimli::Error),
    #[error("unwind table has more than {max} rows, more than a BPF walk can search")]
    TooManyRows { max: u32 },
    #[error(
        "the FDEs cover {bytes:#x} bytes of code, more than the {max:#x} the table's bucket \
         index is built for (corrupted addresses)"
    )]
    CodeSpanTooLarge { bytes: u64, max: u64 },
}

/// The widest span of code a table covers. Its bucket index holds a `u32` per 4 KiB, so
/// this is a 4 MiB index; real executables have tens of MiB of code. Wider spans come from
/// corrupted FDE or section addresses, and would make the index itself the problem.
const MAX_CODE_SPAN: u64 = 1 << 32;

impl UnwindTable {
    /// A table of `rows` (sorted by `pc`, as [`build`] makes them) covering `text_range`.
    pub fn new(rows: Vec<UnwindRow>, text_range: (u64, u64)) -> Self {
        let buckets = bucket_index(&rows, text_range.0, text_range.1).collect();
        Self {
            rows,
            text_range,
            buckets,
        }
    }

    pub fn rows(&self) -> &[UnwindRow] {
        &self.rows
    }

    /// The bucket index the kernel searches the rows with (buckets + 1 entries).
    pub fn buckets(&self) -> &[u32] {
        &self.buckets
    }

    /// The row covering link-time `pc`, found the way the BPF walker finds it.
    pub fn find(&self, pc: u64) -> Option<&UnwindRow> {
        let row = self.find_row(pc)?;
        // Row pcs are unique, so this locates the row `find_row` returned.
        let index = self.rows.binary_search_by_key(&row.pc, |r| r.pc).ok()?;
        self.rows.get(index)
    }

    /// Walks a stack with this table, exactly as the BPF program does: see
    /// [`monitor_common::unwind::unwind`] (`bias`: runtime = link-time + `bias`).
    pub fn unwind(
        &self,
        regs: &Regs,
        bias: u64,
        read_u64: impl FnMut(u64) -> Option<u64>,
        out: &mut [u64; MAX_FRAMES],
    ) -> usize {
        unwind(
            regs,
            bias,
            MAX_FRAMES,
            |pc| self.find_row(pc),
            read_u64,
            out,
        )
    }

    fn find_row(&self, pc: u64) -> Option<UnwindRow> {
        let buckets = u32::try_from(self.buckets.len().saturating_sub(1)).unwrap_or(0);
        find_row_bucketed(
            self.text_range.0,
            buckets,
            |b| self.buckets.get(b as usize).copied(),
            |i| self.rows.get(i as usize).copied(),
            pc,
        )
    }

    /// Marks the rows of callsite code ([`ROW_CALLSITE`]): `callsite_code` holds sorted,
    /// disjoint link-time `[start, end)` ranges of the functions an allocation's callsite
    /// can be (see `Symbolizer::callsite_code`). Rows are split where a range begins or ends
    /// inside them, so each row is wholly in or out; `CFA_END` rows stay unmarked, since
    /// they stop the walk anyway. The table stays well formed (sorted, merged).
    pub fn mark_callsite_code(&mut self, callsite_code: &[(u64, u64)]) {
        let in_callsite_code = |pc: u64| {
            let index = callsite_code.partition_point(|&(start, _)| start <= pc);
            index
                .checked_sub(1)
                .and_then(|i| callsite_code.get(i))
                .is_some_and(|&(_, end)| pc < end)
        };
        let first = self.text_range.0;
        let mut points: Vec<u64> = self.rows.iter().map(|r| r.pc).collect();
        points.extend(
            callsite_code
                .iter()
                .flat_map(|&(start, end)| [start, end])
                .filter(|&pc| pc >= first),
        );
        points.sort_unstable();
        points.dedup();
        let mut marked: Vec<UnwindRow> = Vec::with_capacity(points.len());
        for pc in points {
            let Some(&rule) = self.find(pc) else {
                continue;
            };
            let flags = if rule.cfa_reg != CFA_END && in_callsite_code(pc) {
                ROW_CALLSITE
            } else {
                0
            };
            let row = UnwindRow { pc, flags, ..rule };
            if marked.last().is_some_and(|last| last.same_rule(&row)) {
                continue;
            }
            marked.push(row);
        }
        *self = Self::new(marked, self.text_range);
    }
}

/// Compiles the `.eh_frame` of the x86_64 ELF file at `path` into an [`UnwindTable`].
pub fn build(path: &Path) -> Result<UnwindTable, UnwindTableError> {
    build_with_stats(path).map(|(table, _)| table)
}

/// [`build`], also reporting what was found.
pub fn build_with_stats(path: &Path) -> Result<(UnwindTable, BuildStats), UnwindTableError> {
    let started = Instant::now();
    let data = super::read_bounded(path).map_err(|e| match e {
        DiscoveryError::Io { source, .. } => UnwindTableError::Io {
            path: path.to_owned(),
            source,
        },
        other => UnwindTableError::File(other),
    })?;
    let elf_error = |source| UnwindTableError::Elf {
        path: path.to_owned(),
        source,
    };
    let file = object::File::parse(&*data).map_err(elf_error)?;
    let architecture = file.architecture();
    if architecture != Architecture::X86_64 {
        return Err(UnwindTableError::UnsupportedArchitecture {
            path: path.to_owned(),
            architecture,
        });
    }
    let eh_frame =
        file.section_by_name(".eh_frame")
            .ok_or_else(|| UnwindTableError::NoEhFrame {
                path: path.to_owned(),
            })?;
    let eh_frame_data = eh_frame.uncompressed_data().map_err(elf_error)?;

    // Pointer encodings in .eh_frame are relative to these (mostly pc-relative, which only
    // needs the section's own address).
    let mut bases = BaseAddresses::default().set_eh_frame(eh_frame.address());
    for (name, set) in [
        (
            ".eh_frame_hdr",
            BaseAddresses::set_eh_frame_hdr as fn(_, _) -> _,
        ),
        (".text", BaseAddresses::set_text),
        (".got", BaseAddresses::set_got),
    ] {
        if let Some(section) = file.section_by_name(name) {
            bases = set(bases, section.address());
        }
    }
    // Code as far as the file holds it: a section header claiming more (a truncated or
    // corrupted file) must not let FDEs claim addresses no byte backs.
    let file_len = data.len() as u64;
    let code: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .filter_map(|s| {
            let (offset, size) = s.file_range()?;
            let size = size.min(file_len.saturating_sub(offset));
            Some((s.address(), s.address().checked_add(size)?))
        })
        .collect();

    let section = EhFrame::new(&eh_frame_data, LittleEndian);
    let mut stats = BuildStats::default();
    let table = compile(&section, &bases, &code, &mut stats).map_err(|source| {
        UnwindTableError::EhFrame {
            path: path.to_owned(),
            source,
        }
    })?;
    stats.rows = table.rows.len();
    stats.elapsed = started.elapsed();
    Ok((table, stats))
}

/// Compiles `.eh_frame` contents held in memory, as [`build`] does once it has read the
/// file: `eh_frame` is the section as loaded at link-time address `eh_frame_address`, and
/// only FDEs inside `code` (link-time `[start, end)` ranges of executable code) are kept.
/// For tests and fuzzing; `.eh_frame_hdr`, `.text` and `.got` relative pointer encodings are
/// not resolved (Rust and C toolchains emit pc-relative ones).
pub fn compile_eh_frame(
    eh_frame: &[u8],
    eh_frame_address: u64,
    code: &[(u64, u64)],
) -> Result<(UnwindTable, BuildStats), EhFrameError> {
    let bases = BaseAddresses::default().set_eh_frame(eh_frame_address);
    let mut stats = BuildStats::default();
    let table = compile(
        &EhFrame::new(eh_frame, LittleEndian),
        &bases,
        code,
        &mut stats,
    )?;
    stats.rows = table.rows.len();
    Ok((table, stats))
}

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// Evaluates every FDE inside `code` (executable sections' `[start, end)`), then sorts,
/// deduplicates and merges the rows.
fn compile(
    section: &EhFrame<Reader<'_>>,
    bases: &BaseAddresses,
    code: &[(u64, u64)],
    stats: &mut BuildStats,
) -> Result<UnwindTable, EhFrameError> {
    // (row, is the end-of-FDE marker): at equal pcs a real row wins over an end marker, so
    // adjacent FDEs leave no gap and padding between FDEs becomes CFA_END.
    let mut rows: Vec<(UnwindRow, bool)> = Vec::new();
    let mut cies: HashMap<usize, CommonInformationEntry<Reader<'_>>> = HashMap::new();
    let mut ctx = UnwindContext::new();
    let mut text_range = (u64::MAX, 0);

    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(|section, bases, offset| {
            if let Some(cie) = cies.get(&offset.0) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            cies.insert(offset.0, cie.clone());
            Ok(cie)
        })?;
        let (start, end) = (fde.initial_address(), fde.end_address());
        if start >= end || !code.iter().any(|&(lo, hi)| lo <= start && end <= hi) {
            stats.skipped_fdes += 1;
            continue;
        }
        stats.fdes += 1;
        text_range = (text_range.0.min(start), text_range.1.max(end));

        let before = rows.len();
        if fde.is_signal_trampoline() || fde.cie().return_address_register() != X86_64::RA {
            stats.unsupported_rows += 1;
            rows.push((UnwindRow::end(start), false));
        } else if fde_rows(section, bases, &mut ctx, &fde, &mut rows, stats).is_err() {
            stats.bad_fdes += 1;
            rows.truncate(before);
            rows.push((UnwindRow::end(start), false));
        }
        rows.push((UnwindRow::end(end), true));
        // Every row takes at least a byte of the section, so this bounds memory by its
        // size already; the check keeps a crafted section from filling gigabytes first.
        if rows.len() > MAX_ROWS as usize {
            return Err(EhFrameError::TooManyRows { max: MAX_ROWS });
        }
    }
    let span = text_range.1.saturating_sub(text_range.0);
    if span > MAX_CODE_SPAN {
        return Err(EhFrameError::CodeSpanTooLarge {
            bytes: span,
            max: MAX_CODE_SPAN,
        });
    }

    // Stable: of overlapping FDEs starting at the same pc, the first in the section wins.
    rows.sort_by_key(|&(row, is_end)| (row.pc, is_end));
    rows.dedup_by_key(|(row, _)| row.pc);
    let mut merged: Vec<UnwindRow> = Vec::with_capacity(rows.len());
    for (row, _) in rows {
        if merged.last().is_some_and(|last| last.same_rule(&row)) {
            continue;
        }
        merged.push(row);
    }
    if merged.is_empty() {
        text_range = (0, 0);
    }
    if merged.len() > MAX_ROWS as usize {
        return Err(EhFrameError::TooManyRows { max: MAX_ROWS });
    }
    Ok(UnwindTable::new(merged, text_range))
}

/// Appends the rows of one FDE's call frame program.
fn fde_rows(
    section: &EhFrame<Reader<'_>>,
    bases: &BaseAddresses,
    ctx: &mut UnwindContext<usize>,
    fde: &FrameDescriptionEntry<Reader<'_>>,
    rows: &mut Vec<(UnwindRow, bool)>,
    stats: &mut BuildStats,
) -> gimli::Result<()> {
    let mut table = fde.rows(section, bases, ctx)?;
    while let Some(row) = table.next_row()? {
        if row.start_address() < row.end_address() {
            stats.cfi_rows += 1;
            rows.push((convert(row, stats), false));
        }
    }
    Ok(())
}

/// One CFI row as an [`UnwindRow`], or a `CFA_END` row if the walker cannot follow it.
fn convert(row: &UnwindTableRow<usize>, stats: &mut BuildStats) -> UnwindRow {
    let end = UnwindRow::end(row.start_address());
    let (register, offset) = match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => (register, offset),
        CfaRule::Expression(_) => {
            stats.cfa_expression_rows += 1;
            return end;
        }
    };
    let cfa_reg = match register {
        X86_64::RSP => CFA_RSP,
        X86_64::RBP => CFA_RBP,
        _ => {
            stats.unsupported_rows += 1;
            return end;
        }
    };
    match row.register(X86_64::RA) {
        RegisterRule::Offset(-8) => {}
        RegisterRule::Undefined => {
            stats.outermost_rows += 1;
            return end;
        }
        _ => {
            stats.unsupported_rows += 1;
            return end;
        }
    }
    let (rbp_rule, rbp_offset) = match row.register(X86_64::RBP) {
        RegisterRule::Undefined | RegisterRule::SameValue => (RBP_UNCHANGED, Some(0)),
        RegisterRule::Offset(offset) => (RBP_SAVED, i32::try_from(offset).ok()),
        _ => (RBP_UNCHANGED, None),
    };
    let (Ok(cfa_offset), Some(rbp_offset)) = (i32::try_from(offset), rbp_offset) else {
        stats.unsupported_rows += 1;
        return end;
    };
    UnwindRow {
        pc: row.start_address(),
        cfa_offset,
        rbp_offset,
        cfa_reg,
        rbp_rule,
        flags: 0,
        _pad: [0; 5],
    }
}

#[cfg(test)]
mod tests;
