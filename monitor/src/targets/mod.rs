//! Which processes leakscope watches, and what `/proc` says about each: `--pid` targets are
//! named processes, `--exe` targets every process running an executable, found as they
//! start.

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
