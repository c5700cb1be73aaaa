//! `leakscope inspect`: what discovery found in a binary, as a person reads it.

use std::fmt::Write as _;

use crate::bpf::plan::HeapAttachPoint;
use crate::discovery::alloc::AllocatorImage;
use crate::discovery::{HookKind, NamingMethod, TargetImage};

pub fn render_table(image: &TargetImage) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "binary:      {}", image.path.display());
    if let Some(id) = &image.build_id {
        let _ = writeln!(out, "build-id:    {id}");
    }
    let _ = writeln!(
        out,
        "symbols:     {}",
        if image.stripped {
            "stripped"
        } else {
            "present"
        }
    );
    if let Some(why) = &image.tasks_unreadable {
        let _ = writeln!(out, "tasks:       NOT READ: {why}");
        let _ = writeln!(
            out,
            "heap:        tracked with --heap exact|sampled (task_site=\"{}\")",
            crate::state::heap::TASKS_UNREAD
        );
        if image.vtables.is_empty() {
            // Its one warning is the line above.
            for warning in image.warnings.iter().filter(|w| *w != why) {
                let _ = writeln!(out, "\nwarning: {warning}");
            }
            return out;
        }
    }
    let _ = writeln!(
        out,
        "task header: vtable pointer at +{} ({})",
        image.layout.vtable_offset,
        if image.layout.from_binary {
            "read from the binary's code"
        } else {
            "assumed: not found in the code"
        }
    );
    let vtable = &image.layout.vtable;
    let _ = writeln!(
        out,
        "task vtable: {} entries ({}){} ({})",
        vtable.entries.len(),
        vtable.entries.join(", "),
        if vtable.offsets {
            ", then trailer, scheduler and id offsets"
        } else {
            ", no offsets (task ids not read)"
        },
        if vtable.from_binary {
            "read from the binary's symbols"
        } else {
            "assumed: tokio >= 1.23 records, found by shape"
        }
    );
    let _ = writeln!(
        out,
        "\nspawn sites ({} task vtables; tokio builds one per future type and scheduler, so a \
         site appears once per runtime flavour compiled in; /metrics merges them):",
        image.vtables.len()
    );
    let _ = writeln!(
        out,
        "  {:<18} {:<14} {:<16} {:<9} site",
        "vtable", "scheduler", "found by", "complete"
    );
    for vtable in &image.vtables {
        let method = match vtable.naming {
            NamingMethod::FuturePollCall => "future poll fn",
            NamingMethod::CellDropGlue => "task cell type",
            NamingMethod::StrippedScan => "stripped scan",
        };
        let location = vtable
            .location
            .as_ref()
            .map(|l| format!("  ({l})"))
            .unwrap_or_default();
        let scheduler = vtable
            .scheduler
            .map(|s| s.to_string())
            .unwrap_or_else(|| "?".to_string());
        let _ = writeln!(
            out,
            "  {:#018x} {:<14} {:<16} {:<9} {}{}",
            vtable.vaddr,
            scheduler,
            method,
            if vtable.complete_hooked {
                "hooked"
            } else {
                "MISSING"
            },
            vtable.site,
            location
        );
    }
    let _ = writeln!(out, "\nhook points ({}):", image.hooks.len());
    for hook in &image.hooks {
        let kind = match hook.kind {
            HookKind::SpawnOwned => "spawn",
            HookKind::SpawnBlocking => "spawn_blocking",
            HookKind::Complete => "complete",
            HookKind::FirstPoll => "first poll",
        };
        let _ = writeln!(
            out,
            "  {kind:<15} {:#010x} (file offset {:#x})  {}",
            hook.vaddr, hook.file_offset, hook.symbol
        );
    }
    for warning in &image.warnings {
        let _ = writeln!(out, "\nwarning: {warning}");
    }
    out
}

/// The allocator section: which global allocator, how it was recognised, and where
/// `--heap exact` puts its probes.
pub fn render_allocator(allocators: &AllocatorImage, points: &[HeapAttachPoint]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nglobal allocator: {:?}", allocators.global);
    for line in &allocators.evidence {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "heap probes (--heap exact): {}", points.len());
    for point in points {
        let site = allocators
            .functions
            .iter()
            .find(|f| f.entry_probe.file_offset == point.file_offset && f.file == point.target)
            .map(|f| {
                let moved: String = f
                    .entry_probe
                    .moved_args
                    .iter()
                    .map(|m| format!(", {} in {}", m.arg, m.register))
                    .collect();
                format!(
                    "+{:#x} {} ({}{moved})",
                    f.entry_probe.offset,
                    f.entry_probe.insn,
                    if f.entry_probe.emulated {
                        "emulated"
                    } else {
                        "single-stepped"
                    }
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<26} {:<40} {site}",
            point.program.name(),
            point.symbol
        );
    }
    let single_stepped: Vec<&str> = allocators
        .functions
        .iter()
        .filter(|f| !f.entry_probe.emulated)
        .filter(|f| {
            points
                .iter()
                .any(|p| p.file_offset == f.entry_probe.file_offset && p.target == f.file)
        })
        .map(|f| f.symbol.as_str())
        .collect();
    if !single_stepped.is_empty() {
        let _ = writeln!(
            out,
            "warning: the kernel single-steps the probed instruction of {}: about 10 µs per \
             call instead of under 1 µs",
            single_stepped.join(", ")
        );
    }
    for warning in &allocators.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::discovery::alloc::tests::describe_code;
    use crate::discovery::alloc::{AllocFn, AllocRole, GlobalAllocator};

    #[test]
    fn inspect_warns_about_single_stepped_probes() {
        // mov rdi,rax; je +0; ret — free must stay on the single-stepped mov.
        let stuck = describe_code(&[0x48, 0x89, 0xc7, 0x74, 0x00, 0xc3], AllocRole::Free);
        // test rdi,rdi; je +0; ret — malloc moves to the je.
        let fine = describe_code(&[0x48, 0x85, 0xff, 0x74, 0x00, 0xc3], AllocRole::Malloc);
        let render = |functions: Vec<AllocFn>| {
            let image = AllocatorImage {
                exe: PathBuf::from("/synthetic"),
                global: GlobalAllocator::System,
                evidence: Vec::new(),
                libc: None,
                functions,
                warnings: Vec::new(),
            };
            let points = crate::bpf::plan::heap_points(&image);
            assert!(!points.is_empty());
            render_allocator(&image, &points)
        };
        let shown = render(vec![fine.clone(), stuck]);
        assert!(
            shown.contains("warning: the kernel single-steps the probed instruction of f:"),
            "{shown}"
        );
        assert!(!render(vec![fine]).contains("single-steps"));
    }
}
