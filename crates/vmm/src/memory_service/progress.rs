//! Progress events: the memory service looks at every resize under way on its timer and
//! publishes what moved (`resize_progress`), what arrived (`resize_finished`), what stopped
//! short and why (`resize_failed`, with a typed [`ResizeShortfall`]), each new `_OST` answer,
//! and, for a plan, when everything it asked for has either arrived or stopped short
//! (`memory_plan_finished`, with the total reached and the shortfalls).

use std::collections::BTreeMap;
use std::mem::discriminant;
use std::time::{Duration, Instant};

use tidevm_api::{Event, MemoryShortfall, ResizeShortfall};

use super::{lock, DimmState, DimmStatus, MemoryService};
use crate::devices::memory_hotplug::ost;
use crate::devices::virtio::mem::VirtioMemStatus;

/// How often resizes under way are looked at.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// How long a resize may go without moving before it counts as stalled. The guest gives
/// no answer when it cannot unplug (Linux's virtio-mem driver just leaves the blocks plugged
/// and retries after 50 s or more), so a standstill is the sign; a 128 MiB memory block
/// takes well under this to offline even in the nested test lane.
pub const STALL_AFTER: Duration = Duration::from_secs(15);
/// Mechanism names on the event stream.
pub const VIRTIO_MEM: &str = "virtio-mem";
/// See [`VIRTIO_MEM`].
pub const BALLOON: &str = "balloon";
/// See [`VIRTIO_MEM`].
pub const DIMM: &str = "dimm";

type Key = (&'static str, String);

/// One device's size as last seen.
#[derive(Debug, Clone, Copy)]
struct Seen {
    current: u64,
    target: u64,
    /// When `current` or `target` last changed.
    moved_at: Instant,
}

/// What was seen last, per device (keyed by mechanism and device name).
#[derive(Debug, Default)]
pub(super) struct Progress {
    seen: BTreeMap<Key, Seen>,
    /// Why each device is short of its target now (each kind published once).
    shortfalls: BTreeMap<Key, ResizeShortfall>,
    /// The last `_OST` seen per DIMM slot.
    ost: BTreeMap<u32, (u32, u32)>,
    /// Whether the current plan's outcome was published complete (`Some(true)`) or partial.
    plan_reported: Option<bool>,
}

/// Where one device is, after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Movement {
    /// Not at its target.
    in_flight: bool,
    /// How long it has not moved, while in flight.
    still_for: Duration,
}

impl Movement {
    fn stalled(&self) -> Option<u64> {
        (self.in_flight && self.still_for >= STALL_AFTER).then_some(self.still_for.as_secs())
    }
}

/// Why a virtio-mem device is short of its request, if it is: the host's BUSY first (the
/// guest asked and the host could not), else a standstill.
fn virtio_mem_shortfall(status: &VirtioMemStatus, movement: Movement) -> Option<ResizeShortfall> {
    if !movement.in_flight {
        return None;
    }
    if let Some(busy) = &status.last_busy_reason {
        return Some(ResizeShortfall::HostBusy {
            message: crate::error_chain(&**busy),
        });
    }
    let stalled_seconds = movement.stalled()?;
    let (plugged_bytes, requested_bytes) = (status.plugged_size, status.requested_size);
    Some(if plugged_bytes > requested_bytes {
        ResizeShortfall::UnplugStalled {
            plugged_bytes,
            requested_bytes,
            stalled_seconds,
        }
    } else {
        ResizeShortfall::PlugStalled {
            plugged_bytes,
            requested_bytes,
            stalled_seconds,
        }
    })
}

/// Why a DIMM is not where it was asked to be, if it is not: the guest's `_OST` refusal of
/// an eject (the DIMM is active again), or of an insertion.
fn dimm_shortfall(dimm: &DimmStatus) -> Option<ResizeShortfall> {
    if let Some(refusal) = &dimm.removal_refused {
        return Some(ResizeShortfall::EjectRefused {
            ost_event: refusal.event,
            ost_status: refusal.status,
            meaning: refusal.meaning.clone(),
        });
    }
    match (&dimm.last_ost, dimm.state) {
        (Some(answer), DimmState::Inserting)
            if answer.event == ost::EVENT_DEVICE_CHECK
                && answer.status != ost::SUCCESS
                // 0x80 for an insertion: still in progress.
                && answer.status != 0x80 =>
        {
            Some(ResizeShortfall::InsertRefused {
                ost_status: answer.status,
                meaning: answer.meaning.clone(),
            })
        }
        _ => None,
    }
}

impl Progress {
    /// Publishes what changed for one device; returns where it is.
    fn observe(
        &mut self,
        events: &mut Vec<Event>,
        now: Instant,
        mechanism: &'static str,
        device: &str,
        current: u64,
        target: u64,
    ) -> Movement {
        let key = (mechanism, device.to_owned());
        let before = self.seen.get(&key).copied();
        let unchanged = before.is_some_and(|b| (b.current, b.target) == (current, target));
        let moved_at = match before {
            Some(b) if unchanged => b.moved_at,
            _ => now,
        };
        self.seen.insert(
            key,
            Seen {
                current,
                target,
                moved_at,
            },
        );
        let movement = Movement {
            in_flight: current != target,
            still_for: now.saturating_duration_since(moved_at),
        };
        if unchanged {
            return movement;
        }
        let current_changed = before.is_some_and(|b| b.current != current);
        if current == target {
            // Only a change of the current size is news: a target set and already met
            // (e.g. at boot) is not a resize.
            if current_changed {
                events.push(Event::ResizeFinished {
                    mechanism: mechanism.into(),
                    device: device.to_owned(),
                    bytes: current,
                });
            }
        } else if current_changed {
            events.push(Event::ResizeProgress {
                mechanism: mechanism.into(),
                device: device.to_owned(),
                current_bytes: current,
                target_bytes: target,
            });
        }
        movement
    }

    /// Records why a device is short of its target (`None`: it is not); publishes a cause
    /// the first time it appears, not again while it lasts.
    fn failed(
        &mut self,
        events: &mut Vec<Event>,
        mechanism: &'static str,
        device: &str,
        cause: Option<ResizeShortfall>,
    ) {
        let key = (mechanism, device.to_owned());
        let Some(cause) = cause else {
            self.shortfalls.remove(&key);
            return;
        };
        let known = self
            .shortfalls
            .get(&key)
            .is_some_and(|c| discriminant(c) == discriminant(&cause));
        if !known {
            events.push(Event::ResizeFailed {
                mechanism: mechanism.into(),
                device: device.to_owned(),
                reason: cause.to_string(),
                cause: cause.clone(),
            });
        }
        // Kept up to date (how long a stall lasts) for `GET /vm/memory`.
        self.shortfalls.insert(key, cause);
    }

    /// The resizes short of their target now, and why.
    pub(super) fn shortfalls(&self) -> Vec<MemoryShortfall> {
        self.shortfalls
            .iter()
            .map(|((mechanism, device), cause)| MemoryShortfall {
                mechanism: (*mechanism).to_owned(),
                device: device.clone(),
                cause: cause.clone(),
            })
            .collect()
    }

    /// A new plan: its outcome is yet to be published.
    pub(super) fn plan_started(&mut self) {
        self.plan_reported = None;
    }

    /// A new request for `device`: a refusal of the last one is history (and one of the new
    /// request is news, even before a tick saw the old one go).
    pub(super) fn forget_shortfall(&mut self, mechanism: &'static str, device: &str) {
        self.shortfalls.remove(&(mechanism, device.to_owned()));
    }
}

impl MemoryService {
    /// Publishes the progress of every resize; returns whether one is still under way.
    pub(super) fn report_progress(&mut self, now: Instant) -> bool {
        let mut events = Vec::new();
        let mut progress = std::mem::take(&mut self.progress);
        let mut in_flight = false;
        // Under way and not (yet) known to be stuck.
        let mut moving = false;
        for (status, _) in self.virtio_mem_statuses() {
            let movement = progress.observe(
                &mut events,
                now,
                VIRTIO_MEM,
                &status.id,
                status.plugged_size,
                status.requested_size,
            );
            let cause = virtio_mem_shortfall(&status, movement);
            in_flight |= movement.in_flight;
            moving |= movement.in_flight && cause.is_none();
            progress.failed(&mut events, VIRTIO_MEM, &status.id, cause);
        }
        if let Some(balloon) = &self.balloon {
            let status = lock(balloon).device().status();
            let movement = progress.observe(
                &mut events,
                now,
                BALLOON,
                BALLOON,
                status.inflated_bytes,
                status.target_bytes,
            );
            let cause = movement
                .stalled()
                .map(|stalled_seconds| ResizeShortfall::BalloonStalled {
                    actual_bytes: status.actual_bytes,
                    target_bytes: status.target_bytes,
                    stalled_seconds,
                });
            in_flight |= movement.in_flight;
            moving |= movement.in_flight && cause.is_none();
            progress.failed(&mut events, BALLOON, BALLOON, cause);
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
                let movement = progress.observe(&mut events, now, DIMM, &dimm.id, current, target);
                let cause = dimm_shortfall(dimm);
                in_flight |= movement.in_flight;
                moving |= movement.in_flight && cause.is_none();
                progress.failed(&mut events, DIMM, &dimm.id, cause);
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
        if let Some(target) = self.memory_target {
            if !moving {
                let actual = self.memory_state().actual_total();
                // Shortfalls explain a total short of the target; one left from an earlier
                // request (an eject refused, the DIMM kept since) does not make it so.
                let complete = actual == target;
                if progress.plan_reported != Some(complete) {
                    progress.plan_reported = Some(complete);
                    events.push(Event::MemoryPlanFinished {
                        target_total_bytes: target,
                        actual_total_bytes: actual,
                        complete,
                        shortfalls: progress.shortfalls(),
                    });
                }
            }
        }
        self.progress = progress;
        for event in events {
            self.publish(event);
        }
        in_flight
    }

    /// The resizes short of their target now, and why (`GET /vm/memory`).
    pub fn shortfalls(&self) -> Vec<MemoryShortfall> {
        self.progress.shortfalls()
    }

    /// The total of the last plan, if one was made.
    pub fn memory_target(&self) -> Option<u64> {
        self.memory_target
    }

    /// A DIMM left the guest: its resize is finished.
    pub(super) fn dimm_gone(&mut self, id: &str, slot: u32) {
        let key = (DIMM, id.to_owned());
        self.progress.seen.remove(&key);
        self.progress.shortfalls.remove(&key);
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
    use crate::arch::x86_64::layout::GuestRange;
    use crate::memory::Backing;
    use crate::memory_service::OstStatus;

    const MIB: u64 = 1 << 20;

    #[test]
    fn progress_then_finished_and_nothing_when_still() {
        let mut p = Progress::default();
        let mut events = Vec::new();
        let now = Instant::now();
        let at = |ms| now + Duration::from_millis(ms);
        let look = |p: &mut Progress, events: &mut Vec<Event>, t, current, target| {
            p.observe(events, t, VIRTIO_MEM, "mem0", current, target)
                .in_flight
        };
        assert!(!look(&mut p, &mut events, at(0), 0, 0), "at rest");
        assert!(look(&mut p, &mut events, at(500), 0, 1 << 30));
        assert!(events.is_empty(), "a new target alone is not progress");
        assert!(look(&mut p, &mut events, at(1000), 256 << 20, 1 << 30));
        assert!(look(&mut p, &mut events, at(1500), 256 << 20, 1 << 30));
        assert!(!look(&mut p, &mut events, at(2000), 1 << 30, 1 << 30));
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
    fn a_failure_is_published_once_per_cause() {
        let mut p = Progress::default();
        let mut events = Vec::new();
        let busy = || {
            Some(ResizeShortfall::HostBusy {
                message: "no memory".into(),
            })
        };
        for _ in 0..3 {
            p.failed(&mut events, DIMM, "d0", busy());
        }
        assert_eq!(p.shortfalls().len(), 1);
        p.failed(&mut events, DIMM, "d0", None);
        assert!(p.shortfalls().is_empty(), "gone once the device moves on");
        p.failed(&mut events, DIMM, "d0", busy());
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[0], Event::ResizeFailed { reason, cause: ResizeShortfall::HostBusy { .. }, .. }
                if reason.contains("no memory"))
        );
    }

    fn virtio_mem(plugged: u64, requested: u64) -> VirtioMemStatus {
        VirtioMemStatus {
            id: "vmem0".into(),
            node: None,
            region: GuestRange {
                start: 1 << 32,
                size: 2048 * MIB,
            },
            block_size: 2 * MIB,
            plugged_size: plugged,
            requested_size: requested,
            usable_region_size: 2048 * MIB,
            last_busy_reason: None,
        }
    }

    /// The example: of 2 GiB to unplug the guest gives back 1.2 GiB and stops; the
    /// rest holds unmovable pages. Nothing tells the host but the standstill.
    #[test]
    fn an_unplug_that_stops_short_is_a_typed_stall() {
        let mut p = Progress::default();
        let mut events = Vec::new();
        let start = Instant::now();
        // 2 GiB plugged, asked for 0; the guest unplugs 1.2 GiB (614 blocks) and stops.
        let stuck = 2048 * MIB - 1228 * MIB;
        p.observe(&mut events, start, VIRTIO_MEM, "vmem0", 2048 * MIB, 0);
        let mut movement = p.observe(&mut events, start + INTERVAL, VIRTIO_MEM, "vmem0", stuck, 0);
        assert_eq!(virtio_mem_shortfall(&virtio_mem(stuck, 0), movement), None);
        let later = start + INTERVAL + STALL_AFTER;
        movement = p.observe(&mut events, later, VIRTIO_MEM, "vmem0", stuck, 0);
        let cause = virtio_mem_shortfall(&virtio_mem(stuck, 0), movement).unwrap();
        assert_eq!(
            cause,
            ResizeShortfall::UnplugStalled {
                plugged_bytes: stuck,
                requested_bytes: 0,
                stalled_seconds: STALL_AFTER.as_secs(),
            }
        );
        assert!(cause.to_string().contains("820 MiB"), "{cause}");
        assert!(cause.to_string().contains("unmovable"), "{cause}");
        // A plug that stops short is the other kind; a BUSY from the host says more.
        let plug = p.observe(&mut events, start, VIRTIO_MEM, "vmem1", 0, GIB_FOR_TEST);
        let plug = Movement {
            still_for: STALL_AFTER,
            ..plug
        };
        assert!(matches!(
            virtio_mem_shortfall(&virtio_mem(0, GIB_FOR_TEST), plug),
            Some(ResizeShortfall::PlugStalled { .. })
        ));
        let mut busy = virtio_mem(0, GIB_FOR_TEST);
        busy.last_busy_reason = Some(std::sync::Arc::new(crate::memory::PlugError::OutOfRange {
            first: 1,
            count: 2,
            blocks: 1,
        }));
        assert!(matches!(
            virtio_mem_shortfall(&busy, plug),
            Some(ResizeShortfall::HostBusy { .. })
        ));
        // At its target, nothing is short.
        let done = p.observe(&mut events, later, VIRTIO_MEM, "vmem2", 0, 0);
        assert_eq!(virtio_mem_shortfall(&virtio_mem(0, 0), done), None);
    }

    const GIB_FOR_TEST: u64 = 1 << 30;

    fn dimm(state: DimmState) -> DimmStatus {
        DimmStatus {
            id: "dimm0".into(),
            slot: 0,
            range: GuestRange {
                start: 1 << 33,
                size: 1 << 30,
            },
            node: 0,
            backing: Backing::Anonymous,
            prealloc: false,
            state,
            resident_bytes: 0,
            last_ost: None,
            removal_refused: None,
        }
    }

    #[test]
    fn a_refused_eject_and_a_refused_insert_are_typed() {
        assert_eq!(dimm_shortfall(&dimm(DimmState::Active)), None);
        let mut refused = dimm(DimmState::Active);
        refused.removal_refused = Some(OstStatus {
            event: ost::EVENT_EJECT_REQUEST,
            status: 0x82,
            meaning: "device busy".into(),
        });
        assert_eq!(
            dimm_shortfall(&refused),
            Some(ResizeShortfall::EjectRefused {
                ost_event: ost::EVENT_EJECT_REQUEST,
                ost_status: 0x82,
                meaning: "device busy".into(),
            })
        );
        let mut inserting = dimm(DimmState::Inserting);
        inserting.last_ost = Some(OstStatus {
            event: ost::EVENT_DEVICE_CHECK,
            status: 0x80,
            meaning: "insertion in progress".into(),
        });
        assert_eq!(dimm_shortfall(&inserting), None, "still in progress");
        inserting.last_ost = Some(OstStatus {
            event: ost::EVENT_DEVICE_CHECK,
            status: 0x01,
            meaning: "non-specific failure".into(),
        });
        assert!(matches!(
            dimm_shortfall(&inserting),
            Some(ResizeShortfall::InsertRefused { ost_status: 1, .. })
        ));
    }
}
