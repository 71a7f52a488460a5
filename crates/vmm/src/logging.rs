//! Rate limits for what a guest can make the VMM do over and over: log lines and events.
//!
//! A guest can send malformed requests, write read-only registers or touch unplugged memory
//! as fast as it runs. Each such thing is worth one line in the log, not millions: a call site
//! logs at most [`PER_SECOND`] lines a second, and the first line after a quiet spell says how
//! many were suppressed in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines (or events) a call site may emit per second.
pub const PER_SECOND: u64 = 10;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A per-call-site budget of [`PER_SECOND`] per one-second window. Lock-free: vCPU threads
/// and the control thread share call sites.
#[derive(Debug, Default)]
pub struct RateLimit {
    window_start_ms: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A fresh budget (usable in a `static`).
    pub const fn new() -> Self {
        RateLimit {
            window_start_ms: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last allowed one)` if one more is allowed now, else `None`
    /// (and it is counted as suppressed).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= 1000
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// How many were suppressed and not yet reported.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// `tracing::warn!` for things a guest can trigger at will: at most [`PER_SECOND`] lines per
/// second from this call site; the next line allowed carries `suppressed = N`.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => tracing::warn!($($arg)+),
            Some(suppressed) => tracing::warn!(suppressed, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_gets_its_budget_per_second_and_counts_the_rest() {
        let limit = RateLimit::new();
        let t0 = 5_000;
        for _ in 0..PER_SECOND {
            assert_eq!(limit.allow_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limit.allow_at(t0 + 10), None);
        }
        assert_eq!(limit.suppressed(), 1000);
        assert_eq!(limit.allow_at(t0 + 999), None, "same window");
        assert_eq!(
            limit.allow_at(t0 + 1000),
            Some(1001),
            "the next window's first line reports what was dropped"
        );
        assert_eq!(limit.suppressed(), 0);
    }
}
