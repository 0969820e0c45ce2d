//! Leaf value types of the configuration: each one deserializes a JSON value and refuses it
//! with the sentence the refusal log line shows ("expected an integer in 1..=10"), and (with
//! the `schema` feature) describes itself in the JSON Schema with the same bounds. A bound is
//! written once, in the field's type.
//!
//! Every type reads a `serde_json::Value` first and checks it the way the filter always has
//! (`as_u64`, `as_f64`, non-empty strings), so `3.0` is not an integer and `""` is no name.

use serde::de::value::MapAccessDeserializer;
use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::fmt;
use std::marker::PhantomData;

fn value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Value::deserialize(d)
}

/// A JSON object read as `T`. serde's derived structs also accept an array (fields by
/// position); the document has objects only, so anything else is refused here.
#[derive(Debug, Clone, PartialEq)]
pub struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(PhantomData)).map(Obj)
    }
}

/// An integer in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Int<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)?.as_u64() {
            Some(x) if (MIN..=MAX).contains(&x) => Ok(Self(x)),
            _ => Err(D::Error::custom(format_args!(
                "expected an integer in {MIN}..={MAX}"
            ))),
        }
    }
}

/// A finite number in `MIN_MILLI / 1000 ..= MAX_MILLI / 1000` (bounds in thousandths, since
/// const generics cannot be floats: `Num<1, 3_600_000_000>` is 0.001..=3600000).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num<const MIN_MILLI: u64, const MAX_MILLI: u64>(pub f64);

impl<const MIN_MILLI: u64, const MAX_MILLI: u64> Num<MIN_MILLI, MAX_MILLI> {
    /// The lower bound.
    pub const MIN: f64 = MIN_MILLI as f64 / 1000.0;
    /// The upper bound.
    pub const MAX: f64 = MAX_MILLI as f64 / 1000.0;
}

impl<'de, const MIN_MILLI: u64, const MAX_MILLI: u64> Deserialize<'de>
    for Num<MIN_MILLI, MAX_MILLI>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (min, max) = (Self::MIN, Self::MAX);
        match value(d)?.as_f64() {
            Some(x) if x.is_finite() && x >= min && x <= max => Ok(Self(x)),
            _ => Err(D::Error::custom(format_args!(
                "expected a number in {min}..={max}"
            ))),
        }
    }
}

/// An HTTP status a client error or server error can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorStatus(pub u32);

impl<'de> Deserialize<'de> for ErrorStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)?.as_u64() {
            Some(s) if (400..=599).contains(&s) => Ok(Self(s as u32)),
            _ => Err(D::Error::custom("expected an HTTP status in 400..=599")),
        }
    }
}

/// A boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            Value::Bool(b) => Ok(Self(b)),
            _ => Err(D::Error::custom("expected true or false")),
        }
    }
}

/// What a string must look like beyond being non-empty.
pub trait Rule {
    /// What is allowed, as the refusal line says it.
    const EXPECTED: &'static str;
    /// The same rule as a JSON Schema `pattern`, if the schema can say it.
    const PATTERN: Option<&'static str>;
    /// Whether `s` (non-empty) passes.
    fn ok(s: &str) -> bool;
}

/// A non-empty string that passes `R`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str<R>(pub String, PhantomData<R>);

impl<'de, R: Rule> Deserialize<'de> for Str<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            Value::String(s) if !s.is_empty() => {
                if R::ok(&s) {
                    Ok(Self(s, PhantomData))
                } else {
                    Err(D::Error::custom(R::EXPECTED))
                }
            }
            _ => Err(D::Error::custom("expected a non-empty string")),
        }
    }
}

/// Any non-empty string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text;

impl Rule for Text {
    const EXPECTED: &'static str = "expected a non-empty string";
    const PATTERN: Option<&'static str> = None;
    fn ok(_: &str) -> bool {
        true
    }
}

/// A provider name or key prefix: 1-64 of A-Z a-z 0-9 - _ .
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameRule;

impl Rule for NameRule {
    const EXPECTED: &'static str = "expected 1-64 characters of A-Z a-z 0-9 - _ .";
    const PATTERN: Option<&'static str> = Some("^[A-Za-z0-9._-]{1,64}$");
    fn ok(s: &str) -> bool {
        is_name(s)
    }
}

/// A lowercase header name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRule;

impl Rule for HeaderRule {
    const EXPECTED: &'static str = "expected a lowercase header name (a-z 0-9 - _)";
    const PATTERN: Option<&'static str> = Some("^[a-z0-9_-]+$");
    fn ok(s: &str) -> bool {
        is_header_name(s)
    }
}

/// A path starting with `/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRule;

impl Rule for PathRule {
    const EXPECTED: &'static str = "expected a path starting with /";
    const PATTERN: Option<&'static str> = Some("^/");
    fn ok(s: &str) -> bool {
        s.starts_with('/')
    }
}

/// A path prefix: starts with `/`, does not end with `/`, no `?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixRule;

impl Rule for PrefixRule {
    const EXPECTED: &'static str = "expected a path starting with / and not ending with /";
    const PATTERN: Option<&'static str> = Some("^/[^?]*[^/?]$");
    fn ok(s: &str) -> bool {
        s.starts_with('/') && !s.ends_with('/') && !s.contains('?')
    }
}

/// Whether `s` is a lowercase header name (a-z 0-9 - _).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `s` is 1-64 of A-Z a-z 0-9 - _ .
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An enum spelled as one of a fixed set of strings.
pub trait Wire: Sized + Copy + 'static {
    /// Every value, in the order the refusal line and the schema list them.
    const ALL: &'static [Self];
    /// Wire name.
    fn as_str(self) -> &'static str;
    /// Parses a wire name.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == s)
    }
    /// "expected one of a, b, c".
    fn expected() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
        format!("expected one of {}", names.join(", "))
    }
}

/// One of the wire names of `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice<T>(pub T);

impl<'de, T: Wire> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)?.as_str().and_then(T::parse) {
            Some(t) => Ok(Self(t)),
            None => Err(D::Error::custom(T::expected())),
        }
    }
}

/// A JSON value the validation pass reads itself (the models and headers maps, whose errors
/// name a key inside them and, for headers, never show a value).
#[derive(Debug, Clone, PartialEq)]
pub struct Json<K>(pub Value, PhantomData<K>);

impl<'de, K> Deserialize<'de> for Json<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(value(d)?, PhantomData))
    }
}

/// `providers[].models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelsKind;

/// `providers[].headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadersKind;

#[cfg(feature = "schema")]
mod schema {
    //! The JSON Schema of each leaf type.
    use super::*;
    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
    use std::borrow::Cow;

    impl<T: JsonSchema> JsonSchema for Obj<T> {
        fn schema_name() -> Cow<'static, str> {
            T::schema_name()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            T::json_schema(generator)
        }
    }

    impl<const MIN: u64, const MAX: u64> JsonSchema for Int<MIN, MAX> {
        fn schema_name() -> Cow<'static, str> {
            format!("Int_{MIN}_{MAX}").into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "integer", "minimum": MIN, "maximum": MAX})
        }
    }

    impl<const A: u64, const B: u64> JsonSchema for Num<A, B> {
        fn schema_name() -> Cow<'static, str> {
            format!("Num_{A}_{B}").into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "number", "minimum": Self::MIN, "maximum": Self::MAX})
        }
    }

    impl JsonSchema for ErrorStatus {
        fn schema_name() -> Cow<'static, str> {
            "ErrorStatus".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "integer", "minimum": 400, "maximum": 599})
        }
    }

    impl JsonSchema for Flag {
        fn schema_name() -> Cow<'static, str> {
            "Flag".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "boolean"})
        }
    }

    impl<R: Rule> JsonSchema for Str<R> {
        fn schema_name() -> Cow<'static, str> {
            "Str".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            let mut s = json_schema!({"type": "string", "minLength": 1});
            if let Some(p) = R::PATTERN {
                s.insert("pattern".into(), p.into());
            }
            s
        }
    }

    impl<T: Wire> JsonSchema for Choice<T> {
        fn schema_name() -> Cow<'static, str> {
            "Choice".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            let names: Vec<&str> = T::ALL.iter().map(|v| v.as_str()).collect();
            json_schema!({"type": "string", "enum": names})
        }
    }

    impl JsonSchema for Json<ModelsKind> {
        fn schema_name() -> Cow<'static, str> {
            "Models".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "description": "The provider's model id for this client model name.",
                    "type": "string",
                    "minLength": 1
                },
                "not": {"required": [""]}
            })
        }
    }

    impl JsonSchema for Json<HeadersKind> {
        fn schema_name() -> Cow<'static, str> {
            "Headers".into()
        }
        fn inline_schema() -> bool {
            true
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "type": "object",
                "additionalProperties": {"type": "string", "pattern": "^[^\\r\\n]*$"}
            })
        }
    }
}

#[cfg(test)]
#[path = "leaf_tests.rs"]
mod exact_tests;
