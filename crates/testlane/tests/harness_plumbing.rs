//! The guest driver's plumbing (FIFO console input, console log, command
//! markers, exit codes, ctl) against a stand-in VMM that serves a shell,
//! so it is tested before and independently of tidevm.

use std::path::Path;
use std::time::Duration;

use tidevm_testlane::{GuestOptions, Lane, LaneError};

#[test]
fn guest_driver_against_a_stand_in_vmm() {
    let stand_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-tidevm.sh");
    let lane = match Lane::start(&stand_in) {
        Ok(lane) => lane,
        Err(LaneError::Skip(reason)) => {
            eprintln!("\n***** SKIPPED: harness_plumbing: {reason} *****\n");
            println!("SKIPPED: harness_plumbing: {reason}");
            return;
        }
        Err(e) => panic!("starting the lane: {e}"),
    };
    let timeout = Duration::from_secs(120);
    let guest = lane
        .boot_guest(&GuestOptions {
            cpus: 2,
            memory: "1G".into(),
            extra_args: vec!["--flag".into(), "with space".into()],
            extra_cmdline: "quiet".into(),
            ..GuestOptions::default()
        })
        .unwrap();
    guest.wait_ready(timeout).unwrap();
    let first = guest.wait_for("fake-tidevm:", timeout).unwrap();
    assert!(first.contains("--cpus 2"), "{first}");
    assert!(first.contains("size=1G"), "{first}");
    assert!(
        first.contains("memhp_default_state=online_movable quiet"),
        "{first}"
    );
    assert!(first.ends_with("--flag with space"), "{first}");

    assert_eq!(guest.run("echo hello", timeout).unwrap(), "hello");
    assert_eq!(
        guest.run("echo one; echo two >&2", timeout).unwrap(),
        "one\ntwo"
    );
    let (status, output) = guest.run_status("echo failing; false", timeout).unwrap();
    assert_eq!((status, output.as_str()), (1, "failing"));
    let error = guest.run("exit_code_7() { return 7; }; exit_code_7", timeout);
    assert!(error.unwrap_err().to_string().contains("status 7"));
    assert_eq!(
        guest.run("printf 'no-newline'", timeout).unwrap(),
        "no-newline"
    );
    assert_eq!(
        guest.run("echo \"q'uo\\\"te\"", timeout).unwrap(),
        "q'uo\"te"
    );

    let (rc, output) = guest.ctl(&["info"]).unwrap();
    assert_eq!(rc, 0);
    assert!(output.contains("fake-ctl: ctl --api-socket"), "{output}");
    assert!(output.trim_end().ends_with("info"), "{output}");

    let rss = guest.vmm_rss_kib().unwrap();
    assert!(rss > 0);
    assert!(guest.vmm_smaps_rollup().unwrap().contains("Rss:"));
    assert!(guest.exit_status_now().unwrap().is_none());

    // A wait for text that never comes times out with the console attached.
    let error = guest
        .wait_for("never-printed", Duration::from_secs(2))
        .unwrap_err()
        .to_string();
    assert!(error.contains("timed out"), "{error}");
    assert!(error.contains("L2 console"), "{error}");

    assert_eq!(guest.poweroff(timeout).unwrap(), 0);

    // A second guest in the same lane, killed instead of powered off.
    let second = lane.boot_guest(&GuestOptions::default()).unwrap();
    second.wait_ready(timeout).unwrap();
    second.kill().unwrap();
    let (_, alive) = lane
        .sh(
            &format!(
                "kill -0 {} 2>/dev/null && echo alive || echo gone",
                second.pid()
            ),
            timeout,
        )
        .unwrap();
    assert_eq!(alive.trim(), "gone");
}
