//! `tidevm ctl`: a client for the control API.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use std::time::{Duration, Instant};

use tidevm_api::ApiClient;

/// Options of `tidevm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Print the VM's state, vCPUs and memory layout as JSON.
    Info,
    /// Stop the VM now (no guest shutdown).
    Shutdown,
    /// Reset the VM and boot it again.
    Reboot,
    /// Set the balloon's target (memory the guest gives back), e.g. 1G; 0 deflates it.
    Balloon {
        /// The target size.
        size: String,
        /// Wait until the guest's balloon reaches it (by the host's own count).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print the balloon: target, the guest's claims and statistics, the host's measurements.
    BalloonStats,
    /// Ask the guest to resize a virtio-mem device's plugged memory to SIZE (e.g. 4G, 0).
    ResizeMem {
        /// The device id (from --virtio-mem id=...).
        id: String,
        /// The new requested size.
        size: String,
        /// Wait until the guest has plugged or unplugged it (or say why not).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// Runs one API call and prints its result.
pub fn ctl(args: CtlArgs) -> anyhow::Result<u8> {
    let client = ApiClient::new(args.api_socket);
    match args.command {
        CtlCommand::Info => {
            let info = client.vm_info()?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        CtlCommand::Shutdown => client.shutdown()?,
        CtlCommand::Reboot => client.reboot()?,
        CtlCommand::Balloon {
            size,
            wait,
            timeout,
        } => {
            let bytes = tidevm_api::parse_byte_size(&size).ok_or_else(|| {
                anyhow::anyhow!("invalid size '{size}': expected e.g. 512M, 1G or 0")
            })?;
            client.set_balloon(bytes)?;
            if wait {
                return wait_for_balloon(&client, bytes, Duration::from_secs(timeout));
            }
        }
        CtlCommand::BalloonStats => {
            let info = client.balloon()?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        CtlCommand::ResizeMem {
            id,
            size,
            wait,
            timeout,
        } => {
            let bytes = tidevm_api::parse_byte_size(&size).ok_or_else(|| {
                anyhow::anyhow!("invalid size '{size}': expected e.g. 512M, 4G or 0")
            })?;
            let started = Instant::now();
            client.resize_virtio_mem(&id, bytes)?;
            if wait {
                return wait_for_plugged(
                    &client,
                    &id,
                    bytes,
                    started,
                    Duration::from_secs(timeout),
                );
            }
        }
    }
    Ok(0)
}

/// Polls the balloon until the host's count of inflated memory reaches `target`.
fn wait_for_balloon(client: &ApiClient, target: u64, timeout: Duration) -> anyhow::Result<u8> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let info = client.balloon()?;
        if last != Some(info.inflated_bytes) {
            eprintln!(
                "balloon: {} MiB inflated (guest claims {} MiB) of {} MiB target ({:.1} s)",
                info.inflated_bytes >> 20,
                info.actual_bytes >> 20,
                target >> 20,
                started.elapsed().as_secs_f64()
            );
            last = Some(info.inflated_bytes);
        }
        if info.inflated_bytes == target {
            println!(
                "balloon: {} MiB after {:.2} s",
                target >> 20,
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if started.elapsed() >= timeout {
            eprintln!(
                "tidevm: error: the balloon reached {} MiB of {} MiB in {} s (the guest may \
                 lack free memory to give, or deflated on OOM)",
                info.inflated_bytes >> 20,
                target >> 20,
                timeout.as_secs()
            );
            return Ok(2);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the device until its plugged size reaches `target`, printing progress; returns 0
/// when reached, 2 (with the reason) when the guest does not get there in time.
fn wait_for_plugged(
    client: &ApiClient,
    id: &str,
    target: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let mut last_plugged = None;
    loop {
        let info = client.vm_info()?;
        let device = info
            .virtio_mem
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| anyhow::anyhow!("virtio-mem device {id} disappeared"))?;
        if last_plugged != Some(device.plugged_size) {
            eprintln!(
                "{id}: plugged {} MiB of {} MiB requested ({:.1} s)",
                device.plugged_size >> 20,
                device.requested_size >> 20,
                started.elapsed().as_secs_f64()
            );
            last_plugged = Some(device.plugged_size);
        }
        if device.plugged_size == target {
            println!(
                "{id}: {} MiB plugged after {:.2} s",
                target >> 20,
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if started.elapsed() >= timeout {
            let why = device.last_busy_reason.clone().unwrap_or_else(|| {
                if device.plugged_size > target {
                    "the guest could not unplug more (memory in use by the guest kernel, \
                     or not movable)"
                        .into()
                } else {
                    "the guest did not plug more (driver not loaded, or memory not onlined)".into()
                }
            });
            eprintln!(
                "tidevm: error: {id} reached {} MiB of the requested {} MiB in {} s: {why}",
                device.plugged_size >> 20,
                target >> 20,
                timeout.as_secs()
            );
            return Ok(2);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
