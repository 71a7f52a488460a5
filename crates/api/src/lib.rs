//! Control API of the tidevm VMM: a REST API with JSON bodies over a Unix
//! socket.
//!
//! * [`ApiServer`] binds the socket and serves it on its own thread, handing
//!   parsed [`ApiRequest`]s to the VMM's [`RequestHandler`].
//! * [`ApiClient`] is a blocking client for the CLI and the test harness.
//!
//! The routes are documented in `openapi.yaml` next to this crate's
//! `Cargo.toml`:
//!
//! | method | path                  | body                          | success           |
//! |--------|-----------------------|-------------------------------|-------------------|
//! | GET    | `/vm/info`            | none                          | 200 [`VmInfo`]    |
//! | PUT    | `/vm/shutdown`        | none                          | 204               |
//! | PUT    | `/vm/reboot`          | none                          | 204               |
//! | PUT    | `/vm/virtio-mem/{id}` | `{"requested_size": <bytes>}` | 204               |
//! | PUT    | `/vm/dimms`           | [`AddDimmBody`]               | 201 [`DimmInfo`]  |
//! | DELETE | `/vm/dimms/{id}`      | none                          | 202 [`DimmInfo`]  |
//!
//! Errors are `{"error": "<message>"}` with a 4xx or 5xx status.

#![deny(missing_docs)]

mod client;
mod server;
mod types;

#[cfg(test)]
mod tests;

pub use client::{ApiClient, ClientError, DEFAULT_TIMEOUT};
pub use server::{
    parse_socket_mode, ApiServer, ApiServerError, InvalidSocketMode, DEFAULT_SOCKET_MODE,
    MAX_REQUEST_BODY_BYTES,
};
pub use types::{
    parse_byte_size, AddDimmBody, ApiError, ApiRequest, ApiResponse, BalloonInfo, BalloonStats,
    DimmBacking, DimmInfo, DimmState, DimmsInfo, DiskCounters, DiskInfo, ErrorBody, GuestRange,
    HostRss, MemoryInfo, MemoryViolation, OstReport, RequestHandler, ResizeVirtioMemBody,
    SetBalloonBody, VirtioMemCounters, VirtioMemInfo, VmInfo, VmState,
};
