//! The metrics that monitoring systems read: `GET /metrics` on the API socket and on the
//! `--metrics-listen` port, in the Prometheus text format (version 0.0.4), encoded by
//! `prometheus-client`.
//!
//! Nothing here is global. At scrape time the control loop takes a [`MetricsSnapshot`] of the
//! memory service (the devices' own counters and histograms), the vCPU exit counters and the
//! API server's request counts, and [`encode`] writes it through a `prometheus-client`
//! [`Collector`]. Counters that live in a device start again from zero when the VM reboots
//! (the devices are rebuilt); vCPU exits, API requests and memory violations are counted over
//! the whole life of the process.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tidevm_api::{ApiRequestCount, ApiRequestCounts};

use crate::devices::virtio::mem::{ResponseCounts, VirtioMemMetrics};
use crate::memory::ResidentSplit;
use crate::memory_service::{DimmState, MemoryService};
use crate::vstate::vcpu::VcpuExits;

/// The `Content-Type` of what [`encode`] writes.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One virtio-mem device at scrape time.
#[derive(Clone, Debug)]
pub struct VirtioMemSample {
    /// Device id (the `device` label).
    pub id: String,
    /// Bytes plugged now.
    pub plugged_bytes: u64,
    /// Bytes the host asked for.
    pub requested_bytes: u64,
    /// Size of the device's region.
    pub region_bytes: u64,
    /// The device's counters and histograms.
    pub metrics: VirtioMemMetrics,
}

/// The balloon at scrape time.
#[derive(Clone, Debug, Default)]
pub struct BalloonSample {
    /// Requested balloon size.
    pub target_bytes: u64,
    /// What the guest claims.
    pub actual_bytes: u64,
    /// What the host counted.
    pub inflated_bytes: u64,
    /// Host memory released (inflates and free page reports), since boot.
    pub discarded_bytes: u64,
    /// Bytes released through free page reporting, since boot.
    pub reported_bytes: u64,
    /// Discard syscalls, since boot.
    pub discard_syscalls: u64,
    /// Time in those syscalls, in seconds, since boot.
    pub discard_seconds: f64,
    /// Inflated pages the guest wrote again (last reuse scan).
    pub reused_pages: u64,
    /// The guest's last statistics and their age in seconds, if any arrived.
    pub stats: Option<(BTreeMap<String, u64>, f64)>,
}

/// One DIMM at scrape time.
#[derive(Clone, Debug)]
pub struct DimmSample {
    /// DIMM id (the `dimm` label).
    pub id: String,
    /// Life-cycle state.
    pub state: DimmState,
    /// Host memory resident in it.
    pub resident_bytes: u64,
}

/// Everything one scrape exports.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Whether a VM is running (between a stop and the next boot it is not).
    pub running: bool,
    /// virtio-mem devices, in configuration order.
    pub virtio_mem: Vec<VirtioMemSample>,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonSample>,
    /// DIMMs, by slot.
    pub dimms: Vec<DimmSample>,
    /// Memory violations since the VMM started.
    pub violations: u64,
    /// Host resident memory, when a VM is running.
    pub rss: Option<ResidentSplit>,
    /// vCPU exits by reason label.
    pub vcpu_exits: Vec<(&'static str, u64)>,
    /// API requests answered.
    pub api_requests: Vec<ApiRequestCount>,
}

/// Where the counters kept outside the memory service are.
#[derive(Clone, Debug, Default)]
pub struct MetricsSources {
    /// vCPU exits (shared with every vCPU thread).
    pub vcpu_exits: Arc<VcpuExits>,
    /// The API server's request counts, when there is an API socket.
    pub api_requests: Option<Arc<ApiRequestCounts>>,
}

impl MetricsSnapshot {
    /// Takes the snapshot, on the control thread; `memory` is `None` when no VM runs.
    ///
    /// Reading the balloon runs its reuse scan, as `GET /vm/balloon` does, so that the reused
    /// page count is exact now.
    pub fn take(memory: Option<&mut MemoryService>, sources: &MetricsSources) -> Self {
        let mut snapshot = MetricsSnapshot {
            vcpu_exits: sources
                .vcpu_exits
                .counts()
                .into_iter()
                .map(|(reason, n)| (reason.label(), n))
                .collect(),
            api_requests: sources
                .api_requests
                .as_ref()
                .map(|counts| counts.snapshot())
                .unwrap_or_default(),
            ..Default::default()
        };
        let Some(memory) = memory else {
            return snapshot;
        };
        snapshot.running = true;
        snapshot.virtio_mem = memory
            .virtio_mem_statuses()
            .into_iter()
            .map(|(status, metrics)| VirtioMemSample {
                id: status.id,
                plugged_bytes: status.plugged_size,
                requested_bytes: status.requested_size,
                region_bytes: status.region.size,
                metrics,
            })
            .collect();
        // The only refusal is "no balloon".
        snapshot.balloon = memory
            .balloon_status()
            .ok()
            .map(|(status, _, _)| BalloonSample {
                target_bytes: status.target_bytes,
                actual_bytes: status.actual_bytes,
                inflated_bytes: status.inflated_bytes,
                discarded_bytes: status.discarded_bytes,
                reported_bytes: status.reported_free_bytes,
                discard_syscalls: status.discard_syscalls,
                discard_seconds: status.discard_time.as_secs_f64(),
                reused_pages: status.reused.reused_pages,
                stats: status.stats.map(|s| (s.values, s.age.as_secs_f64())),
            });
        snapshot.dimms = memory
            .dimms_status()
            .map(|d| {
                d.dimms
                    .into_iter()
                    .map(|d| DimmSample {
                        id: d.id,
                        state: d.state,
                        resident_bytes: d.resident_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default();
        snapshot.violations = memory.violations().count;
        snapshot.rss = Some(memory.resident());
        snapshot
    }
}

/// `snapshot` in the Prometheus text format (version 0.0.4, [`CONTENT_TYPE`]).
pub fn encode(snapshot: MetricsSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut text = String::new();
    // Writing to a String does not fail, and the collector only fails when its writer does.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// Labels of one sample.
type Labels = Vec<(&'static str, String)>;

/// Encodes one metric family: its HELP and TYPE lines once, then every sample. A family
/// without samples is left out.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: &[(Labels, M)],
) -> fmt::Result {
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), first.metric_type())?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(labels: Labels, value: u64) -> (Labels, ConstGauge<u64>) {
    (labels, ConstGauge::new(value))
}

fn counter(labels: Labels, value: u64) -> (Labels, ConstCounter<u64>) {
    (labels, ConstCounter::new(value))
}

fn device(id: &str) -> Labels {
    vec![("device", id.to_owned())]
}

/// Encodes a [`MetricsSnapshot`].
#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let e = &mut encoder;
        family(
            e,
            "tidevm_vm_running",
            "1 while a VM is running, 0 between a stop and the next boot.",
            None,
            &[gauge(vec![], u64::from(s.running))],
        )?;
        encode_virtio_mem(e, &s.virtio_mem)?;
        if let Some(balloon) = &s.balloon {
            encode_balloon(e, balloon)?;
        }
        encode_dimms(e, &s.dimms)?;
        family(
            e,
            "tidevm_memory_violations",
            "Guest accesses to hotplug memory it did not own, since the VMM started.",
            None,
            &[counter(vec![], s.violations)],
        )?;
        if let Some(rss) = s.rss {
            family(
                e,
                "tidevm_rss",
                "Resident host memory of the VMM process: guest memory, and the VMM's own.",
                Some(Unit::Bytes),
                &[
                    gauge(vec![("part", "guest".into())], rss.guest),
                    gauge(
                        vec![("part", "vmm".into())],
                        rss.total.saturating_sub(rss.guest),
                    ),
                ],
            )?;
        }
        let exits: Vec<_> = s
            .vcpu_exits
            .iter()
            .map(|&(reason, n)| counter(vec![("reason", reason.into())], n))
            .collect();
        family(
            e,
            "tidevm_vcpu_exits",
            "vCPU exits from KVM_RUN by reason, over every vCPU and boot.",
            None,
            &exits,
        )?;
        let requests: Vec<_> = s
            .api_requests
            .iter()
            .map(|r| {
                counter(
                    vec![
                        ("method", r.method.into()),
                        ("endpoint", r.endpoint.into()),
                        ("status", r.status.to_string()),
                    ],
                    r.count,
                )
            })
            .collect();
        family(
            e,
            "tidevm_api_requests",
            "Requests the API socket answered, by method, route template and status.",
            None,
            &requests,
        )
    }
}

/// A size family's name, help, and how to read its value from a device.
type SizeFamily = (&'static str, &'static str, fn(&VirtioMemSample) -> u64);

/// A histogram family's name, help, and which of the device's histograms it is.
type HistogramFamily = (
    &'static str,
    &'static str,
    fn(&VirtioMemMetrics) -> &Histogram,
);

fn encode_virtio_mem(e: &mut DescriptorEncoder, devices: &[VirtioMemSample]) -> fmt::Result {
    let sizes: [SizeFamily; 3] = [
        (
            "tidevm_virtio_mem_plugged",
            "Memory the guest has plugged from the device.",
            |d| d.plugged_bytes,
        ),
        (
            "tidevm_virtio_mem_requested",
            "Memory the host asked the guest to have plugged from the device.",
            |d| d.requested_bytes,
        ),
        (
            "tidevm_virtio_mem_region",
            "Size of the device's region (the most it can plug).",
            |d| d.region_bytes,
        ),
    ];
    for (name, help, value) in sizes {
        let samples: Vec<_> = devices
            .iter()
            .map(|d| gauge(device(&d.id), value(d)))
            .collect();
        family(e, name, help, Some(Unit::Bytes), &samples)?;
    }
    let mut requests = Vec::new();
    for d in devices {
        let m = &d.metrics;
        for (kind, counts) in [
            ("plug", m.plug),
            ("unplug", m.unplug),
            ("unplug_all", m.unplug_all),
            ("state", m.state),
        ] {
            let ResponseCounts {
                ack,
                nack,
                busy,
                error,
            } = counts;
            for (response, n) in [
                ("ack", ack),
                ("nack", nack),
                ("busy", busy),
                ("error", error),
            ] {
                let mut labels = device(&d.id);
                labels.push(("type", kind.into()));
                labels.push(("response", response.into()));
                requests.push(counter(labels, n));
            }
        }
    }
    family(
        e,
        "tidevm_virtio_mem_requests",
        "Requests the guest driver sent, by type and by the device's response.",
        None,
        &requests,
    )?;
    let malformed: Vec<_> = devices
        .iter()
        .map(|d| counter(device(&d.id), d.metrics.malformed))
        .collect();
    family(
        e,
        "tidevm_virtio_mem_malformed_requests",
        "Descriptor chains too malformed to answer.",
        None,
        &malformed,
    )?;
    let histograms: [HistogramFamily; 2] = [
        (
            "tidevm_virtio_mem_plug_duration",
            "Time the VMM took to handle each PLUG request (mostly populating memory).",
            |m| m.plug_seconds.histogram(),
        ),
        (
            "tidevm_virtio_mem_unplug_duration",
            "Time the VMM took to handle each UNPLUG and UNPLUG_ALL request (mostly discarding).",
            |m| m.unplug_seconds.histogram(),
        ),
    ];
    for (name, help, histogram) in histograms {
        let samples: Vec<_> = devices
            .iter()
            .map(|d| (device(&d.id), histogram(&d.metrics).clone()))
            .collect();
        family(e, name, help, Some(Unit::Seconds), &samples)?;
    }
    Ok(())
}

fn encode_balloon(e: &mut DescriptorEncoder, b: &BalloonSample) -> fmt::Result {
    let bytes = Some(Unit::Bytes);
    for (name, help, value) in [
        (
            "tidevm_balloon_target",
            "Requested balloon size.",
            b.target_bytes,
        ),
        (
            "tidevm_balloon_actual",
            "Balloon size the guest claims (its `actual` field, unverified).",
            b.actual_bytes,
        ),
        (
            "tidevm_balloon_inflated",
            "Balloon size the host counted (acknowledged inflates minus deflates).",
            b.inflated_bytes,
        ),
    ] {
        family(e, name, help, bytes.clone(), &[gauge(vec![], value)])?;
    }
    family(
        e,
        "tidevm_balloon_reused_pages",
        "Inflated pages the guest wrote again without deflating them (last reuse scan).",
        None,
        &[gauge(vec![], b.reused_pages)],
    )?;
    for (name, help, value) in [
        (
            "tidevm_balloon_discarded",
            "Host memory released for inflates and free page reports, since boot.",
            b.discarded_bytes,
        ),
        (
            "tidevm_balloon_reported",
            "Host memory released through free page reporting, since boot.",
            b.reported_bytes,
        ),
    ] {
        family(e, name, help, bytes.clone(), &[counter(vec![], value)])?;
    }
    family(
        e,
        "tidevm_balloon_discard_syscalls",
        "madvise/fallocate calls made to release memory, since boot.",
        None,
        &[counter(vec![], b.discard_syscalls)],
    )?;
    family(
        e,
        "tidevm_balloon_discard",
        "Time spent in those calls, since boot.",
        Some(Unit::Seconds),
        &[(vec![], ConstCounter::new(b.discard_seconds))],
    )?;
    if let Some((values, age)) = &b.stats {
        let samples: Vec<_> = values
            .iter()
            .map(|(stat, &value)| gauge(vec![("stat", stat.clone())], value))
            .collect();
        family(
            e,
            "tidevm_balloon_guest_stat",
            "The guest's last memory statistics, as it reported them (bytes or counts, as \
             the virtio spec defines each).",
            None,
            &samples,
        )?;
        family(
            e,
            "tidevm_balloon_guest_stats_age",
            "How long ago the guest sent those statistics.",
            Some(Unit::Seconds),
            &[(vec![], ConstGauge::new(*age))],
        )?;
    }
    Ok(())
}

fn encode_dimms(e: &mut DescriptorEncoder, dimms: &[DimmSample]) -> fmt::Result {
    const STATES: [(DimmState, &str); 3] = [
        (DimmState::Inserting, "inserting"),
        (DimmState::Active, "active"),
        (DimmState::Removing, "removing"),
    ];
    let mut states = Vec::new();
    for d in dimms {
        for (state, label) in STATES {
            states.push(gauge(
                vec![("dimm", d.id.clone()), ("state", label.into())],
                u64::from(d.state == state),
            ));
        }
    }
    family(
        e,
        "tidevm_dimm_state",
        "1 for the DIMM's current state, 0 for the others.",
        None,
        &states,
    )?;
    let resident: Vec<_> = dimms
        .iter()
        .map(|d| gauge(vec![("dimm", d.id.clone())], d.resident_bytes))
        .collect();
    family(
        e,
        "tidevm_dimm_resident",
        "Host memory resident in the DIMM's mapping.",
        Some(Unit::Bytes),
        &resident,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::mem::handling_time_buckets;

    fn known_snapshot() -> MetricsSnapshot {
        let mut metrics = VirtioMemMetrics::default();
        metrics.plug.ack = 3;
        metrics.plug.nack = 1;
        metrics.unplug_all.ack = 1;
        metrics.malformed = 2;
        // 20 µs lands in the 40 µs bucket, 1 ms in the 2.56 ms bucket.
        metrics.plug_seconds.observe(Duration::from_micros(20));
        metrics.plug_seconds.observe(Duration::from_millis(1));
        metrics.plug_seconds.observe(Duration::from_millis(1));
        metrics.unplug_seconds.observe(Duration::from_secs(10));
        let stats = BTreeMap::from([
            ("free_memory".to_owned(), 100 << 20),
            ("major_faults".to_owned(), 7),
        ]);
        MetricsSnapshot {
            running: true,
            virtio_mem: vec![VirtioMemSample {
                id: "mem0".into(),
                plugged_bytes: 128 << 20,
                requested_bytes: 256 << 20,
                region_bytes: 1 << 30,
                metrics,
            }],
            balloon: Some(BalloonSample {
                target_bytes: 64 << 20,
                actual_bytes: 32 << 20,
                inflated_bytes: 32 << 20,
                discarded_bytes: 40 << 20,
                reported_bytes: 8 << 20,
                discard_syscalls: 5,
                discard_seconds: 0.25,
                reused_pages: 1,
                stats: Some((stats, 2.5)),
            }),
            dimms: vec![DimmSample {
                id: "dimm0".into(),
                state: DimmState::Active,
                resident_bytes: 4096,
            }],
            violations: 4,
            rss: Some(ResidentSplit {
                total: 300 << 20,
                guest: 290 << 20,
            }),
            vcpu_exits: vec![("io", 10), ("hlt", 2)],
            api_requests: vec![ApiRequestCount {
                method: "PUT",
                endpoint: "/vm/virtio-mem/{id}",
                status: 204,
                count: 1,
            }],
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn families_have_their_names_units_labels_and_help() {
        let text = encode(known_snapshot());
        let lines = lines(&text);
        let expected = [
            "# HELP tidevm_vm_running 1 while a VM is running, 0 between a stop and the next boot.",
            "# TYPE tidevm_vm_running gauge",
            "tidevm_vm_running 1",
            "# TYPE tidevm_virtio_mem_plugged_bytes gauge",
            "tidevm_virtio_mem_plugged_bytes{device=\"mem0\"} 134217728",
            "tidevm_virtio_mem_requested_bytes{device=\"mem0\"} 268435456",
            "tidevm_virtio_mem_region_bytes{device=\"mem0\"} 1073741824",
            "# TYPE tidevm_virtio_mem_requests_total counter",
            "tidevm_virtio_mem_requests_total{device=\"mem0\",type=\"plug\",response=\"ack\"} 3",
            "tidevm_virtio_mem_requests_total{device=\"mem0\",type=\"plug\",response=\"nack\"} 1",
            "tidevm_virtio_mem_requests_total{device=\"mem0\",type=\"unplug_all\",response=\"ack\"} 1",
            "tidevm_virtio_mem_requests_total{device=\"mem0\",type=\"state\",response=\"error\"} 0",
            "tidevm_virtio_mem_malformed_requests_total{device=\"mem0\"} 2",
            "# TYPE tidevm_virtio_mem_plug_duration_seconds histogram",
            "# TYPE tidevm_virtio_mem_unplug_duration_seconds histogram",
            "tidevm_balloon_target_bytes 67108864",
            "tidevm_balloon_actual_bytes 33554432",
            "tidevm_balloon_inflated_bytes 33554432",
            "tidevm_balloon_reused_pages 1",
            "# TYPE tidevm_balloon_discarded_bytes_total counter",
            "tidevm_balloon_discarded_bytes_total 41943040",
            "tidevm_balloon_reported_bytes_total 8388608",
            "tidevm_balloon_discard_syscalls_total 5",
            "tidevm_balloon_discard_seconds_total 0.25",
            "# TYPE tidevm_balloon_guest_stat gauge",
            "tidevm_balloon_guest_stat{stat=\"free_memory\"} 104857600",
            "tidevm_balloon_guest_stat{stat=\"major_faults\"} 7",
            "tidevm_balloon_guest_stats_age_seconds 2.5",
            "tidevm_dimm_state{dimm=\"dimm0\",state=\"inserting\"} 0",
            "tidevm_dimm_state{dimm=\"dimm0\",state=\"active\"} 1",
            "tidevm_dimm_state{dimm=\"dimm0\",state=\"removing\"} 0",
            "tidevm_dimm_resident_bytes{dimm=\"dimm0\"} 4096",
            "# TYPE tidevm_memory_violations_total counter",
            "tidevm_memory_violations_total 4",
            "tidevm_rss_bytes{part=\"guest\"} 304087040",
            "tidevm_rss_bytes{part=\"vmm\"} 10485760",
            "# TYPE tidevm_vcpu_exits_total counter",
            "tidevm_vcpu_exits_total{reason=\"io\"} 10",
            "tidevm_vcpu_exits_total{reason=\"hlt\"} 2",
            "# TYPE tidevm_api_requests_total counter",
            "tidevm_api_requests_total{method=\"PUT\",endpoint=\"/vm/virtio-mem/{id}\",status=\"204\"} 1",
        ];
        for line in expected {
            assert!(lines.contains(&line), "missing {line:?} in\n{text}");
        }
        // Every family has exactly one HELP and one TYPE line, and every sample's family
        // has them.
        let types: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let helps = lines.iter().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types.len(), helps);
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), types.len(), "a family is declared twice");
        for sample in lines.iter().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| types.contains(base))
                .unwrap_or(name);
            assert!(types.contains(&family), "{sample} has no TYPE line");
            assert!(family.starts_with("tidevm_"), "{sample}");
        }
    }

    #[test]
    fn handling_times_land_in_their_buckets() {
        let text = encode(known_snapshot());
        let lines = lines(&text);
        let bucket = |name: &str, le: &str| {
            format!(
                "tidevm_virtio_mem_{name}_duration_seconds_bucket{{device=\"mem0\",le=\"{le}\"}} "
            )
        };
        let value = |prefix: &str| -> u64 {
            let line = lines
                .iter()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let bounds: Vec<f64> = handling_time_buckets().collect();
        assert_eq!(bounds.len(), 10);
        assert!((bounds[0] - 10e-6).abs() < 1e-12 && (bounds[9] - 2.62144).abs() < 1e-9);
        // Cumulative counts: nothing at 10 µs, the 20 µs one by 40 µs, all three by 2.56 ms.
        assert_eq!(value(&bucket("plug", "1e-05")), 0);
        assert_eq!(value(&bucket("plug", "4e-05")), 1);
        assert_eq!(value(&bucket("plug", "0.00064")), 1);
        assert_eq!(value(&bucket("plug", "0.00256")), 3);
        assert_eq!(value(&bucket("plug", "+Inf")), 3);
        assert_eq!(
            value("tidevm_virtio_mem_plug_duration_seconds_count{device=\"mem0\"} "),
            3
        );
        assert!(
            lines.contains(&"tidevm_virtio_mem_plug_duration_seconds_sum{device=\"mem0\"} 0.00202"),
            "{text}"
        );
        // The 10 s unplug is above every finite bound.
        assert_eq!(value(&bucket("unplug", "2.62144")), 0);
        assert_eq!(value(&bucket("unplug", "+Inf")), 1);
    }

    #[test]
    fn a_stopped_vm_exports_only_what_outlives_it() {
        let text = encode(MetricsSnapshot {
            vcpu_exits: vec![("io", 1)],
            ..Default::default()
        });
        assert!(text.contains("tidevm_vm_running 0\n"), "{text}");
        assert!(text.contains("tidevm_vcpu_exits_total{reason=\"io\"} 1\n"));
        assert!(!text.contains("tidevm_virtio_mem"), "{text}");
        assert!(!text.contains("tidevm_balloon"), "{text}");
        assert!(!text.contains("tidevm_rss_bytes"), "{text}");
    }

    #[test]
    fn the_content_type_is_the_one_the_api_sends() {
        assert_eq!(CONTENT_TYPE, tidevm_api::METRICS_CONTENT_TYPE);
    }

    /// `promtool check metrics` (Prometheus's own linter and parser) accepts the output.
    #[test]
    fn promtool_accepts_the_output() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            // Straight to stderr: the harness captures only print! and eprint!.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: promtool_accepts_the_output: promtool is not installed (make deps)"
            );
            return;
        };
        let text = encode(known_snapshot());
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
