//! The libraries an executable needs (`DT_NEEDED`): the dynamic loader maps every one of
//! them before the program's own code runs, so once they are all mapped the process has
//! its allocator's library in place and heap probes can go in (see
//! `targets::loader_done`).

use object::elf;
use object::read::elf::{Dyn, FileHeader, SectionHeader};
use object::{Endianness, read::elf::ElfFile64};

/// Sonames listed as `DT_NEEDED`, in order; empty for a static executable or one whose
/// dynamic section cannot be read.
pub(crate) fn needed_libraries(data: &[u8]) -> Vec<String> {
    let Ok(file) = ElfFile64::<Endianness>::parse(data) else {
        return Vec::new();
    };
    let endian = file.endian();
    let Ok(sections) = file.elf_header().sections(endian, data) else {
        return Vec::new();
    };
    let Ok(Some((entries, link))) = sections.dynamic(endian, data) else {
        return Vec::new();
    };
    let Ok(strings) = sections.section(link).and_then(|s| s.strings(endian, data)) else {
        return Vec::new();
    };
    let Some(strings) = strings else {
        return Vec::new();
    };
    entries
        .iter()
        .take_while(|entry| entry.d_tag(endian) != u64::from(elf::DT_NULL))
        .filter(|entry| entry.d_tag(endian) == u64::from(elf::DT_NEEDED))
        .filter_map(|entry| {
            let name = entry.string(endian, strings).ok()?;
            Some(String::from_utf8_lossy(name).into_owned())
        })
        .collect()
}
