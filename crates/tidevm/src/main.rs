//! The `tidevm` command: run a VM, control a running one, benchmark.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Release builds unwind on panic so that a panicking API handler answers 500 instead of
/// killing the VM (the API server catches it). Every other thread (the control loop, vCPUs,
/// the console) must still fail fast: a vCPU thread that died alone would leave a hung VM.
fn fail_fast_outside_the_api() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let name = std::thread::current().name().map(str::to_owned);
        let api = name.as_deref().is_some_and(|n| n.starts_with("tidevm-api"));
        if !api {
            eprintln!(
                "tidevm: thread {} panicked; aborting",
                name.as_deref().unwrap_or("?")
            );
            std::process::abort();
        }
    }));
}

/// Sets up logging to stderr as `--log-level` and `--log-format` ask; a filter that does
/// not parse is a usage error, named.
fn init_logging(args: &cli::Cli) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match &args.log_level {
        Some(level) => {
            EnvFilter::try_new(level).map_err(|e| format!("invalid --log-level '{level}': {e}"))?
        }
        None => EnvFilter::try_from_env("TIDEVM_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    fail_fast_outside_the_api();
    let args = cli::Cli::parse();
    if let Err(message) = init_logging(&args) {
        eprintln!("tidevm: error: {message}");
        return ExitCode::from(2);
    }
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
