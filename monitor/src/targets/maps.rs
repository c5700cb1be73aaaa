//! `/proc/PID/maps`, parsed once for every question leakscope asks of it: where the
//! executable is mapped, and which shared libraries a process maps.
//!
//! Device numbers are compared the way `stat` reports them (`st_dev`, glibc's `makedev`
//! encoding), so a mapping and a file's metadata are matched by one rule.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One line of a maps listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping<'a> {
    pub start: u64,
    pub end: u64,
    /// The `range` field as written (`start-end`, hex): the name of the mapping's entry in
    /// `/proc/PID/map_files/`.
    pub range: &'a str,
    pub perms: &'a str,
    pub offset: u64,
    /// `st_dev` of the mapped file.
    pub dev: u64,
    pub inode: u64,
    /// The file's path without a trailing ` (deleted)`, for file mappings.
    pub path: Option<&'a str>,
    /// The file was deleted (e.g. upgraded) since it was mapped.
    pub deleted: bool,
}

impl Mapping<'_> {
    pub fn executable(&self) -> bool {
        self.perms.contains('x')
    }
}

const DELETED: &str = " (deleted)";

/// Parses every well-formed line of a maps listing (paths may contain spaces).
pub fn parse(maps: &str) -> impl Iterator<Item = Mapping<'_>> {
    maps.lines().filter_map(parse_line)
}

fn parse_line(line: &str) -> Option<Mapping<'_>> {
    // range perms offset dev inode [path]
    let mut rest = line;
    let mut fields = [""; 5];
    for f in &mut fields {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let [range, perms, offset, dev, inode] = fields;
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let path = rest.trim_start();
    let (path, deleted) = match path.strip_suffix(DELETED) {
        Some(p) => (p, true),
        None => (path, false),
    };
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        range,
        perms,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: libc::makedev(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
        path: path.starts_with('/').then_some(path),
        deleted,
    })
}

/// Start of the mapping at file offset 0 of the file with device `dev` and inode `inode`.
pub fn file_start(maps: &str, dev: u64, inode: u64) -> Option<u64> {
    parse(maps)
        .find(|m| m.offset == 0 && m.inode == inode && m.dev == dev)
        .map(|m| m.start)
}

/// Shared libraries (and other executable file mappings except the main executable) that
/// process `pid` maps, as paths usable from leakscope's own mount namespace:
/// `/proc/PID/root/<path>`, or `/proc/PID/map_files/<range>` for a file deleted (e.g.
/// upgraded) since it was mapped. Empty, with a logged warning, when `/proc/PID/maps` is
/// unreadable.
pub fn mapped_libraries(pid: u32) -> Vec<PathBuf> {
    let maps = match super::procfs::read_maps(pid) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("{e}; no shared libraries will be probed");
            return Vec::new();
        }
    };
    let exe_path = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe_id = std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    libraries(pid, &maps, exe_path.as_deref(), exe_id)
}

/// The body of [`mapped_libraries`]: `exe` is `/proc/PID/exe`'s link text and `exe_id` its
/// `(st_dev, inode)`, either identifying the executable's mappings.
fn libraries(pid: u32, maps: &str, exe: Option<&Path>, exe_id: Option<(u64, u64)>) -> Vec<PathBuf> {
    let exe = exe.map(|p| {
        let s = p.to_string_lossy();
        s.strip_suffix(DELETED).unwrap_or(&s).to_string()
    });
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for mapping in parse(maps).filter(Mapping::executable) {
        let Some(path) = mapping.path else { continue };
        if exe.as_deref() == Some(path) || Some((mapping.dev, mapping.inode)) == exe_id {
            continue;
        }
        if !seen.insert(path.to_string()) {
            continue;
        }
        out.push(if mapping.deleted {
            PathBuf::from(format!("/proc/{pid}/map_files/{}", mapping.range))
        } else {
            PathBuf::from(format!("/proc/{pid}/root{path}"))
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0010000 r--p 00000000 fd:01 100 /srv/app
55d0c0010000-55d0c0020000 r-xp 00010000 fd:01 100 /srv/app
7f0000000000-7f0000020000 r--p 00000000 fd:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000020000-7f0000100000 r-xp 00020000 fd:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000210000 r-xp 00000000 fd:01 300 /opt/my lib/libx.so (deleted)
7f0000300000-7f0000301000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn finds_the_offset_zero_mapping_of_a_file() {
        let dev = libc::makedev(0xfd, 0x01);
        assert_eq!(file_start(MAPS, dev, 100), Some(0x55d0c0000000));
        assert_eq!(file_start(MAPS, dev, 1), None);
        assert_eq!(file_start(MAPS, libc::makedev(0xfd, 0x02), 100), None);
    }

    #[test]
    fn lists_libraries_once_and_skips_the_executable() {
        let libs = libraries(42, MAPS, Some(Path::new("/srv/app")), None);
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/proc/42/root/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/proc/42/map_files/7f0000200000-7f0000210000"),
            ]
        );
        // The executable is also recognised by device and inode, as stat reports them.
        let libs = libraries(42, MAPS, None, Some((libc::makedev(0xfd, 0x01), 100)));
        assert_eq!(libs.len(), 2);
    }

    #[test]
    fn mapped_libraries_of_this_process_include_libc() {
        let libs = mapped_libraries(std::process::id());
        assert!(
            libs.iter().any(|p| p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))),
            "{libs:?}"
        );
        assert!(libs.iter().all(|p| p.exists()), "{libs:?}");
    }
}
