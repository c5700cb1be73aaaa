//! What `/proc` says about a target process: its executable, identity and load address.
//!
//! A process is identified by pid *and* start time (pids are reused), its executable by
//! device, inode and change time of `/proc/PID/exe` (the same binary under another path, or
//! inside a container, is the same image and is analysed once; a new file reusing a deleted
//! one's inode is not).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("no process with pid {0} (it may have exited); check the pid with `ps -p {0}`")]
    NoSuchProcess(u32),
    #[error(
        "cannot read /proc/{pid}/{what}: {source}; leakscope needs root (or CAP_SYS_PTRACE and \
         CAP_DAC_READ_SEARCH) to inspect other users' processes"
    )]
    Unreadable {
        pid: u32,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("/proc/{pid}/{what} is not in the expected format")]
    Malformed { pid: u32, what: &'static str },
    #[error("executable of pid {pid} is not mapped in /proc/{pid}/maps")]
    ExeNotMapped { pid: u32 },
}

/// Device, inode and change time of an executable file: two paths to one binary share it.
/// The change time tells a file from a deleted one whose inode number it reuses (a process
/// still running the deleted binary was seen to match a new build by device and inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeIdentity {
    pub dev: u64,
    pub ino: u64,
    pub ctime_ns: i128,
}

impl ExeIdentity {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// A running process as leakscope tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Clock ticks since boot at process start (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// Path of the executable as the process sees it (may be inside a container's root).
    pub exe_path: PathBuf,
    pub exe: ExeIdentity,
}

impl ProcessInfo {
    /// Path through which the executable is reachable from here, also inside containers
    /// and after the file was replaced on disk.
    pub fn exe_link(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/exe", self.pid))
    }

    /// File name of the executable, used as the `exe` label.
    pub fn exe_name(&self) -> String {
        self.exe_path
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            })
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// True while this very process (same pid, same start) is still running.
    pub fn is_alive(&self) -> bool {
        start_time(self.pid).is_ok_and(|t| t == self.start_time)
    }
}

/// True while some process has this pid.
pub fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub fn process_info(pid: u32) -> Result<ProcessInfo, ProcError> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !proc_dir.exists() {
        return Err(ProcError::NoSuchProcess(pid));
    }
    let start_time = start_time(pid)?;
    let exe_link = proc_dir.join("exe");
    let unreadable = |source: std::io::Error| match source.kind() {
        // The process exited meanwhile (or is a kernel thread, which has no executable).
        std::io::ErrorKind::NotFound => ProcError::NoSuchProcess(pid),
        _ => ProcError::Unreadable {
            pid,
            what: "exe",
            source,
        },
    };
    let exe_path = fs::read_link(&exe_link).map_err(unreadable)?;
    let meta = fs::metadata(&exe_link).map_err(unreadable)?;
    Ok(ProcessInfo {
        pid,
        start_time,
        exe_path,
        exe: ExeIdentity::of(&meta),
    })
}

/// Clock ticks since boot at the start of process `pid` (with the pid, its identity).
pub fn start_time(pid: u32) -> Result<u64, ProcError> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ProcError::NoSuchProcess(pid)
        } else {
            ProcError::Unreadable {
                pid,
                what: "stat",
                source,
            }
        }
    })?;
    // The command name (field 2) may contain spaces and parentheses: fields after it are
    // counted from the last ')'.
    let after_comm = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or(ProcError::Malformed { pid, what: "stat" })?;
    after_comm
        .split_whitespace()
        .nth(19) // field 22 overall; fields 3.. start at index 0 here
        .and_then(|f| f.parse().ok())
        .ok_or(ProcError::Malformed { pid, what: "stat" })
}

/// Runtime address of the executable's lowest mapping: runtime address minus this, plus the
/// image's lowest link-time load address, turns a runtime pointer into a link-time one.
pub fn exe_mapping_start(info: &ProcessInfo) -> Result<u64, ProcError> {
    let pid = info.pid;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        ProcError::Unreadable {
            pid,
            what: "maps",
            source,
        }
    })?;
    super::maps::file_start(&maps, info.exe.dev, info.exe.ino)
        .ok_or(ProcError::ExeNotMapped { pid })
}

/// The 64-bit word at `addr` in process `pid`'s memory (read through `/proc/PID/mem`, which
/// needs the same privileges as attaching; the process is not stopped or changed).
pub fn read_u64(pid: u32, addr: u64) -> Result<u64, ProcError> {
    use std::os::unix::fs::FileExt as _;
    let unreadable = |source| ProcError::Unreadable {
        pid,
        what: "mem",
        source,
    };
    let mem = fs::File::open(format!("/proc/{pid}/mem")).map_err(unreadable)?;
    let mut word = [0u8; 8];
    mem.read_exact_at(&mut word, addr).map_err(unreadable)?;
    Ok(u64::from_le_bytes(word))
}

/// All running processes whose executable is `exe`.
pub fn processes_running(exe: ExeIdentity) -> Vec<ProcessInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| process_info(pid).ok())
        .filter(|p| p.exe == exe)
        .collect()
}

/// How long `process` has been running, from its start time and the system uptime.
pub fn age(process: &ProcessInfo) -> Option<std::time::Duration> {
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return None;
    }
    let started = process.start_time as f64 / ticks as f64;
    Some(std::time::Duration::from_secs_f64(
        (uptime - started).max(0.0),
    ))
}

/// Identity of an executable given by path (for `--exe`).
pub fn exe_identity(path: &Path) -> std::io::Result<ExeIdentity> {
    Ok(ExeIdentity::of(&fs::metadata(path)?))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` stamps events with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_word_of_a_processs_memory() {
        static MARKER: u64 = 0x1eac_5c0b_e000_0042;
        let addr = std::ptr::addr_of!(MARKER) as u64;
        assert_eq!(read_u64(std::process::id(), addr).unwrap(), MARKER);
        assert!(read_u64(std::process::id(), 8).is_err());
    }

    #[test]
    fn describes_this_process() {
        let me = process_info(std::process::id()).expect("own /proc entry");
        assert!(me.is_alive());
        assert!(exe_mapping_start(&me).expect("own exe mapped") > 0);
    }

    #[test]
    fn this_process_has_an_age() {
        let me = process_info(std::process::id()).unwrap();
        let age = age(&me).expect("age");
        assert!(age < std::time::Duration::from_secs(24 * 3600), "{age:?}");
    }

    #[test]
    fn missing_pid_is_a_clear_error() {
        let err = process_info(u32::MAX - 1).unwrap_err();
        assert!(err.to_string().contains("no process with pid"), "{err}");
    }
}
