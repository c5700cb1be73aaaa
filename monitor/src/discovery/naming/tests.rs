use super::*;

#[test]
fn llvm_suffix_is_stripped() {
    assert_eq!(
        strip_llvm_suffix("_ZN5tokio7runtime4task3raw4poll17h10264484c941a21dE.llvm.123456"),
        "_ZN5tokio7runtime4task3raw4poll17h10264484c941a21dE"
    );
    assert_eq!(strip_llvm_suffix("foo.cold"), "foo.cold");
    assert_eq!(strip_llvm_suffix("foo.llvm."), "foo.llvm.");
}

#[test]
fn demangles_legacy_and_v0_without_hashes() {
    assert_eq!(
        demangle("_ZN5tokio7runtime4task3raw4poll17h10264484c941a21dE.llvm.99"),
        "tokio::runtime::task::raw::poll"
    );
    // v0: crate disambiguators must not show up in the alternate form.
    assert_eq!(
        demangle("_RNvCs1234_7___rustc12___rust_alloc"),
        "__rustc::__rust_alloc"
    );
    assert_eq!(demangle("memcpy"), "memcpy");
}

#[test]
fn label_cleanup_removes_hash_and_suffix() {
    assert_eq!(
        clean_label(
            "<tokio::runtime::scheduler::multi_thread::worker::Launch>::launch::{closure#0}"
        ),
        "tokio::runtime::scheduler::multi_thread::worker::Launch::launch::{closure#0}"
    );
    assert_eq!(
        clean_label("<tokio::task::OwnedTasks<alloc::sync::Arc<H>>>::bind_inner"),
        "tokio::task::OwnedTasks<alloc::sync::Arc<H>>::bind_inner"
    );
    assert_eq!(
        clean_label("<hyper::X<F> as core::future::future::Future>::poll"),
        "<hyper::X<F> as core::future::future::Future>::poll"
    );
    assert_eq!(
        clean_label("core::ptr::drop_in_place<(A, <B>)>"),
        "core::ptr::drop_in_place<(A, <B>)>"
    );
    let legacy_impl = "tokio::net::addr::<impl tokio::net::addr::sealed::ToSocketAddrsPriv for (&str,u16)>::to_socket_addrs::{{closure}}";
    assert_eq!(clean_label(legacy_impl), legacy_impl);
    assert_eq!(strip_generics(legacy_impl), legacy_impl);
    assert_eq!(clean_label("app::f::h0123456789abcdef"), "app::f");
    assert_eq!(clean_label("app::f::hello"), "app::f::hello");
    assert_eq!(clean_label("app::f.llvm.42"), "app::f");
}

#[test]
fn top_level_split_respects_nesting_and_arrows() {
    assert_eq!(
        split_top_level("a::B<C, D>, fn(u8, u16) -> Result<E, F>, [G; 2]"),
        vec!["a::B<C, D>", "fn(u8, u16) -> Result<E, F>", "[G; 2]"]
    );
    assert_eq!(split_top_level(""), Vec::<String>::new());
}

#[test]
fn cell_args_from_drop_glue() {
    let boxed = "core::ptr::drop_in_place<alloc::boxed::Box<tokio::runtime::task::core::Cell<axum_app::leak_forever::{{closure}}::{{closure}},alloc::sync::Arc<tokio::runtime::scheduler::current_thread::Handle>>>>";
    let (t, s) = cell_drop_glue_args(boxed).unwrap();
    assert_eq!(t, "axum_app::leak_forever::{{closure}}::{{closure}}");
    assert_eq!(
        s,
        "alloc::sync::Arc<tokio::runtime::scheduler::current_thread::Handle>"
    );
    let plain = "core::ptr::drop_in_place<tokio::runtime::task::core::Cell<hyper::H2Stream<core::pin::Pin<alloc::boxed::Box<dyn core::future::future::Future<Output = ()> + core::marker::Send>>, fn() -> u8>,tokio::runtime::blocking::schedule::BlockingSchedule>>";
    let (t, s) = cell_drop_glue_args(plain).unwrap();
    assert!(t.starts_with("hyper::H2Stream<"), "{t}");
    assert!(t.ends_with("fn() -> u8>"), "{t}");
    assert_eq!(s, "tokio::runtime::blocking::schedule::BlockingSchedule");
    assert!(cell_drop_glue_args("tokio::runtime::task::core::Cell<A,B>::new").is_none());
    assert_eq!(
        cell_drop_glue_args(
            "core::ptr::drop_in_place::<alloc::boxed::Box<tokio::runtime::task::core::Cell<app::f::{closure#0}, alloc::sync::Arc<H>>>>"
        ),
        Some(("app::f::{closure#0}".into(), "alloc::sync::Arc<H>".into()))
    );
    assert_eq!(
        raw_poll_args(
            "tokio::runtime::task::raw::poll::<app::f::{closure#0}, alloc::sync::Arc<H>>"
        ),
        Some(("app::f::{closure#0}".into(), "alloc::sync::Arc<H>".into()))
    );
    assert_eq!(raw_poll_args("tokio::runtime::task::raw::poll"), None);
    assert!(
        cell_drop_glue_args("core::ptr::drop_in_place<tokio::runtime::task::core::Stage<A>>")
            .is_none()
    );
}

#[test]
fn blocking_task_unwraps_closure() {
    assert_eq!(
        blocking_task_inner(
            "tokio::runtime::blocking::task::BlockingTask<axum_app::ok_blocking::{{closure}}::{{closure}}>"
        )
        .as_deref(),
        Some("axum_app::ok_blocking::{{closure}}::{{closure}}")
    );
    assert_eq!(blocking_task_inner("app::X<Y>"), None);
}

#[test]
fn generics_are_stripped_but_qualified_paths_kept() {
    assert_eq!(
        strip_generics("tokio::runtime::task::list::OwnedTasks<S>::bind_inner"),
        "tokio::runtime::task::list::OwnedTasks::bind_inner"
    );
    assert_eq!(
        strip_generics(
            "tokio::runtime::task::harness::Harness<app::f::{{closure}}, alloc::sync::Arc<X<Y>>>::complete"
        ),
        "tokio::runtime::task::harness::Harness::complete"
    );
    assert_eq!(
        strip_generics("tokio::runtime::task::raw::poll::<app::F, alloc::sync::Arc<H>>"),
        "tokio::runtime::task::raw::poll"
    );
    assert_eq!(
        strip_generics("<hyper::H2Stream<F,B> as core::future::future::Future>::poll"),
        "<hyper::H2Stream as core::future::future::Future>::poll"
    );
    // v0 spellings.
    assert_eq!(
        strip_generics(
            "<tokio::runtime::task::list::OwnedTasks<alloc::sync::Arc<tokio::runtime::scheduler::current_thread::Handle>>>::bind_inner"
        ),
        "tokio::runtime::task::list::OwnedTasks::bind_inner"
    );
    assert_eq!(
        strip_generics(
            "<tokio::runtime::scheduler::multi_thread::worker::Launch>::launch::{closure#0}"
        ),
        "tokio::runtime::scheduler::multi_thread::worker::Launch::launch::{closure#0}"
    );
    assert_eq!(
        strip_generics("<<A<T> as B>::C as core::future::future::Future>::poll"),
        "<<A as B>::C as core::future::future::Future>::poll"
    );
}

#[test]
fn future_impl_labels() {
    assert_eq!(
        poll_fn_label("<hyper::H2Stream<F,B> as core::future::future::Future>::poll"),
        "hyper::H2Stream<F,B>"
    );
    assert_eq!(
        poll_fn_label("axum_app::leak_forever::{{closure}}::{{closure}}"),
        "axum_app::leak_forever::{{closure}}::{{closure}}"
    );
    // Not a top-level `as Future` match.
    assert_eq!(
        future_impl_self("<A as B>::f<<C as core::future::future::Future>::poll"),
        None
    );
}

#[test]
fn roles() {
    assert_eq!(
        role("tokio::runtime::task::raw::poll", false, false),
        Role::Plumbing
    );
    assert_eq!(
        role(
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            false,
            false
        ),
        Role::Plumbing
    );
    assert_eq!(
        role(
            "<tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll",
            false,
            false
        ),
        Role::Plumbing
    );
    assert_eq!(
        role(
            "axum_app::leak_forever::{{closure}}::{{closure}}",
            false,
            false
        ),
        Role::FuturePoll
    );
    assert_eq!(
        role(
            "<hyper::proto::h2::server::H2Stream<F,B,E> as core::future::future::Future>::poll",
            false,
            false
        ),
        Role::FuturePoll
    );
    assert_eq!(
        role(
            "<alloc::boxed::Box<F> as core::future::future::Future>::poll",
            false,
            false
        ),
        Role::Library
    );
    assert_eq!(
        role(
            "core::ptr::drop_in_place<tokio::runtime::task::core::Cell<A,B>>",
            false,
            false
        ),
        Role::Library
    );
    assert_eq!(role("malloc", false, false), Role::Library);
    assert_eq!(
        role(
            "hyper::proto::h1::conn::Conn<I,B,T>::poll_read",
            false,
            false
        ),
        Role::Other
    );
    assert_eq!(role("app::work", true, false), Role::FuturePoll);
    assert_eq!(role("app::f::{closure#1}", false, false), Role::FuturePoll);
    assert_eq!(
        role(
            "<tokio::runtime::blocking::schedule::BlockingSchedule as tokio::runtime::task::Schedule>::schedule",
            true,
            false
        ),
        Role::Library
    );
}

#[test]
fn folded_names_take_the_most_permissive_role() {
    let (r, f) = role_of_names(
        ["core::ptr::drop_in_place<A>", "app::x::{{closure}}"],
        false,
        false,
    );
    assert_eq!(r, Role::FuturePoll);
    assert_eq!(f, vec!["app::x::{{closure}}"]);
    let (r, _) = role_of_names(
        ["tokio::runtime::task::raw::poll", "app::y::{{closure}}"],
        false,
        false,
    );
    // The deep pass walks through glue the release pass stops at.
    assert_eq!(role("__rust_try", false, false), Role::Library);
    assert_eq!(role("__rust_try", false, true), Role::Plumbing);
    assert_eq!(r, Role::Plumbing);
}

#[test]
fn site_comparison_ignores_generics() {
    assert!(same_site(
        "hyper::H2Stream<F,B>",
        "hyper::H2Stream<core::pin::Pin<X>,axum::body::Body>"
    ));
    assert!(!same_site("app::a::{{closure}}", "app::b::{{closure}}"));
}

#[test]
fn library_labels() {
    assert!(is_library_label("tokio::time::sleep::Sleep"));
    assert!(is_library_label(
        "<(&str, u16) as std::net::socket_addr::ToSocketAddrs>::to_socket_addrs"
    ));
    assert!(is_library_label(
        "tokio::sync::mpsc::bounded::Sender<T>::send::{{closure}}"
    ));
    assert!(is_library_label("futures_util::future::Map<Fut,F>"));
    assert!(!is_library_label(
        "axum_app::ok_bounded::{{closure}}::{{closure}}"
    ));
    assert!(!is_library_label("hyper::Svc<app::Handler>"));
    assert!(!is_library_label(
        "axum::serve::handle_connection<L,M,S>::{{closure}}::{{closure}}"
    ));
    assert!(!is_library_label("malloc"));
}

#[test]
fn related_sites() {
    assert!(related_site(
        "axum_app::ok_blocking::{{closure}}::{{closure}}",
        "axum_app::ok_blocking::{{closure}}::{{closure}}"
    ));
    assert!(related_site("hyper::H2Stream<F,B>", "hyper::H2Stream<X,Y>"));
    // A closure nested in the cell's future type, and the other way round.
    assert!(related_site(
        "app::f::{{closure}}::{{closure}}",
        "app::f::{{closure}}"
    ));
    assert!(related_site(
        "app::f::{{closure}}",
        "app::f::{{closure}}::{{closure}}"
    ));
    assert!(!related_site("app::f::{{closure}}", "app::ff::{{closure}}"));
    assert!(!related_site(
        "tokio::time::sleep::Sleep",
        "axum_app::ok_bounded::{{closure}}::{{closure}}"
    ));
}

#[test]
fn owners_and_mentions() {
    assert_eq!(
        owner_path("axum_app::ok_bounded::{{closure}}::{{closure}}").as_deref(),
        Some("axum_app::ok_bounded")
    );
    assert_eq!(
        owner_path("axum::serve::handle_connection<A,B,C>::{{closure}}::{{closure}}").as_deref(),
        Some("axum::serve::handle_connection")
    );
    assert_eq!(
        owner_path("app::f::{closure#0}::{closure#1}").as_deref(),
        Some("app::f")
    );
    assert_eq!(owner_path("main::{{closure}}"), None);
    let glue = "core::ptr::drop_in_place<<axum_app::ok_bounded as axum::handler::Handler<((),),alloc::sync::Arc<axum_app::AppState>>>::call::{{closure}}>";
    assert!(mentions_path(glue, "axum_app::ok_bounded"));
    assert!(!mentions_path(glue, "axum_app::ok"));
    assert!(!mentions_path(glue, "app::ok_bounded"));
    assert!(mentions_path("app::f::{{closure}}", "app::f"));
    assert!(mentions_path("app::f<X>::g", "app::f"));
    assert!(!mentions_path("app::foo::{{closure}}", "app::f"));
    // Found by fuzzing (symbol_names): an empty path, and a retry one byte into a
    // multi-byte character, sliced `name` out of bounds or inside a character.
    assert!(!mentions_path("J", ""));
    assert!(!mentions_path("aé", "é"));
    assert!(mentions_path("aé::f<é>::{{closure}}", "é"));
}

#[test]
fn schedulers_in_names() {
    use super::super::Scheduler;
    assert_eq!(
        scheduler_in_name("alloc::sync::Arc<tokio::runtime::scheduler::current_thread::Handle>"),
        Some(Scheduler::CurrentThread)
    );
    assert_eq!(
        scheduler_in_name("tokio::runtime::scheduler::multi_thread::handle::Handle::bind_new_task"),
        Some(Scheduler::MultiThread)
    );
    assert_eq!(
        scheduler_in_name("tokio::runtime::blocking::schedule::BlockingSchedule"),
        Some(Scheduler::Blocking)
    );
    assert_eq!(scheduler_in_name("app::main"), None);
}
