//! The lane itself: L1 boots (nested lane) with a usable /dev/kvm, and its
//! command channel returns output and exit codes and survives timeouts.
//! Runs without the VMM: a stand-in binary goes into the lane.

use std::path::Path;
use std::time::{Duration, Instant};

use tidevm_testlane::{Lane, LaneError, LaneKind};

fn start() -> Option<Lane> {
    let stand_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-tidevm.sh");
    match Lane::start(&stand_in) {
        Ok(lane) => Some(lane),
        Err(LaneError::Skip(reason)) => {
            eprintln!("\n***** SKIPPED: lane_smoke: {reason} *****\n");
            println!("SKIPPED: lane_smoke: {reason}");
            None
        }
        Err(e) => panic!("starting the lane: {e}"),
    }
}

#[test]
fn lane_runs_commands_and_has_kvm() {
    let Some(lane) = start() else { return };

    let (rc, output) = lane
        .sh(
            "ls -l /dev/kvm; dmesg | grep -i nested",
            Duration::from_secs(60),
        )
        .unwrap();
    println!("{output}");
    assert!(output.contains("/dev/kvm"), "no /dev/kvm: {output}");
    if lane.kind() == LaneKind::Nested {
        assert_eq!(rc, 0);
        assert!(
            output.contains("Nested"),
            "kvm_amd nested not enabled: {output}"
        );
        let (_, thp) = lane
            .sh(
                "cat /sys/kernel/mm/transparent_hugepage/enabled",
                Duration::from_secs(30),
            )
            .unwrap();
        // Each guest sets THP for itself (`L1Thp`); L1 boots with the kernel's choice, one
        // of the three modes, bracketed.
        assert!(
            ["[always]", "[madvise]", "[never]"]
                .iter()
                .any(|mode| thp.contains(mode)),
            "L1 THP setting unreadable: {thp}"
        );
    }

    let (rc, output) = lane
        .sh(
            "echo to-stdout; echo to-stderr >&2; exit 3",
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(rc, 3);
    assert_eq!(output, "to-stdout\nto-stderr\n");

    // A command that overruns its timeout is an error, and the channel
    // still works afterwards.
    let started = Instant::now();
    let error = lane.sh("sleep 60", Duration::from_secs(2)).unwrap_err();
    assert!(error.to_string().contains("timed out"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(45));
    let (rc, output) = lane
        .sh("echo still-alive", Duration::from_secs(30))
        .unwrap();
    assert_eq!((rc, output.as_str()), (0, "still-alive\n"));

    // Output with no final newline, quotes and a large body come back intact.
    let (_, output) = lane
        .sh("printf 'a\"b'\"'\"'c'", Duration::from_secs(30))
        .unwrap();
    assert_eq!(output, "a\"b'c");
    let (_, output) = lane.sh("seq 1 20000", Duration::from_secs(60)).unwrap();
    assert_eq!(output.lines().count(), 20000);
    assert!(output.ends_with("19999\n20000\n"));
}
