//! `file:line` of spawn sites from `.debug_line`, when the target was built with debug
//! info (`debug = "line-tables-only"` is enough).
//!
//! A label like `app::handler::{{closure}}::{{closure}}` says which function spawned, but a
//! handler often spawns several tasks; the line of the async block's poll function pins the
//! exact `tokio::spawn` call. Only the line program is read (no `.debug_info` DIEs beyond
//! unit headers), which keeps this cheap even for large binaries.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use gimli::{EndianSlice, LittleEndian};

use super::elf::Image;

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Maps each of `addrs` that the line tables cover to `"path:line"`. The path is relative
/// to the compilation directory when the compiler recorded it that way (workspace code),
/// absolute otherwise (registry crates, std). Returns an empty map without `.debug_line`.
pub(crate) fn line_locations(
    img: &Image,
    addrs: &[u64],
) -> Result<HashMap<u64, String>, gimli::Error> {
    let mut out = HashMap::new();
    if addrs.is_empty() || img.section_data(".debug_line").is_none() {
        return Ok(out);
    }
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'_, [u8]>, gimli::Error> {
        Ok(img.section_data(id.name()).unwrap_or(Cow::Borrowed(&[])))
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));

    // Query address → resolved, in address order for range lookups.
    let mut pending: BTreeMap<u64, Option<String>> = addrs.iter().map(|&a| (a, None)).collect();

    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
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
    Some(format!("{path}:{line}"))
}
