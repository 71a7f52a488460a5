//! Issue 12: virtio-net with the real Linux driver over a TAP that tidevm creates
//! (`--net tap=auto`) in the lane's host: TCP both ways with busybox `nc`, a 32 MiB transfer
//! from the lane's host to the guest and an 8 MiB one back, each checked with md5 on both
//! sides, the device's counters in `GET /vm/info`, and the same TAP working after a reboot.
//!
//! Addresses are link-local only (169.254.10.0/24), on a TAP that exists only inside the
//! lane's host: no test traffic can go anywhere else.

use std::time::{Duration, Instant};

use tidevm_api::{NetInfo, VmInfo};
use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use crate::foundation::{check, md5_of, BOOT, CMD};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[("net_tcp_both_ways", tcp_both_ways)];

const HOST_IP: &str = "169.254.10.1";
const GUEST_IP: &str = "169.254.10.2";
const GUEST_MAC: &str = "02:74:69:64:0a:02";
const BIG_MIB: u64 = 32;
const BACK_MIB: u64 = 8;
/// Files in the lane's host (L1's /run, a tmpfs).
const BIG: &str = "/run/tidevm-net-big.bin";
const FROM_GUEST: &str = "/run/tidevm-net-from-guest";
const TRANSFER: Duration = Duration::from_secs(120);

fn info(guest: &Guest) -> Result<VmInfo> {
    let (rc, out) = guest.ctl(&["info"])?;
    check(rc == 0, guest, format!("ctl info failed: {out}"))?;
    serde_json::from_str(&out).map_err(|e| guest.failure(format!("bad info JSON ({e}): {out}")))
}

fn net(guest: &Guest) -> Result<NetInfo> {
    info(guest)?
        .nets
        .into_iter()
        .next()
        .ok_or_else(|| guest.failure("GET /vm/info lists no network"))
}

/// Runs `script` in the lane's host; a non-zero status fails the scenario.
fn host(lane: &Lane, guest: &Guest, script: &str, timeout: Duration) -> Result<String> {
    let (rc, out) = lane.sh(script, timeout)?;
    check(
        rc == 0,
        guest,
        format!("lane: {script}: status {rc}: {out}"),
    )?;
    Ok(out)
}

/// Connects from the lane's host to the guest's listener, retrying while the listener is
/// not up yet (a refused connect ends `nc` at once).
fn host_sends(lane: &Lane, guest: &Guest, port: u16, file: &str) -> Result<()> {
    host(
        lane,
        guest,
        &format!(
            "for i in $(seq 1 40); do nc {GUEST_IP} {port} < {file} && exit 0; sleep 0.5; done; \
             exit 1"
        ),
        TRANSFER,
    )
    .map(drop)
}

/// A background `nc` listener on `port` that writes what it receives to `out` and then
/// creates `out.done`. Its stdin is a FIFO held open by a `sleep` (killed afterwards), so it
/// never ends: busybox nc quits when the network side closes, and a listener whose stdin
/// ended at once would half-close and end the sender's connection early. (A pipe from the
/// `sleep` would not do: the shell waits for every member of a pipeline.) The outer
/// parentheses let a caller append `; ...` after the `&`.
fn listener(port: u16, out: &str) -> String {
    format!(
        "( (rm -f {out}.fifo {out}.done; mkfifo {out}.fifo; sleep 600 > {out}.fifo & s=$!; \
         nc -l -p {port} < {out}.fifo > {out}; touch {out}.done; kill $s; rm -f {out}.fifo) \
         </dev/null >/dev/null 2>&1 & )"
    )
}

/// The guest sends `line` over TCP to a listener on the lane's host `port` (retrying while
/// the listener is not up yet), and the host must receive exactly that line.
fn guest_says(lane: &Lane, guest: &Guest, port: u16, line: &str) -> Result<()> {
    host(
        lane,
        guest,
        &listener(port, &format!("{FROM_GUEST}.txt")),
        CMD,
    )?;
    guest.run(
        &format!(
            "for i in $(seq 1 40); do echo {line} | nc {HOST_IP} {port} && break; \
             sleep 0.5; done"
        ),
        CMD,
    )?;
    let got = host(
        lane,
        guest,
        &format!(
            "for i in $(seq 1 60); do [ -e {FROM_GUEST}.txt.done ] && break; sleep 0.5; done; \
             cat {FROM_GUEST}.txt"
        ),
        CMD,
    )?;
    check(
        got.trim() == line,
        guest,
        format!("on port {port} the host got {got:?}, the guest sent {line:?}"),
    )
}

/// Waits for a marker file the guest's background listener writes when its `nc` is done.
fn guest_waits_for(guest: &Guest, marker: &str, timeout: Duration) -> Result<()> {
    let secs = timeout.as_secs();
    guest
        .run(
            &format!(
                "i=0; while [ ! -e {marker} ] && [ $i -lt {secs} ]; do sleep 1; i=$((i+1)); \
                 done; [ -e {marker} ]"
            ),
            timeout + CMD,
        )
        .map(drop)
}

/// `error` with what both ends and the device say about the network.
fn diagnosed(
    lane: &Lane,
    guest: &Guest,
    error: tidevm_testlane::LaneError,
) -> tidevm_testlane::LaneError {
    let in_guest = guest
        .run_status(
            "ls -l /tmp; cat /proc/net/dev; netstat -tn; ps | grep -v grep | grep 'nc '",
            CMD,
        )
        .map_or_else(|e| e.to_string(), |(_, out)| out);
    let in_host = lane
        .sh(
            "cat /proc/net/dev; netstat -tn; ps | grep -v grep | grep 'nc '; ip addr",
            CMD,
        )
        .map_or_else(|e| e.to_string(), |(_, out)| out);
    let counters = net(guest).map_or_else(|e| e.to_string(), |n| format!("{:?}", n.counters));
    guest.failure(format!(
        "{error}\n-- guest:\n{in_guest}\n-- lane host:\n{in_host}\n-- counters: {counters}"
    ))
}

fn tcp_both_ways(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 1,
        memory: "512M".into(),
        extra_args: vec!["--net".into(), format!("tap=auto,mac={GUEST_MAC}")],
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let result = scenario(lane, &guest);
    let _ = lane.sh(&format!("rm -f {BIG} {FROM_GUEST}*"), CMD);
    result
}

fn scenario(lane: &Lane, guest: &Guest) -> Result<()> {
    let tap = net(guest)?.tap;
    check(
        tap.starts_with("tidevm"),
        guest,
        format!("tap=auto gave {tap}"),
    )?;
    host(
        lane,
        guest,
        &format!("ip addr add {HOST_IP}/24 dev {tap} && ip link set {tap} up"),
        CMD,
    )?;
    let mac = guest.run("cat /sys/class/net/eth0/address", CMD)?;
    check(mac.trim() == GUEST_MAC, guest, format!("guest MAC {mac}"))?;
    guest.run(
        &format!("ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"),
        CMD,
    )?;
    let carrier = guest.run("cat /sys/class/net/eth0/carrier", CMD)?;
    check(
        carrier.trim() == "1",
        guest,
        format!("guest carrier {carrier}"),
    )?;

    // Guest to host: a line.
    guest_says(lane, guest, 7001, "hello-from-the-guest")?;

    // Host to guest: 32 MiB of random bytes.
    let sent = host(
        lane,
        guest,
        &format!("dd if=/dev/urandom of={BIG} bs=1M count={BIG_MIB} 2>/dev/null && md5sum {BIG}"),
        CMD,
    )?;
    guest.run(&listener(7002, "/tmp/big.bin"), CMD)?;
    let started = Instant::now();
    host_sends(lane, guest, 7002, BIG)?;
    if let Err(e) = guest_waits_for(guest, "/tmp/big.bin.done", TRANSFER) {
        return Err(diagnosed(lane, guest, e));
    }
    let seconds = started.elapsed().as_secs_f64();
    let received = guest.run("md5sum /tmp/big.bin && ls -l /tmp/big.bin", CMD)?;
    check(
        md5_of(&received) == md5_of(&sent) && md5_of(&sent).len() == 32,
        guest,
        format!("host sent {sent}, guest got {received}"),
    )?;
    println!(
        "net_tcp_both_ways: {BIG_MIB} MiB host -> guest in {seconds:.1} s ({:.1} MiB/s, \
         nested lane figures are ~10x below native)",
        BIG_MIB as f64 / seconds
    );

    // Guest to host: 8 MiB back.
    let sent = guest.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/back.bin bs=1M count={BACK_MIB} 2>/dev/null && \
             md5sum /tmp/back.bin && rm /tmp/big.bin"
        ),
        CMD,
    )?;
    host(
        lane,
        guest,
        &listener(7003, &format!("{FROM_GUEST}.bin")),
        CMD,
    )?;
    let started = Instant::now();
    guest.run(
        &format!(
            "for i in $(seq 1 40); do nc {HOST_IP} 7003 < /tmp/back.bin && break; sleep 0.5; done"
        ),
        TRANSFER,
    )?;
    let received = host(
        lane,
        guest,
        &format!(
            "for i in $(seq 1 120); do [ -e {FROM_GUEST}.bin.done ] && break; sleep 0.5; done; \
             md5sum {FROM_GUEST}.bin"
        ),
        CMD,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    check(
        md5_of(&received) == md5_of(&sent) && md5_of(&sent).len() == 32,
        guest,
        format!("guest sent {sent}, host got {received}"),
    )?;
    println!(
        "net_tcp_both_ways: {BACK_MIB} MiB guest -> host in {seconds:.1} s ({:.1} MiB/s)",
        BACK_MIB as f64 / seconds
    );

    // The device's own account: at least the transfers' payload, in frames, both ways, and
    // nothing malformed or failed on the host.
    let counters = net(guest)?.counters;
    println!("net_tcp_both_ways: counters {counters:?}");
    check(
        counters.rx_bytes >= BIG_MIB << 20
            && counters.tx_bytes >= BACK_MIB << 20
            && counters.rx_frames > (BIG_MIB << 20) / 1514
            && counters.tx_frames > (BACK_MIB << 20) / 1514
            && counters.malformed == 0
            && counters.backend_errors == 0,
        guest,
        format!("counters {counters:?}"),
    )?;
    let _ = guest.run("rm -f /tmp/back.bin /tmp/big.bin*", CMD);

    // A reboot rebuilds the VM in the same process: the TAP (created by tap=auto, with the
    // host's address on it) and the MAC stay, and the new device works at once.
    let mark = guest.console_len()?;
    guest.send_line("reboot")?;
    guest.wait_ready_from(mark, BOOT)?;
    let after = net(guest)?;
    check(
        after.tap == tap && after.mac == GUEST_MAC,
        guest,
        format!("after the reboot: {after:?}"),
    )?;
    guest.run(
        &format!("ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"),
        CMD,
    )?;
    guest_says(lane, guest, 7004, "after-the-reboot")?;
    Ok(())
}
