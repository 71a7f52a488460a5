//! A real Prometheus server scrapes a running `tidevm run --metrics-listen`.
//!
//! The guest is a tiny PVH ELF made here (one port write, then `hlt` in a loop): it boots on
//! any KVM, even one that cannot run Linux. The test sets a virtio-mem requested size through
//! `tidevm ctl`, checks the scrape text with `promtool check metrics`, lets Prometheus scrape
//! every second, and asks Prometheus's query API for the values `GET /vm/info` shows.
//! Without a usable `/dev/kvm`, `prometheus` or `promtool` it prints `SKIPPED: <reason>`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidevm_api::ApiClient;

const TEST: &str = "prometheus_scrape";

/// Guest-physical address the code is loaded at and entered (1 MiB, where PVH kernels go).
const ENTRY: u64 = 0x10_0000;

/// `out 0x80, al` (one port I/O exit, so the exit counters have something to show), then
/// `hlt` and a jump back to it.
const CODE: [u8; 5] = [0xe6, 0x80, 0xf4, 0xeb, 0xfd];

/// An ELF64 executable with one loadable segment holding [`CODE`] at [`ENTRY`] and a
/// `PT_NOTE` segment with the `XEN_ELFNOTE_PHYS32_ENTRY` note naming [`ENTRY`].
fn pvh_elf() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_offset = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(ENTRY as u32).to_le_bytes());
    let code_offset = note_offset + note.len();

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // 64-bit, little endian
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // version
    elf.extend_from_slice(&ENTRY.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(elf.len(), EHDR);

    let phdr = |elf: &mut Vec<u8>, kind: u32, flags: u32, offset: usize, addr: u64, size: usize| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        elf.extend_from_slice(&(offset as u64).to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&(size as u64).to_le_bytes()); // p_filesz
        elf.extend_from_slice(&(size as u64).to_le_bytes()); // p_memsz
        elf.extend_from_slice(&4u64.to_le_bytes()); // p_align
    };
    phdr(&mut elf, 1, 5, code_offset, ENTRY, CODE.len()); // PT_LOAD, R+X
    phdr(&mut elf, 4, 4, note_offset, 0, note.len()); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.extend_from_slice(&CODE);
    elf
}

/// A directory removed on drop (kept when the test fails, for its logs).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("tidevm-{TEST}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Says `SKIPPED: <reason>` so that it shows: straight to the process's stderr, which the
/// test harness does not capture (it captures only `print!` and `eprint!`).
fn skip(reason: &str) {
    let banner = "**************************************************************";
    let _ = writeln!(
        std::io::stderr(),
        "\n{banner}\nSKIPPED: {TEST}: {reason}\n{banner}"
    );
    println!("SKIPPED: {TEST}: {reason}");
}

/// Why this host cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if let Err(e) = File::options().read(true).write(true).open("/dev/kvm") {
        return Some(format!("/dev/kvm is not usable: {e}"));
    }
    for tool in ["prometheus", "promtool"] {
        let runs = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            return Some(format!("{tool} is not installed (make deps installs it)"));
        }
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.1; returns the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `url` with the query's special characters percent-encoded.
fn query_path(query: &str) -> String {
    let mut encoded = String::new();
    for byte in query.bytes() {
        if byte.is_ascii_alphanumeric() || b"_-.".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("/api/v1/query?query={encoded}")
}

/// Asks Prometheus for `query` until it has a sample or `deadline` passes; returns the value.
fn prometheus_value(prometheus: SocketAddr, query: &str, deadline: Instant) -> Option<String> {
    loop {
        if let Ok((200, body)) = http_get(prometheus, &query_path(query)) {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(value) = json["data"]["result"][0]["value"][1].as_str() {
                println!("prometheus: {query} = {value}");
                return Some(value.to_owned());
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn prometheus_scrapes_a_running_vm() {
    if let Some(reason) = missing_prerequisite() {
        skip(&reason);
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new();
    let kernel = dir.0.join("hlt.elf");
    std::fs::write(&kernel, pvh_elf()).unwrap();
    let socket = dir.0.join("api.sock");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let vmm_log = dir.0.join("tidevm.log");

    let tidevm = Command::new(env!("CARGO_BIN_EXE_tidevm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "size=128M", "--serial", "off"])
        .args(["--virtio-mem", "id=mem0,size=1G"])
        .arg("--api-socket")
        .arg(&socket)
        .args(["--metrics-listen", &metrics.to_string()])
        .stdout(File::create(dir.0.join("tidevm.out")).unwrap())
        .stderr(File::create(&vmm_log).unwrap())
        .spawn()
        .unwrap();
    let mut tidevm = Reaped(tidevm);
    let client = ApiClient::new(&socket).with_timeout(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.vm_info().is_err() {
        if let Ok(Some(status)) = tidevm.0.try_wait() {
            panic!("tidevm exited ({status}):\n{}", log_of(&vmm_log));
        }
        assert!(
            Instant::now() < deadline,
            "the API never answered:\n{}",
            log_of(&vmm_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let resized = Command::new(env!("CARGO_BIN_EXE_tidevm"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["resize-mem", "mem0", "256M"])
        .status()
        .unwrap();
    assert!(resized.success());
    let info = client.vm_info().unwrap();
    let mem0 = info.virtio_mem.iter().find(|d| d.id == "mem0").unwrap();
    assert_eq!(mem0.requested_size, 256 << 20);
    // The guest has no virtio-mem driver: it never plugs anything.
    assert_eq!(mem0.plugged_size, 0);

    // What Prometheus will scrape passes Prometheus's own checker.
    let (status, text) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        text.contains("tidevm_api_requests_total{method=\"PUT\",endpoint=\"/vm/virtio-mem/{id}\",status=\"204\"} 1"),
        "{text}"
    );

    let prometheus_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tidevm\n    static_configs:\n\
             \x20     - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let prometheus_log = dir.0.join("prometheus.log");
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prometheus_addr}"))
        .stdout(Stdio::null())
        .stderr(File::create(&prometheus_log).unwrap())
        .spawn()
        .unwrap();
    let _prometheus = Reaped(prometheus);

    let deadline = Instant::now() + Duration::from_secs(20);
    let query = |q: &str| {
        prometheus_value(prometheus_addr, q, deadline).unwrap_or_else(|| {
            panic!(
                "Prometheus has no {q}\nprometheus:\n{}\ntidevm:\n{}",
                log_of(&prometheus_log),
                log_of(&vmm_log)
            )
        })
    };
    assert_eq!(query("up{job=\"tidevm\"}"), "1");
    assert_eq!(
        query("tidevm_virtio_mem_requested_bytes{device=\"mem0\"}"),
        mem0.requested_size.to_string()
    );
    assert_eq!(
        query("tidevm_virtio_mem_plugged_bytes{device=\"mem0\"}"),
        mem0.plugged_size.to_string()
    );
    assert_eq!(
        query("tidevm_virtio_mem_region_bytes{device=\"mem0\"}"),
        mem0.region.size.to_string()
    );
    // The guest's one port write was counted by the vCPU loop.
    let io_exits: u64 = query("tidevm_vcpu_exits_total{reason=\"io\"}")
        .parse()
        .unwrap();
    assert!(io_exits >= 1);

    client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = tidevm.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tidevm did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit}\n{}", log_of(&vmm_log));
    println!("{TEST}: done in {:.1} s", started.elapsed().as_secs_f64());
}
