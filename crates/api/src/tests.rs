//! Round trips through a real Unix socket, and the OpenAPI document's coverage.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::server::ROUTES;
use crate::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tidevm-api-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BLOCK_SIZE: u64 = 2 << 20;
const DIMM_ALIGN: u64 = 128 << 20;

/// Stands in for the VMM: records requests and answers like a small VM.
#[derive(Default)]
struct FakeVmm {
    requests: Mutex<Vec<ApiRequest>>,
}

impl FakeVmm {
    fn requests(&self) -> Vec<ApiRequest> {
        self.requests.lock().unwrap().clone()
    }
}

fn sample_info() -> VmInfo {
    VmInfo {
        state: VmState::Running,
        vcpus: 2,
        memory: MemoryInfo {
            boot_ram_bytes: 512 << 20,
            ram_ranges: vec![GuestRange {
                start: 0,
                size: 512 << 20,
            }],
            hotplug_area: GuestRange {
                start: 4 << 30,
                size: 8 << 30,
            },
            host_rss: crate::HostRss {
                total_bytes: 300 << 20,
                guest_memory_bytes: 290 << 20,
                vmm_bytes: 10 << 20,
            },
        },
        virtio_mem: vec![VirtioMemInfo {
            id: "vmem0".to_owned(),
            node: 0,
            region: GuestRange {
                start: 4 << 30,
                size: 8 << 30,
            },
            block_size: BLOCK_SIZE,
            plugged_size: 0,
            requested_size: 0,
            usable_region_size: 8 << 30,
            last_busy_reason: None,
            counters: Default::default(),
        }],
        memory_violations: Vec::new(),
        memory_violation_count: 0,
        dimms: Some(DimmsInfo {
            slots: 4,
            maxmem_bytes: 8 << 30,
            plugged_bytes: 1 << 30,
            area: GuestRange {
                start: 12 << 30,
                size: 8 << 30,
            },
            dimms: vec![sample_dimm("boot-dimm", DimmState::Active)],
        }),
        disks: vec![crate::DiskInfo {
            id: "disk0".to_owned(),
            path: "/var/lib/disk.img".to_owned(),
            readonly: false,
            direct: false,
            capacity_bytes: 64 << 20,
            block_size: 512,
            counters: crate::DiskCounters {
                read_requests: 3,
                bytes_read: 12288,
                ..Default::default()
            },
        }],
    }
}

fn sample_dimm(id: &str, state: DimmState) -> DimmInfo {
    DimmInfo {
        id: id.to_owned(),
        slot: 0,
        range: GuestRange {
            start: 12 << 30,
            size: 1 << 30,
        },
        node: 0,
        backing: DimmBacking::Anon,
        prealloc: false,
        state,
        resident_bytes: 0,
        last_ost: (state == DimmState::Active).then(|| OstReport {
            event: 1,
            status: 0,
            meaning: "success".to_owned(),
        }),
        removal_refused: None,
    }
}

impl RequestHandler for FakeVmm {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.requests.lock().unwrap().push(request.clone());
        match request {
            ApiRequest::VmInfo => Ok(ApiResponse::VmInfo(sample_info())),
            ApiRequest::Shutdown | ApiRequest::Reboot => Ok(ApiResponse::Empty),
            ApiRequest::ResizeVirtioMem { id, .. } if id == "panic" => {
                panic!("the fake VMM panics on purpose")
            }
            ApiRequest::ResizeVirtioMem { id, .. } if id == "slow" => {
                std::thread::sleep(Duration::from_millis(800));
                Ok(ApiResponse::Empty)
            }
            ApiRequest::ResizeVirtioMem { id, .. } if id != "vmem0" => Err(ApiError::not_found(
                format!("no virtio-mem device with id {id}"),
            )),
            ApiRequest::ResizeVirtioMem { requested_size, .. }
                if requested_size % BLOCK_SIZE != 0 =>
            {
                Err(ApiError::bad_request(format!(
                    "requested_size {requested_size} is not a multiple of the block size {BLOCK_SIZE}"
                )))
            }
            ApiRequest::ResizeVirtioMem { .. } => Ok(ApiResponse::Empty),
            ApiRequest::BalloonStatus => Ok(ApiResponse::Balloon(crate::BalloonInfo {
                target_bytes: 1 << 30,
                ..Default::default()
            })),
            ApiRequest::SetBalloon { .. } => Ok(ApiResponse::Empty),
            ApiRequest::AddDimm(body) if body.size == 0 || body.size % DIMM_ALIGN != 0 => {
                Err(ApiError::bad_request(format!(
                    "DIMM size {} is not a non-zero multiple of 128 MiB",
                    body.size
                )))
            }
            ApiRequest::AddDimm(body) => Ok(ApiResponse::Dimm(DimmInfo {
                id: body.id.unwrap_or_else(|| "dimm1".to_owned()),
                slot: 1,
                range: GuestRange {
                    start: 13 << 30,
                    size: body.size,
                },
                node: body.node.unwrap_or(0),
                backing: body.backing,
                prealloc: body.prealloc,
                state: DimmState::Inserting,
                resident_bytes: if body.prealloc { body.size } else { 0 },
                last_ost: None,
                removal_refused: None,
            })),
            ApiRequest::RemoveDimm { id } if id == "boot-dimm" => {
                let mut dimm = sample_dimm(&id, DimmState::Removing);
                dimm.last_ost = Some(OstReport {
                    event: 3,
                    status: 0x84,
                    meaning: "ejection in progress".to_owned(),
                });
                Ok(ApiResponse::Dimm(dimm))
            }
            ApiRequest::RemoveDimm { id } => {
                Err(ApiError::not_found(format!("no DIMM with id {id}")))
            }
        }
    }
}

#[test]
fn balloon_routes_round_trip() {
    let running = start();
    running.client.set_balloon(512 << 20).unwrap();
    assert_eq!(running.client.balloon().unwrap().target_bytes, 1 << 30);
    let (status, _) = running
        .client
        .call(
            "PUT",
            "/vm/balloon",
            Some(serde_json::json!({"target_size": "1G"})),
        )
        .unwrap();
    assert_eq!(status, 204);
    let (status, _) = running
        .client
        .call("PUT", "/vm/balloon", Some(serde_json::json!({"size": 1})))
        .unwrap();
    assert_eq!(status, 400);
    let (status, _) = running.client.call("POST", "/vm/balloon", None).unwrap();
    assert_eq!(status, 405);
    let requests = running.vmm.requests.lock().unwrap().clone();
    assert!(requests.contains(&ApiRequest::SetBalloon {
        target_size: 512 << 20
    }));
    assert!(requests.contains(&ApiRequest::SetBalloon {
        target_size: 1 << 30
    }));
}

struct Running {
    _dir: TempDir,
    server: ApiServer,
    vmm: Arc<FakeVmm>,
    client: ApiClient,
}

fn start() -> Running {
    let dir = TempDir::new();
    let server = ApiServer::bind(&dir.socket()).unwrap();
    let vmm = Arc::new(FakeVmm::default());
    server.spawn(vmm.clone()).unwrap();
    let client = ApiClient::new(dir.socket()).with_timeout(Duration::from_secs(10));
    Running {
        _dir: dir,
        server,
        vmm,
        client,
    }
}

#[test]
fn vm_info_round_trip() {
    let running = start();
    assert_eq!(running.client.vm_info().unwrap(), sample_info());
    assert_eq!(running.vmm.requests(), vec![ApiRequest::VmInfo]);

    let (status, body) = running.client.call("GET", "/vm/info", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["state"], "running");
    assert_eq!(body["memory"]["boot_ram_bytes"], 512u64 << 20);
    assert_eq!(body["virtio_mem"][0]["id"], "vmem0");
    assert_eq!(body["dimms"]["slots"], 4);
    assert_eq!(body["dimms"]["dimms"][0]["state"], "active");
    assert_eq!(body["dimms"]["dimms"][0]["last_ost"]["status"], 0);
}

#[test]
fn shutdown_and_reboot_round_trip() {
    let running = start();
    running.client.shutdown().unwrap();
    running.client.reboot().unwrap();
    let (status, body) = running
        .client
        .call("PUT", "/vm/reboot", Some(json!({})))
        .unwrap();
    assert_eq!((status, body), (204, serde_json::Value::Null));
    assert_eq!(
        running.vmm.requests(),
        vec![ApiRequest::Shutdown, ApiRequest::Reboot, ApiRequest::Reboot]
    );
}

#[test]
fn resize_round_trip() {
    let running = start();
    running.client.resize_virtio_mem("vmem0", 1 << 30).unwrap();
    let (status, _) = running
        .client
        .call(
            "PUT",
            "/vm/virtio-mem/vmem0",
            Some(json!({"requested_size": "2G"})),
        )
        .unwrap();
    assert_eq!(status, 204);
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::ResizeVirtioMem {
                id: "vmem0".to_owned(),
                requested_size: 1 << 30
            },
            ApiRequest::ResizeVirtioMem {
                id: "vmem0".to_owned(),
                requested_size: 2 << 30
            },
        ]
    );
}

#[test]
fn add_dimm_round_trip() {
    let running = start();
    let body = AddDimmBody {
        size: 1 << 30,
        node: Some(1),
        backing: DimmBacking::Hugetlbfs,
        prealloc: true,
        id: Some("big".to_owned()),
    };
    let dimm = running.client.add_dimm(&body).unwrap();
    assert_eq!(dimm.id, "big");
    assert_eq!(dimm.node, 1);
    assert_eq!(dimm.backing, DimmBacking::Hugetlbfs);
    assert_eq!(dimm.state, DimmState::Inserting);
    assert_eq!(dimm.range.size, 1 << 30);
    assert_eq!(dimm.resident_bytes, 1 << 30);

    let (status, json) = running
        .client
        .call("PUT", "/vm/dimms", Some(json!({"size": "256M"})))
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(json["id"], "dimm1");
    assert_eq!(json["state"], "inserting");
    assert_eq!(json["backing"], "anon");
    assert_eq!(json["range"]["size"], 256u64 << 20);
    assert!(json.get("last_ost").is_none(), "{json}");

    let error = running
        .client
        .add_dimm(&AddDimmBody {
            size: 100 << 20,
            node: None,
            backing: DimmBacking::Anon,
            prealloc: false,
            id: None,
        })
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Api { status: 400, message } if message.contains("128 MiB")),
        "{error:?}"
    );

    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::AddDimm(body),
            ApiRequest::AddDimm(AddDimmBody {
                size: 256 << 20,
                node: None,
                backing: DimmBacking::Anon,
                prealloc: false,
                id: None,
            }),
            ApiRequest::AddDimm(AddDimmBody {
                size: 100 << 20,
                node: None,
                backing: DimmBacking::Anon,
                prealloc: false,
                id: None,
            }),
        ]
    );
}

#[test]
fn remove_dimm_round_trip() {
    let running = start();
    let dimm = running.client.remove_dimm("boot-dimm").unwrap();
    assert_eq!(dimm.id, "boot-dimm");
    assert_eq!(dimm.state, DimmState::Removing);
    assert_eq!(dimm.last_ost.as_ref().map(|ost| ost.status), Some(0x84));

    let (status, json) = running
        .client
        .call("DELETE", "/vm/dimms/boot-dimm", None)
        .unwrap();
    assert_eq!(status, 202);
    assert_eq!(json["state"], "removing");
    assert_eq!(json["last_ost"]["event"], 3);
    let (status, _) = running
        .client
        .call("DELETE", "/vm/dimms/boot-dimm", Some(json!({})))
        .unwrap();
    assert_eq!(status, 202);

    let error = running.client.remove_dimm("dimm9").unwrap_err();
    assert_eq!(
        error.to_string(),
        "API request failed with HTTP 404: no DIMM with id dimm9"
    );
    let invalid = running.client.remove_dimm("a/b").unwrap_err();
    assert!(
        matches!(invalid, ClientError::InvalidRequest { .. }),
        "{invalid:?}"
    );
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::RemoveDimm {
                id: "boot-dimm".to_owned()
            };
            3
        ]
        .into_iter()
        .chain([ApiRequest::RemoveDimm {
            id: "dimm9".to_owned()
        }])
        .collect::<Vec<_>>()
    );
}

#[test]
fn malformed_dimm_requests_never_reach_the_handler() {
    let running = start();
    let client = &running.client;
    let add = |body: &[u8]| error_of(client.call_raw("PUT", "/vm/dimms", Some(body)).unwrap());

    let (status, message) = add(b"");
    assert_eq!(status, 400);
    assert!(message.contains(r#"{"size": <bytes>"#), "{message}");
    assert_eq!(add(b"[]").0, 400);
    let (status, message) = add(br#"{"size": "1G", "slot": 2}"#);
    assert_eq!(status, 400);
    assert!(message.contains("unknown field"), "{message}");
    let (status, message) = add(br#"{"size": "1G", "backing": "shm"}"#);
    assert_eq!(status, 400);
    assert!(message.contains("unknown variant"), "{message}");
    let (status, message) = add(br#"{"size": "1G", "id": "no way"}"#);
    assert_eq!(status, 400);
    assert!(message.starts_with("invalid DIMM id"), "{message}");
    let (status, message) = error_of(client.call("DELETE", "/vm/dimms/x%2Fy", None).unwrap());
    assert_eq!(status, 400);
    assert!(message.starts_with("invalid DIMM id"), "{message}");
    assert_eq!(
        error_of(
            client
                .call("DELETE", "/vm/dimms/dimm0", Some(json!({"now": true})))
                .unwrap()
        )
        .0,
        400
    );

    let (status, message) = error_of(client.call("GET", "/vm/dimms", None).unwrap());
    assert_eq!(status, 405);
    assert!(message.contains("use PUT"), "{message}");
    let (status, message) = error_of(client.call("PUT", "/vm/dimms/dimm0", None).unwrap());
    assert_eq!(status, 405);
    assert!(message.contains("use DELETE"), "{message}");
    assert_eq!(
        error_of(client.call("DELETE", "/vm/dimms", None).unwrap()).0,
        405
    );
    assert_eq!(
        error_of(client.call("DELETE", "/vm/dimms/", None).unwrap()).0,
        404
    );
    assert_eq!(
        error_of(client.call("DELETE", "/vm/dimms/a/b", None).unwrap()).0,
        404
    );

    assert!(running.vmm.requests().is_empty());
}

#[test]
fn handler_errors_reach_the_client() {
    let running = start();
    let error = running
        .client
        .resize_virtio_mem("vmem7", 1 << 30)
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Api { status: 404, .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "API request failed with HTTP 404: no virtio-mem device with id vmem7"
    );

    let (status, body) = running
        .client
        .call(
            "PUT",
            "/vm/virtio-mem/vmem0",
            Some(json!({"requested_size": 12345})),
        )
        .unwrap();
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("block size"));
}

#[test]
fn malformed_requests_never_reach_the_handler() {
    let running = start();
    let client = &running.client;

    let (status, message) = error_of(client.call("GET", "/vm/nothing", None).unwrap());
    assert_eq!(status, 404);
    assert!(message.contains("/vm/nothing"), "{message}");

    assert_eq!(error_of(client.call("GET", "/", None).unwrap()).0, 404);
    let (status, message) = error_of(client.call("POST", "/vm/info", None).unwrap());
    assert_eq!(status, 405);
    assert!(message.contains("use GET"), "{message}");
    assert_eq!(
        error_of(client.call("GET", "/vm/shutdown", None).unwrap()).0,
        405
    );
    assert_eq!(
        error_of(client.call("DELETE", "/vm/virtio-mem/vmem0", None).unwrap()).0,
        405
    );

    let resize = |body: &[u8]| {
        error_of(
            client
                .call_raw("PUT", "/vm/virtio-mem/vmem0", Some(body))
                .unwrap(),
        )
    };
    assert_eq!(resize(b"").0, 400);
    assert_eq!(resize(b"{not json").0, 400);
    assert_eq!(resize(br#"{"requested_size": -5}"#).0, 400);
    assert_eq!(resize(br#"{"requested_size": "many"}"#).0, 400);
    let (status, message) = resize(br#"{"requested_size": 1, "speed": 2}"#);
    assert_eq!(status, 400);
    assert!(message.contains("unknown field"), "{message}");
    assert_eq!(
        error_of(
            client
                .call("PUT", "/vm/shutdown", Some(json!({"force": true})))
                .unwrap()
        )
        .0,
        400
    );

    let oversized = vec![b' '; MAX_REQUEST_BODY_BYTES + 1];
    let (status, message) = error_of(
        client
            .call_raw("PUT", "/vm/virtio-mem/vmem0", Some(&oversized))
            .unwrap(),
    );
    assert_eq!(status, 413);
    assert!(message.contains("65536"), "{message}");

    assert!(running.vmm.requests().is_empty());
    // The server still works after all that.
    client.vm_info().unwrap();
}

/// Bodies every route that takes no parameters must refuse.
const NOT_NOTHING: &[&str] = &[
    "{",
    "nonsense",
    "[]",
    "5",
    "null",
    "\"\"",
    r#"{"force": true}"#,
    r#"{"": 1}"#,
    "{}{}",
    "\u{feff}{}",
];

/// Values a byte size must refuse: wrong types, negative, fractional, beyond 2^64.
const NOT_A_SIZE: &[&str] = &[
    "null",
    "true",
    "-1",
    "-9223372036854775808",
    "1.5",
    "1e3",
    "18446744073709551616",
    "99999999999999999999999",
    "1e30",
    r#""""#,
    r#""lots""#,
    r#""-1G""#,
    r#""1.5G""#,
    r#""16777216T""#,
    r#""18446744073709551616""#,
    "[1]",
    r#"{"bytes": 1}"#,
];

/// Every route with malformed JSON, wrong types, sizes that do not fit in 64 bits, negative
/// numbers, unknown or duplicated fields and missing bodies: each gets a 4xx with a message
/// in the JSON error body, and the handler (the VM) never sees any of it.
#[test]
fn bad_input_matrix_never_reaches_the_handler() {
    let mut cases: Vec<(&str, &str, String)> = Vec::new();
    for (method, path) in [
        ("GET", "/vm/info"),
        ("PUT", "/vm/shutdown"),
        ("PUT", "/vm/reboot"),
        ("GET", "/vm/balloon"),
        ("DELETE", "/vm/dimms/dimm0"),
    ] {
        for body in NOT_NOTHING {
            cases.push((method, path, (*body).to_owned()));
        }
    }
    for (path, field, other) in [
        ("/vm/balloon", "target_size", ""),
        ("/vm/virtio-mem/vmem0", "requested_size", ""),
        ("/vm/dimms", "size", r#", "id": "d1""#),
    ] {
        for body in [
            String::new(),
            " \n".to_owned(),
            "{".to_owned(),
            "{}".to_owned(),
            "[]".to_owned(),
            "null".to_owned(),
            "4294967296".to_owned(),
            format!(r#"["{field}", 1]"#),
            format!(r#"{{"{field}": 1}}x"#),
            format!(r#"{{"{field}": 134217728, "extra": 1}}"#),
            format!(r#"{{"{field}": 134217728, "{}": 1}}"#, field.to_uppercase()),
            format!(r#"{{"{field}": "1G", "{field}": 134217728}}"#),
            format!(r#"{{"{field}": 134217728{other}, "{field}": "1G"}}"#),
        ] {
            cases.push(("PUT", path, body));
        }
        for value in NOT_A_SIZE {
            cases.push(("PUT", path, format!(r#"{{"{field}": {value}{other}}}"#)));
        }
    }
    for extra in [
        r#""node": -1"#,
        r#""node": 4294967296"#,
        r#""node": 1.5"#,
        r#""node": "0""#,
        r#""backing": "file""#,
        r#""backing": 1"#,
        r#""backing": null"#,
        r#""prealloc": "yes""#,
        r#""prealloc": 1"#,
        r#""prealloc": null"#,
        r#""id": 5"#,
        r#""id": """#,
        r#""id": "a/b""#,
        r#""id": "../x""#,
        r#""id": ["d"]"#,
        r#""slot": 3"#,
    ] {
        cases.push(("PUT", "/vm/dimms", format!(r#"{{"size": "1G", {extra}}}"#)));
    }

    let running = start();
    let mut wrong = Vec::new();
    for (method, path, body) in &cases {
        let (status, response) = running
            .client
            .call_raw(method, path, Some(body.as_bytes()))
            .unwrap();
        let context = format!("{method} {path} {body:?}: {status} {response}");
        let message = response["error"].as_str().unwrap_or_default();
        // A missing body is named as such, with what to send.
        let missing_named = !(body.trim().is_empty() && method == &"PUT")
            || message.contains("missing request body");
        if !(400..500).contains(&status) || message.is_empty() || !missing_named {
            wrong.push(context);
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert!(
        running.vmm.requests().is_empty(),
        "the handler saw {:?}",
        running.vmm.requests()
    );
    // The server still answers well-formed requests.
    running.client.vm_info().unwrap();
}

#[test]
fn oversized_chunked_body_is_rejected() {
    let running = start();
    let mut stream = UnixStream::connect(running.server.socket_path()).unwrap();
    let chunk = vec![b'a'; 40 * 1024];
    let mut request =
        b"PUT /vm/virtio-mem/vmem0 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..2 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).unwrap();
    let response = read_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(running.vmm.requests().is_empty());
}

/// Read until the end of the response head (or EOF).
/// The status and error message of an error answer, which must carry a message.
fn error_of((status, body): (u16, serde_json::Value)) -> (u16, String) {
    let message = body["error"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "status {status} without error message");
    (status, message)
}

fn read_head(stream: &mut UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !received.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn garbage_does_not_break_the_server() {
    let running = start();
    for garbage in [
        &b"\x00\x01\x02\xff\r\n\r\n"[..],
        b"GET /vm/info HTTP/9.9\r\n\r\n",
        b"PUT /vm/virtio-mem/vmem0 HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"GET /vm/info HTTP/1.1\r\nHost: x\r\nX: \xff\xfe\r\n\r\n",
    ] {
        let mut stream = UnixStream::connect(running.server.socket_path()).unwrap();
        stream.write_all(garbage).unwrap();
        let _ = read_head(&mut stream);
    }
    // A client that connects and leaves.
    drop(UnixStream::connect(running.server.socket_path()).unwrap());

    let mut stream = UnixStream::connect(running.server.socket_path()).unwrap();
    stream
        .write_all(b"GET /vm/info HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut stream).starts_with("HTTP/1.1 200"));
    running.client.vm_info().unwrap();
}

/// Clients that connect and send nothing, or half a request head, and then sit there.
fn idle_clients(path: &Path, count: usize, send: &[u8]) -> Vec<UnixStream> {
    (0..count)
        .map(|_| {
            let mut stream = UnixStream::connect(path).unwrap();
            stream.write_all(send).unwrap();
            stream
        })
        .collect()
}

#[test]
fn idle_connections_cannot_lock_clients_out() {
    for send in [&b""[..], b"GET /vm/info HTTP/1.1\r\nHost: x\r\n"] {
        let running = start();
        let path = running.server.socket_path();
        let _idle = idle_clients(path, 100, send);
        // Let the server accept them all before the real client comes.
        std::thread::sleep(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let client = ApiClient::new(path).with_timeout(Duration::from_secs(3));
        for _ in 0..3 {
            client.vm_info().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_request_with_the_handler_is_not_evicted() {
    let running = start();
    let path = running.server.socket_path().to_owned();
    let slow = std::thread::spawn({
        let path = path.clone();
        move || ApiClient::new(path).resize_virtio_mem("slow", 1 << 30)
    });
    std::thread::sleep(Duration::from_millis(200));
    // Enough newcomers to evict every other connection more than once.
    let _idle = idle_clients(&path, 2 * 64, b"");
    slow.join().unwrap().unwrap();
    running.client.vm_info().unwrap();
}

#[test]
fn handler_panic_is_a_500_and_the_server_survives() {
    let running = start();
    let error = running
        .client
        .resize_virtio_mem("panic", 1 << 30)
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Api { status: 500, .. }),
        "{error:?}"
    );
    running.client.vm_info().unwrap();
}

fn socket_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_socket_is_private_to_its_owner_whatever_the_umask() {
    let dir = TempDir::new();
    let path = dir.socket();
    let server = ApiServer::bind(&path).unwrap();
    assert_eq!(socket_mode(&path), 0o600);
    drop(server);

    let server = ApiServer::bind_with_mode(&path, 0o660).unwrap();
    assert_eq!(socket_mode(&path), 0o660);
    server.spawn(Arc::new(FakeVmm::default())).unwrap();
    ApiClient::new(&path).vm_info().unwrap();
    drop(server);

    let error = ApiServer::bind_with_mode(&path, 0o4700).unwrap_err();
    assert!(
        matches!(error, ApiServerError::InvalidMode { mode: 0o4700, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("4700"), "{error}");
    assert!(!path.exists());
}

/// The server turns a handler panic into a 500 with `catch_unwind` (through tokio's
/// `spawn_blocking`); a build with `panic = "abort"` would kill the VM instead. The test
/// above runs with the test profile, so check what the release profile says.
#[test]
fn release_builds_unwind_so_a_handler_panic_stays_a_500() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let manifest = std::fs::read_to_string(manifest).unwrap();
    let mut section = "";
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section.starts_with("[profile.") {
            let setting: String = line.chars().filter(|c| !c.is_whitespace()).collect();
            assert_ne!(
                setting, r#"panic="abort""#,
                "{section} aborts on panic: a handler panic would kill the VM"
            );
        }
    }
}

#[test]
fn bind_fails_when_another_server_listens() {
    let dir = TempDir::new();
    let path = dir.socket();
    let _first = ApiServer::bind(&path).unwrap();
    let error = ApiServer::bind(&path).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "API socket {} is already in use by another process",
            path.display()
        )
    );
    // The failed bind must not have removed the live socket.
    assert!(path.exists());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = TempDir::new();
    let path = dir.socket();
    // A listener that went away without removing its socket file.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let server = ApiServer::bind(&path).unwrap();
    let vmm = Arc::new(FakeVmm::default());
    server.spawn(vmm).unwrap();
    ApiClient::new(&path).vm_info().unwrap();
}

#[test]
fn bind_reports_a_missing_directory() {
    let dir = TempDir::new();
    let path = dir.0.join("missing").join("api.sock");
    let error = ApiServer::bind(&path).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "cannot create API socket {}: directory {} does not exist",
            path.display(),
            dir.0.join("missing").display()
        )
    );
}

#[test]
fn bind_leaves_other_files_alone() {
    let dir = TempDir::new();
    let path = dir.socket();
    std::fs::write(&path, "precious").unwrap();
    let error = ApiServer::bind(&path).unwrap_err();
    assert!(
        matches!(error, ApiServerError::NotASocket { .. }),
        "{error:?}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn shutdown_stops_serving_and_removes_the_socket() {
    let dir = TempDir::new();
    let path = dir.socket();
    let server = ApiServer::bind(&path).unwrap();
    let thread = server.spawn(Arc::new(FakeVmm::default())).unwrap();
    ApiClient::new(&path).vm_info().unwrap();

    server.shutdown();
    assert!(!path.exists());
    thread.join().unwrap();
    server.shutdown();
    assert!(matches!(
        server.spawn(Arc::new(FakeVmm::default())),
        Err(ApiServerError::NotListening { .. })
    ));
}

#[test]
fn drop_removes_the_socket_but_not_a_successors() {
    let dir = TempDir::new();
    let path = dir.socket();
    let server = ApiServer::bind(&path).unwrap();
    // Someone replaced our socket file; cleanup must not delete theirs.
    std::fs::remove_file(&path).unwrap();
    let successor = UnixListener::bind(&path).unwrap();
    drop(server);
    assert!(path.exists());
    drop(successor);

    let server = ApiServer::bind(&path).unwrap();
    drop(server);
    assert!(!path.exists());
}

#[test]
fn client_errors_are_one_clear_line() {
    let dir = TempDir::new();
    let path = dir.socket();
    let error = ApiClient::new(&path).vm_info().unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "cannot connect to API socket {}: ",
            path.display()
        )),
        "{message}"
    );
    assert!(message.contains("os error 2"), "{message}");
    assert!(!message.contains('\n'));

    let invalid = ApiClient::new(&path)
        .resize_virtio_mem("a/b", 0)
        .unwrap_err();
    assert!(matches!(invalid, ClientError::InvalidRequest { .. }));
}

#[test]
fn client_times_out_on_a_silent_server() {
    let dir = TempDir::new();
    let path = dir.socket();
    // Accepts connections (through the backlog) but never answers.
    let _silent = UnixListener::bind(&path).unwrap();
    let error = ApiClient::new(&path)
        .with_timeout(Duration::from_millis(200))
        .vm_info()
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    // Giving up does not take the request back: the message must not suggest it failed.
    let message = error.to_string();
    assert!(message.contains("may still be carried out"), "{message}");
}

/// The (method, path) pairs listed under `paths:` in an OpenAPI YAML document
/// written in this crate's layout (two-space indents).
fn openapi_routes(yaml: &str) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    let mut in_paths = false;
    let mut current_path: Option<String> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if indent == 0 {
            in_paths = trimmed == "paths:";
            current_path = None;
        } else if in_paths && indent == 2 {
            current_path = trimmed.strip_suffix(':').map(str::to_owned);
        } else if in_paths && indent == 4 {
            if let (Some(path), Some(method)) = (&current_path, trimmed.strip_suffix(':')) {
                let method = method.to_ascii_uppercase();
                if ["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"]
                    .contains(&method.as_str())
                {
                    routes.push((method, path.clone()));
                }
            }
        }
    }
    routes
}

#[test]
fn openapi_document_lists_exactly_the_routes() {
    let yaml_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
    let yaml = std::fs::read_to_string(yaml_path).unwrap();
    assert!(yaml.starts_with("openapi: 3."));
    let mut documented = openapi_routes(&yaml);
    documented.sort();
    let mut routed: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    routed.sort();
    assert_eq!(documented, routed);
}
