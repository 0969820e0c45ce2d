//! What the filter needs to know about a provider's answer beyond its outcome: whether its
//! body can be read (content coding), whether it is small enough to hold within the host's
//! buffer, where its usage sits when only the end of it is seen, and what a failing provider
//! said, cleaned for the client's error answer.

use crate::json;
use crate::metrics::{self, Usage};

/// Answers of at most this many bytes are held to be checked and priced before they reach the
/// client; bigger ones flow through unheld. Below Envoy's default buffer limit of 1 MiB
/// (`per_connection_buffer_limit_bytes`), which a held answer must fit in, with room for the
/// chunk that crosses the limit.
pub const HOLD_LIMIT_BYTES: usize = 512 * 1024;

/// The content coding asked of providers on attempts whose answer the filter reads.
pub const IDENTITY: &str = "identity";

/// How many bytes of a failing provider's answer are read for its message.
pub const ERROR_READ_BYTES: usize = 16 * 1024;

/// Longest provider message passed on in an error answer, bytes.
pub const MESSAGE_MAX_BYTES: usize = 300;

/// How many bytes at the end of an unheld answer are kept to look for its usage.
pub const TAIL_BYTES: usize = 4096;

/// Whether a `content-encoding` value says the body is not plain (anything but identity).
pub fn is_encoded(content_encoding: Option<&str>) -> bool {
    content_encoding.is_some_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(IDENTITY))
    })
}

/// Whether an answer whose `content-length` header is `content_length` fits the hold limit.
/// An answer without a length (chunked) may fit: it is held until it grows past the limit.
pub fn fits(content_length: Option<&str>, limit: usize) -> bool {
    content_length
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_none_or(|n| n <= limit as u64)
}

/// Appends `chunk` to `tail`, keeping the last `TAIL_BYTES` bytes.
pub fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    if chunk.len() >= TAIL_BYTES {
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
        return;
    }
    let overflow = (tail.len() + chunk.len()).saturating_sub(TAIL_BYTES);
    tail.drain(..overflow.min(tail.len()));
    tail.extend_from_slice(chunk);
}

/// The usage of an answer of which only the end is known: the last `"usage": {...}` object in
/// `tail` (OpenAI-compatible answers put it after the choices or embeddings).
pub fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let at = tail.windows(KEY.len()).rposition(|w| w == KEY)?;
    let rest = &tail[at + KEY.len()..];
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let end = object_end(rest)?;
    metrics::usage_of_object(&rest[..end])
}

/// Length of the JSON object at the start of `b` (strings honoured), if it is complete.
fn object_end(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// What a failing provider said in its answer body: `error.message` (or `error` when it is a
/// string, or a top-level `message`) of a JSON body, else the text of a plain one; control
/// characters become spaces, runs of spaces one, and it is cut to `MESSAGE_MAX_BYTES`.
pub fn provider_message(body: &[u8]) -> Option<String> {
    let body = &body[..body.len().min(ERROR_READ_BYTES)];
    let text = json_message(body).or_else(|| {
        let s = std::str::from_utf8(body).ok()?;
        let t = s.trim_start();
        // A JSON body that held no message says nothing worth passing on; neither does HTML.
        (!t.starts_with('{') && !t.starts_with('[') && !t.starts_with('<')).then(|| s.to_string())
    })?;
    let clean = sanitize(&text, MESSAGE_MAX_BYTES);
    (!clean.is_empty()).then_some(clean)
}

fn json_message(body: &[u8]) -> Option<String> {
    let field = |doc: &[u8], name: &[u8]| {
        let mut found = None;
        json::object_fields(doc, |k, v| {
            if k == name {
                found = Some(v);
            }
        })
        .ok()?;
        found
    };
    let string = |lit: &[u8]| {
        (lit.len() >= 2 && lit[0] == b'"')
            .then(|| json::decode_string(lit))
            .flatten()
    };
    if let Some(r) = field(body, b"error") {
        let e = &body[r];
        if let Some(s) = string(e) {
            return Some(s);
        }
        if let Some(m) = field(e, b"message") {
            return string(&e[m]);
        }
        return None;
    }
    field(body, b"message").and_then(|m| string(&body[m]))
}

/// `s` with control characters as spaces, whitespace runs collapsed, trimmed and cut to `max`
/// bytes on a character boundary.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut space = false;
    for c in s.chars() {
        if c.is_control() || c.is_ascii_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            // The space goes in only with the character after it: a cut never leaves one at
            // the end.
            if out.len() + 1 + c.len_utf8() > max {
                break;
            }
            out.push(' ');
            space = false;
        }
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert!(!is_encoded(None));
        assert!(!is_encoded(Some("")));
        assert!(!is_encoded(Some("identity")));
        assert!(!is_encoded(Some(" Identity ")));
        for e in ["gzip", "br", "zstd", "deflate", "identity, gzip"] {
            assert!(is_encoded(Some(e)), "{e}");
        }
    }

    #[test]
    fn hold_limit() {
        assert!(fits(None, 10));
        assert!(fits(Some("10"), 10));
        assert!(!fits(Some("11"), 10));
        assert!(!fits(Some(" 1468006 "), HOLD_LIMIT_BYTES));
        // A length the host would refuse anyway is no reason to refuse holding.
        assert!(fits(Some("abc"), 10));
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Vec::new();
        keep_tail(&mut t, b"abc");
        keep_tail(&mut t, b"def");
        assert_eq!(t, b"abcdef");
        let big = vec![b'x'; TAIL_BYTES + 10];
        keep_tail(&mut t, &big);
        assert_eq!(t.len(), TAIL_BYTES);
        keep_tail(&mut t, b"yz");
        assert_eq!(t.len(), TAIL_BYTES);
        assert!(t.ends_with(b"xyz"));
    }

    #[test]
    fn usage_at_the_end_of_an_answer() {
        let tail = br#"0.25,0.5]}],"model":"m","usage":{"prompt_tokens":12,"total_tokens":12,"details":{"x":"}"}}}"#;
        assert_eq!(
            usage_in_tail(tail),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 0
            })
        );
        let chat = br#"..."usage" : {"prompt_tokens": 3, "completion_tokens": 5}}"#;
        assert_eq!(
            usage_in_tail(chat),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })
        );
        // Cut off, absent, or not an object.
        assert_eq!(usage_in_tail(br#""usage":{"prompt_tokens":3"#), None);
        assert_eq!(usage_in_tail(br#"{"data":[1,2]}"#), None);
        assert_eq!(usage_in_tail(br#""usage":null}"#), None);
        assert_eq!(usage_in_tail(b""), None);
    }

    #[test]
    fn provider_messages_are_found_and_cleaned() {
        let openai = br#"{"error":{"message":"Rate limit reached for\nrequests","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            provider_message(openai).as_deref(),
            Some("Rate limit reached for requests")
        );
        assert_eq!(
            provider_message(br#"{"error":"overloaded"}"#).as_deref(),
            Some("overloaded")
        );
        assert_eq!(
            provider_message(br#"{"message":"upstream busy","code":503}"#).as_deref(),
            Some("upstream busy")
        );
        assert_eq!(
            provider_message(b"upstream connect error or disconnect/reset before headers")
                .as_deref(),
            Some("upstream connect error or disconnect/reset before headers")
        );
        assert_eq!(provider_message(br#"{"detail":"x"}"#), None);
        assert_eq!(provider_message(b"<html><body>502</body></html>"), None);
        assert_eq!(provider_message(b"   "), None);
        assert_eq!(provider_message(&[0xff, 0xfe]), None);
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "é".repeat(400));
        let m = provider_message(long.as_bytes()).unwrap();
        assert!(m.len() <= MESSAGE_MAX_BYTES && m.len() >= MESSAGE_MAX_BYTES - 1);
        assert_eq!(sanitize("a\u{0}\u{7}b\t\r\n c  ", 100), "a b c");
        assert_eq!(sanitize("abc def", 5), "abc d");
    }
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod exact_tests;
