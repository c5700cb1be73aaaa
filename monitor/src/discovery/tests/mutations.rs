//! Hostile binaries: `analyze` on corrupted copies of a real fixture returns an answer or a
//! typed error, and never panics or hangs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

/// A small deterministic generator (xorshift64*): the same corruptions on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn corrupted_binaries_give_an_answer_or_an_error_never_a_panic() {
    let original = std::fs::read(fixture_path()).expect("the fixture");
    let dir = std::env::temp_dir().join(format!("leakscope-mutations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(0x1eac_5c0b_e000_0001);
    let (mut answers, mut errors) = (0, 0);
    for round in 0..24 {
        let mut data = original.clone();
        // Headers (ELF, program and section headers) are where parsers trust offsets;
        // the rest of the file is corrupted too, to reach the code walks.
        for _ in 0..16 {
            let at = if rng.next().is_multiple_of(2) {
                (rng.next() % 4096) as usize
            } else {
                (rng.next() % data.len() as u64) as usize
            };
            data[at] = rng.next() as u8;
        }
        if round % 6 == 5 {
            data.truncate((rng.next() % data.len() as u64) as usize);
        }
        let path: PathBuf = dir.join(format!("mutant-{round}"));
        std::fs::write(&path, &data).unwrap();
        let started = Instant::now();
        let result = std::panic::catch_unwind(|| analyze(&path).map(|image| image.vtables.len()));
        match result {
            Ok(Ok(_)) => answers += 1,
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!("round {round}: analyze panicked on {}", path.display()),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "round {round}: analyze took {:?}",
            started.elapsed()
        );
    }
    // The corpus reaches both the refusals and the full analysis.
    assert!(
        answers > 0 && errors > 0,
        "{answers} answers, {errors} errors"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
