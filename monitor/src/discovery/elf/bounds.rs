//! What an ELF file may claim, held to what it holds: discovery reads binaries it did not
//! build (any file a pid or a path names), so each size, segment and section is clamped to
//! the file's real bytes, with a warning, before anything is allocated or walked.

use std::path::Path;

use object::elf;

use super::super::{DiscoveryError, LoadSegment};
use super::{MAX_FILE_BYTES, SectionInfo};

/// Reads the whole file at `path`, refusing what is not a regular file (a FIFO or a device
/// would block or never end) and files over [`MAX_FILE_BYTES`], so that what discovery holds
/// in memory is bounded whatever a path names.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, DiscoveryError> {
    use std::io::Read as _;
    let io = |source| DiscoveryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(DiscoveryError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let too_large = |size| DiscoveryError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit: MAX_FILE_BYTES,
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    // The file may grow between the look and the read: read one byte past the limit to tell.
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(data.len() as u64));
    }
    Ok(data)
}

/// A `PT_LOAD` segment as far as the file backs it: its file range is cut at the end of the
/// file (the rest reads as unknown, not as zeroes), a memory size that wraps around the
/// address space is cut to the file size, and a segment whose file range itself wraps is
/// dropped. Each with a warning: the headers no longer describe the file.
pub(super) fn clamp_segment(
    mut segment: LoadSegment,
    file_len: u64,
    warnings: &mut Vec<String>,
) -> Option<LoadSegment> {
    let available = file_len.saturating_sub(segment.file_offset);
    if segment.file_size > available {
        warnings.push(format!(
            "the PT_LOAD segment at 0x{:x} claims 0x{:x} bytes from file offset 0x{:x}, but the \
             file ends 0x{available:x} bytes after it (truncated or corrupted): only those \
             are read",
            segment.vaddr, segment.file_size, segment.file_offset
        ));
        segment.file_size = available;
    }
    if segment.vaddr.checked_add(segment.file_size).is_none() {
        warnings.push(format!(
            "a PT_LOAD segment at 0x{:x} runs past the end of the address space: ignored \
             (corrupted program header)",
            segment.vaddr
        ));
        return None;
    }
    if segment.vaddr.checked_add(segment.mem_size).is_none() {
        warnings.push(format!(
            "the PT_LOAD segment at 0x{:x} claims 0x{:x} bytes of memory, past the end of the \
             address space: only its file bytes are used (corrupted program header)",
            segment.vaddr, segment.mem_size
        ));
        segment.mem_size = segment.file_size;
    }
    Some(segment)
}

/// An allocated section as far as the file backs it, like [`clamp_segment`]. `NOBITS`
/// sections (`.bss`) have no bytes in the file; they are only dropped when they wrap.
pub(super) fn clamp_section(
    mut section: SectionInfo,
    file_offset: u64,
    file_len: u64,
    warnings: &mut Vec<String>,
) -> Option<SectionInfo> {
    let available = file_len.saturating_sub(file_offset);
    if !section.nobits && section.size > available {
        warnings.push(format!(
            "section {} claims 0x{:x} bytes from file offset 0x{file_offset:x}, but the file \
             ends 0x{available:x} bytes after it (truncated or corrupted): only those are read",
            section.name, section.size
        ));
        section.size = available;
    }
    if section.vaddr.checked_add(section.size).is_none() {
        warnings.push(format!(
            "section {} at 0x{:x} runs past the end of the address space: ignored (corrupted \
             section header)",
            section.name, section.vaddr
        ));
        return None;
    }
    Some(section)
}

/// `ranges` sorted and merged where they overlap, and cut so that together they span at
/// most `limit` bytes. Each range already fits in the file, but many section headers can
/// claim the same bytes; a scan over the result then costs at most a pass over the file.
pub(super) fn bounded_ranges(mut ranges: Vec<(u64, u64)>, limit: u64) -> Vec<(u64, u64)> {
    ranges.retain(|&(lo, hi)| lo < hi);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    let mut left = limit;
    let mut out = Vec::with_capacity(merged.len());
    for (lo, hi) in merged {
        if left == 0 {
            break;
        }
        let hi = hi.min(lo + left);
        left -= hi - lo;
        out.push((lo, hi));
    }
    out
}

/// The contents of section `name` of the ELF file in `data`, unless it has none (`NOBITS`,
/// as the allocated sections of a debug file are).
/// Rejects anything that is not a 64-bit little-endian x86_64 ELF, before deeper parsing.
pub(crate) fn check_x86_64_elf(path: &Path, data: &[u8]) -> Result<(), DiscoveryError> {
    if data.len() < 20 || &data[..4] != b"\x7fELF" {
        return Err(DiscoveryError::NotElf {
            path: path.to_path_buf(),
        });
    }
    let class = data[4];
    let little = data[5] == elf::ELFDATA2LSB;
    let machine = if little {
        u16::from_le_bytes([data[18], data[19]])
    } else {
        u16::from_be_bytes([data[18], data[19]])
    };
    if class != elf::ELFCLASS64 || machine != elf::EM_X86_64 || !little {
        return Err(DiscoveryError::UnsupportedArch {
            path: path.to_path_buf(),
            machine: machine_name(machine, class),
        });
    }
    Ok(())
}

fn machine_name(machine: u16, class: u8) -> String {
    let arch = match machine {
        elf::EM_X86_64 => "x86_64",
        elf::EM_386 => "i386",
        elf::EM_AARCH64 => "aarch64",
        elf::EM_ARM => "arm",
        elf::EM_RISCV => "riscv",
        elf::EM_PPC64 => "ppc64",
        elf::EM_S390 => "s390x",
        elf::EM_LOONGARCH => "loongarch",
        _ => "unknown",
    };
    let bits = if class == elf::ELFCLASS32 { 32 } else { 64 };
    format!("{arch} ({bits}-bit, e_machine {machine})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_merged_and_bounded_by_the_file() {
        // Overlapping and repeated ranges (many headers claiming the same bytes) merge;
        // their total is cut at the limit, in address order.
        let ranges = vec![
            (0x3000, 0x3100),
            (0x1000, 0x1800),
            (0x1400, 0x2000),
            (0x1000, 0x2000),
        ];
        assert_eq!(
            bounded_ranges(ranges.clone(), 1 << 20),
            vec![(0x1000, 0x2000), (0x3000, 0x3100)]
        );
        assert_eq!(
            bounded_ranges(ranges, 0x1080),
            vec![(0x1000, 0x2000), (0x3000, 0x3080)]
        );
        assert_eq!(bounded_ranges(vec![(5, 5), (9, 2)], 100), vec![]);
    }

    #[test]
    fn segments_are_clamped_to_the_file() {
        let mut warnings = Vec::new();
        let claimed = LoadSegment {
            vaddr: 0x1000,
            mem_size: 1 << 40,
            file_offset: 0x100,
            file_size: 1 << 40,
            executable: false,
        };
        let clamped = clamp_segment(claimed, 0x500, &mut warnings).unwrap();
        assert_eq!((clamped.file_size, clamped.mem_size), (0x400, 1 << 40));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        // Memory past the end of the address space: only the file bytes are kept.
        let wraps = LoadSegment {
            vaddr: u64::MAX - 0x100,
            mem_size: 0x1000,
            file_size: 0x10,
            ..claimed
        };
        let kept = clamp_segment(wraps, 0x500, &mut warnings).unwrap();
        assert_eq!(kept.mem_size, 0x10);
        let gone = LoadSegment {
            vaddr: u64::MAX - 0x8,
            file_size: 0x100,
            ..claimed
        };
        assert_eq!(clamp_segment(gone, 0x500, &mut warnings), None);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }
}
