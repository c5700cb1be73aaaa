//! Hostile binaries: `analyze` on corrupted copies of a real fixture returns an answer or a
//! typed error, and never panics or hangs.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use object::read::elf::{ElfFile64, FileHeader as _};
use object::{Endianness, Object as _};

use super::*;

/// `analyze(path)` on another thread, or `None` when it has not returned after `limit`: a
/// hang fails the test instead of stalling the suite (the thread is left behind).
fn analyze_or_time_out(path: &Path, limit: Duration) -> Option<Result<TargetImage, String>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| analyze(&path));
        let _ = tx.send(result.map_err(|_| "panicked".to_string()));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(result)) => Some(result.map_err(|e| e.to_string())),
        Ok(Err(panic)) => Some(Err(panic)),
        Err(_) => None,
    }
}

/// File offset of the section header of `name` in the ELF file `data`.
fn section_header_offset(data: &[u8], name: &str) -> usize {
    let file = ElfFile64::<Endianness>::parse(data).expect("an ELF file");
    let header = file.elf_header();
    let endian = file.endian();
    let index = file
        .section_by_name(name)
        .unwrap_or_else(|| panic!("no section {name}"))
        .index()
        .0;
    header.e_shoff(endian) as usize + index * usize::from(header.e_shentsize(endian))
}

/// `sh_size` in an `Elf64_Shdr`.
const SH_SIZE: usize = 32;

/// Issue #19: a copy whose `.data.rel.ro` header claims a terabyte made `find_vtables` scan
/// it word by word, for hours. Sizes past the address space made the range wrap (a panic
/// in debug builds). Both now cost what the file holds.
#[test]
fn a_section_header_claiming_a_huge_range_does_not_hang() {
    let original = std::fs::read(fixture_path()).expect("the fixture");
    let at = section_header_offset(&original, ".data.rel.ro") + SH_SIZE;
    for (i, size) in [1u64 << 40, u64::MAX - 0x1000].into_iter().enumerate() {
        let mut data = original.clone();
        data[at..at + 8].copy_from_slice(&size.to_le_bytes());
        let path = temp_path(&format!("huge-section-{i}"));
        std::fs::write(&path, &data).unwrap();
        let started = Instant::now();
        let outcome = analyze_or_time_out(&path, Duration::from_secs(30));
        let _ = std::fs::remove_file(&path);
        let Some(result) = outcome else {
            panic!("sh_size 0x{size:x}: analyze did not return within 30 s");
        };
        // The rest of the file is intact: the vtables are still found, with a warning.
        let image = result.unwrap_or_else(|e| panic!("sh_size 0x{size:x}: {e}"));
        assert_eq!(
            image.vtables.len(),
            fixture().vtables.len(),
            "sh_size 0x{size:x}"
        );
        assert!(
            image.warnings.iter().any(|w| w.contains(".data.rel.ro")),
            "sh_size 0x{size:x}: no warning about the section: {:?}",
            image.warnings
        );
        eprintln!("sh_size 0x{size:x}: analysed in {:?}", started.elapsed());
    }
}

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
