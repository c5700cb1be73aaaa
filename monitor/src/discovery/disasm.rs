//! x86-64 code inspection with iced-x86: the direct callees of a function, a bounded
//! breadth-first walk over them, and a small linear register-origin tracker used to prove
//! which argument register carries a task header pointer.
//!
//! Why disassembly at all: release builds name `raw::poll` the same for every future type
//! (legacy mangling drops generic arguments), so the only way from a vtable to the future it
//! drives is to follow the calls. And the Rust ABI is unstable, so the register that carries
//! a header pointer into a hook must be checked in the target's own code, not assumed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

use super::ArgReg;
use super::elf::Image;

/// Decodes `[start, end)` of the image (as far as it is backed by the file; nothing once
/// the image's budget is spent).
pub(crate) fn decode_range(img: &Image, start: u64, end: u64) -> Vec<Instruction> {
    let Some(bytes) = img.bytes_at(start, end.saturating_sub(start)) else {
        return Vec::new();
    };
    let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    let mut out = Vec::new();
    let mut instr = Instruction::default();
    while decoder.can_decode() && !img.budget.spent() {
        decoder.decode_out(&mut instr);
        out.push(instr);
    }
    out
}

/// Where control goes from `instr` when that is a statically known place *outside*
/// `[start, end)`: direct `call`/`jmp`/`jcc` targets and `call [rip+slot]` through a GOT
/// slot whose relocated value is code (rust-lld keeps many intra-binary calls GOT-indirect).
pub(crate) fn static_target(img: &Image, instr: &Instruction) -> Option<u64> {
    match instr.flow_control() {
        FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
            match instr.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    Some(instr.near_branch_target())
                }
                _ => None,
            }
        }
        FlowControl::IndirectCall | FlowControl::IndirectBranch => {
            if instr.op0_kind() == OpKind::Memory && instr.is_ip_rel_memory_operand() {
                let slot = instr.ip_rel_memory_address();
                let value = *img.relocs.get(&slot)?;
                img.is_code(value).then_some(value)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Cached call-graph queries over one image.
pub(crate) struct Walker<'a> {
    pub img: &'a Image,
    cache: HashMap<u64, Vec<u64>>,
}

/// Whether a walk continues into a callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Descend,
    Stop,
}

/// One callee reached by [`Walker::walk`].
pub(crate) struct Visit<'n> {
    pub addr: u64,
    pub names: &'n [String],
    /// 1 for a direct callee of a root.
    pub depth: usize,
    /// The walk passed through `BlockingTask` glue (see [`super::naming::role`]).
    pub in_blocking: bool,
}

impl<'a> Walker<'a> {
    pub fn new(img: &'a Image) -> Self {
        Walker {
            img,
            cache: HashMap::new(),
        }
    }

    /// Distinct out-of-function call/jump targets of the function starting at `start`, in
    /// instruction order. Unknown functions (no symbol) have none.
    pub fn callees(&mut self, start: u64) -> &[u64] {
        let img = self.img;
        self.cache.entry(start).or_insert_with(|| {
            let Some((s, e)) = img.function_extent(start) else {
                return Vec::new();
            };
            let mut seen = HashSet::new();
            decode_range(img, s, e)
                .iter()
                .filter_map(|i| static_target(img, i))
                .filter(|&t| (t < s || t >= e) && seen.insert(t))
                .collect()
        })
    }

    /// Breadth-first walk from `roots` up to `max_depth` call levels, asking `visit` whether
    /// to continue into each newly reached callee. Every address is visited once.
    pub fn walk(
        &mut self,
        roots: &[u64],
        max_depth: usize,
        mut visit: impl FnMut(&Visit<'_>) -> Step,
    ) {
        let mut seen: HashSet<u64> = roots.iter().copied().collect();
        let mut queue: VecDeque<(u64, usize, bool)> = roots
            .iter()
            .map(|&r| (r, 0, names_blocking(self.img.names_at(r))))
            .collect();
        while let Some((addr, depth, in_blocking)) = queue.pop_front() {
            if depth >= max_depth || self.img.budget.spent() {
                continue;
            }
            let callees = self.callees(addr).to_vec();
            for callee in callees {
                if !seen.insert(callee) {
                    continue;
                }
                let names = self.img.names_at(callee);
                let v = Visit {
                    addr: callee,
                    names,
                    depth: depth + 1,
                    in_blocking,
                };
                if visit(&v) == Step::Descend {
                    queue.push_back((callee, depth + 1, in_blocking || names_blocking(names)));
                }
            }
        }
    }

    /// Every address reachable from `roots` through functions for which `descend` holds.
    pub fn reachable(
        &mut self,
        roots: &[u64],
        max_depth: usize,
        descend: impl Fn(&[String]) -> bool,
    ) -> HashSet<u64> {
        let mut out = HashSet::new();
        self.walk(roots, max_depth, |v| {
            out.insert(v.addr);
            if descend(v.names) {
                Step::Descend
            } else {
                Step::Stop
            }
        });
        out
    }
}

fn names_blocking(names: &[String]) -> bool {
    names
        .iter()
        .any(|n| n.contains("tokio::runtime::blocking::task::BlockingTask"))
}

/// Abstract value of a register or stack slot in [`track_header_args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Unknown,
    /// The value an argument register had on entry.
    Arg(ArgReg),
    /// A 64-bit load from `[arg + disp]`.
    Field(ArgReg, i64),
}

/// What [`track_header_args`] saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct ArgEvidence {
    /// Per argument register (index = `ArgReg as usize`): how many times its entry value was
    /// used the way only a task header pointer is used.
    pub header_uses: [u32; 6],
    /// For loads `reg = [rdi + d]` followed by an indirect call/jump through `[reg + 8k]`
    /// (k < 7, a task-vtable slot): votes per `d`. This is how `RawTask` methods reach the
    /// vtable, so it yields the header's vtable-pointer offset.
    pub vtable_disp_votes: HashMap<i64, u32>,
}

fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    full.is_gpr64().then(|| full.number())
}

/// Registers a call may clobber (System V x86_64).
pub(crate) const CALLER_SAVED: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// Register/stack state at one program point.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    regs: [Val; 16],
    /// Stack slots keyed by offset from the entry `rsp`.
    slots: BTreeMap<i64, Val>,
    /// Current `rsp` relative to entry, while known.
    rsp: Option<i64>,
}

impl State {
    fn entry() -> Self {
        let mut regs = [Val::Unknown; 16];
        for (reg, arg) in [
            (Register::RDI, ArgReg::Rdi),
            (Register::RSI, ArgReg::Rsi),
            (Register::RDX, ArgReg::Rdx),
            (Register::RCX, ArgReg::Rcx),
            (Register::R8, ArgReg::R8),
            (Register::R9, ArgReg::R9),
        ] {
            regs[reg.number()] = Val::Arg(arg);
        }
        State {
            regs,
            slots: BTreeMap::new(),
            rsp: Some(0),
        }
    }

    fn get(&self, r: Register) -> Val {
        gpr_index(r).map_or(Val::Unknown, |i| self.regs[i])
    }

    /// Meet with another incoming state (values that differ become unknown). Returns true
    /// if `self` changed.
    fn meet(&mut self, other: &State) -> bool {
        let before = self.clone();
        for (a, b) in self.regs.iter_mut().zip(other.regs.iter()) {
            if a != b {
                *a = Val::Unknown;
            }
        }
        if self.rsp != other.rsp {
            self.rsp = None;
            self.slots.clear();
        } else {
            self.slots.retain(|k, v| other.slots.get(k) == Some(v));
        }
        *self != before
    }

    /// Effect of one instruction (calls clobber caller-saved registers).
    fn transfer(&mut self, instr: &Instruction, info: &mut InstructionInfoFactory) {
        let flow = instr.flow_control();
        if matches!(flow, FlowControl::Call | FlowControl::IndirectCall) {
            for r in CALLER_SAVED {
                self.regs[r.number()] = Val::Unknown;
            }
            return;
        }
        let disp = instr.memory_displacement64() as i64;
        let op0 = instr.op0_kind();
        let op1 = if instr.op_count() > 1 {
            instr.op1_kind()
        } else {
            OpKind::Register
        };
        match instr.mnemonic() {
            Mnemonic::Mov if op0 == OpKind::Register && instr.op0_register().is_gpr64() => {
                let dst = instr.op0_register().number();
                self.regs[dst] = match op1 {
                    OpKind::Register => self.get(instr.op1_register()),
                    OpKind::Memory if instr.memory_index() == Register::None => {
                        match (instr.memory_base(), self.rsp) {
                            (Register::RSP, Some(sp)) => self
                                .slots
                                .get(&(sp + disp))
                                .copied()
                                .unwrap_or(Val::Unknown),
                            (b, _) => match self.get(b) {
                                Val::Arg(a) => Val::Field(a, disp),
                                _ => Val::Unknown,
                            },
                        }
                    }
                    _ => Val::Unknown,
                };
                return;
            }
            Mnemonic::Mov
                if op0 == OpKind::Memory
                    && instr.memory_base() == Register::RSP
                    && instr.memory_index() == Register::None =>
            {
                if let Some(sp) = self.rsp {
                    let v = if op1 == OpKind::Register && instr.op1_register().is_gpr64() {
                        self.get(instr.op1_register())
                    } else {
                        Val::Unknown
                    };
                    self.slots.insert(sp + disp, v);
                }
                return;
            }
            Mnemonic::Push if op0 == OpKind::Register => {
                let v = self.get(instr.op0_register());
                if let Some(sp) = self.rsp.as_mut() {
                    *sp -= 8;
                    let sp = *sp;
                    self.slots.insert(sp, v);
                }
                return;
            }
            Mnemonic::Pop if op0 == OpKind::Register => {
                let v = self
                    .rsp
                    .and_then(|sp| self.slots.get(&sp).copied())
                    .unwrap_or(Val::Unknown);
                if let Some(i) = gpr_index(instr.op0_register()) {
                    self.regs[i] = v;
                }
                if let Some(sp) = self.rsp.as_mut() {
                    *sp += 8;
                }
                return;
            }
            Mnemonic::Sub | Mnemonic::Add
                if op0 == OpKind::Register
                    && instr.op0_register() == Register::RSP
                    && matches!(op1, OpKind::Immediate8to64 | OpKind::Immediate32to64) =>
            {
                let imm = instr.immediate(1) as i64;
                if let Some(sp) = self.rsp.as_mut() {
                    *sp += if instr.mnemonic() == Mnemonic::Sub {
                        -imm
                    } else {
                        imm
                    };
                }
                return;
            }
            _ => {}
        }
        for used in info.info(instr).used_registers() {
            if matches!(
                used.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                if used.register().full_register() == Register::RSP {
                    // `and rsp, -16`, `mov rsp, rbp`, …: stop trusting slot positions.
                    self.rsp = None;
                    self.slots.clear();
                } else if let Some(i) = gpr_index(used.register()) {
                    self.regs[i] = Val::Unknown;
                }
            }
        }
        if op0 == OpKind::Memory
            && instr.memory_base() == Register::RSP
            && let Some(sp) = self.rsp
        {
            self.slots.remove(&(sp + disp));
        }
    }
}

/// Intra-function successors of instruction `i`.
fn successors(instrs: &[Instruction], index: &HashMap<u64, usize>, i: usize) -> Vec<usize> {
    let instr = &instrs[i];
    let mut out = Vec::with_capacity(2);
    let falls_through = !matches!(
        instr.flow_control(),
        FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
            | FlowControl::Interrupt
            | FlowControl::Exception
    ) && instr.mnemonic() != Mnemonic::Ud2;
    if falls_through && i + 1 < instrs.len() {
        out.push(i + 1);
    }
    if matches!(
        instr.flow_control(),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
    ) && matches!(
        instr.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    ) && let Some(&j) = index.get(&instr.near_branch_target())
    {
        out.push(j);
    }
    out
}

/// Follows, through the function's control flow, where the entry values of the argument
/// registers go (register copies, spills to and reloads from the stack; values that differ
/// between incoming paths become unknown), and records header-pointer evidence:
/// - `[arg + vtable_offset]` is loaded and then dereferenced at a vtable field offset
///   (`< 80`), e.g. `mov rax,[r15+0x10]; call [rax+0x30]` or `mov rax,[rax+0x48]` (id_offset);
/// - the entry value is passed in `rdi` to a function for which `header_callee` holds
///   (`State::*`, `RawTask::*`, `Harness::*`: all take the header pointer first).
///
/// Code reached only through jump tables or unwinding is not analysed. The analysis only
/// ever *adds* evidence, so callers treat "no evidence" as "unverified", never as proof of
/// the opposite.
///
/// Only the first [`MAX_TRACKED_BYTES`] of a function are followed: the state kept per
/// instruction is a few hundred bytes, and a corrupted symbol size must not turn that into
/// gigabytes. Less code only means less evidence.
pub(crate) fn track_header_args(
    img: &Image,
    start: u64,
    end: u64,
    vtable_offset: Option<i64>,
    header_callee: &dyn Fn(u64) -> bool,
) -> ArgEvidence {
    let end = end.min(start.saturating_add(MAX_TRACKED_BYTES));
    analyse(&decode_range(img, start, end), vtable_offset, &|i| {
        static_target(img, i).filter(|&t| (t < start || t >= end) && header_callee(t))
    })
}

/// How much of a function [`track_header_args`] follows. The functions it is asked about
/// (spawn and completion hooks, `RawTask` methods) are under 2 KiB in the fixtures, the
/// largest function of the axum fixture 16 KiB.
const MAX_TRACKED_BYTES: u64 = 64 << 10;

/// [`track_header_args`] over already decoded code; `header_call` returns the target of a
/// call/jump that takes the header first. Split out so tests can feed hand-made code.
fn analyse(
    instrs: &[Instruction],
    vtable_offset: Option<i64>,
    header_call: &dyn Fn(&Instruction) -> Option<u64>,
) -> ArgEvidence {
    let index: HashMap<u64, usize> = instrs
        .iter()
        .enumerate()
        .map(|(i, x)| (x.ip(), i))
        .collect();
    let mut states: Vec<Option<State>> = vec![None; instrs.len()];
    let mut info = InstructionInfoFactory::new();
    let mut work = VecDeque::new();
    if !instrs.is_empty() {
        states[0] = Some(State::entry());
        work.push_back(0);
    }
    // Values only ever move towards Unknown, so this terminates; the cap guards against
    // pathological inputs anyway.
    let mut budget = instrs.len().saturating_mul(16).max(1024);
    while let Some(i) = work.pop_front() {
        budget = budget.saturating_sub(1);
        if budget == 0 {
            break;
        }
        let Some(mut st) = states[i].clone() else {
            continue;
        };
        st.transfer(&instrs[i], &mut info);
        for j in successors(instrs, &index, i) {
            match &mut states[j] {
                slot @ None => {
                    *slot = Some(st.clone());
                    work.push_back(j);
                }
                Some(existing) => {
                    if existing.meet(&st) {
                        work.push_back(j);
                    }
                }
            }
        }
    }

    let mut ev = ArgEvidence::default();
    for (instr, st) in instrs.iter().zip(&states) {
        let Some(st) = st else { continue };
        let has_mem = (0..instr.op_count()).any(|k| instr.op_kind(k) == OpKind::Memory);
        let base = instr.memory_base();
        if has_mem
            && base != Register::None
            && base != Register::RIP
            && instr.memory_index() == Register::None
        {
            let disp = instr.memory_displacement64() as i64;
            if let Val::Field(a, d) = st.get(base) {
                if Some(d) == vtable_offset && (0..80).contains(&disp) {
                    ev.header_uses[a as usize] += 1;
                }
                let through = matches!(
                    instr.flow_control(),
                    FlowControl::IndirectCall | FlowControl::IndirectBranch
                );
                if through && a == ArgReg::Rdi && disp % 8 == 0 && (0..56).contains(&disp) {
                    *ev.vtable_disp_votes.entry(d).or_default() += 1;
                }
            }
        }
        if matches!(
            instr.flow_control(),
            FlowControl::Call
                | FlowControl::IndirectCall
                | FlowControl::UnconditionalBranch
                | FlowControl::IndirectBranch
        ) && header_call(instr).is_some()
            && let Val::Arg(a) = st.get(Register::RDI)
        {
            ev.header_uses[a as usize] += 1;
        }
    }
    ev
}

/// The argument register with the most header evidence, if any has some.
pub(crate) fn best_arg(ev: &ArgEvidence) -> Option<ArgReg> {
    let (idx, &n) = ev
        .header_uses
        .iter()
        .enumerate()
        .max_by_key(|&(i, n)| (*n, std::cmp::Reverse(i)))?;
    (n > 0).then(|| ArgReg::ALL[idx])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f`: `push r15; push rbx; mov r15,rsi; mov rbx,rdi; test rdx,rdx; je L; pop rbx;
    /// pop r15; jmp [rip+0x100]; L: mov rax,[r15+0x10]; mov rdi,r15; call [rax+0x30];
    /// pop rbx; pop r15; ret` — the shape of `Spawner::spawn_task`, where a linear scan
    /// would lose `r15` in the epilogue before the branch target.
    /// `g`: `mov rax,[rdi+0x10]; jmp [rax+0x30]` — `RawTask::shutdown`.
    const CODE: [u8; 44] = [
        0x41, 0x57, 0x53, 0x49, 0x89, 0xf7, 0x48, 0x89, 0xfb, 0x48, 0x85, 0xd2, 0x74, 0x09, 0x5b,
        0x41, 0x5f, 0xff, 0x25, 0x00, 0x01, 0x00, 0x00, 0x49, 0x8b, 0x47, 0x10, 0x4c, 0x89, 0xff,
        0xff, 0x50, 0x30, 0x5b, 0x41, 0x5f, 0xc3, 0x48, 0x8b, 0x47, 0x10, 0xff, 0x60, 0x30,
    ];

    #[test]
    fn dataflow_follows_header_register_across_blocks() {
        let img = super::super::elf::code_image(0x1000, &CODE);
        let ev = track_header_args(&img, 0x1000, 0x1025, Some(16), &|_| false);
        assert!(ev.header_uses[ArgReg::Rsi as usize] >= 1, "{ev:?}");
        assert_eq!(
            ev.header_uses.iter().sum::<u32>(),
            ev.header_uses[ArgReg::Rsi as usize],
            "{ev:?}"
        );
        assert_eq!(best_arg(&ev), Some(ArgReg::Rsi));
        // With the wrong vtable offset there is no evidence at all.
        let ev = track_header_args(&img, 0x1000, 0x1025, Some(24), &|_| false);
        assert_eq!(best_arg(&ev), None);
    }

    #[test]
    fn vtable_offset_votes_from_rawtask_shape() {
        let img = super::super::elf::code_image(0x1000, &CODE);
        let ev = track_header_args(&img, 0x1025, 0x102c, None, &|_| false);
        assert_eq!(ev.vtable_disp_votes.get(&16), Some(&1));
        assert_eq!(ev.vtable_disp_votes.len(), 1);
    }

    #[test]
    fn best_arg_prefers_most_evidence() {
        let mut ev = ArgEvidence::default();
        assert_eq!(best_arg(&ev), None);
        ev.header_uses[1] = 2;
        ev.header_uses[0] = 1;
        assert_eq!(best_arg(&ev), Some(ArgReg::Rsi));
    }
}
