//! `tidevm ctl`: a client for the control API.

use std::path::PathBuf;

use clap::{Args, Subcommand};
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
    }
    Ok(0)
}
