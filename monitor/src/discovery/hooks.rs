//! Uprobe hook points (spawn, spawn_blocking, completion, and first poll for task types whose
//! spawn path was inlined) and the task-header layout, both derived from the target's own
//! code.
//!
//! Inlining decides which of tokio's functions survive as symbols, and the Rust ABI decides
//! where a by-value argument lands; neither is stable across tokio versions, compilers or
//! profiles. So every instance of every hook function is reported, and the register holding
//! the header pointer is checked by disassembling each instance.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::disasm::{self, ArgEvidence, Walker};
use super::elf::Image;
use super::naming;
use super::{ArgReg, HookKind, HookPoint, Scheduler, TaskLayout, VtableLayout};

/// Generic-free demangled path of each hook kind's function.
pub(crate) fn hook_path(kind: HookKind) -> &'static str {
    match kind {
        HookKind::SpawnOwned => "tokio::runtime::task::list::OwnedTasks::bind_inner",
        HookKind::SpawnBlocking => "tokio::runtime::blocking::pool::Spawner::spawn_task",
        HookKind::Complete => "tokio::runtime::task::harness::Harness::complete",
        HookKind::FirstPoll => "tokio::runtime::task::raw::poll",
    }
}

/// Where the ABI puts the header pointer, before looking at the code:
/// - `bind_inner(&self, task: Task<S>, notified: Notified<S>)`: `Task<S>` is one pointer,
///   so it is the 2nd integer argument, `rsi`.
/// - `Spawner::spawn_task(&self, task: Task, rt: &Handle) -> Result<(), SpawnError>`: the
///   by-value `Task { task: UnownedTask (one pointer), mandatory: Mandatory (u8) }` is a
///   scalar pair passed in two registers, pointer first, so `rsi` (and `dl` for
///   `mandatory`, `rcx` for `rt`); the 16-byte `Result` comes back in `rax:rdx`, so there is
///   no hidden return pointer shifting the arguments.
/// - `Harness::complete(self)`: `Harness` wraps the header pointer, so `rdi`.
pub(crate) fn expected_arg(kind: HookKind) -> ArgReg {
    match kind {
        HookKind::SpawnOwned | HookKind::SpawnBlocking => ArgReg::Rsi,
        HookKind::Complete | HookKind::FirstPoll => ArgReg::Rdi,
    }
}

/// Functions that take a header pointer as their first argument: passing an entry register
/// to one of them in `rdi` proves that register carries the header. `State` is the
/// header's first field; the task cell's drop glue receives the cell (= header) pointer
/// when LLVM promoted its `*mut Box<Cell>` argument, which release builds do (when it does
/// not, `rdi` is a stack address and simply yields no evidence).
pub(crate) fn takes_header_first(names: &[String]) -> bool {
    names.iter().any(|n| {
        let p = naming::strip_generics(n);
        p.starts_with("tokio::runtime::task::state::State::")
            || p.starts_with("tokio::runtime::task::raw::")
            || p.starts_with("tokio::runtime::task::harness::Harness::")
            || naming::cell_drop_glue_args(n).is_some()
    })
}

/// Evidence for which argument register carries the header in the function at `addr`.
fn evidence(img: &Image, addr: u64, vtable_offset: u64) -> ArgEvidence {
    let Some((start, end)) = img.function_extent(addr) else {
        return ArgEvidence::default();
    };
    let callee = |t: u64| takes_header_first(img.names_at(t));
    disasm::track_header_args(img, start, end, Some(vtable_offset as i64), &callee)
}

/// Finds all instances of all hook kinds. Returns the hook points and warnings.
pub(crate) fn find_hooks(img: &Image, layout: &TaskLayout) -> (Vec<HookPoint>, Vec<String>) {
    let mut hooks = Vec::new();
    let mut warnings = Vec::new();
    let kinds = [
        HookKind::SpawnOwned,
        HookKind::SpawnBlocking,
        HookKind::Complete,
    ];
    let mut instances: BTreeMap<u64, HookKind> = BTreeMap::new();
    for kind in kinds {
        for addr in img.find_functions(hook_path(kind)) {
            instances.insert(addr, kind);
        }
    }
    let callers = callers_of(img, &instances.keys().copied().collect::<Vec<_>>());
    // Callers that name no scheduler (e.g. the generic `OwnedTasks<S>::bind` in unoptimised
    // builds) are looked through once more.
    let unmarked: Vec<u64> = callers
        .values()
        .flatten()
        .copied()
        .filter(|&c| {
            !img.names_at(c)
                .iter()
                .any(|n| naming::scheduler_in_name(n).is_some())
        })
        .collect();
    let callers2 = callers_of(img, &unmarked);

    for kind in kinds {
        let addrs: Vec<u64> = instances
            .iter()
            .filter(|(_, k)| **k == kind)
            .map(|(a, _)| *a)
            .collect();
        if addrs.is_empty() {
            warnings.push(missing_warning(kind));
            continue;
        }
        for addr in addrs {
            let names = img.names_at(addr);
            let symbol = names
                .iter()
                .find(|n| naming::strip_generics(n) == hook_path(kind))
                .cloned()
                .unwrap_or_else(|| hook_path(kind).to_string());
            let Some(file_offset) = img.file_offset(addr) else {
                warnings.push(format!(
                    "{symbol} at 0x{addr:x} is not backed by the file; it cannot be probed"
                ));
                continue;
            };
            let ev = evidence(img, addr, layout.vtable_offset);
            log::debug!(
                "{symbol} at 0x{addr:x}: header-use evidence per rdi,rsi,rdx,rcx,r8,r9 = {:?}",
                ev.header_uses
            );
            let expected = expected_arg(kind);
            // `bind_inner` also gets the header in rdx (`notified` is a second handle to
            // the same task), so several registers can carry evidence; the ABI's choice
            // wins whenever the code backs it.
            let (header_arg, verified) = match disasm::best_arg(&ev) {
                _ if ev.header_uses[expected.position()] > 0 => (expected, true),
                Some(a) => {
                    warnings.push(format!(
                        "{symbol} at 0x{addr:x}: the header pointer arrives in {a} according to \
                         its code, not {expected} as the ABI suggests; using {a}"
                    ));
                    (a, true)
                }
                None => {
                    warnings.push(format!(
                        "{symbol} at 0x{addr:x}: could not confirm from its code that the header \
                         pointer is in {expected}; assuming it"
                    ));
                    (expected, false)
                }
            };
            let schedulers = match kind {
                HookKind::SpawnBlocking => vec![Scheduler::Blocking],
                _ => {
                    let mut v: Vec<Scheduler> = Vec::new();
                    let direct: Vec<u64> = callers.get(&addr).cloned().unwrap_or_default();
                    let indirect = direct
                        .iter()
                        .filter_map(|c| callers2.get(c))
                        .flatten()
                        .copied();
                    let all: Vec<u64> = direct.iter().copied().chain(indirect).collect();
                    let caller_names = all.iter().flat_map(|&c| img.names_at(c));
                    for n in names.iter().chain(caller_names) {
                        if let Some(s) = naming::scheduler_in_name(n)
                            && !v.contains(&s)
                        {
                            v.push(s);
                        }
                    }
                    v.sort_by_key(|s| *s as u8);
                    v
                }
            };
            hooks.push(HookPoint {
                kind,
                symbol,
                vaddr: addr,
                file_offset,
                header_arg,
                header_arg_verified: verified,
                schedulers,
            });
        }
    }
    (hooks, warnings)
}

/// Warnings for runtime flavours whose spawns no `SpawnOwned` hook covers.
///
/// `bind_inner` is generic over the scheduler: each flavour the program spawns on needs an
/// instance (or one folded instance serving both, as in the tokio 1.47 fixture). Inlining
/// can remove one flavour's copy (seen in small programs), and then that flavour's spawns
/// are invisible to the spawn probe. Flavours without task vtables are not in use and are
/// not reported.
pub(crate) fn spawn_coverage_warnings(
    hooks: &[HookPoint],
    vtables: &[super::TaskVtable],
) -> Vec<String> {
    let mut warnings = Vec::new();
    let owned: Vec<&HookPoint> = hooks
        .iter()
        .filter(|h| h.kind == HookKind::SpawnOwned)
        .collect();
    if owned.is_empty() {
        return warnings; // already reported as a missing hook
    }
    let served: Vec<Scheduler> = owned.iter().flat_map(|h| h.schedulers.clone()).collect();
    if served.is_empty() {
        warnings.push(format!(
            "could not tell which runtime flavour each of the {} OwnedTasks::bind_inner \
             instance(s) serves (no recognisable callers)",
            owned.len()
        ));
        return warnings;
    }
    for flavour in [Scheduler::CurrentThread, Scheduler::MultiThread] {
        let used = vtables.iter().any(|v| v.scheduler == Some(flavour));
        if used && !served.contains(&flavour) {
            warnings.push(format!(
                "no OwnedTasks::bind_inner instance serves the {flavour} scheduler (inlined); \
                 spawns on a {flavour} runtime will not hit the spawn hook"
            ));
        }
    }
    warnings
}

fn missing_warning(kind: HookKind) -> String {
    match kind {
        HookKind::SpawnOwned => format!(
            "no spawn hook found: {} was inlined or renamed in this build; task spawns will \
             only be seen through first polls",
            hook_path(kind)
        ),
        HookKind::SpawnBlocking => format!(
            "no spawn_blocking hook found: {} is absent (inlined, or spawn_blocking unused); \
             blocking tasks will only be seen through first polls",
            hook_path(kind)
        ),
        HookKind::Complete => format!(
            "no completion hook found: {} is absent (inlined); completed tasks cannot be told \
             from leaked ones except by their release",
            hook_path(kind)
        ),
        HookKind::FirstPoll => String::new(),
    }
}

/// First-poll hooks for the task vtables no spawn hook covers: `bind_inner` serves one
/// scheduler per instance, and when LLVM inlined it for a flavour (a small program with one
/// spawned type, say), spawns on that flavour would go unseen; `Spawner::spawn_task` likewise
/// for blocking tasks. The vtable's own `poll` fn is always out of line (it is called through
/// the vtable), so its first hit per task stands in for the spawn.
pub(crate) fn first_poll_hooks(
    img: &Image,
    hooks: &[HookPoint],
    vtables: &[super::TaskVtable],
) -> Vec<HookPoint> {
    let owned: Vec<&HookPoint> = hooks
        .iter()
        .filter(|h| h.kind == HookKind::SpawnOwned)
        .collect();
    let served: Vec<Scheduler> = owned.iter().flat_map(|h| h.schedulers.clone()).collect();
    let blocking_hooked = hooks.iter().any(|h| h.kind == HookKind::SpawnBlocking);
    let covered = |v: &super::TaskVtable| {
        if v.blocking || v.scheduler == Some(Scheduler::Blocking) {
            blocking_hooked
        } else {
            match v.scheduler {
                // Instances whose flavour could not be told are trusted to serve all.
                Some(flavour) => {
                    served.contains(&flavour) || (!owned.is_empty() && served.is_empty())
                }
                None => !owned.is_empty(),
            }
        }
    };
    let mut out: Vec<HookPoint> = Vec::new();
    for v in vtables.iter().filter(|v| !covered(v)) {
        if out.iter().any(|h| h.vaddr == v.poll_fn) {
            continue;
        }
        let Some(file_offset) = img.file_offset(v.poll_fn) else {
            continue;
        };
        out.push(HookPoint {
            kind: HookKind::FirstPoll,
            symbol: format!(
                "{} (first poll of {})",
                hook_path(HookKind::FirstPoll),
                v.site
            ),
            vaddr: v.poll_fn,
            file_offset,
            header_arg: ArgReg::Rdi,
            // `poll(ptr: NonNull<Header>)`: the vtable calling convention, not a guess.
            header_arg_verified: true,
            schedulers: v.scheduler.into_iter().collect(),
        });
    }
    out
}

/// Direct and GOT-indirect callers of `targets` among tokio's functions (the only place
/// `bind_inner` and friends are called from), by target.
fn callers_of(img: &Image, targets: &[u64]) -> HashMap<u64, Vec<u64>> {
    let mut out: HashMap<u64, Vec<u64>> = HashMap::new();
    if targets.is_empty() {
        return out;
    }
    // One instance per task type: a set, or each call costs their number.
    let targets: HashSet<u64> = targets.iter().copied().collect();
    for (&start, f) in &img.functions {
        if img.budget.spent() {
            break;
        }
        if !f
            .names
            .iter()
            .any(|n| n.starts_with("tokio::") || n.starts_with("<tokio::"))
        {
            continue;
        }
        let Some((s, e)) = img.function_extent(start) else {
            continue;
        };
        for instr in disasm::decode_range(img, s, e) {
            if let Some(t) = disasm::static_target(img, &instr)
                && targets.contains(&t)
                && t != start
            {
                let v = out.entry(t).or_default();
                if !v.contains(&start) {
                    v.push(start);
                }
            }
        }
    }
    out
}

/// The task layout: `vtable` as learned from the records, and the vtable pointer's offset
/// in the task header, read from the code that uses it.
///
/// `RawTask` methods are one-liners that load the vtable from the header and call through
/// it (`RawTask::shutdown`: `mov rax,[rdi+0x10]; jmp [rax+0x30]` on tokio ≥ 1.23, `[rdi+0x20]`
/// where the header still holds the owned-list pointers), so the load's displacement *is*
/// the field offset. Without symbols the same two-instruction shape is searched at
/// function-aligned addresses, requiring the `shutdown` slot to keep false matches
/// (ordinary `dyn Trait` calls) out.
pub(crate) fn header_layout(
    img: &Image,
    vtable: VtableLayout,
    warnings: &mut Vec<String>,
) -> TaskLayout {
    let mut votes: HashMap<i64, u32> = HashMap::new();
    for (&start, f) in &img.functions {
        if img.budget.spent() {
            break;
        }
        if !f
            .names
            .iter()
            .any(|n| naming::strip_generics(n).starts_with("tokio::runtime::task::raw::RawTask::"))
        {
            continue;
        }
        let Some((s, e)) = img.function_extent(start) else {
            continue;
        };
        let ev = disasm::track_header_args(img, s, e, None, &|_| false);
        for (d, n) in ev.vtable_disp_votes {
            *votes.entry(d).or_default() += n;
        }
    }
    if votes.is_empty()
        && !img.has_symtab
        && let Some(shutdown) = vtable.entry("shutdown")
    {
        votes = shutdown_shape_votes(img, 8 * shutdown as u64);
    }
    let best = votes
        .iter()
        .filter(|(d, _)| **d >= 8 && **d < 64 && **d % 8 == 0)
        .max_by_key(|(d, n)| (**n, std::cmp::Reverse(**d)));
    match best {
        Some((&d, _)) => TaskLayout {
            vtable_offset: d as u64,
            from_binary: true,
            vtable,
        },
        None => {
            warnings.push(
                "could not read the task header layout from the binary (no RawTask method \
                 found); assuming the vtable pointer at header+16 (tokio 1.29–1.54)"
                    .to_string(),
            );
            TaskLayout {
                vtable_offset: 16,
                from_binary: false,
                vtable,
            }
        }
    }
}

/// Stripped fallback of [`header_layout`]: at every 16-byte-aligned code address, look for
/// `mov r64, [rdi+d]` immediately followed by `jmp/call [r64+shutdown_slot]`.
fn shutdown_shape_votes(img: &Image, shutdown_slot: u64) -> HashMap<i64, u32> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};
    let mut votes: HashMap<i64, u32> = HashMap::new();
    for (lo, hi) in img.code_ranges() {
        let Some(bytes) = img.bytes_at(lo, hi - lo) else {
            continue;
        };
        let Some(mut a) = lo.checked_next_multiple_of(16) else {
            continue;
        };
        while hi.saturating_sub(a) >= 8 && !img.budget.spent() {
            let off = (a - lo) as usize;
            let end = (off + 16).min(bytes.len());
            let mut dec = Decoder::with_ip(64, &bytes[off..end], a, DecoderOptions::NONE);
            let mut i1 = Instruction::default();
            let mut i2 = Instruction::default();
            dec.decode_out(&mut i1);
            dec.decode_out(&mut i2);
            let load = i1.mnemonic() == Mnemonic::Mov
                && i1.op0_kind() == OpKind::Register
                && i1.op0_register().is_gpr64()
                && i1.op1_kind() == OpKind::Memory
                && i1.memory_base() == Register::RDI
                && i1.memory_index() == Register::None;
            let through = matches!(
                i2.flow_control(),
                FlowControl::IndirectBranch | FlowControl::IndirectCall
            ) && i2.op0_kind() == OpKind::Memory
                && i2.memory_base() == i1.op0_register()
                && i2.memory_index() == Register::None
                && i2.memory_displacement64() == shutdown_slot;
            if load && through {
                *votes.entry(i1.memory_displacement64() as i64).or_default() += 1;
            }
            a += 16;
        }
    }
    votes
}

/// True when a Complete hook is reachable from both the vtable's `poll` and `shutdown`
/// entries through runtime plumbing. If `Harness::complete` was inlined into this task
/// type's harness, its completions never hit the probe and the task would look leaked.
pub(crate) fn complete_reachable(
    w: &mut Walker<'_>,
    poll_fn: u64,
    shutdown_fn: u64,
    complete_addrs: &HashSet<u64>,
) -> bool {
    if complete_addrs.is_empty() {
        return false;
    }
    let descend = |names: &[String]| {
        naming::role_of_names(names.iter().map(String::as_str), false, false).0
            == naming::Role::Plumbing
    };
    let depth = super::vtables::MAX_DEPTH;
    // A few dozen functions reached against one `complete` instance per task type: look
    // the former up in the latter.
    let from_poll = w.reachable(&[poll_fn], depth, descend);
    if !from_poll.iter().any(|a| complete_addrs.contains(a)) {
        return false;
    }
    let from_shutdown = w.reachable(&[shutdown_fn], depth, descend);
    from_shutdown.iter().any(|a| complete_addrs.contains(a))
}
