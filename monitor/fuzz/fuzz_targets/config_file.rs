//! The daemon's config file parser, on any text. Seeded with the README's example.
#![no_main]

use std::path::Path;

use leakscope::daemon::config_file::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse(Path::new("/etc/leakscope/leakscope.toml"), text);
    }
});
