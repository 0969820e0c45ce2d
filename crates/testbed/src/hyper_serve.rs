//! The test bed's HTTP server on hyper, for the mock provider: the same [`Handler`] and
//! [`Reply`] as the hand-written server in `http.rs`, served on one port over HTTP/1.1 and over
//! HTTP/2 without TLS (h2c with prior knowledge, as gateways reach providers inside a network),
//! whichever the peer speaks. Streams, cuts, hangs and closes behave as in `http.rs`: a cut or
//! an aborted stream ends the connection (HTTP/1.1) or resets the stream (HTTP/2).

use super::http::{Handler, Reply, Request};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, io::Error>;

/// Headers the server frames itself (and HTTP/2 forbids).
const FRAMING: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
];

/// A body fed from a channel: each message is a frame, an error ends the response abruptly.
struct Chan(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl hyper::body::Body for Chan {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// Binds `bind:port` (0 = any free port), prints `<label> listening on <addr>` (the line the
/// test bed reads the port from) and serves `handler` over HTTP/1.1 and h2c until the process
/// ends. Blocks.
pub fn bind_and_serve(bind: &str, port: u16, label: &str, handler: Handler) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((bind, port))
            .await
            .map_err(|e| format!("cannot bind {bind}:{port}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read bound address: {e}"))?;
        println!("{label} listening on {addr}");
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(h.clone(), req, peer));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

async fn answer(
    h: Handler,
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes()
        .to_vec();
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // HTTP/2 carries the authority as a pseudo-header; handlers look for `host`.
    if !headers.iter().any(|(k, _)| k == "host") {
        if let Some(a) = parts.uri.authority() {
            headers.push(("host".into(), a.to_string()));
        }
    }
    let request = Request {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        minor_version: 1,
        headers,
        body,
        peer: Some(peer),
        http2: parts.version == hyper::Version::HTTP_2,
        scheme: parts.uri.scheme_str().map(str::to_string),
    };
    // Handlers block (they sleep to simulate latency): off the runtime's threads.
    let reply = tokio::task::spawn_blocking(move || h(&request))
        .await
        .map_err(io::Error::other)?;
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => respond(
            status,
            &headers,
            None,
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        ),
        Reply::Stream {
            status,
            headers,
            parts,
            abort_after,
        } => {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let n = parts.len();
                for (i, (delay, part)) in parts.into_iter().enumerate() {
                    if abort_after.is_some_and(|a| i >= a) {
                        cut(&tx).await;
                        return;
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    // Stamped as it is handed to hyper (see SENT_AT_MS).
                    let part = super::http::stamp_sent_at(&part).unwrap_or(part);
                    if tx.send(Ok(Frame::data(Bytes::from(part)))).await.is_err() {
                        return;
                    }
                }
                if abort_after.is_some_and(|a| a >= n) {
                    cut(&tx).await;
                }
            });
            respond(status, &headers, None, Chan(rx).boxed())
        }
        Reply::Cut {
            status,
            headers,
            body,
            sent,
        } => {
            let (tx, rx) = mpsc::channel(2);
            let len = body.len();
            tokio::spawn(async move {
                let head = Bytes::from(body).slice(..sent.min(len));
                if tx.send(Ok(Frame::data(head))).await.is_ok() {
                    cut(&tx).await;
                }
            });
            respond(status, &headers, Some(len), Chan(rx).boxed())
        }
        Reply::Hang(max) => {
            tokio::time::sleep(max).await;
            Err(io::Error::other("hang over"))
        }
        Reply::Close => Err(io::Error::other("closed without an answer")),
    }
}

/// Ends a body abruptly, after giving hyper time to write out what was sent before (it drops
/// its unwritten buffer when the body fails): the peer gets those bytes, then the break.
async fn cut(tx: &mpsc::Sender<Result<Frame<Bytes>, io::Error>>) {
    tokio::time::sleep(CUT_GRACE).await;
    let _ = tx.send(Err(io::Error::other("body cut"))).await;
}

/// How long a cut waits for the bytes before it to be written.
const CUT_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

fn respond(
    status: u16,
    headers: &[(String, String)],
    content_length: Option<usize>,
    body: Body,
) -> Result<Response<Body>, io::Error> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        if !FRAMING.contains(&k.to_ascii_lowercase().as_str()) {
            b = b.header(k.as_str(), v.as_str());
        }
    }
    if let Some(len) = content_length {
        b = b.header("content-length", len.to_string());
    }
    b.body(body).map_err(io::Error::other)
}
