//! HTTP/1.1 server of the control API on a Unix socket.
//!
//! Requests are parsed and validated here; only well-formed [`ApiRequest`]s
//! reach the VMM's [`RequestHandler`]. The server runs a single-threaded tokio
//! runtime on its own thread so that it costs little memory and never blocks
//! the VMM.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::ch::{self, ChReply};
use crate::counts::{ApiRequestCounts, UNKNOWN_ROUTE};
use crate::types::{
    AddDimmBody, ApiError, ApiRequest, ApiResponse, ErrorBody, RequestHandler, ResizeVirtioMemBody,
    SetBalloonBody, SetMemoryBody, SetMemoryPolicyBody, METRICS_CONTENT_TYPE,
};

/// Permissions of the API socket unless told otherwise: its owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Largest request body the server reads; larger ones get HTTP 413.
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;

/// How long a client may take to send the request headers or the body.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once. At the limit a new connection evicts the oldest one
/// whose request is not with the handler (see [`ConnectionTable::admit`]), or is closed
/// right away if there is none, so that a misbehaving client can neither make the VMM's
/// memory footprint grow nor lock other clients out.
const MAX_CONNECTIONS: usize = 64;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the accept
/// loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Longest virtio-mem device or DIMM id accepted.
const MAX_DEVICE_ID_LEN: usize = 64;

/// Every route of the API as (method, path template). The OpenAPI document
/// must list exactly these; a unit test checks it.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm/info"),
    ("PUT", "/vm/shutdown"),
    ("PUT", "/vm/reboot"),
    ("PUT", "/vm/virtio-mem/{id}"),
    ("GET", "/vm/balloon"),
    ("PUT", "/vm/balloon"),
    ("PUT", "/vm/dimms"),
    ("DELETE", "/vm/dimms/{id}"),
    ("GET", "/vm/memory"),
    ("PUT", "/vm/memory"),
    ("PUT", "/vm/memory/policy"),
    ("GET", "/metrics"),
];

/// What `PUT /vm/balloon` takes, for error messages.
const BALLOON_BODY: &str = r#"{"target_size": <bytes>}"#;

/// What `PUT /vm/virtio-mem/{id}` takes, for error messages.
const RESIZE_VIRTIO_MEM_BODY: &str = r#"{"requested_size": <bytes>}"#;

/// What `PUT /vm/dimms` takes, for error messages.
const ADD_DIMM_BODY: &str = r#"{"size": <bytes>, "node": N, "backing": "anon|memfd|hugetlbfs", "prealloc": bool, "id": "name"}"#;

/// Errors of binding and running the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The directory that should hold the socket does not exist.
    #[error("cannot create API socket {path}: directory {dir} does not exist")]
    ParentDirMissing {
        /// Socket path.
        path: PathBuf,
        /// Its missing parent directory.
        dir: PathBuf,
    },
    /// Another process serves on the socket path.
    #[error("API socket {path} is already in use by another process")]
    AlreadyInUse {
        /// Socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the socket path; it is left alone.
    #[error("cannot create API socket {path}: the path exists and is not a socket")]
    NotASocket {
        /// Socket path.
        path: PathBuf,
    },
    /// Checking whether an existing socket is still served failed.
    #[error("cannot check whether API socket {path} is in use: {reason}")]
    Probe {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        reason: io::Error,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove stale API socket {path}: {reason}")]
    RemoveStale {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        reason: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot bind API socket {path}: {reason}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        reason: io::Error,
    },
    /// The requested socket mode is not plain permission bits.
    #[error("invalid API socket mode {mode:o} for {path}: give permission bits only, at most 777 (octal)")]
    InvalidMode {
        /// Socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
    },
    /// The socket's permissions could not be set; the socket is removed again.
    #[error("cannot set the permissions of API socket {path} to {mode:o}: {reason}")]
    Permissions {
        /// Socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// OS error.
        reason: io::Error,
    },
    /// `spawn` was called twice, or after `shutdown`.
    #[error("API server on {path} is already serving or was shut down")]
    NotListening {
        /// Socket path.
        path: PathBuf,
    },
    /// The tokio runtime or the server thread could not be started.
    #[error("cannot start the API server on {path}: {reason}")]
    Start {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        reason: io::Error,
    },
}

/// A socket mode that is not octal permission bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid socket mode '{0}': expected octal permission bits such as 600 or 660 (at most 777)"
)]
pub struct InvalidSocketMode(pub String);

/// Parses a socket mode written in octal: `600`, `0660`, `0o660`.
pub fn parse_socket_mode(text: &str) -> Result<u32, InvalidSocketMode> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let valid = !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    valid
        .then(|| u32::from_str_radix(digits, 8).ok())
        .flatten()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| InvalidSocketMode(text.to_owned()))
}

/// A bound API socket. Serve it with [`ApiServer::spawn`].
///
/// Dropping the server, or calling [`ApiServer::shutdown`], stops serving and
/// removes the socket file. `std::process::exit` runs no destructors, so a VMM
/// that exits that way should call `shutdown` first (the server is `Sync`: keep
/// it in an `Arc` to reach it from wherever the VMM exits).
#[derive(Debug)]
pub struct ApiServer {
    socket_path: PathBuf,
    /// Device and inode of the socket file we created, so that cleanup never
    /// removes a socket that another process bound at the same path later.
    socket_identity: (u64, u64),
    /// Taken by `spawn` (or dropped by `shutdown`).
    listener: Mutex<Option<UnixListener>>,
    stop: Arc<Notify>,
    socket_removed: AtomicBool,
    /// Answered requests, for the metrics.
    counts: Arc<ApiRequestCounts>,
}

impl ApiServer {
    /// Bind the API socket at `path`, readable and writable by its owner only
    /// ([`DEFAULT_SOCKET_MODE`], whatever the umask).
    ///
    /// A stale socket file (nobody listening) is replaced; a socket that
    /// another process still serves is an error, as is anything at `path`
    /// that is not a socket.
    pub fn bind(path: &Path) -> Result<ApiServer, ApiServerError> {
        Self::bind_with_mode(path, DEFAULT_SOCKET_MODE)
    }

    /// [`ApiServer::bind`] with the socket's permission bits set to `mode` (e.g. `0o660` to
    /// let a group control the VM). Whoever may write the socket controls the VM.
    pub fn bind_with_mode(path: &Path, mode: u32) -> Result<ApiServer, ApiServerError> {
        if mode & !0o777 != 0 {
            return Err(ApiServerError::InvalidMode {
                path: path.to_owned(),
                mode,
            });
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(ApiServerError::ParentDirMissing {
                    path: path.to_owned(),
                    dir: dir.to_owned(),
                });
            }
        }
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|reason| {
            if reason.kind() == io::ErrorKind::AddrInUse {
                // Another process bound the path between our check and bind.
                ApiServerError::AlreadyInUse {
                    path: path.to_owned(),
                }
            } else {
                ApiServerError::Bind {
                    path: path.to_owned(),
                    reason,
                }
            }
        })?;
        let metadata = std::fs::symlink_metadata(path).map_err(|reason| ApiServerError::Bind {
            path: path.to_owned(),
            reason,
        })?;
        // From here on, dropping the server removes the socket file again.
        let server = ApiServer {
            socket_path: path.to_owned(),
            socket_identity: (metadata.dev(), metadata.ino()),
            listener: Mutex::new(None),
            stop: Arc::new(Notify::new()),
            socket_removed: AtomicBool::new(false),
            counts: Arc::default(),
        };
        // bind() created the file with the umask's permissions; narrow them before serving.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |reason| ApiServerError::Permissions {
                path: path.to_owned(),
                mode,
                reason,
            },
        )?;
        listener
            .set_nonblocking(true)
            .map_err(|reason| ApiServerError::Bind {
                path: path.to_owned(),
                reason,
            })?;
        // A client that connected while the umask's permissions still applied is refused:
        // nobody may have a connection the final permissions would not allow.
        while listener.accept().is_ok() {}
        *lock_ignoring_poison(&server.listener) = Some(listener);
        Ok(server)
    }

    /// Path of the socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The requests this server answered, by method, route template and status (for
    /// `tidevm_api_requests_total`).
    pub fn request_counts(&self) -> Arc<ApiRequestCounts> {
        Arc::clone(&self.counts)
    }

    /// Serve requests on a new thread named `tidevm-api` until
    /// [`ApiServer::shutdown`] or drop. Can be called once.
    pub fn spawn(
        &self,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<JoinHandle<()>, ApiServerError> {
        let start_error = |reason| ApiServerError::Start {
            path: self.socket_path.clone(),
            reason,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            // Handlers wait on the VMM's control loop, which serves one request
            // at a time anyway; more threads would only cost memory.
            .max_blocking_threads(2)
            .thread_name("tidevm-api-handler")
            .build()
            .map_err(start_error)?;
        let std_listener = lock_ignoring_poison(&self.listener).take().ok_or_else(|| {
            ApiServerError::NotListening {
                path: self.socket_path.clone(),
            }
        })?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _context = runtime.enter();
            tokio::net::UnixListener::from_std(std_listener).map_err(start_error)?
        };
        let stop = Arc::clone(&self.stop);
        let counts = Arc::clone(&self.counts);
        std::thread::Builder::new()
            .name("tidevm-api".to_owned())
            .spawn(move || {
                runtime.block_on(accept_connections(listener, handler, stop, counts));
                // Do not wait for a handler that may be stuck in the VMM.
                runtime.shutdown_background();
            })
            .map_err(start_error)
    }

    /// Stop serving and remove the socket file. Idempotent.
    ///
    /// The serving thread exits soon after: it gives connections in flight up to two
    /// seconds to finish (join the thread to wait for that), then abandons them.
    pub fn shutdown(&self) {
        self.stop.notify_one();
        drop(lock_ignoring_poison(&self.listener).take());
        self.remove_socket_file();
    }

    fn remove_socket_file(&self) {
        if self.socket_removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(metadata) = std::fs::symlink_metadata(&self.socket_path) else {
            return;
        };
        if metadata.file_type().is_socket()
            && (metadata.dev(), metadata.ino()) == self.socket_identity
        {
            // Nothing useful to do on failure while shutting down.
            let _ = std::fs::remove_file(&self.socket_path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Remove a socket file at `path` that nobody serves any more.
fn remove_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(reason) => {
            return Err(ApiServerError::Probe {
                path: path.to_owned(),
                reason,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::AlreadyInUse {
            path: path.to_owned(),
        }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(reason) => Err(ApiServerError::RemoveStale {
                    path: path.to_owned(),
                    reason,
                }),
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(reason) => Err(ApiServerError::Probe {
            path: path.to_owned(),
            reason,
        }),
    }
}

/// How long a stopping server waits for connections in flight.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// One connection being served, as the accept loop sees it.
struct ConnectionEntry {
    id: u64,
    /// Requests of this connection the handler is carrying out now (0 or 1).
    handling: Arc<AtomicUsize>,
    /// Tells the connection to close so that a new client can be served.
    evict: Arc<Notify>,
}

/// The connections that count against [`MAX_CONNECTIONS`], oldest first.
#[derive(Default)]
struct ConnectionTable {
    entries: Mutex<Vec<ConnectionEntry>>,
    next_id: AtomicUsize,
}

impl ConnectionTable {
    /// Makes room for a new connection and registers it; `None` when every connection is
    /// waiting for the handler (then the new one must be refused).
    ///
    /// At the limit, the oldest connection whose request is not with the handler is evicted:
    /// it is idle, or still sending its request (which has not changed anything yet). So
    /// clients that connect and sit there cannot lock the others out.
    fn admit(&self) -> Option<(u64, Arc<AtomicUsize>, Arc<Notify>)> {
        let mut entries = lock_ignoring_poison(&self.entries);
        if entries.len() >= MAX_CONNECTIONS {
            let idle = entries
                .iter()
                .position(|entry| entry.handling.load(Ordering::Acquire) == 0)?;
            entries.remove(idle).evict.notify_one();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let handling = Arc::new(AtomicUsize::new(0));
        let evict = Arc::new(Notify::new());
        entries.push(ConnectionEntry {
            id,
            handling: Arc::clone(&handling),
            evict: Arc::clone(&evict),
        });
        Some((id, handling, evict))
    }

    fn remove(&self, id: u64) {
        lock_ignoring_poison(&self.entries).retain(|entry| entry.id != id);
    }
}

async fn accept_connections(
    listener: tokio::net::UnixListener,
    handler: Arc<dyn RequestHandler>,
    stop: Arc<Notify>,
    counts: Arc<ApiRequestCounts>,
) {
    let mut stopped = pin!(stop.notified());
    // Every connection task, evicted ones included, until it ends.
    let live_connections = Arc::new(AtomicUsize::new(0));
    let table = Arc::new(ConnectionTable::default());
    loop {
        let accepted = poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            listener.poll_accept(cx).map(Some)
        })
        .await;
        let stream = match accepted {
            None => {
                // Let answers in flight (the reply to a shutdown request, say) reach
                // their clients before the runtime goes away.
                let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                while live_connections.load(Ordering::Acquire) > 0
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                return;
            }
            Some(Ok((stream, _peer))) => stream,
            Some(Err(_)) => {
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Some((id, handling, evict)) = table.admit() else {
            drop(stream);
            continue;
        };
        live_connections.fetch_add(1, Ordering::AcqRel);
        let live_connections = Arc::clone(&live_connections);
        let handler = Arc::clone(&handler);
        let table = Arc::clone(&table);
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            serve_connection(stream, handler, handling, evict, counts).await;
            table.remove(id);
            live_connections.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// How long an evicted connection may take to close by itself (an idle one closes at
/// once) before it is dropped, unless the handler is working on its request.
const EVICTION_GRACE: Duration = Duration::from_millis(100);

async fn serve_connection(
    stream: tokio::net::UnixStream,
    handler: Arc<dyn RequestHandler>,
    handling: Arc<AtomicUsize>,
    evict: Arc<Notify>,
    counts: Arc<ApiRequestCounts>,
) {
    let service_handling = Arc::clone(&handling);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let handler = Arc::clone(&handler);
        let handling = Arc::clone(&service_handling);
        let counts = Arc::clone(&counts);
        async move {
            let method = request.method().clone();
            let (endpoint, response) = route(request, handler, handling).await;
            // A stream counts when its head is sent.
            counts.record(method.as_str(), endpoint, response.status().as_u16());
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // Cloud Hypervisor's client looks for `Content-Length: ` spelled exactly so.
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_READ_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = pin!(connection);
    // A broken connection concerns only its client; nothing to report.
    let mut evicted = pin!(evict.notified());
    let finished = poll_fn(|cx| {
        if connection.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        evicted.as_mut().poll(cx).map(|()| false)
    })
    .await;
    if finished {
        return;
    }
    // Evicted: finish a request in progress, then close.
    connection.as_mut().graceful_shutdown();
    loop {
        match tokio::time::timeout(EVICTION_GRACE, connection.as_mut()).await {
            Ok(_) => return,
            // Still sending a request (none of which has reached the handler, so the VM
            // is unchanged), or not reading the answer to one that has been carried out.
            Err(_elapsed) if handling.load(Ordering::Acquire) == 0 => return,
            Err(_elapsed) => {}
        }
    }
}

/// Any response body: a whole one, or the event stream.
type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `GET /vm/events` streams; everything else is answered whole. Also returns the route
/// template the request was for (a label of `tidevm_api_requests_total`).
async fn route(
    request: Request<Incoming>,
    handler: Arc<dyn RequestHandler>,
    handling: Arc<AtomicUsize>,
) -> (&'static str, Response<AnyBody>) {
    if request.uri().path() == EVENTS_PATH {
        if request.method() != hyper::Method::GET {
            let mut response = error_response(&ApiError::method_not_allowed(format!(
                "method {} is not allowed on {EVENTS_PATH}; use GET",
                request.method()
            )));
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            return (EVENTS_PATH, response.map(|b| b.boxed()));
        }
        return (EVENTS_PATH, serve_events(handler, handling).await);
    }
    let (endpoint, response) = serve_request(request, handler, handling).await;
    (endpoint, response.map(|b| b.boxed()))
}

/// The path of the event stream.
const EVENTS_PATH: &str = "/vm/events";
/// Routes answered with a stream rather than a whole body.
pub(crate) const STREAM_ROUTES: &[(&str, &str)] = &[("GET", EVENTS_PATH)];
/// Event lines buffered between the forwarding thread and the connection.
const EVENT_STREAM_BUFFER: usize = 64;

/// The event stream's body: lines as they come, until the VMM ends the subscription. While
/// it lives the connection counts as busy, so it is not evicted for an idle one.
struct EventBody {
    lines: tokio::sync::mpsc::Receiver<Bytes>,
    _handling: Handling,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(hyper::body::Frame::data(l))))
    }
}

/// `GET /vm/events`: newline-delimited JSON, kept open. The VMM hands out a bounded queue
/// per subscriber and never waits on it (a subscriber that stops reading loses events and
/// is told how many); a thread here moves lines from that queue to the connection.
async fn serve_events(
    handler: Arc<dyn RequestHandler>,
    handling: Arc<AtomicUsize>,
) -> Response<AnyBody> {
    let subscription = match tokio::task::spawn_blocking(move || handler.subscribe_events()).await {
        Ok(Ok(subscription)) => subscription,
        Ok(Err(error)) => return error_response(&error).map(|b| b.boxed()),
        Err(_) => {
            return error_response(&ApiError::internal("the VMM failed to subscribe"))
                .map(|b| b.boxed())
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(EVENT_STREAM_BUFFER);
    tokio::task::spawn_blocking(move || loop {
        match subscription.recv_timeout(Duration::from_secs(1)) {
            // The bus probes for gone subscribers with empty items.
            Ok(line) if line.is_empty() => {}
            Ok(line) => {
                if tx.blocking_send(Bytes::from(line + "\n")).is_err() {
                    return;
                }
            }
            // Checks now and then whether the client went away.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !tx.is_closed() => {}
            Err(_) => return,
        }
    });
    let body = EventBody {
        lines: rx,
        _handling: Handling::start(handling),
    };
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Counts a request as being with the handler while it lives.
struct Handling(Arc<AtomicUsize>);

impl Handling {
    fn start(counter: Arc<AtomicUsize>) -> Handling {
        counter.fetch_add(1, Ordering::AcqRel);
        Handling(counter)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a request with a whole body; also returns its route template.
async fn serve_request(
    request: Request<Incoming>,
    handler: Arc<dyn RequestHandler>,
    handling: Arc<AtomicUsize>,
) -> (&'static str, Response<Full<Bytes>>) {
    let path = request.uri().path().to_owned();
    if path.starts_with("/api/v1/") {
        let template = ch::CH_ROUTES
            .iter()
            .find(|(_, route)| *route == path)
            .map_or(UNKNOWN_ROUTE, |(_, route)| *route);
        let response = serve_cloud_hypervisor_request(request, &path, handler).await;
        return (template, response);
    }
    let Some(endpoint) = Endpoint::from_path(&path, request.method().as_str()) else {
        let response = error_response(&ApiError::not_found(format!(
            "unknown route {}; the API has {}",
            abbreviate(&path),
            route_list()
        )));
        return (UNKNOWN_ROUTE, response);
    };
    let template = endpoint.template();
    (
        template,
        answer(request, endpoint, &path, handler, handling).await,
    )
}

async fn answer(
    request: Request<Incoming>,
    endpoint: Endpoint,
    path: &str,
    handler: Arc<dyn RequestHandler>,
    handling: Arc<AtomicUsize>,
) -> Response<Full<Bytes>> {
    if request.method().as_str() != endpoint.method() {
        let mut response = error_response(&ApiError::method_not_allowed(format!(
            "method {} is not allowed on {}; use {}",
            request.method(),
            abbreviate(path),
            endpoint.method()
        )));
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(endpoint.method()));
        return response;
    }
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(error) => return error_response(&error),
    };
    let json_status = endpoint.json_status();
    let api_request = match endpoint.parse_body(&body) {
        Ok(api_request) => api_request,
        Err(error) => return error_response(&error),
    };
    // From here on the request may change the VM: the connection is not evicted until
    // its answer is out.
    let _handling = Handling::start(handling);
    let outcome = tokio::task::spawn_blocking(move || handler.handle(api_request)).await;
    match outcome {
        Ok(Ok(response)) => success_response(response, json_status),
        Ok(Err(error)) => error_response(&error),
        Err(_) => error_response(&ApiError::internal("the VMM failed to handle the request")),
    }
}

/// Serves a Cloud Hypervisor route (see the `ch` module). Its clients send no
/// Content-Type, which is fine: no route looks at it.
async fn serve_cloud_hypervisor_request(
    request: Request<Incoming>,
    path: &str,
    handler: Arc<dyn RequestHandler>,
) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_owned();
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(error) => return without_reason_phrase(error_response(&error)),
    };
    let call = match ch::parse(&method, path, &body) {
        Ok(call) => call,
        Err(error) => return without_reason_phrase(error_response(&error)),
    };
    let outcome = tokio::task::spawn_blocking(move || ch::execute(call, handler.as_ref())).await;
    let response = match outcome {
        Ok(Ok(ChReply::Empty)) => build_response(StatusCode::NO_CONTENT, None),
        Ok(Ok(ChReply::Json(json))) => json_response(StatusCode::OK, serde_json::to_vec(&json)),
        Ok(Err(error)) => error_response(&error),
        Err(_) => error_response(&ApiError::internal("the VMM failed to handle the request")),
    };
    without_reason_phrase(response)
}

/// Cloud Hypervisor's client parses everything between `HTTP/1.1 ` and the end of the
/// status line as the number, so its server sends no reason phrase (`HTTP/1.1 204 `);
/// with hyper's `204 No Content` that client fails. Only its routes get this.
fn without_reason_phrase(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(b""));
    response
}

/// "GET /vm/info, PUT /vm/shutdown, ..." for error messages.
fn route_list() -> String {
    let routes: Vec<String> = ROUTES
        .iter()
        .chain(STREAM_ROUTES)
        .map(|(method, path)| format!("{method} {path}"))
        .collect();
    routes.join(", ")
}

/// The endpoint for `method` and `path`: 404 for an unknown path; 405 for a method the path
/// does not take, with the method it does take (for the `Allow` header).
fn route_endpoint(method: &str, path: &str) -> Result<Endpoint, (ApiError, Option<&'static str>)> {
    let Some(endpoint) = Endpoint::from_path(path, method) else {
        return Err((
            ApiError::not_found(format!(
                "unknown route {}; the API has {}",
                abbreviate(path),
                route_list()
            )),
            None,
        ));
    };
    if method != endpoint.method() {
        let allow = endpoint.method();
        return Err((
            ApiError::method_not_allowed(format!(
                "method {} is not allowed on {}; use {allow}",
                abbreviate(method),
                abbreviate(path),
            )),
            Some(allow),
        ));
    }
    Ok(endpoint)
}

/// Turns a request's method, path and complete body into an [`ApiRequest`], exactly as the
/// server does once it has read the body (same routing, same body parsing, same errors; the
/// fuzz target `api_request` feeds it arbitrary input). Every error is a 4xx.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let endpoint = route_endpoint(method, path).map_err(|(error, _)| error)?;
    endpoint.parse_body(body)
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::payload_too_large(format!(
            "request body exceeds {MAX_REQUEST_BODY_BYTES} bytes"
        ))
    };
    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > MAX_REQUEST_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(request.into_body(), MAX_REQUEST_BODY_BYTES);
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, limited.collect()).await {
        Err(_elapsed) => Err(ApiError::new(408, "timed out reading the request body")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(error)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {error}"
        ))),
    }
}

/// A route of the API, with the parameters taken from its path.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    VmInfo,
    Shutdown,
    Reboot,
    VirtioMem { id: String },
    BalloonStatus,
    BalloonTarget,
    AddDimm,
    RemoveDimm { id: String },
    MemoryStatus,
    SetMemory,
    SetMemoryPolicy,
    Metrics,
}

impl Endpoint {
    /// The endpoint for `path`; `method` only chooses between the two balloon routes that
    /// share a path (a wrong method is reported later, as 405).
    fn from_path(path: &str, method: &str) -> Option<Endpoint> {
        match path {
            "/vm/info" => Some(Endpoint::VmInfo),
            "/vm/balloon" if method == "GET" => Some(Endpoint::BalloonStatus),
            "/vm/balloon" => Some(Endpoint::BalloonTarget),
            "/vm/shutdown" => Some(Endpoint::Shutdown),
            "/vm/reboot" => Some(Endpoint::Reboot),
            "/vm/dimms" => Some(Endpoint::AddDimm),
            "/vm/memory" if method == "GET" => Some(Endpoint::MemoryStatus),
            "/vm/memory" => Some(Endpoint::SetMemory),
            "/vm/memory/policy" => Some(Endpoint::SetMemoryPolicy),
            "/metrics" => Some(Endpoint::Metrics),
            _ => {
                if let Some(id) = path.strip_prefix("/vm/dimms/") {
                    return path_id(id).map(|id| Endpoint::RemoveDimm { id });
                }
                let id = path.strip_prefix("/vm/virtio-mem/")?;
                path_id(id).map(|id| Endpoint::VirtioMem { id })
            }
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Endpoint::VmInfo
            | Endpoint::BalloonStatus
            | Endpoint::MemoryStatus
            | Endpoint::Metrics => "GET",
            Endpoint::SetMemory
            | Endpoint::SetMemoryPolicy
            | Endpoint::Shutdown
            | Endpoint::Reboot
            | Endpoint::VirtioMem { .. }
            | Endpoint::BalloonTarget
            | Endpoint::AddDimm => "PUT",
            Endpoint::RemoveDimm { .. } => "DELETE",
        }
    }

    /// The status of a successful answer that carries a JSON body (an empty answer is
    /// always 204): a DIMM added is 201 Created, a DIMM asked to leave is 202 Accepted
    /// (the guest has yet to eject it).
    fn json_status(&self) -> StatusCode {
        match self {
            Endpoint::AddDimm => StatusCode::CREATED,
            Endpoint::RemoveDimm { .. } => StatusCode::ACCEPTED,
            Endpoint::VmInfo
            | Endpoint::Shutdown
            | Endpoint::Reboot
            | Endpoint::VirtioMem { .. }
            | Endpoint::BalloonStatus
            | Endpoint::BalloonTarget
            | Endpoint::MemoryStatus
            | Endpoint::SetMemory
            | Endpoint::SetMemoryPolicy
            | Endpoint::Metrics => StatusCode::OK,
        }
    }

    /// The route template, as in [`ROUTES`] (a label of `tidevm_api_requests_total`).
    fn template(&self) -> &'static str {
        match self {
            Endpoint::VmInfo => "/vm/info",
            Endpoint::Shutdown => "/vm/shutdown",
            Endpoint::Reboot => "/vm/reboot",
            Endpoint::VirtioMem { .. } => "/vm/virtio-mem/{id}",
            Endpoint::BalloonStatus | Endpoint::BalloonTarget => "/vm/balloon",
            Endpoint::AddDimm => "/vm/dimms",
            Endpoint::RemoveDimm { .. } => "/vm/dimms/{id}",
            Endpoint::MemoryStatus | Endpoint::SetMemory => "/vm/memory",
            Endpoint::SetMemoryPolicy => "/vm/memory/policy",
            Endpoint::Metrics => "/metrics",
        }
    }

    fn parse_body(self, body: &[u8]) -> Result<ApiRequest, ApiError> {
        match self {
            Endpoint::VmInfo => expect_no_parameters(body).map(|()| ApiRequest::VmInfo),
            Endpoint::Shutdown => expect_no_parameters(body).map(|()| ApiRequest::Shutdown),
            Endpoint::Reboot => expect_no_parameters(body).map(|()| ApiRequest::Reboot),
            Endpoint::BalloonStatus => {
                expect_no_parameters(body).map(|()| ApiRequest::BalloonStatus)
            }
            Endpoint::MemoryStatus => expect_no_parameters(body).map(|()| ApiRequest::MemoryStatus),
            Endpoint::Metrics => expect_no_parameters(body).map(|()| ApiRequest::Metrics),
            Endpoint::SetMemory => {
                const EXPECTED: &str = r#"{"size": <bytes or "6G">, "node": N}"#;
                if is_blank(body) {
                    return Err(ApiError::bad_request(format!(
                        "missing request body: expected {EXPECTED}"
                    )));
                }
                let json: serde_json::Value = parse_json(body)?;
                if !json.is_object() {
                    return Err(ApiError::bad_request(format!(
                        "invalid request body: expected {EXPECTED}"
                    )));
                }
                let parsed: SetMemoryBody = serde_json::from_value(json).map_err(|error| {
                    ApiError::bad_request(format!("invalid request body: {error}"))
                })?;
                Ok(ApiRequest::SetMemory(parsed))
            }
            Endpoint::SetMemoryPolicy => {
                let parsed: SetMemoryPolicyBody = parse_object(
                    body,
                    r#"{"policy": "auto,min=1G,max=8G"} or {"policy": "off"}"#,
                )?;
                Ok(ApiRequest::SetMemoryPolicy {
                    policy: parsed.policy,
                })
            }
            Endpoint::BalloonTarget => {
                let parsed: SetBalloonBody = parse_object(body, BALLOON_BODY)?;
                Ok(ApiRequest::SetBalloon {
                    target_size: parsed.target_size,
                })
            }
            Endpoint::AddDimm => {
                let parsed: AddDimmBody = parse_object(body, ADD_DIMM_BODY)?;
                if let Some(id) = &parsed.id {
                    validate_id(id, "DIMM id")?;
                }
                Ok(ApiRequest::AddDimm(parsed))
            }
            Endpoint::RemoveDimm { id } => {
                validate_id(&id, "DIMM id")?;
                expect_no_parameters(body)?;
                Ok(ApiRequest::RemoveDimm { id })
            }
            Endpoint::VirtioMem { id } => {
                validate_id(&id, "virtio-mem device id")?;
                let parsed: ResizeVirtioMemBody = parse_object(body, RESIZE_VIRTIO_MEM_BODY)?;
                Ok(ApiRequest::ResizeVirtioMem {
                    id,
                    requested_size: parsed.requested_size,
                })
            }
        }
    }
}

/// A request body that must be one JSON object of type `T`; `expected` shows what to send.
///
/// serde would also take a struct from a JSON array, and a detour through
/// `serde_json::Value` would quietly keep the last of two fields with the same name: the
/// body is checked to be an object, then deserialized straight into `T`, which refuses
/// unknown and duplicate fields.
fn parse_object<T: serde::de::DeserializeOwned>(
    body: &[u8],
    expected: &str,
) -> Result<T, ApiError> {
    if is_blank(body) {
        return Err(ApiError::bad_request(format!(
            "missing request body: expected {expected}"
        )));
    }
    let json: serde_json::Value = parse_json(body)?;
    if !json.is_object() {
        return Err(ApiError::bad_request(format!(
            "invalid request body: expected {expected}"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// Requests without parameters take no body, or `{}`.
fn expect_no_parameters(body: &[u8]) -> Result<(), ApiError> {
    if is_blank(body) {
        return Ok(());
    }
    match parse_json::<serde_json::Value>(body)? {
        serde_json::Value::Object(fields) if fields.is_empty() => Ok(()),
        _ => Err(ApiError::bad_request(
            "this request takes no parameters: send no body, or {}",
        )),
    }
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))
}

/// The id in the last segment of a path, if it is one segment and not empty (else the
/// route does not exist: 404).
fn path_id(segment: &str) -> Option<String> {
    (!segment.is_empty() && !segment.contains('/')).then(|| segment.to_owned())
}

/// Checks a device id (`what` names its kind in the message, e.g. "DIMM id").
fn validate_id(id: &str, what: &str) -> Result<(), ApiError> {
    let valid_chars = id
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'));
    if valid_chars && !id.is_empty() && id.len() <= MAX_DEVICE_ID_LEN {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {what} {:?}: use 1 to {MAX_DEVICE_ID_LEN} of A-Z a-z 0-9 _ - .",
            abbreviate(id)
        )))
    }
}

/// Client-supplied text echoed in an error message, cut to a sane length.
fn abbreviate(text: &str) -> &str {
    const MAX_ECHO_LEN: usize = 128;
    match text.char_indices().nth(MAX_ECHO_LEN) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

/// The answer to a request the handler carried out; a JSON body goes with `json_status`
/// (from [`Endpoint::json_status`]).
pub(crate) fn success_response(
    response: ApiResponse,
    json_status: StatusCode,
) -> Response<Full<Bytes>> {
    let json = match response {
        ApiResponse::Empty => return build_response(StatusCode::NO_CONTENT, None),
        ApiResponse::Metrics(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            return response;
        }
        ApiResponse::VmInfo(info) => serde_json::to_vec(&info),
        ApiResponse::Balloon(info) => serde_json::to_vec(&info),
        ApiResponse::Dimm(info) => serde_json::to_vec(&info),
        ApiResponse::Memory(info) => serde_json::to_vec(&info),
        ApiResponse::MemoryPlan(plan) => serde_json::to_vec(&plan),
    };
    json_response(json_status, json)
}

fn json_response(status: StatusCode, json: serde_json::Result<Vec<u8>>) -> Response<Full<Bytes>> {
    match json {
        Ok(json) => build_response(status, Some(json)),
        Err(error) => error_response(&ApiError::internal(format!(
            "cannot serialize the response: {error}"
        ))),
    }
}

pub(crate) fn error_response(error: &ApiError) -> Response<Full<Bytes>> {
    // A handler that returns a non-error status still failed: report 500.
    let status = StatusCode::from_u16(error.status)
        .ok()
        .filter(|status| status.is_client_error() || status.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody {
        error: error.message.clone(),
    };
    // Serializing a struct holding one string cannot fail.
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    build_response(status, Some(json))
}

fn build_response(status: StatusCode, json: Option<Vec<u8>>) -> Response<Full<Bytes>> {
    let has_body = json.is_some();
    // A `Full` body has an exact length, so hyper sends `Content-Length` (which Cloud
    // Hypervisor's client needs to find the body) on every answer but a 204, where RFC 9110
    // forbids it and that client stops at the end of the headers anyway.
    let mut response = Response::new(Full::new(Bytes::from(json.unwrap_or_default())));
    *response.status_mut() = status;
    if has_body {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    #[test]
    fn every_route_is_routed() {
        for (method, template) in ROUTES {
            let path = template.replace("{id}", "vmem0");
            let endpoint = Endpoint::from_path(&path, method).expect(template);
            assert_eq!(endpoint.method(), *method, "{template}");
            assert_eq!(endpoint.template(), *template);
        }
    }

    #[test]
    fn parses_valid_requests() {
        assert_eq!(
            parse_request(Method::GET.as_str(), "/vm/info", b""),
            Ok(ApiRequest::VmInfo)
        );
        assert_eq!(
            parse_request(Method::PUT.as_str(), "/vm/shutdown", b" {} "),
            Ok(ApiRequest::Shutdown)
        );
        assert_eq!(
            parse_request(Method::PUT.as_str(), "/vm/reboot", b""),
            Ok(ApiRequest::Reboot)
        );
        assert_eq!(
            parse_request(
                Method::PUT.as_str(),
                "/vm/virtio-mem/vmem0",
                br#"{"requested_size": "2G"}"#
            ),
            Ok(ApiRequest::ResizeVirtioMem {
                id: "vmem0".to_owned(),
                requested_size: 2 << 30
            })
        );
    }

    #[test]
    fn rejects_invalid_requests_with_the_right_status() {
        let status = |method: Method, path: &str, body: &[u8]| {
            parse_request(method.as_str(), path, body)
                .unwrap_err()
                .status
        };
        assert_eq!(status(Method::GET, "/", b""), 404);
        assert_eq!(status(Method::GET, "/vm/info/", b""), 404);
        assert_eq!(status(Method::PUT, "/vm/virtio-mem/", b""), 404);
        assert_eq!(status(Method::PUT, "/vm/virtio-mem/a/b", b""), 404);
        assert_eq!(status(Method::PUT, "/vm/info", b""), 405);
        assert_eq!(status(Method::GET, "/vm/virtio-mem/vmem0", b""), 405);
        assert_eq!(status(Method::PUT, "/vm/shutdown", b"{\"now\":1}"), 400);
        assert_eq!(status(Method::PUT, "/vm/shutdown", b"[]"), 400);
        assert_eq!(status(Method::PUT, "/vm/virtio-mem/vmem0", b""), 400);
        assert_eq!(status(Method::PUT, "/vm/virtio-mem/vmem0", b"{"), 400);
        assert_eq!(status(Method::PUT, "/vm/virtio-mem/vmem0", b"[5]"), 400);
        assert_eq!(status(Method::PUT, "/vm/virtio-mem/vmem0", b"5"), 400);
        assert_eq!(
            status(Method::PUT, "/vm/virtio-mem/vmem0", b"\xff\xfe"),
            400
        );
        assert_eq!(
            status(
                Method::PUT,
                "/vm/virtio-mem/a%20b",
                br#"{"requested_size":1}"#
            ),
            400
        );
        let long_id = format!("/vm/virtio-mem/{}", "x".repeat(65));
        assert_eq!(
            status(Method::PUT, &long_id, br#"{"requested_size":1}"#),
            400
        );
    }

    #[test]
    fn parses_dimm_requests() {
        use crate::types::DimmBacking;
        assert_eq!(
            parse_request(
                Method::PUT.as_str(),
                "/vm/dimms",
                br#"{"size": 1073741824}"#
            ),
            Ok(ApiRequest::AddDimm(AddDimmBody {
                size: 1 << 30,
                node: None,
                backing: DimmBacking::Anon,
                prealloc: false,
                id: None,
            }))
        );
        assert_eq!(
            parse_request(
                Method::PUT.as_str(),
                "/vm/dimms",
                br#"{"size": "1G", "node": 1, "backing": "hugetlbfs", "prealloc": true,
                     "id": "big-1.a_b"}"#
            ),
            Ok(ApiRequest::AddDimm(AddDimmBody {
                size: 1 << 30,
                node: Some(1),
                backing: DimmBacking::Hugetlbfs,
                prealloc: true,
                id: Some("big-1.a_b".to_owned()),
            }))
        );
        assert_eq!(
            parse_request(
                Method::PUT.as_str(),
                "/vm/dimms",
                br#"{"size": "512MiB", "backing": "memfd"}"#
            )
            .map(|request| match request {
                ApiRequest::AddDimm(body) => (body.size, body.backing),
                other => panic!("{other:?}"),
            }),
            Ok((512 << 20, DimmBacking::Memfd))
        );
        // The VMM, not the server, checks the size's granularity.
        assert!(parse_request(Method::PUT.as_str(), "/vm/dimms", br#"{"size": 12345}"#).is_ok());
        for body in [&b""[..], b"{}"] {
            assert_eq!(
                parse_request(Method::DELETE.as_str(), "/vm/dimms/dimm0", body),
                Ok(ApiRequest::RemoveDimm {
                    id: "dimm0".to_owned()
                })
            );
        }
    }

    #[test]
    fn rejects_invalid_dimm_requests() {
        let error = |method: Method, path: &str, body: &[u8]| {
            let error = parse_request(method.as_str(), path, body).unwrap_err();
            (error.status, error.message)
        };
        let add = |body: &[u8]| error(Method::PUT, "/vm/dimms", body);

        let (status, message) = add(b"");
        assert_eq!(status, 400);
        assert!(message.contains(ADD_DIMM_BODY), "{message}");
        assert!(
            message.contains(r#""backing": "anon|memfd|hugetlbfs""#),
            "{message}"
        );
        let (status, message) = add(br#"[{"size": 1}]"#);
        assert_eq!(status, 400);
        assert!(message.contains(ADD_DIMM_BODY), "{message}");
        assert_eq!(add(b"5").0, 400);
        assert_eq!(add(b"{").0, 400);
        assert_eq!(add(b"{}").0, 400);
        assert_eq!(add(br#"{"size": -1}"#).0, 400);
        assert_eq!(add(br#"{"size": "lots"}"#).0, 400);
        assert_eq!(add(br#"{"size": 1, "node": -1}"#).0, 400);
        assert_eq!(add(br#"{"size": 1, "prealloc": "yes"}"#).0, 400);
        let (status, message) = add(br#"{"size": 1, "slot": 3}"#);
        assert_eq!(status, 400);
        assert!(message.contains("unknown field"), "{message}");
        let (status, message) = add(br#"{"size": 1, "backing": "file"}"#);
        assert_eq!(status, 400);
        assert!(message.contains("unknown variant"), "{message}");
        assert_eq!(add(br#"{"size": 1, "backing": "Anon"}"#).0, 400);
        let long_id = "x".repeat(65);
        for id in ["", "a b", "a/b", "dimm\u{e9}", long_id.as_str()] {
            let body = serde_json::to_vec(&serde_json::json!({"size": 1, "id": id})).unwrap();
            let (status, message) = add(&body);
            assert_eq!(status, 400, "{id:?}");
            assert!(message.starts_with("invalid DIMM id "), "{message}");
        }
        // `null` is an absent id (the VMM picks one).
        assert!(matches!(
            parse_request(
                Method::PUT.as_str(),
                "/vm/dimms",
                br#"{"size": 1, "id": null}"#
            ),
            Ok(ApiRequest::AddDimm(AddDimmBody { id: None, .. }))
        ));

        let (status, message) = error(Method::DELETE, "/vm/dimms/a%20b", b"");
        assert_eq!(status, 400);
        assert!(message.starts_with("invalid DIMM id "), "{message}");
        assert_eq!(
            error(Method::DELETE, &format!("/vm/dimms/{long_id}"), b"").0,
            400
        );
        assert_eq!(
            error(Method::DELETE, "/vm/dimms/dimm0", br#"{"force": true}"#).0,
            400
        );
        assert_eq!(error(Method::DELETE, "/vm/dimms/dimm0", b"[]").0, 400);

        for method in [Method::GET, Method::POST, Method::DELETE, Method::PATCH] {
            assert_eq!(error(method, "/vm/dimms", b"").0, 405);
        }
        for method in [Method::GET, Method::PUT, Method::POST] {
            assert_eq!(error(method, "/vm/dimms/dimm0", b"").0, 405);
        }
        assert_eq!(error(Method::DELETE, "/vm/dimms/", b"").0, 404);
        assert_eq!(error(Method::DELETE, "/vm/dimms/a/b", b"").0, 404);
        assert_eq!(error(Method::PUT, "/vm/dimms/", b"").0, 404);
        assert_eq!(error(Method::PUT, "/vm/dimmsx", b"").0, 404);
        assert_eq!(error(Method::DELETE, "/vm/dimm/dimm0", b"").0, 404);
    }

    #[test]
    fn dimm_answers_are_created_and_accepted() {
        let status = |method: Method, path: &str| {
            Endpoint::from_path(path, method.as_str())
                .unwrap()
                .json_status()
        };
        assert_eq!(status(Method::PUT, "/vm/dimms"), StatusCode::CREATED);
        assert_eq!(
            status(Method::DELETE, "/vm/dimms/dimm0"),
            StatusCode::ACCEPTED
        );
        assert_eq!(status(Method::GET, "/vm/info"), StatusCode::OK);
        assert_eq!(status(Method::GET, "/vm/balloon"), StatusCode::OK);
        let response = success_response(ApiResponse::Empty, StatusCode::CREATED);
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }

    #[test]
    fn error_responses_never_carry_success_statuses() {
        let response = error_response(&ApiError::new(200, "odd"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let response = error_response(&ApiError::new(0, "odd"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let response = error_response(&ApiError::conflict("busy"));
        assert_eq!(response.status(), StatusCode::CONFLICT);
    }

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        assert_eq!(parse_socket_mode("600"), Ok(0o600));
        assert_eq!(parse_socket_mode("0660"), Ok(0o660));
        assert_eq!(parse_socket_mode("0o640"), Ok(0o640));
        for bad in [
            "",
            "0o",
            "+600",
            "-600",
            "888",
            "1777",
            "4755",
            "rw-------",
            "77777777777777777777777",
        ] {
            let error = parse_socket_mode(bad).unwrap_err().to_string();
            assert!(error.contains(&format!("'{bad}'")), "{error}");
        }
    }

    #[test]
    fn abbreviate_cuts_on_char_boundaries() {
        let long = "é".repeat(300);
        assert_eq!(abbreviate(&long).chars().count(), 128);
        assert_eq!(abbreviate("short"), "short");
    }
}
