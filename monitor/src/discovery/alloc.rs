//! Heap allocator discovery: which allocator a Rust executable uses, and exactly where the
//! heap-mode uprobes go.
//!
//! [`find_allocators`] reads the executable (and the shared libraries the process maps, see
//! [`mapped_libraries`]) and returns one [`AllocFn`] per allocator entry point:
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

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};
use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSymbol, ObjectSymbolTable, RelocationTarget};
use serde::Serialize;

use super::disasm::decode_range;
use super::elf::Image;
use super::{ArgReg, DiscoveryError};
use monitor_common::heap::arg_location;

/// The allocator behind Rust's `#[global_allocator]`, as the shims' code shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalAllocator {
    /// `std::alloc::System`: the shims forward to `__rdl_*`, which call libc's malloc family
    /// (or, in a custom wrapper, the shims reach libc's malloc family directly).
    System,
    /// jemalloc (tikv-jemallocator): the shims reach `_rjem_*` (or unprefixed `mallocx`, …).
    Jemalloc,
    /// mimalloc: the shims reach `mi_*`.
    Mimalloc,
    /// None of the above was reached (a custom allocator, or no shims were found).
    Unknown,
}

/// Where an entry point lives, by allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocFamily {
    /// One of the four `__rust_*` global-allocator shims of the executable.
    RustShim,
    /// The C malloc API of libc (a mapped libc, or the executable itself when it links libc
    /// statically).
    Libc,
    /// jemalloc's API (`_rjem_*` as tikv-jemallocator links it, or unprefixed).
    Jemalloc,
    /// mimalloc's API (`mi_*`).
    Mimalloc,
}

/// What an entry point does; fixes its argument registers (see [`AllocArgs::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocRole {
    /// `__rust_alloc(size, align) -> ptr`.
    Alloc,
    /// `__rust_alloc_zeroed(size, align) -> ptr`.
    AllocZeroed,
    /// `__rust_realloc(ptr, old_size, align, new_size) -> ptr`.
    Realloc,
    /// `__rust_dealloc(ptr, size, align)`.
    Dealloc,
    /// `malloc(size) -> ptr` (also `_rjem_malloc`, `mi_malloc`).
    Malloc,
    /// `calloc(nmemb, size) -> ptr`.
    Calloc,
    /// C `realloc(ptr, size) -> ptr` (also `_rjem_realloc`, `mi_realloc`).
    CRealloc,
    /// `free(ptr)`.
    Free,
    /// `posix_memalign(void **memptr, align, size) -> int`: the pointer is stored through
    /// `memptr`, the return value is 0 on success.
    PosixMemalign,
    /// `aligned_alloc(align, size) -> ptr`.
    AlignedAlloc,
    /// `memalign(align, size) -> ptr`.
    Memalign,
    /// `valloc(size) -> ptr`.
    Valloc,
    /// `pvalloc(size) -> ptr`.
    Pvalloc,
    /// jemalloc `mallocx(size, flags) -> ptr` (`MALLOCX_*` flags: alignment, zeroing, …).
    Mallocx,
    /// jemalloc `rallocx(ptr, size, flags) -> ptr`.
    Rallocx,
    /// jemalloc `xallocx(ptr, size, extra, flags) -> usable size` (resize in place only).
    Xallocx,
    /// jemalloc `sdallocx(ptr, size, flags)`.
    Sdallocx,
    /// jemalloc `dallocx(ptr, flags)`.
    Dallocx,
    /// mimalloc `mi_zalloc(size) -> ptr`.
    Zalloc,
    /// mimalloc `mi_malloc_aligned(size, align) -> ptr`.
    MallocAligned,
    /// mimalloc `mi_zalloc_aligned(size, align) -> ptr`.
    ZallocAligned,
    /// mimalloc `mi_realloc_aligned(ptr, size, align) -> ptr`.
    ReallocAligned,
    /// mimalloc `mi_free_size(ptr, size)` / `mi_free_size_aligned(ptr, size, align)`.
    FreeSized,
}

impl AllocRole {
    /// The entry point releases a block (and allocates none).
    pub fn frees(self) -> bool {
        matches!(
            self,
            AllocRole::Dealloc
                | AllocRole::Free
                | AllocRole::Sdallocx
                | AllocRole::Dallocx
                | AllocRole::FreeSized
        )
    }

    /// The entry point may move a block (old pointer in, new pointer out).
    pub fn resizes(self) -> bool {
        matches!(
            self,
            AllocRole::Realloc
                | AllocRole::CRealloc
                | AllocRole::Rallocx
                | AllocRole::Xallocx
                | AllocRole::ReallocAligned
        )
    }
}

/// What comes back in `rax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetValue {
    /// The new block's address (null on failure).
    Ptr,
    /// An `int` status (0 = success); the block's address was stored through
    /// [`AllocArgs::out_ptr`].
    Status,
    /// The block's usable size after the call (`xallocx`).
    UsableSize,
    /// Nothing of interest.
    #[default]
    Nothing,
}

/// Which System V argument register carries what, on entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AllocArgs {
    /// The block being freed or resized.
    pub ptr: Option<ArgReg>,
    /// Bytes requested (allocation), or the size of the block being freed (sized frees:
    /// `__rust_dealloc`, `sdallocx`, `mi_free_size`).
    pub size: Option<ArgReg>,
    /// `calloc`'s element count (bytes = count × size).
    pub count: Option<ArgReg>,
    pub align: Option<ArgReg>,
    /// `__rust_realloc`'s old size.
    pub old_size: Option<ArgReg>,
    /// The requested size of a resize.
    pub new_size: Option<ArgReg>,
    /// jemalloc `MALLOCX_*` flags (they can encode alignment and zeroing).
    pub flags: Option<ArgReg>,
    /// `posix_memalign`'s `void **memptr`.
    pub out_ptr: Option<ArgReg>,
    pub ret: RetValue,
}

impl AllocArgs {
    /// The System V register assignment of `role`'s C/Rust signature.
    pub fn of(role: AllocRole) -> AllocArgs {
        use AllocRole::*;
        use ArgReg::*;
        let none = AllocArgs::default();
        match role {
            Alloc | AllocZeroed | MallocAligned | ZallocAligned => AllocArgs {
                size: Some(Rdi),
                align: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Realloc => AllocArgs {
                ptr: Some(Rdi),
                old_size: Some(Rsi),
                align: Some(Rdx),
                new_size: Some(Rcx),
                ret: RetValue::Ptr,
                ..none
            },
            Dealloc => AllocArgs {
                ptr: Some(Rdi),
                size: Some(Rsi),
                align: Some(Rdx),
                ..none
            },
            Malloc | Valloc | Pvalloc | Zalloc => AllocArgs {
                size: Some(Rdi),
                ret: RetValue::Ptr,
                ..none
            },
            Calloc => AllocArgs {
                count: Some(Rdi),
                size: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            CRealloc => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Free | Dallocx => AllocArgs {
                ptr: Some(Rdi),
                flags: (role == Dallocx).then_some(Rsi),
                ..none
            },
            PosixMemalign => AllocArgs {
                out_ptr: Some(Rdi),
                align: Some(Rsi),
                size: Some(Rdx),
                ret: RetValue::Status,
                ..none
            },
            AlignedAlloc | Memalign => AllocArgs {
                align: Some(Rdi),
                size: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Mallocx => AllocArgs {
                size: Some(Rdi),
                flags: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Rallocx => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                flags: Some(Rdx),
                ret: RetValue::Ptr,
                ..none
            },
            // xallocx(ptr, size, extra, flags): `extra` (rdx) is not modelled.
            Xallocx => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                flags: Some(Rcx),
                ret: RetValue::UsableSize,
                ..none
            },
            Sdallocx => AllocArgs {
                ptr: Some(Rdi),
                size: Some(Rsi),
                flags: Some(Rdx),
                ..none
            },
            ReallocAligned => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                align: Some(Rdx),
                ret: RetValue::Ptr,
                ..none
            },
            FreeSized => AllocArgs {
                ptr: Some(Rdi),
                size: Some(Rsi),
                ..none
            },
        }
    }

    /// Every argument register named above, in argument order.
    pub fn registers(&self) -> Vec<ArgReg> {
        let mut regs: Vec<ArgReg> = [
            self.ptr,
            self.size,
            self.count,
            self.align,
            self.old_size,
            self.new_size,
            self.flags,
            self.out_ptr,
        ]
        .into_iter()
        .flatten()
        .collect();
        regs.sort_by_key(|r| r.position());
        regs.dedup();
        regs
    }

    /// The registers a leak-tracking hook cannot do without, which the entry probe must
    /// therefore see unchanged: the block pointer of frees and resizes, the size (and count,
    /// and `memptr`) of allocations and the new size of resizes. Alignment, flags, the old
    /// size of a resize and the size passed to a sized free are extras the tracker knows or
    /// does not need; [`ProbeSite::intact_args`] says whether they are still readable.
    pub fn essential(&self, role: AllocRole) -> Vec<ArgReg> {
        let mut regs = Vec::new();
        if role.frees() {
            regs.extend(self.ptr);
        } else if role.resizes() {
            regs.extend(self.ptr);
            regs.extend(self.new_size);
        } else {
            regs.extend(self.size);
            regs.extend(self.count);
            regs.extend(self.out_ptr);
        }
        regs
    }
}

/// How the kernel (Linux 6.18, x86-64) handles the instruction a uprobe replaces.
///
/// Source: `arch/x86/kernel/uprobes.c`, `arch_uprobe_analyze_insn()`:
/// 1. `uprobe_init_insn()` **rejects** the probe (`-ENOTSUPP`, the attach fails) for an
///    instruction with an `es`/`cs`/`ss`/`ds` segment or `lock` prefix (`is_prefix_bad()`:
///    `26 2e 36 3e f0`), an exception-masking `mov ss`/`pop ss`, or an opcode byte missing
///    from `good_insns_64` ([`GOOD_INSNS_64`]).
/// 2. `branch_setup_xol_ops()` **emulates** (no single-step, `branch_emulate_op()`):
///    - the kernel's own nop of that length (`x86_nops[len]`, `arch/x86/include/asm/nops.h`:
///      `90`, `66 90`, `0f 1f 00`, `0f 1f 40 00`, `0f 1f 44 00 00`, `66 0f 1f 44 00 00`,
///      `0f 1f 80 00000000`, `0f 1f 84 00 00000000`; the 9–11 byte ones carry a `cs`
///      prefix and are rejected by step 1);
///    - any instruction whose opcode byte is `90` (`prefix* + nop`, e.g. `f3 90` pause);
///    - `jmp rel8/rel32` (`eb`, `e9`), `call rel32` (`e8`), `jcc rel8` (`70`–`7f`) and
///      `jcc rel32` (`0f 80`–`0f 8f`) — but any of these with a `66` prefix is rejected.
/// 3. `push_setup_xol_ops()` **emulates** `push r64` (`push_emulate_op()`): `50`–`57`
///    without any prefix, or `41 50`–`41 57` (`push r8`–`r15`); other encodings are not.
/// 4. Everything else is copied to the XOL slot and **single-stepped**
///    (`default_xol_ops`), including `ret` (`c3`, `fix_ip_or_call = 0`), `endbr64`, `mov`,
///    `test`, `sub rsp`, indirect `jmp`/`call` through memory.
///
/// (6.18 also "optimizes" uprobes on 5-byte nops into a `call` to a trampoline —
/// `can_optimize()` — which only matters for USDT sites, and an RFC from Nov 2025 adds
/// emulation of `mov reg,reg` — not in 6.18, so not assumed here.) The running kernel's
/// `/proc/kallsyms` has `push_emulate_op`/`branch_emulate_op` and no `mov_emulate_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// Emulated in the trap handler: the cheap case.
    Emulated(Emulation),
    /// Single-stepped out of line: about 10× the cost of an emulated hit.
    SingleStep,
    /// The kernel refuses a uprobe here.
    Rejected,
    /// `41 90` (`xchg r8, rax`): opcode byte `90`, so the kernel would "emulate" it as a nop
    /// and silently skip the exchange. Never probe it.
    Unsafe,
}

/// The kind of instruction the kernel emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Emulation {
    Nop,
    Jmp,
    Jcc,
    Call,
    Push,
}

impl Treatment {
    pub fn is_emulated(self) -> bool {
        matches!(self, Treatment::Emulated(_))
    }
}

/// A uprobe attach point inside a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeSite {
    /// Bytes from the function start.
    pub offset: u64,
    /// Link-time address.
    pub vaddr: u64,
    /// Offset in the file, for `UProbe::attach`.
    pub file_offset: u64,
    /// The kernel emulates the instruction here (no single-step).
    pub emulated: bool,
    pub treatment: Treatment,
    /// The instruction at the site, e.g. `je 0x98fb8`.
    pub insn: String,
    /// Entry sites: the arguments of [`AllocFn::args`] whose entry values are still
    /// readable here, in their own register or, see `moved_args`, in another one. Always
    /// the full set at offset 0; empty for return sites.
    pub intact_args: Vec<ArgReg>,
    /// Entry sites: arguments the skipped instructions copied to another register before
    /// reusing their own (mimalloc's `mi_free` keeps the pointer in rsi), and where they are.
    pub moved_args: Vec<MovedArg>,
}

/// An argument found in another register at an entry site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MovedArg {
    pub arg: ArgReg,
    /// Where it is, e.g. `rsi`.
    pub register: &'static str,
    /// The location code the BPF program reads ([`arg_location`]).
    #[serde(skip)]
    pub code: u8,
}

impl ProbeSite {
    /// The attach cookie that tells the entry program where each argument is: 0 when none
    /// moved.
    pub fn arg_cookie(&self) -> u64 {
        self.moved_args.iter().fold(0, |cookie, moved| {
            arg_location::with(cookie, moved.arg.position(), moved.code)
        })
    }
}

/// The location code of a 64-bit general-purpose register, `None` for `rsp` and `rbp` (the
/// entry site never skips a write to them) and anything else.
fn location_code(register: Register) -> Option<u8> {
    Some(match register {
        Register::RDI => arg_location::RDI,
        Register::RSI => arg_location::RSI,
        Register::RDX => arg_location::RDX,
        Register::RCX => arg_location::RCX,
        Register::R8 => arg_location::R8,
        Register::R9 => arg_location::R9,
        Register::RAX => arg_location::RAX,
        Register::RBX => arg_location::RBX,
        Register::R10 => arg_location::R10,
        Register::R11 => arg_location::R11,
        Register::R12 => arg_location::R12,
        Register::R13 => arg_location::R13,
        Register::R14 => arg_location::R14,
        Register::R15 => arg_location::R15,
        _ => return None,
    })
}

/// The location code of an argument's own register (the codes of rdi..r9 follow argument
/// order).
fn own_code(arg: ArgReg) -> u8 {
    arg_location::RDI + arg.position() as u8
}

const _: () = assert!(arg_location::R9 == arg_location::RDI + 5);

/// Which argument's entry value each register holds, by location code.
type Holders = [Option<ArgReg>; arg_location::NAMES.len()];

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
    /// address is still at `[rsp]` there, so stack capture and uretprobes work as at entry.
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

/// The four shims, by the last segment of their demangled name.
const SHIMS: [(&str, AllocRole); 4] = [
    ("__rust_alloc", AllocRole::Alloc),
    ("__rust_alloc_zeroed", AllocRole::AllocZeroed),
    ("__rust_realloc", AllocRole::Realloc),
    ("__rust_dealloc", AllocRole::Dealloc),
];

/// The C malloc family (glibc, musl).
const LIBC_API: [(&str, AllocRole); 9] = [
    ("malloc", AllocRole::Malloc),
    ("calloc", AllocRole::Calloc),
    ("realloc", AllocRole::CRealloc),
    ("free", AllocRole::Free),
    ("posix_memalign", AllocRole::PosixMemalign),
    ("aligned_alloc", AllocRole::AlignedAlloc),
    ("memalign", AllocRole::Memalign),
    ("valloc", AllocRole::Valloc),
    ("pvalloc", AllocRole::Pvalloc),
];

/// jemalloc's public API beyond the C malloc family it also exports, without its prefix
/// (tikv-jemalloc-sys links it as `_rjem_<name>`).
const JEMALLOC_EXTRA_API: [(&str, AllocRole); 5] = [
    ("mallocx", AllocRole::Mallocx),
    ("rallocx", AllocRole::Rallocx),
    ("xallocx", AllocRole::Xallocx),
    ("sdallocx", AllocRole::Sdallocx),
    ("dallocx", AllocRole::Dallocx),
];

/// Names only jemalloc defines (so an unprefixed jemalloc is recognised by them).
const JEMALLOC_ONLY: [&str; 6] = [
    "mallocx", "rallocx", "xallocx", "sdallocx", "dallocx", "nallocx",
];

/// The prefix tikv-jemalloc-sys gives jemalloc's symbols on Linux.
const JEMALLOC_PREFIX: &str = "_rjem_";

/// mimalloc's API (the mimalloc crate's `GlobalAlloc` uses `mi_malloc_aligned`,
/// `mi_zalloc_aligned`, `mi_realloc_aligned` and `mi_free`).
const MIMALLOC_API: [(&str, AllocRole); 15] = [
    ("mi_malloc", AllocRole::Malloc),
    ("mi_zalloc", AllocRole::Zalloc),
    ("mi_calloc", AllocRole::Calloc),
    ("mi_realloc", AllocRole::CRealloc),
    ("mi_free", AllocRole::Free),
    ("mi_malloc_aligned", AllocRole::MallocAligned),
    ("mi_zalloc_aligned", AllocRole::ZallocAligned),
    ("mi_realloc_aligned", AllocRole::ReallocAligned),
    ("mi_posix_memalign", AllocRole::PosixMemalign),
    ("mi_aligned_alloc", AllocRole::AlignedAlloc),
    ("mi_memalign", AllocRole::Memalign),
    ("mi_valloc", AllocRole::Valloc),
    ("mi_free_size", AllocRole::FreeSized),
    ("mi_free_size_aligned", AllocRole::FreeSized),
    ("mi_free_aligned", AllocRole::Free),
];

/// How far the entry-probe search looks: instructions skipped at most.
const MAX_SKIP: usize = 12;
/// Call levels followed from a shim to find the allocator it reaches.
const MAX_FORWARD_DEPTH: usize = 3;

/// Finds the allocators of the process whose executable is `exe` and which maps
/// `mapped_libs` (from [`mapped_libraries`]; pass `&[]` to analyse the executable alone).
///
/// Errors only when `exe` itself cannot be read or is not an x86-64 ELF file; everything
/// else that could not be established (missing shims, unreadable libraries, a malloc
/// interposer) is reported in [`AllocatorImage::warnings`].
pub fn find_allocators(
    exe: &Path,
    mapped_libs: &[PathBuf],
) -> Result<AllocatorImage, DiscoveryError> {
    let img = Image::load(exe)?;
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
        let data = match std::fs::read(lib) {
            Ok(d) => d,
            Err(e) => {
                warnings.push(format!("cannot read mapped library {}: {e}", lib.display()));
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

    Ok(AllocatorImage {
        exe: exe.to_path_buf(),
        global,
        evidence,
        libc,
        functions,
        warnings,
    })
}

/// Combines the shims' verdicts; falls back to what the executable links when no shim
/// could be read.
fn decide_global(
    votes: &[GlobalAllocator],
    exe: &Path,
    functions: &[AllocFn],
    warnings: &mut Vec<String>,
) -> GlobalAllocator {
    let known: Vec<GlobalAllocator> = votes
        .iter()
        .copied()
        .filter(|&v| v != GlobalAllocator::Unknown)
        .collect();
    if let Some(&first) = known.first() {
        if known.iter().all(|&v| v == first) {
            if known.len() < votes.len() {
                warnings.push(format!(
                    "{} of {} shims reach no known allocator; the others reach {first:?}",
                    votes.len() - known.len(),
                    votes.len()
                ));
            }
            return first;
        }
        let mut counts: Vec<(GlobalAllocator, usize)> = Vec::new();
        for v in &known {
            match counts.iter_mut().find(|(a, _)| a == v) {
                Some((_, n)) => *n += 1,
                None => counts.push((*v, 1)),
            }
        }
        counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        warnings.push(format!(
            "the shims disagree about the global allocator ({counts:?}); reporting the most \
             common"
        ));
        return counts[0].0;
    }
    if !votes.is_empty() {
        warnings.push(
            "the Rust shims reach no known allocator (a custom #[global_allocator]?): only \
             the shims themselves can be probed"
                .to_string(),
        );
        return GlobalAllocator::Unknown;
    }
    // No shims at all: say what is linked, but only as a guess.
    let linked = |fam| functions.iter().any(|f| f.family == fam && f.file == exe);
    let guess = if linked(AllocFamily::Jemalloc) {
        GlobalAllocator::Jemalloc
    } else if linked(AllocFamily::Mimalloc) {
        GlobalAllocator::Mimalloc
    } else {
        GlobalAllocator::Unknown
    };
    if guess != GlobalAllocator::Unknown {
        warnings.push(format!(
            "no Rust allocator shims found; {guess:?} is linked into the executable and \
             probably serves Rust's allocations (not verified from code)"
        ));
    }
    guess
}

fn is_libc_name(name: &str) -> bool {
    name.starts_with("libc.so")
        || (name.starts_with("libc-") && name.ends_with(".so"))
        || name.starts_with("libc.musl")
        || name.starts_with("ld-musl")
}

/// Symbols that make a non-libc library worth a full look.
fn interesting_lib_symbol(name: &str) -> bool {
    name == "malloc"
        || name == "free"
        || name.starts_with(JEMALLOC_PREFIX)
        || JEMALLOC_ONLY.contains(&name)
        || MIMALLOC_API.iter().any(|(n, _)| *n == name)
}

/// Cheap check over a library's dynamic symbols before loading it fully.
fn defines_any(data: &[u8], wanted: impl Fn(&str) -> bool) -> bool {
    let Ok(file) = ElfFile64::<Endianness>::parse(data) else {
        return false;
    };
    file.dynamic_symbols()
        .any(|s| !s.is_undefined() && s.name().is_ok_and(&wanted))
}

/// Where a call or jump goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Dest {
    /// Code in the same file.
    Local(u64),
    /// An imported symbol, through a GOT slot or PLT stub.
    Import(String),
}

/// One file being analysed.
struct Ctx<'a> {
    img: &'a Image,
    path: &'a Path,
    /// GOT slot → name of the undefined symbol the dynamic loader writes there.
    imports: HashMap<u64, String>,
    /// `.plt`, `.plt.sec`, `.plt.got` ranges.
    plt: Vec<(u64, u64)>,
    /// Every function name → its address (first definition wins).
    by_name: HashMap<&'a str, u64>,
    /// Every direct branch/call target in the file's code, sorted (computed on first use).
    targets: OnceCell<Vec<u64>>,
}

impl<'a> Ctx<'a> {
    fn new(img: &'a Image, path: &'a Path) -> Self {
        let mut by_name = HashMap::new();
        for (&addr, info) in &img.functions {
            for n in &info.names {
                by_name.entry(n.as_str()).or_insert(addr);
            }
        }
        let plt = img
            .sections
            .iter()
            .filter(|s| s.executable && s.name.starts_with(".plt"))
            .map(|s| (s.vaddr, s.vaddr + s.size))
            .collect();
        Ctx {
            img,
            path,
            imports: imports(&img.data),
            plt,
            by_name,
            targets: OnceCell::new(),
        }
    }

    /// Functions whose demangled name's last path segment is `last`.
    fn rust_functions(&self, last: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (&addr, info) in &self.img.functions {
            if let Some(n) = info.names.iter().find(|n| last_segment(n) == last) {
                out.push((addr, n.clone()));
            }
        }
        out
    }

    /// jemalloc, mimalloc and (in an executable) a statically linked libc.
    fn allocator_api(&self, is_exe: bool) -> Vec<AllocFn> {
        let jemalloc = |prefix| {
            let mut fns = self.api(&LIBC_API, prefix, AllocFamily::Jemalloc);
            fns.extend(self.api(&JEMALLOC_EXTRA_API, prefix, AllocFamily::Jemalloc));
            fns
        };
        let mut out = jemalloc(JEMALLOC_PREFIX);
        let unprefixed_jemalloc = self.by_name.contains_key("mallocx");
        if unprefixed_jemalloc {
            out.extend(jemalloc(""));
        }
        out.extend(self.api(&MIMALLOC_API, "", AllocFamily::Mimalloc));
        if is_exe && !unprefixed_jemalloc && self.by_name.contains_key("malloc") {
            let family = if self.by_name.contains_key("mi_malloc") {
                // mimalloc built with `override`.
                AllocFamily::Mimalloc
            } else {
                AllocFamily::Libc
            };
            out.extend(self.api(&LIBC_API, "", family));
        }
        out
    }

    /// The entries of `table` defined in this file as `<prefix><name>`.
    fn api(&self, table: &[(&str, AllocRole)], prefix: &str, family: AllocFamily) -> Vec<AllocFn> {
        table
            .iter()
            .filter_map(|&(name, role)| {
                let symbol = format!("{prefix}{name}");
                let &addr = self.by_name.get(symbol.as_str())?;
                self.describe(addr, symbol, role, family)
            })
            .collect()
    }

    /// Everything about the function at `start`.
    fn describe(
        &self,
        start: u64,
        symbol: String,
        role: AllocRole,
        family: AllocFamily,
    ) -> Option<AllocFn> {
        let (s, e) = self.img.function_extent(start)?;
        let file_offset = self.img.file_offset(start)?;
        let instrs = decode_range(self.img, s, e);
        if instrs.is_empty() {
            return None;
        }
        let args = AllocArgs::of(role);
        let (entry_probe, prologue) =
            self.entry_site(&instrs, s, &args.essential(role), &args.registers());
        let mut returns = Vec::new();
        let mut exits = Vec::new();
        for ins in &instrs {
            if ins.mnemonic() == Mnemonic::Ret {
                returns.push(self.site(s, ins, Vec::new()));
                continue;
            }
            let kind = match ins.flow_control() {
                FlowControl::UnconditionalBranch => ExitKind::Jump,
                FlowControl::ConditionalBranch => ExitKind::CondJump,
                FlowControl::IndirectBranch => ExitKind::Indirect,
                _ => continue,
            };
            let near = near_target(ins);
            if near.is_some_and(|t| t >= s && t < e) {
                continue;
            }
            let dest = self.dest(ins);
            exits.push(Exit {
                offset: ins.ip() - s,
                kind,
                target: match &dest {
                    Some(Dest::Local(a)) => Some(*a),
                    _ => near,
                },
                target_symbol: dest.as_ref().map(|d| self.dest_name(d)),
            });
        }
        let aliases = self
            .img
            .names_at(start)
            .iter()
            .filter(|n| **n != symbol)
            .cloned()
            .collect();
        Some(AllocFn {
            role,
            family,
            symbol,
            aliases,
            file: self.path.to_path_buf(),
            vaddr: start,
            file_offset,
            size: e - s,
            entry_probe,
            prologue,
            returns,
            tail_calls: !exits.is_empty(),
            exits,
            args,
            forwarding: None,
        })
    }

    /// Picks the entry probe site (see [`AllocFn::entry_probe`]).
    fn entry_site(
        &self,
        instrs: &[Instruction],
        start: u64,
        essential: &[ArgReg],
        args: &[ArgReg],
    ) -> (ProbeSite, Vec<String>) {
        // Branches of the function itself are decoded in sync with its start; the file-wide
        // scan adds jumps from elsewhere (e.g. a `.cold` part jumping back).
        let own_targets: Vec<u64> = instrs.iter().filter_map(near_target).collect();
        let all_targets = self.branch_targets();
        let targeted = |lo: u64, hi: u64| {
            own_targets.iter().any(|&t| t >= lo && t <= hi) || {
                let i = all_targets.partition_point(|&t| t < lo);
                all_targets.get(i).is_some_and(|&t| t <= hi)
            }
        };

        // Which argument's entry value each register holds (by location code), followed
        // through the skipped instructions: a write loses a value, a 64-bit register copy
        // (`mov r64, r64`) duplicates it. The site may move on while every essential
        // argument is still held somewhere.
        let mut held: Holders = [None; arg_location::NAMES.len()];
        for &arg in args {
            held[own_code(arg) as usize] = Some(arg);
        }
        let entry_held = held;
        let holds = |held: &Holders, arg: ArgReg| held.contains(&Some(arg));
        let mut info = InstructionInfoFactory::new();
        let mut chosen = None;
        for (i, ins) in instrs.iter().enumerate().take(MAX_SKIP + 1) {
            if i > 0 && targeted(start + 1, ins.ip()) {
                break;
            }
            if self.treatment(ins).is_emulated() {
                chosen = Some(i);
                break;
            }
            let Some(written) = skip_writes(ins, &mut info) else {
                break;
            };
            let mut next = held;
            for code in written {
                next[code as usize] = None;
            }
            if let Some((to, from)) = register_copy(ins) {
                next[to as usize] = held[from as usize];
            }
            if !essential.iter().all(|&arg| holds(&next, arg)) {
                break;
            }
            held = next;
        }
        let (index, held) = match chosen {
            Some(i) => (i, held),
            None => (0, entry_held),
        };
        let intact = args.iter().copied().filter(|&a| holds(&held, a)).collect();
        let moved = args
            .iter()
            .copied()
            .filter(|&arg| held[own_code(arg) as usize] != Some(arg))
            .filter_map(|arg| {
                let code = held.iter().position(|h| *h == Some(arg))? as u8;
                Some(MovedArg {
                    arg,
                    register: arg_location::NAMES[code as usize],
                    code,
                })
            })
            .collect();
        let shown = (index + 1).max(4).min(instrs.len());
        let prologue = instrs[..shown]
            .iter()
            .map(|ins| {
                let t = self.treatment(ins);
                format!(
                    "+{:#x} {} [{}]",
                    ins.ip() - start,
                    format_insn(ins),
                    match t {
                        Treatment::Emulated(e) => format!("emulated {e:?}").to_lowercase(),
                        Treatment::SingleStep => "single-step".to_string(),
                        Treatment::Rejected => "rejected".to_string(),
                        Treatment::Unsafe => "unsafe".to_string(),
                    }
                )
            })
            .collect();
        let mut site = self.site(start, &instrs[index], intact);
        site.moved_args = moved;
        (site, prologue)
    }

    fn treatment(&self, ins: &Instruction) -> Treatment {
        self.img
            .bytes_at(ins.ip(), ins.len() as u64)
            .map_or(Treatment::SingleStep, kernel_treatment)
    }

    fn site(&self, start: u64, ins: &Instruction, intact_args: Vec<ArgReg>) -> ProbeSite {
        let treatment = self.treatment(ins);
        ProbeSite {
            offset: ins.ip() - start,
            vaddr: ins.ip(),
            file_offset: self.img.file_offset(ins.ip()).unwrap_or_default(),
            emulated: treatment.is_emulated(),
            treatment,
            insn: format_insn(ins),
            intact_args,
            moved_args: Vec::new(),
        }
    }

    /// All direct branch and call targets in the file's code (linear sweep; a
    /// desynchronised sweep only adds targets, which only makes the entry-site choice more
    /// conservative).
    fn branch_targets(&self) -> &[u64] {
        self.targets.get_or_init(|| {
            let mut out = Vec::new();
            for (s, e) in self.img.code_ranges() {
                let Some(bytes) = self.img.bytes_at(s, e - s) else {
                    continue;
                };
                let mut decoder = Decoder::with_ip(64, bytes, s, DecoderOptions::NONE);
                let mut ins = Instruction::default();
                while decoder.can_decode() {
                    decoder.decode_out(&mut ins);
                    if let Some(t) = near_target(&ins) {
                        out.push(t);
                    }
                }
            }
            out.sort_unstable();
            out.dedup();
            out
        })
    }

    /// Where a call/jump goes, when statically known.
    fn dest(&self, ins: &Instruction) -> Option<Dest> {
        if let Some(t) = near_target(ins) {
            if self.plt.iter().any(|&(s, e)| t >= s && t < e) {
                return self.plt_stub(t).or(Some(Dest::Local(t)));
            }
            return Some(Dest::Local(t));
        }
        if matches!(
            ins.flow_control(),
            FlowControl::IndirectBranch | FlowControl::IndirectCall
        ) && ins.op0_kind() == OpKind::Memory
            && ins.is_ip_rel_memory_operand()
        {
            return self.slot(ins.ip_rel_memory_address());
        }
        None
    }

    /// What a GOT slot holds at run time.
    fn slot(&self, slot: u64) -> Option<Dest> {
        if let Some(&v) = self.img.relocs.get(&slot)
            && self.img.is_code(v)
        {
            return Some(Dest::Local(v));
        }
        self.imports.get(&slot).cloned().map(Dest::Import)
    }

    /// The GOT slot a PLT stub jumps through (`[endbr64;] [bnd] jmp [rip+slot]`).
    fn plt_stub(&self, at: u64) -> Option<Dest> {
        let code = decode_range(self.img, at, at + 16);
        code.iter()
            .take(3)
            .find(|i| {
                i.flow_control() == FlowControl::IndirectBranch
                    && i.op0_kind() == OpKind::Memory
                    && i.is_ip_rel_memory_operand()
            })
            .and_then(|i| self.slot(i.ip_rel_memory_address()))
    }

    fn dest_name(&self, d: &Dest) -> String {
        match d {
            Dest::Import(n) => n.clone(),
            Dest::Local(a) => {
                let names = self.img.names_at(*a);
                names
                    .iter()
                    .find(|n| self.classify(n, true).is_some())
                    .or_else(|| names.first())
                    .cloned()
                    .unwrap_or_else(|| format!("{a:#x}"))
            }
        }
    }

    /// The allocator a function name belongs to (`local`: defined in this file).
    fn classify(&self, name: &str, local: bool) -> Option<GlobalAllocator> {
        let last = last_segment(name);
        if last.starts_with("__rdl_") {
            return Some(GlobalAllocator::System);
        }
        if last.starts_with(JEMALLOC_PREFIX) || JEMALLOC_ONLY.contains(&last) {
            return Some(GlobalAllocator::Jemalloc);
        }
        if MIMALLOC_API.iter().any(|(n, _)| *n == last)
            || last.starts_with("mi_heap_")
            || last.starts_with("_mi_")
        {
            return Some(GlobalAllocator::Mimalloc);
        }
        if LIBC_API.iter().any(|(n, _)| *n == last) {
            if local && self.by_name.contains_key("mallocx") {
                return Some(GlobalAllocator::Jemalloc);
            }
            if local && self.by_name.contains_key("mi_malloc") {
                return Some(GlobalAllocator::Mimalloc);
            }
            return Some(GlobalAllocator::System);
        }
        None
    }

    fn classify_dest(&self, d: &Dest) -> Option<GlobalAllocator> {
        match d {
            Dest::Import(n) => self.classify(n, false),
            Dest::Local(a) => self
                .img
                .names_at(*a)
                .iter()
                .find_map(|n| self.classify(n, true)),
        }
    }

    /// Out-of-function call and jump destinations of the function at `start`, in code
    /// order, with whether the function branches internally and how many calls it makes.
    fn dests_of(&self, start: u64) -> (Vec<Dest>, bool, usize) {
        let Some((s, e)) = self.img.function_extent(start) else {
            return (Vec::new(), false, 0);
        };
        let mut dests = Vec::new();
        let mut branches = false;
        let mut calls = 0;
        for ins in decode_range(self.img, s, e) {
            let flow = ins.flow_control();
            if matches!(flow, FlowControl::Call | FlowControl::IndirectCall) {
                calls += 1;
            }
            if near_target(&ins).is_some_and(|t| t >= s && t < e) {
                branches |= flow == FlowControl::ConditionalBranch;
                continue;
            }
            if flow == FlowControl::ConditionalBranch {
                branches = true;
            }
            if let Some(d) = self.dest(&ins)
                && !dests.contains(&d)
            {
                dests.push(d);
            }
        }
        (dests, branches, calls)
    }

    /// How the shim at `start` forwards, and to which allocator.
    fn forwarding(&self, start: u64) -> Forwarding {
        let (dests, branches, calls) = self.dests_of(start);
        let kind = if dests.is_empty() {
            ForwardKind::SelfContained
        } else if calls > 0 {
            ForwardKind::Calls
        } else if dests.len() == 1 && !branches {
            ForwardKind::TailJump
        } else {
            ForwardKind::Inlined
        };
        // An alias: the shim's address also carries the implementation's name.
        let own = self
            .img
            .names_at(start)
            .iter()
            .find_map(|n| self.classify(n, true));

        let mut reaches = Vec::new();
        let mut verdicts: Vec<GlobalAllocator> = own.into_iter().collect();
        let mut seen: HashSet<Dest> = HashSet::new();
        seen.insert(Dest::Local(start));
        let mut queue: VecDeque<(Dest, usize)> = dests.iter().map(|d| (d.clone(), 1)).collect();
        while let Some((d, depth)) = queue.pop_front() {
            if !seen.insert(d.clone()) || seen.len() > 64 {
                continue;
            }
            let class = self.classify_dest(&d);
            if let Some(c) = class {
                reaches.push(self.dest_name(&d));
                verdicts.push(c);
            }
            // Follow `__rdl_*` and unnamed glue, not the allocators themselves.
            let descend = match (&d, class) {
                (Dest::Import(_), _) => false,
                (Dest::Local(a), Some(GlobalAllocator::System)) => self
                    .img
                    .names_at(*a)
                    .iter()
                    .any(|n| last_segment(n).starts_with("__rdl_")),
                (_, Some(_)) => false,
                (_, None) => true,
            };
            if descend
                && depth < MAX_FORWARD_DEPTH
                && let Dest::Local(a) = d
            {
                for next in self.dests_of(a).0 {
                    queue.push_back((next, depth + 1));
                }
            }
        }
        let allocator = [
            GlobalAllocator::Jemalloc,
            GlobalAllocator::Mimalloc,
            GlobalAllocator::System,
        ]
        .into_iter()
        .find(|a| verdicts.contains(a))
        .unwrap_or(GlobalAllocator::Unknown);
        Forwarding {
            kind,
            targets: dests.iter().map(|d| self.dest_name(d)).collect(),
            reaches,
            allocator,
        }
    }
}

/// GOT slot → undefined dynamic symbol bound there (`R_X86_64_GLOB_DAT`, `JUMP_SLOT`, `64`).
fn imports(data: &[u8]) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let Ok(file) = ElfFile64::<Endianness>::parse(data) else {
        return out;
    };
    let Some(dynsyms) = file.dynamic_symbol_table() else {
        return out;
    };
    for (offset, reloc) in file.dynamic_relocations().into_iter().flatten() {
        if let RelocationTarget::Symbol(idx) = reloc.target()
            && let Ok(sym) = dynsyms.symbol_by_index(idx)
            && sym.is_undefined()
            && let Ok(name) = sym.name()
            && !name.is_empty()
        {
            out.insert(offset, name.to_string());
        }
    }
    out
}

/// The last `::` segment of a (demangled) name.
fn last_segment(name: &str) -> &str {
    name.rsplit("::").next().unwrap_or(name)
}

/// Target of a direct near `jmp`/`jcc`/`call`.
fn near_target(ins: &Instruction) -> Option<u64> {
    matches!(
        ins.flow_control(),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
    )
    .then(|| ins.op0_kind())
    .filter(|k| {
        matches!(
            k,
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
    })
    .map(|_| ins.near_branch_target())
}

/// If `ins` may run before a moved entry probe, the argument registers it writes; `None` when
/// it must not: it transfers control (branch, call, return, trap), writes `rsp` or `rbp`, or
/// could not be decoded.
/// The registers (location codes) `ins` writes, for an instruction the entry site may be
/// moved past; `None` when it may not: not straight-line code, or it writes `rsp`/`rbp`
/// (the return probe and the stack walk need them as at entry).
fn skip_writes(ins: &Instruction, info: &mut InstructionInfoFactory) -> Option<Vec<u8>> {
    if ins.flow_control() != FlowControl::Next || ins.code() == iced_x86::Code::INVALID {
        return None;
    }
    let mut written = Vec::new();
    for used in info.info(ins).used_registers() {
        if !matches!(
            used.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) {
            continue;
        }
        match used.register().full_register() {
            Register::RSP | Register::RBP => return None,
            full => written.extend(location_code(full)),
        }
    }
    Some(written)
}

/// `(to, from)` location codes when `ins` copies one 64-bit register to another (`mov r64,
/// r64`); a 32-bit move zero-extends and is a plain write.
fn register_copy(ins: &Instruction) -> Option<(u8, u8)> {
    if ins.mnemonic() != Mnemonic::Mov
        || ins.op_count() != 2
        || ins.op0_kind() != OpKind::Register
        || ins.op1_kind() != OpKind::Register
        || !ins.op0_register().is_gpr64()
        || !ins.op1_register().is_gpr64()
    {
        return None;
    }
    Some((
        location_code(ins.op0_register())?,
        location_code(ins.op1_register())?,
    ))
}

/// `good_insns_64` of Linux 6.18 `arch/x86/kernel/uprobes.c`: one row per high nibble of the
/// first opcode byte, one column per low nibble; 0 = the kernel rejects a uprobe there.
/// (Its `good_2byte_insns` table is never consulted in 64-bit mode, because `0f` itself is
/// marked good here and the first-byte test comes first.)
#[rustfmt::skip]
const GOOD_INSNS_64: [[u8; 16]; 16] = [
    /* 00 */ [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1],
    /* 10 */ [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    /* 20 */ [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0],
    /* 30 */ [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0],
    /* 40 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 50 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 60 */ [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    /* 70 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 80 */ [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 90 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1],
    /* a0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* b0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* c0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    /* d0 */ [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* e0 */ [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0],
    /* f0 */ [1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1],
];

/// `x86_nops[1..=8]` (`arch/x86/include/asm/nops.h`, 64-bit): the byte sequences
/// `branch_setup_xol_ops()` emulates as nops by exact comparison.
const X86_NOPS: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// What the kernel does with a uprobe on the instruction `bytes` (exactly one instruction),
/// following `arch_uprobe_analyze_insn()` step by step; see [`Treatment`].
pub fn kernel_treatment(bytes: &[u8]) -> Treatment {
    // Legacy prefixes; `is_prefix_bad()` rejects segment overrides other than fs/gs and lock.
    let mut i = 0;
    let mut has_66 = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            0x26 | 0x2e | 0x36 | 0x3e | 0xf0 => return Treatment::Rejected,
            0x66 => has_66 = true,
            0x64 | 0x65 | 0x67 | 0xf2 | 0xf3 => {}
            _ => break,
        }
        i += 1;
    }
    let legacy = i;
    let rex = bytes.get(i).copied().filter(|b| (0x40..=0x4f).contains(b));
    if rex.is_some() {
        i += 1;
    }
    let Some(&opc1) = bytes.get(i) else {
        return Treatment::SingleStep;
    };
    // VEX/EVEX: the kernel's decoder reports the opcode byte after the prefix as OPCODE1
    // and checks it against the same table; none of them is emulated.
    let vex_len = match opc1 {
        0xc5 => Some(2),
        0xc4 => Some(3),
        0x62 => Some(4),
        _ => None,
    };
    if let Some(n) = vex_len {
        return match bytes.get(i + n) {
            Some(&op) if good_insn(op) => Treatment::SingleStep,
            Some(_) => Treatment::Rejected,
            None => Treatment::SingleStep,
        };
    }
    if !good_insn(opc1) {
        return Treatment::Rejected;
    }
    // insn_masking_exception(): mov ss, r/m (8e /2); pop ss (17) is already invalid above.
    if opc1 == 0x8e && bytes.get(i + 1).is_some_and(|m| (m >> 3) & 7 == 2) {
        return Treatment::Rejected;
    }

    // branch_setup_xol_ops()
    if (1..=X86_NOPS.len()).contains(&bytes.len()) && X86_NOPS[bytes.len() - 1] == bytes {
        return Treatment::Emulated(Emulation::Nop);
    }
    let branch = |e: Emulation| {
        if has_66 {
            // "reject any branch insns with such prefix": -ENOTSUPP.
            Treatment::Rejected
        } else {
            Treatment::Emulated(e)
        }
    };
    match opc1 {
        0x90 => {
            // `case 0x90: goto setup` — emulated as a nop whatever the prefixes, which is
            // wrong for `xchg r8, rax` (REX.B).
            if rex.is_some_and(|r| r & 1 != 0) {
                Treatment::Unsafe
            } else {
                Treatment::Emulated(Emulation::Nop)
            }
        }
        0xeb | 0xe9 => branch(Emulation::Jmp),
        0xe8 => branch(Emulation::Call),
        0x70..=0x7f => branch(Emulation::Jcc),
        0x0f if bytes.get(i + 1).is_some_and(|b| (0x80..=0x8f).contains(b)) => {
            branch(Emulation::Jcc)
        }
        // push_setup_xol_ops(): length 1, or length 2 with exactly the REX prefix 0x41.
        0x50..=0x57 => {
            if bytes.len() == 1 || (bytes.len() == 2 && legacy == 0 && rex == Some(0x41)) {
                Treatment::Emulated(Emulation::Push)
            } else {
                Treatment::SingleStep
            }
        }
        _ => Treatment::SingleStep,
    }
}

fn good_insn(op: u8) -> bool {
    GOOD_INSNS_64[usize::from(op >> 4)][usize::from(op & 0xf)] == 1
}

/// A compact Intel-syntax rendering (the monitor links iced-x86 without its formatter).
fn format_insn(ins: &Instruction) -> String {
    let mut out = format!("{:?}", ins.mnemonic()).to_lowercase();
    let reg = |r: Register| format!("{r:?}").to_lowercase();
    for k in 0..ins.op_count() {
        out.push_str(if k == 0 { " " } else { "," });
        let op = match ins.op_kind(k) {
            OpKind::Register => reg(ins.op_register(k)),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                format!("{:#x}", ins.near_branch_target())
            }
            OpKind::Memory => {
                if ins.is_ip_rel_memory_operand() {
                    format!("[{:#x}]", ins.ip_rel_memory_address())
                } else {
                    let mut m = String::new();
                    if ins.segment_prefix() != Register::None {
                        m.push_str(&reg(ins.segment_prefix()));
                        m.push(':');
                    }
                    m.push('[');
                    let mut parts = Vec::new();
                    if ins.memory_base() != Register::None {
                        parts.push(reg(ins.memory_base()));
                    }
                    if ins.memory_index() != Register::None {
                        parts.push(format!(
                            "{}*{}",
                            reg(ins.memory_index()),
                            ins.memory_index_scale()
                        ));
                    }
                    let disp = ins.memory_displacement64() as i64;
                    let mut s = parts.join("+");
                    if disp < 0 && !s.is_empty() {
                        s.push_str(&format!("-{:#x}", disp.unsigned_abs()));
                    } else if disp != 0 || s.is_empty() {
                        if !s.is_empty() {
                            s.push('+');
                        }
                        s.push_str(&format!("{disp:#x}"));
                    }
                    m.push_str(&s);
                    m.push(']');
                    m
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {
                let v = ins.immediate(k) as i64;
                if v < 0 {
                    format!("-{:#x}", v.unsigned_abs())
                } else {
                    format!("{v:#x}")
                }
            }
            other => format!("{other:?}").to_lowercase(),
        };
        out.push_str(&op);
    }
    out
}

/// Shared libraries (and other executable file mappings except the main executable) that
/// process `pid` maps, as paths usable from leakscope's own mount namespace:
/// `/proc/PID/root/<path>`, or `/proc/PID/map_files/<range>` for a file deleted (e.g.
/// upgraded) since it was mapped. Empty, with a logged warning, when `/proc/PID/maps` is
/// unreadable.
pub fn mapped_libraries(pid: u32) -> Vec<PathBuf> {
    let maps = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("cannot read /proc/{pid}/maps: {e}; no shared libraries will be probed");
            return Vec::new();
        }
    };
    let exe_path = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe_id = std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (dev_major_minor(m.dev()), m.ino()));
    parse_maps(pid, &maps, exe_path.as_deref(), exe_id)
}

/// `(major, minor)` of an `st_dev` (glibc's `makedev` encoding).
fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major, minor)
}

/// The body of [`mapped_libraries`]: `exe` is `/proc/PID/exe`'s link text and
/// `exe_id` its `((major, minor), inode)`, either identifying the executable's mappings.
fn parse_maps(
    pid: u32,
    maps: &str,
    exe: Option<&Path>,
    exe_id: Option<((u64, u64), u64)>,
) -> Vec<PathBuf> {
    const DELETED: &str = " (deleted)";
    let exe = exe.map(|p| {
        let s = p.to_string_lossy();
        s.strip_suffix(DELETED).unwrap_or(&s).to_string()
    });
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in maps.lines() {
        // range perms offset dev inode path (the path may contain spaces)
        let mut rest = line;
        let mut fields = [""; 5];
        for f in &mut fields {
            rest = rest.trim_start();
            let end = rest.find(' ').unwrap_or(rest.len());
            *f = &rest[..end];
            rest = &rest[end..];
        }
        let [range, perms, _offset, dev, inode] = fields;
        let path = rest.trim_start();
        if !path.starts_with('/') || !perms.contains('x') {
            continue;
        }
        let (path, deleted) = match path.strip_suffix(DELETED) {
            Some(p) => (p, true),
            None => (path, false),
        };
        let id = dev.split_once(':').and_then(|(ma, mi)| {
            Some((
                (
                    u64::from_str_radix(ma, 16).ok()?,
                    u64::from_str_radix(mi, 16).ok()?,
                ),
                inode.parse::<u64>().ok()?,
            ))
        });
        if exe.as_deref() == Some(path) || (id.is_some() && id == exe_id) {
            continue;
        }
        if !seen.insert(path.to_string()) {
            continue;
        }
        out.push(if deleted {
            PathBuf::from(format!("/proc/{pid}/map_files/{range}"))
        } else {
            PathBuf::from(format!("/proc/{pid}/root{path}"))
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- kernel emulation rules -------------------------------------------------------

    #[test]
    fn treatment_follows_the_kernel_rules() {
        use Emulation::*;
        use Treatment::*;
        let cases: &[(&[u8], Treatment)] = &[
            (&[0x41, 0x54], Emulated(Push)),               // push r12
            (&[0x55], Emulated(Push)),                     // push rbp
            (&[0x53], Emulated(Push)),                     // push rbx
            (&[0x48, 0x55], SingleStep),                   // rex.w push rbp
            (&[0x66, 0x50], SingleStep),                   // push ax
            (&[0x48, 0x85, 0xff], SingleStep),             // test rdi,rdi
            (&[0x0f, 0x84, 0xbf, 0, 0, 0], Emulated(Jcc)), // je rel32
            (&[0x74, 0x09], Emulated(Jcc)),                // je rel8
            (&[0xe9, 1, 2, 3, 4], Emulated(Jmp)),          // jmp rel32
            (&[0xeb, 0x10], Emulated(Jmp)),                // jmp rel8
            (&[0xe8, 1, 2, 3, 4], Emulated(Call)),         // call rel32
            (&[0x66, 0xe9, 1, 2], Rejected),               // jmpw: -ENOTSUPP
            (&[0x90], Emulated(Nop)),
            (&[0x66, 0x90], Emulated(Nop)),
            (&[0xf3, 0x90], Emulated(Nop)),             // pause
            (&[0x41, 0x90], Unsafe),                    // xchg r8,rax
            (&[0x0f, 0x1f, 0x44, 0, 0], Emulated(Nop)), // nopl 0(rax,rax,1)
            (&[0x0f, 0x1f, 0x80, 0, 0, 0, 0], Emulated(Nop)),
            (&[0x66, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], SingleStep), // nopw, not x86_nops[9]
            (&[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], Rejected), // cs nopw
            (&[0x3e, 0xff, 0xe0], Rejected),                        // notrack jmp rax
            (&[0xf0, 0x48, 0x0f, 0xb1, 0x0a], Rejected),            // lock cmpxchg
            (&[0xf3, 0x0f, 0x1e, 0xfa], SingleStep),                // endbr64
            (&[0xc3], SingleStep),                                  // ret
            (&[0xff, 0x25, 0, 0, 0, 0], SingleStep),                // jmp [rip+x]
            (&[0x48, 0x83, 0xec, 0x10], SingleStep),                // sub rsp,0x10
            (&[0xcc], Rejected),                                    // int3
            (&[0x8e, 0xd0], Rejected),                              // mov ss,eax
            (&[0xc5, 0xf8, 0x77], SingleStep),                      // vzeroupper
        ];
        for (bytes, want) in cases {
            assert_eq!(kernel_treatment(bytes), *want, "bytes {bytes:02x?}");
        }
    }

    // ---- entry-site choice on hand-made code ------------------------------------------

    fn describe_code(code: &[u8], role: AllocRole) -> AllocFn {
        let mut img = super::super::elf::code_image(0x1000, code);
        img.functions.insert(
            0x1000,
            super::super::elf::FnInfo {
                size: code.len() as u64,
                names: vec!["f".to_string()],
            },
        );
        let ctx = Ctx::new(&img, Path::new("/synthetic"));
        ctx.describe(0x1000, "f".to_string(), role, AllocFamily::Libc)
            .expect("describable")
    }

    #[test]
    fn free_like_prologue_moves_past_the_single_stepped_test() {
        // test rdi,rdi; je +1; push rbx; ... ; ret
        let code = [0x48, 0x85, 0xff, 0x74, 0x02, 0x53, 0x5b, 0xc3];
        let f = describe_code(&code, AllocRole::Free);
        assert_eq!(f.entry_probe.offset, 3, "{:?}", f.prologue);
        assert_eq!(f.entry_probe.treatment, Treatment::Emulated(Emulation::Jcc));
        assert!(f.entry_probe.emulated);
        assert_eq!(f.entry_probe.intact_args, vec![ArgReg::Rdi]);
        assert_eq!(f.returns.len(), 1);
        assert_eq!(f.returns[0].offset, 7);
        assert!(!f.returns[0].emulated, "the kernel single-steps ret");
        assert!(!f.tail_calls);
    }

    #[test]
    fn site_stays_at_entry_when_an_argument_is_overwritten() {
        // mov rdi,rax; je +0; ret — `free` needs rdi.
        let code = [0x48, 0x89, 0xc7, 0x74, 0x00, 0xc3];
        let f = describe_code(&code, AllocRole::Free);
        assert_eq!(f.entry_probe.offset, 0);
        assert!(!f.entry_probe.emulated);
        // Writing a register the hook does not need is fine, and reported.
        // mov rsi,rax; je +0; ret — malloc needs only rdi.
        let code = [0x48, 0x89, 0xc6, 0x74, 0x00, 0xc3];
        let f = describe_code(&code, AllocRole::Malloc);
        assert_eq!(f.entry_probe.offset, 3);
        assert_eq!(f.entry_probe.intact_args, vec![ArgReg::Rdi]);
    }

    #[test]
    fn site_follows_an_argument_copied_to_another_register() {
        // mimalloc's mi_free: mov rax,[rip]; mov rdx,rdi; mov rsi,rdi; shr rdx,0x1d;
        // mov rdi,[rax+rdx*8]; test rdi,rdi; je +0; ret. The pointer survives in rsi only.
        let code = [
            0x48, 0x8b, 0x05, 0, 0, 0, 0, 0x48, 0x89, 0xfa, 0x48, 0x89, 0xfe, 0x48, 0xc1, 0xea,
            0x1d, 0x48, 0x8b, 0x3c, 0xd0, 0x48, 0x85, 0xff, 0x74, 0x00, 0xc3,
        ];
        let f = describe_code(&code, AllocRole::Free);
        assert_eq!(f.entry_probe.offset, 24, "{:?}", f.prologue);
        assert!(f.entry_probe.emulated);
        assert_eq!(f.entry_probe.intact_args, vec![ArgReg::Rdi]);
        let moved = &f.entry_probe.moved_args;
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert_eq!((moved[0].arg, moved[0].register), (ArgReg::Rdi, "rsi"));
        assert_eq!(
            arg_location::of(f.entry_probe.arg_cookie(), 0),
            arg_location::RSI
        );
        // A 32-bit copy zero-extends: not the argument any more, so the site stays at 0.
        // mov esi,edi; mov rdi,rax; je +0; ret
        let code = [0x89, 0xfe, 0x48, 0x89, 0xc7, 0x74, 0x00, 0xc3];
        let f = describe_code(&code, AllocRole::Free);
        assert_eq!(f.entry_probe.offset, 0, "{:?}", f.prologue);
        assert_eq!(f.entry_probe.arg_cookie(), 0);
        // Swapped through a third register, both arguments stay readable.
        // mov rax,rdi; mov rdi,rsi; mov rsi,rax; je +0; ret (aligned_alloc: align, size)
        let code = [
            0x48, 0x89, 0xf8, 0x48, 0x89, 0xf7, 0x48, 0x89, 0xc6, 0x74, 0x00, 0xc3,
        ];
        let f = describe_code(&code, AllocRole::AlignedAlloc);
        assert_eq!(f.entry_probe.offset, 9, "{:?}", f.prologue);
        let cookie = f.entry_probe.arg_cookie();
        assert_eq!(arg_location::of(cookie, 0), arg_location::RSI);
        assert_eq!(arg_location::of(cookie, 1), arg_location::RDI);
    }

    #[test]
    fn inspect_warns_about_single_stepped_probes() {
        // mov rdi,rax; je +0; ret — free must stay on the single-stepped mov.
        let stuck = describe_code(&[0x48, 0x89, 0xc7, 0x74, 0x00, 0xc3], AllocRole::Free);
        // test rdi,rdi; je +0; ret — malloc moves to the je.
        let fine = describe_code(&[0x48, 0x85, 0xff, 0x74, 0x00, 0xc3], AllocRole::Malloc);
        let render = |functions: Vec<AllocFn>| {
            let image = AllocatorImage {
                exe: PathBuf::from("/synthetic"),
                global: GlobalAllocator::System,
                evidence: Vec::new(),
                libc: None,
                functions,
                warnings: Vec::new(),
            };
            let points = crate::daemon::heap::heap_points(&image);
            assert!(!points.is_empty());
            crate::export::inspect::render_allocator(&image, &points)
        };
        let shown = render(vec![fine.clone(), stuck]);
        assert!(
            shown.contains("warning: the kernel single-steps the probed instruction of f:"),
            "{shown}"
        );
        assert!(!render(vec![fine]).contains("single-steps"));
    }

    #[test]
    fn site_stays_at_entry_across_stack_writes_and_branch_targets() {
        // sub rsp,8; je +0; ret — rsp changes before the jcc.
        let code = [0x48, 0x83, 0xec, 0x08, 0x74, 0x00, 0xc3];
        assert_eq!(describe_code(&code, AllocRole::Free).entry_probe.offset, 0);
        // test rdi,rdi; je +1; ret; jmp back to +3 (the je) — the site is a branch target.
        let code = [0x48, 0x85, 0xff, 0x74, 0x01, 0xc3, 0xeb, 0xfb];
        let f = describe_code(&code, AllocRole::Free);
        assert_eq!(f.entry_probe.offset, 0, "{:?}", f.prologue);
        // A loop back to the entry itself is harmless.
        let code = [0x48, 0x85, 0xff, 0x74, 0x01, 0xc3, 0xeb, 0xf8];
        assert_eq!(describe_code(&code, AllocRole::Free).entry_probe.offset, 3);
    }

    #[test]
    fn tail_jumps_are_exits() {
        // test rdi,rdi; je +5; jmp [rip+0]; ret
        let code = [0x48, 0x85, 0xff, 0x74, 0x06, 0xff, 0x25, 0, 0, 0, 0, 0xc3];
        let f = describe_code(&code, AllocRole::Free);
        assert!(f.tail_calls);
        assert_eq!(f.exits.len(), 1);
        assert_eq!(f.exits[0].kind, ExitKind::Indirect);
        assert_eq!(f.exits[0].offset, 5);
    }

    // ---- /proc/PID/maps -----------------------------------------------------------------

    #[test]
    fn maps_lists_libraries_once_and_skips_the_executable() {
        let maps = "\
55d0c0000000-55d0c0010000 r--p 00000000 fd:01 100 /srv/app
55d0c0010000-55d0c0020000 r-xp 00010000 fd:01 100 /srv/app
7f0000000000-7f0000020000 r--p 00000000 fd:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000020000-7f0000100000 r-xp 00020000 fd:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000210000 r-xp 00000000 fd:01 300 /opt/my lib/libx.so (deleted)
7f0000300000-7f0000301000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";
        let libs = parse_maps(42, maps, Some(Path::new("/srv/app")), None);
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/proc/42/root/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/proc/42/map_files/7f0000200000-7f0000210000"),
            ]
        );
        // The executable is also recognised by device and inode.
        let libs = parse_maps(42, maps, None, Some(((0xfd, 1), 100)));
        assert_eq!(libs.len(), 2);
    }

    #[test]
    fn mapped_libraries_of_this_process_include_libc() {
        let libs = mapped_libraries(std::process::id());
        assert!(
            libs.iter().any(|p| p
                .file_name()
                .is_some_and(|n| is_libc_name(&n.to_string_lossy()))),
            "{libs:?}"
        );
        assert!(libs.iter().all(|p| p.exists()), "{libs:?}");
    }

    // ---- glibc ----------------------------------------------------------------------------

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

    fn libc_image() -> AllocatorImage {
        // Any executable will do as the "process"; the library is what is checked.
        let exe = std::env::current_exe().expect("test binary path");
        find_allocators(&exe, &[PathBuf::from(LIBC)]).expect("analysable")
    }

    #[test]
    fn glibc_free_is_probed_past_its_test_on_an_emulated_instruction() {
        let a = libc_image();
        assert_eq!(a.libc.as_deref(), Some(Path::new(LIBC)));
        let free = a.by_symbol("free").expect("free in libc");
        assert_eq!(free.family, AllocFamily::Libc);
        assert_ne!(free.entry_probe.offset, 0, "{:?}", free.prologue);
        assert!(free.entry_probe.emulated, "{:?}", free.prologue);
        assert!(free.entry_probe.intact_args.contains(&ArgReg::Rdi));
        assert!(!free.returns.is_empty());
        for f in &a.functions {
            if f.family != AllocFamily::Libc {
                continue;
            }
            assert!(
                f.entry_probe.offset < f.size,
                "{}: {:?}",
                f.symbol,
                f.prologue
            );
            assert_eq!(
                f.entry_probe.file_offset,
                f.file_offset + f.entry_probe.offset,
                "{}",
                f.symbol
            );
        }
    }

    #[test]
    fn this_process_libc_is_found_through_proc_root() {
        let exe = std::env::current_exe().expect("test binary path");
        let a = find_allocators(&exe, &mapped_libraries(std::process::id())).expect("analysable");
        let libc = a
            .libc
            .as_ref()
            .unwrap_or_else(|| panic!("{:?}", a.warnings));
        assert!(libc.starts_with("/proc/"), "{}", libc.display());
        let free = a.by_symbol("free").expect("free");
        assert_eq!(&free.file, libc);
        assert!(free.entry_probe.emulated, "{:?}", free.prologue);
    }

    #[test]
    fn glibc_malloc_family_is_found() {
        let a = libc_image();
        for (sym, role) in LIBC_API {
            let f = a
                .by_symbol(sym)
                .unwrap_or_else(|| panic!("{sym} not found in {LIBC}: {:?}", a.warnings));
            assert_eq!(f.role, role);
            assert_eq!(f.file, Path::new(LIBC));
        }
        let malloc = a.by_symbol("malloc").unwrap();
        assert_eq!(malloc.args.size, Some(ArgReg::Rdi));
        assert_eq!(malloc.args.ret, RetValue::Ptr);
        let pm = a.by_symbol("posix_memalign").unwrap();
        assert_eq!(pm.args.out_ptr, Some(ArgReg::Rdi));
        assert_eq!(pm.args.size, Some(ArgReg::Rdx));
        // Entry points are emulated wherever glibc's prologue allows it.
        for sym in ["malloc", "calloc", "realloc", "free"] {
            let f = a.by_symbol(sym).unwrap();
            assert!(f.entry_probe.emulated, "{sym}: {:?}", f.prologue);
        }
    }

    // ---- the heap-app fixture, one build per global allocator -----------------------------

    const SYSTEM_BUILD: &str = "cargo build --release -p heap-app";
    const JEMALLOC_BUILD: &str = "cargo build --release -p heap-app --features jemalloc \
                                  --target-dir target/fixtures-jemalloc";
    const MIMALLOC_BUILD: &str = "cargo build --release -p heap-app --features mimalloc \
                                  --target-dir target/fixtures-mimalloc";

    /// `<workspace>/target/<dir>/release/heap-app`, which must exist.
    fn heap_app(dir: &str, build: &str) -> PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join(dir)
            .join("release/heap-app");
        assert!(
            path.exists(),
            "fixture binary {} is missing; build it from the workspace root with: {build}",
            path.display()
        );
        path
    }

    #[test]
    #[should_panic(expected = "build it from the workspace root with: cargo build --release")]
    fn missing_fixture_names_its_build_command() {
        heap_app("no-such-fixture-dir", SYSTEM_BUILD);
    }

    fn analyse_fixture(dir: &str, build: &str) -> AllocatorImage {
        let exe = heap_app(dir, build);
        find_allocators(&exe, &[PathBuf::from(LIBC)])
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()))
    }

    /// All four shims are found in the executable with entry probes inside them, and lead to
    /// `want`.
    fn check_shims(a: &AllocatorImage, want: GlobalAllocator) {
        assert_eq!(a.global, want, "evidence: {:?}", a.evidence);
        for (last, role) in SHIMS {
            let f = a
                .shim(role)
                .unwrap_or_else(|| panic!("{last} not found: {:?}", a.warnings));
            assert_eq!(last_segment(&f.symbol), last);
            assert_eq!(f.family, AllocFamily::RustShim);
            assert_eq!(f.file, a.exe);
            assert!(f.entry_probe.offset < f.size, "{last}: {:?}", f.prologue);
            let fwd = f.forwarding.as_ref().expect("shims carry forwarding");
            assert_eq!(fwd.allocator, want, "{last}: {fwd:?}");
            assert!(!fwd.reaches.is_empty(), "{last}: {fwd:?}");
        }
        assert_eq!(
            a.shim(AllocRole::Realloc).unwrap().args.new_size,
            Some(ArgReg::Rcx)
        );
    }

    #[test]
    fn heap_app_system_shims_forward_through_rdl_to_libc() {
        let a = analyse_fixture("", SYSTEM_BUILD);
        check_shims(&a, GlobalAllocator::System);
        let alloc = a.shim(AllocRole::Alloc).unwrap();
        let fwd = alloc.forwarding.as_ref().unwrap();
        assert!(
            fwd.reaches.iter().any(|n| last_segment(n) == "__rdl_alloc"),
            "{fwd:?}"
        );
        assert!(fwd.reaches.iter().any(|n| n == "malloc"), "{fwd:?}");
        let dealloc = a
            .shim(AllocRole::Dealloc)
            .unwrap()
            .forwarding
            .clone()
            .unwrap();
        assert!(dealloc.reaches.iter().any(|n| n == "free"), "{dealloc:?}");
        assert_eq!(a.of_family(AllocFamily::Jemalloc).count(), 0);
        assert_eq!(a.of_family(AllocFamily::Mimalloc).count(), 0);
    }

    #[test]
    fn heap_app_jemalloc_shims_reach_rjem() {
        let a = analyse_fixture("fixtures-jemalloc", JEMALLOC_BUILD);
        check_shims(&a, GlobalAllocator::Jemalloc);
        for sym in ["_rjem_malloc", "_rjem_mallocx", "_rjem_sdallocx"] {
            let f = a.by_symbol(sym).unwrap_or_else(|| panic!("{sym} missing"));
            assert_eq!(f.family, AllocFamily::Jemalloc);
            assert_eq!(f.file, a.exe);
        }
        let dealloc = a
            .shim(AllocRole::Dealloc)
            .unwrap()
            .forwarding
            .clone()
            .unwrap();
        assert!(
            dealloc.reaches.iter().any(|n| n == "_rjem_sdallocx"),
            "{dealloc:?}"
        );
    }

    #[test]
    fn heap_app_mimalloc_shims_reach_mi() {
        let a = analyse_fixture("fixtures-mimalloc", MIMALLOC_BUILD);
        check_shims(&a, GlobalAllocator::Mimalloc);
        for sym in ["mi_malloc_aligned", "mi_free"] {
            let f = a.by_symbol(sym).unwrap_or_else(|| panic!("{sym} missing"));
            assert_eq!(f.family, AllocFamily::Mimalloc);
            // Both begin with instructions the kernel single-steps and reuse their argument
            // registers before the first emulated one: the probe follows the moved argument.
            assert!(f.entry_probe.emulated, "{sym}: {:?}", f.prologue);
            let essential = f.args.essential(f.role);
            assert!(
                essential
                    .iter()
                    .all(|r| f.entry_probe.intact_args.contains(r)),
                "{sym}: {:?}",
                f.entry_probe
            );
        }
        // Every probe of the mimalloc build is on an emulated instruction.
        for f in a.of_family(AllocFamily::Mimalloc) {
            assert!(f.entry_probe.emulated, "{}: {:?}", f.symbol, f.prologue);
        }
        let alloc = a
            .shim(AllocRole::Alloc)
            .unwrap()
            .forwarding
            .clone()
            .unwrap();
        assert!(
            alloc.reaches.iter().any(|n| n == "mi_malloc_aligned"),
            "{alloc:?}"
        );
    }
}
