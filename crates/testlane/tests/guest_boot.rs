//! A real Linux guest under tidevm: boots to its shell, runs commands,
//! answers `tidevm ctl info`, and powers off cleanly.

use std::time::Duration;

use tidevm_testlane::{start_or_skip, GuestOptions};

#[test]
fn boots_runs_commands_and_powers_off() {
    let Some(lane) = start_or_skip("guest_boot") else {
        return;
    };
    let guest = lane
        .boot_guest(&GuestOptions {
            cpus: 2,
            memory: "1G".into(),
            ..GuestOptions::default()
        })
        .unwrap();
    guest
        .wait_ready(lane.scaled(Duration::from_secs(20)))
        .unwrap_or_else(|e| panic!("{e}"));

    let command_timeout = lane.scaled(Duration::from_secs(4));
    let meminfo = guest.run("head -3 /proc/meminfo", command_timeout).unwrap();
    assert!(meminfo.starts_with("MemTotal:"), "{meminfo}");
    let cpus = guest.run("nproc", command_timeout).unwrap();
    assert_eq!(cpus.trim(), "2");
    let modules = guest.run("cat /proc/modules", command_timeout).unwrap();
    assert!(modules.contains("virtio_mem"), "{modules}");

    let (status, info) = guest.ctl(&["info"]).unwrap();
    assert_eq!(status, 0, "tidevm ctl info: {info}");

    let code = guest
        .poweroff(lane.scaled(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 0, "tidevm exit code after poweroff");
}
