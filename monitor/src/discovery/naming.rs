//! Symbol-name handling: demangling, label cleanup, generic-argument parsing and the
//! classification that tells runtime plumbing apart from a spawned future's own code.
//!
//! Everything here is pure string logic so it can be unit-tested without a binary. The
//! rules are tuned on real release builds (tokio 1.47 and 1.54, axum 0.8, hyper 1.x): the
//! compiler's names are the only record of *which* future a task vtable belongs to, and
//! a wrong label sends the user after the wrong handler, so the rules err towards "not a
//! candidate" and let the drop-glue fallback speak instead.

/// Strips the `.llvm.<digits>` suffix that ThinLTO/LTO appends to promoted local symbols.
///
/// The suffix breaks demangling of legacy names and makes two copies of the same function
/// look different, so it goes before anything else looks at a name.
pub(crate) fn strip_llvm_suffix(raw: &str) -> &str {
    if let Some(pos) = raw.find(".llvm.") {
        let rest = &raw[pos + ".llvm.".len()..];
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return &raw[..pos];
        }
    }
    raw
}

/// Demangles a raw symbol (legacy `_ZN…E` or v0 `_R…`) into the alternate form, which
/// omits legacy hashes and v0 crate disambiguators, so equal paths compare equal across
/// builds. Names that are not Rust (libc, `_start`, …) are returned unchanged.
pub(crate) fn demangle(raw: &str) -> String {
    let base = strip_llvm_suffix(raw);
    match rustc_demangle::try_demangle(base) {
        Ok(d) => clean_label(&format!("{d:#}")),
        Err(_) => base.to_string(),
    }
}

/// Final cosmetic cleanup for anything shown to a user: removes a trailing legacy hash
/// (`::h0123456789abcdef`) that survived because the name was not demangled, and any
/// `.llvm.` suffix.
pub(crate) fn clean_label(name: &str) -> String {
    let mut name = strip_llvm_suffix(name.trim());
    if let Some(pos) = name.rfind("::h") {
        let hash = &name[pos + 3..];
        if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            name = &name[..pos];
        }
    }
    if name.contains('<') {
        normalize_path(name, false)
    } else {
        name.to_string()
    }
}

/// Returns the byte index of the bracket that closes the one opened at `open`.
///
/// Understands `<>`, `()` and `[]`, and ignores the `>` of `->` in fn-pointer and closure
/// signatures (`dyn Fn() -> Result<T, E>`), which otherwise would unbalance the count.
fn matching_close(s: &str, open: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    for i in open..bytes.len() {
        match bytes[i] {
            b'<' | b'(' | b'[' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b'>' | b')' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits `s` at commas that are not nested inside any bracket, trimming each part.
///
/// Generic argument lists nest arbitrarily (`Cell<Map<F, fn(A, B) -> C>, Arc<H>>`), so a
/// plain `split(',')` would cut types in half.
pub(crate) fn split_top_level(s: &str) -> Vec<String> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for i in 0..bytes.len() {
        match bytes[i] {
            b'<' | b'(' | b'[' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b'>' | b')' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                parts.push(s[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = s[start..].trim();
    if !last.is_empty() || !parts.is_empty() {
        parts.push(last.to_string());
    }
    parts
}

/// Finds `head<…>` in `name` and returns its top-level generic arguments.
pub(crate) fn generic_args_after(name: &str, head: &str) -> Option<Vec<String>> {
    let needle = format!("{head}<");
    let start = name.find(&needle)?;
    let open = start + head.len();
    let close = matching_close(name, open)?;
    Some(split_top_level(&name[open + 1..close]))
}

const CELL: &str = "tokio::runtime::task::core::Cell";
const BLOCKING_TASK: &str = "tokio::runtime::blocking::task::BlockingTask";

/// For a drop-glue name such as `core::ptr::drop_in_place<tokio::runtime::task::core::Cell<T,S>>`
/// or `…drop_in_place<alloc::boxed::Box<tokio::runtime::task::core::Cell<T,S>>>`, returns
/// `(T, S)`.
///
/// Drop glue is the one place where a legacy-mangled release build spells out the future
/// type of a task, because `drop_in_place`'s type parameter is part of its path.
pub(crate) fn cell_drop_glue_args(name: &str) -> Option<(String, String)> {
    // Legacy `drop_in_place<…>`, v0 `drop_in_place::<…>`.
    if !name.starts_with("core::ptr::drop_in_place<")
        && !name.starts_with("core::ptr::drop_in_place::<")
    {
        return None;
    }
    let args = generic_args_after(name, CELL)?;
    match args.as_slice() {
        [t, s] => Some((t.clone(), s.clone())),
        _ => None,
    }
}

/// For a v0-mangled `tokio::runtime::task::raw::poll::<T, S>`, returns `(T, S)`. Legacy
/// names have no generic arguments, so this only helps builds using
/// `-C symbol-mangling-version=v0`, where it is exact.
pub(crate) fn raw_poll_args(name: &str) -> Option<(String, String)> {
    let args = generic_args_after(name, "tokio::runtime::task::raw::poll::")?;
    match args.as_slice() {
        [t, s] => Some((t.clone(), s.clone())),
        _ => None,
    }
}

/// If `ty` is `tokio::runtime::blocking::task::BlockingTask<F>`, returns `F`.
///
/// A `spawn_blocking` task's future type is this wrapper; the closure `F` is what the user
/// wrote, so labels use it (consistently for both naming methods).
pub(crate) fn blocking_task_inner(ty: &str) -> Option<String> {
    if !ty.starts_with(BLOCKING_TASK) {
        return None;
    }
    let args = generic_args_after(ty, BLOCKING_TASK)?;
    match args.as_slice() {
        [f] => Some(f.clone()),
        _ => None,
    }
}

/// Removes generic argument lists that follow a path segment and unwraps v0's inherent-impl
/// brackets, keeping trait-qualified paths: `tokio::…::OwnedTasks<Arc<H>>::bind_inner` and
/// v0's `<tokio::…::OwnedTasks<Arc<H>>>::bind_inner` both become
/// `tokio::…::OwnedTasks::bind_inner`, `raw::poll::<T, S>` becomes `raw::poll`, and
/// `<X<A> as Trait>::f` becomes `<X as Trait>::f`.
///
/// Legacy names carry generic *parameter names* (`<S>`), v0 names carry concrete types;
/// comparing without generics makes both spellings match the same hook.
pub(crate) fn strip_generics(name: &str) -> String {
    normalize_path(name, true)
}

/// Unwraps v0's inherent-impl brackets (`<X<A>>::f` → `X<A>::f`), the form legacy names
/// use, and optionally drops generic arguments (see [`strip_generics`]).
pub(crate) fn normalize_path(name: &str, drop_generics: bool) -> String {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let follows_segment = i > 0
            && (bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b'}');
        if c == b'<'
            && let Some(close) = matching_close(name, i)
        {
            let inner = normalize_path(&name[i + 1..close], drop_generics);
            if follows_segment {
                if !drop_generics {
                    out.push('<');
                    out.push_str(&inner);
                    out.push('>');
                }
            } else if top_level_as(&inner)
                || inner.starts_with("impl ")
                || !name[close + 1..].starts_with("::")
            {
                // A trait-qualified path, a legacy `<impl Trait for T>` segment, or not a
                // path prefix at all (`<A, B>` inside a tuple type, …): keep the brackets.
                out.push('<');
                out.push_str(&inner);
                out.push('>');
            } else {
                out.push_str(&inner);
            }
            i = close + 1;
            continue;
        }
        // v0 turbofish on generic functions: `raw::poll::<T, S>`.
        if drop_generics
            && follows_segment
            && name[i..].starts_with("::<")
            && !name[i + 3..].starts_with("impl ")
            && let Some(close) = matching_close(name, i + 2)
        {
            i = close + 1;
            continue;
        }
        out.push(c as char);
        i += 1;
    }
    out
}

/// True when `s` contains ` as ` outside any brackets.
fn top_level_as(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    for i in 0..bytes.len() {
        match bytes[i] {
            b'<' | b'(' | b'[' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b'>' | b')' | b']' => depth = depth.saturating_sub(1),
            b' ' if depth == 0 && s[i..].starts_with(" as ") => return true,
            _ => {}
        }
    }
    false
}

/// True when the last path segment is a closure or async block body: legacy
/// `{{closure}}`, v0 `{closure#0}` (v0 mangles async blocks as closures too).
fn is_closure_body(name: &str) -> bool {
    let last = name.rsplit("::").next().unwrap_or(name);
    last == "{{closure}}" || last.starts_with("{closure#")
}

/// If `name` is `<X as core::future::future::Future>::poll`, returns `X`.
///
/// Hand-written futures are polled through their trait impl; the user thinks of the site
/// as the type `X`, which is also how the drop-glue fallback spells it.
pub(crate) fn future_impl_self(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('<')?;
    let rest = inner.strip_suffix(" as core::future::future::Future>::poll")?;
    // Make sure the ` as ` we matched is the top-level one.
    let close = matching_close(name, 0)?;
    (close == name.len() - "::poll".len() - 1).then_some(rest)
}

/// Turns a future's poll-function name into the site label: `<X as Future>::poll` → `X`,
/// everything else unchanged.
pub(crate) fn poll_fn_label(name: &str) -> String {
    clean_label(future_impl_self(name).unwrap_or(name))
}

/// What a callee found while walking from a vtable function means for naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Runtime glue between the vtable and the future (`raw::poll` → `Harness::poll` →
    /// `Core::poll` → `catch_unwind` …): walk into it.
    Plumbing,
    /// Library code that is neither glue nor the future (`drop_in_place`, allocator,
    /// scheduler, libc): do not walk into it and never name a site after it.
    Library,
    /// Looks like a future's own poll function (an async body `…::{{closure}}` or a
    /// `<X as Future>::poll` impl).
    FuturePoll,
    /// Anything else: usually code from a future that was inlined into the glue, e.g.
    /// `hyper::proto::h1::conn::Conn::poll_read`. Naming a site after it would mislead.
    Other,
}

/// Prefixes (after an optional leading `<`) of the functions between a task vtable and the
/// future's poll function. Tuned on tokio 1.47/1.54 release builds.
const PLUMBING: &[&str] = &[
    "tokio::runtime::task::",
    "tokio::runtime::blocking::task::",
    "tokio::loom::std::unsafe_cell::",
    "core::panic::unwind_safe::AssertUnwindSafe",
    "std::panicking::",
    "std::panic::",
    "core::ops::function::FnOnce::call_once",
];

/// Extra glue walked through only in the deep (unoptimised build) pass: in release builds
/// these are inlined, and walking into them there would only widen the search.
const DEEP_PLUMBING: &[&str] = &[
    "__rust_try",
    "core::mem::drop",
    "core::pin::Pin<P>::new_unchecked",
    "<core::pin::Pin<P> as core::future::future::Future>::poll",
];

/// Prefixes of code that is never a spawn site of interest by itself.
const LIBRARY: &[&str] = &[
    "core::",
    "alloc::",
    "std::",
    "tokio::runtime::context",
    "tokio::runtime::coop",
    "tokio::task::coop",
    "tokio::runtime::scheduler::",
    "tokio::runtime::driver",
    "tokio::runtime::blocking::",
    "tokio::runtime::time",
    "tokio::runtime::io",
    "tokio::util::",
    "tokio::loom::",
    "tokio::sync::",
    "__rust",
    "_Unwind",
    "rust_",
];

fn strip_lt(name: &str) -> &str {
    name.strip_prefix('<').unwrap_or(name)
}

/// Classifies one demangled, cleaned function name (see [`Role`]).
///
/// `in_blocking` is true once the walk went through `BlockingTask::poll`: there the callee
/// is the user's `FnOnce`, which can be a plain fn item (`my::work`) rather than a closure.
/// `deep` adds [`DEEP_PLUMBING`].
pub(crate) fn role(name: &str, in_blocking: bool, deep: bool) -> Role {
    let bare = strip_lt(name);
    if PLUMBING.iter().any(|p| bare.starts_with(p))
        || (deep && DEEP_PLUMBING.iter().any(|p| name.starts_with(p)))
    {
        // `<core::pin::Pin<P> as Future>::poll` etc. are not in the list on purpose.
        return Role::Plumbing;
    }
    // `<X as Future>::poll` is judged by `X`: `<alloc::boxed::Box<F> as Future>::poll` is
    // library glue, `<hyper::…::H2Stream<F,B> as Future>::poll` is a future.
    if let Some(self_ty) = future_impl_self(name) {
        return if LIBRARY.iter().any(|p| strip_lt(self_ty).starts_with(p)) {
            Role::Library
        } else {
            Role::FuturePoll
        };
    }
    if !name.contains("::") || LIBRARY.iter().any(|p| bare.starts_with(p)) {
        return Role::Library;
    }
    if is_closure_body(name) || in_blocking {
        Role::FuturePoll
    } else {
        Role::Other
    }
}

/// Role of an address that carries several names (identical code folding): the most
/// permissive role wins for walking, and only names that look like futures are kept.
pub(crate) fn role_of_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    in_blocking: bool,
    deep: bool,
) -> (Role, Vec<&'a str>) {
    let mut plumbing = false;
    let mut futures = Vec::new();
    let mut other = false;
    for n in names {
        match role(n, in_blocking, deep) {
            Role::Plumbing => plumbing = true,
            Role::FuturePoll => futures.push(n),
            Role::Other => other = true,
            Role::Library => {}
        }
    }
    let role = if plumbing {
        Role::Plumbing
    } else if !futures.is_empty() {
        Role::FuturePoll
    } else if other {
        Role::Other
    } else {
        Role::Library
    };
    (role, futures)
}

/// True when a label derived from a poll function and a future type from drop glue name the
/// same thing, comparing without generic arguments (legacy names spell parameters, drop
/// glue spells concrete types).
pub(crate) fn same_site(poll_label: &str, future_type: &str) -> bool {
    let a = strip_generics(poll_label);
    let b = strip_generics(future_type);
    a == b
}

/// Crates whose futures are never a spawn site by themselves unless the binary says so (a
/// task cell holds them): a poll walk that ends in one of these has usually descended into
/// a user future that was inlined into the task glue, e.g. `tokio::time::sleep::Sleep`.
const LIBRARY_CRATES: &[&str] = &[
    "tokio",
    "std",
    "core",
    "alloc",
    "futures",
    "futures_util",
    "futures_core",
    "futures_channel",
    "futures_executor",
    "hyper",
    "hyper_util",
];

/// The crate names a path mentions: identifiers that start a path (`a::…` not preceded by
/// `::`). `<(&str, u16) as std::net::ToSocketAddrs>::f` mentions only `std`.
fn crate_roots(name: &str) -> impl Iterator<Item = &str> {
    let bytes = name.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            if !ident(bytes[i]) || (i > 0 && (ident(bytes[i - 1]) || bytes[i - 1] == b':')) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            if name[i..].starts_with("::") {
                return Some(&name[start..i]);
            }
        }
        None
    })
}

/// True when every crate `label` mentions is a runtime/standard library crate (see
/// [`LIBRARY_CRATES`]): `tokio::time::sleep::Sleep`, `<(&str, u16) as
/// std::net::socket_addr::ToSocketAddrs>::to_socket_addrs`. A label that mentions a user
/// crate anywhere (`hyper::Svc<app::Handler>`) is not library code.
pub(crate) fn is_library_label(label: &str) -> bool {
    let mut any = false;
    for root in crate_roots(label) {
        if !LIBRARY_CRATES.contains(&root) {
            return false;
        }
        any = true;
    }
    any
}

/// True when a poll-walk label and a task-cell future type can name the same site: the same
/// path ignoring generics, or one nested in the other at a path boundary (an inner
/// `…::{{closure}}` of the type, or the function owning a closure type). `BlockingTask<F>`
/// must already be unwrapped to `F` on the cell side.
pub(crate) fn related_site(label: &str, cell_type: &str) -> bool {
    let a = strip_generics(label);
    let b = strip_generics(cell_type);
    a == b
        || b.strip_prefix(a.as_str())
            .is_some_and(|rest| rest.starts_with("::"))
        || a.strip_prefix(b.as_str())
            .is_some_and(|rest| rest.starts_with("::"))
}

/// The item that defines a future type: the type's path without generics and without
/// trailing closure segments. `app::handler::{{closure}}::{{closure}}` (an async block in
/// `async fn handler`) → `app::handler`; `hyper::H2Stream<F, B>` → `hyper::H2Stream`.
/// `None` when less than two path segments remain (too unspecific to look for).
pub(crate) fn owner_path(future_type: &str) -> Option<String> {
    let mut p = strip_generics(future_type);
    while let Some(pos) = p.rfind("::") {
        let last = &p[pos + 2..];
        if last != "{{closure}}" && !last.starts_with("{closure#") {
            break;
        }
        p.truncate(pos);
    }
    p.contains("::").then_some(p)
}

/// True when `name` mentions the path `owner` as a whole path (not as the tail of a longer
/// path, not as a prefix of a longer identifier): `app::f` is mentioned by `app::f::{{closure}}`,
/// `<app::f as axum::Handler<T>>::call` and `app::f<X>`, not by `app::foo` or `x::app::f`.
pub(crate) fn mentions_path(name: &str, owner: &str) -> bool {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = name.as_bytes();
    // An empty path is found everywhere and is no path at all.
    if owner.is_empty() {
        return false;
    }
    let mut from = 0;
    while let Some(pos) = name.get(from..).and_then(|rest| rest.find(owner)) {
        let start = from + pos;
        let end = start + owner.len();
        let before_ok = start == 0 || !(ident(bytes[start - 1]) || bytes[start - 1] == b':');
        let after_ok = end == bytes.len() || !ident(bytes[end]);
        if before_ok && after_ok {
            return true;
        }
        // On to the next character: identifiers can be Unicode (v0 mangling), and a byte
        // past a multi-byte one is no place to slice at.
        from = start + owner.chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Which scheduler a name mentions, used to tell the two runtime flavours' copies of a
/// spawn site (and of `bind_inner`) apart.
pub(crate) fn scheduler_in_name(name: &str) -> Option<super::Scheduler> {
    use super::Scheduler;
    // tokio < 1.23 names them `blocking::schedule::NoopSchedule`, `basic_scheduler` and
    // `thread_pool`.
    if name.contains("blocking::schedule::BlockingSchedule")
        || name.contains("blocking::schedule::NoopSchedule")
    {
        Some(Scheduler::Blocking)
    } else if name.contains("scheduler::current_thread")
        || name.contains("runtime::basic_scheduler")
    {
        Some(Scheduler::CurrentThread)
    } else if name.contains("scheduler::multi_thread") || name.contains("runtime::thread_pool::") {
        Some(Scheduler::MultiThread)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
