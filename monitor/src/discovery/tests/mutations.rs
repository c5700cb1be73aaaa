//! Hostile binaries: `analyze` on corrupted copies of a real fixture returns an answer or a
//! typed error, within a bound, and never panics or hangs (issue #19: one copy in 60 ran
//! for over five minutes).

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

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One corrupted copy of the fixture, and what was done to it (for failure messages).
struct Mutant {
    what: String,
    data: Vec<u8>,
}

/// Where the fixture's headers are, to corrupt their fields one by one.
struct Layout {
    /// (name, file offset of its `Elf64_Shdr`).
    sections: Vec<(String, usize)>,
    /// File offsets of the `Elf64_Phdr`s of `PT_LOAD` segments.
    loads: Vec<usize>,
    /// File offset and size of `.symtab`'s contents.
    symtab: (usize, usize),
    /// End of the program header table; the ELF and program headers lie before it.
    headers_end: usize,
    /// The section header table.
    section_headers: (usize, usize),
}

fn layout(data: &[u8]) -> Layout {
    let file = ElfFile64::<Endianness>::parse(data).expect("an ELF file");
    let endian = file.endian();
    let header = file.elf_header();
    let shoff = header.e_shoff(endian) as usize;
    let shentsize = usize::from(header.e_shentsize(endian));
    let phoff = header.e_phoff(endian) as usize;
    let phentsize = usize::from(header.e_phentsize(endian));
    let phnum = usize::from(header.e_phnum(endian));
    let sections = file
        .sections()
        .map(|s| {
            let name = s.name().unwrap_or("").to_string();
            (name, shoff + s.index().0 * shentsize)
        })
        .collect::<Vec<_>>();
    let loads = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&at| u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) == 1)
        .collect();
    let symtab = file
        .section_by_name(".symtab")
        .and_then(|s| s.file_range())
        .map(|(offset, size)| (offset as usize, size as usize))
        .expect("the fixture has a .symtab");
    Layout {
        section_headers: (shoff, sections.len() * shentsize),
        sections,
        loads,
        symtab,
        headers_end: phoff + phnum * phentsize,
    }
}

fn put_u64(data: &mut [u8], at: usize, value: u64) {
    data[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Offsets in an `Elf64_Shdr`, an `Elf64_Phdr` and an `Elf64_Sym`.
const SH_ADDR: usize = 16;
const SH_OFFSET: usize = 24;
const SH_LINK: usize = 40;
const SH_ENTSIZE: usize = 56;
const P_OFFSET: usize = 8;
const P_VADDR: usize = 16;
const P_FILESZ: usize = 32;
const P_MEMSZ: usize = 40;
const ST_VALUE: usize = 8;
const ST_SIZE: usize = 16;

/// The sweep: 70 corruptions of the fixture, each kind aimed at a place parsers trust.
fn mutants(original: &[u8]) -> Vec<Mutant> {
    let l = layout(original);
    let len = original.len();
    let extremes = [u64::MAX, 1 << 40, u64::MAX - 7, len as u64 + 1, 0];
    let mut rng = Rng(0x1eac_5c0b_e000_0001);
    let mut out = Vec::new();
    let mut mutant = |what: String, change: &mut dyn FnMut(&mut Vec<u8>)| {
        let mut data = original.to_vec();
        change(&mut data);
        out.push(Mutant { what, data });
    };

    // Section header fields set to extremes, in the sections each scan reads.
    let named = |name: &str| {
        l.sections
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no section {name}"))
            .1
    };
    let mut k = 0;
    for name in [".text", ".data.rel.ro", ".rodata", ".eh_frame", ".rela.dyn"] {
        for (field, field_name) in [(SH_SIZE, "size"), (SH_OFFSET, "offset"), (SH_ADDR, "addr")] {
            let value = extremes[k % extremes.len()];
            k += 1;
            mutant(format!("{name} sh_{field_name} = {value:#x}"), &mut |d| {
                put_u64(d, named(name) + field, value)
            });
        }
    }
    for name in [".symtab", ".dynsym"] {
        mutant(format!("{name} sh_entsize = 1"), &mut |d| {
            put_u64(d, named(name) + SH_ENTSIZE, 1)
        });
        mutant(format!("{name} sh_link = 0xffff"), &mut |d| {
            d[named(name) + SH_LINK..][..4].copy_from_slice(&0xffffu32.to_le_bytes())
        });
    }
    // Every section claiming the whole address space at once.
    mutant("every section's sh_size = 2^40".to_string(), &mut |d| {
        for (_, at) in &l.sections {
            put_u64(d, at + SH_SIZE, 1 << 40);
        }
    });

    // Program header fields of the PT_LOAD segments.
    for (i, &at) in l.loads.iter().enumerate() {
        for (j, (field, field_name)) in [
            (P_FILESZ, "filesz"),
            (P_MEMSZ, "memsz"),
            (P_OFFSET, "offset"),
            (P_VADDR, "vaddr"),
        ]
        .into_iter()
        .enumerate()
        {
            if (i + j) % 2 == 1 {
                continue;
            }
            let value = extremes[(i + j) % extremes.len()];
            mutant(
                format!("PT_LOAD #{i} p_{field_name} = {value:#x}"),
                &mut |d| put_u64(d, at + field, value),
            );
        }
    }

    // Symbols: sizes and addresses that wrap or cover everything.
    let (symtab, symtab_len) = l.symtab;
    let symbols = (symtab..symtab + symtab_len).step_by(24);
    for (what, field, value, every) in [
        ("every symbol's st_size = u64::MAX", ST_SIZE, u64::MAX, 1),
        ("every symbol's st_size = 2^30", ST_SIZE, 1 << 30, 1),
        ("every 7th symbol's st_size = 2^40", ST_SIZE, 1 << 40, 7),
        (
            "every 3rd symbol's st_value = u64::MAX - 8",
            ST_VALUE,
            u64::MAX - 8,
            3,
        ),
    ] {
        mutant(what.to_string(), &mut |d| {
            for at in symbols.clone().step_by(every) {
                put_u64(d, at + field, value);
            }
        });
    }

    // Truncations: inside each header, at the section header table, and through the body.
    let (shoff, shlen) = l.section_headers;
    for at in [
        0,
        1,
        20,
        63,
        64,
        l.headers_end - 1,
        len / 8,
        len / 4,
        len / 2,
        3 * len / 4,
        symtab + symtab_len / 2,
        shoff,
        shoff + shlen / 2,
        len - 1,
    ] {
        mutant(format!("truncated to {at} bytes"), &mut |d| d.truncate(at));
    }

    // Random bytes in the ELF and program headers and in the section header table.
    for round in 0..12 {
        let flips: Vec<(usize, u8)> = (0..4)
            .map(|_| {
                let at = if rng.next().is_multiple_of(2) {
                    rng.below(l.headers_end)
                } else {
                    shoff + rng.below(shlen)
                };
                (at, rng.next() as u8)
            })
            .collect();
        mutant(format!("header bytes #{round}: {flips:x?}"), &mut |d| {
            for &(at, byte) in &flips {
                d[at] = byte;
            }
        });
    }

    // Random bytes anywhere, half in the first page (the original 24-round sweep's kind),
    // some copies also truncated.
    for round in 0..12 {
        let flips: Vec<(usize, u8)> = (0..16)
            .map(|_| {
                let at = if rng.next().is_multiple_of(2) {
                    rng.below(4096)
                } else {
                    rng.below(len)
                };
                (at, rng.next() as u8)
            })
            .collect();
        let cut = (round % 4 == 3).then(|| rng.below(len));
        mutant(format!("random bytes #{round}, cut at {cut:?}"), &mut |d| {
            for &(at, byte) in &flips {
                d[at] = byte;
            }
            if let Some(cut) = cut {
                d.truncate(cut);
            }
        });
    }
    out
}

/// How long one corrupted copy may take. The intact fixture takes about 0.5 s in a debug
/// build; the budget that guards the daemon is 30 s. Clamping must keep every copy near the
/// intact cost, far below both.
const PER_MUTANT: Duration = Duration::from_secs(10);

#[test]
fn corrupted_binaries_give_an_answer_or_an_error_within_a_bound_never_a_panic() {
    let original = std::fs::read(fixture_path()).expect("the fixture");
    let mutants = mutants(&original);
    assert!(mutants.len() >= 60, "{} mutants", mutants.len());
    let started = Instant::now();
    let (mut answers, mut errors, mut slowest) = (0, 0, (Duration::ZERO, String::new()));
    for (i, Mutant { what, data }) in mutants.into_iter().enumerate() {
        let path = PathBuf::from(format!("mutant-{i}"));
        let began = Instant::now();
        let result = std::panic::catch_unwind(|| {
            analyze_bytes(&path, data, Budget::new(ANALYSIS_BUDGET)).map(|t| t.vtables.len())
        });
        let took = began.elapsed();
        match result {
            Ok(Ok(_)) => answers += 1,
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!("mutant {i} ({what}): analyze panicked"),
        }
        assert!(took < PER_MUTANT, "mutant {i} ({what}): took {took:?}");
        if took > slowest.0 {
            slowest = (took, what);
        }
    }
    eprintln!(
        "{answers} answers, {errors} errors in {:?}; slowest {:?} ({})",
        started.elapsed(),
        slowest.0,
        slowest.1
    );
    // The sweep reaches both the refusals and the full analysis.
    assert!(
        answers > 0 && errors > 0,
        "{answers} answers, {errors} errors"
    );
}
