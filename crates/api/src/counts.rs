//! Requests the API server answered, by method, route template and status, for the
//! `tidevm_api_requests_total` metric. Kept by the server, read by the VMM at scrape time.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The methods counted by name; any other is counted as `other` (a client must not be able
/// to make up label values).
const KNOWN_METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// The route label of a path that is no route (the raw path is never a label).
pub const UNKNOWN_ROUTE: &str = "unknown";

/// One line of [`ApiRequestCounts::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequestCount {
    /// HTTP method (`GET`, `PUT`, ..., or `other`).
    pub method: &'static str,
    /// Route template such as `/vm/virtio-mem/{id}`, or [`UNKNOWN_ROUTE`].
    pub endpoint: &'static str,
    /// HTTP status of the answer.
    pub status: u16,
    /// Requests so answered.
    pub count: u64,
}

/// Answered requests by (method, route template, status). Bounded: every key part comes from
/// a fixed set (statuses are the few the server makes).
#[derive(Debug, Default)]
pub struct ApiRequestCounts {
    counts: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
}

impl ApiRequestCounts {
    /// Counts one answered request.
    pub fn record(&self, method: &str, endpoint: &'static str, status: u16) {
        let method = KNOWN_METHODS
            .iter()
            .copied()
            .find(|known| *known == method)
            .unwrap_or("other");
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method, endpoint, status))
            .or_default() += 1;
    }

    /// Every count so far, sorted.
    pub fn snapshot(&self) -> Vec<ApiRequestCount> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(&(method, endpoint, status), &count)| ApiRequestCount {
                method,
                endpoint,
                status,
                count,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_method_route_and_status_and_folds_odd_methods() {
        let counts = ApiRequestCounts::default();
        counts.record("GET", "/vm/info", 200);
        counts.record("GET", "/vm/info", 200);
        counts.record("PUT", "/vm/info", 405);
        counts.record("BREW", UNKNOWN_ROUTE, 404);
        assert_eq!(
            counts.snapshot(),
            vec![
                ApiRequestCount {
                    method: "GET",
                    endpoint: "/vm/info",
                    status: 200,
                    count: 2
                },
                ApiRequestCount {
                    method: "PUT",
                    endpoint: "/vm/info",
                    status: 405,
                    count: 1
                },
                ApiRequestCount {
                    method: "other",
                    endpoint: UNKNOWN_ROUTE,
                    status: 404,
                    count: 1
                },
            ]
        );
    }
}
