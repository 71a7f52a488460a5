//! The `tidevm` binary's answer to bad input: exactly one line on stderr starting with
//! `tidevm: error:` that names the problem, a non-zero exit, no panic and no backtrace.
//! These run the built binary on this host; no guest boots.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file that is removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn with_contents(name: &str, contents: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("tidevm-cli-errors-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write a temporary file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A file that exists but is not an ELF vmlinux, for options checked before the kernel is read.
fn junk_kernel(name: &str) -> TempFile {
    TempFile::with_contents(name, b"this is not a kernel\n")
}

/// Runs tidevm with `args` and checks the error contract; returns the error line.
fn expect_error(args: &[&str], names: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tidevm"))
        .args(args)
        // A backtrace must not appear even when one is asked for.
        .env("RUST_BACKTRACE", "1")
        .env_remove("TIDEVM_LOG")
        .output()
        .expect("run the tidevm binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!(
        "tidevm {}\nexit: {:?}\nstderr:\n{stderr}\nstdout:\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        !output.status.success() && output.status.code().is_some(),
        "expected a non-zero exit code\n{context}"
    );
    assert!(!stderr.contains("panicked"), "tidevm panicked\n{context}");
    assert!(
        !stderr.contains("stack backtrace") && !stderr.contains("Stack backtrace"),
        "tidevm printed a backtrace\n{context}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr\n{context}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("tidevm: error:"),
        "the line must start with `tidevm: error:`\n{context}"
    );
    for name in names {
        assert!(
            line.contains(name),
            "the error should name {name:?}\n{context}"
        );
    }
    line.to_string()
}

fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn skip_loudly(test: &str, reason: &str) {
    eprintln!();
    eprintln!("**************************************************************");
    eprintln!("SKIPPED: {test}: {reason}");
    eprintln!("**************************************************************");
    println!("SKIPPED: {test}: {reason}");
}

#[test]
fn missing_kernel_file() {
    let path = "/nonexistent/tidevm-test/vmlinux";
    expect_error(&["run", "--kernel", path, "--serial", "off"], &[path]);
}

#[test]
fn kernel_that_is_not_an_elf() {
    if !kvm_available() {
        skip_loudly("kernel_that_is_not_an_elf", "no /dev/kvm");
        return;
    }
    let bz_image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/guest/bzImage");
    let junk;
    let kernel = if bz_image.is_file() {
        bz_image
    } else {
        junk = junk_kernel("not-elf");
        junk.0.clone()
    };
    let kernel = kernel.to_str().expect("UTF-8 path");
    let line = expect_error(
        &["run", "--kernel", kernel, "--serial", "off"],
        &["not a loadable x86-64 ELF vmlinux"],
    );
    let file_name = Path::new(kernel).file_name().unwrap().to_str().unwrap();
    assert!(line.contains(file_name), "should name the kernel: {line}");
}

#[test]
fn dimm_slots_without_maxmem() {
    let kernel = junk_kernel("dimm-slots");
    for (memory, names) in [
        ("size=1G,slots=4", &["slots", "maxmem"][..]),
        ("size=1G,slots=4,maxmem=1G", &["maxmem"][..]),
        ("size=1G,slots=9999,maxmem=4G", &["slots"][..]),
    ] {
        expect_error(
            &[
                "run",
                "--kernel",
                kernel.0.to_str().unwrap(),
                "--memory",
                memory,
                "--serial",
                "off",
            ],
            names,
        );
    }
}

#[test]
fn ctl_dimm_add_with_a_bad_size() {
    expect_error(
        &[
            "ctl",
            "--api-socket",
            "/nonexistent/tidevm.sock",
            "dimm-add",
            "lots",
        ],
        &["lots"],
    );
}

#[test]
fn bad_size_string() {
    let kernel = junk_kernel("bad-size");
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.0.to_str().unwrap(),
            "--memory",
            "size=12X",
            "--serial",
            "off",
        ],
        &["12X"],
    );
}

#[test]
fn more_memory_than_the_host_has() {
    let kernel = junk_kernel("too-much-memory");
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.0.to_str().unwrap(),
            "--memory",
            "size=100T",
            "--serial",
            "off",
        ],
        &["memory", "host"],
    );
}

#[test]
fn zero_cpus() {
    let kernel = junk_kernel("zero-cpus");
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.0.to_str().unwrap(),
            "--cpus",
            "0",
            "--serial",
            "off",
        ],
        &["--cpus 0"],
    );
}

#[test]
fn bad_serial_value() {
    let kernel = junk_kernel("bad-serial");
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.0.to_str().unwrap(),
            "--serial",
            "bogus-console",
        ],
        &["--serial", "bogus-console"],
    );
}

#[test]
fn ctl_without_a_vm() {
    expect_error(
        &["ctl", "--api-socket", "/nonexistent", "info"],
        &["/nonexistent"],
    );
}

#[test]
fn bad_api_socket_mode() {
    let kernel = junk_kernel("bad-socket-mode");
    for mode in ["rw", "4755", "888"] {
        expect_error(
            &[
                "run",
                "--kernel",
                kernel.0.to_str().unwrap(),
                "--serial",
                "off",
                "--api-socket",
                "/nonexistent/tidevm-test/api.sock",
                "--api-socket-mode",
                mode,
            ],
            &["--api-socket-mode", mode],
        );
    }
}

/// `--memory-policy`: parse errors and the checks against the rest of the VM name the option
/// and the offending key. The kernel is junk, so a value that passed would fail later on the
/// kernel instead: every case must be refused before that.
#[test]
fn bad_memory_policy() {
    let kernel = junk_kernel("autopilot");
    let kernel = kernel.0.to_str().unwrap();
    let stats = ["--balloon", "stats-interval=2s"];
    let big = ["--virtio-mem", "id=m0,size=8G"];
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("manual,min=1G,max=2G", &[], &["--memory-policy", "auto"]),
        (
            "auto,min=2G,max=1G",
            &[],
            &["--memory-policy", "min 2 GiB is above max 1 GiB"],
        ),
        (
            "auto,min=1000M,max=2G",
            &[],
            &["--memory-policy", "min=1000M", "128 MiB"],
        ),
        (
            "auto,min=1G,max=2G,floor=64M",
            &[],
            &["floor=64M", "128 MiB"],
        ),
        (
            "auto,min=1G,max=2G,interval=0s",
            &[],
            &["--memory-policy", "interval must not be zero"],
        ),
        (
            "auto,min=1G,max=2G,interval=2",
            &[],
            &["interval='2'", "duration"],
        ),
        ("auto,min=1G,max=2G,turbo=on", &[], &["unknown key 'turbo'"]),
        ("auto,max=2G", &[], &["min= is required"]),
        (
            "auto,min=1G,max=2G,psi-some=150",
            &[],
            &["psi-some='150'", "percentage"],
        ),
        (
            "auto,min=1G,max=2G",
            &[],
            &["--memory-policy", "--balloon", "statistics"],
        ),
        (
            "auto,min=1G,max=2G",
            &["--balloon", ""],
            &["--memory-policy", "stats-interval (5s)"],
        ),
        (
            "auto,min=1G,max=4G",
            &stats,
            &["--memory-policy", "max is more than"],
        ),
        (
            "auto,min=1G,max=4G,interval=1s",
            &[
                "--balloon",
                "stats-interval=2s",
                "--virtio-mem",
                "id=m0,size=8G",
            ],
            &["--memory-policy", "stats-interval (2s)", "1000 ms"],
        ),
    ];
    for (policy, extra, names) in cases {
        let mut args = vec![
            "run",
            "--kernel",
            kernel,
            "--serial",
            "off",
            "--memory-policy",
            policy,
        ];
        args.extend_from_slice(extra);
        expect_error(&args, names);
    }
    // A valid policy gets past every check: the error is the junk kernel's.
    let mut args = vec!["run", "--kernel", kernel, "--serial", "off"];
    args.extend_from_slice(&["--memory-policy", "auto,min=1G,max=4G"]);
    args.extend_from_slice(&stats);
    args.extend_from_slice(&big);
    let line = expect_error(&args, &[]);
    assert!(!line.contains("memory-policy"), "{line}");
}

/// Sizes and counts near 2^64 must be refused by name, not wrap around a check or panic.
#[test]
fn numbers_that_would_overflow() {
    let kernel = junk_kernel("overflow");
    let kernel = kernel.0.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--balloon", "stats-interval=18446744073709551615s"],
            &["--balloon", "stats-interval", "86400"],
        ),
        (
            &["--balloon", "stats-interval=99999999999999999999999s"],
            &["--balloon", "stats-interval"],
        ),
        (
            &[
                "--memory",
                "size=1G",
                "--numa",
                "node=0,cpus=0,memory=8388608T",
                "--numa",
                "node=1,memory=9223372037928517632",
            ],
            &["--numa", "adds up to more than"],
        ),
        (
            &["--virtio-mem", "id=m0,size=18446744073575333888"],
            &["hotplug area"],
        ),
        (
            &[
                "--virtio-mem",
                "id=m0,size=8388608T",
                "--virtio-mem",
                "id=m1,size=8388608T",
            ],
            &["hotplug area"],
        ),
        (
            &["--memory", "size=18446744073709551615,slots=1,maxmem=1G"],
            &["--memory", "maxmem"],
        ),
        (
            &["--memory", "size=99999999999999999999"],
            &["99999999999999999999"],
        ),
        (
            &["--memory", "size=1G,slots=4294967296,maxmem=4G"],
            &["slots"],
        ),
    ];
    for (options, names) in cases {
        let mut args = vec!["run", "--kernel", kernel, "--serial", "off"];
        args.extend_from_slice(options);
        expect_error(&args, names);
    }
}

/// Expected manners: `--version`, `--log-level` and `--log-format` are there, and a bad
/// `--log-level` is a one-line usage error.
#[test]
fn version_and_log_options() {
    let output = Command::new(env!("CARGO_BIN_EXE_tidevm"))
        .arg("--version")
        .output()
        .expect("run the tidevm binary");
    assert!(output.status.success());
    let version = String::from_utf8_lossy(&output.stdout);
    assert!(
        version.starts_with("tidevm ") && version.contains(env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let kernel = junk_kernel("log-level");
    let kernel = kernel.0.to_str().unwrap();
    expect_error(
        &["--log-level", "=nonsense=", "run", "--kernel", kernel],
        &["--log-level"],
    );
    // JSON logs: the kernel error still ends the run, and the log options parse.
    expect_error(
        &[
            "--log-format",
            "json",
            "--log-level",
            "info",
            "run",
            "--kernel",
            kernel,
        ],
        &["kernel"],
    );
}

/// `tidevm ctl` exits non-zero on a 4xx or 5xx and prints the server's message.
#[test]
fn ctl_fails_with_the_servers_message() {
    use std::sync::Arc;
    use tidevm_api::{ApiError, ApiRequest, ApiResponse, ApiServer, RequestHandler};

    struct Refuses;
    impl RequestHandler for Refuses {
        fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
            match request {
                ApiRequest::ResizeVirtioMem { .. } => {
                    Err(ApiError::not_found("no virtio-mem device with id nosuch"))
                }
                _ => Err(ApiError::internal("the VMM is on fire")),
            }
        }
    }
    let socket =
        std::env::temp_dir().join(format!("tidevm-cli-errors-{}-ctl.sock", std::process::id()));
    let server = ApiServer::bind(&socket).expect("bind a test API socket");
    server.spawn(Arc::new(Refuses)).expect("serve it");
    let socket = socket.to_str().unwrap();
    let line = expect_error(
        &["ctl", "--api-socket", socket, "resize-mem", "nosuch", "1G"],
        &["nosuch"],
    );
    assert!(
        line.contains("404") || line.contains("no virtio-mem"),
        "{line}"
    );
    expect_error(&["ctl", "--api-socket", socket, "reboot"], &["on fire"]);
    drop(server);
}

#[test]
fn ctl_memory_with_a_bad_size() {
    expect_error(
        &[
            "ctl",
            "--api-socket",
            "/nonexistent/tidevm.sock",
            "memory",
            "6X",
        ],
        &["6X"],
    );
}

#[test]
fn ctl_memory_without_a_vm() {
    expect_error(
        &["ctl", "--api-socket", "/nonexistent", "memory"],
        &["/nonexistent"],
    );
}

#[test]
fn bad_metrics_listen_address() {
    let kernel = junk_kernel("bad-metrics-listen");
    for value in ["nonsense", "127.0.0.1", "localhost:9464", "127.0.0.1:99999"] {
        expect_error(
            &[
                "run",
                "--kernel",
                kernel.0.to_str().unwrap(),
                "--serial",
                "off",
                "--metrics-listen",
                value,
            ],
            &["--metrics-listen", value],
        );
    }
}

#[test]
fn metrics_port_in_use() {
    let kernel = junk_kernel("metrics-port-in-use");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.0.to_str().unwrap(),
            "--serial",
            "off",
            "--metrics-listen",
            &addr,
        ],
        &["metrics", &addr, "in use"],
    );
}

#[test]
fn disk_image_that_does_not_exist() {
    let kernel = junk_kernel("disk-missing");
    let path = "/nonexistent/tidevm-test/disk.img";
    let disk = format!("path={path}");
    let kernel = kernel.0.to_str().unwrap();
    expect_error(
        &[
            "run", "--kernel", kernel, "--serial", "off", "--disk", &disk,
        ],
        &[path, "does not exist"],
    );
}

#[test]
fn disk_option_with_an_unknown_key_or_no_path() {
    let kernel = junk_kernel("disk-keys");
    let kernel = kernel.0.to_str().unwrap();
    for (value, names) in [
        (
            "path=/tmp/x.img,cache=none",
            &["--disk", "unknown key 'cache'"][..],
        ),
        ("readonly=on", &["--disk", "path= is required"][..]),
        (
            "path=/tmp/x.img,direct=maybe",
            &["--disk", "direct must be on or off"][..],
        ),
    ] {
        expect_error(
            &[
                "run", "--kernel", kernel, "--serial", "off", "--disk", value,
            ],
            names,
        );
    }
}

#[test]
fn two_disks_with_one_id() {
    let kernel = junk_kernel("disk-dup");
    let image = TempFile::with_contents("disk-dup.img", &[0u8; 4096]);
    let kernel = kernel.0.to_str().unwrap();
    let disk = format!("path={},id=data", image.0.display());
    expect_error(
        &[
            "run", "--kernel", kernel, "--serial", "off", "--disk", &disk, "--disk", &disk,
        ],
        &["--disk", "data", "two disks have this id"],
    );
}

#[test]
fn read_only_disk_image_opened_for_writing() {
    use std::os::unix::fs::PermissionsExt;
    let kernel = junk_kernel("disk-ro");
    let kernel = kernel.0.to_str().unwrap();
    let image = TempFile::with_contents("disk-ro.img", &[0u8; 4096]);
    std::fs::set_permissions(&image.0, std::fs::Permissions::from_mode(0o444)).unwrap();
    // root may write a mode-444 file; a sysfs attribute without a write method it may not.
    let path = if OpenOptions::new().write(true).open(&image.0).is_ok() {
        PathBuf::from("/sys/kernel/notes")
    } else {
        image.0.clone()
    };
    if OpenOptions::new().write(true).open(&path).is_ok() || !path.exists() {
        skip_loudly(
            "read_only_disk_image_opened_for_writing",
            "no file here that this user cannot open for writing",
        );
        return;
    }
    let path = path.to_str().unwrap();
    let disk = format!("path={path}");
    expect_error(
        &[
            "run", "--kernel", kernel, "--serial", "off", "--disk", &disk,
        ],
        &[path, "read-only", "readonly=on"],
    );
}

/// `tidevm ctl metrics | head -c 100` ends quietly when the reader is gone: no panic, no
/// abort (the fail-fast hook aborts on any panic outside the API threads).
#[test]
fn ctl_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    use std::sync::Arc;
    use tidevm_api::{ApiError, ApiRequest, ApiResponse, ApiServer, RequestHandler};

    struct Chatty;
    impl RequestHandler for Chatty {
        fn handle(&self, _request: ApiRequest) -> Result<ApiResponse, ApiError> {
            Ok(ApiResponse::Metrics("tidevm_x 1\n".repeat(80_000)))
        }
    }
    let socket = std::env::temp_dir().join(format!(
        "tidevm-cli-errors-{}-pipe.sock",
        std::process::id()
    ));
    let server = ApiServer::bind(&socket).expect("bind a test API socket");
    server.spawn(Arc::new(Chatty)).expect("serve it");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidevm"))
        .args(["ctl", "--api-socket", socket.to_str().unwrap(), "metrics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tidevm ctl");
    let mut head = [0u8; 100];
    child
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut head)
        .expect("the first 100 bytes");
    // The read end is dropped here: ctl's next writes meet a closed pipe.
    let output = child.wait_with_output().expect("wait for tidevm ctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert!(
        !stderr.contains("panicked") && output.status.signal() != Some(libc::SIGABRT),
        "ctl did not end quietly: {:?}\n{stderr}",
        output.status
    );
    drop(server);
}

#[test]
fn net_options_a_missing_tap_and_an_interface_that_is_not_a_tap() {
    let kernel = junk_kernel("net-keys");
    let kernel = kernel.0.to_str().unwrap();
    let mut cases = vec![
        ("tap=tap0,queues=4", vec!["--net", "unknown key 'queues'"]),
        (
            "tap=tap0,mac=01:00:5e:00:00:01",
            vec!["--net", "not a unicast address"],
        ),
        ("mac=02:00:00:00:00:01", vec!["--net", "tap= is required"]),
    ];
    if std::path::Path::new("/sys/class/net").is_dir() {
        cases.push(("tap=tvm-nosuch9", vec!["tvm-nosuch9", "does not exist"]));
    }
    if std::path::Path::new("/sys/class/net/lo").exists() {
        cases.push(("tap=lo", vec!["lo", "is not a TAP device"]));
    }
    for (value, names) in cases {
        expect_error(
            &["run", "--kernel", kernel, "--serial", "off", "--net", value],
            &names,
        );
    }
}

#[test]
fn two_nets_with_one_id() {
    let kernel = junk_kernel("net-dup");
    let kernel = kernel.0.to_str().unwrap();
    expect_error(
        &[
            "run",
            "--kernel",
            kernel,
            "--serial",
            "off",
            "--net",
            "tap=a,id=x",
            "--net",
            "tap=b,id=x",
        ],
        &["--net", "two networks have this id"],
    );
}
