//! The VMM's event stream (`GET /vm/events`): what the memory service and the control loop
//! publish, handed to every subscriber without ever waiting for one.
//!
//! Each subscriber gets a bounded queue. Publishing never blocks: an event that does not
//! fit is dropped for that subscriber and counted, and the subscriber's next event is
//! preceded by a `lost` event with the count. A subscriber that went away is forgotten at the
//! next publish.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::Instant;

use tidevm_api::{ApiError, Event, EventRecord};

/// Events queued per subscriber before they are dropped for it.
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// Subscribers served at once.
pub const MAX_SUBSCRIBERS: usize = 8;

struct Subscriber {
    queue: SyncSender<String>,
    /// Events dropped for it since its last delivered one.
    lost: u64,
}

struct Inner {
    subscribers: Vec<Subscriber>,
    next_seq: u64,
}

/// Publishes [`Event`]s to subscribers. Shared (`Arc`) by the control loop, the memory
/// service and the API bridge.
pub struct EventBus {
    inner: Mutex<Inner>,
    started: Instant,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventBus")
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        EventBus {
            inner: Mutex::new(Inner {
                subscribers: Vec::new(),
                next_seq: 1,
            }),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscription: one JSON [`EventRecord`] per item.
    pub fn subscribe(&self) -> Result<Receiver<String>, ApiError> {
        let mut inner = self.lock();
        // Forget subscribers that went away before counting.
        inner.subscribers.retain(|s| {
            !matches!(
                s.queue.try_send(String::new()),
                Err(TrySendError::Disconnected(_))
            )
        });
        if inner.subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(ApiError::conflict(format!(
                "{MAX_SUBSCRIBERS} event subscribers already; close one first"
            )));
        }
        let (queue, receiver) = sync_channel(SUBSCRIBER_QUEUE);
        inner.subscribers.push(Subscriber { queue, lost: 0 });
        Ok(receiver)
    }

    /// Publishes `event` to every subscriber, never waiting.
    pub fn publish(&self, event: Event) {
        let mut inner = self.lock();
        if inner.subscribers.is_empty() {
            return;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let ms = self.started.elapsed().as_millis() as u64;
        let line = serde_json::to_string(&EventRecord { seq, ms, event }).unwrap_or_default();
        inner.subscribers.retain_mut(|s| {
            if s.lost > 0 {
                let lost = EventRecord {
                    seq,
                    ms,
                    event: Event::Lost { count: s.lost },
                };
                match s
                    .queue
                    .try_send(serde_json::to_string(&lost).unwrap_or_default())
                {
                    Ok(()) => s.lost = 0,
                    Err(TrySendError::Full(_)) => {
                        s.lost += 1;
                        return true;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            match s.queue.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lost += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(device: &str) -> Event {
        Event::ResizeStarted {
            mechanism: "virtio-mem".into(),
            device: device.into(),
            target_bytes: 1 << 30,
        }
    }

    #[test]
    fn subscribers_get_every_event_in_order() {
        let bus = EventBus::new();
        bus.publish(started("before")); // nobody listens: not even numbered
        let rx = bus.subscribe().unwrap();
        bus.publish(started("a"));
        bus.publish(started("b"));
        let records: Vec<EventRecord> = rx
            .try_iter()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].seq, records[1].seq), (1, 2));
        assert_eq!(records[1].event, started("b"));
    }

    #[test]
    fn a_subscriber_that_stops_reading_never_blocks_and_learns_what_it_lost() {
        let bus = EventBus::new();
        let slow = bus.subscribe().unwrap();
        let started_at = Instant::now();
        for i in 0..(SUBSCRIBER_QUEUE + 500) {
            bus.publish(started(&format!("d{i}")));
        }
        assert!(started_at.elapsed().as_secs() < 5, "publishing never waits");
        let queued = slow.try_iter().filter(|l| !l.is_empty()).count();
        assert_eq!(queued, SUBSCRIBER_QUEUE);
        bus.publish(started("after"));
        let lines: Vec<EventRecord> = slow
            .try_iter()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        assert_eq!(lines[0].event, Event::Lost { count: 500 });
        assert_eq!(lines[1].event, started("after"));
    }

    #[test]
    fn subscribers_are_bounded_and_gone_ones_are_forgotten() {
        let bus = EventBus::new();
        let held: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| bus.subscribe().unwrap())
            .collect();
        assert_eq!(bus.subscribe().unwrap_err().status, 409);
        drop(held);
        assert!(bus.subscribe().is_ok());
    }
}
