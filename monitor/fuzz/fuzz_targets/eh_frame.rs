//! The `.eh_frame` table compiler, then what the daemon does with a table: mark callsite
//! code, and walk a stack with it the way the BPF program does.
//!
//! Input: the section's link-time address (8 bytes, little-endian), then its contents.
//! `cargo xtask fuzz` seeds it with the fixtures' `.eh_frame` in that form.
#![no_main]

use leakscope::discovery::unwind_table::compile_eh_frame;
use libfuzzer_sys::fuzz_target;
use monitor_common::unwind::{MAX_FRAMES, Regs};

/// Where the input's bytes are mapped as the stack the walk reads.
const STACK: u64 = 0x7fff_0000_0000;

fuzz_target!(|data: &[u8]| {
    let Some((address, eh_frame)) = data.split_first_chunk::<8>() else {
        return;
    };
    let address = u64::from_le_bytes(*address);
    // Every FDE counts as code: the section headers' check is the caller's, not the
    // compiler's.
    let Ok((mut table, _)) = compile_eh_frame(eh_frame, address, &[(0, u64::MAX)]) else {
        return;
    };
    let (start, end) = table.text_range;
    let middle = start + (end - start) / 2;
    table.mark_callsite_code(&[(start, middle)]);
    for pc in [start, middle, end.saturating_sub(1), end] {
        let _ = table.find(pc);
        let read_u64 = |addr: u64| {
            let offset = usize::try_from(addr.checked_sub(STACK)?).ok()?;
            let word = data.get(offset..offset.checked_add(8)?)?;
            Some(u64::from_le_bytes(word.try_into().ok()?))
        };
        let regs = Regs {
            pc,
            rsp: STACK + 8,
            rbp: STACK + 16,
        };
        let mut frames = [0; MAX_FRAMES];
        let _ = table.unwind(&regs, 0, read_u64, &mut frames);
    }
});
