//! Entry points for the fuzz targets in `monitor/fuzz` that reach code with no public
//! entry of its own. Not an API: each takes untrusted bytes the way the daemon meets them,
//! and must return (never panic, never hang) whatever they hold.

use std::borrow::Cow;

use super::{Budget, LineIndex, dwarf};

/// Both DWARF line readers, as discovery runs them, over sections given by name
/// (`.debug_line`, `.debug_info`, `.debug_abbrev`, `.debug_str`, …): the spawn-site lookup
/// of `addrs`, and the per-executable index with a lookup of each of `addrs`. Returns how
/// many addresses either reader placed.
pub fn dwarf_lines<'d>(section: &dyn Fn(&str) -> Option<&'d [u8]>, addrs: &[u64]) -> usize {
    // Unlimited: a slow input must show up as a fuzzer timeout, not hide behind the budget.
    let budget = Budget::unlimited();
    let load = |name: &str| section(name).map(Cow::Borrowed);
    let mut placed = dwarf::line_locations_in(&load, addrs, &budget).map_or(0, |m| m.len());
    if let Ok(index) = LineIndex::build_in(&load, &budget) {
        for &addr in addrs {
            placed += usize::from(index.lookup(addr).is_some());
            let _ = index.line_row(addr);
        }
    }
    placed
}
