//! The one HTTP port every Hodei process opens: `GET /metrics` for Prometheus and
//! `GET /healthz` for whatever checks that the process is alive and can work.
//!
//! Two fixed routes read by a scraper and a probe do not justify an HTTP stack in every
//! binary, so this reads the request line itself and answers each request on a fresh
//! connection with `Connection: close`, which every scraper, probe and `curl` accepts. It is
//! not a general HTTP server: no keep-alive, no request bodies, no chunked encoding.
//!
//! [`bind`] first (port 0 picks a free port, and [`MetricsServer::local_addr`] tells which),
//! then [`MetricsServer::run`] until shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use crate::metrics::{self, BoxFuture};
use crate::Shutdown;

/// The longest request head (request line and headers) read; longer ones get 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head; slower ones get 408.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the health callback may take before the answer is 503.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the client to close after the response, see [`finish`].
const LINGER: Duration = Duration::from_secs(1);
/// Connections served at once; more wait in the listen backlog. A scraper and a probe need
/// two; the limit keeps a misbehaving client from costing more than a few tasks.
const MAX_CONNECTIONS: usize = 32;
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A bound listener, not yet serving.
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
}

/// Binds `addr`. Binding before serving lets a caller fail fast on a taken port and learn
/// the port it got for `:0`.
pub async fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    Ok(MetricsServer {
        listener,
        local_addr,
    })
}

impl MetricsServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `/metrics` (the global [`metrics`] registry) and `/healthz` until `shutdown`,
    /// each connection in its own task. `health` answers `Ok(())` when the process can work,
    /// or the reason it cannot, which becomes the body of the 503.
    ///
    /// On shutdown it stops accepting at once; connections already accepted finish on their
    /// own, each within a few seconds at most.
    pub async fn run<H>(self, health: H, shutdown: Shutdown)
    where
        H: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        let addr = self.local_addr;
        tracing::info!(%addr, "metrics on http://{addr}/metrics, health on http://{addr}/healthz");
        let health = Arc::new(health);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let slot = tokio::select! {
                _ = shutdown.wait() => break,
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.wait() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Usually out of file descriptors: pause rather than spin.
                        tracing::warn!(%error, "accepting a metrics connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let health = health.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(error) = serve_connection(stream, &*health).await {
                    tracing::debug!(%peer, %error, "metrics connection ended early");
                }
            });
        }
        tracing::info!(%addr, "metrics endpoint stopped");
    }
}

async fn serve_connection<H>(mut stream: TcpStream, health: &H) -> io::Result<()>
where
    H: Fn() -> BoxFuture<'static, Result<(), String>>,
{
    let response = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text(
            408,
            "Request Timeout",
            "the request head did not arrive in time\n",
        ),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => Response::text(
            431,
            "Request Header Fields Too Large",
            "the request head is over 8 KiB\n",
        ),
        Ok(Ok(Head::Complete(head))) => respond(&head, health).await,
    };
    match timeout(WRITE_TIMEOUT, write_response(&mut stream, &response)).await {
        Ok(written) => written?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response",
            ))
        }
    }
    finish(stream).await;
    Ok(())
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before the head was complete: there is nobody to answer.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(Head::Closed);
        }
        head.extend_from_slice(&chunk[..read]);
        if let Some(end) = head_end(&head) {
            if end > MAX_REQUEST_HEAD {
                return Ok(Head::TooLarge);
            }
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() >= MAX_REQUEST_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head ends: after the first empty line. A bare `\n` line end is accepted too, as
/// RFC 9112 allows, so a request typed into `nc` works.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|at| at + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Method and path (without query) of a well-formed HTTP/1.x request line.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end])
        .ok()?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && version.starts_with("HTTP/1.");
    if !well_formed {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Some((method, path))
}

async fn respond<H>(head: &[u8], health: &H) -> Response
where
    H: Fn() -> BoxFuture<'static, Result<(), String>>,
{
    let Some((method, path)) = request_line(head) else {
        return Response::text(400, "Bad Request", "expected an HTTP/1.1 request line\n");
    };
    if path != "/metrics" && path != "/healthz" {
        return Response::text(404, "Not Found", "not found: try /metrics or /healthz\n");
    }
    if method != "GET" {
        let mut response = Response::text(405, "Method Not Allowed", "only GET is allowed\n");
        response.allow_get = true;
        return response;
    }
    if path == "/metrics" {
        return Response {
            content_type: METRICS_CONTENT_TYPE,
            ..Response::text(200, "OK", metrics::render().await)
        };
    }
    match timeout(HEALTH_TIMEOUT, health()).await {
        Ok(Ok(())) => Response::text(200, "OK", "ok\n"),
        Ok(Err(reason)) => {
            tracing::warn!(%reason, "health check failed");
            Response::text(
                503,
                "Service Unavailable",
                format!("{}\n", reason.trim_end()),
            )
        }
        Err(_) => {
            tracing::warn!(timeout = ?HEALTH_TIMEOUT, "health check timed out");
            Response::text(503, "Service Unavailable", "the health check timed out\n")
        }
    }
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    allow_get: bool,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            reason,
            content_type: TEXT_CONTENT_TYPE,
            allow_get: false,
            body: body.into(),
        }
    }
}

async fn write_response(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
    let allow = if response.allow_get {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        response.status,
        response.reason,
        response.content_type,
        response.body.len(),
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(response.body.as_bytes()).await?;
    stream.shutdown().await
}

/// Closing a socket that still has unread bytes (a request body we ignored) makes the kernel
/// send a reset, which can destroy the response before the client reads it. So after sending
/// we read and drop what the client still sends, until it closes or [`LINGER`] passes.
async fn finish(mut stream: TcpStream) {
    let mut sink = [0u8; 1024];
    let _ = timeout(LINGER, async {
        let mut drained = 0;
        while drained < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShutdownTrigger;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Running {
        addr: SocketAddr,
        stop: ShutdownTrigger,
        server: tokio::task::JoinHandle<()>,
    }

    async fn start(healthy: Arc<AtomicBool>) -> Running {
        let server = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let (stop, shutdown) = Shutdown::new();
        let health = move || -> BoxFuture<'static, Result<(), String>> {
            let healthy = healthy.load(Ordering::SeqCst);
            Box::pin(async move {
                if healthy {
                    Ok(())
                } else {
                    Err("database unreachable".to_owned())
                }
            })
        };
        let server = tokio::spawn(server.run(health, shutdown));
        Running { addr, stop, server }
    }

    /// Sends `request` as is and returns the status line, the headers and the body, checking
    /// the headers every response must have.
    async fn send(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        assert!(headers.contains("Connection: close"), "{head}");
        assert!(
            headers.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        (status.to_owned(), headers.to_owned(), body.to_owned())
    }

    async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
        send(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n")
                .as_bytes(),
        )
        .await
    }

    #[tokio::test]
    async fn metrics_are_served_in_prometheus_text_format() {
        metrics::counter(
            "hodei_runtime_http_test_total",
            "Counted by the HTTP test.",
            &[],
        )
        .add(7);
        let server = start(Arc::new(AtomicBool::new(true))).await;

        let (status, headers, body) = get(server.addr, "/metrics?name[]=x").await;

        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
            "{headers}"
        );
        assert!(
            body.contains("# TYPE hodei_runtime_http_test_total counter\n"),
            "{body}"
        );
        assert!(
            body.contains("\nhodei_runtime_http_test_total 7\n"),
            "{body}"
        );
        metrics::tests::check_exposition(&body).unwrap();
    }

    #[tokio::test]
    async fn healthz_says_ok_until_the_health_check_fails_and_then_gives_its_reason() {
        let healthy = Arc::new(AtomicBool::new(true));
        let server = start(healthy.clone()).await;

        let (status, _, body) = get(server.addr, "/healthz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ok\n")
        );

        healthy.store(false, Ordering::SeqCst);
        let (status, _, body) = get(server.addr, "/healthz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 503 Service Unavailable", "database unreachable\n")
        );
    }

    #[tokio::test]
    async fn other_paths_methods_and_broken_requests_get_4xx() {
        let server = start(Arc::new(AtomicBool::new(true))).await;

        assert_eq!(get(server.addr, "/nope").await.0, "HTTP/1.1 404 Not Found");

        let (status, headers, _) = send(
            server.addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert!(headers.contains("Allow: GET"), "{headers}");

        assert_eq!(
            send(server.addr, b"hello\r\n\r\n").await.0,
            "HTTP/1.1 400 Bad Request"
        );

        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST_HEAD)
        );
        assert_eq!(
            send(server.addr, huge.as_bytes()).await.0,
            "HTTP/1.1 431 Request Header Fields Too Large"
        );

        // A hand-typed request with bare line feeds works too.
        assert_eq!(
            send(server.addr, b"GET /healthz HTTP/1.0\n\n").await.0,
            "HTTP/1.1 200 OK"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_the_server_and_it_accepts_no_more_connections() {
        let server = start(Arc::new(AtomicBool::new(true))).await;
        assert_eq!(get(server.addr, "/healthz").await.0, "HTTP/1.1 200 OK");

        server.stop.trigger();
        timeout(Duration::from_secs(5), server.server)
            .await
            .expect("run ends on shutdown")
            .unwrap();

        assert!(
            TcpStream::connect(server.addr).await.is_err(),
            "the listener is closed"
        );
    }
}

/// One health check of a dependency: `Err` says why the process cannot work.
pub type HealthCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Bind `addr` and serve `/metrics` and `/healthz` (healthy when every check passes) in the
/// background until shutdown. Returns the bound address.
pub async fn start(
    addr: SocketAddr,
    checks: Vec<HealthCheck>,
    shutdown: Shutdown,
) -> io::Result<SocketAddr> {
    let server = bind(addr).await?;
    let local = server.local_addr();
    let checks = Arc::new(checks);
    let health = move || -> BoxFuture<'static, Result<(), String>> {
        let checks = checks.clone();
        Box::pin(async move {
            for check in checks.iter() {
                check().await?;
            }
            Ok(())
        })
    };
    tokio::spawn(server.run(health, shutdown));
    Ok(local)
}
