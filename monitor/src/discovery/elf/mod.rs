//! ELF access for discovery: load segments (vaddr ↔ file offset), relocation-aware pointer
//! reads, function symbols (all names per address) and the GNU build id.
//!
//! Why relocations matter: the targets are PIE executables linked by rust-lld, which leaves
//! the pointer slots of `.data.rel.ro` (task vtables) and `.got` zero in the file and puts
//! the real link-time value in an `R_X86_64_RELATIVE` addend. Reading the file word alone
//! would find no vtables at all. Packed `DT_RELR` relocations use the in-file word as the
//! addend, so "relocation addend, else in-file word" is right for both schemes.
//!
//! A stripped binary can be paired with its separate debug file ([`Image::attach_debug`]):
//! names and function extents then come from the debug file's `.symtab`, DWARF sections
//! from the debug file, while code bytes, data, relocations and file offsets stay the
//! binary's own (a debug file's `.text` and `.data.rel.ro` are `NOBITS`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, SectionHeader, Sym};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SymbolKind};

mod bounds;

use bounds::{bounded_ranges, clamp_section, clamp_segment};
pub(crate) use bounds::{check_x86_64_elf, read_bounded};

use super::budget::Budget;
use super::name_index::NameIndex;
use super::{DiscoveryError, LoadSegment};

/// A function known from the symbol tables.
#[derive(Debug, Clone, Default)]
pub(crate) struct FnInfo {
    /// Largest `st_size` seen for this address (0 if unknown).
    pub size: u64,
    /// Every distinct demangled, cleaned name at this address. Identical code folding makes
    /// one body answer to many names, and any of them may be the one that matters.
    pub names: Vec<String>,
}

/// An allocated section, kept for scanning and for code/data classification.
#[derive(Debug, Clone)]
pub(crate) struct SectionInfo {
    pub name: String,
    pub vaddr: u64,
    pub size: u64,
    pub executable: bool,
    pub nobits: bool,
}

/// The parsed target, owning its bytes.
pub(crate) struct Image {
    pub data: Vec<u8>,
    pub segments: Vec<LoadSegment>,
    pub sections: Vec<SectionInfo>,
    /// vaddr → value written by the dynamic loader (RELATIVE addends, resolved GLOB_DAT, …).
    pub relocs: HashMap<u64, u64>,
    /// Function start → names/size, from `.symtab` and `.dynsym`.
    pub functions: BTreeMap<u64, FnInfo>,
    pub build_id: Option<String>,
    /// A symbol table was read, from the file itself or from an attached debug file.
    pub has_symtab: bool,
    /// Bytes of the separate debug file attached by [`Image::attach_debug`], read for the
    /// sections the binary itself lacks (DWARF).
    pub debug_data: Option<Vec<u8>>,
    /// What the headers claimed that the file does not hold (clamped or dropped), for
    /// [`super::TargetImage::warnings`].
    pub warnings: Vec<String>,
    /// The time the analysis of this image may take: every scan over it stops at its next
    /// step once it is spent (see [`super::budget`]). Unlimited unless set.
    pub budget: Budget,
    /// `functions` by name, built on first lookup (see [`super::name_index`]); reset
    /// where `functions` is replaced.
    pub name_index: OnceLock<NameIndex>,
}

/// The largest file discovery reads (an executable, a debug file, a library): the whole
/// file is held in memory. A Rust service with full debug info is a few hundred MiB.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 30;

/// The largest `st_size` taken as a function's extent. Functions are decoded whole, once per
/// scan that visits them; the largest in the fixtures are tens of KiB. A larger size is a
/// corrupted symbol, and the function is bounded by the next symbol instead.
pub(crate) const MAX_FUNCTION_BYTES: u64 = 1 << 20;

const R_X86_64_64: u32 = 1;
const R_X86_64_GLOB_DAT: u32 = 6;
const R_X86_64_JUMP_SLOT: u32 = 7;
const R_X86_64_RELATIVE: u32 = 8;

fn malformed(path: &Path, what: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Malformed {
        path: path.to_path_buf(),
        reason: what.to_string(),
    }
}

impl Image {
    /// Reads and parses `path`, rejecting anything that is not a 64-bit little-endian
    /// x86_64 ELF before any deeper parsing happens.
    pub fn load(path: &Path) -> Result<Self, DiscoveryError> {
        Self::parse(path, read_bounded(path)?)
    }

    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Self, DiscoveryError> {
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(DiscoveryError::TooLarge {
                path: path.to_path_buf(),
                size: data.len() as u64,
                limit: MAX_FILE_BYTES,
            });
        }
        check_x86_64_elf(path, &data)?;
        let file = ElfFile64::<Endianness>::parse(&*data).map_err(|e| malformed(path, e))?;
        let endian = file.endian();
        let raw = &*data;

        let mut warnings = Vec::new();
        let mut segments = Vec::new();
        for ph in file.elf_program_headers() {
            if ph.p_type(endian) == elf::PT_LOAD {
                let segment = LoadSegment {
                    vaddr: ph.p_vaddr(endian),
                    mem_size: ph.p_memsz(endian),
                    file_offset: ph.p_offset(endian),
                    file_size: ph.p_filesz(endian),
                    executable: ph.p_flags(endian) & elf::PF_X != 0,
                };
                if let Some(segment) = clamp_segment(segment, data.len() as u64, &mut warnings) {
                    segments.push(segment);
                }
            }
        }
        if segments.is_empty() {
            return Err(malformed(path, "no usable PT_LOAD segments"));
        }

        let mut sections = Vec::new();
        for section in file.sections() {
            let sh = section.elf_section_header();
            let flags = sh.sh_flags(endian);
            if flags & u64::from(elf::SHF_ALLOC) == 0 {
                continue;
            }
            let info = SectionInfo {
                name: section.name().unwrap_or("").to_string(),
                vaddr: sh.sh_addr(endian),
                size: sh.sh_size(endian),
                executable: flags & u64::from(elf::SHF_EXECINSTR) != 0,
                nobits: sh.sh_type(endian) == elf::SHT_NOBITS,
            };
            let file_offset = sh.sh_offset(endian);
            if let Some(info) = clamp_section(info, file_offset, data.len() as u64, &mut warnings) {
                sections.push(info);
            }
        }

        // Dynamic symbol values, by index, to resolve symbol-based relocations that point
        // at definitions inside the executable itself.
        let header = file.elf_header();
        let section_table = header
            .sections(endian, raw)
            .map_err(|e| malformed(path, e))?;
        let mut relocs = HashMap::new();
        for sh in section_table.iter() {
            if sh.sh_type(endian) != elf::SHT_RELA {
                continue;
            }
            let Ok(relas) = sh.data_as_array::<elf::Rela64<Endianness>, _>(endian, raw) else {
                continue;
            };
            let symbols = section_table
                .symbol_table_by_index(endian, raw, sh.link(endian))
                .ok();
            for rela in relas {
                let offset = rela.r_offset.get(endian);
                let addend = rela.r_addend.get(endian);
                let value = match rela.r_type(endian, false) {
                    R_X86_64_RELATIVE => Some(addend as u64),
                    kind @ (R_X86_64_64 | R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT) => {
                        let sym_index = rela.r_sym(endian, false);
                        symbols
                            .as_ref()
                            .and_then(|t| t.symbol(object::SymbolIndex(sym_index as usize)).ok())
                            .filter(|s| {
                                s.st_shndx(endian) != elf::SHN_UNDEF && s.st_value(endian) != 0
                            })
                            .map(|s| {
                                let v = s.st_value(endian);
                                if kind == R_X86_64_64 {
                                    v.wrapping_add(addend as u64)
                                } else {
                                    v
                                }
                            })
                    }
                    _ => None,
                };
                if let Some(v) = value {
                    relocs.insert(offset, v);
                }
            }
        }

        let mut functions: BTreeMap<u64, FnInfo> = BTreeMap::new();
        // An empty `.symtab` is as good as none.
        let has_symtab = add_functions(&mut functions, file.symbols());
        add_functions(&mut functions, file.dynamic_symbols());
        let build_id = file_build_id(&file);

        drop(file);
        Ok(Image {
            data,
            segments,
            sections,
            relocs,
            functions,
            build_id,
            has_symtab,
            debug_data: None,
            warnings,
            budget: Budget::unlimited(),
            name_index: OnceLock::new(),
        })
    }

    /// Takes names, function extents and DWARF from `data`, the separate debug file of this
    /// binary read from `path` (checking that it belongs to this binary is the caller's
    /// job). The functions are rebuilt from the debug file's `.symtab` first, then this
    /// file's own `.symtab` and `.dynsym`: the order [`Image::parse`] reads an unstripped
    /// file in, so the result is what the unstripped binary gives. Returns whether the
    /// debug file had a symbol table.
    pub fn attach_debug(&mut self, path: &Path, data: Vec<u8>) -> Result<bool, DiscoveryError> {
        check_x86_64_elf(path, &data)?;
        let debug = ElfFile64::<Endianness>::parse(&*data).map_err(|e| malformed(path, e))?;
        let own = ElfFile64::<Endianness>::parse(&*self.data).map_err(|e| malformed(path, e))?;
        let mut functions = BTreeMap::new();
        let debug_symtab = add_functions(&mut functions, debug.symbols());
        let own_symtab = add_functions(&mut functions, own.symbols());
        add_functions(&mut functions, own.dynamic_symbols());
        drop((debug, own));
        self.functions = functions;
        self.name_index = OnceLock::new();
        self.has_symtab = debug_symtab || own_symtab;
        self.debug_data = Some(data);
        Ok(debug_symtab)
    }

    /// The `.gnu_debuglink` entry: the debug file's name and the CRC32 of its contents.
    pub fn gnu_debuglink(&self) -> Option<(String, u32)> {
        let file = ElfFile64::<Endianness>::parse(&*self.data).ok()?;
        let (name, crc) = file.gnu_debuglink().ok().flatten()?;
        let name = std::str::from_utf8(name).ok()?;
        (!name.is_empty()).then(|| (name.to_string(), crc))
    }

    /// File offset of a link-time virtual address, through the `PT_LOAD` segment that maps
    /// it from the file (uprobes attach by file offset).
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        segment_file_offset(&self.segments, vaddr)
    }

    /// `len` bytes at `vaddr` as stored in the file.
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let seg = self.segments.iter().find(|s| {
            vaddr >= s.vaddr
                && vaddr
                    .checked_add(len)
                    .is_some_and(|end| end <= s.vaddr.saturating_add(s.file_size))
        })?;
        let start = usize::try_from(vaddr - seg.vaddr + seg.file_offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }

    /// The 64-bit value the process sees at `vaddr` after relocation, if it is knowable:
    /// a relocation's value first, else the in-file word (zero-fill past `p_filesz`).
    pub fn read_word(&self, vaddr: u64) -> Option<u64> {
        if let Some(&v) = self.relocs.get(&vaddr) {
            return Some(v);
        }
        if let Some(b) = self.bytes_at(vaddr, 8) {
            return Some(u64::from_le_bytes(b.try_into().ok()?));
        }
        // .bss-like tail of a segment: zero at startup.
        let end = vaddr.checked_add(8)?;
        self.segments
            .iter()
            .any(|s| vaddr >= s.vaddr && end <= s.vaddr.saturating_add(s.mem_size))
            .then_some(0)
    }

    /// Link-time address of the data symbol (a `static`) whose demangled name, without its
    /// hash, is `name`: from the debug file's symbol table when there is one, else this
    /// file's.
    pub fn data_symbol(&self, name: &str) -> Option<u64> {
        let find = |data: &[u8]| -> Option<u64> {
            let file = ElfFile64::<Endianness>::parse(data).ok()?;
            file.symbols()
                .filter(|sym| sym.kind() == SymbolKind::Data && !sym.is_undefined())
                .find(|sym| sym.name().is_ok_and(|n| super::naming::demangle(n) == name))
                .map(|sym| sym.address())
        };
        self.debug_data
            .as_deref()
            .and_then(find)
            .or_else(|| find(&self.data))
    }

    /// True when `vaddr` lies in an executable load segment.
    pub fn is_code(&self, vaddr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| s.executable && vaddr >= s.vaddr && vaddr - s.vaddr < s.file_size)
    }

    /// Address ranges to scan for task vtables: allocated, non-executable sections with file
    /// contents (`.data.rel.ro` in PIE builds, `.rodata`/`.data` otherwise), or the
    /// non-executable load segments when section headers are gone. Sorted, disjoint, and
    /// within the file's bytes in total (see [`bounded_ranges`]).
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges(false, |s| {
            s.size >= 80 && !s.name.starts_with(".rela") && !s.name.starts_with(".eh_frame")
        })
    }

    /// Executable ranges (for pattern scans in stripped binaries), bounded like
    /// [`Image::data_ranges`].
    pub fn code_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges(true, |_| true)
    }

    /// The sections with contents that are `executable` (or not) and pass `keep`, or when
    /// there are none (section headers gone), the load segments that are; bounded by the
    /// file's bytes.
    fn ranges(&self, executable: bool, keep: impl Fn(&SectionInfo) -> bool) -> Vec<(u64, u64)> {
        let from_sections: Vec<(u64, u64)> = self
            .sections
            .iter()
            .filter(|s| s.executable == executable && !s.nobits && keep(s))
            .map(|s| (s.vaddr, s.vaddr + s.size))
            .collect();
        if !from_sections.is_empty() {
            return bounded_ranges(from_sections, self.data.len() as u64);
        }
        let from_segments = self
            .segments
            .iter()
            .filter(|s| s.executable == executable)
            .map(|s| (s.vaddr, s.vaddr + s.file_size))
            .collect();
        bounded_ranges(from_segments, self.data.len() as u64)
    }

    /// Names of the function starting exactly at `addr` (empty if unknown).
    pub fn names_at(&self, addr: u64) -> &[String] {
        self.functions
            .get(&addr)
            .map(|f| f.names.as_slice())
            .unwrap_or(&[])
    }

    /// `[start, end)` of the function starting at `start`: its symbol size, else up to the
    /// next symbol (bounded to 64 KiB), else `None`.
    pub fn function_extent(&self, start: u64) -> Option<(u64, u64)> {
        let info = self.functions.get(&start)?;
        // `add_functions` keeps only sizes that fit (see MAX_FUNCTION_BYTES).
        if info.size > 0 {
            return Some((start, start + info.size));
        }
        let limit = start.saturating_add(0x1_0000);
        let next = self
            .functions
            .range(start.saturating_add(1)..)
            .next()
            .map(|(&a, _)| a)
            .unwrap_or(limit);
        Some((start, next.min(limit)))
    }

    /// All function starts whose generic-free demangled name equals `path`, ascending.
    pub fn find_functions(&self, path: &str) -> Vec<u64> {
        self.name_index()
            .named_without_generics(&self.functions, path)
    }

    /// All function starts one of whose names is exactly `name`, ascending.
    pub fn functions_named(&self, name: &str) -> Vec<u64> {
        self.name_index().named(&self.functions, name)
    }

    fn name_index(&self) -> &NameIndex {
        self.name_index
            .get_or_init(|| NameIndex::build(&self.functions))
    }

    /// Loads a DWARF section by name, decompressed when needed: the file's own section, or
    /// when the file has none with contents (stripped), the attached debug file's.
    pub fn section_data(&self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        let own = section_with_contents(&self.data, name);
        if own.is_some() {
            return own;
        }
        section_with_contents(self.debug_data.as_deref()?, name)
    }
}

fn section_with_contents<'d>(data: &'d [u8], name: &str) -> Option<std::borrow::Cow<'d, [u8]>> {
    let file = ElfFile64::<Endianness>::parse(data).ok()?;
    let section = file.section_by_name(name)?;
    if section.elf_section_header().sh_type(file.endian()) == elf::SHT_NOBITS {
        return None;
    }
    // The returned data borrows `data` (the parser's input), not `file`.
    section.uncompressed_data().ok()
}

/// Adds the defined functions among `symbols` to `functions`; returns whether there were any
/// symbols at all.
fn add_functions<'d: 'f, 'f>(
    functions: &mut BTreeMap<u64, FnInfo>,
    symbols: impl Iterator<Item = object::read::elf::ElfSymbol64<'d, 'f, Endianness>>,
) -> bool {
    let mut any = false;
    for sym in symbols {
        any = true;
        if sym.kind() != SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if name.is_empty() {
            continue;
        }
        let entry = functions.entry(sym.address()).or_default();
        // A size past the address space or beyond any real function is a corrupted symbol:
        // unknown instead (the extent then ends at the next symbol).
        let size = sym.size();
        if size <= MAX_FUNCTION_BYTES && sym.address().checked_add(size).is_some() {
            entry.size = entry.size.max(size);
        }
        let demangled = super::naming::demangle(name);
        if !entry.names.contains(&demangled) {
            entry.names.push(demangled);
        }
    }
    any
}

/// Hex of the file's `NT_GNU_BUILD_ID`.
fn file_build_id(file: &ElfFile64<'_, Endianness>) -> Option<String> {
    file.build_id()
        .ok()
        .flatten()
        .filter(|id| !id.is_empty())
        .map(|id| id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Hex of the `NT_GNU_BUILD_ID` of the x86_64 ELF file in `data` (`None` if it has none or
/// is no such file).
pub(crate) fn build_id_of(data: &[u8]) -> Option<String> {
    check_x86_64_elf(Path::new(""), data).ok()?;
    file_build_id(&ElfFile64::<Endianness>::parse(data).ok()?)
}

/// An image holding only `code` mapped executable at `vaddr`, for disassembly tests.
#[cfg(test)]
pub(crate) fn code_image(vaddr: u64, code: &[u8]) -> Image {
    Image {
        data: code.to_vec(),
        segments: vec![LoadSegment {
            vaddr,
            mem_size: code.len() as u64,
            file_offset: 0,
            file_size: code.len() as u64,
            executable: true,
        }],
        sections: Vec::new(),
        relocs: HashMap::new(),
        functions: BTreeMap::new(),
        build_id: None,
        has_symtab: false,
        debug_data: None,
        warnings: Vec::new(),
        budget: Budget::unlimited(),
        name_index: OnceLock::new(),
    }
}

/// Segment-table lookup shared with [`super::TargetImage::file_offset`].
pub(crate) fn segment_file_offset(segments: &[LoadSegment], vaddr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.file_size)
        .map(|s| vaddr - s.vaddr + s.file_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(vaddr: u64, off: u64, size: u64) -> LoadSegment {
        LoadSegment {
            vaddr,
            mem_size: size,
            file_offset: off,
            file_size: size,
            executable: false,
        }
    }

    fn image_with(data: Vec<u8>, relocs: HashMap<u64, u64>) -> Image {
        Image {
            data,
            segments: vec![seg(0x1000, 0, 0x40)],
            sections: Vec::new(),
            relocs,
            functions: BTreeMap::new(),
            build_id: None,
            has_symtab: false,
            debug_data: None,
            warnings: Vec::new(),
            budget: Budget::unlimited(),
            name_index: OnceLock::new(),
        }
    }

    #[test]
    fn relocation_value_wins_over_file_word() {
        let mut data = vec![0u8; 0x40];
        data[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        data[16..24].copy_from_slice(&0x5555u64.to_le_bytes());
        let relocs = HashMap::from([(0x1008, 0xdead_beef), (0x1000, 0x42)]);
        let img = image_with(data, relocs);
        assert_eq!(img.read_word(0x1000), Some(0x42));
        assert_eq!(img.read_word(0x1008), Some(0xdead_beef));
        // No relocation: in-file word (also how DT_RELR implicit addends read).
        assert_eq!(img.read_word(0x1010), Some(0x5555));
        assert_eq!(img.read_word(0x2000), None);
        assert_eq!(img.read_word(0x103c), None, "straddles the segment end");
    }

    #[test]
    fn file_offsets_go_through_the_containing_segment() {
        let segs = vec![seg(0, 0, 0x1000), seg(0x68470, 0x67470, 0x100)];
        assert_eq!(segment_file_offset(&segs, 0x68480), Some(0x67480));
        assert_eq!(segment_file_offset(&segs, 0x10), Some(0x10));
        assert_eq!(segment_file_offset(&segs, 0x68570), None);
    }

    #[test]
    fn rejects_non_elf_and_foreign_arch() {
        let p = Path::new("/x");
        assert!(matches!(
            Image::parse(p, b"#!/bin/sh\necho hi\n\n\n\n".to_vec()),
            Err(DiscoveryError::NotElf { .. })
        ));
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = elf::ELFCLASS64;
        hdr[5] = elf::ELFDATA2LSB;
        hdr[18..20].copy_from_slice(&elf::EM_AARCH64.to_le_bytes());
        match Image::parse(p, hdr.clone()) {
            Err(DiscoveryError::UnsupportedArch { machine, .. }) => {
                assert!(machine.starts_with("aarch64"), "{machine}")
            }
            other => panic!("unexpected {:?}", other.err()),
        }
        hdr[18..20].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        assert!(matches!(
            Image::parse(p, hdr),
            Err(DiscoveryError::Malformed { .. })
        ));
    }
}
