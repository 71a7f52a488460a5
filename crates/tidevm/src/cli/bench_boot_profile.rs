//! `tidevm bench boot-profile`: where a boot's time goes, from both sides.
//!
//! The guest boots with `initcall_debug` (its messages stay in the kernel's log buffer: they
//! are below the console's log level, so they cost no serial output) and the run reads, from
//! the guest's own `dmesg` timestamps: the kernel's time to `/init`, the init script's time to
//! the ready marker, the sum of all initcalls, the slowest initcalls and the longest gaps
//! between two log lines (a gap is where the kernel waited: a calibration, a probe timeout).
//! From the host side: the time from starting tidevm to the ready prompt, and the vCPU exits
//! by reason at that point (`GET /metrics`), since in a nested lane every exit is expensive.

use std::time::{Duration, Instant};

use clap::Args;
use tidevm_testlane::{GuestOptions, Lane};

use super::bench::{boot_ready, one_line, CommonArgs, Metric, RunRecord, Unit};

/// Options of `tidevm bench boot-profile`.
#[derive(Debug, Args)]
pub struct BootProfileArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// Appended to the guest's kernel command line (e.g. `tsc_early_khz=...`, to try a
    /// change before making it in tidevm).
    #[arg(long, default_value = "")]
    pub(super) cmdline: String,
    /// How many initcalls and gaps to list per run.
    #[arg(long, default_value_t = 8)]
    pub(super) top: usize,
    /// Write each run's guest log to this file (the last run's stays).
    #[arg(long)]
    pub(super) dmesg: Option<std::path::PathBuf>,
}

/// One line of `dmesg`: its timestamp in seconds and its text.
fn parse_dmesg_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    Some((stamp.trim().parse().ok()?, text.trim()))
}

/// `initcall NAME+0x0/0x40 returned 0 after 1234 usecs` as (NAME, seconds).
fn parse_initcall(text: &str) -> Option<(&str, f64)> {
    let rest = text.strip_prefix("initcall ")?;
    let (name, rest) = rest.split_once(' ')?;
    let usecs: f64 = rest
        .split_once(" after ")?
        .1
        .strip_suffix(" usecs")?
        .parse()
        .ok()?;
    Some((name.split('+').next().unwrap_or(name), usecs / 1e6))
}

/// What a guest's log says about its boot.
#[derive(Debug, Default, PartialEq)]
struct GuestTimeline {
    /// Kernel timestamp of `Run /init as init process`.
    init_at: Option<f64>,
    /// Kernel timestamp of the init script's last message before the ready marker.
    ready_at: Option<f64>,
    /// Every initcall's duration, slowest first.
    initcalls: Vec<(String, f64)>,
    /// Gaps between consecutive log lines: (seconds, the line after the gap), longest first.
    gaps: Vec<(f64, String)>,
}

fn guest_timeline(dmesg: &str) -> GuestTimeline {
    let mut timeline = GuestTimeline::default();
    let mut previous: Option<f64> = None;
    for (stamp, text) in dmesg.lines().filter_map(parse_dmesg_line) {
        if text.starts_with("Run /init as init process") {
            timeline.init_at.get_or_insert(stamp);
        }
        if text.contains("tidevm-guest: init script done") {
            timeline.ready_at = Some(stamp);
        }
        if let Some((name, seconds)) = parse_initcall(text) {
            timeline.initcalls.push((name.to_string(), seconds));
        }
        if let Some(before) = previous {
            timeline.gaps.push((stamp - before, text.to_string()));
        }
        previous = Some(stamp);
    }
    timeline
        .initcalls
        .sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    timeline.gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    timeline
}

/// `tidevm_vcpu_exits_total{reason="io"} 123` lines as (reason, count).
fn exits_by_reason(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("tidevm_vcpu_exits_total{"))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((reason.to_string(), count))
        })
        .collect()
}

fn profile_once(
    lane: &Lane,
    args: &BootProfileArgs,
    notes: &mut Vec<String>,
) -> Result<Vec<Metric>, String> {
    let options = GuestOptions {
        extra_cmdline: format!("initcall_debug log_buf_len=4M {}", args.cmdline)
            .trim()
            .to_string(),
        ..GuestOptions::default()
    };
    let started = Instant::now();
    let guest = boot_ready(lane, &options)?;
    let boot_host = started.elapsed().as_secs_f64();
    let (_, metrics_text) = guest.ctl(&["metrics"]).map_err(|e| one_line(&e))?;
    let dmesg = guest
        .run("dmesg", Duration::from_secs(120))
        .map_err(|e| one_line(&e))?;
    let _ = guest.poweroff(Duration::from_secs(60));
    if let Some(path) = &args.dmesg {
        if let Err(e) = std::fs::write(path, &dmesg) {
            notes.push(format!("could not write {}: {e}", path.display()));
        }
    }
    let timeline = guest_timeline(&dmesg);
    let (Some(init_at), Some(ready_at)) = (timeline.init_at, timeline.ready_at) else {
        return Err("the guest's log has no 'Run /init' or no 'init script done' line".into());
    };
    let mut metrics = vec![
        Metric {
            key: "boot_host",
            label: "tidevm start to the ready prompt (host side)",
            unit: Unit::Seconds,
            value: boot_host,
        },
        Metric {
            key: "kernel_to_init",
            label: "kernel clock start to /init (guest log)",
            unit: Unit::Seconds,
            value: init_at,
        },
        Metric {
            key: "init_to_ready",
            label: "/init to the ready marker (guest log)",
            unit: Unit::Seconds,
            value: ready_at - init_at,
        },
        Metric {
            key: "initcalls",
            label: "all initcalls together (guest log)",
            unit: Unit::Seconds,
            value: timeline.initcalls.iter().map(|(_, s)| s).sum(),
        },
    ];
    for (reason, count) in exits_by_reason(&metrics_text) {
        let key = match reason.as_str() {
            "io" => "exits_io",
            "mmio" => "exits_mmio",
            "hlt" => "exits_hlt",
            "interrupt" => "exits_interrupt",
            _ => continue,
        };
        metrics.push(Metric {
            key,
            label: "vCPU exits by the ready prompt",
            unit: Unit::Count,
            value: count,
        });
    }
    for (name, seconds) in timeline.initcalls.iter().take(args.top) {
        notes.push(format!("initcall {name}: {:.1} ms", seconds * 1e3));
    }
    for (seconds, line) in timeline.gaps.iter().take(args.top) {
        let line: String = line.chars().take(100).collect();
        notes.push(format!("gap of {:.1} ms before: {line}", seconds * 1e3));
    }
    Ok(metrics)
}

/// `tidevm bench boot-profile`.
pub fn run(lane: &Lane, args: &BootProfileArgs) -> Vec<RunRecord> {
    (1..=args.common.runs)
        .map(|run| {
            eprintln!(
                "==== bench boot-profile: run {run}/{} ====",
                args.common.runs
            );
            let mut notes = Vec::new();
            let result = profile_once(lane, args, &mut notes);
            if let Err(error) = &result {
                eprintln!("bench boot-profile: run {run} failed: {error}");
            }
            RunRecord { result, notes }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DMESG: &str = "\
[    0.000000] Linux version 6.12.118
[    0.010000] calling  tsc_init+0x0/0x40 @ 1
[    0.210000] initcall tsc_init+0x0/0x40 returned 0 after 200000 usecs
[    0.215000] calling  i8042_init+0x0/0x80 @ 1
[    0.315000] initcall i8042_init+0x0/0x80 returned -19 after 100000 usecs
[    0.900000] Run /init as init process
[    1.500000] tidevm-guest: init script done, starting the ttyS0 shell
";

    #[test]
    fn the_timeline_of_a_log() {
        let t = guest_timeline(DMESG);
        assert_eq!(t.init_at, Some(0.9));
        assert_eq!(t.ready_at, Some(1.5));
        assert_eq!(
            t.initcalls,
            vec![
                ("tsc_init".to_string(), 0.2),
                ("i8042_init".to_string(), 0.1)
            ]
        );
        let (longest, line) = &t.gaps[0];
        assert!((longest - 0.6).abs() < 1e-9);
        assert!(line.starts_with("tidevm-guest: init script done"));
        assert!(t.gaps.windows(2).all(|w| w[0].0 >= w[1].0));
    }

    #[test]
    fn exits_from_the_metrics_text() {
        let text = "# HELP tidevm_vcpu_exits_total exits\n\
                    tidevm_vcpu_exits_total{reason=\"io\"} 51234\n\
                    tidevm_vcpu_exits_total{reason=\"mmio\"} 77\n\
                    tidevm_api_requests_total{endpoint=\"x\"} 1\n";
        assert_eq!(
            exits_by_reason(text),
            vec![("io".to_string(), 51234.0), ("mmio".to_string(), 77.0)]
        );
    }

    #[test]
    fn lines_that_are_not_initcalls() {
        assert_eq!(parse_initcall("calling  foo+0x0/0x40 @ 1"), None);
        assert_eq!(parse_dmesg_line("no stamp"), None);
        assert_eq!(
            parse_initcall("initcall foo+0x0/0x4 returned 0 after x usecs"),
            None
        );
    }
}
