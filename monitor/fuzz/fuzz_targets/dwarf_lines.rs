//! The DWARF line readers (spawn-site lines and the heap callsites' line index).
//!
//! Input: for each section of [`SECTIONS`] in that order, its length (4 bytes,
//! little-endian; cut to what is left) and its bytes; what remains are addresses to look up
//! (8 bytes each). `cargo xtask fuzz` seeds it with the DWARF fixture's sections in that
//! form.
#![no_main]

use leakscope::discovery::fuzzing::dwarf_lines;
use libfuzzer_sys::fuzz_target;

/// The sections the readers load, in input order. Keep in step with xtask's seeding.
const SECTIONS: [&str; 9] = [
    ".debug_info",
    ".debug_abbrev",
    ".debug_line",
    ".debug_str",
    ".debug_line_str",
    ".debug_ranges",
    ".debug_rnglists",
    ".debug_addr",
    ".debug_str_offsets",
];

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut sections: Vec<(&str, &[u8])> = Vec::new();
    for name in SECTIONS {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
        let (contents, tail) = tail.split_at(len);
        sections.push((name, contents));
        rest = tail;
    }
    let addrs: Vec<u64> = rest
        .chunks_exact(8)
        .take(64)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let section = |name: &str| {
        sections
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, contents)| contents)
    };
    let _ = dwarf_lines(&section, &addrs);
});
