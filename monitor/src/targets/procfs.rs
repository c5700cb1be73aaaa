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
    #[error(
        "pid {pid} has no readable memory at {addr:#x}: the process unmapped it (or it is \
         exiting), or the binary's analysis does not match what it runs"
    )]
    NotMapped { pid: u32, addr: u64 },
    #[error(
        "/proc/{pid}/{what} is larger than {limit} bytes; leakscope does not read it (a \
         process with that many mappings is not watched)"
    )]
    TooLarge {
        pid: u32,
        what: &'static str,
        limit: u64,
    },
}

/// The most of `/proc/PID/maps` read: a line per mapping, about 100 bytes, and the default
/// `vm.max_map_count` (65530) makes 6.5 MB at most. Read whole on every attach, so a bound.
pub const MAX_MAPS_BYTES: u64 = 64 << 20;

/// `/proc/PID/maps` as text, at most [`MAX_MAPS_BYTES`].
pub fn read_maps(pid: u32) -> Result<String, ProcError> {
    use std::io::Read as _;
    let unreadable = |source| ProcError::Unreadable {
        pid,
        what: "maps",
        source,
    };
    let file = fs::File::open(format!("/proc/{pid}/maps")).map_err(unreadable)?;
    let mut maps = String::new();
    file.take(MAX_MAPS_BYTES + 1)
        .read_to_string(&mut maps)
        .map_err(unreadable)?;
    if maps.len() as u64 > MAX_MAPS_BYTES {
        return Err(ProcError::TooLarge {
            pid,
            what: "maps",
            limit: MAX_MAPS_BYTES,
        });
    }
    Ok(maps)
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

/// Resident anonymous memory of process `pid` in bytes (`RssAnon` of `/proc/PID/status`):
/// the kernel keeps it as a counter, so reading it walks no mappings (unlike `smaps_rollup`)
/// and costs the same for a process of any size. What the heap (and stacks) hold.
pub fn rss_anon_bytes(pid: u32) -> Result<u64, ProcError> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ProcError::NoSuchProcess(pid)
        } else {
            ProcError::Unreadable {
                pid,
                what: "status",
                source,
            }
        }
    })?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or(ProcError::Malformed {
            pid,
            what: "status",
        })
}

/// Runtime address of the executable's lowest mapping: runtime address minus this, plus the
/// image's lowest link-time load address, turns a runtime pointer into a link-time one.
pub fn exe_mapping_start(info: &ProcessInfo) -> Result<u64, ProcError> {
    let pid = info.pid;
    let maps = read_maps(pid)?;
    super::maps::file_start(&maps, info.exe.dev, info.exe.ino)
        .ok_or(ProcError::ExeNotMapped { pid })
}

/// The 64-bit word at `addr` in process `pid`'s memory (read through `/proc/PID/mem`, which
/// needs the same privileges as attaching; the process is not stopped or changed).
///
/// The process keeps running, so the page may be unmapped before or during the read (even
/// between its two halves, when the word straddles pages): the kernel then fails the read
/// with `EIO`, or returns it short, and this is [`ProcError::NotMapped`]. So is an address
/// past what a file offset can say (above `i64::MAX`). Eight bytes, one `pread` (two at a
/// page boundary): bounded whatever the address.
pub fn read_u64(pid: u32, addr: u64) -> Result<u64, ProcError> {
    use std::os::unix::fs::FileExt as _;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ProcError::NoSuchProcess(pid),
        _ => ProcError::Unreadable {
            pid,
            what: "mem",
            source,
        },
    })?;
    let mut word = [0u8; 8];
    match mem.read_exact_at(&mut word, addr) {
        Ok(()) => Ok(u64::from_le_bytes(word)),
        Err(e)
            if e.kind() == std::io::ErrorKind::UnexpectedEof
                || matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EFAULT)
                ) =>
        {
            Err(ProcError::NotMapped { pid, addr })
        }
        Err(source) => Err(ProcError::Unreadable {
            pid,
            what: "mem",
            source,
        }),
    }
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

    /// Two pages mapped anonymously, a marker word at the very end of the first one.
    fn two_pages() -> (*mut u8, usize) {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped by the tests that take it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        (base.cast(), page)
    }

    #[test]
    fn unmapped_or_impossible_addresses_are_errors_not_panics() {
        let pid = std::process::id();
        let (base, page) = two_pages();
        let last_word = base as u64 + page as u64 - 8;
        // SAFETY: inside the first page of the mapping.
        unsafe {
            base.add(page - 8)
                .cast::<u64>()
                .write(0x1eac_5c0b_e000_0042)
        };
        assert_eq!(read_u64(pid, last_word).unwrap(), 0x1eac_5c0b_e000_0042);
        // SAFETY: the second page of our own mapping, not referenced anywhere.
        assert_eq!(unsafe { libc::munmap(base.add(page).cast(), page) }, 0);
        // Half in the mapped page, half in the one just unmapped: a short read.
        let straddling = base as u64 + page as u64 - 4;
        for addr in [straddling, base as u64 + page as u64, u64::MAX - 3, 1 << 63] {
            let err = read_u64(pid, addr).unwrap_err();
            assert!(
                matches!(err, ProcError::NotMapped { addr: a, .. } if a == addr),
                "{addr:#x}: {err:?}"
            );
        }
        // SAFETY: the first page, still ours.
        assert_eq!(unsafe { libc::munmap(base.cast(), page) }, 0);
        assert!(matches!(
            read_u64(u32::MAX - 1, 0x1000),
            Err(ProcError::NoSuchProcess(_))
        ));
    }

    /// The target keeps running while it is read: pages come and go under the reads.
    #[test]
    fn pages_unmapped_while_reading_give_values_or_errors() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let pid = std::process::id();
        let (base, page) = two_pages();
        // SAFETY: the mapping is ours; the other thread only remaps its second page.
        unsafe { libc::munmap(base.add(page).cast(), page) };
        let second = base as u64 + page as u64;
        let stop = AtomicBool::new(false);
        let (values, errors) = (AtomicU64::new(0), AtomicU64::new(0));
        let reads = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // NOREPLACE: while the page is unmapped another thread of the test
                    // binary may get it, and must not lose it to us; then the toggling ends.
                    // SAFETY: maps only a free page, and unmaps only the page it mapped.
                    unsafe {
                        let p = libc::mmap(
                            second as *mut libc::c_void,
                            page,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                            -1,
                            0,
                        );
                        if p != second as *mut libc::c_void {
                            if p != libc::MAP_FAILED {
                                libc::munmap(p, page);
                            }
                            break;
                        }
                        libc::munmap(p, page);
                    }
                }
            });
            // At least 2,000 reads, and on until both outcomes were seen: on a loaded
            // machine the toggling thread can be preempted, page mapped, for a whole burst.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut i = 0u64;
            while i < 2000
                || ((values.load(Ordering::Relaxed) == 0 || errors.load(Ordering::Relaxed) == 0)
                    && std::time::Instant::now() < deadline)
            {
                // The word at the page's start, and the one straddling into it.
                let addr = if i.is_multiple_of(2) {
                    second
                } else {
                    second - 4
                };
                match read_u64(pid, addr) {
                    Ok(_) => values.fetch_add(1, Ordering::Relaxed),
                    Err(ProcError::NotMapped { .. }) => errors.fetch_add(1, Ordering::Relaxed),
                    Err(other) => panic!("{addr:#x}: {other:?}"),
                };
                i += 1;
            }
            stop.store(true, Ordering::Relaxed);
            reads.store(i, Ordering::Relaxed);
        });
        // SAFETY: the first page, still ours.
        unsafe { libc::munmap(base.cast(), page) };
        assert_eq!(
            values.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed),
            reads.load(Ordering::Relaxed)
        );
        assert!(
            errors.load(Ordering::Relaxed) > 0,
            "the page was never gone"
        );
    }

    #[test]
    fn maps_are_read_whole_within_the_bound() {
        let maps = read_maps(std::process::id()).unwrap();
        assert!(maps.lines().count() > 5, "{maps}");
        assert!(maps.ends_with('\n'));
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
