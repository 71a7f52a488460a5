//! The autopilot at work: on the memory service's timer it reads the guest's statistics, the
//! balloon's free page reporting and the host's pressure, asks the policy
//! ([`autopilot::decide`](super::autopilot)), hands a new total to the planner, and publishes
//! every decision with the inputs behind it.

use std::time::{Duration, Instant};

use tidevm_api::Event;

use super::autopilot::{
    read_mem_available, read_memory_psi, Autopilot, Decision, HostPressure, PolicyConfig,
};
use super::{lock, MemoryRequestError, MemoryService};

/// The autopilot of one boot and its timer.
#[derive(Debug)]
pub(super) struct Running {
    autopilot: Autopilot,
    started: Instant,
    next: Instant,
}

impl Running {
    pub(super) fn new(config: PolicyConfig, now: Instant) -> Self {
        Running {
            autopilot: Autopilot::new(config),
            started: now,
            next: now,
        }
    }
}

fn host_pressure() -> Option<HostPressure> {
    let pressure = HostPressure {
        psi: read_memory_psi().ok(),
        mem_available: read_mem_available().ok(),
    };
    (pressure.psi.is_some() || pressure.mem_available.is_some()).then_some(pressure)
}

impl MemoryService {
    /// Whether `policy` can run on this VM: the same checks as `--memory-policy` at start
    /// (balloon statistics often enough, a `max` the devices can reach).
    pub fn check_memory_policy(
        &self,
        policy: Option<&PolicyConfig>,
    ) -> Result<(), MemoryRequestError> {
        let Some(policy) = policy else {
            return Ok(());
        };
        crate::config::check_memory_policy(
            policy,
            self.settings.balloon.as_ref(),
            &self.settings.memory,
            &self.settings.virtio_mem,
        )
        .map_err(MemoryRequestError::Policy)
    }

    /// Turns the autopilot on with `policy`, or off with `None`.
    pub fn set_memory_policy(&mut self, policy: Option<PolicyConfig>) {
        tracing::info!(
            "memory autopilot {}",
            if policy.is_some() { "on" } else { "off" }
        );
        self.settings.memory_policy = policy.clone();
        self.autopilot = policy.map(|p| Running::new(p, Instant::now()));
    }

    /// The autopilot's part of a timer tick; returns when it wants to run next.
    pub(super) fn tick_autopilot(&mut self, now: Instant) -> Option<Duration> {
        let running = self.autopilot.as_mut()?;
        if now < running.next {
            return Some(running.next - now);
        }
        let interval = running.autopilot.config().interval;
        running.next = now + interval;
        let since_start = now.duration_since(running.started);
        let current_total = self.memory_state().actual_total();
        let balloon = self.balloon.as_ref().map(|b| lock(b).device().status());
        let Some(running) = self.autopilot.as_mut() else {
            return Some(interval);
        };
        let decision = running.autopilot.tick(
            since_start,
            current_total,
            balloon.as_ref(),
            host_pressure(),
        );
        let Decision::Resize {
            target,
            reason,
            limit,
            evidence,
        } = decision
        else {
            return Some(interval);
        };
        let mut inputs = std::collections::BTreeMap::new();
        let mut put = |name: &str, value: u64| {
            inputs.insert(name.to_owned(), i64::try_from(value).unwrap_or(i64::MAX));
        };
        put("current_total_bytes", evidence.current_total);
        put("reported_free_bytes", evidence.reported_free_since_last);
        put("host_pressure", u64::from(evidence.host_pressure));
        if let Some(guest) = &evidence.guest {
            put("available_bytes", guest.available);
            put("free_bytes", guest.free);
            put("used_bytes", guest.used);
            put("reclaimable_bytes", guest.reclaimable);
            put("new_oom_kills", guest.new_oom_kills);
            put("new_alloc_stalls", guest.new_alloc_stalls);
            put("major_faults_per_sec", guest.major_faults_per_sec);
            put("stats_age_ms", guest.age.as_millis() as u64);
        }
        if let Some(mem_available) = evidence.host.and_then(|h| h.mem_available) {
            put("host_mem_available_bytes", mem_available);
        }
        let outcome = self.set_memory(target, None);
        let decision = format!(
            "{reason:?}{}: {} MiB -> {} MiB{}",
            limit
                .map(|l| format!(" (bounded by {l:?})"))
                .unwrap_or_default(),
            evidence.current_total >> 20,
            target >> 20,
            match &outcome {
                Ok(_) => String::new(),
                Err(e) => format!("; the planner refused: {}", crate::error_chain(e)),
            }
        );
        tracing::info!("memory autopilot: {decision}");
        self.publish(Event::AutopilotDecision {
            decision,
            target_bytes: Some(target),
            inputs,
        });
        Some(interval)
    }
}
