//! Real Linux guests under tidevm, in the lane the machine offers (direct hardware KVM or the
//! nested QEMU-TCG test host). Each lane boots once; scenarios run one after another in it.
//! In the nested lane, a machine with more cores boots one L1 test host per core (two on a
//! 2-core machine, see [`lane_count`]), and the lanes take scenarios from one queue, slowest
//! first.
//!
//! `cargo test --release -p tidevm --test real_guest [-- FILTER]`

mod autopilot;
mod balloon;
mod block;
mod ch_compat;
mod dimm;
mod foundation;
mod net;
mod page_cache;
mod virtio_mem;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::Instant;

use tidevm_testlane::{
    choose_lane, start_or_skip, Lane, LaneFacts, LaneKind, LanePaths, Result, TRIPLE_FAULT,
};

/// A scenario: boots what it needs, checks, cleans up. An `Err` or a panic fails it.
pub type Scenario = fn(&Lane) -> Result<()>;

/// The scenarios that take longest in the nested lane, slowest first (seconds measured on
/// 2026-12-05 with one lane: 620, 325, 150, 117, 114, 102). They start first so
/// that the lanes finish together; the rest follow in the order they are listed.
const SLOWEST_FIRST: &[&str] = &[
    "page_cache_balloon_and_reporting",
    "ch_compat_ch_remote_resizes",
    "balloon_inflate_deflate",
    "virtio_mem_plug_unplug",
    "boot_2cpu_6g_and_reboot",
    "autopilot_follows_a_ramp",
];

/// Host memory set aside for each L1 test host when counting lanes. L1 has 12 GiB, which
/// QEMU fills lazily: in a full run with two lanes (2026-12-06) the two QEMUs peaked at 3.5
/// and 3.8 GiB resident.
const L1_MEMORY_GIB: u64 = 10;

/// How many lanes to run side by side: `TIDEVM_LANES` if set; otherwise one per host CPU
/// for the nested lane, as far as free memory allows (an L1 test host has one CPU, since
/// QEMU TCG's emulated SVM loses nested translations with two, so a second core can only
/// serve a second L1), and one for the direct lane (its guests share this host's memory).
fn lane_count(selected: usize) -> usize {
    let requested = std::env::var("TIDEVM_LANES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n >= 1);
    let count = requested.unwrap_or_else(|| {
        let nested = matches!(
            choose_lane(&LaneFacts::probe(&LanePaths::from_env())),
            Ok(LaneKind::Nested)
        );
        if !nested {
            return 1;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let by_memory = (mem_available_gib() / L1_MEMORY_GIB) as usize;
        cpus.min(by_memory).max(1)
    });
    count.min(selected)
}

/// `MemAvailable` of this host, in GiB (0 if unreadable).
fn mem_available_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib >> 20)
}

/// Whether the lane still answers (the nested L1 host can die under QEMU TCG).
fn lane_alive(lane: &Lane) -> bool {
    matches!(
        lane.sh("true", std::time::Duration::from_secs(30)),
        Ok((0, _))
    )
}

/// What the lanes share: the scenarios not yet taken and the names of those that failed.
struct Queue<'a> {
    pending: Mutex<VecDeque<(&'a str, Scenario)>>,
    failed: Mutex<Vec<String>>,
}

impl Queue<'_> {
    fn fail(&self, name: String) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name);
    }
}

/// Whether a lane could start at all.
enum LaneOutcome {
    Ran,
    Skipped,
}

/// Starts a lane and runs scenarios from the queue in it until the queue is empty. A panic
/// while starting (the lane could not come up) counts as a failure; the other lanes go on.
fn run_lane(number: usize, queue: &Queue) -> LaneOutcome {
    let started = catch_unwind(AssertUnwindSafe(|| start_or_skip("real_guest")));
    let mut lane = match started {
        Ok(Some(lane)) => lane,
        Ok(None) => return LaneOutcome::Skipped,
        Err(_) => {
            queue.fail(format!("lane {number} (could not start)"));
            return LaneOutcome::Ran;
        }
    };
    println!("real_guest: lane {number} is {:?}", lane.kind());
    loop {
        let next = queue
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let Some((name, scenario)) = next else {
            return LaneOutcome::Ran;
        };
        let started = Instant::now();
        let mut outcome = catch_unwind(AssertUnwindSafe(|| scenario(&lane)));
        if !matches!(outcome, Ok(Ok(()))) && !lane_alive(&lane) {
            // The nested test host itself died (QEMU's emulated SVM has crashed the L1
            // kernel under heavy nested paging traffic). That is a fault of the lane, not of
            // tidevm: say so loudly, show the L1 console, boot a new test host and run the
            // scenario once more. A second failure counts.
            println!(
                "LANE FAULT: the L1 test host of lane {number} died during {name}; its \
                 console:\n{}\nrestarting the test host and running {name} again",
                lane.l1_console_tail(40)
            );
            match catch_unwind(AssertUnwindSafe(|| start_or_skip("real_guest"))) {
                Ok(Some(fresh)) => lane = fresh,
                _ => {
                    queue.fail(format!("{name} (lane {number} could not restart)"));
                    return LaneOutcome::Ran;
                }
            }
            outcome = catch_unwind(AssertUnwindSafe(|| scenario(&lane)));
        }
        if let Ok(Err(e)) = &outcome {
            if lane.kind() == LaneKind::Nested && e.to_string().contains(TRIPLE_FAULT) {
                // A known fault of the nested lane: QEMU TCG's emulated SVM loses a nested
                // translation when L1 frees a page under an L2 running on the other L1 CPU,
                // and the guest triple-faults (see `Lane::boot_guest`, which pins tidevm to
                // one L1 CPU to avoid it). Should it strike anyway, say so loudly and run the
                // scenario once more; a second failure counts. Hardware lanes get no rerun.
                println!(
                    "GUEST TRIPLE FAULT during {name} (nested-lane fault despite pinning):\n{e}\n\
                     running {name} again"
                );
                outcome = catch_unwind(AssertUnwindSafe(|| scenario(&lane)));
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(())) => println!("test {name} ... ok ({seconds:.1} s, lane {number})"),
            Ok(Err(e)) => {
                println!("test {name} ... FAILED ({seconds:.1} s, lane {number})\n{e}");
                queue.fail(name.to_string());
            }
            Err(_) => {
                println!("test {name} ... FAILED (panicked after {seconds:.1} s, lane {number})");
                println!("L1 console tail:\n{}", lane.l1_console_tail(30));
                queue.fail(name.to_string());
            }
        }
    }
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let scenarios: Vec<(&str, Scenario)> = foundation::SCENARIOS
        .iter()
        .chain(virtio_mem::SCENARIOS)
        .chain(dimm::SCENARIOS)
        .chain(autopilot::SCENARIOS)
        .chain(balloon::SCENARIOS)
        .chain(ch_compat::SCENARIOS)
        .chain(block::SCENARIOS)
        .chain(page_cache::SCENARIOS)
        .chain(net::SCENARIOS)
        .copied()
        .collect();
    let mut selected: Vec<_> = scenarios
        .into_iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    if selected.is_empty() {
        println!("real_guest: no scenario matches");
        return;
    }
    // A stable sort: the slowest first, in their order, then the rest as listed.
    selected.sort_by_key(|(name, _)| {
        SLOWEST_FIRST
            .iter()
            .position(|slow| slow == name)
            .unwrap_or(SLOWEST_FIRST.len())
    });
    let lanes = lane_count(selected.len());
    println!(
        "real_guest: {} scenario{} in {lanes} lane{}",
        selected.len(),
        if selected.len() == 1 { "" } else { "s" },
        if lanes == 1 { "" } else { "s side by side" }
    );
    let queue = Queue {
        pending: Mutex::new(selected.into_iter().collect()),
        failed: Mutex::new(Vec::new()),
    };
    let outcomes: Vec<LaneOutcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=lanes)
            .map(|number| {
                let queue = &queue;
                scope.spawn(move || run_lane(number, queue))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(LaneOutcome::Ran))
            .collect()
    });
    if outcomes.iter().all(|o| matches!(o, LaneOutcome::Skipped)) {
        // start_or_skip has said why, loudly.
        return;
    }
    let mut failed = queue.failed.into_inner().unwrap_or_else(|e| e.into_inner());
    let not_run = queue
        .pending
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    failed.extend(not_run.iter().map(|(name, _)| format!("{name} (not run)")));
    if !failed.is_empty() {
        println!("real_guest: {} failed: {}", failed.len(), failed.join(", "));
        std::process::exit(1);
    }
    println!("real_guest: all passed");
}
