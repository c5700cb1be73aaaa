//! What the running kernel and leakscope's privileges allow, checked before anything is
//! loaded: `leakscope doctor` prints every check with what to do about a failed one, and
//! the daemon refuses to start on a failed required check with the same words.
//!
//! Each check reads one file: capabilities from `/proc/self/status`, BTF from
//! `/sys/kernel/btf/vmlinux`, the uprobe PMU from `/sys/bus/event_source/devices/uprobe`,
//! the BPF statistics switch from `/proc/sys/kernel/bpf_stats_enabled`. `doctor` then tries
//! the real thing (loading the programs, placing a uprobe) through [`super::loader`].

use std::path::Path;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// leakscope cannot run (the daemon refuses to start).
    Missing,
    /// Something optional is unavailable; what it costs is in the detail.
    Warning,
}

/// One check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, for a check that did not pass.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn failed(
        name: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// The check as one line: `name: detail; fix`.
    pub fn line(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{}: {}; {fix}", self.name, self.detail),
            None => format!("{}: {}", self.name, self.detail),
        }
    }
}

/// The capabilities leakscope uses, by number (linux/capability.h), and what for.
const CAPABILITIES: [(u32, &str, &str); 6] = [
    (
        39,
        "CAP_BPF",
        "loading the eBPF programs and creating their maps",
    ),
    (
        38,
        "CAP_PERFMON",
        "attaching uprobes and the exec tracepoint",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "creating uprobes on kernels with the CVE-2025-38466 fix, which require it again \
         for perf-PMU uprobes (CAP_PERFMON no longer suffices)",
    ),
    (
        24,
        "CAP_SYS_RESOURCE",
        "raising RLIMIT_MEMLOCK for the maps on kernels before 5.11 (later ones charge BPF \
         memory to the cgroup instead)",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "reading other users' processes' memory (/proc/PID/mem: task ids, the census)",
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "reading other users' executables and /proc/PID files",
    ),
];

/// The effective capability set from `/proc/self/status`'s `CapEff` line.
fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The checks that need no privileges and change nothing: capabilities, BTF, the uprobe
/// PMU, BPF statistics.
pub fn static_checks() -> Vec<Check> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut checks = capability_checks(effective_capabilities(&status), memlock_charged(&release));
    checks.push(file_check(
        "BTF",
        Path::new("/sys/kernel/btf/vmlinux"),
        Status::Missing,
        "the kernel describes its types (CONFIG_DEBUG_INFO_BTF)",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's since \
         2020); in a container, mount the host's /sys/kernel/btf read-only",
    ));
    checks.push(file_check(
        "uprobes",
        Path::new("/sys/bus/event_source/devices/uprobe/type"),
        Status::Missing,
        "the kernel's uprobe PMU is present (CONFIG_UPROBE_EVENTS)",
        "use a kernel built with CONFIG_UPROBE_EVENTS=y; in a container, mount the host's /sys",
    ));
    checks.push(file_check(
        "BPF statistics",
        Path::new("/proc/sys/kernel/bpf_stats_enabled"),
        Status::Warning,
        "the kernel can count BPF program runs (for --probe-stats)",
        "--probe-stats will not work: the kernel lacks kernel.bpf_stats_enabled (5.8+)",
    ));
    checks
}

/// True for kernels before 5.11, which charge BPF maps to RLIMIT_MEMLOCK (raising it needs
/// CAP_SYS_RESOURCE); an unreadable release counts as old.
fn memlock_charged(release: &str) -> bool {
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 11),
        _ => true,
    }
}

fn capability_checks(effective: Option<u64>, memlock_charged: bool) -> Vec<Check> {
    let Some(effective) = effective else {
        return vec![Check::failed(
            "capabilities",
            Status::Warning,
            "/proc/self/status has no CapEff line",
            "cannot tell which capabilities leakscope has; the load below tells",
        )];
    };
    CAPABILITIES
        .iter()
        .map(|&(bit, name, why)| {
            if effective & (1 << bit) != 0 {
                Check::ok(name, format!("held ({why})"))
            } else if bit == 24 && !memlock_charged {
                Check::ok(name, format!("not held, not needed on this kernel ({why})"))
            } else {
                Check::failed(
                    name,
                    Status::Missing,
                    format!("missing: needed for {why}"),
                    format!(
                        "run as root, or grant {name} (systemd: AmbientCapabilities=; \
                         Kubernetes: securityContext.capabilities.add)"
                    ),
                )
            }
        })
        .collect()
}

fn file_check(name: &str, path: &Path, status: Status, what: &str, fix: &str) -> Check {
    if path.exists() {
        Check::ok(name, format!("{what}: {} exists", path.display()))
    } else {
        Check::failed(name, status, format!("{} is missing", path.display()), fix)
    }
}

/// The checks that do the real thing, in this order, each only if the one before passed:
/// loading the programs (the verifier), attaching the exec tracepoint, placing a uprobe on
/// `free` in `libc` for this process alone (then removing it).
pub fn live_checks(libc: &Path) -> Vec<Check> {
    use super::loader::{HeapMaps, Probes};
    let mut checks = Vec::new();
    let mut probes = match Probes::load(HeapMaps::Off) {
        Ok(probes) => {
            checks.push(Check::ok(
                "load",
                "the kernel verified and loaded the programs",
            ));
            probes
        }
        Err(err) => {
            checks.push(Check::failed(
                "load",
                Status::Missing,
                err.to_string(),
                "see the capability checks above",
            ));
            return checks;
        }
    };
    checks.push(match probes.watch_execs() {
        Ok(_) => Check::ok(
            "exec tracepoint",
            "attached (new services are seen at exec)",
        ),
        Err(err) => Check::failed(
            "exec tracepoint",
            Status::Warning,
            err.to_string(),
            "new processes are found by the periodic scan only, up to --rescan-seconds later",
        ),
    });
    checks.push(match probes.try_uprobe(libc, "free") {
        Ok(()) => Check::ok(
            "uprobe",
            format!("placed and removed on free in {}", libc.display()),
        ),
        Err(err) => Check::failed(
            "uprobe",
            Status::Missing,
            err.to_string(),
            "kernels with the CVE-2025-38466 fix need CAP_SYS_ADMIN for uprobes; in a \
             container, run with hostPID and the capabilities of deploy/kubernetes",
        ),
    });
    checks
}

/// The failed required checks as one message (`None` when leakscope can run).
pub fn refusal(checks: &[Check]) -> Option<String> {
    let missing: Vec<String> = checks
        .iter()
        .filter(|c| c.status == Status::Missing)
        .map(Check::line)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "leakscope cannot run here ({}); `leakscope doctor` checks again",
            missing.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_11_charge_memlock() {
        assert!(memlock_charged("5.10.0-28-amd64"));
        assert!(!memlock_charged("5.11.0"));
        assert!(!memlock_charged("6.18.1-arch1\n"));
        assert!(memlock_charged(""));
    }

    #[test]
    fn effective_capabilities_are_read_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name: x\n"), None);
    }

    #[test]
    fn a_missing_capability_is_named_with_what_it_is_for_and_refuses() {
        let all = CAPABILITIES
            .iter()
            .fold(0u64, |set, &(bit, _, _)| set | 1 << bit);
        let checks = capability_checks(Some(all), true);
        assert!(checks.iter().all(|c| c.status == Status::Ok));
        assert_eq!(refusal(&checks), None);
        let without_resource = all & !(1 << 24);
        assert_eq!(
            refusal(&capability_checks(Some(without_resource), false)),
            None
        );
        assert!(refusal(&capability_checks(Some(without_resource), true)).is_some());
        let checks = capability_checks(Some(all & !(1 << 21)), false);
        let refused = refusal(&checks).expect("refused");
        assert!(
            refused.contains("CAP_SYS_ADMIN: missing: needed for creating uprobes"),
            "{refused}"
        );
        assert!(refused.contains("CVE-2025-38466"), "{refused}");
        assert!(!refused.contains("CAP_BPF"), "{refused}");
    }
}
