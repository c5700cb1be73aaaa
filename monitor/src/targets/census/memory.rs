//! Reading a running process's memory without stopping it: `process_vm_readv`, which
//! copies from the target's pages the way a `read` would and never writes, stops or
//! signals it. Every read is of a known, small size, so a census costs bounded work
//! whatever the target's memory holds.

/// Where the census reads from: a live process, or (in unit tests) a picture of one.
pub trait Memory {
    /// Fills `out` from `addr`; false when any part of it is not mapped (the target may
    /// unmap memory while it is read: that is a failed read, never an error to report).
    fn read(&self, addr: u64, out: &mut [u8]) -> bool;

    /// The little-endian words at `addr`, all or none.
    fn words<const N: usize>(&self, addr: u64) -> Option<[u64; N]> {
        let mut bytes = [[0u8; 8]; N];
        if !self.read(addr, bytes.as_flattened_mut()) {
            return None;
        }
        Some(bytes.map(u64::from_le_bytes))
    }

    fn word(&self, addr: u64) -> Option<u64> {
        self.words::<1>(addr).map(|[w]| w)
    }
}

/// The memory of process `pid`, read with `process_vm_readv` (the privilege it needs is
/// the one `/proc/PID/mem` needs: root, or `CAP_SYS_PTRACE` over the target).
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    pub pid: u32,
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        if out.is_empty() {
            return true;
        }
        let local = libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: out.len(),
        };
        // SAFETY: `local` describes `out`, which is valid for writes of its length; the
        // remote range is only read by the kernel, which checks it against the target's
        // mappings and fails (or stops short) on anything unmapped.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        n >= 0 && n as usize == out.len()
    }
}

/// A picture of a process's memory for unit tests: byte ranges at addresses.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct FakeMemory {
    regions: std::collections::BTreeMap<u64, Vec<u8>>,
}

#[cfg(test)]
impl FakeMemory {
    /// Writes `words` at `addr`, creating the region as needed (regions do not merge: write
    /// a structure within one region).
    pub fn put(&mut self, addr: u64, words: &[u64]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        if let Some((&start, region)) = self.regions.range_mut(..=addr).next_back()
            && addr + bytes.len() as u64 <= start + region.len() as u64
        {
            let at = (addr - start) as usize;
            region[at..at + bytes.len()].copy_from_slice(&bytes);
            return;
        }
        self.regions.insert(addr, bytes);
    }

    /// Zeroed memory `[addr, addr + len)`.
    pub fn zeroed(&mut self, addr: u64, len: usize) {
        self.regions.insert(addr, vec![0; len]);
    }
}

#[cfg(test)]
impl Memory for FakeMemory {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        let Some((&start, region)) = self.regions.range(..=addr).next_back() else {
            return false;
        };
        let at = (addr - start) as usize;
        match region.get(at..at + out.len()) {
            Some(bytes) => {
                out.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_memory_and_fails_on_unmapped() {
        let value: [u64; 2] = [0x1122_3344_5566_7788, 42];
        let memory = ProcessMemory {
            pid: std::process::id(),
        };
        assert_eq!(memory.words::<2>(value.as_ptr() as u64), Some(value));
        assert_eq!(memory.word(8), None, "page 0 is never mapped");
    }
}
