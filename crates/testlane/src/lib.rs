//! Test lanes for tidevm: boot real Linux guests under tidevm, either on
//! this machine's hardware KVM (direct lane) or inside a nested L1 test host
//! running under QEMU TCG with emulated AMD SVM (nested lane), and drive
//! them from Rust tests.
//!
//! ```no_run
//! use std::time::Duration;
//! use tidevm_testlane::{tidevm_binary, GuestOptions, Lane, LaneError};
//!
//! let lane = match tidevm_binary().and_then(|bin| Lane::start(&bin)) {
//!     Ok(lane) => lane,
//!     Err(LaneError::Skip(reason)) => {
//!         eprintln!("SKIPPED: {reason}");
//!         return;
//!     }
//!     Err(e) => panic!("{e}"),
//! };
//! let guest = lane.boot_guest(&GuestOptions::default()).unwrap();
//! guest.wait_ready(Duration::from_secs(300)).unwrap();
//! println!("{}", guest.run("head -1 /proc/meminfo", Duration::from_secs(60)).unwrap());
//! ```

mod cpio;
mod error;
mod guest;
mod lane;
pub mod text;

pub use error::{LaneError, Result};
pub use guest::{Guest, GuestOptions, L1Thp, GUEST_PROMPT, GUEST_READY, TRIPLE_FAULT};
pub use lane::{
    ch_remote_binary, choose_lane, cloud_hypervisor_binary, tidevm_binary, workspace_root, Lane,
    LaneFacts, LaneKind, LaneOptions, LanePaths,
};

/// Starts a lane for the tidevm binary found by [`tidevm_binary`], or prints
/// `SKIPPED: <reason>` loudly and returns `None`. Panics on real failures.
/// For tests: `let Some(lane) = start_or_skip("my_test") else { return };`
pub fn start_or_skip(test_name: &str) -> Option<Lane> {
    match tidevm_binary().and_then(|binary| Lane::start(&binary)) {
        Ok(lane) => Some(lane),
        Err(LaneError::Skip(reason)) => {
            eprintln!();
            eprintln!("**************************************************************");
            eprintln!("SKIPPED: {test_name}: {reason}");
            eprintln!("**************************************************************");
            println!("SKIPPED: {test_name}: {reason}");
            None
        }
        Err(error) => panic!("{test_name}: could not start the test lane: {error}"),
    }
}
