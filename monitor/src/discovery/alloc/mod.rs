//! Heap allocator discovery: which allocator a Rust executable uses, and exactly where the
//! heap-mode uprobes go.
//!
//! [`find_allocators`] reads the executable (and the shared libraries the process maps, see
//! `targets::maps::mapped_libraries`) and returns one [`AllocFn`] per allocator entry point:
//! - Rust's global-allocator shims in the executable (`__rust_alloc`, `__rust_alloc_zeroed`,
//!   `__rust_realloc`, `__rust_dealloc`; v0-mangled as `__rustc::__rust_alloc` in current
//!   rustc, matched by that last path segment), each with how it forwards ([`Forwarding`]);
//! - the C malloc family of the mapped libc (`malloc`, `calloc`, `realloc`, `free`,
//!   `posix_memalign`, `aligned_alloc`, `memalign`, `valloc`, `pvalloc`);
//! - jemalloc as linked by tikv-jemallocator (`_rjem_malloc`, `_rjem_mallocx`,
//!   `_rjem_sdallocx`, …) and mimalloc (`mi_malloc`, `mi_malloc_aligned`, `mi_free`, …),
//!   statically linked into the executable (or, unprefixed, in a mapped library).
//!
//! Which allocator is Rust's `#[global_allocator]` ([`GlobalAllocator`]) is decided from the
//! code: what the shims jump to or call (through `__rdl_*` into libc for `System`, into
//! `_rjem_*` for jemalloc, into `mi_*` for mimalloc), never from configuration.
//!
//! # Probe placement
//!
//! A uprobe traps on an `int3` written over the probed instruction; the kernel then either
//! *emulates* that instruction in the trap handler or copies it to an out-of-line slot and
//! *single-steps* it, a second trap. On the VMs leakscope targets the difference is ≈0.7 µs
//! against ≈9.6 µs a hit (shared/notes/perf-floor.md), and glibc's `free` starts with
//! `test rdi,rdi`, which is single-stepped. So for every entry point this module picks the
//! first instruction of the prologue that the kernel emulates, provided that moving the probe
//! there is invisible to the hook ([`AllocFn::entry_probe`], rules in [`Treatment`]).
//!
//! Return sites: every `ret` of the function is reported ([`AllocFn::returns`]) together with
//! the jumps that leave it without returning ([`AllocFn::exits`], [`AllocFn::tail_calls`]).
//! The kernel does **not** emulate `ret` (opcode `c3` takes the single-step path), so a
//! plain uprobe on a `ret` costs a single-step: measured here (6.18, tracefs uprobes on a
//! `push rbp; test rdi,rdi; lea; pop rbp; ret` function) an emulated `push` entry probe cost
//! 0.56 µs a call, a probe on `test` 9.7 µs, a probe on the `ret` 9.5 µs, and a uretprobe
//! (emulated entry trap plus return trampoline) 0.82 µs. Every `ret` site therefore carries
//! `emulated: false`, and a uretprobe is the cheaper way to see return values.

mod api;
mod code;
mod global;
pub mod kernel_rules;
mod placement;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSymbol};
use serde::Serialize;

use super::DiscoveryError;
use super::elf::Image;

use api::*;
use code::Ctx;
use global::decide_global;

pub use api::{AllocArgs, AllocFamily, AllocRole, GlobalAllocator, RetValue};
pub use kernel_rules::kernel_treatment;
pub use placement::{Emulation, MovedArg, ProbeSite, Treatment};

/// How control leaves a function other than by `ret`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// `jmp` to code outside the function (a tail call).
    Jump,
    /// `jcc` to code outside the function (a conditional tail call, or a split-off
    /// `.cold` part).
    CondJump,
    /// `jmp` through a register or memory: a tail call through the GOT, or possibly a jump
    /// table (counted as an exit, conservatively).
    Indirect,
}

/// A way out of a function that a probe on its `ret`s does not see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exit {
    pub offset: u64,
    pub kind: ExitKind,
    /// Link-time target address, when known and inside the same file.
    pub target: Option<u64>,
    /// Target name (an import's name for GOT/PLT jumps), when known.
    pub target_symbol: Option<String>,
}

/// How a Rust shim's own code hands the request over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardKind {
    /// A thunk: at most some argument shuffling, then one unconditional `jmp` (e.g.
    /// `jmp __rdl_alloc`, `jmp [mi_malloc_aligned@GOT]`).
    TailJump,
    /// The `#[global_allocator]`'s method is inlined into the shim: it branches (e.g. on the
    /// alignment) and jumps to one of several allocator functions (tikv-jemallocator:
    /// `_rjem_malloc` or `_rjem_mallocx`).
    Inlined,
    /// The shim calls (not tail-calls) other functions.
    Calls,
    /// No call or jump leaves the shim: the allocator is implemented inside it.
    SelfContained,
}

/// Where a Rust shim leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Forwarding {
    pub kind: ForwardKind,
    /// Names of the shim's direct call/jump targets, in code order (`0x…` when unnamed).
    pub targets: Vec<String>,
    /// Allocator entry points reached from the shim through at most three levels of
    /// calls/jumps, breadth first (e.g. `__rustc::__rdl_alloc`, `malloc`, `posix_memalign`).
    pub reaches: Vec<String>,
    /// The allocator this shim leads to.
    pub allocator: GlobalAllocator,
}

/// One allocator entry point and where to probe it.
#[derive(Debug, Clone, Serialize)]
pub struct AllocFn {
    pub role: AllocRole,
    pub family: AllocFamily,
    /// The name it was found by: the demangled path for Rust shims
    /// (`__rustc::__rust_alloc`), the exported name otherwise (`malloc`, `_rjem_sdallocx`).
    pub symbol: String,
    /// Other names at the same address (`__libc_malloc`; `aligned_alloc` for glibc's
    /// `memalign`). Entries sharing a `(file, vaddr)` are one function: attach once.
    pub aliases: Vec<String>,
    /// The file to attach to (the executable or a mapped library, as passed in).
    pub file: PathBuf,
    /// Link-time address of the function start.
    pub vaddr: u64,
    /// File offset of the function start.
    pub file_offset: u64,
    /// Function size from the symbol table (or up to the next symbol).
    pub size: u64,
    /// Where the entry uprobe goes: the first instruction the kernel emulates such that
    /// every instruction before it runs straight through (no branch, call or return), writes
    /// neither `rsp` nor `rbp` nor an essential argument register
    /// ([`AllocArgs::essential`]), and no direct branch anywhere in the file targets the
    /// skipped range or the site; otherwise offset 0. Because `rsp` is unchanged, the return
    /// address is still at `[rsp]` there, so the entry program (which stashes it and `rsp`
    /// for the stack walk at the return) and the uretprobe work as at entry.
    pub entry_probe: ProbeSite,
    /// The first instructions (up to and including the entry site), for diagnostics:
    /// `+0x3 je 0x98fb8 [emulated jcc]`.
    pub prologue: Vec<String>,
    /// Every `ret` in the function. Each is single-stepped by the kernel (see the module
    /// docs): a uretprobe costs less than probing them.
    pub returns: Vec<ProbeSite>,
    /// Some path leaves the function by a jump (see [`AllocFn::exits`]): probes on the
    /// `ret`s miss those returns, and a uretprobe is needed to see every return.
    pub tail_calls: bool,
    pub exits: Vec<Exit>,
    pub args: AllocArgs,
    /// Rust shims only: where the shim forwards to.
    pub forwarding: Option<Forwarding>,
}

/// Everything [`find_allocators`] learned.
#[derive(Debug, Clone, Serialize)]
pub struct AllocatorImage {
    pub exe: PathBuf,
    pub global: GlobalAllocator,
    /// One line per shim saying what decided [`AllocatorImage::global`].
    pub evidence: Vec<String>,
    /// The libc whose malloc family is reported, when one was among the mapped libraries.
    pub libc: Option<PathBuf>,
    /// All entry points: the Rust shims first (alloc, alloc_zeroed, realloc, dealloc), then
    /// the executable's own allocator functions, then the libraries', each by address.
    pub functions: Vec<AllocFn>,
    /// What could not be established, and what it means for the probes.
    pub warnings: Vec<String>,
}

impl AllocatorImage {
    /// The Rust shim of `role` (`Alloc`, `AllocZeroed`, `Realloc` or `Dealloc`).
    pub fn shim(&self, role: AllocRole) -> Option<&AllocFn> {
        self.functions
            .iter()
            .find(|f| f.family == AllocFamily::RustShim && f.role == role)
    }

    /// The entry point exported (or demangled) as `symbol`.
    pub fn by_symbol(&self, symbol: &str) -> Option<&AllocFn> {
        self.functions.iter().find(|f| f.symbol == symbol)
    }

    /// Entry points of one family.
    pub fn of_family(&self, family: AllocFamily) -> impl Iterator<Item = &AllocFn> {
        self.functions.iter().filter(move |f| f.family == family)
    }
}

/// How far the entry-probe search looks: instructions skipped at most.
pub(super) const MAX_SKIP: usize = 12;
/// Call levels followed from a shim to find the allocator it reaches.
pub(super) const MAX_FORWARD_DEPTH: usize = 3;

/// Finds the allocators of the process whose executable is `exe` and which maps
/// `mapped_libs` (from `targets::maps::mapped_libraries`; pass `&[]` to analyse the
/// executable alone).
///
/// Errors only when `exe` itself cannot be read or is not an x86-64 ELF file; everything
/// else that could not be established (missing shims, unreadable libraries, a malloc
/// interposer) is reported in [`AllocatorImage::warnings`].
pub fn find_allocators(
    exe: &Path,
    mapped_libs: &[PathBuf],
) -> Result<AllocatorImage, DiscoveryError> {
    let mut img = Image::load(exe)?;
    // The executable's scans are the ones that can be slow (a sweep of all its code for
    // branch targets); a library is only read for a few named functions.
    img.budget = super::Budget::new(super::ANALYSIS_BUDGET);
    let ctx = Ctx::new(&img, exe);
    let mut warnings = Vec::new();
    let mut evidence = Vec::new();
    let mut functions = Vec::new();

    // 1. Rust's global-allocator shims.
    let mut votes: Vec<GlobalAllocator> = Vec::new();
    for (last, role) in SHIMS {
        let found = ctx.rust_functions(last);
        let Some(&(start, ref name)) = found.first() else {
            warnings.push(format!(
                "no {last} shim in {}: Rust allocations through it cannot be probed (an LTO \
                 build may inline the shims into their callers; probe the allocator's own \
                 entry points instead)",
                exe.display()
            ));
            continue;
        };
        if found.len() > 1 {
            warnings.push(format!(
                "{} functions are named {last}; using the one at {start:#x}",
                found.len()
            ));
        }
        let Some(mut f) = ctx.describe(start, name.clone(), role, AllocFamily::RustShim) else {
            warnings.push(format!("{name} at {start:#x} is not backed by the file"));
            continue;
        };
        let fwd = ctx.forwarding(start);
        evidence.push(format!(
            "{name}: {} {} (reaches {})",
            match fwd.kind {
                ForwardKind::TailJump => "tail jmp to",
                ForwardKind::Inlined => "inlined allocator code, jumps to",
                ForwardKind::Calls => "calls",
                ForwardKind::SelfContained => "self-contained",
            },
            fwd.targets.join(", "),
            if fwd.reaches.is_empty() {
                "no known allocator".to_string()
            } else {
                fwd.reaches.join(", ")
            }
        ));
        votes.push(fwd.allocator);
        f.forwarding = Some(fwd);
        functions.push(f);
    }

    // 2. Allocators linked into the executable.
    let mut own = ctx.allocator_api(true);
    own.sort_by_key(|f| f.vaddr);
    functions.extend(own);

    // 3. The libraries the process maps.
    let mut libc = None;
    for lib in mapped_libs {
        let name = lib
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("ld-") {
            // The dynamic loader's private malloc serves only itself.
            continue;
        }
        let data = match super::read_bounded(lib) {
            Ok(d) => d,
            Err(DiscoveryError::Io { source, .. }) => {
                warnings.push(format!(
                    "cannot read mapped library {}: {source}",
                    lib.display()
                ));
                continue;
            }
            Err(e) => {
                warnings.push(format!("mapped library skipped: {e}"));
                continue;
            }
        };
        // By name, or by content for paths that do not say (`/proc/PID/map_files/…` of a
        // libc upgraded on disk since the process mapped it).
        let is_libc = is_libc_name(&name) || defines_any(&data, |n| n == "__libc_start_main");
        if is_libc && libc.is_some() {
            warnings.push(format!(
                "more than one libc is mapped; ignoring {}",
                lib.display()
            ));
            continue;
        }
        if !is_libc && !defines_any(&data, interesting_lib_symbol) {
            continue;
        }
        let lib_img = match Image::parse(lib, data) {
            Ok(i) => i,
            Err(e) => {
                warnings.push(format!("skipping mapped library: {e}"));
                continue;
            }
        };
        let lctx = Ctx::new(&lib_img, lib);
        let mut found = if is_libc {
            libc = Some(lib.clone());
            lctx.api(&LIBC_API, "", AllocFamily::Libc)
        } else {
            let found = lctx.allocator_api(false);
            if lctx.by_name.contains_key("malloc") {
                warnings.push(format!(
                    "{} defines malloc itself and may interpose on libc's malloc family \
                     (LD_PRELOAD or link order): probes on libc's functions would then miss \
                     allocations{}",
                    lib.display(),
                    if found.is_empty() {
                        "; this allocator is not recognised, so none of its functions are \
                         reported"
                    } else {
                        ""
                    }
                ));
            }
            found
        };
        if is_libc {
            for (sym, _) in LIBC_API {
                if !found.iter().any(|f| f.symbol == sym) {
                    warnings.push(format!("{} does not export {sym}", lib.display()));
                }
            }
        }
        found.sort_by_key(|f| f.vaddr);
        functions.extend(found);
    }
    if libc.is_none() && !mapped_libs.is_empty() {
        warnings.push(
            "no libc among the mapped libraries: the C malloc family is not reported".to_string(),
        );
    }

    // 4. The global allocator, from what the shims reach.
    let global = decide_global(&votes, exe, &functions, &mut warnings);
    super::check_budget(exe, &img)?;

    Ok(AllocatorImage {
        exe: exe.to_path_buf(),
        global,
        evidence,
        libc,
        functions,
        warnings,
    })
}

/// Cheap check over a library's dynamic symbols before loading it fully.
pub(super) fn defines_any(data: &[u8], wanted: impl Fn(&str) -> bool) -> bool {
    let Ok(file) = ElfFile64::<Endianness>::parse(data) else {
        return false;
    };
    file.dynamic_symbols()
        .any(|s| !s.is_undefined() && s.name().is_ok_and(&wanted))
}
