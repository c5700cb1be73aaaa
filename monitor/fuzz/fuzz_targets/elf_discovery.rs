//! ELF and symbol discovery (`analyze_bytes`): the whole analysis `leakscope inspect` and the
//! daemon run on every executable, on any bytes. Seeded with the fixture binaries.
#![no_main]

use std::path::Path;

use leakscope::discovery::{Budget, analyze_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Unlimited: a slow input must show up as a libFuzzer timeout, not hide behind the
    // budget that guards the daemon.
    let _ = analyze_bytes(Path::new("fuzz-input"), data.to_vec(), Budget::unlimited());
});
