use super::api::*;
use super::code::*;
use super::kernel_rules::*;
use super::placement::*;
use super::*;
use crate::discovery::ArgReg;
use monitor_common::heap::arg_location;

// ---- kernel emulation rules -------------------------------------------------------

#[test]
fn treatment_follows_the_kernel_rules() {
    use Emulation::*;
    use Treatment::*;
    let cases: &[(&[u8], Treatment)] = &[
        (&[0x41, 0x54], Emulated(Push)),               // push r12
        (&[0x55], Emulated(Push)),                     // push rbp
        (&[0x53], Emulated(Push)),                     // push rbx
        (&[0x48, 0x55], SingleStep),                   // rex.w push rbp
        (&[0x66, 0x50], SingleStep),                   // push ax
        (&[0x48, 0x85, 0xff], SingleStep),             // test rdi,rdi
        (&[0x0f, 0x84, 0xbf, 0, 0, 0], Emulated(Jcc)), // je rel32
        (&[0x74, 0x09], Emulated(Jcc)),                // je rel8
        (&[0xe9, 1, 2, 3, 4], Emulated(Jmp)),          // jmp rel32
        (&[0xeb, 0x10], Emulated(Jmp)),                // jmp rel8
        (&[0xe8, 1, 2, 3, 4], Emulated(Call)),         // call rel32
        (&[0x66, 0xe9, 1, 2], Rejected),               // jmpw: -ENOTSUPP
        (&[0x90], Emulated(Nop)),
        (&[0x66, 0x90], Emulated(Nop)),
        (&[0xf3, 0x90], Emulated(Nop)),             // pause
        (&[0x41, 0x90], Unsafe),                    // xchg r8,rax
        (&[0x0f, 0x1f, 0x44, 0, 0], Emulated(Nop)), // nopl 0(rax,rax,1)
        (&[0x0f, 0x1f, 0x80, 0, 0, 0, 0], Emulated(Nop)),
        (&[0x66, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], SingleStep), // nopw, not x86_nops[9]
        (&[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], Rejected), // cs nopw
        (&[0x3e, 0xff, 0xe0], Rejected),                        // notrack jmp rax
        (&[0xf0, 0x48, 0x0f, 0xb1, 0x0a], Rejected),            // lock cmpxchg
        (&[0xf3, 0x0f, 0x1e, 0xfa], SingleStep),                // endbr64
        (&[0xc3], SingleStep),                                  // ret
        (&[0xff, 0x25, 0, 0, 0, 0], SingleStep),                // jmp [rip+x]
        (&[0x48, 0x83, 0xec, 0x10], SingleStep),                // sub rsp,0x10
        (&[0xcc], Rejected),                                    // int3
        (&[0x8e, 0xd0], Rejected),                              // mov ss,eax
        (&[0xc5, 0xf8, 0x77], SingleStep),                      // vzeroupper
    ];
    for (bytes, want) in cases {
        assert_eq!(kernel_treatment(bytes), *want, "bytes {bytes:02x?}");
    }
}

// ---- entry-site choice on hand-made code ------------------------------------------

/// The allocator entry `f` whose machine code is `code`, as discovery describes it.
pub(crate) fn describe_code(code: &[u8], role: AllocRole) -> AllocFn {
    let mut img = super::super::elf::code_image(0x1000, code);
    img.functions.insert(
        0x1000,
        super::super::elf::FnInfo {
            size: code.len() as u64,
            names: vec!["f".to_string()],
        },
    );
    let ctx = Ctx::new(&img, Path::new("/synthetic"));
    ctx.describe(0x1000, "f".to_string(), role, AllocFamily::Libc)
        .expect("describable")
}

#[test]
fn free_like_prologue_moves_past_the_single_stepped_test() {
    // test rdi,rdi; je +1; push rbx; ... ; ret
    let code = [0x48, 0x85, 0xff, 0x74, 0x02, 0x53, 0x5b, 0xc3];
    let f = describe_code(&code, AllocRole::Free);
    assert_eq!(f.entry_probe.offset, 3, "{:?}", f.prologue);
    assert_eq!(f.entry_probe.treatment, Treatment::Emulated(Emulation::Jcc));
    assert!(f.entry_probe.emulated);
    assert_eq!(f.entry_probe.intact_args, vec![ArgReg::Rdi]);
    assert_eq!(f.returns.len(), 1);
    assert_eq!(f.returns[0].offset, 7);
    assert!(!f.returns[0].emulated, "the kernel single-steps ret");
    assert!(!f.tail_calls);
}

#[test]
fn site_stays_at_entry_when_an_argument_is_overwritten() {
    // mov rdi,rax; je +0; ret — `free` needs rdi.
    let code = [0x48, 0x89, 0xc7, 0x74, 0x00, 0xc3];
    let f = describe_code(&code, AllocRole::Free);
    assert_eq!(f.entry_probe.offset, 0);
    assert!(!f.entry_probe.emulated);
    // Writing a register the hook does not need is fine, and reported.
    // mov rsi,rax; je +0; ret — malloc needs only rdi.
    let code = [0x48, 0x89, 0xc6, 0x74, 0x00, 0xc3];
    let f = describe_code(&code, AllocRole::Malloc);
    assert_eq!(f.entry_probe.offset, 3);
    assert_eq!(f.entry_probe.intact_args, vec![ArgReg::Rdi]);
}

#[test]
fn site_follows_an_argument_copied_to_another_register() {
    // mimalloc's mi_free: mov rax,[rip]; mov rdx,rdi; mov rsi,rdi; shr rdx,0x1d;
    // mov rdi,[rax+rdx*8]; test rdi,rdi; je +0; ret. The pointer survives in rsi only.
    let code = [
        0x48, 0x8b, 0x05, 0, 0, 0, 0, 0x48, 0x89, 0xfa, 0x48, 0x89, 0xfe, 0x48, 0xc1, 0xea, 0x1d,
        0x48, 0x8b, 0x3c, 0xd0, 0x48, 0x85, 0xff, 0x74, 0x00, 0xc3,
    ];
    let f = describe_code(&code, AllocRole::Free);
    assert_eq!(f.entry_probe.offset, 24, "{:?}", f.prologue);
    assert!(f.entry_probe.emulated);
    assert_eq!(f.entry_probe.intact_args, vec![ArgReg::Rdi]);
    let moved = &f.entry_probe.moved_args;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!((moved[0].arg, moved[0].register), (ArgReg::Rdi, "rsi"));
    assert_eq!(
        arg_location::of(f.entry_probe.arg_cookie(), 0),
        arg_location::RSI
    );
    // A 32-bit copy zero-extends: not the argument any more, so the site stays at 0.
    // mov esi,edi; mov rdi,rax; je +0; ret
    let code = [0x89, 0xfe, 0x48, 0x89, 0xc7, 0x74, 0x00, 0xc3];
    let f = describe_code(&code, AllocRole::Free);
    assert_eq!(f.entry_probe.offset, 0, "{:?}", f.prologue);
    assert_eq!(f.entry_probe.arg_cookie(), 0);
    // Swapped through a third register, both arguments stay readable.
    // mov rax,rdi; mov rdi,rsi; mov rsi,rax; je +0; ret (aligned_alloc: align, size)
    let code = [
        0x48, 0x89, 0xf8, 0x48, 0x89, 0xf7, 0x48, 0x89, 0xc6, 0x74, 0x00, 0xc3,
    ];
    let f = describe_code(&code, AllocRole::AlignedAlloc);
    assert_eq!(f.entry_probe.offset, 9, "{:?}", f.prologue);
    let cookie = f.entry_probe.arg_cookie();
    assert_eq!(arg_location::of(cookie, 0), arg_location::RSI);
    assert_eq!(arg_location::of(cookie, 1), arg_location::RDI);
}

#[test]
fn site_stays_at_entry_across_stack_writes_and_branch_targets() {
    // sub rsp,8; je +0; ret — rsp changes before the jcc.
    let code = [0x48, 0x83, 0xec, 0x08, 0x74, 0x00, 0xc3];
    assert_eq!(describe_code(&code, AllocRole::Free).entry_probe.offset, 0);
    // test rdi,rdi; je +1; ret; jmp back to +3 (the je) — the site is a branch target.
    let code = [0x48, 0x85, 0xff, 0x74, 0x01, 0xc3, 0xeb, 0xfb];
    let f = describe_code(&code, AllocRole::Free);
    assert_eq!(f.entry_probe.offset, 0, "{:?}", f.prologue);
    // A loop back to the entry itself is harmless.
    let code = [0x48, 0x85, 0xff, 0x74, 0x01, 0xc3, 0xeb, 0xf8];
    assert_eq!(describe_code(&code, AllocRole::Free).entry_probe.offset, 3);
}

#[test]
fn tail_jumps_are_exits() {
    // test rdi,rdi; je +5; jmp [rip+0]; ret
    let code = [0x48, 0x85, 0xff, 0x74, 0x06, 0xff, 0x25, 0, 0, 0, 0, 0xc3];
    let f = describe_code(&code, AllocRole::Free);
    assert!(f.tail_calls);
    assert_eq!(f.exits.len(), 1);
    assert_eq!(f.exits[0].kind, ExitKind::Indirect);
    assert_eq!(f.exits[0].offset, 5);
}

// ---- glibc ----------------------------------------------------------------------------

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

fn libc_image() -> AllocatorImage {
    // Any executable will do as the "process"; the library is what is checked.
    let exe = std::env::current_exe().expect("test binary path");
    find_allocators(&exe, &[PathBuf::from(LIBC)]).expect("analysable")
}

#[test]
fn glibc_free_is_probed_past_its_test_on_an_emulated_instruction() {
    let a = libc_image();
    assert_eq!(a.libc.as_deref(), Some(Path::new(LIBC)));
    let free = a.by_symbol("free").expect("free in libc");
    assert_eq!(free.family, AllocFamily::Libc);
    assert_ne!(free.entry_probe.offset, 0, "{:?}", free.prologue);
    assert!(free.entry_probe.emulated, "{:?}", free.prologue);
    assert!(free.entry_probe.intact_args.contains(&ArgReg::Rdi));
    assert!(!free.returns.is_empty());
    for f in &a.functions {
        if f.family != AllocFamily::Libc {
            continue;
        }
        assert!(
            f.entry_probe.offset < f.size,
            "{}: {:?}",
            f.symbol,
            f.prologue
        );
        assert_eq!(
            f.entry_probe.file_offset,
            f.file_offset + f.entry_probe.offset,
            "{}",
            f.symbol
        );
    }
}

#[test]
fn this_process_libc_is_found_through_proc_root() {
    let exe = std::env::current_exe().expect("test binary path");
    let a = find_allocators(
        &exe,
        &crate::targets::maps::mapped_libraries(std::process::id()),
    )
    .expect("analysable");
    let libc = a
        .libc
        .as_ref()
        .unwrap_or_else(|| panic!("{:?}", a.warnings));
    assert!(libc.starts_with("/proc/"), "{}", libc.display());
    let free = a.by_symbol("free").expect("free");
    assert_eq!(&free.file, libc);
    assert!(free.entry_probe.emulated, "{:?}", free.prologue);
}

#[test]
fn glibc_malloc_family_is_found() {
    let a = libc_image();
    for (sym, role) in LIBC_API {
        let f = a
            .by_symbol(sym)
            .unwrap_or_else(|| panic!("{sym} not found in {LIBC}: {:?}", a.warnings));
        assert_eq!(f.role, role);
        assert_eq!(f.file, Path::new(LIBC));
    }
    let malloc = a.by_symbol("malloc").unwrap();
    assert_eq!(malloc.args.size, Some(ArgReg::Rdi));
    assert_eq!(malloc.args.ret, RetValue::Ptr);
    let pm = a.by_symbol("posix_memalign").unwrap();
    assert_eq!(pm.args.out_ptr, Some(ArgReg::Rdi));
    assert_eq!(pm.args.size, Some(ArgReg::Rdx));
    // Entry points are emulated wherever glibc's prologue allows it.
    for sym in ["malloc", "calloc", "realloc", "free"] {
        let f = a.by_symbol(sym).unwrap();
        assert!(f.entry_probe.emulated, "{sym}: {:?}", f.prologue);
    }
}

// ---- the heap-app fixture, one build per global allocator -----------------------------

const SYSTEM_BUILD: &str = "cargo build --release -p heap-app";
const JEMALLOC_BUILD: &str = "cargo build --release -p heap-app --features jemalloc \
                              --target-dir target/fixtures-jemalloc";
const MIMALLOC_BUILD: &str = "cargo build --release -p heap-app --features mimalloc \
                              --target-dir target/fixtures-mimalloc";

/// `<workspace>/target/<dir>/release/heap-app`, which must exist.
fn heap_app(dir: &str, build: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join(dir)
        .join("release/heap-app");
    assert!(
        path.exists(),
        "fixture binary {} is missing; build it from the workspace root with: {build}",
        path.display()
    );
    path
}

#[test]
#[should_panic(expected = "build it from the workspace root with: cargo build --release")]
fn missing_fixture_names_its_build_command() {
    heap_app("no-such-fixture-dir", SYSTEM_BUILD);
}

fn analyse_fixture(dir: &str, build: &str) -> AllocatorImage {
    let exe = heap_app(dir, build);
    find_allocators(&exe, &[PathBuf::from(LIBC)])
        .unwrap_or_else(|e| panic!("{}: {e}", exe.display()))
}

/// All four shims are found in the executable with entry probes inside them, and lead to
/// `want`.
fn check_shims(a: &AllocatorImage, want: GlobalAllocator) {
    assert_eq!(a.global, want, "evidence: {:?}", a.evidence);
    for (last, role) in SHIMS {
        let f = a
            .shim(role)
            .unwrap_or_else(|| panic!("{last} not found: {:?}", a.warnings));
        assert_eq!(last_segment(&f.symbol), last);
        assert_eq!(f.family, AllocFamily::RustShim);
        assert_eq!(f.file, a.exe);
        assert!(f.entry_probe.offset < f.size, "{last}: {:?}", f.prologue);
        let fwd = f.forwarding.as_ref().expect("shims carry forwarding");
        assert_eq!(fwd.allocator, want, "{last}: {fwd:?}");
        assert!(!fwd.reaches.is_empty(), "{last}: {fwd:?}");
    }
    assert_eq!(
        a.shim(AllocRole::Realloc).unwrap().args.new_size,
        Some(ArgReg::Rcx)
    );
}

#[test]
fn heap_app_system_shims_forward_through_rdl_to_libc() {
    let a = analyse_fixture("", SYSTEM_BUILD);
    check_shims(&a, GlobalAllocator::System);
    let alloc = a.shim(AllocRole::Alloc).unwrap();
    let fwd = alloc.forwarding.as_ref().unwrap();
    assert!(
        fwd.reaches.iter().any(|n| last_segment(n) == "__rdl_alloc"),
        "{fwd:?}"
    );
    assert!(fwd.reaches.iter().any(|n| n == "malloc"), "{fwd:?}");
    let dealloc = a
        .shim(AllocRole::Dealloc)
        .unwrap()
        .forwarding
        .clone()
        .unwrap();
    assert!(dealloc.reaches.iter().any(|n| n == "free"), "{dealloc:?}");
    assert_eq!(a.of_family(AllocFamily::Jemalloc).count(), 0);
    assert_eq!(a.of_family(AllocFamily::Mimalloc).count(), 0);
}

#[test]
fn heap_app_jemalloc_shims_reach_rjem() {
    let a = analyse_fixture("fixtures-jemalloc", JEMALLOC_BUILD);
    check_shims(&a, GlobalAllocator::Jemalloc);
    for sym in ["_rjem_malloc", "_rjem_mallocx", "_rjem_sdallocx"] {
        let f = a.by_symbol(sym).unwrap_or_else(|| panic!("{sym} missing"));
        assert_eq!(f.family, AllocFamily::Jemalloc);
        assert_eq!(f.file, a.exe);
    }
    let dealloc = a
        .shim(AllocRole::Dealloc)
        .unwrap()
        .forwarding
        .clone()
        .unwrap();
    assert!(
        dealloc.reaches.iter().any(|n| n == "_rjem_sdallocx"),
        "{dealloc:?}"
    );
}

#[test]
fn heap_app_mimalloc_shims_reach_mi() {
    let a = analyse_fixture("fixtures-mimalloc", MIMALLOC_BUILD);
    check_shims(&a, GlobalAllocator::Mimalloc);
    for sym in ["mi_malloc_aligned", "mi_free"] {
        let f = a.by_symbol(sym).unwrap_or_else(|| panic!("{sym} missing"));
        assert_eq!(f.family, AllocFamily::Mimalloc);
        // Both begin with instructions the kernel single-steps and reuse their argument
        // registers before the first emulated one: the probe follows the moved argument.
        assert!(f.entry_probe.emulated, "{sym}: {:?}", f.prologue);
        let essential = f.args.essential(f.role);
        assert!(
            essential
                .iter()
                .all(|r| f.entry_probe.intact_args.contains(r)),
            "{sym}: {:?}",
            f.entry_probe
        );
    }
    // Every probe of the mimalloc build is on an emulated instruction.
    for f in a.of_family(AllocFamily::Mimalloc) {
        assert!(f.entry_probe.emulated, "{}: {:?}", f.symbol, f.prologue);
    }
    let alloc = a
        .shim(AllocRole::Alloc)
        .unwrap()
        .forwarding
        .clone()
        .unwrap();
    assert!(
        alloc.reaches.iter().any(|n| n == "mi_malloc_aligned"),
        "{alloc:?}"
    );
}
