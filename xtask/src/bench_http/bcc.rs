//! The bcc tools `bench --http` runs beside leakscope: bcc's `memleak -p`, the tool operators
//! use today, and empty programs on leakscope's own heap probe points (the trap floor).

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use leakscope_testkit::{Proc, poll};

use super::pin;

/// The sitecustomize that makes Debian bookworm's bcc 0.26 attach uprobes on recent kernels.
const BCC_SHIM: &str = r#"# Written by `cargo xtask bench --http` for its bcc tools only (PYTHONPATH).
# bcc 0.26's Python binding declares bpf_attach_uprobe with 6 of the C function's 7 arguments
# (iovisor/bcc#5236): ref_ctr_offset is whatever a register holds, and kernel 6.18 rejects
# it with EINVAL ("Failed to attach BPF to uprobe"). Pass 0, as C callers without USDT do.
import ctypes as ct
try:
    from bcc import libbcc as _libbcc
    _attach = _libbcc.lib.bpf_attach_uprobe
    _attach.argtypes = [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_ulonglong,
                        ct.c_int, ct.c_uint32]
    def _with_ref_ctr_offset(*args):
        return _attach(*args, 0) if len(args) == 6 else _attach(*args)
    _libbcc.lib.bpf_attach_uprobe = _with_ref_ctr_offset
except Exception:
    pass
"#;

/// Starts a bcc tool (`program` with `args`, the shim on its `PYTHONPATH`) and waits until
/// its log shows `ready`, which it prints once every probe is attached. Its BPF program is
/// compiled at start, on both CPUs; it is pinned to CPU 0 once attached.
fn start_bcc(
    out: &Path,
    name: &str,
    program: &str,
    args: &[String],
    ready: &str,
) -> anyhow::Result<Proc> {
    let shim = out.join("bcc-shim");
    std::fs::create_dir_all(&shim)?;
    std::fs::write(shim.join("sitecustomize.py"), BCC_SHIM)?;
    let log_path = out.join(format!("{name}.log"));
    let log = File::create(&log_path)?;
    let child = Command::new(program)
        .args(args)
        .env("PYTHONPATH", &shim)
        .env("PYTHONUNBUFFERED", "1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name} (cargo xtask setup --bench installs bcc)"))?;
    let mut process = Proc {
        child,
        name: name.into(),
    };
    let attached = poll(
        &format!("{name} attached"),
        Duration::from_secs(240),
        || -> Result<(), String> {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(status) = process.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited with {status}: {}", last_lines(&text)));
            }
            text.contains(ready)
                .then_some(())
                .ok_or_else(|| "not attached yet".to_string())
        },
    );
    if let Err(e) = attached {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        // A process that exited has said why; one still compiling has not.
        let why = if process.child.try_wait()?.is_some() {
            e
        } else {
            format!("{e} (log tail: {})", last_lines(&text))
        };
        bail!(
            "{name} did not attach: {why} (full log: {})",
            log_path.display()
        );
    }
    pin(process.pid(), 0)?;
    Ok(process)
}

/// `memleak-bpfcc -p PID` (default 5 s report interval): its first report ("Top 10
/// stacks") comes once every probe is attached.
pub(super) fn start_memleak(out: &Path, pid: u32) -> anyhow::Result<Proc> {
    start_bcc(
        out,
        "memleak-bpfcc",
        "memleak-bpfcc",
        &["-p".into(), pid.to_string()],
        "Top 10 stacks",
    )
}

/// Empty BPF programs (bcc) on exactly the probe points `leakscope --heap exact` uses in
/// process `pid`, read from `leakscope inspect --pid PID --json`: the same function offsets,
/// the same uprobe and uretprobe kinds, and no work in them. What they cost the service is
/// the floor under any per-call heap tracking on this kernel: the traps alone.
const TRAP_FLOOR: &str = r#"# Written by `cargo xtask bench --http`: the heap probes' trap floor.
import json, struct, subprocess, sys, time
from bcc import BPF

pid, leakscope = int(sys.argv[1]), sys.argv[2]
info = json.loads(subprocess.check_output([leakscope, "inspect", "--pid", str(pid), "--json"]))
probes = info["allocator"]["heap_probes"]

def vaddr(path, offset):
    # bcc takes a virtual address and maps it back to the file offset leakscope gives.
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_offset <= offset < p_offset + p_filesz:
            return offset - p_offset + p_vaddr
    raise SystemExit(f"{path}: no loaded segment holds file offset {offset:#x}")

b = BPF(text="int noop(void *ctx) { return 0; }")
for p in probes:
    attach = b.attach_uretprobe if p["program"] == "AllocReturn" else b.attach_uprobe
    attach(name=p["target"], addr=vaddr(p["target"], p["file_offset"]), fn_name="noop", pid=pid)
print(f"attached {len(probes)} empty heap probes", flush=True)
while True:
    time.sleep(3600)
"#;

pub(super) fn start_trap_floor(out: &Path, pid: u32, leakscope: &Path) -> anyhow::Result<Proc> {
    let script = out.join("trap-floor.py");
    std::fs::write(&script, TRAP_FLOOR)?;
    // Debian's python3, where bcc is installed (a python3 earlier on PATH may lack it).
    start_bcc(
        out,
        "heap-trap-floor",
        "/usr/bin/python3",
        &[
            script.display().to_string(),
            pid.to_string(),
            leakscope.display().to_string(),
        ],
        "empty heap probes",
    )
}

/// The last meaningful lines of a log, without the compiler's warnings about kernel headers.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("In file included")
                && !l.contains("warning:")
                && !l.contains("note:")
                && !l.starts_with('^')
                && !l.starts_with('#')
                && !l.starts_with("extern")
                && !l.contains("#define")
        })
        .collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
