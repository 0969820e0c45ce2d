//! Minimal HTTP/1.1 on `std::net`: a thread-per-connection server with fault-injection replies
//! (streams with delays, hangs, responses cut mid-body) and a blocking client.
//!
//! Both sides handle `Content-Length`, chunked and (client side) close-delimited bodies. Only
//! plain-text `http://` is supported.

use serde_json::Value;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Max size of a request or response head (start line + headers).
const MAX_HEAD: usize = 64 * 1024;
/// Max size of a message body.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// How often an idle server connection checks whether the server was stopped.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Read timeout once a request has started arriving.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Shared parsing
// ---------------------------------------------------------------------------------------------

/// Looks up a header (case-insensitive) in a lowercased header list.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads one CRLF- or LF-terminated line, without the terminator. `Ok(None)` on EOF before any
/// byte. `budget` is decremented by the bytes read and bounds the line length.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX);
    let n = r.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    *budget = budget.saturating_sub(n);
    if buf.last() != Some(&b'\n') {
        return if *budget == 0 {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "header section too large",
            ))
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-line",
            ))
        };
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "header line is not UTF-8"))
}

/// Reads header lines up to the empty line; names are lowercased.
fn read_headers<R: BufRead>(r: &mut R, budget: &mut usize) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, budget)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in headers")
        })?;
        if line.is_empty() {
            return Ok(headers);
        }
        let (name, value) = line.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed header line {line:?}"),
            )
        })?;
        let name = name.trim();
        if name.is_empty() || name.contains(' ') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed header name {name:?}"),
            ));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
}

/// Decodes a chunked body (trailers are read and dropped).
fn read_chunked<R: BufRead>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut budget = 4096;
        let line = read_line(r, &mut budget)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in chunked body",
            )
        })?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {size_hex:?}"),
            )
        })?;
        if size == 0 {
            let mut budget = MAX_HEAD;
            read_headers(r, &mut budget)?;
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        let mut crlf = 4;
        match read_line(r, &mut crlf)? {
            Some(l) if l.is_empty() => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "missing CRLF after chunk",
                ))
            }
        }
    }
}

/// Reads exactly `len` body bytes.
fn read_sized<R: Read>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    if len > MAX_BODY {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn parse_content_length(headers: &[(String, String)]) -> io::Result<Option<usize>> {
    match find_header(headers, "content-length") {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad content-length {v:?}"),
            )
        }),
    }
}

/// Canonical reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Site Overloaded",
        _ => "Unknown",
    }
}

/// Whether a response with this status never has a body.
fn bodyless_status(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// A parsed request as seen by a server handler.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method, as sent (e.g. `POST`).
    pub method: String,
    /// Request target: path plus optional query.
    pub target: String,
    /// Minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub minor_version: u8,
    /// Headers in arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body, de-chunked.
    pub body: Vec<u8>,
    /// Address of the client.
    pub peer: Option<SocketAddr>,
    /// Whether it came over HTTP/2 (the hyper server in `hyper_serve.rs`).
    pub http2: bool,
    /// The `:scheme` pseudo-header of an HTTP/2 request (HTTP/1.1 carries none).
    pub scheme: Option<String>,
}

impl Request {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Query string, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Body parsed as JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("invalid JSON body: {e}"))
    }

    /// The body as JSON, with an empty (or blank) body read as `null`.
    pub fn json_or_null(&self) -> Result<Value, String> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            Ok(Value::Null)
        } else {
            self.json()
        }
    }

    /// Whether the connection stays open after this request.
    pub fn keep_alive(&self) -> bool {
        let conn = self.header("connection");
        if self.minor_version == 0 {
            has_token(conn, "keep-alive")
        } else {
            !has_token(conn, "close")
        }
    }
}

/// What a handler answers. Framing headers (`content-length`, `transfer-encoding`,
/// `connection`) are written by the server; handler-supplied ones are dropped.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response with `Content-Length`.
    Full {
        /// Status code.
        status: u16,
        /// Headers (names as given).
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
    },
    /// A chunked response: each part is written (and flushed) as one chunk after its delay.
    /// With `abort_after: Some(n)`, the connection is closed right after the n-th part without
    /// the terminating chunk.
    Stream {
        /// Status code.
        status: u16,
        /// Headers.
        headers: Vec<(String, String)>,
        /// `(delay before the part, part bytes)`.
        parts: Vec<(Duration, Vec<u8>)>,
        /// Close abruptly after this many parts.
        abort_after: Option<usize>,
    },
    /// Headers announcing the full body's `Content-Length`, then only the first `sent` bytes
    /// of it, then the socket is shut down and dropped.
    Cut {
        /// Status code.
        status: u16,
        /// Headers.
        headers: Vec<(String, String)>,
        /// The full body the headers announce.
        body: Vec<u8>,
        /// How many body bytes are actually written.
        sent: usize,
    },
    /// Never answer: hold the connection until the peer closes it or `max` elapses, then close.
    Hang(Duration),
    /// Close the connection at once without answering.
    Close,
}

impl Reply {
    /// A JSON response.
    pub fn json(status: u16, value: &Value) -> Reply {
        Reply::bytes(status, "application/json", value.to_string().into_bytes())
    }

    /// A plain-text response.
    pub fn text(status: u16, text: &str) -> Reply {
        Reply::bytes(
            status,
            "text/plain; charset=utf-8",
            text.as_bytes().to_vec(),
        )
    }

    /// A response with the given content type and body.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply::Full {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }

    /// A response with no body and no content type.
    pub fn empty(status: u16) -> Reply {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header (no effect on `Hang` and `Close`).
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        match &mut self {
            Reply::Full { headers, .. }
            | Reply::Stream { headers, .. }
            | Reply::Cut { headers, .. } => headers.push((name.to_string(), value.to_string())),
            Reply::Hang(_) | Reply::Close => {}
        }
        self
    }

    /// Status code, if the reply answers at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Full { status, .. }
            | Reply::Stream { status, .. }
            | Reply::Cut { status, .. } => Some(*status),
            Reply::Hang(_) | Reply::Close => None,
        }
    }
}

/// A request handler shared by all connection threads.
pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync + 'static>;

/// Wraps a closure as a [`Handler`].
pub fn handler<F>(f: F) -> Handler
where
    F: Fn(&Request) -> Reply + Send + Sync + 'static,
{
    Arc::new(f)
}

/// Binds `bind:port` (0 = any free port), prints `<label> listening on <addr>` (the line the
/// test bed reads the port from) and serves `handler` until the process ends. Blocks.
pub fn bind_and_serve(bind: &str, port: u16, label: &str, handler: Handler) -> Result<(), String> {
    let listener =
        TcpListener::bind((bind, port)).map_err(|e| format!("cannot bind {bind}:{port}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read bound address: {e}"))?;
    println!("{label} listening on {addr}");
    serve(listener, handler, Arc::new(AtomicBool::new(false)))
        .map_err(|e| format!("server failed: {e}"))
}

/// Accepts connections until `stop` is set, one thread per connection. Blocks.
pub fn serve(listener: TcpListener, handler: Handler, stop: Arc<AtomicBool>) -> io::Result<()> {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                eprintln!("accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let h = Arc::clone(&handler);
        let st = Arc::clone(&stop);
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || serve_connection(stream, &h, &st));
        if let Err(e) = spawned {
            eprintln!("cannot spawn connection thread: {e}");
        }
    }
    Ok(())
}

/// A server running on a background thread; stops accepting (and idle keep-alive connections
/// close) when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves on a background thread.
    pub fn spawn(addr: &str, handler: Handler) -> Result<Server, String> {
        let listener = TcpListener::bind(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot read bound address: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || {
                if let Err(e) = serve(listener, handler, st) {
                    eprintln!("server stopped: {e}");
                }
            })
            .map_err(|e| format!("cannot spawn accept thread: {e}"))?;
        Ok(Server {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Outcome of reading one request off a connection.
enum ReadOutcome {
    Request(Request),
    /// Peer closed (or server stopping) between requests.
    Done,
    /// Unparseable request: answer 400 and close.
    Bad(String),
}

fn serve_connection(stream: TcpStream, handler: &Handler, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        match read_request(&mut reader, &mut writer, stop, peer) {
            ReadOutcome::Done => break,
            ReadOutcome::Bad(msg) => {
                let body =
                    serde_json::json!({"error": {"message": msg, "type": "invalid_request_error"}});
                let _ = write_full(
                    &mut writer,
                    400,
                    &[("content-type".into(), "application/json".into())],
                    body.to_string().as_bytes(),
                    false,
                    false,
                );
                break;
            }
            ReadOutcome::Request(req) => {
                let reply = catch_unwind(AssertUnwindSafe(|| handler(&req))).unwrap_or_else(|_| {
                    let e =
                        serde_json::json!({"message": "handler panicked", "type": "server_error"});
                    Reply::json(500, &serde_json::json!({ "error": e }))
                });
                let keep = req.keep_alive() && !stop.load(Ordering::SeqCst);
                let head_only = req.method.eq_ignore_ascii_case("HEAD");
                let open = write_reply(&mut writer, reply, keep, head_only, req.minor_version);
                if !open.unwrap_or(false) {
                    break;
                }
            }
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

/// Waits for the first byte of the next request, polling the stop flag.
fn wait_for_data(reader: &mut BufReader<TcpStream>, stop: &AtomicBool) -> bool {
    if reader.get_ref().set_read_timeout(Some(IDLE_POLL)).is_err() {
        return false;
    }
    loop {
        match reader.fill_buf() {
            Ok([]) => return false,
            Ok(_) => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

fn read_request(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    stop: &AtomicBool,
    peer: Option<SocketAddr>,
) -> ReadOutcome {
    if !wait_for_data(reader, stop) {
        return ReadOutcome::Done;
    }
    if reader
        .get_ref()
        .set_read_timeout(Some(REQUEST_READ_TIMEOUT))
        .is_err()
    {
        return ReadOutcome::Done;
    }
    let bad = |e: io::Error| {
        if e.kind() == io::ErrorKind::InvalidData {
            ReadOutcome::Bad(e.to_string())
        } else {
            ReadOutcome::Done
        }
    };
    let mut budget = MAX_HEAD;
    // Tolerate stray empty lines between requests (RFC 9112 §2.2).
    let line = loop {
        match read_line(reader, &mut budget) {
            Ok(None) => return ReadOutcome::Done,
            Ok(Some(l)) if l.is_empty() => continue,
            Ok(Some(l)) => break l,
            Err(e) => return bad(e),
        }
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ReadOutcome::Bad(format!("malformed request line {line:?}"));
    };
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return ReadOutcome::Bad(format!("unsupported version {version:?}")),
    };
    let (method, target) = (method.to_string(), target.to_string());
    let headers = match read_headers(reader, &mut budget) {
        Ok(h) => h,
        Err(e) => return bad(e),
    };
    let chunked =
        find_header(&headers, "transfer-encoding").is_some_and(|te| has_token(Some(te), "chunked"));
    let length = match parse_content_length(&headers) {
        Ok(l) => l,
        Err(e) => return bad(e),
    };
    let expects_body = chunked || length.is_some_and(|l| l > 0);
    if expects_body
        && has_token(find_header(&headers, "expect"), "100-continue")
        && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return ReadOutcome::Done;
    }
    let body = if chunked {
        read_chunked(reader)
    } else {
        read_sized(reader, length.unwrap_or(0))
    };
    match body {
        Ok(body) => ReadOutcome::Request(Request {
            method,
            target,
            minor_version,
            headers,
            body,
            peer,
            http2: false,
            scheme: None,
        }),
        Err(e) => bad(e),
    }
}

fn head_bytes(
    status: u16,
    headers: &[(String, String)],
    framing: &[(&str, String)],
    keep: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason(status));
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-length")
            || k.eq_ignore_ascii_case("transfer-encoding")
            || k.eq_ignore_ascii_case("connection")
        {
            continue;
        }
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    for (k, v) in framing {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str(if keep {
        "connection: keep-alive\r\n"
    } else {
        "connection: close\r\n"
    });
    out.push_str("\r\n");
    out.into_bytes()
}

fn write_full(
    w: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    keep: bool,
    head_only: bool,
) -> io::Result<()> {
    let framing: Vec<(&str, String)> = if bodyless_status(status) {
        Vec::new()
    } else {
        vec![("content-length", body.len().to_string())]
    };
    let mut out = head_bytes(status, headers, &framing, keep);
    if !head_only && !bodyless_status(status) {
        out.extend_from_slice(body);
    }
    w.write_all(&out)?;
    w.flush()
}

/// Writes a reply; returns whether the connection stays usable.
fn write_reply(
    w: &mut TcpStream,
    reply: Reply,
    keep: bool,
    head_only: bool,
    minor_version: u8,
) -> io::Result<bool> {
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            write_full(w, status, &headers, &body, keep, head_only)?;
            Ok(keep)
        }
        Reply::Stream {
            status,
            headers,
            parts,
            abort_after,
        } => {
            // HTTP/1.0 peers cannot take chunked encoding: fall back to close-delimited.
            let chunked = minor_version >= 1;
            let keep = keep && chunked;
            let framing: Vec<(&str, String)> = if chunked {
                vec![("transfer-encoding", "chunked".to_string())]
            } else {
                Vec::new()
            };
            w.write_all(&head_bytes(status, &headers, &framing, keep))?;
            w.flush()?;
            if head_only {
                if chunked {
                    w.write_all(b"0\r\n\r\n")?;
                }
                return Ok(keep);
            }
            for (i, (delay, part)) in parts.iter().enumerate() {
                if abort_after.is_some_and(|n| i >= n) {
                    let _ = w.shutdown(Shutdown::Both);
                    return Ok(false);
                }
                if !delay.is_zero() {
                    thread::sleep(*delay);
                }
                if part.is_empty() {
                    continue; // an empty chunk would end the body
                }
                let stamped = stamp_sent_at(part);
                let part = stamped.as_deref().unwrap_or(part);
                if chunked {
                    let mut out = format!("{:x}\r\n", part.len()).into_bytes();
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                    w.write_all(&out)?;
                } else {
                    w.write_all(part)?;
                }
                w.flush()?;
            }
            if abort_after.is_some_and(|n| n <= parts.len()) {
                let _ = w.shutdown(Shutdown::Both);
                return Ok(false);
            }
            if chunked {
                w.write_all(b"0\r\n\r\n")?;
                w.flush()?;
            }
            Ok(keep)
        }
        Reply::Cut {
            status,
            headers,
            body,
            sent,
        } => {
            let framing = vec![("content-length", body.len().to_string())];
            let mut out = head_bytes(status, &headers, &framing, false);
            out.extend_from_slice(&body[..sent.min(body.len())]);
            w.write_all(&out)?;
            w.flush()?;
            let _ = w.shutdown(Shutdown::Both);
            Ok(false)
        }
        Reply::Hang(max) => {
            hang(w, max);
            Ok(false)
        }
        Reply::Close => Ok(false),
    }
}

/// Holds the connection without answering until the peer closes it or `max` elapses.
fn hang(stream: &mut TcpStream, max: Duration) {
    let deadline = Instant::now() + max;
    if stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // pipelined bytes: discarded
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// A complete response received by the client.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// All values of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Body parsed as JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "response body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body, in order (including `[DONE]`).
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.trim_start().to_string())
            .collect()
    }

    /// The concatenated `choices[0].delta.content` of a chat completion's SSE body.
    pub fn sse_content(&self) -> String {
        self.sse_data()
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }
}

/// A JSON string a streamed part may carry; the writer replaces it (quotes included) with the
/// Unix time in ms at which the part is written, so a test can tell how long each part took to
/// reach its client.
pub const SENT_AT_MS: &str = "@@sent_at_ms@@";

pub fn stamp_sent_at(part: &[u8]) -> Option<Vec<u8>> {
    let needle = format!("\"{SENT_AT_MS}\"");
    let at = part
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut out = part[..at].to_vec();
    out.extend_from_slice(now.to_string().as_bytes());
    out.extend_from_slice(&part[at + needle.len()..]);
    Some(out)
}

/// Splits `http://host:port/path`, `host:port/path` or `host:port` into `(host:port, /path)`.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    if url.starts_with("https://") {
        return Err(format!("{url}: https is not supported"));
    }
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || !authority.contains(':') {
        return Err(format!("{url}: expected host:port"));
    }
    Ok((authority.to_string(), path.to_string()))
}

/// A `TcpStream` whose reads and writes fail once a deadline passes.
struct DeadlineStream {
    stream: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        } else {
            Ok(left)
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn connect(authority: &str, deadline: Instant) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .collect();
    let mut last = format!("cannot resolve {authority}: no addresses");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("connect to {authority}: timed out"));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(last)
}

fn request_bytes(
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("host") {
        out.push_str(&format!("host: {authority}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let bodyless_method = matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS");
    if !has("content-length") && !has("transfer-encoding") && (!body.is_empty() || !bodyless_method)
    {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    if close && !has("connection") {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one response; returns it and whether the connection can be reused.
fn read_response<R: BufRead>(r: &mut R, head_request: bool) -> io::Result<(Response, bool)> {
    loop {
        let mut budget = MAX_HEAD;
        let line = read_line(r, &mut budget)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response",
            )
        })?;
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed status line {line:?}"),
            )
        })?;
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed status line {line:?}"),
            ));
        }
        let headers = read_headers(r, &mut budget)?;
        if (100..200).contains(&status) && status != 101 {
            continue; // interim response
        }
        let mut reusable =
            version != "HTTP/1.0" && !has_token(find_header(&headers, "connection"), "close");
        let chunked = has_token(find_header(&headers, "transfer-encoding"), "chunked");
        let body = if head_request || bodyless_status(status) {
            Vec::new()
        } else if chunked {
            read_chunked(r)?
        } else if let Some(len) = parse_content_length(&headers)? {
            read_sized(r, len)?
        } else {
            reusable = false;
            let mut body = Vec::new();
            r.read_to_end(&mut body)?;
            body
        };
        return Ok((
            Response {
                status,
                headers,
                body,
            },
            reusable,
        ));
    }
}

fn io_context(e: io::Error, what: &str, url: &str, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("{what} {url}: timed out after {} ms", timeout.as_millis())
        }
        _ => format!("{what} {url}: {e}"),
    }
}

/// Sends one request on a fresh connection (`connection: close` unless the caller sets a
/// `connection` header) and reads the whole response. `timeout` bounds everything: connect,
/// send and receive.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let deadline = Instant::now() + timeout;
    let (authority, path) = split_url(url)?;
    let stream = connect(&authority, deadline)?;
    let mut s = DeadlineStream { stream, deadline };
    s.write_all(&request_bytes(
        method, &authority, &path, headers, body, true,
    ))
    .map_err(|e| io_context(e, "sending", url, timeout))?;
    let mut reader = BufReader::new(s);
    let head = method.eq_ignore_ascii_case("HEAD");
    let (resp, _) = read_response(&mut reader, head)
        .map_err(|e| io_context(e, "reading response of", url, timeout))?;
    let _ = reader.get_ref().stream.shutdown(Shutdown::Both);
    Ok(resp)
}

/// `GET url`.
pub fn get(url: &str, timeout: Duration) -> Result<Response, String> {
    request("GET", url, &[], &[], timeout)
}

/// `POST url` with a JSON body and `content-type: application/json` plus `headers`.
pub fn post_json(
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
    timeout: Duration,
) -> Result<Response, String> {
    let mut hs: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    hs.extend_from_slice(headers);
    request("POST", url, &hs, body.to_string().as_bytes(), timeout)
}

/// A keep-alive client connection for load generation: requests are sent one at a time on the
/// same socket. After an error or a close-delimited/`connection: close` response it is closed;
/// check [`Conn::is_open`] and reconnect.
pub struct Conn {
    authority: String,
    reader: Option<BufReader<DeadlineStream>>,
}

impl Conn {
    /// Connects to `host:port` (or `http://host:port`).
    pub fn connect(authority: &str, timeout: Duration) -> Result<Conn, String> {
        let authority = authority
            .strip_prefix("http://")
            .unwrap_or(authority)
            .trim_end_matches('/')
            .to_string();
        let deadline = Instant::now() + timeout;
        let stream = connect(&authority, deadline)?;
        Ok(Conn {
            authority,
            reader: Some(BufReader::new(DeadlineStream { stream, deadline })),
        })
    }

    /// Whether the connection can take another request.
    pub fn is_open(&self) -> bool {
        self.reader.is_some()
    }

    /// Sends a request for `path` and reads the whole response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<Response, String> {
        let Some(mut reader) = self.reader.take() else {
            return Err(format!("connection to {} is closed", self.authority));
        };
        reader.get_mut().deadline = Instant::now() + timeout;
        let bytes = request_bytes(method, &self.authority, path, headers, body, false);
        reader
            .get_mut()
            .write_all(&bytes)
            .map_err(|e| io_context(e, "sending", path, timeout))?;
        let head = method.eq_ignore_ascii_case("HEAD");
        let (resp, reusable) = read_response(&mut reader, head)
            .map_err(|e| io_context(e, "reading response of", path, timeout))?;
        if reusable {
            self.reader = Some(reader);
        }
        Ok(resp)
    }
}

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released); 0 if none could be
/// bound. Prefer letting a server bind port 0 itself when it can report the port back, as the
/// mocks and [`super::Envoy`] do.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `GET url` every 20 ms until it answers 200 or `timeout` elapses.
pub fn wait_ready(url: &str, timeout: Duration) -> Result<(), String> {
    wait_ready_while(url, timeout, || Ok(()))
}

/// Like [`wait_ready`], but gives up early when `alive` reports an error (e.g. the server
/// process exited).
pub fn wait_ready_while(
    url: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        alive()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "{url} not ready after {} ms: {last}",
                timeout.as_millis()
            ));
        }
        match get(url, left.min(Duration::from_secs(1))) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("status {}", r.status),
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(20));
    }
}
