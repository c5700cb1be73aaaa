//! Struct member offsets of the running kernel, read from its BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The BPF programs are written in Rust without CO-RE relocations, so the one kernel offset
//! they need (where `task_struct` keeps the thread's `fs` base, to find thread-locals of the
//! target) is looked up here at startup and passed to them as data.

use std::collections::HashMap;

use thiserror::Error;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "reading {VMLINUX_BTF}: {0}; leakscope needs a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    Read(#[from] std::io::Error),
    #[error("{VMLINUX_BTF} is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

// BTF kinds (include/uapi/linux/btf.h).
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

struct Composite {
    name: String,
    members: Vec<Member>,
}

/// The structs and unions of a BTF blob, by type id.
pub struct KernelTypes {
    composites: HashMap<u32, Composite>,
    /// Type ids of typedef/const/volatile/... chains: id → referenced id.
    aliases: HashMap<u32, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl KernelTypes {
    pub fn load() -> Result<Self, BtfError> {
        Self::parse(&std::fs::read(VMLINUX_BTF)?)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;
        let name = |off: u32| -> String {
            strings
                .get(off as usize..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .unwrap_or_default()
        };

        let mut composites = HashMap::new();
        let mut aliases = HashMap::new();
        let mut at = 0usize;
        let mut id = 1u32;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let size_or_type = u32_at(types, at + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            // Bytes of kind-specific data after the common header.
            let extra = match kind {
                1 => 4,                    // INT
                3 => 12,                   // ARRAY
                4 | 5 => vlen * 12,        // STRUCT, UNION
                6 => vlen * 8,             // ENUM
                13 => vlen * 8,            // FUNC_PROTO
                14 => 4,                   // VAR
                15 => vlen * 12,           // DATASEC
                17 => 4,                   // DECL_TAG
                19 => vlen * 12,           // ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = at + m * 12;
                    let offset = u32_at(types, base + 8)?;
                    members.push(Member {
                        name: name(u32_at(types, base)?),
                        type_id: u32_at(types, base + 4)?,
                        // With kind_flag, the high 8 bits hold a bitfield size.
                        bit_offset: if kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        },
                    });
                }
                composites.insert(
                    id,
                    Composite {
                        name: name(name_off),
                        members,
                    },
                );
            } else if matches!(kind, 8..=11 | 18) {
                aliases.insert(id, size_or_type);
            }
            at += extra;
            id += 1;
        }
        Ok(Self {
            composites,
            aliases,
        })
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.aliases.get(&id) {
                Some(&next) => id = next,
                None => break,
            }
        }
        id
    }

    /// Byte offset of `path` (e.g. `["thread", "fsbase"]`) inside struct `root`. Members of
    /// anonymous unions/structs are searched through, as C does.
    pub fn offset_of(&self, root: &str, path: &[&str]) -> Result<u64, BtfError> {
        let missing = || BtfError::Missing(format!("{root}.{}", path.join(".")));
        let mut current = self
            .composites
            .iter()
            .find(|(_, c)| c.name == root && !c.members.is_empty())
            .map(|(&id, _)| id)
            .ok_or_else(missing)?;
        let mut bits = 0u64;
        for field in path {
            let (offset, type_id) = self.find_member(current, field, 0).ok_or_else(missing)?;
            bits += offset;
            current = self.resolve(type_id);
        }
        Ok(bits / 8)
    }

    fn find_member(&self, id: u32, field: &str, depth: u32) -> Option<(u64, u32)> {
        let composite = self.composites.get(&self.resolve(id))?;
        composite.members.iter().find_map(|m| {
            if m.name == field {
                Some((u64::from(m.bit_offset), m.type_id))
            } else if m.name.is_empty() && depth < 4 {
                self.find_member(m.type_id, field, depth + 1)
                    .map(|(off, ty)| (u64::from(m.bit_offset) + off, ty))
            } else {
                None
            }
        })
    }
}

/// Offset of the saved `fs` base (the thread pointer) in the running kernel's `task_struct`.
pub fn task_struct_fsbase_offset() -> Result<u64, BtfError> {
    KernelTypes::load()?.offset_of("task_struct", &["thread", "fsbase"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fsbase_in_this_kernel() {
        // Every machine this project runs on has BTF (see DEVELOPERS.md); a kernel without
        // it fails here with the message users would see.
        let offset = task_struct_fsbase_offset().expect("fsbase offset");
        assert!(
            offset > 0 && offset < 16 * 1024,
            "implausible offset {offset}"
        );
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(KernelTypes::parse(b"not btf at all").is_err());
    }
}
