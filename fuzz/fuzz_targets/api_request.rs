//! The API's request parser (`tidevm_api::parse_request`: routing and body parsing, the same
//! code the server runs once it has the body) on arbitrary methods, paths and bodies.
//!
//! Invariants: nothing panics; every error is a 4xx; an accepted request came with the one
//! method its route takes and names an id of 1 to 64 of `[A-Za-z0-9_.-]`; a byte-size field
//! given as a string agrees with `parse_byte_size`; the answer does not depend on anything but
//! the input; error messages stay short whatever the input echoes.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tidevm_api::{parse_byte_size, parse_request, ApiRequest, MAX_REQUEST_BODY_BYTES};

const METHODS: [&str; 6] = ["GET", "PUT", "DELETE", "POST", "PATCH", "get"];
const PATHS: [&str; 12] = [
    "/vm/info",
    "/vm/memory",
    "/vm/memory/policy",
    "/metrics",
    "/vm/shutdown",
    "/vm/reboot",
    "/vm/balloon",
    "/vm/dimms",
    "/vm/dimms/",
    "/vm/virtio-mem/",
    "/vm/",
    "",
];
const BODIES: [&str; 8] = [
    r#"{"requested_size": "#,
    r#"{"target_size": "#,
    r#"{"size": "#,
    r#"{"size": 134217728, "node": "#,
    r#"{"size": "1G", "backing": "#,
    r#"{"size": "1G", "id": "#,
    r#"{"size": "1G", "prealloc": "#,
    "",
];

#[derive(Arbitrary, Debug)]
struct Input {
    method: (u8, String),
    path: (u8, String),
    body: (u8, String, bool),
    raw: Vec<u8>,
}

fn id_ok(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

fuzz_target!(|input: Input| {
    let method = match usize::from(input.method.0) {
        i if i < METHODS.len() * 4 => METHODS[i % METHODS.len()],
        _ => input.method.1.as_str(),
    };
    let path = format!(
        "{}{}",
        PATHS[usize::from(input.path.0) % PATHS.len()],
        input.path.1
    );
    let body: Vec<u8> = match input.body.0 % 3 {
        0 => input.raw.clone(),
        1 => {
            // A template completed by the input, closed or not.
            let mut b = BODIES[usize::from(input.body.0 / 3) % BODIES.len()].to_owned();
            b.push_str(&input.body.1);
            if input.body.2 {
                b.push('}');
            }
            b.into_bytes()
        }
        _ => format!("{{\"size\": {:?}}}", input.body.1).into_bytes(),
    };
    if body.len() > MAX_REQUEST_BODY_BYTES {
        return; // the server refuses it with 413 before parsing
    }
    let result = parse_request(method, &path, &body);
    let again = parse_request(method, &path, &body);
    assert_eq!(result, again, "same input, different answer");
    match result {
        Err(e) => {
            assert!(
                (400..500).contains(&e.status),
                "error {} for {e:?}",
                e.status
            );
            assert!(
                e.message.len() <= 2048 + body.len(),
                "error message of {} bytes",
                e.message.len()
            );
        }
        Ok(request) => {
            let (want, id) = match &request {
                ApiRequest::VmInfo
                | ApiRequest::BalloonStatus
                | ApiRequest::MemoryStatus
                | ApiRequest::Metrics => ("GET", None),
                ApiRequest::Shutdown
                | ApiRequest::Reboot
                | ApiRequest::SetBalloon { .. }
                | ApiRequest::SetMemory(_)
                | ApiRequest::SetMemoryPolicy { .. } => ("PUT", None),
                ApiRequest::ResizeVirtioMem { id, .. } => ("PUT", Some(id.clone())),
                ApiRequest::AddDimm(b) => ("PUT", b.id.clone()),
                ApiRequest::RemoveDimm { id } => ("DELETE", Some(id.clone())),
            };
            assert_eq!(method, want, "{request:?} accepted with method {method}");
            if let Some(id) = id {
                assert!(id_ok(&id), "accepted id {id:?}");
            }
            if let ApiRequest::AddDimm(b) = &request {
                // A size given as a JSON string goes through parse_byte_size.
                if input.body.0 % 3 == 2 {
                    assert_eq!(Some(b.size), parse_byte_size(&input.body.1));
                }
            }
        }
    }
});
