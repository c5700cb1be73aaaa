//! A copy of the kernel's rules for a uprobe's probed instruction: rejected, emulated in the
//! trap handler, or single-stepped out of line (a second trap, ≈9.6 µs against ≈0.7 µs).
//! Kept in step with Linux 6.18 `arch/x86/kernel/uprobes.c`.

use super::placement::{Emulation, Treatment};

/// `good_insns_64` of Linux 6.18 `arch/x86/kernel/uprobes.c`: one row per high nibble of the
/// first opcode byte, one column per low nibble; 0 = the kernel rejects a uprobe there.
/// (Its `good_2byte_insns` table is never consulted in 64-bit mode, because `0f` itself is
/// marked good here and the first-byte test comes first.)
#[rustfmt::skip]
pub(super) const GOOD_INSNS_64: [[u8; 16]; 16] = [
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
pub(super) const X86_NOPS: [&[u8]; 8] = [
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

pub(super) fn good_insn(op: u8) -> bool {
    GOOD_INSNS_64[usize::from(op >> 4)][usize::from(op & 0xf)] == 1
}
