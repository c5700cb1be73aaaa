//! `file:line` of code addresses from DWARF, when the target was built with debug info
//! (`debug = "line-tables-only"` is enough).
//!
//! Spawn sites ([`line_locations`]): a label like `app::handler::{{closure}}::{{closure}}`
//! says which function spawned, but a handler often spawns several tasks; the line of the
//! async block's poll function pins the exact `tokio::spawn` call. Only the line program is
//! read (no `.debug_info` DIEs beyond unit headers), which keeps this cheap even for large
//! binaries.
//!
//! Heap callsites ([`LineIndex`]): any return address of a stack, so the whole line table
//! is indexed once per executable, together with the outermost inlined calls of
//! `.debug_info`, so that an address inside inlined library code (`vec!` inlines
//! `RawVec::allocate` down to the `__rust_alloc` call) resolves to the line of the
//! function that the symbol table names.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use gimli::{EndianSlice, LittleEndian};

use super::elf::Image;
use super::{Budget, DiscoveryError};

/// A DWARF section's contents by name (`.debug_line`, …), `None` when absent.
pub(crate) type Sections<'s, 'd> = &'s dyn Fn(&str) -> Option<Cow<'d, [u8]>>;

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Maps each of `addrs` that the line tables cover to `"path:line"`. The path is relative
/// to the compilation directory when the compiler recorded it that way (workspace code),
/// absolute otherwise (registry crates, std). Returns an empty map without `.debug_line`.
pub(crate) fn line_locations(
    img: &Image,
    addrs: &[u64],
) -> Result<HashMap<u64, String>, gimli::Error> {
    line_locations_in(&|name| img.section_data(name), addrs, &img.budget)
}

/// [`line_locations`] over DWARF sections given by name; stops early, with what it has,
/// once `budget` is spent.
pub(crate) fn line_locations_in<'d>(
    section: Sections<'_, 'd>,
    addrs: &[u64],
    budget: &Budget,
) -> Result<HashMap<u64, String>, gimli::Error> {
    let mut out = HashMap::new();
    if addrs.is_empty() || section(".debug_line").is_none() {
        return Ok(out);
    }
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'d, [u8]>, gimli::Error> {
        Ok(section(id.name()).unwrap_or(Cow::Borrowed(&[])))
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));

    // Query address → resolved, in address order for range lookups.
    let mut pending: BTreeMap<u64, Option<String>> = addrs.iter().map(|&a| (a, None)).collect();

    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        if budget.spent() {
            break;
        }
        let unit = dwarf.unit(header)?;
        let Some(program) = unit.line_program.clone() else {
            continue;
        };
        let mut rows = program.rows();
        // (address, file index, line) of the previous row in the current sequence.
        let mut prev: Option<(u64, u64, u64)> = None;
        // Queries that fell on a line-0 row: take the next row with a real line.
        let mut waiting: Vec<u64> = Vec::new();
        while let Some((lp, row)) = rows.next_row()? {
            if budget.spent() {
                break;
            }
            let addr = row.address();
            let line = row.line().map_or(0, |l| l.get());
            if let Some((p_addr, p_file, p_line)) = prev
                && addr > p_addr
            {
                let hits: Vec<u64> = pending
                    .range(p_addr..addr)
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                for q in hits {
                    if p_line == 0 {
                        waiting.push(q);
                    } else if let Some(loc) = location(&dwarf, &unit, lp, p_file, p_line) {
                        pending.insert(q, Some(loc));
                    }
                }
            }
            if row.end_sequence() {
                prev = None;
                waiting.clear();
                continue;
            }
            if line != 0
                && !waiting.is_empty()
                && let Some(loc) = location(&dwarf, &unit, lp, row.file_index(), line)
            {
                for q in waiting.drain(..) {
                    pending.insert(q, Some(loc.clone()));
                }
            }
            prev = Some((addr, row.file_index(), line));
        }
    }
    for (addr, loc) in pending {
        if let Some(loc) = loc {
            out.insert(addr, loc);
        }
    }
    Ok(out)
}

/// `"dir/file:line"` for a line-table row.
fn location(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    header: &gimli::LineProgramHeader<R<'_>>,
    file_index: u64,
    line: u64,
) -> Option<String> {
    let path = file_path(dwarf, unit, header, file_index)?;
    Some(format!("{path}:{line}"))
}

/// The path of file `file_index` of a line program, as [`line_locations`] shows it:
/// relative to the compilation directory for the user's own files, absolute otherwise.
fn file_path(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    header: &gimli::LineProgramHeader<R<'_>>,
    file_index: u64,
) -> Option<String> {
    let file = header.file(file_index)?;
    let name = dwarf.attr_string(unit, file.path_name()).ok()?;
    let name = name.to_string_lossy().into_owned();
    let mut path = if name.starts_with('/') {
        name
    } else {
        let dir = file
            .directory(header)
            .and_then(|d| dwarf.attr_string(unit, d).ok())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        if dir.is_empty() {
            name
        } else {
            format!("{}/{}", dir.trim_end_matches('/'), name)
        }
    };
    // Show the user's own files relative to the compilation directory (the workspace root),
    // as they appear in the repository. Dependencies compiled from a cargo registry or git
    // checkout keep their absolute path: relative to their own crate root, `src/lib.rs`
    // would be ambiguous.
    if let Some(comp_dir) = unit.comp_dir.map(|c| c.to_string_lossy().into_owned()) {
        if !path.starts_with('/') {
            // Directory index 0 (DWARF 4) means the compilation directory.
            path = format!("{}/{}", comp_dir.trim_end_matches('/'), path);
        }
        let foreign = ["/.cargo/registry/", "/.cargo/git/", "/rustc/"]
            .iter()
            .any(|m| comp_dir.contains(m) || comp_dir.starts_with(&m[1..]));
        let prefix = format!("{}/", comp_dir.trim_end_matches('/'));
        if let (false, Some(rel)) = (foreign, path.strip_prefix(&prefix)) {
            path = rel.to_string();
        }
    }
    Some(path)
}

/// `file:line` of every code address that an executable's DWARF line tables cover, built
/// once per executable ([`LineIndex::load`]) and looked up by binary search.
///
/// Two tables:
/// - the rows of `.debug_line`, sequence by sequence: an address belongs to the row with
///   the greatest address not above it, within the sequence that covers it;
/// - the outermost inlined calls of `.debug_info` (`DW_TAG_inlined_subroutine` DIEs not
///   nested in another one), each with its `DW_AT_call_file`/`DW_AT_call_line`. The line
///   table gives the innermost source line of inlined code (for a `vec![…]` that is a line
///   of `alloc/src/alloc.rs`); the call of the outermost inlined function is the line of
///   the function that owns the machine code, the one a symbol table names.
///
/// Paths are rendered as `line_locations` renders them. Empty without `.debug_line`.
#[derive(Debug, Default)]
pub struct LineIndex {
    /// Distinct rendered paths; [`LineRow::file`] and [`InlinedCall::file`] index them.
    files: Vec<String>,
    /// Sorted by address, sequences not overlapping, each closed by an [`END_OF_SEQUENCE`]
    /// row at its end address.
    rows: Vec<LineRow>,
    /// Sorted by `start`, not overlapping.
    inlined: Vec<InlinedCall>,
}

/// [`LineRow::file`] of the row that closes a sequence.
const END_OF_SEQUENCE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LineRow {
    addr: u64,
    file: u32,
    /// 0: no location known for this row.
    line: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InlinedCall {
    start: u64,
    end: u64,
    file: u32,
    /// 0: the call's line is unknown.
    line: u32,
}

/// Interned rendered paths.
#[derive(Default)]
struct Paths {
    ids: HashMap<String, u32>,
    paths: Vec<String>,
}

impl Paths {
    /// The id of file `file_index` of `header`, cached per unit in `unit_files`.
    fn id(
        &mut self,
        unit_files: &mut HashMap<u64, Option<u32>>,
        dwarf: &gimli::Dwarf<R<'_>>,
        unit: &gimli::Unit<R<'_>>,
        header: &gimli::LineProgramHeader<R<'_>>,
        file_index: u64,
    ) -> Option<u32> {
        *unit_files.entry(file_index).or_insert_with(|| {
            let path = file_path(dwarf, unit, header, file_index)?;
            if let Some(&id) = self.ids.get(&path) {
                return Some(id);
            }
            let id = u32::try_from(self.paths.len())
                .ok()
                .filter(|&id| id != END_OF_SEQUENCE)?;
            self.ids.insert(path.clone(), id);
            self.paths.push(path);
            Some(id)
        })
    }
}

/// One line-table sequence: its rows (address, file id and line, 0 when unknown) and the
/// address that ends it.
struct Sequence {
    rows: Vec<(u64, Option<u32>, u32)>,
    end: u64,
}

impl LineIndex {
    /// Reads the executable at `exe` and its separate debug file the way discovery does
    /// ([`super::analyze_with_debug_file`]): `debug_file` when given, else the one gdb
    /// would find. The DWARF comes from the binary itself when it has any.
    ///
    /// Within [`super::ANALYSIS_BUDGET`], like the analysis: past it,
    /// [`DiscoveryError::TooSlow`].
    pub fn load(exe: &Path, debug_file: Option<&Path>) -> Result<Self, DiscoveryError> {
        let mut img = Image::load(exe)?;
        img.budget = super::Budget::new(super::ANALYSIS_BUDGET);
        super::debuginfo::attach(exe, &mut img, debug_file)?;
        let index = Self::build(&img).map_err(|e| DiscoveryError::Malformed {
            path: exe.to_path_buf(),
            reason: format!("unreadable DWARF: {e}"),
        })?;
        super::check_budget(exe, &img)?;
        Ok(index)
    }

    /// Indexes the line tables (and inlined calls) of `img`, with its debug file if one is
    /// attached. A unit whose DWARF cannot be read is skipped. Stops early, with what it
    /// has, once the image's budget is spent (the caller checks it).
    pub(crate) fn build(img: &Image) -> Result<Self, gimli::Error> {
        Self::build_in(&|name| img.section_data(name), &img.budget)
    }

    /// [`LineIndex::build`] over DWARF sections given by name.
    pub(crate) fn build_in<'d>(
        section: Sections<'_, 'd>,
        budget: &Budget,
    ) -> Result<Self, gimli::Error> {
        if section(".debug_line").is_none() {
            return Ok(Self::default());
        }
        let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'d, [u8]>, gimli::Error> {
            Ok(section(id.name()).unwrap_or(Cow::Borrowed(&[])))
        })?;
        let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));

        let mut paths = Paths::default();
        let mut sequences: Vec<Sequence> = Vec::new();
        let mut inlined: Vec<InlinedCall> = Vec::new();
        let mut units = dwarf.units();
        while let Some(header) = units.next()? {
            if budget.spent() {
                break;
            }
            let offset = header.offset();
            let unit = match dwarf.unit(header) {
                Ok(unit) => unit,
                Err(e) => {
                    log::debug!("DWARF unit at {offset:?} skipped: {e}");
                    continue;
                }
            };
            let Some(program) = unit.line_program.clone() else {
                continue;
            };
            let mut unit_files = HashMap::new();
            if let Err(e) = read_sequences(
                &dwarf,
                &unit,
                budget,
                program.clone(),
                &mut paths,
                &mut unit_files,
                &mut sequences,
            ) {
                log::debug!("line program of DWARF unit at {offset:?} skipped: {e}");
            }
            if let Err(e) = read_inlined_calls(
                &dwarf,
                &unit,
                budget,
                program.header(),
                &mut paths,
                &mut unit_files,
                &mut inlined,
            ) {
                log::debug!("inlined calls of DWARF unit at {offset:?} skipped: {e}");
            }
        }

        // Sequences of code that the linker dropped or folded can claim the addresses of
        // kept code: the first sequence at an address stays, overlapping ones go.
        sequences.sort_by_key(|s| (s.rows[0].0, std::cmp::Reverse(s.end)));
        let mut rows: Vec<LineRow> = Vec::new();
        let mut covered_to = 0;
        for seq in sequences {
            if seq.rows[0].0 < covered_to {
                continue;
            }
            covered_to = seq.end;
            rows.extend(seq.rows.iter().map(|&(addr, file, line)| match file {
                Some(file) => LineRow { addr, file, line },
                None => LineRow {
                    addr,
                    file: 0,
                    line: 0,
                },
            }));
            rows.push(LineRow {
                addr: seq.end,
                file: END_OF_SEQUENCE,
                line: 0,
            });
        }

        inlined.sort_by_key(|c| (c.start, std::cmp::Reverse(c.end)));
        let mut covered_to = 0;
        inlined.retain(|c| {
            let keep = c.start >= covered_to;
            if keep {
                covered_to = c.end;
            }
            keep
        });

        Ok(Self {
            files: paths.paths,
            rows,
            inlined,
        })
    }

    /// No line info at all (the executable has no `.debug_line`, or none that could be read).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// `(path, line)` of link-time address `addr` in the source of the function that owns
    /// its machine code: the call of the outermost inlined function when `addr` is inside
    /// inlined code, else its line-table row. Code the compiler attributed to no line (line
    /// 0) takes the location of the next code in its sequence that has one, as in
    /// `line_locations`.
    pub fn lookup(&self, addr: u64) -> Option<(String, u64)> {
        self.resolve(addr)
            .map(|(path, line)| (path.to_string(), u64::from(line)))
    }

    /// [`LineIndex::lookup`] as `"path:line"`.
    pub fn location(&self, addr: u64) -> Option<String> {
        self.resolve(addr)
            .map(|(path, line)| format!("{path}:{line}"))
    }

    /// `(path, line)` of the line-table row covering `addr` as it stands: the innermost
    /// source line of inlined code, nothing for line 0.
    pub fn line_row(&self, addr: u64) -> Option<(String, u64)> {
        let row = self.rows[self.row_index(addr)?];
        (row.file != END_OF_SEQUENCE && row.line != 0)
            .then(|| (self.files[row.file as usize].clone(), u64::from(row.line)))
    }

    fn resolve(&self, addr: u64) -> Option<(&str, u32)> {
        let in_own_code = |addr: u64, row: &LineRow| match self.inlined_call(addr) {
            Some(call) => (call.line != 0).then_some((call.file, call.line)),
            None => Some((row.file, row.line)),
        };
        let index = self.row_index(addr)?;
        let first = &self.rows[index];
        let (file, line) = if first.file == END_OF_SEQUENCE {
            return None;
        } else if first.line != 0 || self.inlined_call(addr).is_some() {
            in_own_code(addr, first)?
        } else {
            let next = self.rows[index + 1..]
                .iter()
                .take_while(|r| r.file != END_OF_SEQUENCE)
                .find(|r| r.line != 0)?;
            in_own_code(next.addr, next)?
        };
        Some((self.files[file as usize].as_str(), line))
    }

    /// Index of the row with the greatest address not above `addr`.
    fn row_index(&self, addr: u64) -> Option<usize> {
        self.rows.partition_point(|r| r.addr <= addr).checked_sub(1)
    }

    fn inlined_call(&self, addr: u64) -> Option<InlinedCall> {
        let index = self
            .inlined
            .partition_point(|c| c.start <= addr)
            .checked_sub(1)?;
        let call = self.inlined[index];
        (addr < call.end).then_some(call)
    }
}

/// Appends the sequences of one unit's line program to `out` (tombstoned ones, starting at
/// address 0, left out).
fn read_sequences(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    budget: &super::Budget,
    program: gimli::IncompleteLineProgram<R<'_>>,
    paths: &mut Paths,
    unit_files: &mut HashMap<u64, Option<u32>>,
    out: &mut Vec<Sequence>,
) -> Result<(), gimli::Error> {
    let mut rows = program.rows();
    let mut current: Vec<(u64, Option<u32>, u32)> = Vec::new();
    while let Some((header, row)) = rows.next_row()? {
        if budget.spent() {
            break;
        }
        let addr = row.address();
        if row.end_sequence() {
            let rows = std::mem::take(&mut current);
            if let Some(&(start, ..)) = rows.first()
                && start != 0
                && addr > start
            {
                out.push(Sequence { rows, end: addr });
            }
            continue;
        }
        let line = row
            .line()
            .and_then(|l| u32::try_from(l.get()).ok())
            .unwrap_or(0);
        let file = if line == 0 {
            None
        } else {
            paths.id(unit_files, dwarf, unit, header, row.file_index())
        };
        current.push((addr, file, line));
    }
    Ok(())
}

/// Appends the address ranges of one unit's outermost inlined calls to `out`.
fn read_inlined_calls(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    budget: &super::Budget,
    header: &gimli::LineProgramHeader<R<'_>>,
    paths: &mut Paths,
    unit_files: &mut HashMap<u64, Option<u32>>,
    out: &mut Vec<InlinedCall>,
) -> Result<(), gimli::Error> {
    let mut cursor = unit.entries();
    let mut depth: isize = 0;
    // Depth of the inlined call whose subtree the cursor is in.
    let mut inside: Option<isize> = None;
    while let Some((delta, entry)) = cursor.next_dfs()? {
        if budget.spent() {
            break;
        }
        depth += delta;
        if let Some(outer) = inside {
            if depth > outer {
                continue;
            }
            inside = None;
        }
        if entry.tag() != gimli::DW_TAG_inlined_subroutine {
            continue;
        }
        inside = Some(depth);
        let file_index = match entry.attr_value(gimli::DW_AT_call_file)? {
            Some(gimli::AttributeValue::FileIndex(i) | gimli::AttributeValue::Udata(i)) => Some(i),
            _ => None,
        };
        let line = entry
            .attr_value(gimli::DW_AT_call_line)?
            .and_then(|v| v.udata_value())
            .and_then(|l| u32::try_from(l).ok())
            .unwrap_or(0);
        let file = match (line, file_index) {
            (0, _) | (_, None) => None,
            (_, Some(i)) => paths.id(unit_files, dwarf, unit, header, i),
        };
        let (file, line) = file.map_or((0, 0), |f| (f, line));
        for (start, end) in die_ranges(dwarf, unit, entry)? {
            out.push(InlinedCall {
                start,
                end,
                file,
                line,
            });
        }
    }
    Ok(())
}

/// The non-empty, non-tombstoned `[start, end)` ranges of a DIE (`DW_AT_low_pc` with
/// `DW_AT_high_pc`, or `DW_AT_ranges`).
fn die_ranges(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    entry: &gimli::DebuggingInformationEntry<'_, '_, R<'_>>,
) -> Result<Vec<(u64, u64)>, gimli::Error> {
    let mut low = None;
    let mut high = None;
    let mut size = None;
    let mut out = Vec::new();
    let mut attrs = entry.attrs();
    while let Some(attr) = attrs.next()? {
        match attr.name() {
            gimli::DW_AT_low_pc => low = dwarf.attr_address(unit, attr.value())?,
            gimli::DW_AT_high_pc => match attr.value() {
                gimli::AttributeValue::Udata(n) => size = Some(n),
                value => high = dwarf.attr_address(unit, value)?,
            },
            gimli::DW_AT_ranges => {
                if let Some(mut ranges) = dwarf.attr_ranges(unit, attr.value())? {
                    while let Some(r) = ranges.next()? {
                        out.push((r.begin, r.end));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(low) = low
        && let Some(high) = high.or_else(|| size.and_then(|n| low.checked_add(n)))
    {
        out.push((low, high));
    }
    out.retain(|&(start, end)| start != 0 && start < end);
    Ok(out)
}

#[cfg(test)]
mod tests;
