//! `tidevm run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tidevm_api::{parse_socket_mode, ApiServer, MetricsListener, DEFAULT_SOCKET_MODE};
use tidevm_vmm::config::{
    BalloonDeviceConfig, DiskConfig, MemoryConfig, NetDeviceConfig, NumaNodeConfig, SerialConfig,
    ViolationPolicy, VirtioMemDeviceConfig,
};
use tidevm_vmm::memory::host_memory_bytes;
use tidevm_vmm::memory_service::autopilot::PolicyConfig;
use tidevm_vmm::{VmConfig, Vmm};

/// Options of `tidevm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Uncompressed ELF vmlinux with a PVH entry point.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Boot memory: size=SIZE[,slots=N,maxmem=SIZE] (e.g. size=2G,slots=8,maxmem=34G: room
    /// for 8 ACPI DIMMs that together bring the guest up to 34 GiB).
    #[arg(long, default_value = "size=512M")]
    memory: String,
    /// Unix socket for the control API.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Permissions of the API socket, in octal (default 600: its owner only). Whoever may
    /// write the socket controls the VM; 660 lets the socket's group in too.
    #[arg(long, requires = "api_socket")]
    api_socket_mode: Option<String>,
    /// Guest console: stdout, off, file=PATH, socket=PATH or tcp=ADDR.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// A virtio-mem device (repeatable): id=ID,size=SIZE[,node=N][,block-size=SIZE]
    /// [,requested=SIZE][,backing=anon|memfd|hugetlbfs][,prealloc=on|off].
    #[arg(long = "virtio-mem")]
    virtio_mem: Vec<String>,
    /// A virtio-balloon: [size=SIZE][,deflate-on-oom=on][,free-page-reporting=on]
    /// [,stats-interval=5s][,discard=merged|per-page] (give an empty value for the defaults:
    /// `--balloon ""`). `discard=per-page` makes one syscall per 4 KiB page, QEMU's way, so
    /// that benchmarks can compare.
    #[arg(long)]
    balloon: Option<String>,
    /// A virtio-blk disk (repeatable): path=FILE[,readonly=on][,id=ID][,direct=on]. FILE is a
    /// raw image or a block device; ids default to disk0, disk1... in order; direct=on opens
    /// it with O_DIRECT (the guest then sees 4 KiB blocks).
    #[arg(long)]
    disk: Vec<String>,
    /// A virtio-net device (repeatable): tap=NAME|auto[,mac=XX:XX:XX:XX:XX:XX][,id=ID]. NAME
    /// is an existing TAP interface; auto creates one named tidevm<N> for the VMM's life.
    /// Ids default to net0, net1... in order; the MAC to a random locally administered one.
    #[arg(long)]
    net: Vec<String>,
    /// A NUMA node (repeatable): node=ID,cpus=LIST,memory=SIZE; the nodes' memory must add
    /// up to --memory.
    #[arg(long)]
    numa: Vec<String>,
    /// When the guest touches hotplug memory it does not own: report (log and API) or stop.
    /// An access inside a partly plugged 128 MiB chunk cannot be completed and always stops.
    #[arg(long, value_enum, default_value_t = OnViolation::Report)]
    on_memory_violation: OnViolation,
    /// Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics (off by default; the
    /// API socket serves the same text at GET /metrics). Anyone who can reach the port can
    /// read them: prefer a loopback address.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
    /// The autopilot's policy: auto,min=SIZE,max=SIZE[,floor=256M][,headroom=256M]
    /// [,growth-margin=512M][,band=256M][,interval=2s][,shrink-step=256M][,shrink-hold=30s]
    /// [,pressure-step=1G][,psi-some=10][,psi-full=5][,host-low=512M][,fault-rate=1000].
    /// Turns the memory autopilot on: every interval it reads the balloon's statistics (so
    /// it needs --balloon statistics at least once per interval) and the host's pressure,
    /// and sets the guest's total memory between min and max, as `PUT /vm/memory` would.
    #[arg(long)]
    memory_policy: Option<String>,
}

/// `--on-memory-violation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnViolation {
    /// Log it and show it in the API.
    Report,
    /// Also stop the VM.
    Stop,
}

impl RunArgs {
    fn to_config(&self) -> anyhow::Result<VmConfig> {
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: MemoryConfig::parse(&self.memory)?,
            serial: SerialConfig::parse(&self.serial)?,
            virtio_mem: self
                .virtio_mem
                .iter()
                .map(|v| VirtioMemDeviceConfig::parse(v))
                .collect::<Result<_, _>>()?,
            balloon: self
                .balloon
                .as_deref()
                .map(BalloonDeviceConfig::parse)
                .transpose()?,
            numa: self
                .numa
                .iter()
                .map(|v| NumaNodeConfig::parse(v))
                .collect::<Result<_, _>>()?,
            violation_policy: match self.on_memory_violation {
                OnViolation::Report => ViolationPolicy::Report,
                OnViolation::Stop => ViolationPolicy::Stop,
            },
            dimms: Vec::new(),
            memory_policy: self
                .memory_policy
                .as_deref()
                .map(PolicyConfig::parse)
                .transpose()?,
            disks: self
                .disk
                .iter()
                .enumerate()
                .map(|(index, v)| DiskConfig::parse(v, index))
                .collect::<Result<_, _>>()?,
            nets: self
                .net
                .iter()
                .enumerate()
                .map(|(index, v)| NetDeviceConfig::parse(v, index))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Boots the VM; returns 0 when the guest powers off or is shut down.
pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let config = args.to_config()?;
    config.validate(host_memory_bytes())?;
    let socket_mode = match args.api_socket_mode.as_deref() {
        Some(text) => parse_socket_mode(text).context("--api-socket-mode")?,
        None => DEFAULT_SOCKET_MODE,
    };
    // Bind the API socket before booting so that a busy path fails fast.
    let api = args
        .api_socket
        .as_deref()
        .map(|path| ApiServer::bind_with_mode(path, socket_mode))
        .transpose()?;
    // Parsed here, not by clap, so that a bad value is one `tidevm: error:` line.
    let metrics_addr = args
        .metrics_listen
        .as_deref()
        .map(|text| {
            text.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "invalid --metrics-listen '{text}': expected ADDR:PORT, e.g. 127.0.0.1:9464 \
                     or [::1]:9464"
                )
            })
        })
        .transpose()?;
    // Bound before booting, like the API socket, so that a busy port fails fast.
    let metrics = metrics_addr.map(MetricsListener::bind).transpose()?;
    let mut vmm = Vmm::new(config)?;
    if let Some(server) = &api {
        vmm.set_api_request_counts(server.request_counts());
    }
    let metrics_thread = match &metrics {
        Some(listener) => {
            tracing::info!(
                "serving metrics at http://{}/metrics",
                listener.local_addr()
            );
            Some(
                listener
                    .spawn(vmm.api_handler()?)
                    .context("cannot start the metrics listener")?,
            )
        }
        None => None,
    };
    let api_thread = match &api {
        Some(server) => Some(
            server
                .spawn(vmm.api_handler()?)
                .context("cannot start the API server")?,
        ),
        None => None,
    };
    let result = vmm.run();
    if let Some(server) = &api {
        server.shutdown();
    }
    if let Some(listener) = &metrics {
        listener.shutdown();
    }
    if let Some(thread) = api_thread {
        // Wait for the answer to a shutdown request to reach its client.
        let _ = thread.join();
    }
    if let Some(thread) = metrics_thread {
        let _ = thread.join();
    }
    Ok(u8::try_from(result?).unwrap_or(1))
}
