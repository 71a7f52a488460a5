//! Per-device virtio-mem counters (kept in the device, no globals, so several devices and
//! several VMs in one process never mix their numbers).

use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::request::{RequestKind, ResponseType};

/// Upper bounds of the handling-time histograms, in seconds: 10 µs to about 2.6 s, each
/// four times the one before (a plug of one block with nothing to populate takes tens of
/// microseconds; a preallocated 128 MiB chunk takes a good part of a second).
pub fn handling_time_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(10e-6, 4.0, 10)
}

/// How long requests took to handle, one observation per request, in seconds.
///
/// The device owns it (no global registry); the metrics endpoint encodes it at scrape time.
/// Clones share the same counts.
#[derive(Clone, Debug)]
pub struct HandlingTimes(Histogram);

impl Default for HandlingTimes {
    fn default() -> Self {
        HandlingTimes(Histogram::new(handling_time_buckets()))
    }
}

impl HandlingTimes {
    /// Records one request's handling time.
    pub fn observe(&self, elapsed: Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }

    /// The histogram, for encoding.
    pub fn histogram(&self) -> &Histogram {
        &self.0
    }
}

/// How often each response type was sent for one request type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseCounts {
    /// ACK responses.
    pub ack: u64,
    /// NACK responses.
    pub nack: u64,
    /// BUSY responses.
    pub busy: u64,
    /// ERROR responses.
    pub error: u64,
}

impl ResponseCounts {
    fn bump(&mut self, ty: ResponseType) {
        let counter = match ty {
            ResponseType::Ack => &mut self.ack,
            ResponseType::Nack => &mut self.nack,
            ResponseType::Busy => &mut self.busy,
            ResponseType::Error => &mut self.error,
        };
        *counter += 1;
    }
}

/// Counters of one virtio-mem device.
#[derive(Clone, Debug, Default)]
pub struct VirtioMemMetrics {
    /// PLUG responses.
    pub plug: ResponseCounts,
    /// UNPLUG responses.
    pub unplug: ResponseCounts,
    /// UNPLUG_ALL responses.
    pub unplug_all: ResponseCounts,
    /// STATE responses.
    pub state: ResponseCounts,
    /// Chains that were not a valid request (bad descriptors, unknown type, inaccessible).
    pub malformed: u64,
    /// Queue passes stopped because the rings lie outside accessible memory.
    pub bad_rings: u64,
    /// Unplug requests refused because they would close their own response buffer or the
    /// queue's rings.
    pub self_closing: u64,
    /// Bytes plugged by acknowledged requests.
    pub bytes_plugged: u64,
    /// Bytes unplugged by acknowledged requests (UNPLUG and UNPLUG_ALL).
    pub bytes_unplugged: u64,
    /// Time spent handling PLUG requests (mostly the memory manager's mprotect/populate).
    pub plug_time: Duration,
    /// Time spent handling UNPLUG and UNPLUG_ALL requests (mostly discarding).
    pub unplug_time: Duration,
    /// Each PLUG request's handling time (the same time as `plug_time`, per request).
    pub plug_seconds: HandlingTimes,
    /// Each UNPLUG and UNPLUG_ALL request's handling time.
    pub unplug_seconds: HandlingTimes,
}

impl VirtioMemMetrics {
    /// Counts one response.
    pub(crate) fn record(&mut self, kind: RequestKind, ty: ResponseType) {
        match kind {
            RequestKind::Plug => self.plug.bump(ty),
            RequestKind::Unplug => self.unplug.bump(ty),
            RequestKind::UnplugAll => self.unplug_all.bump(ty),
            RequestKind::State => self.state.bump(ty),
        }
    }
}
