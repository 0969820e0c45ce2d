//! Unit tests pinning the walker's nesting limit, its word-at-a-time string scan and its error
//! offsets (each kills a mutant `make mutants` found surviving the tests in `json.rs`).

use super::*;

fn ok(doc: &[u8]) -> Result<(), ObjectError> {
    object_fields(doc, |_, _| {})
}

/// `{"a": <n arrays or objects nested>}`.
fn nested(n: usize, arrays: bool) -> Vec<u8> {
    let (open, close) = if arrays {
        ("[", "]")
    } else {
        (r#"{"k":"#, "}")
    };
    let mut v = String::from(r#"{"a":"#);
    v.push_str(&open.repeat(n));
    v.push_str(if arrays { "" } else { "1" });
    v.push_str(&close.repeat(n));
    v.push('}');
    v.into_bytes()
}

#[test]
fn nesting_is_limited_the_same_for_arrays_and_objects() {
    // The top-level object is depth 0, its values depth 1: MAX_DEPTH levels below it fit, the
    // innermost `[]` or the innermost object's value `1` being the last.
    for (arrays, fits) in [(true, MAX_DEPTH), (false, MAX_DEPTH - 1)] {
        assert!(ok(&nested(fits, arrays)).is_ok(), "arrays {arrays}");
        for deeper in [fits + 1, fits + 10] {
            assert!(
                matches!(ok(&nested(deeper, arrays)), Err(ObjectError::NotJson(_))),
                "arrays {arrays}, {deeper} levels"
            );
        }
    }
}

#[test]
fn control_bytes_are_found_wherever_the_word_scan_meets_them() {
    // Runs of control bytes fill every word of a 32-byte step alike.
    for n in [1, 8, 31, 32, 33, 64, 100] {
        for lead in 0..8 {
            let doc = format!(
                "{{\"model\":\"m\",\"c\":\"{}{}\"}}",
                "x".repeat(lead),
                "\u{1}".repeat(n)
            );
            let at = 18 + lead;
            assert_eq!(
                ok(doc.as_bytes()),
                Err(ObjectError::NotJson(at)),
                "{n} after {lead}"
            );
        }
    }
    // Quotes and backslashes at the same place of every word are each seen.
    let doc = format!("{{\"c\":\"{}\"}}", "\\\\".repeat(40));
    assert!(ok(doc.as_bytes()).is_ok());
}

#[test]
fn a_special_byte_in_the_same_place_of_two_words_of_a_step_is_seen() {
    // Two special bytes eight apart sit at the same place of two words; in the third and fourth
    // word of a 32-byte step their flags are equal, which only an OR of the four words keeps.
    for first in 0..24 {
        for special in [b'"', b'\\', 0x01] {
            let mut b = vec![b'x'; 64];
            b[first] = special;
            b[first + 8] = special;
            let r = plain_run(&b, 0);
            assert!(r <= first && first < r + 8, "{first} {special}: {r}");
        }
    }
}
