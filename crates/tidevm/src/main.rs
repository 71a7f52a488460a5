//! The `tidevm` command: run a VM, control a running one, benchmark.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match cli::dispatch(args) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            // One line: the error and its causes, no backtrace.
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("tidevm: error: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}
