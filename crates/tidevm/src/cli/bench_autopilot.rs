//! `tidevm bench autopilot`: a phased workload (memphase) in a real guest, once with static
//! sizing (all of `--max` from boot, a balloon for statistics only) and once under the
//! memory autopilot (boot with `--min`, virtio-mem up to `--max`, free page reporting for the
//! boot RAM the workload frees), with what the host paid for each.
//!
//! A sampler inside the lane records every second the VMM's RSS (as the VMM measures it), the
//! guest's total and available memory (its balloon statistics) and the guest-visible total;
//! the autopilot's decisions come from the event stream. The report gives, per mode:
//! - host memory over the run: the integral of the VMM's RSS (GiB·s) and its peak;
//! - what the guest really used: the integral of total − available, plus the policy's floor;
//! - OOM kills and failed allocations in the guest, seconds with available memory under the
//!   floor;
//! - how soon released memory came back: from the workload's first release until the RSS
//!   had fallen by 80 % of what it gained over the ready state.
//!
//! `--plot PATH` draws both runs (guest total, guest used, host RSS, decisions) as an SVG.

use std::time::Duration;

use clap::Args;
use plotters::prelude::*;
use serde_json::Value;
use tidevm_testlane::text::shell_quote;
use tidevm_testlane::{Guest, GuestOptions, Lane};

use super::bench::{boot_ready, one_line, CommonArgs, Metric, RunRecord, Unit};

/// Options of `tidevm bench autopilot`.
#[derive(Debug, Args)]
pub struct AutopilotArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// Boot memory under the autopilot, and its `min`.
    #[arg(long, default_value = "1G")]
    pub(super) min: String,
    /// Static sizing's boot memory, and the autopilot's `max`.
    #[arg(long, default_value = "3G")]
    pub(super) max: String,
    /// The memphase phases.
    #[arg(
        long,
        default_value = "ramp:1536:30 hold:20 release idle:40 burst:512:2 hold:10 release idle:40"
    )]
    pub(super) workload: String,
    /// The autopilot's floor (also what "under the floor" means for both modes).
    #[arg(long, default_value = "256M")]
    pub(super) floor: String,
    /// Where to draw the runs (SVG).
    #[arg(long)]
    pub(super) plot: Option<std::path::PathBuf>,
}

/// One second of a run.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    t: f64,
    rss: f64,
    guest_total: f64,
    guest_used: f64,
    available: f64,
}

/// A run's record.
#[derive(Debug, Default)]
struct Trace {
    samples: Vec<Sample>,
    /// (time, target MiB) of each autopilot decision.
    decisions: Vec<(f64, f64)>,
    /// Time of the workload's first release.
    first_release: Option<f64>,
    failed_allocs: Option<u64>,
    oom_kills: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn parse_json_after(line: &str, tag: &str) -> Option<Value> {
    let start = line.find(tag)? + tag.len();
    let rest = &line[start..];
    let end = rest.find(" @@").unwrap_or(rest.len());
    serde_json::from_str(rest[..end].trim()).ok()
}

/// Parses the sampler's lines: `S <t> B <balloon json> @@ M <memory json>`.
fn parse_samples(text: &str, t0: f64) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| {
            let t: f64 = line
                .strip_prefix("S ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let balloon = parse_json_after(line, " B ")?;
            let rss = balloon["host_rss"]["total_bytes"].as_f64()?;
            let values = &balloon["stats"]["values"];
            let total = values["total_memory"].as_f64().unwrap_or(0.0);
            let available = values["available_memory"].as_f64().unwrap_or(total);
            let guest_total = parse_json_after(line, " M ")
                .and_then(|m| m["actual_total_bytes"].as_f64())
                .unwrap_or(total);
            Some(Sample {
                t: t - t0,
                rss,
                guest_total,
                guest_used: (total - available).max(0.0),
                available,
            })
        })
        .collect()
}

fn integral(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> f64 {
    samples
        .windows(2)
        .map(|w| (w[1].t - w[0].t) * (value(&w[0]) + value(&w[1])) / 2.0)
        .sum()
}

/// Runs the workload in `guest` with the sampler and the event recorder; returns its trace.
fn record(lane: &Lane, guest: &Guest<'_>, args: &AutopilotArgs) -> Result<Trace, String> {
    let dir = format!("{}.bench", guest.api_socket());
    let ctl = format!(
        "{} ctl --api-socket {}",
        shell_quote(lane.lane_tidevm()),
        shell_quote(&guest.api_socket())
    );
    let start_sampler = format!(
        "mkdir -p {dir}; ({ctl} events > {dir}/events 2>&1 &)\n\
         (while kill -0 {pid} 2>/dev/null; do\n\
            t=$(cut -d' ' -f1 /proc/uptime)\n\
            b=$({ctl} balloon-stats 2>/dev/null | tr -d '\\n')\n\
            m=$({ctl} memory 2>/dev/null | tr -d '\\n')\n\
            echo \"S $t B $b @@ M $m\" >> {dir}/samples\n\
            sleep 1\n\
          done > /dev/null 2>&1 &)\n\
         cut -d' ' -f1 /proc/uptime",
        pid = guest.pid(),
    );
    let (rc, out) = lane
        .sh(&start_sampler, Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!("sampler did not start: {out}"));
    }
    let t0: f64 = out
        .trim()
        .parse()
        .map_err(|_| format!("bad uptime {out:?}"))?;
    guest
        .run(
            &format!("(memphase {} > /tmp/memphase.log 2>&1 &)", args.workload),
            Duration::from_secs(60),
        )
        .map_err(|e| one_line(&e))?;
    let started = std::time::Instant::now();
    let mut memphase = String::new();
    while started.elapsed() < Duration::from_secs(1800) {
        std::thread::sleep(Duration::from_secs(5));
        memphase = guest
            .run("cat /tmp/memphase.log", Duration::from_secs(60))
            .map_err(|e| one_line(&e))?;
        if memphase.contains("memphase done") {
            break;
        }
    }
    let oom = guest
        .run(
            "dmesg | grep -ciE 'out of memory|killed process' || true",
            Duration::from_secs(60),
        )
        .map_err(|e| one_line(&e))?;
    let (_, samples) = lane
        .sh(&format!("cat {dir}/samples"), Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    let (_, events) = lane
        .sh(&format!("cat {dir}/events"), Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    let samples = parse_samples(&samples, t0);
    // The VMM's event clock starts with the VMM, before t0: align on the first sample's RSS
    // is not possible, so decisions are placed by their order on the sampler's clock: the
    // event's ms since VMM start minus the VMM's age at t0.
    let vmm_age_at_t0 = {
        let (_, stat) = lane
            .sh(
                &format!(
                    "echo $(cut -d' ' -f22 /proc/{}/stat) $(getconf CLK_TCK 2>/dev/null || echo 100)",
                    guest.pid()
                ),
                Duration::from_secs(60),
            )
            .map_err(|e| one_line(&e))?;
        let mut words = stat.split_whitespace();
        let ticks: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
        let hz: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(100.0);
        t0 - ticks / hz
    };
    let decisions = events
        .lines()
        .filter(|l| l.contains("\"autopilot_decision\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| {
            Some((
                e["ms"].as_f64()? / 1000.0 - vmm_age_at_t0,
                e["target_bytes"].as_f64()? / MIB,
            ))
        })
        .collect();
    // memphase prints one line a second from its start; the first release is the first
    // line after a non-zero hold whose held is 0.
    let mut first_release = None;
    let mut held_before = 0u64;
    for (second, line) in memphase
        .lines()
        .filter(|l| l.contains(" held="))
        .enumerate()
    {
        let held: u64 = line
            .split("held=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if held == 0 && held_before > 0 {
            first_release = Some(second as f64);
            break;
        }
        held_before = held;
    }
    let failed_allocs = memphase
        .lines()
        .find_map(|l| l.split("failed_allocs=").nth(1))
        .and_then(|v| v.trim().parse().ok());
    Ok(Trace {
        samples,
        decisions,
        first_release,
        failed_allocs,
        oom_kills: oom.trim().parse().unwrap_or(0),
    })
}

/// Keys and labels of one mode's metrics, in the order `metrics_of` fills them.
type Names = [(&'static str, &'static str); 8];

const STATIC_NAMES: Names = [
    ("static_rss_gib_s", "static: host RSS over the run"),
    (
        "static_used_gib_s",
        "static: guest used + floor over the run (GiB·s)",
    ),
    (
        "static_rss_over_used",
        "static: RSS integral / (used + floor) integral",
    ),
    ("static_peak_rss", "static: peak host RSS"),
    ("static_oom_kills", "static: OOM kills in the guest"),
    (
        "static_failed_allocs",
        "static: failed allocations (memphase)",
    ),
    (
        "static_under_floor",
        "static: time with available under the floor",
    ),
    (
        "static_return",
        "static: release to 80 % of the memory back on the host",
    ),
];

const AUTOPILOT_NAMES: Names = [
    (
        "autopilot_rss_gib_s",
        "autopilot: host RSS over the run (GiB·s)",
    ),
    (
        "autopilot_used_gib_s",
        "autopilot: guest used + floor over the run (GiB·s)",
    ),
    (
        "autopilot_rss_over_used",
        "autopilot: RSS integral / (used + floor) integral",
    ),
    ("autopilot_peak_rss", "autopilot: peak host RSS"),
    ("autopilot_oom_kills", "autopilot: OOM kills in the guest"),
    (
        "autopilot_failed_allocs",
        "autopilot: failed allocations (memphase)",
    ),
    (
        "autopilot_under_floor",
        "autopilot: time with available under the floor",
    ),
    (
        "autopilot_return",
        "autopilot: release to 80 % of the memory back on the host",
    ),
];

fn metrics_of(names: &Names, trace: &Trace, floor: f64) -> Vec<Metric> {
    let s = &trace.samples;
    let gib_s = 1024.0 * MIB;
    let duration = s.last().map_or(0.0, |l| l.t) - s.first().map_or(0.0, |f| f.t);
    let rss_integral = integral(s, |x| x.rss) / gib_s;
    let used_integral = (integral(s, |x| x.guest_used) + floor * duration) / gib_s;
    let peak = s.iter().map(|x| x.rss).fold(0.0, f64::max);
    let baseline = s.first().map_or(0.0, |x| x.rss);
    let under_floor = s
        .windows(2)
        .filter(|w| w[0].available < floor)
        .map(|w| w[1].t - w[0].t)
        .sum::<f64>()
        + 0.0; // an empty sum is -0.0
               // Release: from the workload's first release (memphase clock ~ sampler clock) until RSS
               // fell by 80 % of its gain over the baseline.
    let returned = trace.first_release.and_then(|release| {
        let gain = peak - baseline;
        s.iter()
            .filter(|x| x.t >= release)
            .find(|x| x.rss <= peak - 0.8 * gain)
            .map(|x| x.t - release)
    });
    let values = [
        (Unit::GibSeconds, rss_integral),
        (Unit::GibSeconds, used_integral),
        (
            Unit::Ratio,
            if used_integral > 0.0 {
                rss_integral / used_integral
            } else {
                0.0
            },
        ),
        (Unit::Bytes, peak),
        (Unit::Count, trace.oom_kills as f64),
        (Unit::Count, trace.failed_allocs.map_or(-1.0, |f| f as f64)),
        (Unit::Seconds, under_floor),
    ];
    let mut out: Vec<Metric> = names
        .iter()
        .zip(values)
        .map(|(&(key, label), (unit, value))| Metric {
            key,
            label,
            unit,
            value,
        })
        .collect();
    if let Some(returned) = returned {
        out.push(Metric {
            key: names[7].0,
            label: names[7].1,
            unit: Unit::Seconds,
            value: returned,
        });
    }
    out
}

fn plot(path: &std::path::Path, runs: &[(&str, &Trace)]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 360 * runs.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((runs.len(), 1));
    for ((mode, trace), area) in runs.iter().zip(areas) {
        let t_max = trace.samples.last().map_or(1.0, |s| s.t).max(1.0);
        let y_max = trace
            .samples
            .iter()
            .map(|s| s.rss.max(s.guest_total) / MIB)
            .fold(256.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&area)
            .caption(*mode, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()
            .map_err(|e| err(&e))?;
        type Series = (&'static str, RGBColor, fn(&Sample) -> f64);
        let series: [Series; 3] = [
            ("guest total", BLUE, |s| s.guest_total / MIB),
            ("guest used", GREEN, |s| s.guest_used / MIB),
            ("host RSS", RED, |s| s.rss / MIB),
        ];
        for (name, color, value) in series {
            chart
                .draw_series(LineSeries::new(
                    trace.samples.iter().map(|s| (s.t, value(s))),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(
                trace
                    .decisions
                    .iter()
                    .map(|&(t, target)| Circle::new((t, target), 4, BLACK.filled())),
            )
            .map_err(|e| err(&e))?
            .label("autopilot decision (target)")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, BLACK.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

fn one_run(lane: &Lane, args: &AutopilotArgs) -> Result<(Vec<Metric>, Trace, Trace), String> {
    let parse = |v: &str| tidevm_api::parse_byte_size(v).ok_or_else(|| format!("invalid size {v}"));
    let (min, max, floor) = (parse(&args.min)?, parse(&args.max)?, parse(&args.floor)?);
    let static_guest = boot_ready(
        lane,
        &GuestOptions {
            memory: args.max.clone(),
            extra_args: ["--balloon", "stats-interval=1s"]
                .map(String::from)
                .to_vec(),
            ..GuestOptions::default()
        },
    )?;
    let static_trace = record(lane, &static_guest, args);
    let _ = static_guest.poweroff(Duration::from_secs(120));
    let static_trace = static_trace?;
    let policy = format!(
        "auto,min={},max={},floor={},interval=2s,shrink-hold=10s,shrink-step=512M",
        args.min, args.max, args.floor
    );
    let auto_guest = boot_ready(
        lane,
        &GuestOptions {
            memory: args.min.clone(),
            extra_args: vec![
                "--virtio-mem".into(),
                format!("id=mem0,size={}M", (max - min) >> 20),
                "--balloon".into(),
                // Boot RAM the workload frees comes back only through free page reporting.
                "stats-interval=1s,free-page-reporting=on".into(),
                "--memory-policy".into(),
                policy,
            ],
            ..GuestOptions::default()
        },
    )?;
    let auto_trace = record(lane, &auto_guest, args);
    let _ = auto_guest.poweroff(Duration::from_secs(120));
    let auto_trace = auto_trace?;
    let floor = floor as f64;
    let mut metrics = metrics_of(&STATIC_NAMES, &static_trace, floor);
    metrics.extend(metrics_of(&AUTOPILOT_NAMES, &auto_trace, floor));
    Ok((metrics, static_trace, auto_trace))
}

/// Runs both modes `runs` times; the last run is drawn.
pub(super) fn run(lane: &Lane, args: &AutopilotArgs) -> Vec<RunRecord> {
    let mut records = Vec::new();
    for run in 1..=args.common.runs {
        eprintln!("==== bench autopilot: run {run}/{} ====", args.common.runs);
        let mut notes = Vec::new();
        let result = one_run(lane, args).map(|(metrics, static_trace, auto_trace)| {
            if let (Some(path), true) = (&args.plot, run == args.common.runs) {
                match plot(
                    path,
                    &[("static sizing", &static_trace), ("autopilot", &auto_trace)],
                ) {
                    Ok(()) => notes.push(format!("plot: {}", path.display())),
                    Err(e) => notes.push(e),
                }
            }
            metrics
        });
        if let Err(e) = &result {
            eprintln!("bench autopilot: run {run} failed: {e}");
        }
        records.push(RunRecord { result, notes });
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_integrals_add_up() {
        let text = "S 100.0 B {\"host_rss\":{\"total_bytes\":1073741824},\"stats\":{\"values\":\
                    {\"total_memory\":2147483648,\"available_memory\":1073741824}}} @@ M \
                    {\"actual_total_bytes\":2147483648}\n\
                    noise\n\
                    S 102.0 B {\"host_rss\":{\"total_bytes\":1073741824},\"stats\":{\"values\":\
                    {\"total_memory\":2147483648,\"available_memory\":1073741824}}} @@ M {}\n";
        let samples = parse_samples(text, 100.0);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[1].t, 2.0);
        assert_eq!(samples[0].guest_used, 1024.0 * MIB);
        assert_eq!(integral(&samples, |s| s.rss) / (1024.0 * MIB), 2.0);
    }
}
