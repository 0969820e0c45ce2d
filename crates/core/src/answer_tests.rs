//! Unit tests pinning the answer limits and the usage scan of `answer` (each kills a mutant
//! `make mutants` found surviving the tests in `answer.rs`).

use super::*;

#[test]
fn answers_up_to_512_kib_are_held() {
    assert_eq!(HOLD_LIMIT_BYTES, 512 * 1024);
    assert!(fits(Some("524288"), HOLD_LIMIT_BYTES));
    assert!(!fits(Some("524289"), HOLD_LIMIT_BYTES));
}

#[test]
fn a_provider_message_is_looked_for_in_the_first_16_kib() {
    let at = |pad: usize| {
        format!(
            r#"{{"pad":"{}","error":{{"message":"busy"}}}}"#,
            "x".repeat(pad)
        )
    };
    // Past a kilobyte, within 16 KiB: found.
    assert_eq!(
        provider_message(at(2000).as_bytes()).as_deref(),
        Some("busy")
    );
    assert_eq!(
        provider_message(at(16_300).as_bytes()).as_deref(),
        Some("busy")
    );
    // Beyond 16 KiB the document is cut and no message is read.
    assert_eq!(provider_message(at(16_400).as_bytes()), None);
    assert_eq!(ERROR_READ_BYTES, 16 * 1024);
}

#[test]
fn the_usage_scan_honours_escapes_in_strings() {
    let usage = Some(Usage {
        prompt_tokens: 3,
        completion_tokens: 5,
    });
    // An escaped quote does not end the string, and the brace after it is text.
    let tail = br#"...,"usage":{"note":"\"}","prompt_tokens":3,"completion_tokens":5}}"#;
    assert_eq!(usage_in_tail(tail), usage);
    // An escaped backslash ends the escape: the quote after it closes the string.
    let tail = br#"...,"usage":{"note":"\\","prompt_tokens":3,"completion_tokens":5}}"#;
    assert_eq!(usage_in_tail(tail), usage);
    let tail = br#"...,"usage":{"a":{"b":"}"},"prompt_tokens":3,"completion_tokens":5}}"#;
    assert_eq!(usage_in_tail(tail), usage);
}

#[test]
fn the_tail_keeps_exactly_the_last_4_kib() {
    assert_eq!(TAIL_BYTES, 4096);
    let mut t = Vec::new();
    keep_tail(&mut t, &vec![b'a'; 4000]);
    keep_tail(&mut t, &[b'b'; 200]);
    assert_eq!(t.len(), TAIL_BYTES);
    assert_eq!(&t[..3896], &vec![b'a'; 3896][..]);
    assert!(t.ends_with(&[b'b'; 200]));
    // A chunk of exactly the tail's size replaces it.
    keep_tail(&mut t, &vec![b'c'; TAIL_BYTES]);
    assert_eq!(t, vec![b'c'; TAIL_BYTES]);
    let mut t = b"xy".to_vec();
    keep_tail(&mut t, &vec![b'd'; TAIL_BYTES - 2]);
    assert!(t.starts_with(b"xy") && t.len() == TAIL_BYTES);
}

#[test]
fn only_json_strings_are_messages() {
    assert_eq!(provider_message(br#"{"error":12345}"#), None);
    assert_eq!(provider_message(br#"{"error":{"message":12345}}"#), None);
    assert_eq!(provider_message(br#"{"message":true}"#), None);
    assert_eq!(
        provider_message(br#"{"error":{"message":"slow down"}}"#).as_deref(),
        Some("slow down")
    );
}

#[test]
fn a_cut_message_never_ends_in_a_space() {
    assert_eq!(sanitize("ab cd", 2), "ab");
    assert_eq!(sanitize("ab cd", 3), "ab");
    assert_eq!(sanitize("ab cd", 4), "ab c");
    assert_eq!(sanitize("ab cd", 5), "ab cd");
    assert_eq!(sanitize("ab\n\n cd", 5), "ab cd");
    assert_eq!(sanitize("ab é", 4), "ab");
    assert_eq!(sanitize("ab é", 5), "ab é");
}
