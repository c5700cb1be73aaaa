//! Loads the embedded eBPF object and attaches its task hook to target processes.
//!
//! The hook is attached per process (`UProbeScope::OneProcess`): the kernel writes the
//! breakpoint into that process's pages only, so other processes running the same binary are
//! not slowed down. Links are owned here and detached when a process goes away; if the daemon
//! dies, the kernel drops them with its file descriptors, leaving nothing behind.

use std::num::NonZeroU32;
use std::path::Path;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope};
use aya::programs::{ProgramError, UProbe};
use aya::{Ebpf, EbpfError, EbpfLoader};
use monitor_common::{HookCookie, TASK_HOOK_PROGRAMS, TaskEventKind, counter};
use thiserror::Error;

use crate::discovery::{HookKind, TargetImage};

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
    #[error(
        "{0} has no hook point leakscope can use for spawns: {1}. Is it a tokio binary that \
         spawns tasks? `leakscope inspect` shows what was found"
    )]
    NoSpawnHook(String, String),
    #[error("{symbol}: the task header arrives in {register}, which no task hook program reads")]
    UnsupportedRegister { symbol: String, register: String },
}

impl From<ProgramError> for ProbeError {
    fn from(err: ProgramError) -> Self {
        Self::Program(Box::new(err))
    }
}

/// Position of `id_offset` in tokio's task vtable record: seven fn pointers, then
/// `trailer_offset`, `scheduler_offset`, `id_offset` (discovery checks that shape).
const VTABLE_ID_OFFSET_FIELD: u32 = 9 * 8;

/// The loaded programs and their maps, shared by every attached process.
pub struct TaskProbes {
    ebpf: Ebpf,
}

/// How large the heap-mode maps are created: kernel memory is allocated when the maps are,
/// whether or not a heap program ever runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapMaps {
    /// No heap tracking: every heap map at its smallest (about 60 MB of kernel memory
    /// saved, measured with bpftool).
    Off,
    /// Tracking, with room for this many outstanding blocks in the kernel (about 104 bytes
    /// each, preallocated).
    Tracking { max_blocks: u32 },
}

/// Heap maps and their smallest sizes (the ring buffer's is one page).
const HEAP_MAPS_MINIMUM: [(&str, u32); 7] = [
    ("OUTSTANDING", 1),
    ("PENDING", 1),
    ("HEAP_TARGETS", 1),
    ("UNTRACKED_FREES", 1),
    ("UNWIND_ROWS", 1),
    ("UNWIND_BUCKETS", 1),
    ("HEAP_EVENTS", 4096),
];

impl TaskProbes {
    pub fn load(heap: HeapMaps) -> Result<Self, ProbeError> {
        let mut loader = EbpfLoader::new();
        match heap {
            HeapMaps::Off => {
                for (name, entries) in HEAP_MAPS_MINIMUM {
                    loader.map_max_entries(name, entries);
                }
            }
            HeapMaps::Tracking { max_blocks } => {
                loader.map_max_entries("OUTSTANDING", max_blocks);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| ProbeError::Load {
                source: Box::new(source),
            })?;
        for name in TASK_HOOK_PROGRAMS {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Missing(name))?
                .try_into()?;
            program.load()?;
        }
        Ok(Self { ebpf })
    }

    /// The ring buffer the task events arrive in (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take("TASK_EVENTS")
    }

    /// The kernel-side failure counters (can be taken once).
    pub fn take_counters(&mut self) -> Result<KernelCounters, ProbeError> {
        let counters = self.take("COUNTERS")?;
        let heap_counters = self.take("HEAP_COUNTERS")?;
        let untracked_frees = self.take("UNTRACKED_FREES")?;
        Ok(KernelCounters {
            counters,
            heap_counters,
            untracked_frees,
        })
    }

    /// Attaches the task hook at every hook point of `image` in process `pid` (or, with
    /// `pid == None`, in every process that runs `target`).
    pub fn attach(
        &mut self,
        image: &TargetImage,
        target: &Path,
        pid: Option<u32>,
    ) -> Result<Vec<AttachedLink>, ProbeError> {
        if !image.hooks.iter().any(|h| {
            matches!(
                h.kind,
                HookKind::SpawnOwned | HookKind::SpawnBlocking | HookKind::FirstPoll
            )
        }) {
            return Err(ProbeError::NoSpawnHook(
                image.path.display().to_string(),
                image.warnings.join("; "),
            ));
        }
        let scope = match pid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let mut requests = Vec::with_capacity(image.hooks.len());
        for hook in &image.hooks {
            let kind = match hook.kind {
                HookKind::SpawnOwned | HookKind::SpawnBlocking => TaskEventKind::Spawn,
                HookKind::Complete => TaskEventKind::Complete,
                HookKind::FirstPoll => TaskEventKind::FirstPoll,
            };
            let cookie = HookCookie {
                kind: kind as u32,
                vtable_offset: image.layout.vtable_offset as u32,
                vtable_id_field: VTABLE_ID_OFFSET_FIELD,
            };
            let program = *TASK_HOOK_PROGRAMS
                .get(hook.header_arg.position())
                .ok_or_else(|| ProbeError::UnsupportedRegister {
                    symbol: hook.symbol.clone(),
                    register: format!("{:?}", hook.header_arg),
                })?;
            requests.push(AttachRequest {
                program,
                target,
                file_offset: hook.file_offset,
                cookie: Some(cookie.encode()),
                symbol: &hook.symbol,
            });
        }
        self.attach_all(&requests, scope)
    }

    /// Attaches every request, or none: on the first failure the ones already attached are
    /// detached again, so nothing is left half-attached.
    fn attach_all(
        &mut self,
        requests: &[AttachRequest<'_>],
        scope: UProbeScope,
    ) -> Result<Vec<AttachedLink>, ProbeError> {
        let mut links = Vec::with_capacity(requests.len());
        for request in requests {
            let attached = self.program(request.program).and_then(|program| {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(request.file_offset),
                    cookie: request.cookie,
                };
                program
                    .attach(point, request.target, scope)
                    .map(|id| AttachedLink {
                        program: request.program,
                        id,
                    })
                    .map_err(|source| ProbeError::Attach {
                        symbol: request.symbol.to_string(),
                        offset: request.file_offset,
                        target: request.target.display().to_string(),
                        source: Box::new(source),
                    })
            });
            match attached {
                Ok(link) => links.push(link),
                Err(err) => {
                    self.detach(links);
                    return Err(err);
                }
            }
        }
        Ok(links)
    }

    /// Takes a map out of the object (so it can be read without borrowing the programs).
    fn take<T>(&mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
        T::try_from(map).map_err(|source| ProbeError::Map { name, source })
    }

    /// Borrows a map of the object, typed.
    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(ProbeError::Missing(name))?;
        T::try_from(map).map_err(|source| ProbeError::Map { name, source })
    }

    fn program(&mut self, name: &'static str) -> Result<&mut UProbe, ProbeError> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or(ProbeError::Missing(name))?
            .try_into()?)
    }

    pub fn detach(&mut self, links: Vec<AttachedLink>) {
        for link in links {
            if let Ok(program) = self.program(link.program) {
                // A link whose process already exited may be gone: nothing to undo then.
                let _ = program.detach(link.id);
            }
        }
    }
}

/// The heap programs, by what they read at their attach point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HeapProgram {
    /// size in arg 0: `__rust_alloc`, `__rust_alloc_zeroed`, `malloc`, `valloc`, ...
    AllocEntry,
    /// `calloc(n, size)`.
    CallocEntry,
    /// size in arg 1: `aligned_alloc`, `memalign`.
    AlignedEntry,
    /// `posix_memalign(&out, align, size)`.
    PosixMemalignEntry,
    /// `realloc(ptr, size)`.
    ReallocEntry,
    /// `__rust_realloc(ptr, old_size, align, new_size)`.
    RustReallocEntry,
    /// pointer in arg 0: `free`, `__rust_dealloc`, ...
    FreeEntry,
    /// Return of any allocating function (uretprobe at the function's entry).
    AllocReturn,
}

impl HeapProgram {
    pub const ALL: [HeapProgram; 8] = [
        HeapProgram::AllocEntry,
        HeapProgram::CallocEntry,
        HeapProgram::AlignedEntry,
        HeapProgram::PosixMemalignEntry,
        HeapProgram::ReallocEntry,
        HeapProgram::RustReallocEntry,
        HeapProgram::FreeEntry,
        HeapProgram::AllocReturn,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            HeapProgram::AllocEntry => "heap_alloc_entry",
            HeapProgram::CallocEntry => "heap_calloc_entry",
            HeapProgram::AlignedEntry => "heap_aligned_entry",
            HeapProgram::PosixMemalignEntry => "heap_posix_memalign_entry",
            HeapProgram::ReallocEntry => "heap_realloc_entry",
            HeapProgram::RustReallocEntry => "heap_rust_realloc_entry",
            HeapProgram::FreeEntry => "heap_free_entry",
            HeapProgram::AllocReturn => "heap_alloc_return",
        }
    }
}

/// Where one heap program goes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeapAttachPoint {
    pub program: HeapProgram,
    /// File the offset is in (the executable, or a library as the process maps it).
    pub target: std::path::PathBuf,
    pub file_offset: u64,
    pub symbol: String,
    /// For entry programs: where the function's arguments are at the probed instruction
    /// (`monitor_common::heap::arg_location`); 0 when all are in their own registers.
    pub arg_cookie: u64,
}

impl TaskProbes {
    /// Loads the heap programs (verified by the kernel now, not at first attach).
    pub fn enable_heap(&mut self) -> Result<(), ProbeError> {
        for program in HeapProgram::ALL {
            let name = program.name();
            let p: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .ok_or(ProbeError::Missing(name))?
                .try_into()?;
            p.load()?;
        }
        Ok(())
    }

    /// The heap ring buffer (can be taken once).
    pub fn take_heap_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take("HEAP_EVENTS")
    }

    /// Copies an executable's unwind table into the kernel at `first`.
    pub fn load_unwind_rows(
        &mut self,
        first: u32,
        rows: &[monitor_common::unwind::UnwindRow],
    ) -> Result<(), ProbeError> {
        self.fill_array("UNWIND_ROWS", first, rows)
    }

    /// Writes an unwind table's bucket index into `UNWIND_BUCKETS` from index `first` on.
    pub fn load_unwind_buckets(&mut self, first: u32, buckets: &[u32]) -> Result<(), ProbeError> {
        self.fill_array("UNWIND_BUCKETS", first, buckets)
    }

    fn fill_array<T: aya::Pod>(
        &mut self,
        name: &'static str,
        first: u32,
        values: &[T],
    ) -> Result<(), ProbeError> {
        let mut array: aya::maps::Array<_, T> = self.map_mut(name)?;
        for (i, value) in values.iter().enumerate() {
            array
                .set(first + i as u32, value, 0)
                .map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(())
    }

    /// Starts (`Some`) or stops (`None`) heap tracking for `pid`.
    pub fn set_heap_target(
        &mut self,
        pid: u32,
        target: Option<monitor_common::heap::HeapTarget>,
    ) -> Result<(), ProbeError> {
        let mut targets: aya::maps::HashMap<_, u32, monitor_common::heap::HeapTarget> =
            self.map_mut("HEAP_TARGETS")?;
        let result = match target {
            Some(t) => targets.insert(pid, t, 0),
            None => targets.remove(&pid),
        };
        result.map_err(|source| ProbeError::Map {
            name: "HEAP_TARGETS",
            source,
        })
    }

    /// Forgets every block the kernel still tracks for `pid` (it exited or was detached), so
    /// that the bounded map does not fill with the dead and a later process reusing the pid
    /// does not inherit them. Returns how many were dropped.
    pub fn purge_heap_blocks(&mut self, pid: u32) -> Result<usize, ProbeError> {
        use monitor_common::heap::{BlockInfo, BlockKey};
        let mut blocks: aya::maps::HashMap<_, BlockKey, BlockInfo> = self.map_mut("OUTSTANDING")?;
        let stale: Vec<BlockKey> = blocks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pid == pid)
            .collect();
        for key in &stale {
            // Gone already (freed meanwhile): nothing to do.
            let _ = blocks.remove(key);
        }
        Ok(stale.len())
    }

    /// Attaches heap programs in process `pid`.
    pub fn attach_heap(
        &mut self,
        pid: u32,
        points: &[HeapAttachPoint],
    ) -> Result<Vec<AttachedLink>, ProbeError> {
        let scope = match NonZeroU32::new(pid) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let requests: Vec<AttachRequest<'_>> = points
            .iter()
            .map(|point| AttachRequest {
                program: point.program.name(),
                target: &point.target,
                file_offset: point.file_offset,
                cookie: (point.arg_cookie != 0).then_some(point.arg_cookie),
                symbol: &point.symbol,
            })
            .collect();
        self.attach_all(&requests, scope)
    }
}

/// Kernel run statistics of leakscope's own BPF programs (`--probe-stats`): how often each
/// ran and for how long, in the probed threads. The kernel counts only while statistics are
/// on, which this holds them for; that adds two clock reads to every BPF program run on the
/// host, so it is opt-in.
pub struct ProbeStats {
    /// (program name, kernel program id).
    programs: Vec<(String, u32)>,
    _enabled: std::os::fd::OwnedFd,
}

/// One program's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramRuns {
    pub program: String,
    pub runs: u64,
    pub seconds: f64,
}

impl ProbeStats {
    /// Turns statistics on for the programs `probes` has loaded so far.
    pub fn enable(probes: &TaskProbes) -> Result<Self, ProbeError> {
        let enabled =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(ProbeError::Stats)?;
        let programs = probes
            .ebpf
            .programs()
            .filter_map(|(name, program)| Some((name.to_string(), program.info().ok()?.id())))
            .collect();
        Ok(Self {
            programs,
            _enabled: enabled,
        })
    }

    /// Each program's runs and run time so far (programs the kernel no longer lists are
    /// left out).
    pub fn read(&self) -> Vec<ProgramRuns> {
        let mut runs: Vec<ProgramRuns> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|info| {
                let (name, _) = self.programs.iter().find(|(_, id)| *id == info.id())?;
                Some(ProgramRuns {
                    program: name.clone(),
                    runs: info.run_count(),
                    seconds: info.run_time().as_secs_f64(),
                })
            })
            .collect();
        runs.sort_by(|a, b| a.program.cmp(&b.program));
        runs
    }
}

/// One uprobe to attach: which program, where, and with which cookie.
struct AttachRequest<'a> {
    program: &'static str,
    target: &'a Path,
    file_offset: u64,
    cookie: Option<u64>,
    symbol: &'a str,
}

/// One attached hook point, detachable.
#[derive(Debug)]
pub struct AttachedLink {
    program: &'static str,
    id: UProbeLinkId,
}

/// Failure counters kept by the BPF program, summed over CPUs on read.
pub struct KernelCounters {
    counters: PerCpuArray<MapData, u64>,
    heap_counters: PerCpuArray<MapData, u64>,
    untracked_frees: aya::maps::HashMap<MapData, u32, u64>,
}

fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    array
        .get(&index, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}

impl KernelCounters {
    fn read(&self, index: u32) -> u64 {
        sum_per_cpu(&self.counters, index)
    }

    /// Heap tracking failures by reason (`monitor_common::heap::heap_counter`).
    pub fn heap_failures(&self) -> [(&'static str, u64); 3] {
        use monitor_common::heap::heap_counter;
        [
            (
                "ringbuf_full",
                sum_per_cpu(&self.heap_counters, heap_counter::RINGBUF_FULL),
            ),
            (
                "outstanding_full",
                sum_per_cpu(&self.heap_counters, heap_counter::OUTSTANDING_FULL),
            ),
            (
                "pending_full",
                sum_per_cpu(&self.heap_counters, heap_counter::PENDING_FULL),
            ),
        ]
    }

    /// Frees of blocks allocated before attach, in process `pid`.
    pub fn untracked_frees(&self, pid: u32) -> u64 {
        self.untracked_frees.get(&pid, 0).unwrap_or(0)
    }

    /// Events dropped because the ring buffer was full.
    pub fn ringbuf_full(&self) -> u64 {
        self.read(counter::RINGBUF_FULL)
    }

    /// Probe hits whose task header could not be read.
    pub fn read_failed(&self) -> u64 {
        self.read(counter::READ_FAILED)
    }
}
