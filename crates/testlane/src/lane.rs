//! Picking and running a test lane.
//!
//! * Direct: this machine has hardware virtualization and a usable
//!   /dev/kvm; tidevm runs here.
//! * Nested: an "L1" Linux test host boots under QEMU TCG with emulated AMD
//!   SVM, gets a real /dev/kvm from kvm_amd, and tidevm runs inside it. The
//!   harness talks to L1 through a command agent on a virtio-serial port.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cpio::CpioWriter;
use crate::error::{LaneError, Result};
use crate::text;

/// Which lane runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneKind {
    Direct,
    Nested,
}

/// What the lane choice depends on; gathered by [`LaneFacts::probe`] and
/// kept separate so the choice itself is a pure, tested function.
#[derive(Debug, Clone, Default)]
pub struct LaneFacts {
    /// The value of `TIDEVM_LANE`, if set.
    pub requested: Option<String>,
    /// `vmx` or `svm` in /proc/cpuinfo.
    pub hardware_virtualization: bool,
    /// /dev/kvm opens read-write.
    pub kvm_usable: bool,
    /// The QEMU binary, if found.
    pub qemu: Option<PathBuf>,
    /// build/l1/vmlinuz and build/l1/base.cpio exist.
    pub l1_images: bool,
    /// build/guest/vmlinux and build/guest/initramfs.cpio.gz exist.
    pub guest_images: bool,
}

impl LaneFacts {
    pub fn probe(paths: &LanePaths) -> LaneFacts {
        LaneFacts {
            requested: std::env::var("TIDEVM_LANE").ok().filter(|v| !v.is_empty()),
            hardware_virtualization: fs::read_to_string("/proc/cpuinfo")
                .map(|cpuinfo| text::cpuinfo_has_hw_virt(&cpuinfo))
                .unwrap_or(false),
            kvm_usable: OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            qemu: find_qemu(),
            l1_images: paths.l1_kernel().is_file() && paths.l1_base_cpio().is_file(),
            guest_images: paths.guest_kernel().is_file() && paths.guest_initramfs().is_file(),
        }
    }
}

/// Chooses the lane, or says why none can run (the `Skip` reason).
pub fn choose_lane(facts: &LaneFacts) -> Result<LaneKind> {
    let direct_problem = if !facts.hardware_virtualization {
        Some("no vmx/svm in /proc/cpuinfo (no hardware virtualization)")
    } else if !facts.kvm_usable {
        Some("/dev/kvm is missing or not read-write for this user")
    } else if !facts.guest_images {
        Some("guest images missing: run `make guest`")
    } else {
        None
    };
    let nested_problem = if facts.qemu.is_none() {
        Some("qemu-system-x86_64 not found (run `make deps`)")
    } else if !facts.l1_images {
        Some("L1 images missing: run `make l1`")
    } else {
        None
    };
    let skip = |lane: &str, problem: &str| Err(LaneError::Skip(format!("{lane} lane: {problem}")));
    match facts.requested.as_deref() {
        Some("direct") => match direct_problem {
            None => Ok(LaneKind::Direct),
            Some(problem) => skip("TIDEVM_LANE=direct but the direct", problem),
        },
        Some("nested") => match nested_problem {
            None => Ok(LaneKind::Nested),
            Some(problem) => skip("TIDEVM_LANE=nested but the nested", problem),
        },
        Some(other) => Err(LaneError::failed(format!(
            "TIDEVM_LANE={other}: expected `direct` or `nested`"
        ))),
        None => match (direct_problem, nested_problem) {
            (None, _) => Ok(LaneKind::Direct),
            (Some(_), None) => Ok(LaneKind::Nested),
            (Some(direct), Some(nested)) => Err(LaneError::Skip(format!(
                "no lane can run real guests here: direct: {direct}; nested: {nested}"
            ))),
        },
    }
}

fn find_qemu() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("TIDEVM_QEMU") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
}

/// Where the images built by `make guest` and `make l1` are.
#[derive(Debug, Clone)]
pub struct LanePaths {
    pub build_dir: PathBuf,
}

impl LanePaths {
    /// `TIDEVM_BUILD_DIR`, or `build/` at the workspace root.
    pub fn from_env() -> LanePaths {
        let build_dir = std::env::var_os("TIDEVM_BUILD_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("build"));
        LanePaths { build_dir }
    }
    pub fn guest_kernel(&self) -> PathBuf {
        self.build_dir.join("guest/vmlinux")
    }
    pub fn guest_initramfs(&self) -> PathBuf {
        self.build_dir.join("guest/initramfs.cpio.gz")
    }
    pub fn guest_rootfs(&self) -> PathBuf {
        self.build_dir.join("guest/rootfs.ext4")
    }
    pub fn l1_kernel(&self) -> PathBuf {
        self.build_dir.join("l1/vmlinuz")
    }
    pub fn l1_base_cpio(&self) -> PathBuf {
        self.build_dir.join("l1/base.cpio")
    }
}

/// The workspace root, known at compile time from this crate's location.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The tidevm binary to test: `TIDEVM_BIN`, else `tidevm` next to the
/// running executable's target directory (so `cargo test --release` finds
/// the release build), else target/release or target/debug. A missing
/// binary is a `Skip`: the VMM may not be built yet.
pub fn tidevm_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TIDEVM_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(LaneError::failed(format!(
                "TIDEVM_BIN={} does not exist",
                path.display()
            )))
        };
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test> or target/<profile>/<bin>
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join("tidevm"));
        }
    }
    let target = workspace_root().join("target");
    candidates.push(target.join("release/tidevm"));
    candidates.push(target.join("debug/tidevm"));
    candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
        LaneError::Skip("the tidevm binary is not built (cargo build --release -p tidevm)".into())
    })
}

/// Cloud Hypervisor's `ch-remote`, to test tidevm's Cloud Hypervisor-compatible routes with
/// that VMM's own client: `TIDEVM_CH_REMOTE`, else `../shared/anchors-bin/ch-remote` next to
/// the workspace. `None` when it is not there (the scenarios that need it say SKIPPED).
pub fn ch_remote_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TIDEVM_CH_REMOTE") {
        return Some(PathBuf::from(path)).filter(|path| path.is_file());
    }
    let path = workspace_root().join("../shared/anchors-bin/ch-remote");
    path.is_file().then_some(path)
}

/// Where the nested lane's L1 has `ch-remote`.
const L1_CH_REMOTE: &str = "/usr/local/bin/ch-remote";
/// Where the nested lane's L1 has `cloud-hypervisor`.
const L1_CLOUD_HYPERVISOR: &str = "/usr/local/bin/cloud-hypervisor";

/// Where the nested lane's L1 has QEMU, when asked for ([`LaneOptions::qemu`]).
const L1_QEMU: &str = "/usr/local/bin/qemu-system-x86_64";
/// The firmware QEMU's `microvm` machine needs to boot a PVH `vmlinux`: SeaBIOS for
/// microvm and the PVH option ROM. Copied into L1 at the same paths as on the host, where
/// Debian's QEMU looks for them (its data directory, then SeaBIOS's).
const QEMU_MICROVM_FIRMWARE: [&str; 2] = [
    "/usr/share/seabios/bios-microvm.bin",
    "/usr/share/qemu/pvh.bin",
];

/// What a lane carries besides tidevm (Cloud Hypervisor and `ch-remote` come whenever they
/// are found).
#[derive(Debug, Clone, Copy, Default)]
pub struct LaneOptions {
    /// QEMU with the firmware of its `microvm` machine, for side-by-side boots: about 60 MB
    /// more in L1's initrd, so only the benchmarks that use it ask for it.
    pub qemu: bool,
}

/// Cloud Hypervisor itself, for side-by-side benchmarks: `TIDEVM_CLOUD_HYPERVISOR`, else
/// `../shared/anchors-bin/cloud-hypervisor` next to the workspace, if there.
pub fn cloud_hypervisor_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TIDEVM_CLOUD_HYPERVISOR") {
        return Some(PathBuf::from(path)).filter(|path| path.is_file());
    }
    let path = workspace_root().join("../shared/anchors-bin/cloud-hypervisor");
    path.is_file().then_some(path)
}

/// How long L1 may take to boot and start its agent. About 5-10 s on an
/// idle machine; generous because CI machines are busy.
fn l1_boot_timeout() -> Duration {
    let seconds = std::env::var("TIDEVM_L1_BOOT_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(seconds)
}

/// A running lane. Commands run through [`Lane::sh`]; guests boot with
/// [`Lane::boot_guest`](crate::Lane::boot_guest).
pub struct Lane {
    kind: LaneKind,
    paths: LanePaths,
    /// Host directory for this run's files (logs; for nested, the initrd).
    run_dir: PathBuf,
    /// The tidevm binary as seen from inside the lane.
    lane_tidevm: String,
    /// Where guests keep their files inside the lane.
    lane_work_dir: String,
    /// Cloud Hypervisor's `ch-remote` as seen from inside the lane, if it was found.
    lane_ch_remote: Option<String>,
    /// Cloud Hypervisor as seen from inside the lane, if it was found.
    lane_cloud_hypervisor: Option<String>,
    /// QEMU as seen from inside the lane, if [`LaneOptions::qemu`] asked for it and it was found.
    lane_qemu: Option<String>,
    nested: Option<NestedHost>,
    next_guest: AtomicU64,
}

impl Lane {
    /// Starts the lane chosen by [`choose_lane`] for `tidevm_binary`.
    pub fn start(tidevm_binary: &Path) -> Result<Lane> {
        Lane::start_with(tidevm_binary, LaneOptions::default())
    }

    /// [`Lane::start`], with what `options` adds.
    pub fn start_with(tidevm_binary: &Path, options: LaneOptions) -> Result<Lane> {
        let paths = LanePaths::from_env();
        let facts = LaneFacts::probe(&paths);
        let kind = choose_lane(&facts)?;
        if !tidevm_binary.is_file() {
            return Err(LaneError::failed(format!(
                "tidevm binary {} does not exist",
                tidevm_binary.display()
            )));
        }
        if !facts.guest_images {
            return Err(LaneError::Skip(
                "guest images missing: run `make guest`".into(),
            ));
        }
        let run_dir = new_run_dir(&paths)?;
        let ch_remote = ch_remote_binary();
        let cloud_hypervisor = cloud_hypervisor_binary();
        match kind {
            LaneKind::Direct => {
                eprintln!(
                    "==== tidevm test lane: DIRECT (hardware KVM on this machine); logs in {} ====",
                    run_dir.display()
                );
                let tidevm = tidevm_binary
                    .canonicalize()
                    .map_err(|e| LaneError::failed(format!("{}: {e}", tidevm_binary.display())))?;
                let work_dir = run_dir.join("lane");
                fs::create_dir_all(&work_dir)
                    .map_err(|e| LaneError::failed(format!("{}: {e}", work_dir.display())))?;
                Ok(Lane {
                    kind,
                    lane_tidevm: tidevm.display().to_string(),
                    lane_work_dir: work_dir.display().to_string(),
                    lane_ch_remote: ch_remote.map(|path| path.display().to_string()),
                    lane_cloud_hypervisor: cloud_hypervisor.map(|path| path.display().to_string()),
                    lane_qemu: facts
                        .qemu
                        .as_ref()
                        .filter(|_| options.qemu)
                        .map(|path| path.display().to_string()),
                    paths,
                    run_dir,
                    nested: None,
                    next_guest: AtomicU64::new(0),
                })
            }
            LaneKind::Nested => {
                eprintln!(
                    "==== tidevm test lane: NESTED (L1 Linux under QEMU TCG with emulated AMD SVM, \
tidevm inside it); logs in {} ====",
                    run_dir.display()
                );
                let qemu = facts.qemu.clone().expect("choose_lane checked QEMU");
                let started = Instant::now();
                let mut extras: Vec<(&str, &Path)> = [
                    (L1_CH_REMOTE, ch_remote.as_deref()),
                    (L1_CLOUD_HYPERVISOR, cloud_hypervisor.as_deref()),
                ]
                .into_iter()
                .filter_map(|(at, host)| host.map(|host| (at, host)))
                .collect();
                let firmware_present = QEMU_MICROVM_FIRMWARE
                    .iter()
                    .all(|file| Path::new(file).is_file());
                let with_qemu = options.qemu && firmware_present;
                if options.qemu && !firmware_present {
                    eprintln!(
                        "==== no QEMU in this lane: missing firmware {} ====",
                        QEMU_MICROVM_FIRMWARE.join(" or ")
                    );
                }
                if with_qemu {
                    extras.push((L1_QEMU, qemu.as_path()));
                    extras.extend(
                        QEMU_MICROVM_FIRMWARE
                            .iter()
                            .map(|file| (*file, Path::new(file))),
                    );
                }
                let nested = NestedHost::boot(&qemu, &paths, &run_dir, tidevm_binary, &extras)?;
                eprintln!(
                    "==== L1 test host up after {:.1} s ====",
                    started.elapsed().as_secs_f64()
                );
                let lane = Lane {
                    kind,
                    lane_tidevm: "/usr/local/bin/tidevm".into(),
                    lane_work_dir: "/run/tidevm-lane".into(),
                    lane_ch_remote: ch_remote.map(|_| L1_CH_REMOTE.to_owned()),
                    lane_cloud_hypervisor: cloud_hypervisor.map(|_| L1_CLOUD_HYPERVISOR.to_owned()),
                    lane_qemu: with_qemu.then(|| L1_QEMU.to_owned()),
                    paths,
                    run_dir,
                    nested: Some(nested),
                    next_guest: AtomicU64::new(0),
                };
                let (rc, output) = lane.sh(
                    "mkdir -p /run/tidevm-lane && test -c /dev/kvm \
                     || { echo 'no /dev/kvm in L1'; dmesg | grep -i -e kvm -e svm; exit 1; }",
                    Duration::from_secs(60),
                )?;
                if rc != 0 {
                    return Err(lane.failure(format!("L1 preparation failed ({rc}): {output}")));
                }
                Ok(lane)
            }
        }
    }

    pub fn kind(&self) -> LaneKind {
        self.kind
    }

    /// Scales a time measured natively to this lane: the nested lane runs
    /// about ten times slower, and CI machines are busy.
    pub fn scaled(&self, native: Duration) -> Duration {
        match self.kind {
            LaneKind::Direct => native * 3,
            LaneKind::Nested => native * 15,
        }
    }

    /// Runs a shell script in the lane (in L1, or here for the direct lane)
    /// and returns its exit code and combined stdout+stderr. The script is
    /// killed after `timeout`, which is then an error.
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<(i32, String)> {
        match &self.nested {
            Some(nested) => nested
                .run(script, timeout)
                .map_err(|message| self.failure(message)),
            None => run_local(script, timeout, &self.run_dir),
        }
    }

    /// The last `lines` lines of L1's serial console (empty for the direct
    /// lane).
    pub fn l1_console_tail(&self, lines: usize) -> String {
        match &self.nested {
            Some(nested) => nested.console_tail(lines),
            None => String::new(),
        }
    }

    /// Host directory with this run's logs.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub(crate) fn failure(&self, message: impl Into<String>) -> LaneError {
        let message = message.into();
        match self.kind {
            LaneKind::Direct => LaneError::Failed(message),
            LaneKind::Nested => LaneError::Failed(format!(
                "{message}\n---- L1 console (last 30 lines, {}) ----\n{}",
                self.run_dir.join("l1-console.log").display(),
                self.l1_console_tail(30)
            )),
        }
    }

    /// Path of the tidevm binary as seen from inside the lane.
    pub fn lane_tidevm(&self) -> &str {
        &self.lane_tidevm
    }
    /// Path of Cloud Hypervisor's `ch-remote` as seen from inside the lane, if the lane has
    /// it (see [`ch_remote_binary`]).
    pub fn lane_ch_remote(&self) -> Option<&str> {
        self.lane_ch_remote.as_deref()
    }

    /// Path of Cloud Hypervisor as seen from inside the lane, if the lane has it (see
    /// [`cloud_hypervisor_binary`]).
    pub fn lane_cloud_hypervisor(&self) -> Option<&str> {
        self.lane_cloud_hypervisor.as_deref()
    }
    /// Path of QEMU as seen from inside the lane, if the lane was started with
    /// [`LaneOptions::qemu`] and has it.
    pub fn lane_qemu(&self) -> Option<&str> {
        self.lane_qemu.as_deref()
    }
    pub(crate) fn lane_work_dir(&self) -> &str {
        &self.lane_work_dir
    }
    pub(crate) fn lane_guest_kernel(&self) -> String {
        match self.kind {
            LaneKind::Direct => self.paths.guest_kernel().display().to_string(),
            LaneKind::Nested => "/guest/vmlinux".into(),
        }
    }
    pub(crate) fn lane_guest_initramfs(&self) -> String {
        match self.kind {
            LaneKind::Direct => self.paths.guest_initramfs().display().to_string(),
            LaneKind::Nested => "/guest/initramfs.cpio.gz".into(),
        }
    }
    /// Writes a fresh copy of the guest's ext4 root disk (build/guest/rootfs.ext4; the
    /// nested lane's L1 carries it compressed) to `dest`, a path inside the lane.
    pub fn copy_root_disk_to(&self, dest: &str, timeout: Duration) -> Result<()> {
        let dest = text::shell_quote(dest);
        let script = match self.kind {
            LaneKind::Direct => format!(
                "cp {} {dest}",
                text::shell_quote(&self.paths.guest_rootfs().display().to_string())
            ),
            LaneKind::Nested => format!("gunzip -c /guest/rootfs.ext4.gz > {dest}"),
        };
        match self.sh(&script, timeout)? {
            (0, _) => Ok(()),
            (rc, out) => Err(self.failure(format!(
                "copying the root disk to {dest} exited with {rc}: {out}"
            ))),
        }
    }
    pub(crate) fn next_guest_id(&self) -> u64 {
        self.next_guest.fetch_add(1, Ordering::Relaxed)
    }
}

/// CPUs of the nested lane's L1 test host: `TIDEVM_L1_CPUS`, by default 1.
///
/// One, because QEMU TCG's emulated SVM loses nested translations across L1 CPUs: an L2
/// guest keeps writing through a translation of a page that L1 freed or migrated on another
/// CPU. With two L1 CPUs that made L2 guests triple-fault after virtio-mem unplugs (tidevm
/// pinned to one L1 CPU avoided most of it, see `Lane::boot_guest`), and once it corrupted
/// L1 itself: "Kernel panic - not syncing: corrupted stack end detected inside scheduler"
/// in a vCPU thread handling an L2 triple fault. With a single L1 CPU, L1 runs only while
/// L2 is out of guest mode, and QEMU flushes its TLB at every VMRUN.
pub(crate) fn l1_cpus() -> u64 {
    std::env::var("TIDEVM_L1_CPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

fn new_run_dir(paths: &LanePaths) -> Result<PathBuf> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = paths
        .build_dir
        .join("lane-runs")
        .join(format!("{}-{run}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| LaneError::failed(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Runs `script` with `sh -c` here, output to a file (a pipe would stay open
/// as long as any background process the script starts keeps it).
fn run_local(script: &str, timeout: Duration, run_dir: &Path) -> Result<(i32, String)> {
    static COMMANDS: AtomicU64 = AtomicU64::new(0);
    let output_path = run_dir.join(format!(
        "sh-{}.out",
        COMMANDS.fetch_add(1, Ordering::Relaxed)
    ));
    let output = File::create(&output_path)
        .map_err(|e| LaneError::failed(format!("{}: {e}", output_path.display())))?;
    let errors = output
        .try_clone()
        .map_err(|e| LaneError::failed(e.to_string()))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .process_group(0)
        .spawn()
        .map_err(|e| LaneError::failed(format!("sh: {e}")))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_process_group(&mut child);
                let output = fs::read_to_string(&output_path).unwrap_or_default();
                let _ = fs::remove_file(&output_path);
                return Err(LaneError::failed(format!(
                    "command timed out after {timeout:?}: {script}\n---- its output ----\n{}",
                    text::tail_lines(&output, 30)
                )));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(LaneError::failed(format!("waiting for sh: {e}"))),
        }
    };
    let output = fs::read(&output_path).unwrap_or_default();
    let _ = fs::remove_file(&output_path);
    Ok((
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output).into_owned(),
    ))
}

fn kill_process_group(child: &mut Child) {
    let group = child.id() as libc::pid_t;
    // SAFETY: kill(2) takes plain integers and has no memory effects; the
    // group id is that of a child we spawned with process_group(0) and have
    // not reaped yet, so it cannot name an unrelated group.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// The L1 test host: a QEMU process and the agent connection.
struct NestedHost {
    agent: Mutex<Agent>,
    console_log: PathBuf,
    stop: Arc<AtomicBool>,
    keeper: Mutex<Option<JoinHandle<()>>>,
    qemu_exited: Arc<Mutex<Option<String>>>,
}

impl NestedHost {
    fn boot(
        qemu: &Path,
        paths: &LanePaths,
        run_dir: &Path,
        tidevm: &Path,
        extras: &[(&str, &Path)],
    ) -> Result<NestedHost> {
        let initrd = run_dir.join("l1-initrd.cpio");
        build_l1_initrd(&paths.l1_base_cpio(), tidevm, extras, &initrd)?;
        let console_log = run_dir.join("l1-console.log");
        let qemu_log = run_dir.join("qemu.log");
        // Unix socket paths are limited to 108 bytes, so the socket lives in
        // the temporary directory rather than under a deep checkout.
        let socket = std::env::temp_dir().join(format!(
            "tidevm-l1-{}-{}.sock",
            std::process::id(),
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = fs::remove_file(&socket);
        let mut command = Command::new(qemu);
        command
            .args(["-accel", "tcg", "-cpu", "max", "-m", "12G"])
            .args(["-smp", &l1_cpus().to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console_log.display()))
            .arg("-kernel")
            .arg(paths.l1_kernel())
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args(["-device", "virtio-serial"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["-device", "virtserialport,chardev=agent,name=agent"])
            .stdin(Stdio::null());
        let log = File::create(&qemu_log)
            .map_err(|e| LaneError::failed(format!("{}: {e}", qemu_log.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| LaneError::failed(e.to_string()))?;
        command.stdout(log).stderr(log_err);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe and touches no
        // memory of ours. PR_SET_PDEATHSIG makes the kernel SIGKILL QEMU when
        // the thread that forked it ends: that is the keeper thread below,
        // which lives as long as QEMU does or until this process dies, so
        // QEMU never outlives a test binary that exits without dropping the
        // lane (a shared lane in a static, or an abort).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let stop = Arc::new(AtomicBool::new(false));
        let qemu_exited = Arc::new(Mutex::new(None));
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
        let keeper = {
            let stop = stop.clone();
            let qemu_exited = qemu_exited.clone();
            thread::Builder::new()
                .name("l1-qemu-keeper".into())
                .spawn(move || keep_qemu(command, stop, qemu_exited, spawned_tx))
                .map_err(|e| LaneError::failed(format!("keeper thread: {e}")))?
        };
        let host = NestedHost {
            agent: Mutex::new(Agent::disconnected()),
            console_log,
            stop,
            keeper: Mutex::new(Some(keeper)),
            qemu_exited,
        };
        match spawned_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(LaneError::failed(message)),
            Err(_) => return Err(LaneError::failed("QEMU keeper thread died")),
        }
        let deadline = Instant::now() + l1_boot_timeout();
        let connected = host.connect_agent(&socket, deadline);
        let _ = fs::remove_file(&socket);
        // QEMU has read the initrd into guest memory by now.
        let _ = fs::remove_file(&initrd);
        if let Err(message) = connected {
            let qemu_output = fs::read_to_string(&qemu_log).unwrap_or_default();
            return Err(LaneError::failed(format!(
                "L1 did not come up: {message}\n---- QEMU output ----\n{}\n---- L1 console ----\n{}",
                text::tail_lines(&qemu_output, 20),
                host.console_tail(40)
            )));
        }
        Ok(host)
    }

    fn connect_agent(&self, socket: &Path, deadline: Instant) -> std::result::Result<(), String> {
        let stream = loop {
            self.check_alive()?;
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("connecting to {}: {e}", socket.display())),
            }
        };
        let mut agent = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        agent.stream = Some(stream);
        agent.read_until(deadline, &|| self.check_alive(), |buffer| {
            let hello = text::AGENT_HELLO.as_bytes();
            buffer
                .windows(hello.len())
                .position(|w| w == hello)
                .map(|at| ((), at + hello.len()))
        })
    }

    fn check_alive(&self) -> std::result::Result<(), String> {
        match &*self.qemu_exited.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(status) => Err(format!("QEMU exited: {status}")),
            None => Ok(()),
        }
    }

    fn run(&self, script: &str, timeout: Duration) -> std::result::Result<(i32, String), String> {
        let mut agent = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        let id = agent.next_id;
        agent.next_id += 1;
        let limit = timeout.as_secs().max(1) + u64::from(timeout.subsec_nanos() > 0);
        let request = text::agent_request(id, limit, script);
        agent
            .stream
            .as_mut()
            .ok_or("agent not connected")?
            .write_all(request.as_bytes())
            .map_err(|e| format!("sending to the L1 agent: {e}"))?;
        let started = Instant::now();
        // The agent kills the command at `limit`; the margin covers the
        // round trip on a slow L1.
        let deadline = started + Duration::from_secs(limit) + Duration::from_secs(30);
        let reply = agent
            .read_until(deadline, &|| self.check_alive(), |buffer| {
                text::parse_agent_reply(buffer, id).map(|reply| {
                    let consumed = reply.consumed;
                    (reply, consumed)
                })
            })
            .map_err(|e| format!("command in L1 failed: {e}\n  command: {script}"))?;
        if started.elapsed() >= Duration::from_secs(limit) && reply.exit_code == 137 {
            return Err(format!(
                "command in L1 timed out after {timeout:?}: {script}\n---- its output ----\n{}",
                text::tail_lines(&reply.output, 30)
            ));
        }
        Ok((reply.exit_code, reply.output))
    }

    fn console_tail(&self, lines: usize) -> String {
        let console = fs::read(&self.console_log).unwrap_or_default();
        text::tail_lines(&String::from_utf8_lossy(&console), lines)
    }
}

impl Drop for NestedHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(keeper) = self.keeper.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = keeper.join();
        }
    }
}

/// The keeper thread: spawns QEMU, watches it, kills it when asked. QEMU's
/// parent-death signal is tied to this thread (see the pre_exec above).
fn keep_qemu(
    mut command: Command,
    stop: Arc<AtomicBool>,
    exited: Arc<Mutex<Option<String>>>,
    spawned: std::sync::mpsc::Sender<std::result::Result<(), String>>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("starting QEMU: {e}");
            *exited.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
            let _ = spawned.send(Err(message));
            return;
        }
    };
    let _ = spawned.send(Ok(()));
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                *exited.lock().unwrap_or_else(|e| e.into_inner()) = Some(status.to_string());
                return;
            }
            Ok(None) if stop.load(Ordering::SeqCst) => {
                let _ = child.kill();
                let status = child.wait();
                *exited.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("killed by the harness ({status:?})"));
                return;
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                *exited.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("waiting for QEMU: {e}"));
                return;
            }
        }
    }
}

/// The connection to the L1 agent with bytes received but not yet used.
struct Agent {
    stream: Option<UnixStream>,
    buffer: Vec<u8>,
    next_id: u64,
}

impl Agent {
    fn disconnected() -> Agent {
        Agent {
            stream: None,
            buffer: Vec::new(),
            next_id: 1,
        }
    }

    /// Reads until `complete` finds what it wants in the buffer (returning
    /// the value and how many bytes to drop), the deadline passes, or
    /// `alive` reports that L1 is gone.
    fn read_until<T>(
        &mut self,
        deadline: Instant,
        alive: &dyn Fn() -> std::result::Result<(), String>,
        complete: impl Fn(&[u8]) -> Option<(T, usize)>,
    ) -> std::result::Result<T, String> {
        let stream = self.stream.as_mut().ok_or("agent not connected")?;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Some((value, consumed)) = complete(&self.buffer) {
                self.buffer.drain(..consumed);
                return Ok(value);
            }
            alive()?;
            let now = Instant::now();
            if now >= deadline {
                return Err("timed out waiting for the L1 agent".into());
            }
            // Short reads so a dead QEMU is noticed quickly.
            let slice = (deadline - now).min(Duration::from_millis(500));
            stream
                .set_read_timeout(Some(slice))
                .map_err(|e| e.to_string())?;
            match stream.read(&mut chunk) {
                Ok(0) => return Err("the L1 agent closed its connection".into()),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading from the L1 agent: {e}")),
            }
        }
    }
}

/// Writes L1's initrd for this run: the cached base archive followed by a
/// second archive with tidevm (as /usr/local/bin/tidevm), `ch-remote` if
/// given (as /usr/local/bin/ch-remote) and the shared libraries `ldd` lists
/// for them, at their own paths. The kernel unpacks concatenated archives one
/// after the other.
/// `base` plus a second archive with tidevm, the `extras` (L1 path, host path) and every
/// shared library they need.
fn build_l1_initrd(base: &Path, tidevm: &Path, extras: &[(&str, &Path)], out: &Path) -> Result<()> {
    let io_error =
        |what: &Path, e: io::Error| LaneError::failed(format!("{}: {e}", what.display()));
    fs::copy(base, out).map_err(|e| io_error(base, e))?;
    let mut files = Vec::new();
    let binaries = std::iter::once(("usr/local/bin/tidevm", tidevm)).chain(
        extras
            .iter()
            .map(|&(at, path)| (at.trim_start_matches('/'), path)),
    );
    for (name, binary) in binaries {
        files.push((name.to_string(), binary.to_path_buf()));
        let ldd = Command::new("ldd")
            .arg(binary)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| LaneError::failed(format!("ldd: {e}")))?;
        // A static binary makes ldd fail; it then needs no libraries.
        if ldd.status.success() {
            for library in text::parse_ldd(&String::from_utf8_lossy(&ldd.stdout)) {
                let name = library.trim_start_matches('/').to_string();
                // Every binary needs libc; one copy in the archive is enough.
                if files.iter().all(|(existing, _)| *existing != name) {
                    files.push((name, library.into()));
                }
            }
        }
    }
    let archive = File::options()
        .append(true)
        .open(out)
        .map_err(|e| io_error(out, e))?;
    let mut writer = CpioWriter::new(io::BufWriter::new(archive));
    for (name, source) in &files {
        // fs::read follows symlinks, so the archive gets the real contents.
        let data = fs::read(source).map_err(|e| io_error(source, e))?;
        writer
            .add_file(name, 0o755, &data)
            .map_err(|e| io_error(out, e))?;
    }
    writer
        .finish()
        .and_then(|mut w| w.flush())
        .map_err(|e| io_error(out, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn working_facts() -> LaneFacts {
        LaneFacts {
            requested: None,
            hardware_virtualization: true,
            kvm_usable: true,
            qemu: Some("/usr/bin/qemu-system-x86_64".into()),
            l1_images: true,
            guest_images: true,
        }
    }

    #[test]
    fn prefers_direct_with_hardware_virtualization() {
        assert_eq!(choose_lane(&working_facts()), Ok(LaneKind::Direct));
    }

    #[test]
    fn falls_back_to_nested_without_vmx_or_svm() {
        let facts = LaneFacts {
            hardware_virtualization: false,
            ..working_facts()
        };
        assert_eq!(choose_lane(&facts), Ok(LaneKind::Nested));
        let facts = LaneFacts {
            kvm_usable: false,
            ..facts
        };
        assert_eq!(choose_lane(&facts), Ok(LaneKind::Nested));
    }

    #[test]
    fn skips_when_no_lane_works() {
        let facts = LaneFacts {
            hardware_virtualization: false,
            qemu: None,
            ..working_facts()
        };
        let error = choose_lane(&facts).unwrap_err();
        assert!(error.is_skip());
        assert!(error.to_string().contains("qemu-system-x86_64 not found"));
        let facts = LaneFacts {
            hardware_virtualization: false,
            l1_images: false,
            ..working_facts()
        };
        assert!(choose_lane(&facts)
            .unwrap_err()
            .to_string()
            .contains("make l1"));
    }

    #[test]
    fn honours_the_override() {
        let nested = LaneFacts {
            requested: Some("nested".into()),
            ..working_facts()
        };
        assert_eq!(choose_lane(&nested), Ok(LaneKind::Nested));
        let direct_without_kvm = LaneFacts {
            requested: Some("direct".into()),
            hardware_virtualization: false,
            ..working_facts()
        };
        assert!(choose_lane(&direct_without_kvm).unwrap_err().is_skip());
        let bogus = LaneFacts {
            requested: Some("sideways".into()),
            ..working_facts()
        };
        assert!(matches!(choose_lane(&bogus), Err(LaneError::Failed(_))));
    }

    #[test]
    fn runs_local_commands_with_exit_codes_and_timeouts() {
        let dir = std::env::temp_dir().join(format!("tidevm-testlane-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (rc, output) = run_local(
            "echo out; echo err >&2; exit 4",
            Duration::from_secs(10),
            &dir,
        )
        .unwrap();
        assert_eq!(rc, 4);
        assert_eq!(output, "out\nerr\n");
        let started = Instant::now();
        let error = run_local("sleep 30", Duration::from_millis(300), &dir).unwrap_err();
        assert!(error.to_string().contains("timed out"));
        assert!(started.elapsed() < Duration::from_secs(10));
        let _ = fs::remove_dir_all(&dir);
    }
}
