//! An L2 guest: a tidevm process in the lane, its serial console, its API.

use std::cell::Cell;
use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{LaneError, Result};
use crate::lane::{l1_cpus, Lane, LaneKind};
use crate::text::{self, shell_quote};

/// The line the guest's init prints once its modules are loaded.
pub const GUEST_READY: &str = "TIDEVM-GUEST-READY";
/// The guest shell's prompt (set in guest/build-guest.sh).
pub const GUEST_PROMPT: &str = "tidevm-guest# ";

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    pub cpus: u32,
    /// Boot memory, as tidevm's `--memory size=` takes it: "512M", "1G".
    pub memory: String,
    /// Extra arguments appended to `tidevm run`.
    pub extra_args: Vec<String>,
    /// Appended to the guest kernel command line.
    pub extra_cmdline: String,
    /// Transparent hugepages in the nested lane's L1 host for this guest's memory.
    pub l1_thp: L1Thp,
}

/// Transparent hugepages in the nested lane's L1 test host, set before each guest starts
/// (`/sys/kernel/mm/transparent_hugepage/enabled` is read when memory is faulted in, so the
/// setting in force when a guest touches its memory is the one that counts). The direct lane
/// leaves the user's host alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L1Thp {
    /// `always`, the setting measured with other VMMs: guest-paced work (unplug, page faults)
    /// runs about 4x faster in the lane than with THP off.
    #[default]
    Always,
    /// `never`: for balloon work after the guest has touched memory. 4 KiB balloon discards
    /// inside L1 huge pages make L2 triple-fault (and once panicked L1) under every VMM the
    /// lane notes tried; a fault of QEMU TCG's emulated SVM, not of the VMMs.
    Never,
}

impl L1Thp {
    /// The word `transparent_hugepage/enabled` takes.
    pub fn sysfs_value(self) -> &'static str {
        match self {
            L1Thp::Always => "always",
            L1Thp::Never => "never",
        }
    }
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            cpus: 1,
            memory: "512M".into(),
            extra_args: Vec::new(),
            extra_cmdline: String::new(),
            l1_thp: L1Thp::default(),
        }
    }
}

/// What tidevm logs when the guest triple-faults (and the VM is reset).
pub const TRIPLE_FAULT: &str = "the guest triple-faulted";
/// How often console and exit waits look again.
const POLL: Duration = Duration::from_millis(250);
/// The time one quick lane command (cat, grep, kill) may take.
const QUICK: Duration = Duration::from_secs(60);

impl Lane {
    /// Starts `tidevm run` in the lane, in the background, with its stdin
    /// from a FIFO held open read-write (so it never sees end-of-file) and
    /// stdout+stderr (the guest's serial console) to a log file.
    pub fn boot_guest(&self, options: &GuestOptions) -> Result<Guest<'_>> {
        let id = self.next_guest_id();
        let dir = format!("{}/guest-{id}", self.lane_work_dir());
        let mut cmdline = "console=ttyS0 memhp_default_state=online_movable".to_string();
        if !options.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&options.extra_cmdline);
        }
        let mut argv: Vec<String> = vec![
            self.lane_tidevm().into(),
            "run".into(),
            "--kernel".into(),
            self.lane_guest_kernel(),
            "--initramfs".into(),
            self.lane_guest_initramfs(),
            "--cmdline".into(),
            cmdline,
            "--cpus".into(),
            options.cpus.to_string(),
            "--memory".into(),
            format!("size={}", options.memory),
            "--api-socket".into(),
            format!("{dir}/api.sock"),
            "--serial".into(),
            "stdout".into(),
        ];
        argv.extend(options.extra_args.iter().cloned());
        // TIDEVM_LANE_PIN=0 turns the pinning off, to study the lane fault described below.
        let pin = std::env::var("TIDEVM_LANE_PIN").map_or(true, |v| v != "0");
        let l1_cpus = l1_cpus();
        if self.kind() == LaneKind::Nested && pin && l1_cpus > 1 {
            // Every thread of one tidevm on one L1 CPU (guests take turns, so that two
            // guests side by side get a CPU each). Only with TIDEVM_L1_CPUS above the
            // default of one (see `l1_cpus`). QEMU TCG's emulated SVM loses a nested
            // translation when L1 frees a page that L2 mapped while L2 runs on the other L1
            // CPU: an L2 guest then triple-faults a virtio-mem unplug or a few later (the lane
            // notes saw the same under other VMMs with balloon discards). Measured with 8
            // cycles of plug 1 GiB, write 256 MiB, unplug all: unpinned, the guest
            // triple-faulted in the first cycle; pinned, 8 clean cycles. With the
            // unplugged blocks overwritten with a poison pattern instead of freed, also 8
            // clean cycles unpinned: the guest never reads what it unplugged, only the freeing
            // matters. A lane artefact: a hardware host needs no pinning. (Unpinned: cycle 1
            // today; cycles 3, 3 and 5 in an earlier session's loop without the writes.)
            let cpu = (id % l1_cpus).to_string();
            argv.splice(0..0, ["taskset".into(), "-c".into(), cpu]);
        }
        let command_line = argv
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        // run.sh starts tidevm, records its PID, waits for it and records its
        // exit code. It runs under setsid so that neither a timeout of the
        // launching command nor the L1 agent takes it down.
        let thp = if self.kind() == LaneKind::Nested {
            format!(
                "echo {} > /sys/kernel/mm/transparent_hugepage/enabled\n",
                options.l1_thp.sysfs_value()
            )
        } else {
            String::new()
        };
        let script = format!(
            "set -e\n{thp}\
             rm -rf {dir_q}\nmkdir -p {dir_q}\ncd {dir_q}\n\
             mkfifo console.in\n: > console.log\n\
             echo {command_q} > command\n\
             cat > run.sh <<'TIDEVM_RUN_EOF'\n\
             cd {dir_q}\n\
             {command_line} 0<>console.in >console.log 2>&1 &\n\
             echo $! > pid.tmp && mv pid.tmp pid\n\
             wait $!\n\
             echo $? > exit_code.tmp && mv exit_code.tmp exit_code\n\
             TIDEVM_RUN_EOF\n\
             setsid sh run.sh </dev/null >/dev/null 2>&1 &\n\
             i=0\n\
             while [ ! -s pid ]; do i=$((i+1)); [ $i -lt 400 ] || {{ echo 'no pid file'; exit 1; }}; sleep 0.05; done\n\
             cat pid\n",
            dir_q = shell_quote(&dir),
            command_q = shell_quote(&command_line),
        );
        let (rc, output) = self.sh(&script, QUICK)?;
        if rc != 0 {
            return Err(self.failure(format!("starting tidevm failed ({rc}): {output}")));
        }
        let pid: u32 = output
            .trim()
            .parse()
            .map_err(|_| self.failure(format!("starting tidevm: unexpected output {output:?}")))?;
        let thp_note = match self.kind() {
            LaneKind::Nested => format!(", L1 THP {}", options.l1_thp.sysfs_value()),
            _ => String::new(),
        };
        eprintln!("tidevm started in the lane (pid {pid}{thp_note}): {command_line}");
        Ok(Guest {
            lane: self,
            dir,
            pid,
            next_command: Cell::new(1),
            exit_code: Cell::new(None),
        })
    }
}

/// A running guest. Dropping it kills the VMM if it is still running.
pub struct Guest<'lane> {
    lane: &'lane Lane,
    /// The guest's directory in the lane: console.in (FIFO), console.log,
    /// api.sock, pid, exit_code, command.
    dir: String,
    pid: u32,
    next_command: Cell<u64>,
    exit_code: Cell<Option<i32>>,
}

impl<'lane> Guest<'lane> {
    /// The VMM's PID inside the lane.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The lane this guest runs in.
    pub fn lane(&self) -> &'lane Lane {
        self.lane
    }

    /// The guest's API socket path inside the lane.
    pub fn api_socket(&self) -> String {
        format!("{}/api.sock", self.dir)
    }

    fn file(&self, name: &str) -> String {
        shell_quote(&format!("{}/{name}", self.dir))
    }

    /// An error carrying the tails of the L2 and L1 consoles.
    pub fn failure(&self, message: impl Into<String>) -> LaneError {
        let mut message = message.into();
        let _ = write!(
            message,
            "\n---- L2 console (last 40 lines) ----\n{}",
            self.console_tail(40)
        );
        self.lane.failure(message)
    }

    /// Runs a lane command; a failure of the command channel gets the
    /// console tails added.
    fn lane_sh(&self, script: &str, timeout: Duration) -> Result<(i32, String)> {
        self.lane.sh(script, timeout).map_err(|e| match e {
            LaneError::Failed(message) => {
                let mut message = message;
                let _ = write!(
                    message,
                    "\n---- L2 console (last 40 lines) ----\n{}",
                    self.console_tail(40)
                );
                LaneError::Failed(message)
            }
            skip => skip,
        })
    }

    /// The size of the console log so far, in bytes: an offset for
    /// [`Guest::wait_for_from`] and [`Guest::console_from`].
    pub fn console_len(&self) -> Result<u64> {
        let (_, output) = self.lane_sh(
            &format!("wc -c < {} 2>/dev/null || echo 0", self.file("console.log")),
            QUICK,
        )?;
        output
            .trim()
            .parse()
            .map_err(|_| self.failure(format!("console size: unexpected {output:?}")))
    }

    /// The console text from byte `offset` on.
    pub fn console_from(&self, offset: u64) -> Result<String> {
        let (_, output) = self.lane_sh(
            &format!("tail -c +{} {}", offset + 1, self.file("console.log")),
            QUICK,
        )?;
        Ok(output)
    }

    /// The last `lines` lines of the console (best effort, for messages).
    pub fn console_tail(&self, lines: usize) -> String {
        match self.lane.sh(
            &format!("tail -n {lines} {}", self.file("console.log")),
            QUICK,
        ) {
            Ok((_, output)) => output,
            Err(e) => format!("(console unavailable: {e})"),
        }
    }

    /// Waits until `pattern` (a fixed string) appears anywhere in the
    /// console, and returns the first line holding it.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_from(pattern, 0, timeout)
    }

    /// Waits until `pattern` appears in the console after byte `offset`.
    /// Fails early if the VMM exits.
    pub fn wait_for_from(&self, pattern: &str, offset: u64, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        // tidevm logs a triple fault to the same file and resets the guest, which then boots
        // again and never answers the command: fail at once instead of at the timeout, with
        // the words callers look for.
        let script = format!(
            "tail -c +{start} {log} | grep -F -m 1 -e {pattern} && exit 0\n\
             tail -c +{start} {log} | grep -F -q -e {TRIPLE_FAULT} && exit 3\n\
             test -e {exit} && {{ echo \"__EXITED__ $(cat {exit})\"; exit 2; }}\n\
             exit 1\n",
            start = offset + 1,
            log = self.file("console.log"),
            pattern = shell_quote(pattern),
            exit = self.file("exit_code"),
        );
        loop {
            let (rc, output) = self.lane_sh(&script, QUICK)?;
            match rc {
                0 => return Ok(output.trim_end().to_string()),
                2 => {
                    let code = output.trim().trim_start_matches("__EXITED__").trim();
                    if let Ok(code) = code.parse() {
                        self.exit_code.set(Some(code));
                    }
                    return Err(self.failure(format!(
                        "tidevm exited (code {code}) while waiting for {pattern:?}"
                    )));
                }
                3 => {
                    return Err(self.failure(format!(
                        "{TRIPLE_FAULT}: tidevm reset the VM while waiting for {pattern:?}"
                    )));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(self.failure(format!(
                    "timed out after {timeout:?} waiting for {pattern:?} on the guest console"
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// Fails if tidevm logged a triple fault (and reset the VM) after console byte `offset`.
    /// A reset between two API calls goes unseen by console waits: a scenario or a bench
    /// round ends with this check so that a guest that crashed and rebooted is not counted
    /// as a pass.
    pub fn check_no_triple_fault_since(&self, offset: u64) -> Result<()> {
        let (rc, line) = self.lane_sh(
            &format!(
                "tail -c +{} {} | grep -F -m 1 -e {}",
                offset + 1,
                self.file("console.log"),
                shell_quote(TRIPLE_FAULT)
            ),
            QUICK,
        )?;
        if rc == 0 {
            return Err(self.failure(format!(
                "{TRIPLE_FAULT}: tidevm reset the VM ({})",
                line.trim()
            )));
        }
        Ok(())
    }

    /// Waits for the guest's init to print its ready line and for the
    /// shell prompt after it.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_ready_from(0, timeout)
    }

    /// Like [`Guest::wait_ready`], for a boot that starts after console
    /// byte `offset` (after a reboot).
    pub fn wait_ready_from(&self, offset: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.wait_for_from(GUEST_READY, offset, timeout)?;
        let left = deadline.saturating_duration_since(Instant::now());
        self.wait_for_from(GUEST_PROMPT, offset, left.max(Duration::from_secs(5)))?;
        Ok(())
    }

    /// Types `line` and a newline into the guest's serial console.
    pub fn send_line(&self, line: &str) -> Result<()> {
        let (rc, output) = self.lane_sh(
            &format!(
                "printf '%s\\n' {} > {}",
                shell_quote(line),
                self.file("console.in")
            ),
            QUICK,
        )?;
        if rc != 0 {
            return Err(self.failure(format!("typing into the guest console failed: {output}")));
        }
        Ok(())
    }

    /// Runs `command` in the guest's shell and returns its exit status and
    /// output (stdout+stderr as the console shows them, without carriage
    /// returns). The command is typed as one line: keep it well under the
    /// tty's 4095-character line limit.
    pub fn run_status(&self, command: &str, timeout: Duration) -> Result<(i32, String)> {
        let n = self.next_command.get();
        self.next_command.set(n + 1);
        let offset = self.console_len()?;
        self.send_line(&text::guest_command_line(n, command))?;
        self.wait_for_from(&text::guest_end_marker(n), offset, timeout)
            .map_err(|e| match e {
                LaneError::Failed(message) => {
                    LaneError::Failed(format!("guest command {command:?}: {message}"))
                }
                skip => skip,
            })?;
        let console = self.console_from(offset)?;
        text::extract_guest_output(&console, n).ok_or_else(|| {
            self.failure(format!(
                "guest command {command:?}: could not find its output between the markers"
            ))
        })
    }

    /// Runs `command` in the guest and returns its output; a non-zero exit
    /// status is an error that includes the status and the output.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<String> {
        let (status, output) = self.run_status(command, timeout)?;
        if status != 0 {
            return Err(self.failure(format!(
                "guest command {command:?} exited with status {status}:\n{output}"
            )));
        }
        Ok(output)
    }

    /// Runs `tidevm ctl --api-socket <sock> <args>` in the lane.
    pub fn ctl(&self, args: &[&str]) -> Result<(i32, String)> {
        self.lane_sh(&self.ctl_script(args), QUICK)
    }

    /// Like [`Guest::ctl`], for commands that wait (`--wait`): allowed `timeout`, and with
    /// stderr in the output, where `tidevm ctl` reports why a wait failed.
    pub fn ctl_waiting(&self, args: &[&str], timeout: Duration) -> Result<(i32, String)> {
        self.lane_sh(&format!("{} 2>&1", self.ctl_script(args)), timeout)
    }

    /// Runs Cloud Hypervisor's `ch-remote --api-socket <sock> <args>` in the lane, allowed
    /// `timeout`, with stderr in the output (where it reports errors). `None` when the lane
    /// has no `ch-remote` (see [`crate::ch_remote_binary`]).
    pub fn ch_remote(&self, args: &[&str], timeout: Duration) -> Result<Option<(i32, String)>> {
        let Some(ch_remote) = self.lane.lane_ch_remote() else {
            return Ok(None);
        };
        let mut script = format!(
            "{} --api-socket {}",
            shell_quote(ch_remote),
            shell_quote(&self.api_socket())
        );
        for arg in args {
            script.push(' ');
            script.push_str(&shell_quote(arg));
        }
        script.push_str(" 2>&1");
        self.lane_sh(&script, timeout).map(Some)
    }

    fn ctl_script(&self, args: &[&str]) -> String {
        let mut script = format!(
            "{} ctl --api-socket {}",
            shell_quote(self.lane.lane_tidevm()),
            shell_quote(&self.api_socket())
        );
        for arg in args {
            script.push(' ');
            script.push_str(&shell_quote(arg));
        }
        script
    }

    /// VmRSS of the VMM process in KiB.
    pub fn vmm_rss_kib(&self) -> Result<u64> {
        let (rc, status) = self.lane_sh(&format!("cat /proc/{}/status", self.pid), QUICK)?;
        if rc != 0 {
            return Err(self.failure(format!("reading /proc/{}/status: {status}", self.pid)));
        }
        text::parse_vm_rss_kib(&status)
            .ok_or_else(|| self.failure(format!("no VmRSS in /proc/{}/status", self.pid)))
    }

    /// The VMM's /proc/PID/smaps_rollup.
    pub fn vmm_smaps_rollup(&self) -> Result<String> {
        let (rc, rollup) = self.lane_sh(&format!("cat /proc/{}/smaps_rollup", self.pid), QUICK)?;
        if rc != 0 {
            return Err(self.failure(format!("reading smaps_rollup: {rollup}")));
        }
        Ok(rollup)
    }

    /// The VMM's exit code if it has exited, without waiting.
    pub fn exit_status_now(&self) -> Result<Option<i32>> {
        if let Some(code) = self.exit_code.get() {
            return Ok(Some(code));
        }
        let (rc, output) = self.lane_sh(
            &format!("cat {} 2>/dev/null", self.file("exit_code")),
            QUICK,
        )?;
        let code = if rc == 0 {
            output.trim().parse().ok()
        } else {
            None
        };
        if code.is_some() {
            self.exit_code.set(code);
        }
        Ok(code)
    }

    /// Waits for the VMM to exit and returns its exit code.
    pub fn wait_exit(&self, timeout: Duration) -> Result<i32> {
        if let Some(code) = self.exit_code.get() {
            return Ok(code);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.exit_status_now()? {
                return Ok(code);
            }
            if Instant::now() >= deadline {
                return Err(self.failure(format!(
                    "tidevm (pid {}) did not exit within {timeout:?}",
                    self.pid
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// Types `poweroff` into the guest shell and waits for the VMM to exit.
    pub fn poweroff(&self, timeout: Duration) -> Result<i32> {
        self.send_line("poweroff")?;
        self.wait_exit(timeout)
    }

    /// Kills the VMM (SIGKILL) and waits briefly for it to be gone.
    pub fn kill(&self) -> Result<()> {
        if self.exit_code.get().is_some() {
            return Ok(());
        }
        self.lane_sh(
            &format!(
                "kill -9 {pid} 2>/dev/null; i=0; while [ ! -e {exit} ] && [ $i -lt 100 ]; do \
                 i=$((i+1)); sleep 0.1; done; true",
                pid = self.pid,
                exit = self.file("exit_code")
            ),
            QUICK,
        )?;
        // run.sh records the shell's view (137); -9 if it was not in time.
        if self.exit_status_now()?.is_none() {
            self.exit_code.set(Some(-9));
        }
        Ok(())
    }
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        if self.exit_code.get().is_none() {
            let _ = self.lane.sh(
                &format!("test -e {} || kill -9 {}", self.file("exit_code"), self.pid),
                QUICK,
            );
        }
    }
}
