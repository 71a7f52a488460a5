//! tidevm-demo: boots a 2-vCPU, 1 GiB Linux guest under tidevm in the test
//! lane this machine supports, shows its boot, and powers it off.
//!
//! Usage: tidevm-demo [--tidevm PATH]

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use tidevm_testlane::{tidevm_binary, Guest, GuestOptions, Lane, LaneError, GUEST_PROMPT};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(LaneError::Skip(reason)) => {
            eprintln!("SKIPPED: the demo cannot run here: {reason}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<Option<PathBuf>, LaneError> {
    let mut args = std::env::args().skip(1);
    let mut tidevm = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tidevm" => {
                tidevm =
                    Some(PathBuf::from(args.next().ok_or_else(|| {
                        LaneError::Failed("--tidevm needs a path".into())
                    })?))
            }
            "-h" | "--help" => {
                println!("usage: tidevm-demo [--tidevm PATH]");
                std::process::exit(0);
            }
            other => return Err(LaneError::Failed(format!("unknown argument {other}"))),
        }
    }
    Ok(tidevm)
}

fn step(title: &str) {
    println!("\n=== {title} ===");
}

fn run() -> Result<(), LaneError> {
    let tidevm = match parse_args()? {
        Some(path) => path,
        None => tidevm_binary()?,
    };
    step("starting the test lane");
    let lane = Lane::start(&tidevm)?;

    step("booting a guest: 2 vCPUs, 1 GiB, and a virtio-mem device of up to 4 GiB");
    let started = Instant::now();
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 2,
        memory: "1G".into(),
        extra_args: vec!["--virtio-mem".into(), "id=mem0,size=4G".into()],
        ..GuestOptions::default()
    })?;
    stream_boot(&guest, lane.scaled(Duration::from_secs(20)))?;
    println!(
        "\n(guest ready {:.1} s after tidevm started)",
        started.elapsed().as_secs_f64()
    );

    let command_timeout = lane.scaled(Duration::from_secs(4));
    step("guest: head -3 /proc/meminfo");
    println!("{}", guest.run("head -3 /proc/meminfo", command_timeout)?);

    step("tidevm ctl info");
    let (status, info) = guest.ctl(&["info"])?;
    println!("{info}");
    if status != 0 {
        return Err(guest.failure(format!("tidevm ctl info exited with {status}")));
    }

    for size in ["2G", "0"] {
        step(&format!("tidevm ctl resize-mem mem0 {size} --wait"));
        let (status, out) = lane.sh(
            &format!(
                "{} ctl --api-socket {} resize-mem mem0 {size} --wait --timeout 280 2>&1",
                lane.lane_tidevm(),
                guest.api_socket()
            ),
            lane.scaled(Duration::from_secs(30))
                .max(Duration::from_secs(300)),
        )?;
        println!("{}", out.trim());
        if status != 0 {
            return Err(guest.failure(format!("resize-mem exited with {status}")));
        }
        // The guest onlines or offlines the memory a moment after the device answers.
        std::thread::sleep(Duration::from_secs(2));
        println!(
            "{}",
            guest.run("grep MemTotal /proc/meminfo", command_timeout)?
        );
        println!("tidevm RSS: {} KiB", guest.vmm_rss_kib()?);
    }

    step("powering off");
    let code = guest.poweroff(lane.scaled(Duration::from_secs(10)))?;
    println!("tidevm exited with code {code}");
    if code != 0 {
        return Err(guest.failure(format!("tidevm exited with {code} after poweroff")));
    }
    Ok(())
}

/// Prints the console as it grows until the guest shell is ready.
fn stream_boot(guest: &Guest<'_>, timeout: Duration) -> Result<(), LaneError> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    loop {
        let chunk = guest.console_from(offset)?;
        offset += chunk.len() as u64;
        print!("{chunk}");
        if let Some(code) = guest.exit_status_now()? {
            return Err(guest.failure(format!("tidevm exited with {code} during boot")));
        }
        if guest.wait_for_from(GUEST_PROMPT, 0, Duration::ZERO).is_ok() {
            // Print whatever arrived between the two reads.
            print!("{}", guest.console_from(offset)?);
            println!();
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(guest.failure(format!("the guest shell was not ready within {timeout:?}")));
        }
        thread::sleep(Duration::from_millis(500));
    }
}
