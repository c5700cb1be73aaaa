//! `cargo xtask setup --bench`: the outside tools the HTTP benchmark drives. `wrk` (load) and
//! bcc's `memleak` (the peer it is compared with) come from Debian packages; `memleak`
//! compiles its BPF program at start and needs the running kernel's headers, which no Debian
//! package matches on these VMs, so the closest Debian `linux-headers-*` packages are
//! extracted (not installed: they depend on their kernel image) and linked as
//! `/lib/modules/$(uname -r)/build` and `source`. Idempotent.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{on_path, output, run};

/// (command, Debian package) the HTTP benchmark needs.
const BENCH_TOOLS: [(&str, &str); 2] = [("wrk", "wrk"), ("memleak-bpfcc", "bpfcc-tools")];

/// Where extracted kernel headers are kept (outside any worktree: `/lib/modules` links here).
const HEADERS_HOME: &str = "/opt/leakscope-bench";

/// Installs wrk and bpfcc-tools with apt-get if missing, then the kernel headers memleak
/// needs. wrk is required; a failure of the memleak part is returned as a reason in `Ok`,
/// so the benchmark can run without that column.
pub fn setup_bench() -> anyhow::Result<Result<String, String>> {
    let missing: Vec<&str> = BENCH_TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|&(_, package)| package)
        .collect();
    if !missing.is_empty() {
        if !on_path("apt-get") {
            bail!(
                "the HTTP benchmark needs wrk and memleak-bpfcc (Debian packages {}): install \
                 them with your package manager",
                missing.join(" ")
            );
        }
        apt_get(&["update", "-q"])?;
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(&missing);
        apt_get(&install).context("installing the benchmark's tools (as root)")?;
    }
    if !on_path("wrk") {
        bail!("wrk is still missing after `apt-get install wrk`: install it by hand");
    }
    if !on_path("memleak-bpfcc") {
        return Ok(Err(
            "memleak-bpfcc is missing (Debian package bpfcc-tools)".into()
        ));
    }
    Ok(kernel_headers().map_err(|e| format!("{e:#}")))
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(args))
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The numbers in a kernel version string, in order: `6.12.118+deb12` → [6, 12, 118, 12].
fn numbers(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Of Debian's `linux-headers-<version>` packages for `flavour`, the version closest to
/// `running`: the newest not newer than it (major.minor.patch), else the oldest.
fn closest_headers(search: &str, flavour: &str, running: &str) -> Option<String> {
    let suffix = format!("-{flavour}");
    let mut versions: Vec<String> = search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("linux-headers-")?.strip_suffix(&suffix))
        // Only concrete versions of the plain flavour (not `-cloud`, `-rt`, meta-packages).
        .filter(|v| {
            v.starts_with(|c: char| c.is_ascii_digit())
                && !v.ends_with("-cloud")
                && !v.ends_with("-rt")
                && numbers(v).len() >= 3
        })
        .map(str::to_string)
        .collect();
    versions.sort_by_key(|v| numbers(v));
    let running = numbers(running);
    let head = |v: &[u64]| v.iter().take(3).copied().collect::<Vec<_>>();
    let not_newer = versions
        .iter()
        .rfind(|v| head(&numbers(v)) <= head(&running));
    not_newer.or(versions.first()).cloned()
}

/// Links `/lib/modules/$(uname -r)/build` and `source` to extracted Debian headers, unless
/// `build` already holds headers. Returns what was found or done.
pub fn kernel_headers() -> anyhow::Result<String> {
    let release = kernel_release();
    let modules = PathBuf::from("/lib/modules").join(&release);
    // Debian splits headers: the flavour's `build` has the config and generated files, the
    // `-common` tree (`source`) has `include/linux`.
    let present = modules.join("build/Makefile").is_file()
        && (modules.join("build/include/linux").is_dir()
            || modules.join("source/include/linux").is_dir());
    if present {
        return Ok(format!(
            "kernel headers: {} (present)",
            std::fs::canonicalize(modules.join("build"))
                .unwrap_or_else(|_| modules.join("build"))
                .display()
        ));
    }
    let flavour = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no Debian kernel headers flavour known for {other}"),
    };
    let search = output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        &format!("^linux-headers-[0-9].*-{flavour}$"),
    ]))?;
    let version = closest_headers(&search, flavour, &release).with_context(|| {
        format!(
            "no Debian linux-headers-*-{flavour} package in the apt lists: run `apt-get update`, \
             or install headers for {release} and link them as {}",
            modules.join("build").display()
        )
    })?;
    let headers = format!("linux-headers-{version}-{flavour}");
    // The flavour package needs its `-common` package and the matching linux-kbuild.
    let depends = output(Command::new("apt-cache").args(["depends", &headers]))?;
    let mut packages = vec![headers.clone()];
    for line in depends.lines() {
        let Some(name) = line.trim().strip_prefix("Depends: ") else {
            continue;
        };
        if name.starts_with("linux-headers-") || name.starts_with("linux-kbuild-") {
            packages.push(name.to_string());
        }
    }
    let home = Path::new(HEADERS_HOME).join(format!("kernel-headers-{version}"));
    let root = home.join("root");
    let amd64 = root.join(format!("usr/src/{headers}"));
    let common = root.join(format!("usr/src/linux-headers-{version}-common"));
    if !amd64.join("include").is_dir() || !common.join("include").is_dir() {
        let debs = home.join("debs");
        std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        run(Command::new("apt-get")
            .current_dir(&debs)
            .arg("download")
            .args(&packages))
        .context("downloading Debian's kernel headers (apt-get download)")?;
        for deb in std::fs::read_dir(&debs)? {
            let deb = deb?.path();
            if deb.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            }
        }
    }
    if !amd64.is_dir() || !common.is_dir() {
        bail!(
            "{} did not contain {} and {}",
            packages.join(" "),
            amd64.display(),
            common.display()
        );
    }
    std::fs::create_dir_all(&modules)?;
    for (name, to) in [("build", &amd64), ("source", &common)] {
        let link = modules.join(name);
        if link.is_symlink() {
            std::fs::remove_file(&link)?;
        } else if link.exists() {
            bail!(
                "{} exists and is not a link: leaving it alone; point it at kernel headers",
                link.display()
            );
        }
        std::os::unix::fs::symlink(to, &link)
            .with_context(|| format!("linking {} to {}", link.display(), to.display()))?;
    }
    Ok(format!(
        "kernel headers: Debian {version} (closest package to the running {release}) extracted \
         to {}, linked as {}/build and source",
        root.display(),
        modules.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_closest_headers() {
        let search = "linux-headers-6.1.0-47-amd64 - Header files\n\
                      linux-headers-6.1.0-57-amd64 - Header files\n\
                      linux-headers-6.1.0-57-cloud-amd64 - Header files\n\
                      linux-headers-6.12.107+deb12-amd64 - Header files\n\
                      linux-headers-6.12.118+deb12-amd64 - Header files\n\
                      linux-headers-6.12.118+deb12-rt-amd64 - Header files\n\
                      linux-headers-6.12-amd64 - meta\n\
                      linux-headers-amd64 - meta\n";
        assert_eq!(
            closest_headers(search, "amd64", "6.18.44-fc-v1300").as_deref(),
            Some("6.12.118+deb12")
        );
        assert_eq!(
            closest_headers(search, "amd64", "6.1.100").as_deref(),
            Some("6.1.0-57")
        );
        assert_eq!(
            closest_headers(search, "amd64", "5.10.0").as_deref(),
            Some("6.1.0-47")
        );
    }
}
