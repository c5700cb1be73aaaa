//! Which processes leakscope watches, and what `/proc` says about each: `--pid` targets are
//! named processes, `--exe` targets every process running an executable, found as they
//! start, and `--all` every tokio service on the host (`HostScan`).

pub mod maps;
pub mod procfs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use procfs::{ExeIdentity, ProcessInfo};

/// How long a process runs before it is registered: its heap probes go into the libraries
/// it maps, which the dynamic loader may still be mapping in its first moments. (Its task
/// events are not lost meanwhile: `--exe` hooks are on the file and their events are held.)
pub const SETTLE_BEFORE_ATTACH: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
#[error("--exe {path}: {source}; give the path of an executable file that exists on this host")]
pub struct ExeTargetError {
    path: String,
    source: std::io::Error,
}

/// The `--exe` targets: executables whose processes are watched, now and as they start.
#[derive(Debug, Clone, Default)]
pub struct ExeTargets {
    targets: Vec<(PathBuf, ExeIdentity)>,
}

impl ExeTargets {
    /// Identifies each executable (by device, inode and change time, so another path to the
    /// same file is the same target).
    pub fn resolve(paths: &[PathBuf]) -> Result<Self, ExeTargetError> {
        let targets = paths
            .iter()
            .map(|path| {
                procfs::exe_identity(path)
                    .map(|id| (path.clone(), id))
                    .map_err(|source| ExeTargetError {
                        path: path.display().to_string(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { targets })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Path, ExeIdentity)> {
        self.targets.iter().map(|(path, id)| (path.as_path(), *id))
    }

    /// Processes running one of the targets that have run for [`SETTLE_BEFORE_ATTACH`].
    pub fn settled_processes(&self) -> Vec<ProcessInfo> {
        self.targets
            .iter()
            .flat_map(|&(_, exe)| procfs::processes_running(exe))
            .filter(|process| procfs::age(process).is_none_or(|age| age >= SETTLE_BEFORE_ATTACH))
            .collect()
    }
}

/// Host-wide mode: every process whose executable is a tokio binary, found as they start.
///
/// Each executable is judged once, by identity: a cheap look for tokio's own source paths
/// in the file (they are in every build, stripped or not, as panic locations) before the
/// full analysis. The daemon's own executable and the host's init (pid 1: a container's
/// service has another host pid) are never watched.
#[derive(Debug, Clone)]
pub struct HostScan {
    /// Only executables whose path (as the process sees it) starts with this.
    pub under: PathBuf,
    own_exe: Option<ExeIdentity>,
}

impl HostScan {
    pub fn new(under: PathBuf) -> Self {
        Self {
            under,
            own_exe: procfs::exe_identity(Path::new("/proc/self/exe")).ok(),
        }
    }

    /// Processes that have settled and may be tokio services: the candidates of this scan.
    pub fn candidates(&self) -> Vec<ProcessInfo> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != 1 && pid != std::process::id())
            .filter_map(|pid| procfs::process_info(pid).ok())
            .filter(|p| Some(p.exe) != self.own_exe && p.exe_path.starts_with(&self.under))
            .filter(|p| procfs::age(p).is_none_or(|age| age >= SETTLE_BEFORE_ATTACH))
            .collect()
    }
}

/// What host-wide scanning has done, for the daemon's self-metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct HostScanStats {
    pub scans: u64,
    /// How long the last scan took (listing `/proc`, judging new executables, attaching).
    pub last_scan_seconds: f64,
    /// Executables judged not to be tokio services (each judged once).
    pub executables_skipped: u64,
    /// Processes that could not be attached (each tried once).
    pub attach_failures: u64,
}

/// Whether the executable at `path` can be a tokio binary: tokio's source paths are in it.
/// False for most of a host's executables, at the cost of one read of the file (false too
/// for what discovery would refuse to read: not a regular file, or over its size limit).
pub fn mentions_tokio(path: &Path) -> bool {
    crate::discovery::read_bounded(path)
        .is_ok_and(|data| memchr::memmem::find(&data, b"/tokio-1.").is_some())
}

/// Blocks until process `pid` has run for [`SETTLE_BEFORE_ATTACH`] (at once if it has, or
/// if its age cannot be read).
pub fn wait_settled(pid: u32) {
    if let Some(age) = procfs::process_info(pid)
        .ok()
        .as_ref()
        .and_then(procfs::age)
        && age < SETTLE_BEFORE_ATTACH
    {
        std::thread::sleep(SETTLE_BEFORE_ATTACH - age);
    }
}
