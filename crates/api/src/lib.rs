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
//! | GET    | `/vm/balloon`         | none                          | 200 [`BalloonInfo`] |
//! | PUT    | `/vm/balloon`         | [`SetBalloonBody`]            | 204               |
//! | PUT    | `/vm/dimms`           | [`AddDimmBody`]               | 201 [`DimmInfo`]  |
//! | DELETE | `/vm/dimms/{id}`      | none                          | 202 [`DimmInfo`]  |
//! | GET    | `/metrics`            | none                          | 200 Prometheus text ([`METRICS_CONTENT_TYPE`]) |
//!
//! [`MetricsListener`] serves the same `GET /metrics` over TCP (`tidevm run
//! --metrics-listen`), through the same [`RequestHandler`].
//! | GET    | `/vm/memory`          | none                          | 200 [`MemoryStatus`] |
//! | PUT    | `/vm/memory`          | [`SetMemoryBody`]             | 200 [`MemoryPlanInfo`] |
//!
//! Cloud Hypervisor's memory-related routes (`/api/v1/vmm.ping`, `/api/v1/vm.info`,
//! `/api/v1/vm.resize`, ...) are served on the same socket with its JSON shapes and status
//! codes, so that `ch-remote` and clients generated from its OpenAPI document work; see
//! the `ch` module.
//!
//! Errors are `{"error": "<message>"}` with a 4xx or 5xx status.

#![deny(missing_docs)]

mod ch;
mod client;
mod counts;
mod metrics_listener;
mod server;
mod types;

#[cfg(test)]
mod tests;

pub use client::{ApiClient, ClientError, DEFAULT_TIMEOUT};
pub use counts::{ApiRequestCount, ApiRequestCounts, UNKNOWN_ROUTE};
pub use metrics_listener::{MetricsListener, MetricsListenerError};
pub use server::{
    parse_request, parse_socket_mode, ApiServer, ApiServerError, InvalidSocketMode,
    DEFAULT_SOCKET_MODE, MAX_REQUEST_BODY_BYTES,
};
pub use types::{
    parse_byte_size, AddDimmBody, ApiError, ApiRequest, ApiResponse, BalloonInfo, BalloonStats,
    DimmBacking, DimmInfo, DimmState, DimmsInfo, DiskCounters, DiskInfo, ErrorBody, Event,
    EventRecord, GuestRange, HostRss, MemoryBalloon, MemoryDimm, MemoryInfo, MemoryPlanInfo,
    MemoryShortfall, MemoryStatus, MemoryStep, MemoryViolation, MemoryVirtioMem, NetCounters,
    NetInfo, NodeMemory, OstReport, PayloadInfo, RequestHandler, ResizeShortfall,
    ResizeVirtioMemBody, SetBalloonBody, SetMemoryBody, SetMemoryPolicyBody, VirtioMemCounters,
    VirtioMemInfo, VmInfo, VmState, METRICS_CONTENT_TYPE,
};
