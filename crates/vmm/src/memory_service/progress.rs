//! Progress events: the memory service looks at every resize under way on its timer and
//! publishes what moved (`resize_progress`), what arrived (`resize_finished`), what the guest
//! refused or could not do (`resize_failed`, with the reason), and each new `_OST` answer.

use std::collections::BTreeMap;
use std::time::Duration;

use tidevm_api::Event;

use super::{lock, DimmState, MemoryService};

/// How often resizes under way are looked at.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// Mechanism names on the event stream.
pub const VIRTIO_MEM: &str = "virtio-mem";
/// See [`VIRTIO_MEM`].
pub const BALLOON: &str = "balloon";
/// See [`VIRTIO_MEM`].
pub const DIMM: &str = "dimm";

/// What was seen last, per device (keyed by mechanism and device name).
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// (current, target) last seen.
    seen: BTreeMap<(&'static str, String), (u64, u64)>,
    /// The last failure reason published per device (published once each).
    failures: BTreeMap<(&'static str, String), String>,
    /// The last `_OST` seen per DIMM slot.
    ost: BTreeMap<u32, (u32, u32)>,
}

impl Progress {
    /// Publishes what changed for one device; returns whether it is still under way.
    fn observe(
        &mut self,
        events: &mut Vec<Event>,
        mechanism: &'static str,
        device: &str,
        current: u64,
        target: u64,
    ) -> bool {
        let key = (mechanism, device.to_owned());
        let before = self.seen.insert(key, (current, target));
        if before == Some((current, target)) {
            return current != target;
        }
        if current == target {
            // Only a change of the current size is news: a target set and already met
            // (e.g. at boot) is not a resize.
            if before.is_some_and(|(c, _)| c != current) {
                events.push(Event::ResizeFinished {
                    mechanism: mechanism.into(),
                    device: device.to_owned(),
                    bytes: current,
                });
            }
            return false;
        }
        if before.is_some_and(|(c, _)| c != current) {
            events.push(Event::ResizeProgress {
                mechanism: mechanism.into(),
                device: device.to_owned(),
                current_bytes: current,
                target_bytes: target,
            });
        }
        true
    }

    fn failed(
        &mut self,
        events: &mut Vec<Event>,
        mechanism: &'static str,
        device: &str,
        reason: Option<String>,
    ) {
        let key = (mechanism, device.to_owned());
        match reason {
            Some(reason) if self.failures.get(&key) != Some(&reason) => {
                self.failures.insert(key, reason.clone());
                events.push(Event::ResizeFailed {
                    mechanism: mechanism.into(),
                    device: device.to_owned(),
                    reason,
                });
            }
            Some(_) => {}
            None => {
                self.failures.remove(&key);
            }
        }
    }
}

impl MemoryService {
    /// Publishes the progress of every resize; returns whether one is still under way.
    pub(super) fn report_progress(&mut self) -> bool {
        let mut events = Vec::new();
        let mut progress = std::mem::take(&mut self.progress);
        let mut in_flight = false;
        for (status, _) in self.virtio_mem_statuses() {
            in_flight |= progress.observe(
                &mut events,
                VIRTIO_MEM,
                &status.id,
                status.plugged_size,
                status.requested_size,
            );
            let reason = status
                .last_busy_reason
                .map(|e| format!("the device answered BUSY: {}", crate::error_chain(&*e)));
            progress.failed(&mut events, VIRTIO_MEM, &status.id, reason);
        }
        if let Some(balloon) = &self.balloon {
            let status = lock(balloon).device().status();
            in_flight |= progress.observe(
                &mut events,
                BALLOON,
                BALLOON,
                status.inflated_bytes,
                status.target_bytes,
            );
        }
        if let Some(dimms) = self.dimms_status() {
            for dimm in &dimms.dimms {
                let target = match dimm.state {
                    DimmState::Removing => 0,
                    DimmState::Inserting | DimmState::Active => dimm.range.size,
                };
                let current = match dimm.state {
                    DimmState::Active | DimmState::Removing => dimm.range.size,
                    DimmState::Inserting => 0,
                };
                in_flight |= progress.observe(&mut events, DIMM, &dimm.id, current, target);
                progress.failed(&mut events, DIMM, &dimm.id, dimm.removal_refused.clone());
                if let Some(ost) = &dimm.last_ost {
                    if progress.ost.insert(dimm.slot, (ost.event, ost.status))
                        != Some((ost.event, ost.status))
                    {
                        events.push(Event::Ost {
                            slot: dimm.slot,
                            acpi_event: ost.event,
                            status: ost.status,
                            meaning: ost.meaning.clone(),
                        });
                    }
                }
            }
        }
        self.progress = progress;
        for event in events {
            self.publish(event);
        }
        in_flight
    }

    /// A DIMM left the guest: its resize is finished.
    pub(super) fn dimm_gone(&mut self, id: &str, slot: u32) {
        self.progress.seen.remove(&(DIMM, id.to_owned()));
        self.progress.ost.remove(&slot);
        self.publish(Event::ResizeFinished {
            mechanism: DIMM.into(),
            device: id.to_owned(),
            bytes: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_then_finished_and_nothing_when_still() {
        let mut p = Progress::default();
        let mut events = Vec::new();
        assert!(!p.observe(&mut events, VIRTIO_MEM, "mem0", 0, 0), "at rest");
        assert!(p.observe(&mut events, VIRTIO_MEM, "mem0", 0, 1 << 30));
        assert!(events.is_empty(), "a new target alone is not progress");
        assert!(p.observe(&mut events, VIRTIO_MEM, "mem0", 256 << 20, 1 << 30));
        assert!(p.observe(&mut events, VIRTIO_MEM, "mem0", 256 << 20, 1 << 30));
        assert!(!p.observe(&mut events, VIRTIO_MEM, "mem0", 1 << 30, 1 << 30));
        assert_eq!(
            events,
            vec![
                Event::ResizeProgress {
                    mechanism: VIRTIO_MEM.into(),
                    device: "mem0".into(),
                    current_bytes: 256 << 20,
                    target_bytes: 1 << 30
                },
                Event::ResizeFinished {
                    mechanism: VIRTIO_MEM.into(),
                    device: "mem0".into(),
                    bytes: 1 << 30
                }
            ]
        );
    }

    #[test]
    fn a_failure_is_published_once_per_reason() {
        let mut p = Progress::default();
        let mut events = Vec::new();
        for _ in 0..3 {
            p.failed(&mut events, DIMM, "d0", Some("busy".into()));
        }
        p.failed(&mut events, DIMM, "d0", None);
        p.failed(&mut events, DIMM, "d0", Some("busy".into()));
        assert_eq!(events.len(), 2);
    }
}
