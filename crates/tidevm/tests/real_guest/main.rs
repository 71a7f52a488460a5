//! Real Linux guests under tidevm, in the lane the machine offers (direct hardware KVM or the
//! nested QEMU-TCG test host). One lane per run; scenarios run one after another in it.
//!
//! `cargo test --release -p tidevm --test real_guest [-- FILTER]`

mod foundation;
mod virtio_mem;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use tidevm_testlane::{start_or_skip, Lane, Result};

/// A scenario: boots what it needs, checks, cleans up. An `Err` or a panic fails it.
pub type Scenario = fn(&Lane) -> Result<()>;

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let scenarios: Vec<(&str, Scenario)> = foundation::SCENARIOS
        .iter()
        .chain(virtio_mem::SCENARIOS)
        .copied()
        .collect();
    let selected: Vec<_> = scenarios
        .into_iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    if selected.is_empty() {
        println!("real_guest: no scenario matches");
        return;
    }
    let Some(lane) = start_or_skip("real_guest") else {
        return;
    };
    println!(
        "real_guest: lane {:?}, {} scenarios",
        lane.kind(),
        selected.len()
    );
    let mut failed = Vec::new();
    for (name, scenario) in selected {
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| scenario(&lane)));
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(())) => println!("test {name} ... ok ({seconds:.1} s)"),
            Ok(Err(e)) => {
                println!("test {name} ... FAILED ({seconds:.1} s)\n{e}");
                failed.push(name);
            }
            Err(_) => {
                println!("test {name} ... FAILED (panicked after {seconds:.1} s)");
                println!("L1 console tail:\n{}", lane.l1_console_tail(30));
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        println!("real_guest: {} failed: {}", failed.len(), failed.join(", "));
        std::process::exit(1);
    }
    println!("real_guest: all passed");
}
