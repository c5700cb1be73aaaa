//! Reading one file's code for the allocator search: its functions by name, its imports
//! (GOT slots and PLT stubs), and where a call or jump goes.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::path::Path;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};
use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSymbol, ObjectSymbolTable, RelocationTarget};

use super::super::disasm::decode_range;
use super::super::elf::Image;
use super::api::*;
use super::*;

/// Where a call or jump goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Dest {
    /// Code in the same file.
    Local(u64),
    /// An imported symbol, through a GOT slot or PLT stub.
    Import(String),
}

/// One file being analysed.
pub(super) struct Ctx<'a> {
    pub(super) img: &'a Image,
    pub(super) path: &'a Path,
    /// GOT slot → name of the undefined symbol the dynamic loader writes there.
    pub(super) imports: HashMap<u64, String>,
    /// `.plt`, `.plt.sec`, `.plt.got` ranges.
    pub(super) plt: Vec<(u64, u64)>,
    /// Every function name → its address (first definition wins).
    pub(super) by_name: HashMap<&'a str, u64>,
    /// Every direct branch/call target in the file's code, sorted (computed on first use).
    pub(super) targets: OnceCell<Vec<u64>>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(img: &'a Image, path: &'a Path) -> Self {
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
    pub(super) fn rust_functions(&self, last: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (&addr, info) in &self.img.functions {
            if let Some(n) = info.names.iter().find(|n| last_segment(n) == last) {
                out.push((addr, n.clone()));
            }
        }
        out
    }

    /// jemalloc, mimalloc and (in an executable) a statically linked libc.
    pub(super) fn allocator_api(&self, is_exe: bool) -> Vec<AllocFn> {
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
    pub(super) fn api(
        &self,
        table: &[(&str, AllocRole)],
        prefix: &str,
        family: AllocFamily,
    ) -> Vec<AllocFn> {
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
    pub(super) fn describe(
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

    /// All direct branch and call targets in the file's code (linear sweep; a
    /// desynchronised sweep only adds targets, which only makes the entry-site choice more
    /// conservative).
    pub(super) fn branch_targets(&self) -> &[u64] {
        self.targets.get_or_init(|| {
            let mut out = Vec::new();
            for (s, e) in self.img.code_ranges() {
                let Some(bytes) = self.img.bytes_at(s, e - s) else {
                    continue;
                };
                let mut decoder = Decoder::with_ip(64, bytes, s, DecoderOptions::NONE);
                let mut ins = Instruction::default();
                while decoder.can_decode() && !self.img.budget.spent() {
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
    pub(super) fn dest(&self, ins: &Instruction) -> Option<Dest> {
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
    pub(super) fn slot(&self, slot: u64) -> Option<Dest> {
        if let Some(&v) = self.img.relocs.get(&slot)
            && self.img.is_code(v)
        {
            return Some(Dest::Local(v));
        }
        self.imports.get(&slot).cloned().map(Dest::Import)
    }

    /// The GOT slot a PLT stub jumps through (`[endbr64;] [bnd] jmp [rip+slot]`).
    pub(super) fn plt_stub(&self, at: u64) -> Option<Dest> {
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

    pub(super) fn dest_name(&self, d: &Dest) -> String {
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
}

/// GOT slot → undefined dynamic symbol bound there (`R_X86_64_GLOB_DAT`, `JUMP_SLOT`, `64`).
pub(super) fn imports(data: &[u8]) -> HashMap<u64, String> {
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

/// Target of a direct near `jmp`/`jcc`/`call`.
pub(super) fn near_target(ins: &Instruction) -> Option<u64> {
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
