//! Separate debug files: a stripped production binary plus the symbols kept aside for it.
//!
//! The usual practice is `objcopy --only-keep-debug app app.debug`, then `strip app` and
//! `objcopy --add-gnu-debuglink=app.debug app`. The debug file keeps `.symtab` (and DWARF,
//! if the build had any) with the same addresses as the binary, but its allocated sections
//! are `NOBITS`: code, data and relocations still come from the binary. Its notes survive,
//! so it carries the binary's build-id.
//!
//! [`attach`] finds it the way gdb does, in gdb's order:
//! 1. by build-id: `/usr/lib/debug/.build-id/<first 2 hex digits>/<rest>.debug`;
//! 2. by `.gnu_debuglink` name, in the binary's own directory, then in `<dir>/.debug/`, then
//!    under `/usr/lib/debug/<dir>/` (`<dir>` being the binary's absolute directory).
//!
//! A candidate is used only if it matches: equal build-ids when both files have one, and for
//! a debuglink candidate the CRC32 recorded in `.gnu_debuglink`. Candidates that exist but do
//! not match are skipped (as gdb does) and named in the warning. For a running process
//! (`/proc/<pid>/exe`) the paths are looked up inside the process's root
//! (`/proc/<pid>/root/…`), which is `/` unless the process runs in a container.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

use super::DiscoveryError;
use super::elf::{self, Image};

/// gdb's default `debug-file-directory`.
pub(crate) const DEBUG_DIR: &str = "/usr/lib/debug";

/// How to make a debug file, for the warnings.
const HOWTO: &str = "keep the symbols when stripping: `objcopy --only-keep-debug app app.debug \
     && objcopy --add-gnu-debuglink=app.debug app` on the unstripped binary, then strip app \
     and ship app.debug next to it (or in .debug/ there, or as \
     /usr/lib/debug/.build-id/<xx>/<rest of build-id>.debug); or analyse the unstripped binary";

/// What looking for a debug file gave.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The debug file now attached to the image.
    pub file: Option<PathBuf>,
    /// The attached file has a symbol table (names and hook points).
    pub file_has_symbols: bool,
    /// Paths looked at, in search order (empty for an explicit file).
    pub searched: Vec<PathBuf>,
    /// Candidates that exist but were not used, with the reason.
    pub rejected: Vec<String>,
    /// The binary has a `.gnu_debuglink` section.
    pub has_debuglink: bool,
    /// Notes for [`super::TargetImage::warnings`].
    pub warnings: Vec<String>,
}

impl Outcome {
    /// The warning for a binary that still has no symbols: what was searched, what was
    /// found unusable, and how to produce a debug file.
    pub fn stripped_warning(&self) -> String {
        let effect = "spawn/complete hook points cannot be found and spawn sites are labelled \
                      vtable@0x…";
        let mut w = match &self.file {
            Some(f) => format!(
                "binary is stripped (no .symtab) and its debug file {} has no symbol table \
                 either: {effect}",
                f.display()
            ),
            None => format!(
                "binary is stripped (no .symtab) and no separate debug file was found: {effect}"
            ),
        };
        if self.file.is_none() {
            if self.searched.is_empty() {
                w.push_str(
                    "; the binary has neither a build-id nor a .gnu_debuglink section, so \
                     there was nothing to look a debug file up by",
                );
            } else {
                let searched: Vec<String> = self
                    .searched
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                w.push_str(&format!("; searched: {}", searched.join(", ")));
                if !self.has_debuglink {
                    w.push_str(
                        " (the binary has no .gnu_debuglink section, so only its build-id path)",
                    );
                }
            }
            if !self.rejected.is_empty() {
                w.push_str(&format!("; not used: {}", self.rejected.join("; ")));
            }
        }
        w.push_str("; to fix: ");
        w.push_str(HOWTO);
        w
    }
}

/// Finds (or takes `explicit`) the separate debug file of the binary at `exe`, already
/// loaded as `img`, checks that it belongs to it and attaches it to `img`.
///
/// An explicit file that does not match is an error; automatic candidates that do not
/// match are skipped and reported in the outcome.
pub(crate) fn attach(
    exe: &Path,
    img: &mut Image,
    explicit: Option<&Path>,
) -> Result<Outcome, DiscoveryError> {
    let link = img.gnu_debuglink();
    let mut out = Outcome {
        has_debuglink: link.is_some(),
        ..Outcome::default()
    };
    if let Some(debug) = explicit {
        let invalid = |reason: String| DiscoveryError::InvalidDebugFile {
            path: exe.to_path_buf(),
            debug: debug.to_path_buf(),
            reason,
        };
        let data = super::read_bounded(debug).map_err(|e| match e {
            DiscoveryError::Io { source, .. } => invalid(format!("cannot read it: {source}")),
            other => invalid(other.to_string()),
        })?;
        if let Err(e) = elf::check_x86_64_elf(debug, &data) {
            return Err(invalid(e.to_string()));
        }
        match verify(img, &data, link.as_ref().map(|l| l.1)) {
            Verdict::Match => {}
            Verdict::Unverifiable => out.warnings.push(format!(
                "could not check that {} belongs to this binary (neither has a build-id and the \
                 binary has no .gnu_debuglink CRC): names and hooks are wrong if it comes \
                 from another build",
                debug.display()
            )),
            Verdict::Mismatch(reason) => {
                return Err(DiscoveryError::DebugFileMismatch {
                    path: exe.to_path_buf(),
                    debug: debug.to_path_buf(),
                    reason,
                });
            }
        }
        use_file(img, debug, data, &mut out)?;
        return Ok(out);
    }

    let (root, logical) = resolve_exe(exe);
    let exe_id = std::fs::metadata(exe).ok().map(|m| (m.dev(), m.ino()));
    let candidates = search_paths(
        &logical,
        img.build_id.as_deref(),
        link.as_ref().map(|l| l.0.as_str()),
    );
    for (path, via) in candidates {
        let path = match &root {
            Some(root) => root.join(path.strip_prefix("/").unwrap_or(&path)),
            None => path,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    out.rejected
                        .push(format!("{}: cannot read it: {e}", path.display()));
                }
                out.searched.push(path);
                continue;
            }
        };
        out.searched.push(path.clone());
        // A debuglink naming the binary itself (gdb skips that too).
        if exe_id == Some((meta.dev(), meta.ino())) || !meta.is_file() {
            continue;
        }
        let data = match super::read_bounded(&path) {
            Ok(d) => d,
            Err(DiscoveryError::Io { source, .. }) => {
                out.rejected
                    .push(format!("{}: cannot read it: {source}", path.display()));
                continue;
            }
            Err(e) => {
                out.rejected.push(e.to_string());
                continue;
            }
        };
        if let Err(e) = elf::check_x86_64_elf(&path, &data) {
            out.rejected.push(format!("{}: {e}", path.display()));
            continue;
        }
        let crc = match via {
            Via::DebugLink => link.as_ref().map(|l| l.1),
            Via::BuildId => None,
        };
        match verify(img, &data, crc) {
            Verdict::Match => {
                use_file(img, &path, data, &mut out)?;
                return Ok(out);
            }
            Verdict::Mismatch(reason) => out.rejected.push(format!("{}: {reason}", path.display())),
            Verdict::Unverifiable => out.rejected.push(format!(
                "{}: nothing to check it against (no build-id, no CRC)",
                path.display()
            )),
        }
    }
    if !out.rejected.is_empty() && img.has_symtab {
        // Not needed for names, but a debug file meant for this binary does not fit it.
        out.warnings.push(format!(
            "separate debug file not used: {}",
            out.rejected.join("; ")
        ));
    }
    Ok(out)
}

fn use_file(
    img: &mut Image,
    path: &Path,
    data: Vec<u8>,
    out: &mut Outcome,
) -> Result<(), DiscoveryError> {
    let had_symtab = img.has_symtab;
    out.file_has_symbols = img.attach_debug(path, data)?;
    if !out.file_has_symbols && had_symtab {
        out.warnings.push(format!(
            "debug file {} has no symbol table; the binary's own is used",
            path.display()
        ));
    }
    out.file = Some(path.to_path_buf());
    Ok(())
}

/// Why a candidate was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    BuildId,
    DebugLink,
}

/// The paths gdb looks at for the binary at absolute path `exe`, in its order.
pub(crate) fn search_paths(
    exe: &Path,
    build_id: Option<&str>,
    debuglink: Option<&str>,
) -> Vec<(PathBuf, Via)> {
    let mut out: Vec<(PathBuf, Via)> = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() > 2 && id.is_ascii()) {
        out.push((
            Path::new(DEBUG_DIR)
                .join(".build-id")
                .join(&id[..2])
                .join(format!("{}.debug", &id[2..])),
            Via::BuildId,
        ));
    }
    if let Some(name) = debuglink.filter(|n| !n.is_empty() && !n.starts_with('/')) {
        let dir = exe.parent().unwrap_or(Path::new("/"));
        let global = Path::new(DEBUG_DIR).join(dir.strip_prefix("/").unwrap_or(dir));
        for p in [
            dir.join(name),
            dir.join(".debug").join(name),
            global.join(name),
        ] {
            if !out.iter().any(|(q, _)| *q == p) {
                out.push((p, Via::DebugLink));
            }
        }
    }
    out
}

/// The process root (for `/proc/<pid>/exe`) and the executable's absolute path as the
/// process sees it; symlinks resolved, a deleted file's ` (deleted)` suffix dropped.
fn resolve_exe(path: &Path) -> (Option<PathBuf>, PathBuf) {
    let parts: Vec<Component<'_>> = path.components().collect();
    if let [
        Component::RootDir,
        Component::Normal(proc),
        Component::Normal(pid),
        Component::Normal(exe),
    ] = parts.as_slice()
        && *proc == "proc"
        && *exe == "exe"
        && let Ok(target) = std::fs::read_link(path)
    {
        let target = target.to_string_lossy();
        let target = target.strip_suffix(" (deleted)").unwrap_or(&target);
        return (
            Some(Path::new("/proc").join(pid).join("root")),
            PathBuf::from(target),
        );
    }
    let exe = std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf());
    (None, exe)
}

enum Verdict {
    Match,
    Mismatch(String),
    Unverifiable,
}

/// Whether the debug file `data` belongs to `img`: build-ids when both have one (a debug
/// file made from the binary keeps its build-id note), else the `.gnu_debuglink` CRC32.
fn verify(img: &Image, data: &[u8], crc: Option<u32>) -> Verdict {
    let debug_id = elf::build_id_of(data);
    match (&img.build_id, &debug_id) {
        (Some(want), Some(got)) if want == got => return Verdict::Match,
        (Some(want), Some(got)) => {
            return Verdict::Mismatch(format!(
                "build-id mismatch: the debug file's build-id is {got}, the binary's is {want}, \
                 so it comes from another build"
            ));
        }
        _ => {}
    }
    if let Some(want) = crc {
        let got = crc32(data);
        return if got == want {
            Verdict::Match
        } else {
            Verdict::Mismatch(format!(
                "CRC mismatch: its CRC32 is {got:08x}, the binary's .gnu_debuglink expects \
                 {want:08x} (stale or rebuilt debug file)"
            ))
        };
    }
    match (&img.build_id, debug_id) {
        (Some(want), None) => Verdict::Mismatch(format!(
            "build-id mismatch: the debug file has no build-id, the binary's is {want}"
        )),
        _ => Verdict::Unverifiable,
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// The CRC-32 (IEEE, as zlib) that `objcopy --add-gnu-debuglink` records.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn search_order_is_gdbs() {
        let got = search_paths(
            Path::new("/srv/app/bin/app"),
            Some("8ef8d481e3fe6f678dd1ae7a3933c84ee1532e14"),
            Some("app.debug"),
        );
        let got: Vec<(String, Via)> = got
            .into_iter()
            .map(|(p, v)| (p.display().to_string(), v))
            .collect();
        let s = |p: &str, v| (p.to_string(), v);
        assert_eq!(
            got,
            vec![
                s(
                    "/usr/lib/debug/.build-id/8e/f8d481e3fe6f678dd1ae7a3933c84ee1532e14.debug",
                    Via::BuildId
                ),
                s("/srv/app/bin/app.debug", Via::DebugLink),
                s("/srv/app/bin/.debug/app.debug", Via::DebugLink),
                s("/usr/lib/debug/srv/app/bin/app.debug", Via::DebugLink),
            ]
        );
        assert!(search_paths(Path::new("/a/app"), None, None).is_empty());
        assert_eq!(
            search_paths(Path::new("/a/app"), None, Some("/etc/x")),
            vec![]
        );
    }

    #[test]
    fn proc_exe_is_resolved_inside_the_process_root() {
        let (root, exe) = resolve_exe(Path::new("/proc/self/exe"));
        assert_eq!(root, Some(PathBuf::from("/proc/self/root")));
        assert_eq!(exe, std::env::current_exe().unwrap());
        let (root, _) = resolve_exe(Path::new("/bin/sh"));
        assert_eq!(root, None);
    }
}
