//! `tidevm bench boot-vs-ch`: tidevm and Cloud Hypervisor (and, with `--qemu`, QEMU's
//! `microvm` machine) boot the same guest (kernel, initramfs, command line, 1 vCPU, 512 MiB)
//! one after the other in the same lane, run after run, in a rotating order, and the report
//! gives each one's time from process start to the guest's first console output and to its
//! ready marker, and tidevm's time as a fraction of each other's.
//!
//! All are measured the same way, inside the lane: a shell loop notes the lane's uptime when
//! it starts the VMM, when the serial log file first has bytes and when the ready marker is
//! in it (polling every 50 ms, so each figure is good to about 0.05 s). The VMM is killed as
//! soon as the marker is seen.
//!
//! With `--kvm-exits`, the lane's kernel also records every KVM exit (its `kvm:kvm_exit`
//! tracepoint, in tracefs) from each VMM's start until the guest's first output, and the
//! report gives each VMM's count and the counts by exit reason: the same guest kernel should
//! leave the same exits under each VMM, and where they differ is a VMM's doing. The
//! tracepoint counts every VM on that kernel, so this needs root and no other VM running
//! (the nested lane's L1 runs only the boot under test).

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
    /// Boot the guest in QEMU's `microvm` machine too (the lane's QEMU, copied into L1 in the
    /// nested lane), with tidevm/QEMU ratios.
    #[arg(long)]
    pub(super) qemu: bool,
    /// Keep each boot's serial console log in this host directory (`tidevm-RUN.log`,
    /// `ch-RUN.log`, `qemu-RUN.log`), to compare the guests' own timelines.
    #[arg(long, value_name = "DIR")]
    pub(super) keep_consoles: Option<std::path::PathBuf>,
    /// Count the KVM exits from each VMM's start to the guest's first output, by reason,
    /// with the lane kernel's `kvm:kvm_exit` tracepoint (root; no other VM may run there).
    #[arg(long)]
    pub(super) kvm_exits: bool,
}

/// Why a run failed: the lane itself stopped answering (the nested lane's L1 can wedge, with
/// any VMM inside; nothing more can run in it), or one boot went wrong.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("the lane stopped answering: {0}")]
    LaneStopped(String),
    #[error("{0}")]
    Boot(String),
}

/// What one boot gave: seconds from the VMM's start to the first console output and to the
/// ready marker, the KVM exits until the first output when they were traced, and the console
/// log itself.
struct BootTimes {
    first_output: f64,
    ready: f64,
    exits: Option<ExitCounts>,
    console: String,
}

/// KVM exits counted by reason (the tracepoint's name for it: `cpuid`, `npf`, `io`, ...).
#[derive(Debug)]
struct ExitCounts {
    by_reason: Vec<(String, u64)>,
}

impl ExitCounts {
    /// Reads the `kvm-exits reason=count ...` line of the lane script; the reasons come out
    /// most frequent first.
    fn parse(line: &str) -> Result<ExitCounts, String> {
        let mut by_reason = Vec::new();
        for word in line.split_whitespace().skip(1) {
            let (reason, count) = word
                .split_once('=')
                .and_then(|(r, c)| Some((r.to_owned(), c.parse::<u64>().ok()?)))
                .ok_or_else(|| format!("bad exit count {word:?} in {line:?}"))?;
            by_reason.push((reason, count));
        }
        by_reason.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(ExitCounts { by_reason })
    }

    fn total(&self) -> u64 {
        self.by_reason.iter().map(|(_, count)| count).sum()
    }

    fn summary(&self) -> String {
        self.by_reason
            .iter()
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The lane kernel's tracefs.
const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs if needed and makes it ready to record KVM exits (recording itself is off
/// until a boot starts).
fn trace_setup_script() -> String {
    format!(
        "T={TRACEFS}\n\
         [ -e $T/tracing_on ] || mount -t tracefs tracefs $T || exit 1\n\
         echo 0 > $T/tracing_on && echo 16384 > $T/buffer_size_kb && \
         echo 1 > $T/events/kvm/kvm_exit/enable\n"
    )
}

/// The line between the times and the console log in the lane script's output.
const CONSOLE_FOLLOWS: &str = "==== console log ====";

fn time_boot(
    lane: &Lane,
    command: &str,
    console: &str,
    trace_exits: bool,
) -> Result<BootTimes, RunError> {
    // Tracing starts just before the VMM and stops at the first output; an overrun buffer
    // would undercount, so it fails the boot.
    let (trace_start, trace_stop, trace_report) = if trace_exits {
        (
            format!("T={TRACEFS}; echo > $T/trace; echo 1 > $T/tracing_on\n"),
            "echo 0 > $T/tracing_on; ",
            "lost=$(awk '/^overrun/ {s+=$2} END {print s+0}' $T/per_cpu/cpu*/stats)\n\
             if [ \"$lost\" != 0 ]; then echo \"the exit trace lost $lost events\"; exit 1; fi\n\
             echo \"kvm-exits $(awk '/kvm_exit:/ { for (k = 1; k < NF; k++) if ($k == \"reason\") n[$(k+1)]++ } \
               END { for (r in n) printf \"%s=%d \", r, n[r] }' $T/trace)\"\n",
        )
    } else {
        (String::new(), "", "")
    };
    let script = format!(
        "c={console}; rm -f $c; : > $c.started\n\
         {trace_start}\
         start=$(cut -d' ' -f1 /proc/uptime)\n\
         {command} > $c.vmm 2>&1 &\n\
         pid=$!\n\
         first=; ready=; i=0\n\
         while [ $i -lt 1200 ]; do\n\
           now=$(cut -d' ' -f1 /proc/uptime)\n\
           if [ -z \"$first\" ] && [ -s $c ]; then {trace_stop}first=$now; fi\n\
           if [ -s $c ] && grep -q {marker} $c; then ready=$now; break; fi\n\
           sleep 0.05; i=$((i+1))\n\
         done\n\
         {trace_stop}kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null\n\
         if [ -z \"$ready\" ]; then echo 'no ready marker:'; tail -5 $c $c.vmm; exit 1; fi\n\
         {trace_report}\
         echo \"boot-times $start $first $ready\"\n\
         echo {console_follows}; cat $c\n",
        console_follows = shell_quote(CONSOLE_FOLLOWS),
        console = shell_quote(console),
        marker = GUEST_READY,
    );
    // A boot takes under 20 s in the nested lane and the script gives up after 1200 polls;
    // past this the lane itself is stuck.
    let (rc, output) = lane
        .sh(&script, Duration::from_secs(300))
        .map_err(|e| RunError::LaneStopped(one_line(&e)))?;
    if rc != 0 {
        return Err(RunError::Boot(format!("boot failed: {}", output.trim())));
    }
    let line = output
        .lines()
        .find(|l| l.starts_with("boot-times "))
        .ok_or_else(|| RunError::Boot(format!("no times in {output:?}")))?;
    let times: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    let exits = if trace_exits {
        let line = output
            .lines()
            .find(|l| l.starts_with("kvm-exits "))
            .ok_or_else(|| RunError::Boot(format!("no exit counts in {output:?}")))?;
        Some(ExitCounts::parse(line).map_err(RunError::Boot)?)
    } else {
        None
    };
    let console = output
        .split_once(CONSOLE_FOLLOWS)
        .map(|(_, log)| log.trim_start_matches('\n').to_owned())
        .unwrap_or_default();
    match times.as_slice() {
        [start, first, ready] => Ok(BootTimes {
            first_output: first - start,
            ready: ready - start,
            exits,
            console,
        }),
        _ => Err(RunError::Boot(format!("bad times line {line:?}"))),
    }
}

/// A metric's stable key and its label in the table.
type Named = (&'static str, &'static str);

/// One VMM under comparison: how it boots the guest and how the report names its figures.
struct Contender {
    /// File-name prefix of its console log: `tidevm`, `ch`, `qemu`.
    name: &'static str,
    /// The command line that boots the guest with its serial console in `console`.
    command: String,
    console: String,
    /// Its start-to-first-output and start-to-ready metrics.
    times: [Named; 2],
    /// Its KVM exits until the first output (with `--kvm-exits`).
    exits: Named,
    /// tidevm's time as a fraction of this one's, for the same two (none for tidevm itself).
    ratios: Option<[Named; 2]>,
}

fn one_run(
    lane: &Lane,
    args: &BootVsArgs,
    ch: &str,
    qemu: Option<&str>,
    run: u32,
) -> Result<(Vec<Metric>, Vec<String>), RunError> {
    let dir = "/run/tidevm-lane/boot-vs";
    lane.sh(&format!("mkdir -p {dir}"), Duration::from_secs(60))
        .map_err(|e| RunError::LaneStopped(one_line(&e)))?;
    let kernel = "/guest/vmlinux";
    let initramfs = "/guest/initramfs.cpio.gz";
    let cmdline = shell_quote(&args.cmdline);
    let console = |name: &str| format!("{dir}/{name}-{run}.log");
    // tidevm first: the ratios divide by the others' times.
    let mut contenders = vec![
        Contender {
            name: "tidevm",
            command: format!(
                "{} run --kernel {kernel} --initramfs {initramfs} --cmdline {cmdline} --cpus 1 \
                 --memory size=512M --serial file={}",
                shell_quote(lane.lane_tidevm()),
                shell_quote(&console("tidevm"))
            ),
            console: console("tidevm"),
            times: [
                ("tidevm_first", "tidevm: start to first output"),
                ("tidevm_ready", "tidevm: start to ready marker"),
            ],
            exits: (
                "tidevm_exits_first",
                "tidevm: KVM exits before first output",
            ),
            ratios: None,
        },
        Contender {
            name: "ch",
            command: format!(
                "{} --kernel {kernel} --initramfs {initramfs} --cmdline {cmdline} --cpus boot=1 \
                 --memory size=512M --serial file={} --console off",
                shell_quote(ch),
                shell_quote(&console("ch"))
            ),
            console: console("ch"),
            times: [
                ("ch_first", "CH: start to first output"),
                ("ch_ready", "CH: start to ready marker"),
            ],
            exits: ("ch_exits_first", "CH: KVM exits before first output"),
            ratios: Some([
                ("ratio_first", "tidevm / CH, first output"),
                ("ratio_ready", "tidevm / CH, ready marker"),
            ]),
        },
    ];
    if let Some(qemu) = qemu {
        // QEMU's minimal machine, the closest to the other two: no PCI devices, no
        // network, the same PVH vmlinux and initramfs.
        contenders.push(Contender {
            name: "qemu",
            command: format!(
                "{} -M microvm -accel kvm -cpu host -smp 1 -m 512M -no-user-config \
                 -display none -nic none -serial file:{} -kernel {kernel} -initrd {initramfs} \
                 -append {cmdline}",
                shell_quote(qemu),
                shell_quote(&console("qemu"))
            ),
            console: console("qemu"),
            times: [
                ("qemu_first", "QEMU microvm: start to first output"),
                ("qemu_ready", "QEMU microvm: start to ready marker"),
            ],
            exits: (
                "qemu_exits_first",
                "QEMU microvm: KVM exits before first output",
            ),
            ratios: Some([
                ("ratio_first_qemu", "tidevm / QEMU, first output"),
                ("ratio_ready_qemu", "tidevm / QEMU, ready marker"),
            ]),
        });
    }
    // Rotate who goes first, so that none always boots into a warmer L1.
    let count = contenders.len();
    let mut boots: Vec<Option<BootTimes>> = (0..count).map(|_| None).collect();
    for index in (0..count).cycle().skip(run as usize % count).take(count) {
        let contender = &contenders[index];
        boots[index] = Some(time_boot(
            lane,
            &contender.command,
            &contender.console,
            args.kvm_exits,
        )?);
    }
    let boots: Vec<BootTimes> = boots.into_iter().flatten().collect();
    if let Some(dir) = &args.keep_consoles {
        for (contender, boot) in contenders.iter().zip(&boots) {
            let path = dir.join(format!("{}-{run}.log", contender.name));
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, &boot.console))
                .map_err(|e| RunError::Boot(format!("{}: {e}", path.display())))?;
        }
    }
    let m = |(key, label): Named, unit, value| Metric {
        key,
        label,
        unit,
        value,
    };
    let tidevm = &boots[0];
    let mut metrics = Vec::new();
    let mut notes = Vec::new();
    for (contender, boot) in contenders.iter().zip(&boots) {
        let [first, ready] = contender.times;
        metrics.push(m(first, Unit::Seconds, boot.first_output));
        metrics.push(m(ready, Unit::Seconds, boot.ready));
        if let Some(exits) = &boot.exits {
            metrics.push(m(contender.exits, Unit::Count, exits.total() as f64));
            notes.push(format!(
                "{} exits before first output: {}",
                contender.name,
                exits.summary()
            ));
        }
    }
    for (contender, boot) in contenders.iter().zip(&boots) {
        if let Some([first, ready]) = contender.ratios {
            metrics.push(m(
                first,
                Unit::Ratio,
                tidevm.first_output / boot.first_output,
            ));
            metrics.push(m(ready, Unit::Ratio, tidevm.ready / boot.ready));
        }
    }
    Ok((metrics, notes))
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
    let qemu = lane.lane_qemu();
    if args.qemu && qemu.is_none() {
        return super::bench::failed_runs(
            args.common.runs,
            "--qemu: the lane has no QEMU with the microvm firmware (bios-microvm.bin, pvh.bin)",
        );
    }
    if args.kvm_exits {
        match lane.sh(&trace_setup_script(), Duration::from_secs(60)) {
            Ok((0, _)) => {}
            Ok((_, output)) => {
                return super::bench::failed_runs(
                    args.common.runs,
                    &format!(
                        "--kvm-exits: the lane kernel's kvm:kvm_exit tracepoint is not \
                         available (tracefs at {TRACEFS}, root): {}",
                        one_line(&output)
                    ),
                );
            }
            Err(e) => {
                return super::bench::failed_runs(
                    args.common.runs,
                    &RunError::LaneStopped(one_line(&e)).to_string(),
                )
            }
        }
    }
    let mut records = Vec::new();
    for run in 1..=args.common.runs {
        eprintln!("==== bench boot-vs-ch: run {run}/{} ====", args.common.runs);
        let result = one_run(lane, args, &ch, qemu, run);
        match &result {
            // Each run's figures as they come: a lane that wedges later keeps them.
            Ok((metrics, notes)) => eprintln!(
                "bench boot-vs-ch: run {run}: {}",
                metrics
                    .iter()
                    .map(|m| format!("{} {:.3}", m.key, m.value))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + &notes.iter().map(|n| format!("\n  {n}")).collect::<String>()
            ),
            Err(e) => eprintln!("bench boot-vs-ch: run {run} failed: {e}"),
        }
        let lane_stopped = matches!(result, Err(RunError::LaneStopped(_)));
        let (result, notes) = match result {
            Ok((metrics, notes)) => (Ok(metrics), notes),
            Err(e) => (Err(e.to_string()), Vec::new()),
        };
        records.push(RunRecord { result, notes });
        if lane_stopped {
            // Nothing more can run in a stuck lane; the runs so far still count.
            let left = args.common.runs - run;
            records.extend(super::bench::failed_runs(
                left,
                &format!("not run: the lane stopped answering in run {run}"),
            ));
            break;
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::ExitCounts;

    #[test]
    fn exit_counts_read_the_trace_summary_most_frequent_first() {
        let counts = ExitCounts::parse("kvm-exits npf=41 cpuid=598 io=187 msr=85 ").unwrap();
        assert_eq!(counts.total(), 911);
        assert_eq!(counts.summary(), "cpuid 598, io 187, msr 85, npf 41");
    }

    #[test]
    fn an_empty_trace_counts_zero_and_a_garbled_one_is_an_error() {
        assert_eq!(ExitCounts::parse("kvm-exits ").unwrap().total(), 0);
        let error = ExitCounts::parse("kvm-exits cpuid=many").unwrap_err();
        assert!(error.contains("cpuid=many"), "{error}");
        assert!(ExitCounts::parse("kvm-exits cpuid").is_err());
    }
}
