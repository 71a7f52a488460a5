//! `tidevm bench soak`: many resize cycles of every mechanism in one real guest, to show that
//! nothing fails, leaks or grows: failed requests, the VMM's RSS over the batches (its slope),
//! and its file descriptors and threads at the start and the end.
//!
//! Each run is one batch: `--mem-cycles` virtio-mem plug/unplug cycles, `--balloon-cycles`
//! inflate/deflate cycles and `--dimm-cycles` DIMM add/remove cycles, driven by a shell loop
//! inside the lane (one agent round trip per batch, so the lane's latency does not dominate).

use std::time::Duration;

use clap::Args;
use tidevm_testlane::{Guest, GuestOptions, L1Thp, Lane};

use super::bench::{boot_ready, failed_runs, one_line, run_rounds, CommonArgs, Metric, Unit};
use tidevm_testlane::text::shell_quote;

/// Options of `tidevm bench soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// virtio-mem plug/unplug cycles per batch (128 MiB each).
    #[arg(long, default_value_t = 50)]
    pub(super) mem_cycles: u32,
    /// Balloon inflate/deflate cycles per batch (64 MiB each).
    #[arg(long, default_value_t = 10)]
    pub(super) balloon_cycles: u32,
    /// DIMM add/remove cycles per batch (128 MiB each).
    #[arg(long, default_value_t = 10)]
    pub(super) dimm_cycles: u32,
}

/// What one batch printed.
#[derive(Debug, Default, PartialEq, Eq)]
struct BatchReport {
    failed: [u64; 3],
    rss_kib: u64,
    fds: u64,
    threads: u64,
    seconds: u64,
}

fn parse_report(output: &str) -> Result<BatchReport, String> {
    let mut report = BatchReport::default();
    let mut seen = 0;
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("bad soak line {line:?}"))
        };
        match words.first().copied() {
            Some("soak-failed") => {
                report.failed = [number(1)?, number(2)?, number(3)?];
                seen += 1;
            }
            Some("soak-vmm") => {
                report.rss_kib = number(1)?;
                report.fds = number(2)?;
                report.threads = number(3)?;
                seen += 1;
            }
            Some("soak-seconds") => {
                report.seconds = number(1)?;
                seen += 1;
            }
            _ => {}
        }
    }
    if seen == 3 {
        Ok(report)
    } else {
        Err(format!("incomplete soak report: {output:?}"))
    }
}

/// The batch as a shell script for the lane.
fn batch_script(guest: &Guest<'_>, tidevm: &str, args: &SoakArgs, run: u32) -> String {
    let ctl = format!(
        "{} ctl --api-socket {}",
        shell_quote(tidevm),
        shell_quote(&guest.api_socket())
    );
    format!(
        "start=$(cut -d. -f1 /proc/uptime)\n\
         fm=0; fb=0; fd=0\n\
         i=0; while [ $i -lt {mem} ]; do i=$((i+1))\n\
           {ctl} resize-mem mem0 128M --wait --timeout 120 >/dev/null 2>&1 || fm=$((fm+1))\n\
           {ctl} resize-mem mem0 0 --wait --timeout 240 >/dev/null 2>&1 || fm=$((fm+1))\n\
         done\n\
         i=0; while [ $i -lt {balloon} ]; do i=$((i+1))\n\
           {ctl} balloon 64M --wait --timeout 120 >/dev/null 2>&1 || fb=$((fb+1))\n\
           {ctl} balloon 0 --wait --timeout 120 >/dev/null 2>&1 || fb=$((fb+1))\n\
         done\n\
         i=0; while [ $i -lt {dimm} ]; do i=$((i+1))\n\
           {ctl} dimm-add 128M --id soak{run}x$i --wait --timeout 120 >/dev/null 2>&1 || fd=$((fd+1))\n\
           {ctl} dimm-del soak{run}x$i --wait --timeout 240 >/dev/null 2>&1 || fd=$((fd+1))\n\
         done\n\
         echo soak-failed $fm $fb $fd\n\
         echo soak-vmm $(awk '/VmRSS/{{print $2}}' /proc/{pid}/status) $(ls /proc/{pid}/fd | wc -l) $(ls /proc/{pid}/task | wc -l)\n\
         echo soak-seconds $(( $(cut -d. -f1 /proc/uptime) - start ))\n",
        mem = args.mem_cycles,
        balloon = args.balloon_cycles,
        dimm = args.dimm_cycles,
        pid = guest.pid(),
    )
}

/// Least-squares slope of `ys` over 0, 1, 2, ... (per batch).
fn slope(ys: &[f64]) -> Option<f64> {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return None;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (num, den) = ys
        .iter()
        .enumerate()
        .fold((0.0, 0.0), |(num, den), (x, y)| {
            let dx = x as f64 - mean_x;
            (num + dx * (y - mean_y), den + dx * dx)
        });
    Some(num / den)
}

/// Boots one guest with virtio-mem, a balloon and DIMM slots, and runs the batches.
pub(super) fn run(lane: &Lane, args: &SoakArgs) -> Vec<super::bench::RunRecord> {
    let runs = args.common.runs;
    let options = GuestOptions {
        memory: "512M,slots=2,maxmem=1G".into(),
        extra_args: [
            "--virtio-mem",
            "id=mem0,size=1G",
            "--balloon",
            "stats-interval=5s",
        ]
        .map(String::from)
        .to_vec(),
        // Balloon inflates after the guest touched memory need THP off in the nested lane;
        // without them the lane's default (on) makes virtio-mem unplugs about 4x faster.
        l1_thp: if args.balloon_cycles > 0 {
            L1Thp::Never
        } else {
            L1Thp::Always
        },
        ..GuestOptions::default()
    };
    let guest = match boot_ready(lane, &options) {
        Ok(guest) => guest,
        Err(e) => return failed_runs(runs, &e),
    };
    let tidevm = lane.lane_tidevm().to_owned();
    let cycles = u64::from(args.mem_cycles + args.balloon_cycles + args.dimm_cycles);
    let timeout = Duration::from_secs(120 + 20 * cycles);
    let mut rss = Vec::new();
    let mut records = run_rounds("soak", &[&guest], runs, |run| {
        let script = batch_script(&guest, &tidevm, args, run);
        let (rc, output) = lane.sh(&script, timeout).map_err(|e| one_line(&e))?;
        if rc != 0 {
            return Err(format!("soak batch failed ({rc}): {}", output.trim()));
        }
        let report = parse_report(&output)?;
        // As it comes: a long soak that is stopped early keeps what it measured.
        eprintln!(
            "soak batch {run}: failed {:?} (virtio-mem, balloon, DIMM), RSS {:.1} MiB, fds {}, \
             threads {}, {} s",
            report.failed,
            report.rss_kib as f64 / 1024.0,
            report.fds,
            report.threads,
            report.seconds
        );
        rss.push(report.rss_kib as f64 * 1024.0);
        let failed: u64 = report.failed.iter().sum();
        if failed > 0 {
            return Err(format!(
                "failed requests: virtio-mem {}, balloon {}, DIMM {}",
                report.failed[0], report.failed[1], report.failed[2]
            ));
        }
        let metric = |key, label, unit, value| Metric {
            key,
            label,
            unit,
            value,
        };
        Ok(vec![
            metric("failed", "failed requests", Unit::Count, failed as f64),
            metric(
                "rss",
                "tidevm RSS after the batch",
                Unit::Bytes,
                report.rss_kib as f64 * 1024.0,
            ),
            metric("fds", "tidevm open fds", Unit::Count, report.fds as f64),
            metric(
                "threads",
                "tidevm threads",
                Unit::Count,
                report.threads as f64,
            ),
            metric(
                "batch",
                "batch time (lane side)",
                Unit::Seconds,
                report.seconds as f64,
            ),
        ])
    });
    if let (Some(last), Some(per_batch)) = (records.last_mut(), slope(&rss)) {
        last.notes.push(format!(
            "RSS slope {:+.2} MiB per batch of {} cycles ({} batches; first {:.1} MiB, last {:.1} MiB)",
            per_batch / f64::from(1u32 << 20),
            cycles,
            rss.len(),
            rss.first().copied().unwrap_or(0.0) / f64::from(1u32 << 20),
            rss.last().copied().unwrap_or(0.0) / f64::from(1u32 << 20),
        ));
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_incomplete_ones_do_not() {
        let out = "noise\nsoak-failed 0 1 2\nsoak-vmm 150000 40 9\nsoak-seconds 77\n";
        assert_eq!(
            parse_report(out).unwrap(),
            BatchReport {
                failed: [0, 1, 2],
                rss_kib: 150000,
                fds: 40,
                threads: 9,
                seconds: 77
            }
        );
        assert!(parse_report("soak-failed 0 0 0\n").is_err());
        assert!(parse_report("soak-failed 0 x 0\nsoak-vmm 1 2 3\nsoak-seconds 1\n").is_err());
    }

    #[test]
    fn slope_of_a_line_and_of_flat_data() {
        assert_eq!(slope(&[1.0, 3.0, 5.0, 7.0]), Some(2.0));
        assert_eq!(slope(&[4.0, 4.0, 4.0]), Some(0.0));
        assert_eq!(slope(&[4.0]), None);
    }
}
