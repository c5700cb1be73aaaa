//! The symbol-name parsers (demangling, generic arguments, site labels), on any text: a
//! corrupted string table can name a symbol anything, and every name of a binary goes
//! through them. Fast, so it reaches what the whole-binary target rarely mutates into.
//!
//! Input: two names separated by a NUL byte. `cargo xtask fuzz` seeds it with the
//! fixture's symbol names.
#![no_main]

use leakscope::discovery::fuzzing::symbol_names;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (name, other) = text.split_once('\0').unwrap_or((text, ""));
    let _ = symbol_names(name, other);
});
