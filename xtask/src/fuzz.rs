//! `cargo xtask fuzz`: the cargo-fuzz targets in `monitor/fuzz`, with corpora seeded from
//! the fixtures at run time (no binaries are committed).
//!
//! Each target takes untrusted bytes the way leakscope meets them: executables (host-wide
//! mode analyses every one on the host), their `.eh_frame` and DWARF, the kernel's event
//! records (whose values come from the probed process's memory) and the config file. A
//! crash or a hang is a bug: libFuzzer saves the input under `monitor/fuzz/artifacts/`, and
//! the fix comes with a unit test that replays it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use crate::{MUSL_TARGET, fixture_paths, run, workspace_root};

/// The targets, as named in `monitor/fuzz/Cargo.toml`.
pub const TARGETS: [&str; 6] = [
    "elf_discovery",
    "symbol_names",
    "eh_frame",
    "dwarf_lines",
    "ring_events",
    "config_file",
];

/// The longest one input may run before libFuzzer calls it a hang. The slowest seeds (the
/// whole fixture binaries through the analysis, instrumented and with overflow checks)
/// take about half a second; host-wide mode's budget per binary is 30 s.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// `cargo +nightly fuzz` in the fuzz crate's directory. Through `rustup run` like the other
/// nightly tools (see `setup`), and without the compiler overrides a parent cargo or the
/// user's shell may set: `RUSTC` naming the stable compiler would defeat the nightly.
fn cargo_fuzz() -> Command {
    cargo_fuzz_under(Command::new("rustup"))
}

/// [`cargo_fuzz`] run by `launcher` (`rustup`, or `nice … rustup`).
fn cargo_fuzz_under(mut launcher: Command) -> Command {
    if launcher.get_program() != "rustup" {
        launcher.arg("rustup");
    }
    launcher
        .args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(workspace_root().join("monitor"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    launcher
}

/// Where a target's corpus lives: kept across runs (`cargo xtask fuzz`, which grows it), or
/// the seeds alone in a fresh directory (`cargo xtask test`: a corpus grown by long runs
/// takes longer to load than the test's run lasts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corpus {
    Kept,
    SeedsOnly,
}

/// The fuzz targets' build, started early and left to run at the lowest priority while
/// `cargo xtask test` builds and runs the test suite: the integration tests spend most of
/// their time waiting on fixtures and the kernel, and the instrumented nightly build (all
/// dependencies again, with sanitizer flags) is minutes of CPU on a fresh machine. At nice
/// 19 it takes only the CPU the tests leave idle, so their timing is not disturbed.
pub struct BackgroundBuild {
    child: std::process::Child,
    log: PathBuf,
}

impl BackgroundBuild {
    pub fn start() -> anyhow::Result<Self> {
        let log = workspace_root().join("target/fuzz-build.log");
        std::fs::create_dir_all(log.parent().expect("target/ has a parent"))?;
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut nice = Command::new("nice");
        nice.args(["-n", "19"]);
        let mut niced = cargo_fuzz_under(nice);
        niced
            .args(["build", "--fuzz-dir", "fuzz"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        eprintln!(
            "xtask: building the fuzz targets in the background at nice 19 (log: {})",
            log.display()
        );
        let child = niced
            .spawn()
            .context("starting the fuzz targets' build (`nice` from coreutils, cargo-fuzz)")?;
        Ok(Self { child, log })
    }

    /// Waits for the build; a failure shows the end of its log.
    fn finish(mut self) -> anyhow::Result<()> {
        let status = self.child.wait()?;
        if !status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "building the fuzz targets failed with {status} (whole log: {})",
                self.log.display()
            );
        }
        Ok(())
    }
}

impl Drop for BackgroundBuild {
    /// A run that failed before the fuzzers does not leave the build running behind it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Builds every target (or waits for `prebuilt`, the build started earlier), then runs
/// `only` (or each target) for `seconds`, each from its seeded corpus. Fails on the first
/// crash or hang, naming the saved input.
pub fn fuzz(
    seconds: u64,
    only: Option<&str>,
    corpus: Corpus,
    prebuilt: Option<BackgroundBuild>,
) -> anyhow::Result<()> {
    let targets: Vec<&str> = match only {
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!(
            "no fuzz target {name}; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    // One build for all targets (the monitor crate is most of it), with debug assertions
    // and overflow checks, which is cargo-fuzz's default.
    match prebuilt {
        Some(build) => build.finish()?,
        None => run(cargo_fuzz().args(["build", "--fuzz-dir", "fuzz"])).context(
            "building the fuzz targets (nightly; `cargo xtask setup` installs cargo-fuzz)",
        )?,
    }
    for target in targets {
        let (corpus, largest_seed) = seed(target, corpus)?;
        let artifacts = workspace_root().join("monitor/fuzz/artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run(cargo_fuzz()
            .args(["run", "--fuzz-dir", "fuzz", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            // libFuzzer's default cuts inputs at 1 MiB: a fixture binary would lose its
            // symbol table and section headers, which sit at its end.
            .arg(format!("-max_len={}", largest_seed.max(4096)))
            // Comparisons guide the fuzzer to magic values (vtable addresses, pids, tags).
            .arg("-use_value_profile=1")
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1"))
        .with_context(|| {
            format!(
                "fuzz target {target} found a crash or a hang; its input is in {} (replay it \
                 with `cargo +nightly fuzz run --fuzz-dir monitor/fuzz {target} <file>` from \
                 the repository root), and the fix needs a unit test replaying it",
                artifacts.display()
            )
        })?;
    }
    Ok(())
}

/// Writes `target`'s seeds into its corpus directory (see [`Corpus`]) and returns it, with
/// the size of the largest seed. Seeds are rewritten on every run; in a kept corpus what
/// libFuzzer added stays.
fn seed(target: &str, kind: Corpus) -> anyhow::Result<(PathBuf, usize)> {
    let corpus = match kind {
        Corpus::Kept => workspace_root().join("monitor/fuzz/corpus").join(target),
        Corpus::SeedsOnly => {
            let dir = workspace_root()
                .join("monitor/fuzz/target/seeds-only")
                .join(target);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            dir
        }
    };
    std::fs::create_dir_all(&corpus)?;
    let seeds: Vec<(String, Vec<u8>)> = match target {
        "elf_discovery" => executables()
            .into_iter()
            .map(|(name, path)| Ok((name, read(&path)?)))
            .collect::<anyhow::Result<_>>()?,
        "eh_frame" => {
            let mut seeds = Vec::new();
            for (name, path) in executables() {
                let data = read(&path)?;
                let file = object::File::parse(&*data)
                    .with_context(|| format!("parsing {}", path.display()))?;
                let section = file
                    .section_by_name(".eh_frame")
                    .with_context(|| format!("{} has no .eh_frame", path.display()))?;
                let contents = section.data()?;
                let seed = |contents: &[u8]| {
                    let mut seed = section.address().to_le_bytes().to_vec();
                    seed.extend_from_slice(contents);
                    seed
                };
                seeds.push((format!("{name}-whole"), seed(contents)));
                // A few KiB of whole entries: the same shapes, thousands of times faster.
                seeds.push((
                    format!("{name}-head"),
                    seed(&eh_frame_head(contents, 8 << 10)),
                ));
            }
            seeds
        }
        "dwarf_lines" => dwarf_seeds()?,
        "symbol_names" => symbol_name_seeds()?,
        "config_file" => {
            let readme = read(&workspace_root().join("README.md"))?;
            toml_blocks(&String::from_utf8_lossy(&readme))
                .into_iter()
                .enumerate()
                .map(|(i, block)| (format!("readme-{i}"), block.into_bytes()))
                .collect()
        }
        // Records are easy to make from nothing: a kind byte, a length and the bytes.
        "ring_events" => Vec::new(),
        _ => bail!("no seeds known for {target}"),
    };
    let largest = seeds.iter().map(|(_, data)| data.len()).max().unwrap_or(0);
    for (name, data) in seeds {
        std::fs::write(corpus.join(format!("seed-{name}")), data)?;
    }
    Ok((corpus, largest))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "reading {} to seed the fuzz corpus: build the fixtures first (cargo xtask fixtures)",
            path.display()
        )
    })
}

/// The fixture executables: tokio under two versions, stripped, and the heap fixture
/// dynamically and statically linked.
fn executables() -> Vec<(String, PathBuf)> {
    let paths = fixture_paths();
    let release = workspace_root().join("target/release");
    let musl = workspace_root().join(format!("target/{MUSL_TARGET}/release/heap-app"));
    vec![
        ("axum-app".into(), paths.axum_app),
        ("axum-app-lts".into(), paths.axum_app_lts),
        ("axum-app-stripped".into(), paths.axum_app_stripped),
        ("heap-app".into(), release.join("heap-app")),
        ("heap-app-musl".into(), musl),
    ]
}

/// The whole entries at the start of `.eh_frame` contents, up to about `limit` bytes,
/// closed by a zero terminator. FDEs point back at their CIE, so a prefix stays valid.
fn eh_frame_head(contents: &[u8], limit: usize) -> Vec<u8> {
    let mut end = 0;
    while end < limit {
        let Some(len) = contents.get(end..end + 4) else {
            break;
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        // 0 is the terminator, 0xffff_ffff a 64-bit length (not emitted for x86_64 code).
        if len == 0 || len == 0xffff_ffff || end + 4 + len > contents.len() {
            break;
        }
        end += 4 + len;
    }
    let mut head = contents[..end].to_vec();
    head.extend([0; 4]);
    head
}

/// The DWARF sections the `dwarf_lines` target reads, in its input order (keep in step with
/// `monitor/fuzz/fuzz_targets/dwarf_lines.rs`).
const DWARF_SECTIONS: [&str; 9] = [
    ".debug_info",
    ".debug_abbrev",
    ".debug_line",
    ".debug_str",
    ".debug_line_str",
    ".debug_ranges",
    ".debug_rnglists",
    ".debug_addr",
    ".debug_str_offsets",
];

/// The line-tables fixture's DWARF as `dwarf_lines` inputs: each section as a 4-byte length
/// and its bytes, then addresses to look up (functions of the fixture). Each section is cut
/// to its first 16 KiB, and to its first 256 KiB: the first units whole, the rest an error
/// the readers must skip (the whole sections are 11 MB, a few executions a second).
fn dwarf_seeds() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let path = workspace_root().join("target/fixtures-dwarf/release/axum-app");
    let data = read(&path)?;
    let file =
        object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
    let mut addrs: Vec<u64> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
        .map(|s| s.address() + s.size() / 2)
        .collect();
    addrs.sort_unstable();
    let step = (addrs.len() / 32).max(1);
    let addrs: Vec<u64> = addrs.into_iter().step_by(step).take(32).collect();
    let mut seeds = Vec::new();
    for (name, cut) in [("16k", 16 << 10), ("256k", 256 << 10)] {
        let mut seed = Vec::new();
        for section in DWARF_SECTIONS {
            let contents = match file.section_by_name(section) {
                Some(s) => s.uncompressed_data()?.into_owned(),
                None => Vec::new(),
            };
            let contents = &contents[..contents.len().min(cut)];
            seed.extend((contents.len() as u32).to_le_bytes());
            seed.extend_from_slice(contents);
        }
        for addr in &addrs {
            seed.extend(addr.to_le_bytes());
        }
        seeds.push((format!("axum-app-dwarf-{name}"), seed));
    }
    Ok(seeds)
}

/// Pairs of the axum fixture's raw (mangled) symbol names, `name\0other`, a few hundred
/// spread over the table: legacy and v0-mangled paths, closures, drop glue, trait impls.
fn symbol_name_seeds() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let path = fixture_paths().axum_app;
    let data = read(&path)?;
    let file =
        object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
    let names: Vec<&str> = file
        .symbols()
        .filter_map(|s| s.name().ok())
        .filter(|n| n.starts_with("_ZN") || n.starts_with("_R"))
        .collect();
    let step = (names.len() / 300).max(1);
    Ok(names
        .iter()
        .step_by(step)
        .zip(names.iter().skip(step / 2).step_by(step))
        .enumerate()
        .map(|(i, (name, other))| {
            (
                format!("symbol-{i}"),
                format!("{name}\0{other}").into_bytes(),
            )
        })
        .collect())
}

/// The contents of the ```` ```toml ```` blocks of a Markdown text.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => current = Some(String::new()),
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_toml_blocks() {
        let md = "text\n```toml\na = 1\n[b]\nc = \"d\"\n```\n```sh\nls\n```\n```toml\nx = 2\n```\n";
        assert_eq!(toml_blocks(md), vec!["a = 1\n[b]\nc = \"d\"\n", "x = 2\n"]);
    }

    #[test]
    fn cuts_eh_frame_at_an_entry() {
        // Two 8-byte entries (length 4 + 4 bytes each) and a terminator.
        let contents = [4, 0, 0, 0, 1, 2, 3, 4, 4, 0, 0, 0, 5, 6, 7, 8, 0, 0, 0, 0];
        assert_eq!(
            eh_frame_head(&contents, 1),
            [&contents[..8], &[0; 4]].concat()
        );
        assert_eq!(eh_frame_head(&contents, 100), contents);
    }
}
