//! Where an entry probe goes: the first instruction of the prologue that the kernel
//! emulates, provided moving the probe there is invisible to the hook, and where each
//! argument is by then (the attach cookie carries it to the BPF program).

use iced_x86::{
    FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use monitor_common::heap::arg_location;
use serde::Serialize;

use super::super::ArgReg;
use super::code::{Ctx, near_target};
use super::kernel_rules::kernel_treatment;
use super::*;

/// How the kernel (Linux 6.18, x86-64) handles the instruction a uprobe replaces.
///
/// Source: `arch/x86/kernel/uprobes.c`, `arch_uprobe_analyze_insn()`:
/// 1. `uprobe_init_insn()` **rejects** the probe (`-ENOTSUPP`, the attach fails) for an
///    instruction with an `es`/`cs`/`ss`/`ds` segment or `lock` prefix (`is_prefix_bad()`:
///    `26 2e 36 3e f0`), an exception-masking `mov ss`/`pop ss`, or an opcode byte missing
///    from `good_insns_64` (`kernel_rules::GOOD_INSNS_64`).
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
pub(super) fn location_code(register: Register) -> Option<u8> {
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
pub(super) fn own_code(arg: ArgReg) -> u8 {
    arg_location::RDI + arg.position() as u8
}

const _: () = assert!(arg_location::R9 == arg_location::RDI + 5);

/// Which argument's entry value each register holds, by location code.
pub(super) type Holders = [Option<ArgReg>; arg_location::NAMES.len()];

impl Ctx<'_> {
    /// Picks the entry probe site (see [`AllocFn::entry_probe`]).
    pub(super) fn entry_site(
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

    pub(super) fn treatment(&self, ins: &Instruction) -> Treatment {
        self.img
            .bytes_at(ins.ip(), ins.len() as u64)
            .map_or(Treatment::SingleStep, kernel_treatment)
    }

    pub(super) fn site(
        &self,
        start: u64,
        ins: &Instruction,
        intact_args: Vec<ArgReg>,
    ) -> ProbeSite {
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
}

/// The registers (location codes) `ins` writes, for an instruction the entry site may be
/// moved past; `None` when it may not: it transfers control (branch, call, return, trap),
/// could not be decoded, or writes `rsp` or `rbp` (the entry program reads the return
/// address, where the stack walk at the return starts, at `[rsp]`, and the uretprobe
/// replaces it there).
pub(super) fn skip_writes(ins: &Instruction, info: &mut InstructionInfoFactory) -> Option<Vec<u8>> {
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
pub(super) fn register_copy(ins: &Instruction) -> Option<(u8, u8)> {
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

/// A compact Intel-syntax rendering (the monitor links iced-x86 without its formatter).
pub(super) fn format_insn(ins: &Instruction) -> String {
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
