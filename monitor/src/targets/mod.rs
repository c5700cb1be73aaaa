//! Which processes leakscope watches, and what `/proc` says about each: `--pid` targets are
//! named processes, `--exe` targets every process running an executable, found as they
//! start, and `--all` every tokio service on the host (`HostScan`).

pub mod census;
pub mod maps;
pub mod procfs;
pub mod select;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use procfs::{ExeIdentity, ProcessInfo};

/// How long a process runs, at most, before it is registered: its heap probes go into the
/// libraries it maps, which the dynamic loader may still be mapping in its first moments.
/// Most processes are ready much sooner, as soon as every library they need is mapped
/// ([`loader_done`]); this bounds the wait for those whose libraries cannot be counted
/// (renamed sonames, `dlopen`ed allocators). Task events are not lost meanwhile: `--exe`
/// hooks are on the file and their events are held.
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

    /// Processes running one of the targets (settled or not: see [`settled`]).
    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.targets
            .iter()
            .flat_map(|&(_, exe)| procfs::processes_running(exe))
            .collect()
    }

    /// True when `exe` is one of the targets.
    pub fn contains(&self, exe: ExeIdentity) -> bool {
        self.targets.iter().any(|&(_, id)| id == exe)
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
    /// `--include` and `--exclude`.
    pub selection: select::Selection,
    own_exe: Option<ExeIdentity>,
}

impl HostScan {
    pub fn new(under: PathBuf, selection: select::Selection) -> Self {
        Self {
            under,
            selection,
            own_exe: procfs::exe_identity(Path::new("/proc/self/exe")).ok(),
        }
    }

    /// Processes that may be tokio services (settled or not: see [`settled`]): the
    /// candidates of this scan.
    pub fn candidates(&self) -> Vec<ProcessInfo> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| self.candidate(pid))
            .collect()
    }

    /// Process `pid`, if it is a candidate of host-wide mode.
    pub fn candidate(&self, pid: u32) -> Option<ProcessInfo> {
        if pid == 1 || pid == std::process::id() {
            return None;
        }
        procfs::process_info(pid)
            .ok()
            .filter(|p| Some(p.exe) != self.own_exe && p.exe_path.starts_with(&self.under))
    }
}

/// What host-wide scanning has done, for the daemon's self-metrics.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostScanStats {
    pub scans: u64,
    /// How long the last scan took (listing `/proc`, judging new executables, attaching).
    pub last_scan_seconds: f64,
    /// Executables not watched (each judged once), by reason: `not_tokio` (no tokio in
    /// it), `not_analysable` (tokio, but its tasks cannot be found; the log says why).
    pub executables_skipped: std::collections::BTreeMap<&'static str, u64>,
    /// Processes running now, by state: `watched`, `excluded` (by `--include`/`--exclude`),
    /// `failed` (attaching failed; the log says why), `over_limit` (`--max-processes`).
    pub processes: std::collections::BTreeMap<&'static str, u64>,
    /// From the kernel's report of the last exec of a service to its probes being in
    /// place (the dynamic loader's work, the analysis of a new executable, attaching).
    pub last_exec_to_attach_seconds: f64,
}

/// Whether the executable at `path` can be a tokio binary: tokio's source paths are in it.
/// False for most of a host's executables, at the cost of one read of the file, in 1 MiB
/// pieces (a host's largest binaries are hundreds of MiB; the daemon's memory stays flat).
/// False too for anything but a regular file (a FIFO would block the scan).
pub fn mentions_tokio(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(|file| {
        file.metadata().is_ok_and(|m| m.is_file()) && contains(file, b"/tokio-1.")
    })
}

/// Whether `needle` occurs in what `reader` yields, read a piece at a time; a read error
/// counts as not found.
fn contains(mut reader: impl std::io::Read, needle: &[u8]) -> bool {
    const PIECE: usize = 1 << 20;
    let finder = memchr::memmem::Finder::new(needle);
    let keep = needle.len().saturating_sub(1);
    let mut buffer = vec![0u8; keep + PIECE];
    // The last `keep` bytes of a piece are carried over, so a match across two is found.
    let mut carried = 0;
    loop {
        let read = match reader.read(&mut buffer[carried..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let filled = carried + read;
        if finder.find(&buffer[..filled]).is_some() {
            return true;
        }
        carried = keep.min(filled);
        buffer.copy_within(filled - carried..filled, 0);
    }
}

/// True when `process` can be attached: the dynamic loader has mapped the `needed`
/// libraries (the executable's `DT_NEEDED`), or it has run for [`SETTLE_BEFORE_ATTACH`], or
/// its age cannot be read.
pub fn settled(process: &ProcessInfo, needed: &[String]) -> bool {
    procfs::age(process).is_none_or(|age| age >= SETTLE_BEFORE_ATTACH)
        || loader_done(process.pid, needed)
}

/// True once process `pid` maps at least as many shared libraries as it `needed`
/// directly. The dynamic loader maps an executable's own `DT_NEEDED` libraries (breadth
/// first) before their dependencies and before any of the program's code runs, so by then
/// the allocator's library is in place. The loader itself is not counted on either side.
pub fn loader_done(pid: u32, needed: &[String]) -> bool {
    let is_loader = |name: &str| name.starts_with("ld-linux") || name.starts_with("ld-musl");
    let wanted = needed.iter().filter(|name| !is_loader(name)).count();
    if wanted == 0 {
        return true;
    }
    let mapped = maps::mapped_libraries(pid)
        .iter()
        .filter_map(|path| path.file_name()?.to_str().map(str::to_string))
        .filter(|name| name.contains(".so") && !is_loader(name))
        .count();
    mapped >= wanted
}

/// Blocks until process `pid` is [`settled`] (polling its maps every 5 ms; at most
/// [`SETTLE_BEFORE_ATTACH`]).
pub fn wait_settled(process: &ProcessInfo, needed: &[String]) {
    while !settled(process, needed) && process.is_alive() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::contains;

    /// A reader that yields at most `step` bytes per read, to split a match across reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn finds_a_needle_split_across_reads_and_nothing_else() {
        let mut data = vec![b'x'; 3000];
        data[1000..1009].copy_from_slice(b"/tokio-1.");
        for step in [1, 3, 7, 1000, 1004, 5000] {
            assert!(
                contains(Trickle { data: &data, step }, b"/tokio-1."),
                "step {step}"
            );
        }
        let plain = vec![b'x'; 3000];
        assert!(!contains(
            Trickle {
                data: &plain,
                step: 7
            },
            b"/tokio-1."
        ));
        assert!(!contains(&b""[..], b"/tokio-1."));
    }
}
