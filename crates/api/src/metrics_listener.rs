//! `GET /metrics` over TCP, for Prometheus (`tidevm run --metrics-listen ADDR:PORT`).
//!
//! A small HTTP/1.1 server on its own thread (a single-threaded tokio runtime, like the API
//! server). It owns no VM state: each scrape becomes an [`ApiRequest::Metrics`] handed to the
//! same [`RequestHandler`] as the API socket's requests, so the metrics are collected on the
//! VMM's control thread. Only `GET /metrics` exists here; nothing on this port changes the VM.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;

use crate::server::{error_response, success_response};
use crate::types::{ApiError, ApiRequest, RequestHandler};

/// Scrapes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` so that the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The one path served.
const METRICS_PATH: &str = "/metrics";

/// Errors of binding and starting the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum MetricsListenerError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen for metrics on {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// OS error.
        reason: io::Error,
    },
    /// The runtime or the thread could not be started, or `spawn` was called twice.
    #[error("cannot start the metrics listener on {addr}: {reason}")]
    Start {
        /// The address.
        addr: SocketAddr,
        /// OS error.
        reason: io::Error,
    },
}

/// A bound metrics port. Serve it with [`MetricsListener::spawn`]; dropping it, or
/// [`MetricsListener::shutdown`], stops serving.
#[derive(Debug)]
pub struct MetricsListener {
    addr: SocketAddr,
    listener: Mutex<Option<TcpListener>>,
    stop: Arc<Notify>,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port: see [`MetricsListener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> Result<MetricsListener, MetricsListenerError> {
        let bind_error = |reason| MetricsListenerError::Bind { addr, reason };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(MetricsListener {
            addr,
            listener: Mutex::new(Some(listener)),
            stop: Arc::new(Notify::new()),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` on a new thread named `tidevm-metrics`, asking `handler` for
    /// [`ApiRequest::Metrics`]. Can be called once.
    pub fn spawn(
        &self,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<JoinHandle<()>, MetricsListenerError> {
        let addr = self.addr;
        let start_error = |reason| MetricsListenerError::Start { addr, reason };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(1)
            .thread_name("tidevm-metrics-handler")
            .build()
            .map_err(start_error)?;
        let std_listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| start_error(io::Error::other("already serving or shut down")))?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(start_error)?
        };
        let stop = Arc::clone(&self.stop);
        std::thread::Builder::new()
            .name("tidevm-metrics".to_owned())
            .spawn(move || {
                runtime.block_on(accept(listener, handler, stop));
                runtime.shutdown_background();
            })
            .map_err(start_error)
    }

    /// Stops serving. Idempotent.
    pub fn shutdown(&self) {
        self.stop.notify_one();
        drop(
            self.listener
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    handler: Arc<dyn RequestHandler>,
    stop: Arc<Notify>,
) {
    let mut stopped = pin!(stop.notified());
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            listener.poll_accept(cx).map(Some)
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok((stream, _peer))) => stream,
            Some(Err(_)) => {
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        if live.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        live.fetch_add(1, Ordering::AcqRel);
        let live = Arc::clone(&live);
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(serve(request, handler).await) }
            });
            // A broken connection concerns only its client.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            live.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn serve(
    request: Request<Incoming>,
    handler: Arc<dyn RequestHandler>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != METRICS_PATH {
        return error_response(&ApiError::not_found(format!(
            "this port serves only GET {METRICS_PATH}"
        )));
    }
    if request.method() != hyper::Method::GET {
        let mut response = error_response(&ApiError::method_not_allowed(format!(
            "use GET on {METRICS_PATH}"
        )));
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    // The body, if any, is ignored: a GET carries none worth reading.
    match tokio::task::spawn_blocking(move || handler.handle(ApiRequest::Metrics)).await {
        Ok(Ok(response)) => success_response(response, StatusCode::OK),
        Ok(Err(error)) => error_response(&error),
        Err(_) => error_response(&ApiError::internal("the VMM failed to collect the metrics")),
    }
}
