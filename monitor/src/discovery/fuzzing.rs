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

/// The name parsers discovery runs on symbol names read from a binary (demangling, generic
/// arguments, labels, roles), on any text: a corrupted string table can name a symbol
/// anything. `other` stands for a second name they compare with (a task cell's type).
pub fn symbol_names(raw: &str, other: &str) -> usize {
    use super::naming;
    let name = naming::demangle(raw);
    let mut seen = naming::clean_label(&name).len();
    seen += naming::split_top_level(&name).len();
    seen += naming::generic_args_after(&name, "core::ptr::drop_in_place").map_or(0, |a| a.len());
    seen += usize::from(naming::cell_drop_glue_args(&name).is_some());
    seen += usize::from(naming::raw_poll_args(&name).is_some());
    seen += naming::blocking_task_inner(&name).map_or(0, |s| s.len());
    seen += naming::strip_generics(&name).len();
    seen += naming::future_impl_self(&name).map_or(0, str::len);
    seen += naming::poll_fn_label(&name).len();
    let (_, futures) = naming::role_of_names([name.as_str(), other], false, true);
    seen += futures.len();
    seen += usize::from(naming::same_site(&name, other));
    seen += usize::from(naming::is_library_label(&name));
    seen += usize::from(naming::related_site(&name, other));
    seen += naming::owner_path(&name).map_or(0, |p| p.len());
    seen += usize::from(naming::mentions_path(&name, other));
    seen += usize::from(naming::scheduler_in_name(&name).is_some());
    seen
}
