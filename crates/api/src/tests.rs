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
        payload: Some(PayloadInfo {
            kernel: "/guest/vmlinux".to_owned(),
            initramfs: Some("/guest/initramfs.cpio.gz".to_owned()),
            cmdline: "console=ttyS0".to_owned(),
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
        nets: vec![crate::NetInfo {
            id: "net0".to_owned(),
            tap: "tidevm0".to_owned(),
            mac: "02:00:00:00:00:01".to_owned(),
            counters: crate::NetCounters {
                rx_frames: 2,
                tx_bytes: 1514,
                ..Default::default()
            },
        }],
    }
}

/// 1 GiB boot, a 4 GiB virtio-mem device with 2 GiB plugged of 2 GiB requested, a balloon
/// of 256 MiB (128 MiB actual).
fn sample_memory() -> MemoryStatus {
    MemoryStatus {
        boot_ram_bytes: 1 << 30,
        virtio_mem: vec![MemoryVirtioMem {
            id: "vmem0".to_owned(),
            node: 0,
            block_size: BLOCK_SIZE,
            region_size: 4 << 30,
            plugged_size: 2 << 30,
            requested_size: 2 << 30,
        }],
        dimms: vec![],
        balloon: Some(MemoryBalloon {
            target_bytes: 256 << 20,
            actual_bytes: 128 << 20,
            max_target_bytes: 1 << 30,
            deflate_on_oom: true,
            free_page_reporting: false,
        }),
        requested_total_bytes: (3 << 30) - (256 << 20),
        actual_total_bytes: (3 << 30) - (128 << 20),
        nodes: vec![NodeMemory {
            node: 0,
            requested_bytes: 3 << 30,
        }],
        min_bytes: 0,
        max_bytes: 5 << 30,
        target_total_bytes: None,
        shortfalls: vec![],
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
            ApiRequest::SetBalloon { .. } | ApiRequest::SetMemoryPolicy { .. } => {
                Ok(ApiResponse::Empty)
            }
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
            ApiRequest::Metrics => Ok(ApiResponse::Metrics(
                "# HELP tidevm_vm_running Running.\n# TYPE tidevm_vm_running gauge\n\
                 tidevm_vm_running 1\n"
                    .to_owned(),
            )),
            ApiRequest::MemoryStatus => Ok(ApiResponse::Memory(sample_memory())),
            ApiRequest::SetMemory(body) if body.size > 5 << 30 => Err(ApiError::bad_request(
                format!("{} bytes is above the maximum reachable 5368709120 bytes", body.size),
            )),
            ApiRequest::SetMemory(body) => Ok(ApiResponse::MemoryPlan(MemoryPlanInfo {
                target_total_bytes: body.size,
                steps: vec![MemoryStep::SetVirtioMem {
                    id: "vmem0".to_owned(),
                    requested_size: body.size - (1 << 30),
                }],
            })),
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
        .chain(crate::ch::CH_ROUTES)
        .chain(crate::server::STREAM_ROUTES)
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    routed.sort();
    assert_eq!(documented, routed);
}

#[test]
fn memory_routes_round_trip() {
    let running = start();
    assert_eq!(running.client.memory().unwrap(), sample_memory());
    let plan = running.client.set_memory(3 << 30, None).unwrap();
    assert_eq!(plan.target_total_bytes, 3 << 30);
    assert_eq!(
        plan.steps,
        vec![MemoryStep::SetVirtioMem {
            id: "vmem0".to_owned(),
            requested_size: 2 << 30
        }]
    );
    let (status, body) = running
        .client
        .call("PUT", "/vm/memory", Some(json!({"size": "4G", "node": 1})))
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["steps"][0]["action"], "set_virtio_mem");
    assert_eq!(body["steps"][0]["requested_size"], 3u64 << 30);
    // The handler's refusal, naming the limit, reaches the client as it is.
    let (status, message) = error_of(
        running
            .client
            .call("PUT", "/vm/memory", Some(json!({"size": "6G"})))
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("maximum reachable"), "{message}");
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::MemoryStatus,
            ApiRequest::SetMemory(SetMemoryBody {
                size: 3 << 30,
                node: None
            }),
            ApiRequest::SetMemory(SetMemoryBody {
                size: 4 << 30,
                node: Some(1)
            }),
            ApiRequest::SetMemory(SetMemoryBody {
                size: 6 << 30,
                node: None
            }),
        ]
    );
}

#[test]
fn malformed_memory_requests_never_reach_the_handler() {
    let running = start();
    for body in [
        &b""[..],
        b"{}",
        b"[1]",
        b"{\"size\": -1}",
        b"{\"size\": \"lots\"}",
        b"{\"size\": 1, \"node\": -1}",
        b"{\"size\": 1, \"nodes\": 1}",
    ] {
        let (status, message) = error_of(
            running
                .client
                .call_raw("PUT", "/vm/memory", Some(body))
                .unwrap(),
        );
        assert_eq!(status, 400, "{}: {message}", String::from_utf8_lossy(body));
    }
    let (status, _) = running
        .client
        .call_raw("GET", "/vm/memory", Some(b"{\"size\": 1}"))
        .unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        running.client.call("DELETE", "/vm/memory", None).unwrap().0,
        405
    );
    assert!(running.vmm.requests().is_empty());
}

/// Sends `request` as raw bytes and returns the response head, lower-cased, and its body.
fn raw_exchange(socket: &Path, request: &[u8]) -> (String, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => panic!("no complete response head: {received:?}"),
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let declared_length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|length| length.trim().parse::<usize>().unwrap());
    let length = if head.starts_with("http/1.1 204") {
        // RFC 9110: no Content-Length (nor a body) on a 204; the answer ends with its head.
        assert_eq!(declared_length, None, "{head}");
        0
    } else {
        declared_length.unwrap_or_else(|| panic!("no content-length in {head}"))
    };
    assert!(!head.contains("transfer-encoding"), "{head}");
    while received.len() < head_end + length {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
    (head, received[head_end..].to_vec())
}

/// The raw head of the answer to `GET /api/v1/vmm.ping`.
fn raw_head_of(socket: &Path) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .write_all(&ch_remote_style("GET", "/api/v1/vmm.ping", ""))
        .unwrap();
    read_head(&mut stream).into_bytes()
}

/// A request the way ch-remote writes it: no Content-Type.
fn ch_remote_style(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn every_answer_has_a_content_length_and_no_content_type_is_needed() {
    let running = start();
    let socket = running.server.socket_path();
    let (head, body) = raw_exchange(
        socket,
        &ch_remote_style("PUT", "/api/v1/vm.resize", r#"{"desired_ram":3221225472}"#),
    );
    // No reason phrase: Cloud Hypervisor's client parses the whole rest of the status line
    // as the number.
    assert!(head.starts_with("http/1.1 204 \r\n"), "{head}");
    assert!(body.is_empty());
    let (head, body) = raw_exchange(socket, &ch_remote_style("GET", "/api/v1/vmm.ping", ""));
    assert!(head.starts_with("http/1.1 200 \r\n"), "{head}");
    // Spelled as Cloud Hypervisor's client looks for it.
    assert!(
        String::from_utf8_lossy(&raw_head_of(socket)).contains("\r\nContent-Length: "),
        "title-case headers"
    );
    let ping: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    // The native API's 204s and errors too.
    let (head, _) = raw_exchange(socket, &ch_remote_style("PUT", "/vm/reboot", ""));
    assert!(head.starts_with("http/1.1 204"), "{head}");
    let (head, body) = raw_exchange(socket, &ch_remote_style("GET", "/nowhere", ""));
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(!body.is_empty());
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::SetMemory(SetMemoryBody {
                size: 3 << 30,
                node: None
            }),
            ApiRequest::Reboot
        ]
    );
}

#[test]
fn cloud_hypervisor_vm_info_has_its_required_fields() {
    let running = start();
    let (status, info) = running.client.call("GET", "/api/v1/vm.info", None).unwrap();
    assert_eq!(status, 200);
    // Required by Cloud Hypervisor's OpenAPI document: config, state, config.payload,
    // cpus.{boot_vcpus,max_vcpus}, memory.size, balloon.size.
    assert_eq!(info["state"], "Running");
    let config = &info["config"];
    assert_eq!(config["payload"]["kernel"], "/guest/vmlinux");
    assert_eq!(config["payload"]["initramfs"], "/guest/initramfs.cpio.gz");
    assert_eq!(config["payload"]["cmdline"], "console=ttyS0");
    assert_eq!(config["cpus"]["boot_vcpus"], 2);
    assert_eq!(config["cpus"]["max_vcpus"], 2);
    assert_eq!(config["memory"]["size"], 1u64 << 30);
    assert_eq!(config["memory"]["hotplug_size"], 4u64 << 30);
    assert_eq!(config["memory"]["hotplugged_size"], 2u64 << 30);
    assert_eq!(config["memory"]["hotplug_method"], "VirtioMem");
    assert_eq!(config["balloon"]["size"], 256u64 << 20);
    assert_eq!(config["balloon"]["deflate_on_oom"], true);
    // boot + plugged − balloon actual.
    assert_eq!(
        info["memory_actual_size"],
        (1u64 << 30) + (2 << 30) - (128 << 20)
    );
    assert_eq!(
        running.vmm.requests(),
        vec![ApiRequest::VmInfo, ApiRequest::MemoryStatus]
    );
}

#[test]
fn cloud_hypervisor_vm_info_without_hotplug_or_balloon() {
    let mut info = sample_info();
    info.dimms = None;
    let mut memory = sample_memory();
    memory.virtio_mem.clear();
    memory.balloon = None;
    let ch_info = serde_json::to_value(crate::ch::vm_info_of(&info, &memory)).unwrap();
    let memory_config = &ch_info["config"]["memory"];
    assert_eq!(memory_config["size"], 1u64 << 30);
    assert!(memory_config.get("hotplug_method").is_none(), "{ch_info}");
    assert!(ch_info["config"].get("balloon").is_none(), "{ch_info}");
    assert_eq!(ch_info["memory_actual_size"], 1u64 << 30);
}

#[test]
fn cloud_hypervisor_resize_translates_to_tidevm_requests() {
    let running = start();
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| {
        running.client.call(method, path, body).unwrap()
    };
    let (status, body) = call(
        "PUT",
        "/api/v1/vm.resize",
        Some(
            json!({"desired_ram": 3u64 << 30, "desired_balloon": 512u64 << 20, "desired_vcpus": 2}),
        ),
    );
    assert_eq!((status, body), (204, serde_json::Value::Null));
    assert_eq!(
        call(
            "PUT",
            "/api/v1/vm.resize-zone",
            Some(json!({"id": "vmem0", "desired_ram": 1u64 << 30}))
        )
        .0,
        204
    );
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::VmInfo,
            ApiRequest::SetMemory(SetMemoryBody {
                size: 3 << 30,
                node: None
            }),
            ApiRequest::SetBalloon {
                target_size: 512 << 20
            },
            ApiRequest::ResizeVirtioMem {
                id: "vmem0".to_owned(),
                requested_size: 1 << 30
            },
        ]
    );
}

#[test]
fn cloud_hypervisor_refusals_are_500_and_malformed_bodies_400() {
    let running = start();
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| {
        error_of(running.client.call(method, path, body).unwrap())
    };
    // ch-remote treats 4xx as success: a refused resize must be a 5xx to be noticed.
    let (status, message) = call(
        "PUT",
        "/api/v1/vm.resize",
        Some(json!({"desired_ram": 6u64 << 30})),
    );
    assert_eq!(status, 500);
    assert!(message.contains("maximum reachable"), "{message}");
    let (status, message) = call(
        "PUT",
        "/api/v1/vm.resize",
        Some(json!({"desired_vcpus": 4})),
    );
    assert_eq!(status, 500);
    assert!(message.contains("not supported"), "{message}");
    let (status, message) = call(
        "PUT",
        "/api/v1/vm.resize-zone",
        Some(json!({"id": "nope", "desired_ram": 0})),
    );
    assert_eq!(status, 500);
    assert!(message.contains("nope"), "{message}");
    // The VMM saw only the vCPU lookup and the requests it refused.
    let seen = running.vmm.requests().len();
    assert_eq!(seen, 3);
    for (method, path, body) in [
        ("PUT", "/api/v1/vm.resize", &b""[..]),
        ("PUT", "/api/v1/vm.resize", b"{}"),
        ("PUT", "/api/v1/vm.resize", b"[1]"),
        ("PUT", "/api/v1/vm.resize", b"{\"desired_ram\": -1}"),
        ("PUT", "/api/v1/vm.resize-zone", b"{\"id\": \"vmem0\"}"),
    ] {
        let (status, message) =
            error_of(running.client.call_raw(method, path, Some(body)).unwrap());
        assert_eq!(status, 400, "{}: {message}", String::from_utf8_lossy(body));
    }
    assert_eq!(
        error_of(
            running
                .client
                .call("GET", "/api/v1/vm.resize", None)
                .unwrap()
        )
        .0,
        405
    );
    let (status, message) = error_of(running.client.call("PUT", "/api/v1/vm.boot", None).unwrap());
    assert_eq!(status, 404);
    assert!(message.contains("vm.resize"), "{message}");
    assert_eq!(running.vmm.requests().len(), seen);
}

#[test]
fn cloud_hypervisor_counters_ping_and_power() {
    let running = start();
    let (status, counters) = running
        .client
        .call("GET", "/api/v1/vm.counters", None)
        .unwrap();
    assert_eq!(status, 200);
    let device = &sample_info().virtio_mem[0];
    assert_eq!(counters["vmem0"]["plugged_size"], device.plugged_size);
    assert_eq!(counters["vmem0"]["requested_size"], device.requested_size);
    assert_eq!(counters["vmem0"]["ack"], device.counters.ack);
    assert!(counters["vmem0"]["ack"].is_u64(), "{counters}");
    assert_eq!(counters["balloon"]["target_bytes"], 1u64 << 30);
    let (status, ping) = running
        .client
        .call("GET", "/api/v1/vmm.ping", None)
        .unwrap();
    assert_eq!(status, 200);
    assert!(ping["version"].is_string());
    for path in [
        "/api/v1/vm.shutdown",
        "/api/v1/vm.reboot",
        "/api/v1/vmm.shutdown",
    ] {
        assert_eq!(
            running.client.call("PUT", path, None).unwrap().0,
            204,
            "{path}"
        );
    }
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::VmInfo,
            ApiRequest::MemoryStatus,
            ApiRequest::BalloonStatus,
            ApiRequest::Shutdown,
            ApiRequest::Reboot,
            ApiRequest::Shutdown,
        ]
    );
}

/// Cloud Hypervisor's own client, from the directory next to the workspace
/// (`../shared/anchors-bin/ch-remote` from the repository root), or `TIDEVM_CH_REMOTE`.
fn ch_remote_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TIDEVM_CH_REMOTE") {
        return Some(PathBuf::from(path));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/anchors-bin/ch-remote");
    path.is_file().then_some(path)
}

/// Runs ch-remote against `socket`; returns its exit code, stdout and stderr.
fn ch_remote(binary: &Path, socket: &Path, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(binary)
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn cloud_hypervisors_ch_remote_drives_the_api() {
    let Some(binary) = ch_remote_binary() else {
        eprintln!(
            "SKIPPED: ch-remote not found at ../shared/anchors-bin/ch-remote next to the \
             workspace (set TIDEVM_CH_REMOTE): Cloud Hypervisor client compatibility NOT tested"
        );
        return;
    };
    let running = start();
    let socket = running.server.socket_path();

    let (code, out, err) = ch_remote(&binary, socket, &["ping"]);
    assert_eq!(code, 0, "ping: {out} {err}");
    let ping: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));

    let (code, out, err) = ch_remote(&binary, socket, &["info"]);
    assert_eq!(code, 0, "info: {out} {err}");
    let info: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(info["config"]["memory"]["hotplug_method"], "VirtioMem");
    assert_eq!(
        info["memory_actual_size"],
        (1u64 << 30) + (2 << 30) - (128 << 20)
    );

    for args in [
        &["resize", "--memory", "3G"][..],
        &["resize", "--balloon", "512M"],
        &["resize-zone", "--id", "vmem0", "--size", "1G"],
    ] {
        let (code, out, err) = ch_remote(&binary, socket, args);
        assert_eq!(code, 0, "{args:?}: {out} {err}");
    }
    // A refusal is a failure for ch-remote (5xx), with the limit in what it prints.
    let (code, out, err) = ch_remote(&binary, socket, &["resize", "--memory", "6G"]);
    assert_ne!(code, 0, "{out} {err}");
    assert!(
        format!("{out}{err}").contains("maximum reachable"),
        "{out} {err}"
    );
    let (code, out, err) = ch_remote(&binary, socket, &["resize", "--cpus", "4"]);
    assert_ne!(code, 0, "{out} {err}");
    assert!(
        format!("{out}{err}").contains("not supported"),
        "{out} {err}"
    );

    let (code, out, err) = ch_remote(&binary, socket, &["counters"]);
    assert_eq!(code, 0, "counters: {out} {err}");
    let counters: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(counters["vmem0"]["ack"].is_u64(), "{counters}");

    let received: Vec<ApiRequest> = running
        .vmm
        .requests()
        .into_iter()
        .filter(|request| {
            !matches!(
                request,
                ApiRequest::VmInfo | ApiRequest::MemoryStatus | ApiRequest::BalloonStatus
            )
        })
        .collect();
    assert_eq!(
        received,
        vec![
            ApiRequest::SetMemory(SetMemoryBody {
                size: 3 << 30,
                node: None
            }),
            ApiRequest::SetBalloon {
                target_size: 512 << 20
            },
            ApiRequest::ResizeVirtioMem {
                id: "vmem0".to_owned(),
                requested_size: 1 << 30
            },
            ApiRequest::SetMemory(SetMemoryBody {
                size: 6 << 30,
                node: None
            }),
        ]
    );
}

/// `GET /vm/events` streams the handler's subscription line by line, as it comes.
#[test]
fn events_stream_line_by_line() {
    struct Publisher(Mutex<Option<std::sync::mpsc::Receiver<String>>>);
    impl RequestHandler for Publisher {
        fn handle(&self, _request: ApiRequest) -> Result<ApiResponse, ApiError> {
            Err(ApiError::internal("not used"))
        }
        fn subscribe_events(&self) -> Result<std::sync::mpsc::Receiver<String>, ApiError> {
            self.0
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| ApiError::conflict("one subscriber only"))
        }
    }
    let dir = TempDir::new();
    let server = ApiServer::bind(&dir.socket()).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    server
        .spawn(Arc::new(Publisher(Mutex::new(Some(rx)))))
        .unwrap();
    let client = ApiClient::new(dir.socket()).with_timeout(Duration::from_secs(10));
    let publisher = std::thread::spawn(move || {
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(format!("{{\"seq\": {i}}}")).unwrap();
        }
        // Keeps the stream open until the client has read all three.
        std::thread::sleep(Duration::from_millis(500));
    });
    let mut lines = Vec::new();
    client
        .events(|line| {
            lines.push(line.to_owned());
            lines.len() < 3
        })
        .unwrap();
    assert_eq!(lines, vec!["{\"seq\": 0}", "{\"seq\": 1}", "{\"seq\": 2}"]);
    publisher.join().unwrap();
    // A second subscriber is refused with the handler's status and message.
    let error = client.events(|_| true).unwrap_err();
    assert!(error.to_string().contains("one subscriber only"), "{error}");
    // Another method on the path is a 405.
    let (status, _) = client.call("PUT", "/vm/events", None).unwrap();
    assert_eq!(status, 405);
}

#[test]
fn memory_policy_round_trip() {
    let running = start();
    let (status, _) = running
        .client
        .call(
            "PUT",
            "/vm/memory/policy",
            Some(json!({"policy": "auto,min=1G,max=8G"})),
        )
        .unwrap();
    assert_eq!(status, 204);
    let (status, _) = running
        .client
        .call("PUT", "/vm/memory/policy", Some(json!({"policy": "off"})))
        .unwrap();
    assert_eq!(status, 204);
    for bad in [
        json!({}),
        json!({"policy": 5}),
        json!({"policy": "off", "x": 1}),
    ] {
        let (status, _) = running
            .client
            .call("PUT", "/vm/memory/policy", Some(bad.clone()))
            .unwrap();
        assert_eq!(status, 400, "{bad}");
    }
    assert_eq!(
        running.vmm.requests(),
        vec![
            ApiRequest::SetMemoryPolicy {
                policy: "auto,min=1G,max=8G".into()
            },
            ApiRequest::SetMemoryPolicy {
                policy: "off".into()
            }
        ]
    );
}

/// Sends one HTTP/1.1 request with `Connection: close` and returns the whole answer.
fn exchange_closing(mut stream: impl Read + Write, method: &str, path: &str) -> String {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn metrics_route_answers_prometheus_text() {
    let running = start();
    let text = running.client.metrics().unwrap();
    assert!(text.contains("tidevm_vm_running 1"), "{text}");
    assert_eq!(running.vmm.requests(), vec![ApiRequest::Metrics]);
    let stream = UnixStream::connect(running.server.socket_path()).unwrap();
    let answer = exchange_closing(stream, "GET", "/metrics");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("content-type: {METRICS_CONTENT_TYPE}")),
        "{answer}"
    );
    let (status, _) = running.client.call("PUT", "/metrics", None).unwrap();
    assert_eq!(status, 405);
}

#[test]
fn answered_requests_are_counted_by_route_template_and_status() {
    let running = start();
    running.client.vm_info().unwrap();
    running.client.vm_info().unwrap();
    assert_eq!(running.client.call("PUT", "/vm/info", None).unwrap().0, 405);
    assert_eq!(
        running
            .client
            .call("GET", "/no/such/route", None)
            .unwrap()
            .0,
        404
    );
    let resize = |id: &str| {
        running
            .client
            .call(
                "PUT",
                &format!("/vm/virtio-mem/{id}"),
                Some(json!({"requested_size": BLOCK_SIZE})),
            )
            .unwrap()
            .0
    };
    assert_eq!(resize("vmem0"), 204);
    assert_eq!(resize("other"), 404);
    let count = |method: &str, endpoint: &str, status: u16| {
        running
            .server
            .request_counts()
            .snapshot()
            .iter()
            .find(|c| c.method == method && c.endpoint == endpoint && c.status == status)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count("GET", "/vm/info", 200), 2);
    assert_eq!(count("PUT", "/vm/info", 405), 1);
    assert_eq!(count("GET", UNKNOWN_ROUTE, 404), 1);
    assert_eq!(count("PUT", "/vm/virtio-mem/{id}", 204), 1);
    assert_eq!(count("PUT", "/vm/virtio-mem/{id}", 404), 1);
    // Cloud Hypervisor's routes count under their own paths, unknown ones as unknown.
    let (status, _) = running
        .client
        .call("GET", "/api/v1/vmm.ping", None)
        .unwrap();
    assert_eq!(count("GET", "/api/v1/vmm.ping", status), 1);
    let (status, _) = running
        .client
        .call("GET", "/api/v1/vm.nosuch", None)
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(count("GET", UNKNOWN_ROUTE, 404), 2);
    // Raw paths never become labels.
    assert!(running
        .server
        .request_counts()
        .snapshot()
        .iter()
        .all(|c| !c.endpoint.contains("vmem0") && !c.endpoint.contains("/no/")));
}

#[test]
fn metrics_listener_serves_get_metrics_over_tcp_only() {
    let listener = MetricsListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let vmm = Arc::new(FakeVmm::default());
    let thread = listener.spawn(vmm.clone()).unwrap();
    let connect = || std::net::TcpStream::connect(listener.local_addr()).unwrap();

    let answer = exchange_closing(connect(), "GET", "/metrics");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("content-type: {METRICS_CONTENT_TYPE}")),
        "{answer}"
    );
    assert!(answer.ends_with("tidevm_vm_running 1\n"), "{answer}");
    assert!(exchange_closing(connect(), "GET", "/vm/info").starts_with("HTTP/1.1 404"));
    let refused = exchange_closing(connect(), "PUT", "/metrics");
    assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
    // Only the one scrape reached the VMM, as a metrics request.
    assert_eq!(vmm.requests(), vec![ApiRequest::Metrics]);

    listener.shutdown();
    thread.join().unwrap();
    // A second listener on a port in use fails with the address in the message.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let error = MetricsListener::bind(busy.local_addr().unwrap()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&busy.local_addr().unwrap().to_string()),
        "{error}"
    );
}
