//! `tidevm bench boot-vs-ch`: tidevm and Cloud Hypervisor boot the same guest (kernel,
//! initramfs, command line, 1 vCPU, 512 MiB) one after the other in the same lane, run after
//! run, and the report gives each one's time from process start to the guest's first console
//! output and to its ready marker, and tidevm's time as a fraction of Cloud Hypervisor's.
//!
//! Both are measured the same way, inside the lane: a shell loop notes the lane's uptime when
//! it starts the VMM, when the serial log file first has bytes and when the ready marker is
//! in it (polling every 50 ms, so each figure is good to about 0.05 s). The VMM is killed as
//! soon as the marker is seen.

use std::time::Duration;

use clap::Args;
use tidevm_testlane::text::shell_quote;
use tidevm_testlane::{Lane, GUEST_READY};

use super::bench::{one_line, CommonArgs, Metric, RunRecord, Unit};

/// Options of `tidevm bench boot-vs-ch`.
#[derive(Debug, Args)]
pub struct BootVsArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// Kernel command line for both.
    #[arg(long, default_value = "console=ttyS0")]
    pub(super) cmdline: String,
}

/// (first output, ready) seconds after the VMM process started.
fn time_boot(lane: &Lane, command: &str, console: &str) -> Result<(f64, f64), String> {
    let script = format!(
        "c={console}; rm -f $c; : > $c.started\n\
         start=$(cut -d' ' -f1 /proc/uptime)\n\
         {command} > $c.vmm 2>&1 &\n\
         pid=$!\n\
         first=; ready=; i=0\n\
         while [ $i -lt 2400 ]; do\n\
           now=$(cut -d' ' -f1 /proc/uptime)\n\
           if [ -z \"$first\" ] && [ -s $c ]; then first=$now; fi\n\
           if [ -s $c ] && grep -q {marker} $c; then ready=$now; break; fi\n\
           sleep 0.05; i=$((i+1))\n\
         done\n\
         kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null\n\
         if [ -z \"$ready\" ]; then echo 'no ready marker:'; tail -5 $c $c.vmm; exit 1; fi\n\
         echo \"boot-times $start $first $ready\"\n",
        console = shell_quote(console),
        marker = GUEST_READY,
    );
    let (rc, output) = lane
        .sh(
            &script,
            lane.scaled(Duration::from_secs(60))
                .max(Duration::from_secs(240)),
        )
        .map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!("boot failed: {}", output.trim()));
    }
    let line = output
        .lines()
        .find(|l| l.starts_with("boot-times "))
        .ok_or_else(|| format!("no times in {output:?}"))?;
    let times: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    match times.as_slice() {
        [start, first, ready] => Ok((first - start, ready - start)),
        _ => Err(format!("bad times line {line:?}")),
    }
}

fn one_run(lane: &Lane, args: &BootVsArgs, ch: &str, run: u32) -> Result<Vec<Metric>, String> {
    let dir = "/run/tidevm-lane/boot-vs";
    lane.sh(&format!("mkdir -p {dir}"), Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    let kernel = "/guest/vmlinux";
    let initramfs = "/guest/initramfs.cpio.gz";
    let cmdline = shell_quote(&args.cmdline);
    let tidevm_console = format!("{dir}/tidevm-{run}.log");
    let tidevm = format!(
        "{} run --kernel {kernel} --initramfs {initramfs} --cmdline {cmdline} --cpus 1 \
         --memory size=512M --serial file={}",
        shell_quote(lane.lane_tidevm()),
        shell_quote(&tidevm_console)
    );
    let ch_console = format!("{dir}/ch-{run}.log");
    let cloud_hypervisor = format!(
        "{} --kernel {kernel} --initramfs {initramfs} --cmdline {cmdline} --cpus boot=1 \
         --memory size=512M --serial file={} --console off",
        shell_quote(ch),
        shell_quote(&ch_console)
    );
    // Alternate who goes first, so that neither always boots into a warmer L1.
    let (t, c) = if run % 2 == 1 {
        let t = time_boot(lane, &tidevm, &tidevm_console)?;
        (t, time_boot(lane, &cloud_hypervisor, &ch_console)?)
    } else {
        let c = time_boot(lane, &cloud_hypervisor, &ch_console)?;
        (time_boot(lane, &tidevm, &tidevm_console)?, c)
    };
    let m = |key, label, unit, value| Metric {
        key,
        label,
        unit,
        value,
    };
    Ok(vec![
        m(
            "tidevm_first",
            "tidevm: start to first output",
            Unit::Seconds,
            t.0,
        ),
        m("ch_first", "CH: start to first output", Unit::Seconds, c.0),
        m(
            "ratio_first",
            "tidevm / CH, first output",
            Unit::Ratio,
            t.0 / c.0,
        ),
        m(
            "tidevm_ready",
            "tidevm: start to ready marker",
            Unit::Seconds,
            t.1,
        ),
        m("ch_ready", "CH: start to ready marker", Unit::Seconds, c.1),
        m(
            "ratio_ready",
            "tidevm / CH, ready marker",
            Unit::Ratio,
            t.1 / c.1,
        ),
    ])
}

/// Boots both `runs` times, interleaved.
pub(super) fn run(lane: &Lane, args: &BootVsArgs) -> Vec<RunRecord> {
    let Some(ch) = lane.lane_cloud_hypervisor().map(str::to_owned) else {
        return super::bench::failed_runs(
            args.common.runs,
            "no cloud-hypervisor binary (../shared/anchors-bin/cloud-hypervisor or \
             TIDEVM_CLOUD_HYPERVISOR)",
        );
    };
    (1..=args.common.runs)
        .map(|run| {
            eprintln!("==== bench boot-vs-ch: run {run}/{} ====", args.common.runs);
            let result = one_run(lane, args, &ch, run);
            match &result {
                // Each run's figures as they come: a lane that wedges later keeps them.
                Ok(metrics) => eprintln!(
                    "bench boot-vs-ch: run {run}: {}",
                    metrics
                        .iter()
                        .map(|m| format!("{} {:.3}", m.key, m.value))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(e) => eprintln!("bench boot-vs-ch: run {run} failed: {e}"),
            }
            RunRecord {
                result,
                notes: Vec::new(),
            }
        })
        .collect()
}
