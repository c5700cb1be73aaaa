//! What the kernel counts for leakscope: failures of its probes (per-CPU counters and the
//! per-process untracked frees), and, with `--probe-stats`, the run statistics of its own
//! programs.

use aya::maps::{MapData, PerCpuArray};
use monitor_common::counter;
use monitor_common::names::map;

use super::loader::{ProbeError, Probes};

impl Probes {
    /// The kernel-side failure counters (can be taken once).
    pub fn take_counters(&mut self) -> Result<KernelCounters, ProbeError> {
        Ok(KernelCounters {
            counters: self.take(map::COUNTERS)?,
            heap_counters: self.take(map::HEAP_COUNTERS)?,
            untracked_frees: self.take(map::UNTRACKED_FREES)?,
        })
    }
}

/// Failure counters kept by the task and heap programs, summed over CPUs on read.
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
    pub fn heap_failures(&self) -> [(&'static str, u64); 4] {
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
            (
                "groups_full",
                sum_per_cpu(&self.heap_counters, heap_counter::GROUPS_FULL),
            ),
        ]
    }

    /// Frees of blocks allocated before attach, in process `pid`.
    pub fn untracked_frees(&self, pid: u32) -> u64 {
        self.untracked_frees.get(&pid, 0).unwrap_or(0)
    }

    /// Task events dropped because the task ring buffer was full.
    pub fn ringbuf_full(&self) -> u64 {
        self.read(counter::RINGBUF_FULL)
    }

    /// Execs not reported because the exec ring buffer was full.
    pub fn execs_lost(&self) -> u64 {
        self.read(counter::EXEC_RINGBUF_FULL)
    }

    /// Probe hits whose task header could not be read.
    pub fn read_failed(&self) -> u64 {
        self.read(counter::READ_FAILED)
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
    pub fn enable(probes: &Probes) -> Result<Self, ProbeError> {
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
