//! Content codings as real providers and clients use them: gzip, deflate, br and zstd, chosen
//! from an `Accept-Encoding` header, applied to whole bodies or to a stream of parts (each part
//! flushed so it can be decoded as it arrives), and decoded again.

use std::io::{Read, Write};

/// The codings the mock provider and the tests know, in the order a tie is broken.
pub const CODINGS: [&str; 4] = ["br", "gzip", "zstd", "deflate"];

/// The coding to answer with for `accept` (an `Accept-Encoding` value): the accepted one with
/// the highest q-value, ties broken in [`CODINGS`] order; `None` for identity.
pub fn negotiate(accept: Option<&str>) -> Option<&'static str> {
    let accept = accept?;
    let mut best: Option<(f64, usize)> = None;
    for (i, coding) in CODINGS.iter().enumerate() {
        let q = q_value(accept, coding);
        if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, i));
        }
    }
    best.map(|(_, i)| CODINGS[i])
}

/// The q-value `accept` gives `coding` (0 when it is not accepted), `*` counting for any.
pub fn q_value(accept: &str, coding: &str) -> f64 {
    let mut wildcard = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .find_map(|p| p.trim().strip_prefix("q=").map(str::trim))
            .map_or(1.0, |v| v.parse::<f64>().unwrap_or(0.0));
        if name == coding {
            return q;
        }
        if name == "*" {
            wildcard = Some(q);
        }
    }
    wildcard.unwrap_or(0.0)
}

/// A coding's encoder over a growing buffer; `flush` hands back what is ready so far.
pub enum Encoder {
    /// gzip.
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    /// deflate (zlib-wrapped, as HTTP's `deflate` is).
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    /// Brotli.
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    /// Zstandard.
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    /// An encoder for `coding`.
    pub fn new(coding: &str) -> Result<Encoder, String> {
        Ok(match coding {
            "gzip" => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
            "deflate" => Encoder::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
            "br" => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                4,
                22,
            ))),
            "zstd" => Encoder::Zstd(
                zstd::stream::write::Encoder::new(Vec::new(), 3)
                    .map_err(|e| format!("zstd: {e}"))?,
            ),
            other => return Err(format!("unknown coding {other:?}; known: {CODINGS:?}")),
        })
    }

    fn buf(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Deflate(e) => e.get_mut(),
            Encoder::Brotli(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    /// Encodes `data` and returns the bytes that are ready (a sync flush: a decoder can read
    /// everything written so far).
    pub fn part(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        let r = match self {
            Encoder::Gzip(e) => e.write_all(data).and_then(|_| e.flush()),
            Encoder::Deflate(e) => e.write_all(data).and_then(|_| e.flush()),
            Encoder::Brotli(e) => e.write_all(data).and_then(|_| e.flush()),
            Encoder::Zstd(e) => e.write_all(data).and_then(|_| e.flush()),
        };
        r.map_err(|e| format!("encode: {e}"))?;
        Ok(std::mem::take(self.buf()))
    }

    /// Ends the stream and returns the last bytes.
    pub fn finish(self) -> Result<Vec<u8>, String> {
        let r = match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Deflate(e) => e.finish(),
            Encoder::Brotli(mut e) => e.flush().map(|_| e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        };
        r.map_err(|e| format!("encode: {e}"))
    }
}

/// `body` encoded with `coding` in one go.
pub fn encode(coding: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut e = Encoder::new(coding)?;
    let mut out = e.part(body)?;
    out.extend(e.finish()?);
    Ok(out)
}

/// `body` decoded from `coding` (`identity` or empty: as it is).
pub fn decode(coding: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let r = match coding.trim() {
        "" | "identity" => {
            out.extend_from_slice(body);
            Ok(0)
        }
        "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(body).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(body).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(body, 4096).read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(body).and_then(|mut d| d.read_to_end(&mut out)),
        other => return Err(format!("unknown coding {other:?}")),
    };
    r.map_err(|e| format!("decode {coding}: {e}"))?;
    Ok(out)
}
