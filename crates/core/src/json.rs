//! A one-pass JSON scanner that validates a document's syntax without building a tree, and
//! hands back where the top-level fields of an object are. Request bodies and provider answers
//! are read with it: only the few fields routing and accounting need are decoded.

use std::ops::Range;

/// Max nesting accepted.
const MAX_DEPTH: usize = 128;

/// A syntax error at a byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntaxError(pub usize);

/// Why a document is not a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectError {
    /// Nothing but whitespace.
    Empty,
    /// Not JSON (syntax error at byte offset).
    NotJson(usize),
    /// JSON, but not an object.
    NotObject,
}

/// Validates that `doc` is one JSON object and calls `field(key, value)` for each top-level
/// member, in order: `key` is the raw key between its quotes (escapes not decoded), `value` the
/// byte range of the member's value in `doc`.
pub fn object_fields(
    doc: &[u8],
    mut field: impl FnMut(&[u8], Range<usize>),
) -> Result<(), ObjectError> {
    let mut s = Scanner { b: doc, i: 0 };
    s.ws();
    if s.i >= doc.len() {
        return Err(ObjectError::Empty);
    }
    if s.peek() != Some(b'{') {
        // Still tell "not JSON" from "JSON but not an object".
        s.value(0).map_err(|e| ObjectError::NotJson(e.0))?;
        s.ws();
        return Err(if s.i == doc.len() {
            ObjectError::NotObject
        } else {
            ObjectError::NotJson(s.i)
        });
    }
    s.members(0, &mut field)
        .map_err(|e| ObjectError::NotJson(e.0))?;
    s.ws();
    if s.i != doc.len() {
        return Err(ObjectError::NotJson(s.i));
    }
    Ok(())
}

/// A JSON value that is an unsigned integer (`None` for anything else: a float, a string…).
pub fn unsigned(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Appends `s` as a JSON string literal, quotes included.
pub fn push_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let escape: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => &[],
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
    out.push(b'"');
}

/// Decodes a JSON string literal (quotes included).
pub(crate) fn decode_string(lit: &[u8]) -> Option<String> {
    let inner = &lit[1..lit.len() - 1];
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(str::to_string);
    }
    serde_json::from_slice::<String>(lit).ok()
}

/// Non-zero iff the 8-byte word `w` holds a byte string scanning must look at: a quote, a
/// backslash or a control byte.
#[inline(always)]
fn special(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Non-zero iff some byte of `x` is below `n` (exact for n <= 128).
    let has_less = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    has_less(quote, 1) | has_less(backslash, 1) | has_less(w, 0x20)
}

/// The little-endian word at `b[i..i + 8]` (the caller checks the bounds).
#[inline(always)]
fn word(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

/// Skips string content that needs no attention (no quote, no backslash, no control byte), 32
/// bytes at a time while it can, then eight. Returns the index of the first such byte (or of
/// the tail shorter than a word): the lowest flagged byte of a word is exact (a borrow only
/// ever flags bytes above a real match).
#[inline(always)]
fn plain_run(b: &[u8], mut i: usize) -> usize {
    while i + 32 <= b.len()
        && special(word(b, i))
            | special(word(b, i + 8))
            | special(word(b, i + 16))
            | special(word(b, i + 24))
            == 0
    {
        i += 32;
    }
    while i + 8 <= b.len() {
        match special(word(b, i)) {
            0 => i += 8,
            flags => return i + (flags.trailing_zeros() / 8) as usize,
        }
    }
    i
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    /// The members of an object whose `{` is at the cursor, through its `}`, at nesting `depth`.
    fn members(
        &mut self,
        depth: usize,
        field: &mut impl FnMut(&[u8], Range<usize>),
    ) -> Result<(), SyntaxError> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let key = self.string_range()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            let start = self.i;
            self.value(depth + 1)?;
            field(&self.b[key.start + 1..key.end - 1], start..self.i);
            self.ws();
            match self.next() {
                Some(b',') => continue,
                Some(b'}') => return Ok(()),
                _ => return Err(SyntaxError(self.i.saturating_sub(1))),
            }
        }
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    #[inline(always)]
    fn expect(&mut self, c: u8) -> Result<(), SyntaxError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(SyntaxError(self.i))
        }
    }

    fn string_range(&mut self) -> Result<Range<usize>, SyntaxError> {
        let start = self.i;
        self.expect(b'"')?;
        loop {
            self.i = plain_run(self.b, self.i);
            match self.next() {
                Some(b'"') => return Ok(start..self.i),
                Some(b'\\') => match self.next() {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                    Some(b'u') => {
                        for _ in 0..4 {
                            match self.next() {
                                Some(c) if c.is_ascii_hexdigit() => {}
                                _ => return Err(SyntaxError(self.i.saturating_sub(1))),
                            }
                        }
                    }
                    _ => return Err(SyntaxError(self.i.saturating_sub(1))),
                },
                Some(c) if c < 0x20 => return Err(SyntaxError(self.i - 1)),
                Some(_) => {}
                None => return Err(SyntaxError(self.b.len())),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(SyntaxError(self.i));
        }
        match self.peek() {
            Some(b'"') => self.string_range().map(|_| ()),
            Some(b'{') => self.members(depth, &mut |_, _| {}),
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(b']') => return Ok(()),
                        _ => return Err(SyntaxError(self.i.saturating_sub(1))),
                    }
                }
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(SyntaxError(self.i)),
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Result<(), SyntaxError> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(SyntaxError(self.i))
        }
    }

    #[inline(always)]
    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), SyntaxError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.digits() {
            0 => return Err(SyntaxError(self.i)),
            // No leading zeros.
            n if n > 1 && self.b[int_start] == b'0' => return Err(SyntaxError(int_start)),
            _ => {}
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(SyntaxError(self.i));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(SyntaxError(self.i));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(doc: &str) -> Result<Vec<(String, String)>, ObjectError> {
        let mut out = Vec::new();
        object_fields(doc.as_bytes(), |k, v| {
            out.push((String::from_utf8_lossy(k).into_owned(), doc[v].to_string()))
        })?;
        Ok(out)
    }

    #[test]
    fn walks_top_level_members_only() {
        let got = fields(r#" { "a" : [1, {"b": 2}], "c":"x\"y", "d":{"e":null} } "#).unwrap();
        let want = [
            ("a", "[1, {\"b\": 2}]"),
            ("c", r#""x\"y""#),
            ("d", r#"{"e":null}"#),
        ];
        assert_eq!(got.len(), want.len());
        for ((k, v), (wk, wv)) in got.iter().zip(want) {
            assert_eq!((k.as_str(), v.as_str()), (wk, wv));
        }
        assert_eq!(fields("{}").unwrap(), vec![]);
    }

    #[test]
    fn classifies_what_is_not_an_object() {
        assert_eq!(fields(""), Err(ObjectError::Empty));
        assert_eq!(fields("[1]"), Err(ObjectError::NotObject));
        assert_eq!(fields("nope"), Err(ObjectError::NotJson(0)));
        assert!(matches!(fields(r#"{"a":1"#), Err(ObjectError::NotJson(_))));
        assert!(matches!(
            fields(r#"{"a":1} {}"#),
            Err(ObjectError::NotJson(_))
        ));
    }

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        for s in [
            "plain",
            "",
            "quote \" back \\ nl \n tab \t cr \r",
            "\u{1}\u{8}\u{c}\u{1f}é漢字",
        ] {
            let mut out = Vec::new();
            push_string(&mut out, s);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap());
        }
    }

    #[test]
    fn plain_runs_stop_at_the_word_holding_the_first_special_byte() {
        for start in [0, 3] {
            for len in start..90 {
                let clean = vec![b'x'; len];
                assert_eq!(
                    plain_run(&clean, start),
                    start + (len - start) / 8 * 8,
                    "{start} {len}"
                );
                for at in start..len {
                    for special in [b'"', b'\\', 0x1f, 0x00] {
                        let mut b = clean.clone();
                        b[at] = special;
                        let r = plain_run(&b, start);
                        assert!(r <= at && at < r + 8, "{start} {len} {at} {special}: {r}");
                    }
                }
            }
        }
        // Bytes above ASCII are content, not special.
        assert_eq!(plain_run("ééééééééééééééééé".as_bytes(), 0), 32);
    }

    /// A random JSON value (ASCII only), `depth` levels deep at most.
    fn random_value(rng: &mut crate::rng::Rng, depth: u32, out: &mut String) {
        let pick = |rng: &mut crate::rng::Rng, n: u64| rng.next_u64() % n;
        let ws = |rng: &mut crate::rng::Rng, out: &mut String| {
            let n = rng.next_u64() % 3;
            for _ in 0..n {
                out.push([' ', '\n', '\t', '\r'][(rng.next_u64() % 4) as usize]);
            }
        };
        let atoms = [
            "0",
            "-1",
            "12.5",
            "1e9",
            "-0.0E-3",
            "true",
            "false",
            "null",
            r#""""#,
            r#""a b""#,
            r#""\"\\\/\b\f\n\r\t""#,
            r#""\u00e9x""#,
        ];
        match if depth == 0 { 0 } else { pick(rng, 4) } {
            0 | 1 => out.push_str(atoms[pick(rng, atoms.len() as u64) as usize]),
            2 => {
                out.push('[');
                for k in 0..pick(rng, 4) {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    random_value(rng, depth - 1, out);
                    ws(rng, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for k in 0..pick(rng, 4) {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    out.push_str(["\"model\"", "\"k\"", "\"usage\""][pick(rng, 3) as usize]);
                    ws(rng, out);
                    out.push(':');
                    random_value(rng, depth - 1, out);
                }
                out.push('}');
            }
        }
    }

    #[test]
    fn agrees_with_serde_json_on_random_and_mutated_documents() {
        let mut rng = crate::rng::Rng::new(7);
        let alphabet = b"{}[],:\"\\0123456789.eE+-tfnul \x01ax";
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..20_000 {
            let mut doc = String::from("{\"k\":");
            random_value(&mut rng, 4, &mut doc);
            doc.push('}');
            let mut bytes = doc.into_bytes();
            // Half the documents get one to three random edits.
            if rng.next_u64() % 2 == 0 {
                for _ in 0..1 + rng.next_u64() % 3 {
                    let at = (rng.next_u64() % (bytes.len() as u64 + 1)) as usize;
                    let c = alphabet[(rng.next_u64() % alphabet.len() as u64) as usize];
                    match rng.next_u64() % 3 {
                        0 => bytes.insert(at, c),
                        1 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        _ if at < bytes.len() => bytes[at] = c,
                        _ => {}
                    }
                }
            }
            let ours = object_fields(&bytes, |_, _| {}).is_ok();
            let theirs = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v) => v.is_object(),
                // A number beyond f64 is valid JSON that serde_json declines to hold.
                Err(e) if e.to_string().contains("out of range") => continue,
                Err(_) => false,
            };
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(&bytes));
            if ours {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        // Both kinds were exercised.
        assert!(
            valid > 5_000 && invalid > 2_000,
            "{valid} valid, {invalid} invalid"
        );
    }
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod exact_tests;
