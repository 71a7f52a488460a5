//! Blocking client of the control API, for the CLI and the test harness.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use crate::types::{
    AddDimmBody, DimmInfo, ErrorBody, MemoryPlanInfo, MemoryStatus, ResizeVirtioMemBody,
    SetMemoryBody, VmInfo,
};

/// How long a request may take unless [`ApiClient::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response body the client reads.
const MAX_RESPONSE_BODY_BYTES: usize = 1024 * 1024;

/// Errors of talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers on the socket (missing file, refused, no permission).
    #[error("cannot connect to API socket {path}: {reason}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        reason: io::Error,
    },
    /// The server answered with an error status.
    #[error("API request failed with HTTP {status}: {message}")]
    Api {
        /// HTTP status code (4xx or 5xx).
        status: u16,
        /// The server's error message.
        message: String,
    },
    /// The HTTP exchange broke off.
    #[error("HTTP exchange over API socket {path} failed: {reason}")]
    Http {
        /// Socket path.
        path: PathBuf,
        /// What hyper reported.
        reason: hyper::Error,
    },
    /// The server did not answer in time. The request may still be carried out: giving up
    /// does not take it back.
    #[error(
        "no answer from API socket {path} within {timeout:?}; the request may have reached \
         the VMM and may still be carried out (check GET /vm/info before retrying)"
    )]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// The time allowed.
        timeout: Duration,
    },
    /// The server's answer could not be understood.
    #[error("invalid response from API socket {path}: {detail}")]
    InvalidResponse {
        /// Socket path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The request could not be built (bad method, path or device id).
    #[error("invalid API request: {detail}")]
    InvalidRequest {
        /// What is wrong with it.
        detail: String,
    },
    /// The client's tokio runtime could not be started.
    #[error("cannot start the API client runtime: {reason}")]
    Runtime {
        /// OS error.
        reason: io::Error,
    },
}

/// Blocking client of the API socket. Each call opens its own connection.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket_path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of the API socket at `socket_path`. Does not connect yet.
    pub fn new(socket_path: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket_path: socket_path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// Path of the socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// `GET /vm/info`.
    pub fn vm_info(&self) -> Result<VmInfo, ClientError> {
        let body = self.call_expecting_success("GET", "/vm/info", None)?;
        serde_json::from_slice(&body).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// `PUT /vm/shutdown`.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call_expecting_success("PUT", "/vm/shutdown", None)
            .map(drop)
    }

    /// `PUT /vm/reboot`.
    pub fn reboot(&self) -> Result<(), ClientError> {
        self.call_expecting_success("PUT", "/vm/reboot", None)
            .map(drop)
    }

    /// `PUT /vm/balloon`.
    pub fn set_balloon(&self, target_bytes: u64) -> Result<(), ClientError> {
        let json = serde_json::to_vec(&serde_json::json!({ "target_size": target_bytes }))
            .map_err(|error| ClientError::InvalidRequest {
                detail: error.to_string(),
            })?;
        self.call_expecting_success("PUT", "/vm/balloon", Some(json))
            .map(drop)
    }

    /// `GET /vm/balloon`.
    pub fn balloon(&self) -> Result<crate::BalloonInfo, ClientError> {
        let body = self.call_expecting_success("GET", "/vm/balloon", None)?;
        serde_json::from_slice(&body).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// `GET /vm/memory`.
    pub fn memory(&self) -> Result<MemoryStatus, ClientError> {
        let body = self.call_expecting_success("GET", "/vm/memory", None)?;
        serde_json::from_slice(&body).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// `PUT /vm/memory`: bring the guest's total memory to `size_bytes` (with `node`: by
    /// changing that node's virtio-mem devices only). Returns the steps the VMM took.
    pub fn set_memory(
        &self,
        size_bytes: u64,
        node: Option<u32>,
    ) -> Result<MemoryPlanInfo, ClientError> {
        let body = SetMemoryBody {
            size: size_bytes,
            node,
        };
        let json = serde_json::to_vec(&body).map_err(|error| ClientError::InvalidRequest {
            detail: error.to_string(),
        })?;
        let body = self.call_expecting_success("PUT", "/vm/memory", Some(json))?;
        serde_json::from_slice(&body).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// `PUT /vm/virtio-mem/{id}`: ask the guest to have `requested_size_bytes`
    /// plugged from device `id`.
    pub fn resize_virtio_mem(
        &self,
        id: &str,
        requested_size_bytes: u64,
    ) -> Result<(), ClientError> {
        check_path_id(id, "virtio-mem device id")?;
        let body = ResizeVirtioMemBody {
            requested_size: requested_size_bytes,
        };
        let json = serde_json::to_vec(&body).map_err(|error| ClientError::InvalidRequest {
            detail: error.to_string(),
        })?;
        self.call_expecting_success("PUT", &format!("/vm/virtio-mem/{id}"), Some(json))
            .map(drop)
    }

    /// `PUT /vm/dimms`: hot-add a DIMM and notify the guest. Returns the new DIMM (HTTP 201),
    /// still `inserting` until the guest takes it.
    pub fn add_dimm(&self, body: &AddDimmBody) -> Result<DimmInfo, ClientError> {
        let json = serde_json::to_vec(body).map_err(|error| ClientError::InvalidRequest {
            detail: error.to_string(),
        })?;
        let body = self.call_expecting_success("PUT", "/vm/dimms", Some(json))?;
        serde_json::from_slice(&body).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// `DELETE /vm/dimms/{id}`: ask the guest to eject a DIMM. Returns the DIMM (HTTP 202),
    /// `removing` until the guest has ejected it (it then leaves `dimms` in `/vm/info`).
    pub fn remove_dimm(&self, id: &str) -> Result<DimmInfo, ClientError> {
        check_path_id(id, "DIMM id")?;
        let body = self.call_expecting_success("DELETE", &format!("/vm/dimms/{id}"), None)?;
        serde_json::from_slice(&body).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// `GET /metrics`: the VMM's metrics in the Prometheus text format.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let body = self.call_expecting_success("GET", "/metrics", None)?;
        String::from_utf8(body.to_vec()).map_err(|error| self.invalid_response(error.to_string()))
    }

    /// Send any request with an optional JSON body; returns the HTTP status
    /// and the response body, whatever the status. An empty body is `Null`,
    /// a body that is not JSON is returned as a `String`.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let body = body
            .map(|value| serde_json::to_vec(&value))
            .transpose()
            .map_err(|error| ClientError::InvalidRequest {
                detail: error.to_string(),
            })?;
        self.call_raw(method, path, body.as_deref())
    }

    /// Like [`ApiClient::call`], with the body sent as given, byte for byte
    /// (to test how the server treats malformed requests).
    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let (status, body) = self.exchange(method, path, body.map(<[u8]>::to_vec))?;
        Ok((status, body_to_value(&body)))
    }

    fn call_expecting_success(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let (status, body) = self.exchange(method, path, body)?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(error_body) => error_body.error,
            Err(_) => String::from_utf8_lossy(&body).trim().to_owned(),
        };
        Err(ClientError::Api { status, message })
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let request = build_request(method, path, body)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|reason| ClientError::Runtime { reason })?;
        runtime.block_on(async {
            tokio::time::timeout(self.timeout, self.exchange_async(request))
                .await
                .unwrap_or_else(|_elapsed| {
                    Err(ClientError::Timeout {
                        path: self.socket_path.clone(),
                        timeout: self.timeout,
                    })
                })
        })
    }

    /// A connection to the socket, its task running on the current runtime until the
    /// response is read or the runtime ends.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket_path)
            .await
            .map_err(|reason| ClientError::Connect {
                path: self.socket_path.clone(),
                reason,
            })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|reason| self.http_error(reason))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    fn http_error(&self, reason: hyper::Error) -> ClientError {
        ClientError::Http {
            path: self.socket_path.clone(),
            reason,
        }
    }

    async fn exchange_async(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let mut sender = self.connect().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|reason| self.http_error(reason))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| self.invalid_response(format!("cannot read the body: {error}")))?
            .to_bytes();
        Ok((status, body))
    }

    /// `GET /vm/events`: calls `on_event` for each event line as it arrives, until the VMM
    /// ends the stream, `on_event` returns `false`, or the connection fails. The client's
    /// per-request timeout applies to the answer's headers only.
    pub fn events(&self, mut on_event: impl FnMut(&str) -> bool) -> Result<(), ClientError> {
        let request = build_request("GET", "/vm/events", None)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|reason| ClientError::Runtime { reason })?;
        runtime.block_on(async {
            let http_error = |reason| self.http_error(reason);
            let mut sender = self.connect().await?;
            let response = tokio::time::timeout(self.timeout, sender.send_request(request))
                .await
                .map_err(|_elapsed| ClientError::Timeout {
                    path: self.socket_path.clone(),
                    timeout: self.timeout,
                })?
                .map_err(http_error)?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            if !(200..300).contains(&status) {
                let bytes = Limited::new(body, MAX_RESPONSE_BODY_BYTES)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let message = serde_json::from_slice::<ErrorBody>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned());
                return Err(ClientError::Api { status, message });
            }
            let mut pending = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(http_error)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line[..end]);
                    if !on_event(&line) {
                        return Ok(());
                    }
                }
                if pending.len() > MAX_RESPONSE_BODY_BYTES {
                    return Err(self.invalid_response("an event line is too long".into()));
                }
            }
            Ok(())
        })
    }

    fn invalid_response(&self, detail: String) -> ClientError {
        ClientError::InvalidResponse {
            path: self.socket_path.clone(),
            detail,
        }
    }
}

/// An id that goes into a path must be one non-empty segment of safe characters.
fn check_path_id(id: &str, what: &str) -> Result<(), ClientError> {
    let id_is_path_safe = !id.is_empty()
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'));
    if id_is_path_safe {
        Ok(())
    } else {
        Err(ClientError::InvalidRequest {
            detail: format!("invalid {what} {id:?}"),
        })
    }
}

fn build_request(
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let invalid = |detail: String| ClientError::InvalidRequest { detail };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| invalid(format!("invalid HTTP method {method:?}")))?;
    if !path.starts_with('/') {
        return Err(invalid(format!("path {path:?} does not start with '/'")));
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        // HTTP/1.1 requires a Host; a Unix socket has no host name.
        .header(HOST, "localhost");
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|error| invalid(format!("cannot build request for {path:?}: {error}")))
}

fn body_to_value(body: &[u8]) -> serde_json::Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}
