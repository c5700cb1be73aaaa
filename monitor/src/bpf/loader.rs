//! Loads the embedded eBPF object: the programs verified by the kernel, the maps created at
//! the sizes the chosen heap mode needs, and the maps userspace reads taken out of it.

use aya::maps::{MapData, RingBuf};
use aya::programs::raw_trace_point::RawTracePointLinkId;
use aya::programs::{ProgramError, RawTracePoint, UProbe};
use aya::{Ebpf, EbpfError, EbpfLoader};
use monitor_common::names::{map, program};
use thiserror::Error;

use super::plan::PlanError;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "loading the eBPF programs was refused ({source}); run leakscope as root, or grant \
         CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE (kernels with the CVE-2025-38466 fix also \
         need CAP_SYS_ADMIN to create uprobes)"
    )]
    Load { source: Box<EbpfError> },
    #[error("the eBPF program was rejected by the kernel: {0}")]
    Program(Box<ProgramError>),
    #[error("the eBPF object lacks {0}: the build is broken, rebuild leakscope")]
    Missing(&'static str),
    #[error("turning on the kernel's BPF run-time statistics: {0}")]
    Stats(aya::sys::SyscallError),
    #[error("the eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "attaching to {symbol} at file offset {offset:#x} of {target}: {source}; a uprobe \
         needs root or CAP_SYS_ADMIN/CAP_PERFMON"
    )]
    Attach {
        symbol: String,
        offset: u64,
        target: String,
        source: Box<ProgramError>,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "{RING_BYTES_ENV}={0:?} is not a ring size: give a power of two of at least 4096 \
         (bytes), or unset it (it is for tests that overflow the rings on purpose)"
    )]
    RingSize(String),
}

/// Test-only: when set, the task and heap ring buffers are created with this many bytes
/// instead of `monitor_common::RINGBUF_BYTES`/`HEAP_RINGBUF_BYTES`, so a test can overflow
/// them under a load the daemon otherwise keeps up with, and check that the loss is counted
/// and no verdict is made from what is left.
pub const RING_BYTES_ENV: &str = "LEAKSCOPE_TEST_RING_BYTES";

/// The ring size [`RING_BYTES_ENV`] asks for, if set. A ring buffer's size must be a power
/// of two and a multiple of the page size (the kernel refuses others).
fn ring_bytes_override() -> Result<Option<u32>, ProbeError> {
    let Ok(value) = std::env::var(RING_BYTES_ENV) else {
        return Ok(None);
    };
    match value.trim().parse::<u32>() {
        Ok(bytes) if bytes.is_power_of_two() && bytes >= 4096 => Ok(Some(bytes)),
        _ => Err(ProbeError::RingSize(value)),
    }
}

impl From<ProgramError> for ProbeError {
    fn from(err: ProgramError) -> Self {
        Self::Program(Box::new(err))
    }
}

/// The loaded programs and their maps, shared by every attached process.
pub struct Probes {
    pub(super) ebpf: Ebpf,
}

/// How large the heap-mode maps are created: kernel memory is allocated when the maps are,
/// whether or not a heap program ever runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapMaps {
    /// No heap tracking: every heap map at its smallest (about 79 MB of kernel memory
    /// saved, measured with bpftool).
    Off,
    /// Tracking, with room for this many outstanding blocks in the kernel (about 120 bytes
    /// each, preallocated), and a heap ring of `ring_bytes` (see
    /// [`monitor_common::HEAP_GROUP_RINGBUF_BYTES`]).
    Tracking { max_blocks: u32, ring_bytes: u32 },
}

impl Probes {
    pub fn load(heap: HeapMaps) -> Result<Self, ProbeError> {
        let mut loader = EbpfLoader::new();
        // `PENDING` is a task storage map, which aya creates but has no userspace type for
        // (userspace never reads it).
        loader.allow_unsupported_maps();
        if let HeapMaps::Tracking { ring_bytes, .. } = heap {
            loader.map_max_entries(map::HEAP_EVENTS, ring_bytes);
        }
        if let Some(bytes) = ring_bytes_override()? {
            log::warn!(
                "{RING_BYTES_ENV}: task and heap ring buffers of {bytes} bytes (a test setting: \
                 events will be lost under load)"
            );
            loader.map_max_entries(map::TASK_EVENTS, bytes);
            loader.map_max_entries(map::HEAP_EVENTS, bytes);
        }
        match heap {
            HeapMaps::Off => {
                for (name, entries) in map::HEAP_ONLY_MINIMUM {
                    loader.map_max_entries(name, entries);
                }
            }
            HeapMaps::Tracking { max_blocks, .. } => {
                loader.map_max_entries(map::OUTSTANDING, max_blocks);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| ProbeError::Load {
                source: Box::new(source),
            })?;
        if let HeapMaps::Tracking { max_blocks, .. } = heap {
            // Before any heap program runs (see `monitor_common::heap::BLOCK_FREED`).
            let mut counts: aya::maps::Array<_, u64> = ebpf
                .map_mut(map::TOMBSTONES)
                .ok_or(ProbeError::Missing(map::TOMBSTONES))?
                .try_into()
                .map_err(|source| ProbeError::Map {
                    name: map::TOMBSTONES,
                    source,
                })?;
            let max = u64::from(monitor_common::heap::tombstones_max(max_blocks));
            counts
                .set(monitor_common::heap::tombstones::MAX, max, 0)
                .map_err(|source| ProbeError::Map {
                    name: map::TOMBSTONES,
                    source,
                })?;
        }
        for name in program::TASK_HOOKS {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Missing(name))?
                .try_into()?;
            program.load()?;
        }
        Ok(Self { ebpf })
    }

    /// Loads the heap programs (verified by the kernel now, not at first attach).
    pub fn enable_heap(&mut self) -> Result<(), ProbeError> {
        for name in program::HEAP {
            self.program(name)?.load()?;
        }
        Ok(())
    }

    /// The ring buffer the task events arrive in (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take(map::TASK_EVENTS)
    }

    /// Reports every exec on the host from now on, into the ring [`Probes::take_exec_events`]
    /// returns. The link lives as long as the probes.
    pub fn watch_execs(&mut self) -> Result<RawTracePointLinkId, ProbeError> {
        let program: &mut RawTracePoint = self
            .ebpf
            .program_mut(program::PROCESS_EXEC)
            .ok_or(ProbeError::Missing(program::PROCESS_EXEC))?
            .try_into()?;
        program.load()?;
        Ok(program.attach("sched_process_exec")?)
    }

    /// The exec ring buffer (can be taken once).
    pub fn take_exec_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take(map::EXEC_EVENTS)
    }

    /// The heap ring buffer (can be taken once).
    pub fn take_heap_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take(map::HEAP_EVENTS)
    }

    /// Takes a map out of the object (so it can be read without borrowing the programs).
    pub(super) fn take<T>(&mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
        T::try_from(map).map_err(|source| ProbeError::Map { name, source })
    }

    /// Borrows a map of the object, typed.
    pub(super) fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(ProbeError::Missing(name))?;
        T::try_from(map).map_err(|source| ProbeError::Map { name, source })
    }

    /// Borrows a map of the object, untyped.
    pub(super) fn map(&self, name: &'static str) -> Option<&aya::maps::Map> {
        self.ebpf.map(name)
    }

    pub(super) fn program(&mut self, name: &'static str) -> Result<&mut UProbe, ProbeError> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or(ProbeError::Missing(name))?
            .try_into()?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use object::{Object, ObjectSection, ObjectSymbol};

    use super::*;

    /// The object's maps and programs are exactly those `monitor_common::names` lists: a
    /// name changed on one side only fails here, not at load time on a user's host.
    #[test]
    fn the_embedded_object_declares_exactly_the_shared_names() {
        let object = object::File::parse(EBPF_OBJECT).expect("the embedded object is ELF");
        let in_section = |wanted: &dyn Fn(&str) -> bool| -> BTreeSet<String> {
            object
                .symbols()
                .filter(|symbol| {
                    symbol
                        .section_index()
                        .and_then(|i| object.section_by_index(i).ok())
                        .and_then(|section| section.name().ok().map(wanted))
                        .unwrap_or(false)
                })
                .filter_map(|symbol| symbol.name().ok().map(str::to_string))
                .filter(|name| !name.is_empty() && !name.starts_with('.'))
                .collect()
        };
        let maps = in_section(&|section| section == "maps" || section == ".maps");
        let expected: BTreeSet<String> = map::ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(maps, expected);
        let programs = in_section(&|section| {
            section.starts_with("uprobe")
                || section.starts_with("uretprobe")
                || section.starts_with("raw_tp")
        });
        let expected: BTreeSet<String> = program::TASK_HOOKS
            .iter()
            .chain(program::HEAP.iter())
            .chain([program::PROCESS_EXEC].iter())
            .map(|s| s.to_string())
            .collect();
        assert_eq!(programs, expected);
    }
}
