//! The parser, the /proc parsers, single rules on hand-written inputs, and whole traces
//! replayed through a small simulated guest (the policy's targets change what the guest
//! reports next, so a trace is a workload, and the inputs follow from it).

use std::collections::BTreeMap;

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn config(text: &str) -> PolicyConfig {
    PolicyConfig::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Parser.

#[test]
fn parser_defaults_and_every_key() {
    let c = config("auto,min=1G,max=8G");
    assert_eq!((c.min, c.max), (GIB, 8 * GIB));
    assert_eq!(
        PolicyConfig {
            min: 0,
            max: 0,
            ..c.clone()
        },
        PolicyConfig::default()
    );
    let c = config(
        "auto,min=512M,max=4G,floor=384M,headroom=128M,growth-margin=1G,band=128M,\
         interval=500ms,shrink-step=128M,shrink-hold=1m,pressure-step=2G,psi-some=12.5,\
         psi-full=0.25,host-low=100M,fault-rate=50",
    );
    assert_eq!(c.floor, 384 * MIB);
    assert_eq!(c.headroom, 128 * MIB);
    assert_eq!(c.growth_margin, GIB);
    assert_eq!(c.band, 128 * MIB);
    assert_eq!(c.interval, Duration::from_millis(500));
    assert_eq!(c.shrink_step, 128 * MIB);
    assert_eq!(c.shrink_hold, secs(60));
    assert_eq!(c.pressure_step, 2 * GIB);
    assert_eq!((c.psi_some, c.psi_full), (1250, 25));
    assert_eq!(c.host_low, 100 * MIB);
    assert_eq!(c.fault_rate, 50);
}

#[test]
fn parser_refusals_are_typed() {
    use PolicyConfigError as E;
    type Expected = fn(&E) -> bool;
    let cases: &[(&str, Expected)] = &[
        (
            "manual,min=1G,max=2G",
            |e| matches!(e, E::UnknownPolicy(p) if p == "manual"),
        ),
        ("", |e| matches!(e, E::UnknownPolicy(_))),
        ("auto,min=1G,max=2G,floor", |e| {
            matches!(e, E::NotKeyValue(_))
        }),
        (
            "auto,min=1G,max=2G,speed=9",
            |e| matches!(e, E::UnknownKey(k) if k == "speed"),
        ),
        ("auto,min=1G,max=2G,min=1G", |e| *e == E::Repeated("min")),
        ("auto,max=2G", |e| *e == E::Missing("min")),
        ("auto,min=1G", |e| *e == E::Missing("max")),
        ("auto,min=2G,max=1G", |e| matches!(e, E::MinAboveMax { .. })),
        ("auto,min=1000M,max=2G", |e| {
            matches!(e, E::Unaligned { key: "min", .. })
        }),
        ("auto,min=1G,max=2G,floor=100M", |e| {
            matches!(e, E::Unaligned { key: "floor", .. })
        }),
        ("auto,min=1G,max=2G,shrink-step=1M", |e| {
            matches!(
                e,
                E::Unaligned {
                    key: "shrink-step",
                    ..
                }
            )
        }),
        ("auto,min=1G,max=2X", |e| {
            matches!(e, E::InvalidSize { key: "max", .. })
        }),
        ("auto,min=0,max=2G", |e| *e == E::Zero("min")),
        ("auto,min=1G,max=2G,interval=0s", |e| {
            *e == E::Zero("interval")
        }),
        ("auto,min=1G,max=2G,interval=0ms", |e| {
            *e == E::Zero("interval")
        }),
        ("auto,min=1G,max=2G,interval=2", |e| {
            matches!(e, E::InvalidDuration { .. })
        }),
        ("auto,min=1G,max=2G,interval=-2s", |e| {
            matches!(e, E::InvalidDuration { .. })
        }),
        ("auto,min=1G,max=2G,interval=2h", |e| {
            matches!(e, E::InvalidDuration { .. })
        }),
        ("auto,min=1G,max=2G,shrink-hold=1441m", |e| {
            matches!(e, E::InvalidDuration { .. })
        }),
        ("auto,min=1G,max=2G,interval=99999999999999999999s", |e| {
            matches!(e, E::InvalidDuration { .. })
        }),
        ("auto,min=1G,max=2G,interval=18446744073709551615m", |e| {
            matches!(e, E::InvalidDuration { .. })
        }),
        ("auto,min=1G,max=2G,shrink-step=0", |e| {
            *e == E::Zero("shrink-step")
        }),
        ("auto,min=1G,max=2G,psi-some=101", |e| {
            matches!(e, E::InvalidPercent { .. })
        }),
        ("auto,min=1G,max=2G,psi-some=1.234", |e| {
            matches!(e, E::InvalidPercent { .. })
        }),
        ("auto,min=1G,max=2G,psi-full=-1", |e| {
            matches!(e, E::InvalidPercent { .. })
        }),
        ("auto,min=1G,max=2G,psi-full=.5", |e| {
            matches!(e, E::InvalidPercent { .. })
        }),
        ("auto,min=1G,max=2G,fault-rate=0", |e| {
            *e == E::Zero("fault-rate")
        }),
        ("auto,min=1G,max=2G,fault-rate=lots", |e| {
            matches!(e, E::InvalidCount { .. })
        }),
        ("auto,min=1G,max=2G,headroom=512M", |e| {
            matches!(e, E::MarginNotAboveHeadroom { .. })
        }),
    ];
    for (text, expected) in cases {
        let err = PolicyConfig::parse(text).expect_err(text);
        assert!(expected(&err), "{text}: unexpected {err:?}");
        assert!(err.to_string().contains("--memory-policy"), "{err}");
    }
    // Equal bounds are a fixed size, which is allowed.
    assert_eq!(config("auto,min=2G,max=2G").min, 2 * GIB);
}

// ---------------------------------------------------------------------------------------------
// /proc parsers.

#[test]
fn psi_sample_texts() {
    let text = "some avg10=12.34 avg60=5.00 avg300=1.00 total=123456\n\
                full avg10=0.50 avg60=0.10 avg300=0.00 total=999\n";
    assert_eq!(
        parse_memory_psi(text).unwrap(),
        MemoryPsi {
            some_avg10: 1234,
            full_avg10: 50
        }
    );
    // Some kernels print only `some` for a resource.
    let only_some = "some avg10=100.00 avg60=0.00 avg300=0.00 total=0\n";
    assert_eq!(parse_memory_psi(only_some).unwrap().some_avg10, 10_000);
    assert_eq!(parse_memory_psi(only_some).unwrap().full_avg10, 0);
    for bad in [
        "",
        "full avg10=1.00 avg60=0.00 avg300=0.00 total=0\n",
        "some avg60=0.00 total=0\n",
        "some avg10=abc avg60=0.00\n",
        "some avg10=-1.00\n",
        "some avg10=1e3\n",
    ] {
        assert!(
            matches!(parse_memory_psi(bad), Err(HostPressureError::Format { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn meminfo_sample_texts() {
    let text = "MemTotal:       16318412 kB\nMemFree:         1234567 kB\n\
                MemAvailable:    8123456 kB\nBuffers:          123456 kB\n";
    assert_eq!(parse_mem_available(text).unwrap(), 8_123_456 * 1024);
    for bad in [
        "MemTotal: 1 kB\n",
        "MemAvailable: lots kB\n",
        "MemAvailable: 12\n",
        "MemAvailable: 12 MB\n",
        "MemAvailable: 18446744073709551615 kB\n",
    ] {
        assert!(parse_mem_available(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn guest_sample_from_the_stats_tags() {
    use crate::devices::virtio::balloon::stats::TAG_NAMES;
    let mut values: BTreeMap<String, u64> = BTreeMap::new();
    for (tag, name) in TAG_NAMES.iter().enumerate() {
        values.insert((*name).to_string(), 1000 + tag as u64);
    }
    let s = GuestSample::from_stats(&values, secs(7)).unwrap();
    assert_eq!(s.at, secs(7));
    assert_eq!((s.available, s.free, s.caches), (1006, 1004, Some(1007)));
    assert_eq!(s.major_faults, Some(1002));
    assert_eq!(s.oom_kills, Some(1010));
    assert_eq!(s.alloc_stalls, Some(1011));
    assert_eq!(s.direct_scan, Some(1013));
    assert_eq!(s.direct_reclaim, Some(1015));
    // A pre-6.10 guest: the newer counters are absent, not zero.
    for name in &TAG_NAMES[10..] {
        values.remove(*name);
    }
    let s = GuestSample::from_stats(&values, secs(7)).unwrap();
    assert_eq!(
        (s.oom_kills, s.alloc_stalls, s.direct_reclaim),
        (None, None, None)
    );
    values.remove("available_memory");
    assert_eq!(GuestSample::from_stats(&values, secs(7)), None);
}

// ---------------------------------------------------------------------------------------------
// Single rules on hand-written inputs.

fn sample(at: u64, available_mib: u64, free_mib: u64) -> GuestSample {
    GuestSample {
        at: secs(at),
        available: available_mib * MIB,
        free: free_mib * MIB,
        caches: Some(available_mib.saturating_sub(free_mib) * MIB),
        major_faults: Some(0),
        oom_kills: Some(0),
        alloc_stalls: Some(0),
        direct_scan: Some(0),
        direct_reclaim: Some(0),
    }
}

fn input(now: u64, total: u64, guest: Option<GuestSample>) -> Inputs {
    Inputs {
        now: secs(now),
        current_total: total,
        guest,
        reported_free_since_last: 0,
        host: None,
    }
}

fn target_of(d: &Decision) -> Option<(u64, ResizeReason)> {
    match d {
        Decision::Hold => None,
        Decision::Resize { target, reason, .. } => Some((*target, *reason)),
    }
}

#[test]
fn without_fresh_statistics_only_the_range_is_enforced() {
    let c = config("auto,min=1G,max=4G");
    let mut s = PolicyState::default();
    // Below min at start: clamp, no statistics needed.
    let d = decide(&c, &mut s, &input(0, 512 * MIB, None));
    assert_eq!(target_of(&d), Some((GIB, ResizeReason::BelowMin)));
    let d = decide(&c, &mut s, &input(2, 6 * GIB, None));
    assert_eq!(target_of(&d), Some((4 * GIB, ResizeReason::AboveMax)));
    // In range, a guest starved of memory, but the sample is 10 s old: hold.
    let mut s = PolicyState::default();
    let d = decide(&c, &mut s, &input(10, 2 * GIB, Some(sample(0, 10, 5))));
    assert_eq!(d, Decision::Hold);
    // The same sample 6 s old (three 2 s intervals) still counts.
    let d = decide(&c, &mut s, &input(6, 2 * GIB, Some(sample(0, 10, 5))));
    assert!(matches!(
        target_of(&d),
        Some((_, ResizeReason::LowAvailable))
    ));
}

#[test]
fn growth_jumps_to_the_need() {
    let c = config("auto,min=1G,max=8G");
    let mut s = PolicyState::default();
    // 2 GiB total, 300 MiB available: used = 1748 MiB; need = used + 256 + 512 = 2516 MiB,
    // rounded up to 2560 MiB.
    let d = decide(&c, &mut s, &input(0, 2 * GIB, Some(sample(0, 300, 100))));
    let Decision::Resize {
        target,
        reason,
        limit,
        evidence,
    } = d
    else {
        panic!("{d:?}")
    };
    assert_eq!(
        (target, reason, limit),
        (2560 * MIB, ResizeReason::LowAvailable, None)
    );
    let g = evidence.guest.unwrap();
    assert_eq!(
        (g.used, g.available, g.reclaimable),
        (1748 * MIB, 300 * MIB, 200 * MIB)
    );
    // The planner has not got there yet: the same need is not asked again.
    let d = decide(&c, &mut s, &input(1, 2 * GIB, Some(sample(1, 300, 100))));
    assert_eq!(d, Decision::Hold);
    // The guest kept allocating: a bigger need (1948 + 768 MiB) is asked at once, interval
    // or not.
    let d = decide(&c, &mut s, &input(2, 2 * GIB, Some(sample(2, 100, 50))));
    assert_eq!(
        target_of(&d),
        Some((2816 * MIB, ResizeReason::LowAvailable))
    );
    // More than max: max, and it says so.
    let mut s = PolicyState::default();
    let d = decide(
        &c,
        &mut s,
        &input(0, 8 * GIB - 512 * MIB, Some(sample(0, 10, 10))),
    );
    assert!(matches!(
        d,
        Decision::Resize {
            target,
            limit: Some(Limit::Max),
            ..
        } if target == 8 * GIB
    ));
    // At max and still short: hold, never shrink.
    let d = decide(&c, &mut s, &input(60, 8 * GIB, Some(sample(60, 10, 10))));
    assert_eq!(d, Decision::Hold);
}

#[test]
fn counters_oom_stalls_and_faults() {
    let c = config("auto,min=1G,max=8G,fault-rate=100");
    let mut s = PolicyState::default();
    // The first sample is the baseline: 5 OOM kills since boot are not news.
    let mut first = sample(0, 2000, 1500);
    first.oom_kills = Some(5);
    first.alloc_stalls = Some(9);
    let d = decide(&c, &mut s, &input(0, 4 * GIB, Some(first)));
    assert_eq!(d, Decision::Hold);
    // A new OOM kill with plenty available (the kill freed it): grow by the margin anyway.
    let mut next = first;
    next.at = secs(2);
    next.oom_kills = Some(6);
    let d = decide(&c, &mut s, &input(2, 4 * GIB, Some(next)));
    assert_eq!(
        target_of(&d),
        Some((4 * GIB + 512 * MIB, ResizeReason::OomKills))
    );
    // Stalls while plenty is available are the cache's business: hold.
    let mut s = PolicyState::default();
    decide(&c, &mut s, &input(0, 4 * GIB, Some(first)));
    let mut stalled = first;
    stalled.at = secs(2);
    stalled.alloc_stalls = Some(20);
    assert_eq!(
        decide(&c, &mut s, &input(2, 4 * GIB, Some(stalled))),
        Decision::Hold
    );
    // Stalls while short (available 600 MiB < floor + margin, but above floor + headroom).
    let mut short = sample(4, 600, 50);
    short.alloc_stalls = Some(25);
    let d = decide(&c, &mut s, &input(4, 4 * GIB, Some(short)));
    assert!(matches!(target_of(&d), Some((t, ResizeReason::ReclaimStalls)) if t > 4 * GIB));
    // Direct reclaim alone (bytes, no stall count) is a stall too.
    let mut s = PolicyState::default();
    decide(&c, &mut s, &input(0, 4 * GIB, Some(sample(0, 600, 50))));
    let mut direct = sample(2, 600, 50);
    direct.direct_reclaim = Some(4096);
    let d = decide(&c, &mut s, &input(2, 4 * GIB, Some(direct)));
    assert!(
        matches!(target_of(&d), Some((_, ResizeReason::ReclaimStalls))),
        "{d:?}"
    );
    // A major fault burst while short: 400 faults in 2 s = 200/s >= 100/s.
    let mut s = PolicyState::default();
    decide(&c, &mut s, &input(0, 4 * GIB, Some(sample(0, 600, 50))));
    let mut faults = sample(2, 600, 50);
    faults.major_faults = Some(400);
    let d = decide(&c, &mut s, &input(2, 4 * GIB, Some(faults)));
    assert!(matches!(
        target_of(&d),
        Some((_, ResizeReason::MajorFaultBurst))
    ));
    // A counter going back (guest reboot) is not an increase.
    let mut s = PolicyState::default();
    decide(&c, &mut s, &input(0, 4 * GIB, Some(first)));
    let mut rebooted = first;
    rebooted.at = secs(2);
    rebooted.oom_kills = Some(0);
    assert_eq!(
        decide(&c, &mut s, &input(2, 4 * GIB, Some(rebooted))),
        Decision::Hold
    );
}

#[test]
fn shrink_waits_for_the_hold_and_steps() {
    let c = config("auto,min=1G,max=8G");
    let mut s = PolicyState::default();
    // 4 GiB, 3 GiB free: surplus. Nothing for 30 s, then 256 MiB per 2 s.
    let mut decisions = Vec::new();
    let mut total = 4 * GIB;
    for t in (0..=60).step_by(2) {
        let free = total.saturating_sub(GIB) / MIB;
        let d = decide(&c, &mut s, &input(t, total, Some(sample(t, free, free))));
        if let Some((target, reason)) = target_of(&d) {
            assert_eq!(reason, ResizeReason::SustainedSurplus);
            assert!(t >= 30, "shrank at {t} s");
            assert_eq!(total - target, 256 * MIB);
            decisions.push((t, target));
            total = target;
        }
    }
    assert_eq!(decisions.first().map(|d| d.0), Some(30));
    // Free stops at floor + margin above the 1 GiB the guest uses: 2 GiB total.
    assert_eq!(total, 2 * GIB);
    assert_eq!(decisions.len(), 8);
}

#[test]
fn the_last_block_above_min_goes_back() {
    // A 1 GiB guest one block above min, after a workload: 1152 MiB total, about 1000 MiB
    // free. Free can never pass floor + margin + band (1 GiB), but the 128 MiB to min can
    // go: after it, 872 MiB stay free, more than floor + margin (768 MiB).
    let c = config("auto,min=1G,max=4G");
    let mut s = PolicyState::default();
    let total = 1152 * MIB;
    let mut shrank = None;
    for t in (0..=40).step_by(2) {
        let d = decide(&c, &mut s, &input(t, total, Some(sample(t, 1010, 1000))));
        if let Some(change) = target_of(&d) {
            shrank = Some((t, change));
            break;
        }
    }
    assert_eq!(
        shrank,
        Some((30, (GIB, ResizeReason::SustainedSurplus))),
        "held for 30 s, then back to min"
    );
    // The same guest with only 850 MiB free keeps its block: 128 MiB less would leave 722,
    // below floor + margin.
    let mut s = PolicyState::default();
    for t in (0..=60).step_by(2) {
        let d = decide(&c, &mut s, &input(t, total, Some(sample(t, 860, 850))));
        assert_eq!(target_of(&d), None, "shrank at {t} s with 850 MiB free");
    }
}

#[test]
fn host_pressure_takes_the_cache_but_not_the_floor() {
    let c = config("auto,min=1G,max=8G");
    let pressed = HostPressure {
        psi: Some(MemoryPsi {
            some_avg10: 2500,
            full_avg10: 0,
        }),
        mem_available: Some(8 * GIB),
    };
    let mut s = PolicyState::default();
    // 6 GiB: 1 GiB used, 4 GiB cache, 1 GiB free. Normal mode keeps the cache.
    let g = |t| sample(t, 5 * 1024, 1024);
    for t in (0..=60).step_by(2) {
        assert_eq!(
            decide(&c, &mut s, &input(t, 6 * GIB, Some(g(t)))),
            Decision::Hold
        );
    }
    // Pressure: 1 GiB per interval, no hold, down to used + floor = 1.25 GiB.
    let mut total = 6 * GIB;
    let mut steps = Vec::new();
    for t in (62..=80).step_by(2) {
        let available = (total - GIB) / MIB;
        let mut i = input(t, total, Some(sample(t, available, available.min(1024))));
        i.host = Some(pressed);
        if let Some((target, reason)) = target_of(&decide(&c, &mut s, &i)) {
            assert_eq!(reason, ResizeReason::HostPressure);
            steps.push(total - target);
            total = target;
        }
    }
    assert_eq!(steps, vec![GIB, GIB, GIB, GIB, 768 * MIB]);
    assert_eq!(total, GIB + 256 * MIB);
    // PSI at 6 % is below the entry threshold but above half of it: still pressure.
    let mut i = input(82, total, Some(sample(82, 256, 200)));
    i.host = Some(HostPressure {
        psi: Some(MemoryPsi {
            some_avg10: 600,
            full_avg10: 0,
        }),
        mem_available: Some(8 * GIB),
    });
    assert_eq!(decide(&c, &mut s, &i), Decision::Hold);
    // Pressure gone: the guest gets its margin back in one grow (1 GiB used + 768 MiB).
    let d = decide(&c, &mut s, &input(84, total, Some(sample(84, 256, 200))));
    assert_eq!(
        target_of(&d),
        Some((1792 * MIB, ResizeReason::LowAvailable))
    );
}

#[test]
fn host_low_memory_is_pressure_too() {
    let c = config("auto,min=1G,max=8G,host-low=1G");
    let mut s = PolicyState::default();
    let mut i = input(0, 4 * GIB, Some(sample(0, 2048, 512)));
    i.host = Some(HostPressure {
        psi: None,
        mem_available: Some(900 * MIB),
    });
    let d = decide(&c, &mut s, &i);
    assert_eq!(target_of(&d), Some((3 * GIB, ResizeReason::HostPressure)));
    // host-low=0 turns the check off.
    let c = config("auto,min=1G,max=8G,host-low=0");
    let mut s = PolicyState::default();
    assert_eq!(decide(&c, &mut s, &i), Decision::Hold);
    // So do psi-some=0 and psi-full=0, whatever the PSI.
    i.host = Some(HostPressure {
        psi: Some(MemoryPsi {
            some_avg10: 9000,
            full_avg10: 9000,
        }),
        mem_available: None,
    });
    let c = config("auto,min=1G,max=8G,psi-some=0,psi-full=0");
    let mut s = PolicyState::default();
    assert_eq!(decide(&c, &mut s, &i), Decision::Hold);
    let c = config("auto,min=1G,max=8G,psi-some=0");
    let mut s = PolicyState::default();
    assert!(matches!(
        target_of(&decide(&c, &mut s, &i)),
        Some((_, ResizeReason::HostPressure))
    ));
}

// ---------------------------------------------------------------------------------------------
// Traces through a simulated guest.

/// One phase of a workload, as `memphase` takes them.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Anonymous memory grows linearly to `to` MiB over `secs`.
    Ramp { to: u64, secs: u64 },
    /// Nothing changes.
    Hold { secs: u64 },
    /// All anonymous memory is freed.
    Release,
    /// Anonymous memory grows by `add` MiB over `secs` (1 s: faster than the interval).
    Burst { add: u64, secs: u64 },
    /// The page cache fills up to `to` MiB over `secs` (file reads).
    Cache { to: u64, secs: u64 },
    /// Anonymous memory jitters by ±`by` MiB every 3 s for `secs`.
    Jitter { by: u64, secs: u64 },
    /// The host is under pressure (PSI some avg10 25 %) for `secs`.
    HostPressure { secs: u64 },
}

/// What the workload wants at one second.
#[derive(Clone, Copy, Debug, Default)]
struct Want {
    anon: u64,
    cache: u64,
    host_pressure: bool,
}

/// One workload second per entry.
fn expand(phases: &[Phase]) -> Vec<Want> {
    let mut out = Vec::new();
    let mut w = Want::default();
    for phase in phases {
        match *phase {
            Phase::Ramp { to, secs } | Phase::Cache { to, secs } => {
                let cache = matches!(phase, Phase::Cache { .. });
                let from = if cache { w.cache } else { w.anon };
                for i in 1..=secs {
                    let v =
                        (from as i64 + (to as i64 - from as i64) * i as i64 / secs as i64) as u64;
                    if cache {
                        w.cache = v * MIB;
                    } else {
                        w.anon = v * MIB;
                    }
                    out.push(w);
                }
                if cache {
                    w.cache = to * MIB;
                } else {
                    w.anon = to * MIB;
                }
            }
            Phase::Hold { secs } => out.extend(std::iter::repeat_n(w, secs as usize)),
            Phase::Release => w.anon = 0,
            Phase::Burst { add, secs } => {
                let from = w.anon;
                for i in 1..=secs {
                    w.anon = from + add * MIB * i / secs;
                    out.push(w);
                }
            }
            Phase::Jitter { by, secs } => {
                let base = w.anon;
                for i in 0..secs {
                    w.anon = match (i / 3) % 4 {
                        0 => base,
                        1 => base + by * MIB,
                        2 => base,
                        _ => base.saturating_sub(by * MIB),
                    };
                    out.push(w);
                }
                w.anon = base;
            }
            Phase::HostPressure { secs } => {
                w.host_pressure = true;
                out.extend(std::iter::repeat_n(w, secs as usize));
                w.host_pressure = false;
            }
        }
    }
    out
}

/// Memory the simulated kernel keeps for itself (never available).
const KERNEL: u64 = 96 * MIB;

/// A guest whose memory is anonymous memory, page cache and free memory; the planner
/// carries out a target `lag` seconds after the decision.
struct SimGuest {
    total: u64,
    anon: u64,
    cache: u64,
    oom_kills: u64,
    alloc_stalls: u64,
    major_faults: u64,
    /// Seconds in which the workload asked for memory and did not get all of it.
    failed: u64,
}

impl SimGuest {
    fn capacity(&self) -> u64 {
        self.total - KERNEL
    }

    fn free(&self) -> u64 {
        self.capacity() - self.anon - self.cache
    }

    fn available(&self) -> u64 {
        self.free() + self.cache
    }

    fn step(&mut self, want: &Want) {
        let capacity = self.capacity();
        if want.anon > self.anon {
            let extra = want.anon - self.anon;
            if extra > self.free() {
                // The allocation has to reclaim cache synchronously.
                self.alloc_stalls += 1;
            }
            let grant = extra.min(capacity - self.anon);
            if grant < extra {
                self.failed += 1;
                self.oom_kills += 1;
            }
            self.anon += grant;
            self.cache = self.cache.min(capacity - self.anon);
        } else {
            self.anon = want.anon;
        }
        // The cache refills toward what the workload reads, 256 MiB/s, into free memory;
        // what it cannot hold is read again (major faults, 4 KiB each).
        self.cache = (self.cache + 256 * MIB)
            .min(want.cache)
            .min(capacity - self.anon);
        self.major_faults += want.cache.saturating_sub(self.cache) / 4096 / 16;
    }

    fn sample(&self, at: u64) -> GuestSample {
        GuestSample {
            at: secs(at),
            available: self.available(),
            free: self.free(),
            caches: Some(self.cache),
            major_faults: Some(self.major_faults),
            oom_kills: Some(self.oom_kills),
            alloc_stalls: Some(self.alloc_stalls),
            direct_scan: None,
            direct_reclaim: None,
        }
    }
}

/// One policy call in a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tick {
    t: u64,
    total: u64,
    available: u64,
    free: u64,
    pressure: bool,
    decision: Decision,
    /// The total the planner is heading to after this decision.
    intended: u64,
}

struct Run {
    ticks: Vec<Tick>,
    /// Per second: (available, total, intended) after the workload step.
    seconds: Vec<(u64, u64, u64)>,
    failed: u64,
}

fn replay(c: &PolicyConfig, phases: &[Phase], start_total: u64, lag: u64) -> Run {
    let wants = expand(phases);
    let mut guest = SimGuest {
        total: start_total,
        anon: 0,
        cache: 0,
        oom_kills: 0,
        alloc_stalls: 0,
        major_faults: 0,
        failed: 0,
    };
    let mut state = PolicyState::default();
    let interval = c.interval.as_secs();
    // Targets the planner is carrying out, in order, with when each is done.
    let mut pending: std::collections::VecDeque<(u64, u64)> = Default::default();
    let mut intended = start_total;
    let mut run = Run {
        ticks: Vec::new(),
        seconds: Vec::new(),
        failed: 0,
    };
    for (t, want) in wants.iter().enumerate() {
        let t = t as u64;
        while let Some(&(at, target)) = pending.front() {
            if t < at {
                break;
            }
            guest.total = target;
            guest.anon = guest.anon.min(guest.capacity());
            guest.cache = guest.cache.min(guest.capacity() - guest.anon);
            pending.pop_front();
        }
        guest.step(want);
        run.seconds.push((guest.available(), guest.total, intended));
        if t.is_multiple_of(interval) {
            let host = HostPressure {
                psi: Some(MemoryPsi {
                    some_avg10: if want.host_pressure { 2500 } else { 0 },
                    full_avg10: 0,
                }),
                mem_available: Some(16 * GIB),
            };
            let input = Inputs {
                now: secs(t),
                current_total: guest.total,
                guest: Some(guest.sample(t)),
                reported_free_since_last: 0,
                host: Some(host),
            };
            let (available, free) = (guest.available(), guest.free());
            let decision = decide(c, &mut state, &input);
            if let Decision::Resize { target, .. } = decision {
                intended = target;
                if lag == 0 {
                    guest.total = target;
                    guest.anon = guest.anon.min(guest.capacity());
                    guest.cache = guest.cache.min(guest.capacity() - guest.anon);
                } else {
                    pending.push_back((t + lag, target));
                }
            }
            run.ticks.push(Tick {
                t,
                total: input.current_total,
                available,
                free,
                pressure: want.host_pressure,
                decision,
                intended,
            });
        }
    }
    run.failed = guest.failed;
    run
}

/// What a replay showed, checked against the policy's promises.
#[derive(Debug, Default)]
struct Summary {
    grows: usize,
    shrinks: usize,
    direction_changes: usize,
    worst_reaction_s: u64,
    largest_shrink_step: u64,
    largest_pressure_step: u64,
    failed_seconds: u64,
}

fn check(c: &PolicyConfig, run: &Run) -> Summary {
    let mut summary = Summary {
        failed_seconds: run.failed,
        ..Summary::default()
    };
    let mut last_direction: Option<bool> = None;
    let mut last_shrink_at: Option<u64> = None;
    let shrink_threshold = c.floor + c.growth_margin + c.band;
    let mut surplus_since: Option<u64> = None;
    for tick in &run.ticks {
        // The test's own count of how long free memory has been above the threshold.
        if tick.free > shrink_threshold && !tick.pressure {
            surplus_since.get_or_insert(tick.t);
        } else {
            surplus_since = None;
        }
        let used = tick.total - tick.available;
        if let Decision::Resize { target, reason, .. } = tick.decision {
            assert!(
                (c.min..=c.max).contains(&target) && target.is_multiple_of(POLICY_ALIGN),
                "{tick:?}"
            );
            let grows = target > tick.total;
            assert_eq!(grows, reason.grows(), "{tick:?}");
            if last_direction.is_some_and(|d| d != grows) {
                summary.direction_changes += 1;
            }
            last_direction = Some(grows);
            if grows {
                summary.grows += 1;
                surplus_since = None;
            } else {
                summary.shrinks += 1;
                let step = tick.total - target;
                if let Some(at) = last_shrink_at {
                    assert!(tick.t - at >= c.interval.as_secs(), "{tick:?}");
                }
                last_shrink_at = Some(tick.t);
                match reason {
                    ResizeReason::SustainedSurplus => {
                        assert!(step <= c.shrink_step, "{tick:?}");
                        let held = surplus_since.map(|s| tick.t - s);
                        assert!(
                            held.is_some_and(|h| h >= c.shrink_hold.as_secs()),
                            "shrank after a surplus of {held:?} s: {tick:?}"
                        );
                        summary.largest_shrink_step = summary.largest_shrink_step.max(step);
                    }
                    ResizeReason::HostPressure => {
                        assert!(tick.pressure && step <= c.pressure_step, "{tick:?}");
                        summary.largest_pressure_step = summary.largest_pressure_step.max(step);
                    }
                    _ => panic!("unexpected shrink {tick:?}"),
                }
            }
        }
        // No decision leaves the guest below its floor when max allowed more.
        assert!(
            tick.intended >= used + c.floor || tick.intended == c.max,
            "floor broken after {tick:?} (used {used})"
        );
    }
    // Growth reacts within one interval of the guest running short.
    let interval = c.interval.as_secs();
    let low = c.floor + c.headroom;
    let mut episode_start: Option<u64> = None;
    for (t, &(available, _total, intended)) in run.seconds.iter().enumerate() {
        let t = t as u64;
        let pressure = run
            .ticks
            .iter()
            .rev()
            .find(|k| k.t <= t)
            .is_some_and(|k| k.pressure);
        if available < low && intended < c.max && !pressure {
            let start = *episode_start.get_or_insert(t);
            let answered = run.ticks.iter().find(|k| {
                k.t >= start
                    && matches!(k.decision, Decision::Resize { reason, .. } if reason.grows())
            });
            let reaction = answered.map(|k| k.t - start);
            // An episode answered by a grow whose target is not reached yet is still open.
            if reaction.is_some_and(|r| r <= interval) {
                summary.worst_reaction_s = summary.worst_reaction_s.max(reaction.unwrap_or(0));
            } else {
                panic!("short from {start} s, no grow within {interval} s: {reaction:?}");
            }
        } else {
            episode_start = None;
        }
    }
    summary
}

fn brief_trace() -> Vec<Phase> {
    // memphase ramp:3072:30 hold:20 release idle:60 burst:1024:2 hold:10 release idle:90
    vec![
        Phase::Ramp { to: 3072, secs: 30 },
        Phase::Hold { secs: 20 },
        Phase::Release,
        Phase::Hold { secs: 60 },
        Phase::Burst { add: 1024, secs: 2 },
        Phase::Hold { secs: 10 },
        Phase::Release,
        Phase::Hold { secs: 90 },
    ]
}

#[test]
fn trace_ramp_hold_release_burst() {
    let c = config("auto,min=1G,max=8G");
    for lag in [0, 3] {
        let run = replay(&c, &brief_trace(), GIB, lag);
        let s = check(&c, &run);
        println!("ramp/burst trace, planner lag {lag} s: {s:?}");
        // Up during the ramp and the burst, down after each release: three turns, no more
        // (a slow planner may not have shrunk far enough for the burst to need a grow).
        if lag == 0 {
            assert_eq!(s.direction_changes, 3, "{s:?}");
        } else {
            assert!((1..=3).contains(&s.direction_changes), "{s:?}");
        }
        assert!(s.grows >= 2 && s.shrinks >= 2, "{s:?}");
        assert_eq!(s.largest_shrink_step, c.shrink_step, "{s:?}");
        // Neither the ramp (100 MiB/s) nor the burst (512 MiB/s, from a guest left with
        // floor + margin) outruns the margin between two ticks.
        assert_eq!(s.failed_seconds, 0, "{s:?}");
        // Idle at the end: back to min.
        let last = run.ticks.last().unwrap();
        assert_eq!(last.intended, c.min, "{last:?}");
    }
    // A slow ramp alone never fails an allocation.
    let run = replay(
        &c,
        &[Phase::Ramp { to: 3072, secs: 30 }, Phase::Hold { secs: 10 }],
        GIB,
        0,
    );
    assert_eq!(run.failed, 0);
    check(&c, &run);
}

#[test]
fn trace_jitter_does_not_oscillate() {
    let c = config("auto,min=1G,max=8G");
    let phases = [
        Phase::Ramp { to: 2048, secs: 20 },
        Phase::Jitter { by: 200, secs: 180 },
    ];
    let run = replay(&c, &phases, GIB, 0);
    let s = check(&c, &run);
    println!("jitter trace: {s:?}");
    assert_eq!(s.direction_changes, 0, "{s:?}");
    assert_eq!(s.shrinks, 0, "{s:?}");
    // After the first jitter period nothing more is asked.
    let late = run
        .ticks
        .iter()
        .filter(|k| k.t > 40 && k.decision != Decision::Hold)
        .count();
    assert_eq!(late, 0);
}

#[test]
fn trace_host_pressure_episode() {
    let c = config("auto,min=1G,max=8G");
    let phases = [
        Phase::Ramp { to: 512, secs: 4 },
        Phase::Cache { to: 2560, secs: 10 },
        Phase::Hold { secs: 40 },
        Phase::HostPressure { secs: 30 },
        Phase::Hold { secs: 60 },
    ];
    let run = replay(&c, &phases, 4 * GIB, 0);
    let s = check(&c, &run);
    println!("host pressure trace: {s:?}");
    // Nothing before the pressure: the cache is not surplus.
    assert!(run
        .ticks
        .iter()
        .filter(|k| !k.pressure && k.t < 54)
        .all(|k| k.decision == Decision::Hold));
    // Under pressure: down in steps of at most pressure-step, to used + floor.
    let pressure_targets: Vec<u64> = run
        .ticks
        .iter()
        .filter_map(|k| match k.decision {
            Decision::Resize {
                target,
                reason: ResizeReason::HostPressure,
                ..
            } => Some(target),
            _ => None,
        })
        .collect();
    assert_eq!(pressure_targets, vec![3 * GIB, 2 * GIB, GIB]);
    assert_eq!(s.largest_pressure_step, GIB);
    // After it, one grow back to the margin; shrink, grow: one turn.
    assert_eq!(s.direction_changes, 1, "{s:?}");
    assert_eq!(s.grows, 1, "{s:?}");
}

#[test]
fn trace_beyond_max() {
    // The workload wants 3 GiB; the VM may have 2 GiB. The policy goes to max at once and
    // stays there: no shrink while the guest is short, no target above max.
    let c = config("auto,min=1G,max=2G");
    let phases = [
        Phase::Ramp { to: 3072, secs: 20 },
        Phase::Hold { secs: 60 },
        Phase::Release,
        Phase::Hold { secs: 60 },
    ];
    let run = replay(&c, &phases, GIB, 0);
    let s = check(&c, &run);
    println!("beyond-max trace: {s:?}");
    assert!(
        run.failed > 0,
        "the workload cannot fit: allocations must fail"
    );
    assert_eq!(s.direction_changes, 1, "{s:?}");
    // At max from the second grow until the release (t = 80 s), holding although short.
    let reached = run
        .ticks
        .iter()
        .position(|k| k.intended == c.max)
        .expect("never reached max");
    let until_release = run.ticks[reached + 1..].iter().take_while(|k| k.t < 80);
    for k in until_release {
        assert!(k.intended == c.max && k.decision == Decision::Hold, "{k:?}");
        // Once the ramp has filled it (20 s), the guest is short all along.
        assert!(
            k.t < 20 || k.available < c.floor + c.headroom,
            "not short: {k:?}"
        );
    }
    assert_eq!(run.ticks.last().map(|k| k.intended), Some(GIB));
}

#[test]
fn replays_are_deterministic() {
    let c = config("auto,min=1G,max=8G");
    let a = replay(&c, &brief_trace(), GIB, 2);
    let b = replay(&c, &brief_trace(), GIB, 2);
    assert_eq!(a.ticks, b.ticks);
    assert!(a.ticks.iter().any(|k| k.decision != Decision::Hold));
}

#[test]
fn autopilot_tick_reads_the_balloon_status() {
    use crate::devices::virtio::balloon::StatsSnapshot;
    let mut values = BTreeMap::new();
    values.insert("available_memory".to_string(), 100 * MIB);
    values.insert("free_memory".to_string(), 50 * MIB);
    let status = BalloonStatus {
        target_bytes: 0,
        actual_bytes: 0,
        inflated_bytes: 0,
        discarded_bytes: 0,
        reported_free_bytes: 64 * MIB,
        bad_pfns: 0,
        discard_syscalls: 0,
        discard_time: Duration::ZERO,
        acked_features: 0,
        reporting_queue: None,
        stats: Some(StatsSnapshot {
            age: secs(1),
            values,
            stale: false,
            inconsistencies: Vec::new(),
        }),
        reused: Default::default(),
    };
    let mut pilot = Autopilot::new(config("auto,min=1G,max=8G"));
    let d = pilot.tick(secs(10), 2 * GIB, Some(&status), None);
    let Decision::Resize {
        target, evidence, ..
    } = d
    else {
        panic!("{d:?}")
    };
    // used = 2048 - 100 = 1948 MiB; + 768 = 2716 -> 2816 MiB.
    assert_eq!(target, 2816 * MIB);
    let g = evidence.guest.unwrap();
    assert_eq!(g.age, secs(1));
    // The first call only learns the reporting counter.
    assert_eq!(evidence.reported_free_since_last, 0);
    let mut later = status.clone();
    later.reported_free_bytes = 192 * MIB;
    if let Some(stats) = later.stats.as_mut() {
        stats.age = secs(2);
        stats
            .values
            .insert("available_memory".to_string(), 10 * MIB);
    }
    // The planner reached 2816 MiB and the guest used it all: 2806 + 768 MiB.
    let Decision::Resize {
        target, evidence, ..
    } = pilot.tick(secs(12), 2816 * MIB, Some(&later), None)
    else {
        panic!("expected a bigger grow")
    };
    assert_eq!(target, 3584 * MIB);
    assert_eq!(evidence.reported_free_since_last, 128 * MIB);
    // The same statistics a moment later, with the clock reads a few microseconds apart:
    // one sample, still judged by its arrival; and an idle guest whose values do not change
    // still sends fresh samples.
    let mut idle = Autopilot::new(config("auto,min=1G,max=8G"));
    let mut quiet = status.clone();
    if let Some(stats) = quiet.stats.as_mut() {
        stats.values.insert("available_memory".to_string(), 4 * GIB);
        stats.values.insert("free_memory".to_string(), 4 * GIB);
        stats.age = Duration::from_micros(1);
    }
    let mut last = Decision::Hold;
    for tick in 0..40u64 {
        if let Some(stats) = quiet.stats.as_mut() {
            // A new sample every 2 s; between them the same one, older.
            stats.age = Duration::from_millis((tick % 2) * 1000) + Duration::from_micros(tick);
        }
        last = idle.tick(secs(tick), 6 * GIB, Some(&quiet), None);
        if last != Decision::Hold {
            break;
        }
    }
    let Decision::Resize {
        reason, evidence, ..
    } = last
    else {
        panic!("an idle guest with fresh, unchanging statistics never shrank")
    };
    assert_eq!(reason, ResizeReason::SustainedSurplus);
    assert!(evidence.guest.unwrap().age < secs(2), "{evidence:?}");
    // No balloon: nothing to go by, and in range.
    let mut blind = Autopilot::new(config("auto,min=1G,max=8G"));
    assert_eq!(blind.tick(secs(1), 2 * GIB, None, None), Decision::Hold);
}
