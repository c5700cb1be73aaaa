//! The bounds on one analysis: its time budget, the files it reads, the bytes entry point.

use std::time::Duration;

use super::*;

#[test]
fn an_analysis_past_its_budget_is_a_typed_error_not_partial_results() {
    let path = fixture_path();
    let err = analyze_within(&path, None, Budget::new(Duration::ZERO)).unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::TooSlow { limit, .. } if limit.is_zero()),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "analysis of {} took longer than 0 s",
            path.display()
        )),
        "{message}"
    );
    assert!(message.contains("not watched"), "{message}");
}

#[test]
fn analysing_the_bytes_equals_analysing_the_file() {
    let path = fixture_path();
    let data = std::fs::read(&path).unwrap();
    let from_bytes = analyze_bytes(&path, data, Budget::unlimited()).expect("analysed");
    let from_file = fixture();
    let sites = |t: &TargetImage| {
        t.vtables
            .iter()
            .map(|v| (v.vaddr, v.site.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(sites(&from_bytes), sites(from_file));
    assert_eq!(from_bytes.hooks.len(), from_file.hooks.len());
    assert_eq!(from_bytes.build_id, from_file.build_id);
}

#[test]
fn what_is_not_a_regular_file_or_too_large_is_refused_before_reading() {
    // A FIFO would block the read until a writer came, a device never ends.
    let fifo = temp_path("fifo");
    let _ = std::fs::remove_file(&fifo);
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let err = analyze(path).unwrap_err();
        assert!(
            matches!(err, DiscoveryError::NotAFile { .. }),
            "{}: {err:?}",
            path.display()
        );
    }
    let _ = std::fs::remove_file(&fifo);

    // Sparse: no disk space used.
    let huge = temp_path("huge");
    let file = std::fs::File::create(&huge).unwrap();
    file.set_len((1 << 30) + 1).unwrap();
    let err = analyze(&huge).unwrap_err();
    let _ = std::fs::remove_file(&huge);
    assert!(
        matches!(err, DiscoveryError::TooLarge { size, limit, .. } if size == (1 << 30) + 1 && limit == 1 << 30),
        "{err:?}"
    );
}
