//! Command-line interface.

mod bench;
mod bench_autopilot;
mod bench_balloon;
mod bench_boot_profile;
mod bench_boot_vs;
mod bench_dimm;
mod bench_rss;
mod bench_soak;
mod bench_virtio_mem;
mod ctl;
mod run;

use clap::{Parser, Subcommand};

/// tidevm: a KVM VMM for live memory resizing of Linux guests.
#[derive(Debug, Parser)]
#[command(name = "tidevm", version, about)]
pub struct Cli {
    /// What to log (a tracing filter: error, warn, info, debug, trace, or per module like
    /// `tidevm_vmm=debug`). Default: $TIDEVM_LOG, else warn.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// How log lines look on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    // Boxed: the run options are by far the largest variant (clippy::large_enum_variant).
    /// Boot a VM and run it until it powers off.
    Run(Box<run::RunArgs>),
    /// Control a running VM through its API socket.
    Ctl(ctl::CtlArgs),
    /// Measure tidevm with real Linux guests in the test lane this machine offers.
    Bench(bench::BenchArgs),
}

/// Runs the chosen command; returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Ctl(args) => {
            restore_default_sigpipe();
            ctl::ctl(args)
        }
        Command::Bench(args) => bench::bench(args),
    }
}

/// `tidevm ctl ... | head` must end quietly when `head` is done, as other command-line
/// tools do: Rust ignores SIGPIPE, so a write to the closed pipe fails, `println!` panics and
/// the fail-fast hook aborts. A client owns no VM, so the default action (end the process) is
/// right for it; `tidevm run` keeps SIGPIPE ignored, since its console and API write to
/// sockets a client may close.
fn restore_default_sigpipe() {
    // SAFETY: `signal` with SIG_DFL installs no handler code; it runs before `ctl` starts any
    // thread, and nothing in this process relies on SIGPIPE being ignored afterwards.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
