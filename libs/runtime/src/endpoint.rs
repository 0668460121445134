//! The one HTTP port every Hodei process opens: `GET /metrics` for Prometheus and
//! `GET /healthz` for whatever checks that the process is alive and can work.
//!
//! It is a two-route axum router on hyper (HTTP/1.1 only), so parsing requests, keep-alive,
//! methods (405 with `Allow`) and closing connections on shutdown are done by code that
//! many others use and review, not by ours. `/healthz` answers 200 `ok` when every check
//! passes and 503 with the first failing check's reason otherwise, or when the checks take
//! longer than [`HEALTH_TIMEOUT`]. Any other path is 404. There is no connection limit or
//! request timeout beyond hyper's own limits on a request head: the port is for a scraper
//! and a probe on loopback or a private network (the default address is 127.0.0.1).
//!
//! [`start`] binds first (port 0 picks a free port; the log line and the returned address
//! say which) and serves in the background until shutdown, when it stops accepting at once
//! and lets the requests in hand finish.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::metrics::{self, Metrics};
use crate::{BoxFuture, Shutdown};

/// How long the health checks may take before the answer is 503.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// One health check of a dependency: `Err` says why the process cannot work.
pub type HealthCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

struct Served {
    metrics: Metrics,
    checks: Vec<HealthCheck>,
}

/// Bind `addr` and serve `metrics` on `/metrics` and `/healthz` (healthy when every check
/// passes) in the background until `shutdown`. Returns the bound address.
pub async fn start(
    addr: SocketAddr,
    metrics: Metrics,
    checks: Vec<HealthCheck>,
    shutdown: Shutdown,
) -> io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = router(Arc::new(Served { metrics, checks }));
    // The system tests read the address from this line.
    tracing::info!(%addr, "metrics on http://{addr}/metrics, health on http://{addr}/healthz");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%addr, %error, "the metrics endpoint failed");
        }
        tracing::info!(%addr, "metrics endpoint stopped");
    });
    Ok(addr)
}

fn router(served: Arc<Served>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /metrics or /healthz\n",
            )
        })
        .with_state(served)
}

async fn scrape(State(served): State<Arc<Served>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        served.metrics.encode().await,
    )
        .into_response()
}

async fn healthz(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    let checks = async {
        for check in &served.checks {
            check().await?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, checks).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n".to_owned()),
        Ok(Err(reason)) => {
            tracing::warn!(%reason, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", reason.trim_end()),
            )
        }
        Err(_) => {
            tracing::warn!(timeout = ?HEALTH_TIMEOUT, "health check timed out");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the health check timed out\n".to_owned(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::timeout;

    async fn serve(healthy: Arc<AtomicBool>, shutdown: Shutdown) -> SocketAddr {
        let mut metrics = Metrics::new();
        metrics
            .counter("hodei_runtime_http_test_total", "Counted by the HTTP test")
            .inc_by(7);
        let check: HealthCheck = Arc::new(move || {
            let healthy = healthy.load(Ordering::SeqCst);
            Box::pin(async move {
                if healthy {
                    Ok(())
                } else {
                    Err("database unreachable".to_owned())
                }
            })
        });
        let addr = start(
            "127.0.0.1:0".parse().unwrap(),
            metrics,
            vec![check],
            shutdown,
        )
        .await
        .unwrap();
        assert_ne!(addr.port(), 0);
        addr
    }

    /// Sends `request` as is over a fresh TCP connection and returns the status line, the
    /// headers and the body.
    async fn send(addr: SocketAddr, request: &str) -> (String, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        assert!(
            headers
                .to_ascii_lowercase()
                .contains(&format!("content-length: {}\r\n", body.len())),
            "{head}"
        );
        (
            status.to_owned(),
            headers.to_ascii_lowercase(),
            body.to_owned(),
        )
    }

    async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
        send(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    #[tokio::test]
    async fn metrics_are_served_in_prometheus_text_format() {
        let addr = serve(Arc::new(AtomicBool::new(true)), Shutdown::new()).await;

        let (status, headers, body) = get(addr, "/metrics?name[]=x").await;

        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{headers}"
        );
        assert!(
            body.contains("# TYPE hodei_runtime_http_test_total counter\n"),
            "{body}"
        );
        assert_eq!(
            metrics::tests::samples(&body)["hodei_runtime_http_test_total"],
            7.0
        );
    }

    #[tokio::test]
    async fn healthz_says_ok_until_a_health_check_fails_and_then_gives_its_reason() {
        let healthy = Arc::new(AtomicBool::new(true));
        let addr = serve(healthy.clone(), Shutdown::new()).await;

        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ok\n")
        );

        healthy.store(false, Ordering::SeqCst);
        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 503 Service Unavailable", "database unreachable\n")
        );
    }

    #[tokio::test]
    async fn other_paths_and_methods_get_4xx() {
        let addr = serve(Arc::new(AtomicBool::new(true)), Shutdown::new()).await;

        let (status, _, body) = get(addr, "/nope").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!(body, "not found: try /metrics or /healthz\n");

        let (status, headers, _) = send(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert!(headers.contains("allow: get"), "{headers}");

        let (status, _, _) = send(addr, "hello\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }

    #[tokio::test]
    async fn shutdown_stops_the_server_and_it_accepts_no_more_connections() {
        let shutdown = Shutdown::new();
        let addr = serve(Arc::new(AtomicBool::new(true)), shutdown.clone()).await;
        assert_eq!(get(addr, "/healthz").await.0, "HTTP/1.1 200 OK");

        shutdown.cancel();
        timeout(Duration::from_secs(5), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the listener is closed soon after shutdown");
    }
}
