//! Names (and, with DWARF line info, `file:line`) for code addresses of a target
//! executable, and the rule that picks an allocation's callsite out of its stack: the first
//! frame outside allocator, `alloc`, `core` and `std` code.

use std::collections::HashMap;
use std::path::Path;

use object::{Object, ObjectSymbol, SymbolKind};

use crate::discovery::LineIndex;

/// Function symbols of one executable, sorted by address, and its line tables.
#[derive(Debug, Default)]
pub struct Symbolizer {
    /// (start, end, demangled name without hash).
    functions: Vec<(u64, u64, String)>,
    /// Empty when the executable (and its debug file) has no DWARF line info.
    lines: LineIndex,
}

/// Where an allocation was made: see [`Symbolizer::callsite`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Callsite {
    /// The function, demangled (`app::state::remember`), or an address.
    pub label: String,
    /// `"path:line"` of the call in that function, when the binary has DWARF line info.
    pub location: Option<String>,
}

/// Path prefixes of code that allocates on behalf of its caller, never the callsite a user
/// wants to see.
const RUNTIME_PREFIXES: &[&str] = &[
    "alloc::",
    "core::",
    "std::",
    "hashbrown::",
    "__rust",
    "__rdl",
    "__rg_",
    "_rjem_",
    "tikv_jemallocator::",
    "tikv_jemalloc_sys::",
    "mimalloc::",
    "libmimalloc_sys::",
    "mi_",
    "je_",
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
];

/// True when `name` is allocator or standard-library plumbing (including trait impls such as
/// `<alloc::vec::Vec<T> as core::clone::Clone>::clone` or `<T as alloc::..::SpecFromElem>`).
pub fn is_runtime_frame(name: &str) -> bool {
    let trimmed = name.trim_start_matches('<');
    if RUNTIME_PREFIXES.iter().any(|p| trimmed.starts_with(p)) {
        return true;
    }
    // `<T as alloc::...>` / `<[T] as alloc::...>`: a generic self type with a std trait.
    if let Some((self_ty, rest)) = trimmed.split_once(" as ") {
        let generic_self =
            self_ty.len() <= 3 || self_ty.starts_with('[') || self_ty.starts_with('&');
        return generic_self && RUNTIME_PREFIXES.iter().any(|p| rest.starts_with(p));
    }
    false
}

impl Symbolizer {
    /// Reads the symbols of the executable at `path` and the line tables of it or of its
    /// separate debug file (`debug_file` when given, else the one gdb would find). Missing
    /// or unreadable line info only costs the locations; it is logged, not an error.
    pub fn load(path: &Path, debug_file: Option<&Path>) -> std::io::Result<Self> {
        let mut functions = function_symbols(path)?;
        // A stripped executable keeps its names in the separate debug file discovery found.
        if functions.is_empty()
            && let Some(debug) = debug_file
        {
            functions = function_symbols(debug)?;
        }
        functions.sort_by_key(|f| (f.0, std::cmp::Reverse(f.1)));
        functions.dedup_by_key(|f| f.0);
        let lines = match LineIndex::load(path, debug_file) {
            Ok(lines) => lines,
            Err(e) => {
                log::warn!("{}: heap callsites get no file:line: {e}", path.display());
                LineIndex::default()
            }
        };
        Ok(Self { functions, lines })
    }

    /// Replaces the line tables (for tests).
    pub fn with_lines(self, lines: LineIndex) -> Self {
        Self { lines, ..self }
    }

    /// Whether `addr` lies within the executable's named code at all.
    fn covers(&self, addr: u64) -> bool {
        match (self.functions.first(), self.functions.last()) {
            (Some(first), Some(last)) => addr >= first.0 && addr < last.1,
            _ => false,
        }
    }

    /// Link-time `[start, end)` ranges, sorted and disjoint, of the code [`Self::callsite`]
    /// would pick as a callsite: functions whose name is not runtime plumbing, each range
    /// covering exactly the addresses [`Self::name`] gives that function's name for. The
    /// BPF stack walk stops in these (see `UnwindTable::mark_callsite_code`).
    pub fn callsite_code(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (i, (start, end, name)) in self.functions.iter().enumerate() {
            if is_runtime_frame(name) {
                continue;
            }
            // `name` looks up the last function starting at or before an address.
            let next_start = self.functions.get(i + 1).map_or(u64::MAX, |f| f.0);
            let end = (*end).min(next_start);
            match ranges.last_mut() {
                Some(last) if last.1 == *start => last.1 = end,
                _ => ranges.push((*start, end)),
            }
        }
        ranges
    }

    /// Name of the function containing link-time address `addr`.
    pub fn name(&self, addr: u64) -> Option<&str> {
        let index = self
            .functions
            .partition_point(|f| f.0 <= addr)
            .checked_sub(1)?;
        let (start, end, name) = &self.functions[index];
        (addr >= *start && addr < *end).then_some(name.as_str())
    }

    /// The callsite of a stack: the first frame (innermost first, link-time return
    /// addresses) whose function is not runtime plumbing. Unnamed frames are labelled by
    /// address; a stack that never leaves the runtime is labelled by its outermost frame.
    ///
    /// The location is that of the chosen frame's call instruction (`pc - 1`), in the
    /// function the label names: inlined library code inside it resolves to the line that
    /// called it (see [`LineIndex::lookup`]).
    pub fn callsite(&self, frames: &[u64]) -> Callsite {
        let at = |label: String, pc: u64| Callsite {
            label,
            location: self.lines.location(pc.saturating_sub(1)),
        };
        let mut last = None;
        for &pc in frames {
            match self.name(pc.saturating_sub(1)) {
                Some(name) if is_runtime_frame(name) => last = Some((name, pc)),
                Some(name) => return at(name.to_string(), pc),
                None if self.covers(pc) => return at(format!("0x{pc:x}"), pc),
                // A return address into a shared library (or the vdso): the executable's
                // table has no name for it, and the allocation came from outside Rust code.
                None => {
                    return Callsite {
                        label: "[code outside the executable]".to_string(),
                        location: None,
                    };
                }
            }
        }
        match last {
            Some((name, pc)) => at(name.to_string(), pc),
            None => Callsite {
                label: "unknown".to_string(),
                location: None,
            },
        }
    }
}

/// Function symbols (start, end, demangled name without hash) of an ELF file.
fn function_symbols(path: &Path) -> std::io::Result<Vec<(u64, u64, String)>> {
    let data = super::read_bounded(path).map_err(std::io::Error::other)?;
    let file = object::File::parse(&*data).map_err(std::io::Error::other)?;
    Ok(file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
        .filter_map(|s| {
            let raw = s.name().ok()?;
            let raw = raw.split(".llvm.").next().unwrap_or(raw);
            let name = format!("{:#}", rustc_demangle::demangle(raw));
            // A corrupted size must not wrap (nor swallow every later address).
            let size = s.size().clamp(1, super::elf::MAX_FUNCTION_BYTES);
            Some((s.address(), s.address().saturating_add(size), name))
        })
        .collect())
}

/// Callsites by stack hash, so each distinct stack is symbolized once.
#[derive(Debug, Default)]
pub struct CallsiteCache {
    labels: HashMap<u64, Callsite>,
}

/// Distinct stacks remembered per process before the cache starts over.
const MAX_CACHED_STACKS: usize = 1 << 16;

impl CallsiteCache {
    pub fn callsite(
        &mut self,
        symbolizer: &Symbolizer,
        stack_hash: u64,
        frames: &[u64],
    ) -> &Callsite {
        if self.labels.len() >= MAX_CACHED_STACKS && !self.labels.contains_key(&stack_hash) {
            self.labels.clear();
        }
        self.labels
            .entry(stack_hash)
            .or_insert_with(|| symbolizer.callsite(frames))
    }

    /// The callsite of a stack already named, by its hash.
    pub fn get(&self, stack_hash: u64) -> Option<&Callsite> {
        self.labels.get(&stack_hash)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn runtime_frames_are_recognised() {
        for name in [
            "alloc::raw_vec::finish_grow",
            "<alloc::vec::Vec<T> as core::clone::Clone>::clone",
            "<T as alloc::vec::spec_from_elem::SpecFromElem>::from_elem",
            "hashbrown::raw::RawTable<T,A>::reserve_rehash",
            "__rust_alloc",
            "_rjem_malloc",
            "std::sys::alloc::unix::<impl core::alloc::global::GlobalAlloc for std::alloc::System>::alloc",
        ] {
            assert!(is_runtime_frame(name), "{name}");
        }
        for name in [
            "heap_app::grow::{{closure}}",
            "axum_app::state_leak::{{closure}}",
            "<heap_app::Cache as core::default::Default>::default",
        ] {
            assert!(!is_runtime_frame(name), "{name}");
        }
    }

    /// Allocates on its only line, which it returns.
    #[rustfmt::skip]
    #[inline(never)]
    pub(crate) fn allocating_marker() -> (Vec<u8>, u32) { (vec![1u8; std::hint::black_box(64)], line!()) }

    /// Link-time start of the function of this test binary whose name ends in `name`.
    pub(crate) fn own_function(symbolizer: &Symbolizer, name: &str) -> u64 {
        symbolizer
            .functions
            .iter()
            .find(|f| f.2.ends_with(name))
            .unwrap_or_else(|| panic!("no symbol {name}"))
            .0
    }

    #[test]
    fn callsite_carries_the_file_and_line_of_the_chosen_frame() {
        let symbolizer = Symbolizer::load(Path::new("/proc/self/exe"), None).expect("own symbols");
        let marker = own_function(&symbolizer, "symbolize::tests::allocating_marker");
        let runtime = symbolizer
            .functions
            .iter()
            .find(|f| f.2.starts_with("alloc::raw_vec::"))
            .expect("an alloc:: function")
            .0;
        let line = allocating_marker().1;
        // Return addresses: one into runtime code, then one into the marker.
        let callsite = symbolizer.callsite(&[runtime + 1, marker + 1]);
        assert!(
            callsite.label.ends_with("allocating_marker"),
            "{callsite:?}"
        );
        assert_eq!(
            callsite.location,
            Some(format!("monitor/src/discovery/symbolize.rs:{line}"))
        );
        // Cached per stack.
        let mut cache = CallsiteCache::default();
        assert_eq!(cache.callsite(&symbolizer, 9, &[marker + 1]), &callsite);
        // Without line tables, the same label and no location.
        let bare = symbolizer.with_lines(LineIndex::default());
        let callsite = bare.callsite(&[runtime + 1, marker + 1]);
        assert!(callsite.label.ends_with("allocating_marker"));
        assert_eq!(callsite.location, None);
        assert_eq!(
            Symbolizer::default().callsite(&[1]),
            Callsite {
                label: "[code outside the executable]".to_string(),
                location: None
            }
        );
    }

    #[test]
    fn names_functions_of_this_test_binary() {
        let symbolizer = Symbolizer::load(Path::new("/proc/self/exe"), None).expect("own symbols");
        let (start, _, name) = symbolizer
            .functions
            .iter()
            .find(|f| f.2.ends_with("names_functions_of_this_test_binary"))
            .expect("this test's own symbol");
        assert_eq!(symbolizer.name(*start + 1), Some(name.as_str()));
    }
}
