//! Where a thread keeps the id of the tokio task it is polling, read from the target's code.
//!
//! While tokio polls a task it stores the task's `Id` in its thread-local `CONTEXT`
//! (`context::set_current_task_id`, called by `TaskIdGuard::enter` around every poll). An
//! allocation probe can read that slot to attribute memory to the task being polled, so no
//! hook on every poll is needed. The slot lives at a fixed offset from the thread pointer
//! (`fs` base) in the executable's static TLS block; that offset is read here from the code
//! that writes it:
//!
//! ```text
//! mov  %rdi,%rbx              ; the new id (arg 0)
//! mov  %fs:0x0,%rax           ; thread pointer
//! lea  -0x150(%rax),%rax      ; &CONTEXT
//! ...
//! mov  %rbx,0x30(%rax)        ; CONTEXT.current_task_id = id
//! ```
//!
//! `Option<Id>` is one word (`Id` wraps a `NonZeroU64`): 0 means "no task".

use std::collections::{HashMap, HashSet};

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use serde::Serialize;

use super::disasm;
use super::elf::Image;

/// Functions that store the current task id, in order of preference.
const WRITERS: [&str; 2] = [
    "tokio::runtime::context::set_current_task_id",
    "tokio::runtime::task::core::TaskIdGuard::enter",
];

/// The thread-local slot holding the id of the task being polled.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CurrentTaskSlot {
    /// Offset of the slot from the thread pointer (`fs` base); negative for static TLS.
    pub fs_offset: i64,
    /// The function whose code showed the offset.
    pub found_in: String,
}

/// Finds the slot, or `None` when no writer function exists or its code has another shape.
pub(crate) fn find_current_task_slot(img: &Image) -> Option<CurrentTaskSlot> {
    WRITERS.iter().find_map(|path| {
        img.find_functions(path).into_iter().find_map(|start| {
            let (start, end) = img.function_extent(start)?;
            let code = disasm::decode_range(img, start, end);
            slot_offset(&code).map(|fs_offset| CurrentTaskSlot {
                fs_offset,
                found_in: path.to_string(),
            })
        })
    })
}

/// Follows arg 0 (`rdi`) and thread-pointer-relative addresses through straight-line code
/// until arg 0 is stored relative to the thread pointer.
fn slot_offset(code: &[Instruction]) -> Option<i64> {
    let mut holds_arg: HashSet<Register> = HashSet::from([Register::RDI]);
    let mut fs_relative: HashMap<Register, i64> = HashMap::new();
    for instr in code {
        match instr.mnemonic() {
            Mnemonic::Mov if instr.op0_kind() == OpKind::Register => {
                let dst = instr.op0_register().full_register();
                fs_relative.remove(&dst);
                holds_arg.remove(&dst);
                match instr.op1_kind() {
                    OpKind::Register => {
                        let src = instr.op1_register().full_register();
                        if holds_arg.contains(&src) {
                            holds_arg.insert(dst);
                        }
                        if let Some(&off) = fs_relative.get(&src) {
                            fs_relative.insert(dst, off);
                        }
                    }
                    // `mov %fs:0x0, reg`: the thread pointer itself (x86_64 TLS ABI).
                    OpKind::Memory
                        if instr.segment_prefix() == Register::FS
                            && instr.memory_base() == Register::None
                            && instr.memory_index() == Register::None
                            && instr.memory_displacement64() == 0 =>
                    {
                        fs_relative.insert(dst, 0);
                    }
                    _ => {}
                }
            }
            Mnemonic::Mov
                if instr.op0_kind() == OpKind::Memory
                    && instr.op1_kind() == OpKind::Register
                    && instr.memory_index() == Register::None
                    && instr.op1_register().size() == 8 =>
            {
                let base = instr.memory_base().full_register();
                let src = instr.op1_register().full_register();
                if let Some(&off) = fs_relative.get(&base)
                    && holds_arg.contains(&src)
                {
                    return Some(off + instr.memory_displacement64() as i64);
                }
            }
            Mnemonic::Lea => {
                let dst = instr.op0_register().full_register();
                let base = instr.memory_base().full_register();
                let derived = (instr.memory_index() == Register::None)
                    .then(|| fs_relative.get(&base).copied())
                    .flatten()
                    .map(|off| off + instr.memory_displacement64() as i64);
                holds_arg.remove(&dst);
                match derived {
                    Some(off) => fs_relative.insert(dst, off),
                    None => fs_relative.remove(&dst),
                };
            }
            // Calls clobber caller-saved registers; what survives is callee-saved.
            Mnemonic::Call => {
                for reg in disasm::CALLER_SAVED {
                    holds_arg.remove(&reg);
                    fs_relative.remove(&reg);
                }
            }
            Mnemonic::Ret => break,
            _ => {
                // Any other write to a tracked register ends what we know about it.
                if instr.op_count() > 0 && instr.op0_kind() == OpKind::Register {
                    let dst = instr.op0_register().full_register();
                    if !matches!(
                        instr.mnemonic(),
                        Mnemonic::Cmp | Mnemonic::Test | Mnemonic::Push
                    ) {
                        holds_arg.remove(&dst);
                        fs_relative.remove(&dst);
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        let mut decoder =
            iced_x86::Decoder::with_ip(64, bytes, 0x1000, iced_x86::DecoderOptions::NONE);
        let mut out = Vec::new();
        while decoder.can_decode() {
            out.push(decoder.decode());
        }
        out
    }

    #[test]
    fn reads_the_offset_from_tokio_1_54_code() {
        // set_current_task_id as emitted for tokio 1.54 / 1.47 (see the module docs).
        let code = decode(&[
            0x41, 0x56, // push r14
            0x53, // push rbx
            0x50, // push rax
            0x48, 0x89, 0xfb, // mov rbx, rdi
            0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, // mov rax, fs:[0]
            0x48, 0x8d, 0x80, 0xb0, 0xfe, 0xff, 0xff, // lea rax, [rax-0x150]
            0x0f, 0xb6, 0x48, 0x48, // movzx ecx, byte [rax+0x48]
            0x48, 0x8b, 0x48, 0x30, // mov rcx, [rax+0x30]
            0x48, 0x89, 0x58, 0x30, // mov [rax+0x30], rbx
            0xc3,
        ]);
        assert_eq!(slot_offset(&code), Some(-0x150 + 0x30));
    }

    #[test]
    fn a_store_of_something_else_is_not_the_slot() {
        let code = decode(&[
            0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, // mov rax, fs:[0]
            0x48, 0x89, 0x48, 0x30, // mov [rax+0x30], rcx
            0xc3,
        ]);
        assert_eq!(slot_offset(&code), None);
    }

    #[test]
    fn finds_the_slot_in_both_fixtures() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
        for name in ["axum-app", "axum-app-lts"] {
            let path = root.join(name);
            assert!(
                path.exists(),
                "{} is missing: build fixtures first with `cargo xtask fixtures`",
                path.display()
            );
            let img = Image::load(&path).expect("load fixture");
            let slot = find_current_task_slot(&img).expect("current task slot");
            assert!(
                slot.fs_offset < 0,
                "{name}: static TLS lies below fs: {slot:?}"
            );
        }
    }
}
