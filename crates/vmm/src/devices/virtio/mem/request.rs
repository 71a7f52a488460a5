//! virtio-mem requests: decoding a walked descriptor chain into a typed [`Request`], and
//! encoding the response. The chain itself is walked, and every buffer read, by the shared
//! checked walker in [`crate::devices::virtio::chain`].

use vm_memory::GuestMemory;

use crate::devices::virtio::chain::{read_buffer, walk_chain, Buffer, ChainError};
pub use crate::devices::virtio::chain::{DescriptorTable, GuestAccess};

/// Size of a request on the wire.
pub const REQUEST_SIZE: u64 = 24;
/// Size of a response on the wire.
pub const RESPONSE_SIZE: u64 = 10;

/// Request type: plug blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug everything.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: query block state.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// A well-formed request. `addr` and `nb_blocks` are still unchecked against the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Plug `nb_blocks` blocks from `addr`.
    Plug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks from `addr`.
    Unplug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug every block.
    UnplugAll,
    /// Report the plug state of `nb_blocks` blocks from `addr`.
    State {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
}

/// Request kinds, for per-type metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// PLUG.
    Plug,
    /// UNPLUG.
    Unplug,
    /// UNPLUG_ALL.
    UnplugAll,
    /// STATE.
    State,
}

impl Request {
    /// The request's kind.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Plug { .. } => RequestKind::Plug,
            Request::Unplug { .. } => RequestKind::Unplug,
            Request::UnplugAll => RequestKind::UnplugAll,
            Request::State { .. } => RequestKind::State,
        }
    }

    /// Decodes the 24-byte wire format (padding is ignored, as Linux leaves it zero).
    pub fn decode(bytes: &[u8; REQUEST_SIZE as usize]) -> Result<Request, RequestError> {
        let ty = u16::from_le_bytes([bytes[0], bytes[1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[8..16]);
        let addr = u64::from_le_bytes(addr);
        let nb_blocks = u16::from_le_bytes([bytes[16], bytes[17]]);
        match ty {
            VIRTIO_MEM_REQ_PLUG => Ok(Request::Plug { addr, nb_blocks }),
            VIRTIO_MEM_REQ_UNPLUG => Ok(Request::Unplug { addr, nb_blocks }),
            VIRTIO_MEM_REQ_UNPLUG_ALL => Ok(Request::UnplugAll),
            VIRTIO_MEM_REQ_STATE => Ok(Request::State { addr, nb_blocks }),
            other => Err(RequestError::UnknownType(other)),
        }
    }
}

/// Response types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ResponseType {
    /// Done.
    Ack = 0,
    /// Refused for now (plug beyond requested_size); the driver re-reads the config.
    Nack = 1,
    /// Cannot process now; Linux retries after 50 s or at the next config interrupt.
    Busy = 2,
    /// Invalid request; Linux marks the device broken for good.
    Error = 3,
}

/// Encodes a response; `state` is only meaningful for STATE requests.
pub fn encode_response(ty: ResponseType, state: u16) -> [u8; RESPONSE_SIZE as usize] {
    let mut out = [0u8; RESPONSE_SIZE as usize];
    out[0..2].copy_from_slice(&(ty as u16).to_le_bytes());
    out[8..10].copy_from_slice(&state.to_le_bytes());
    out
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain could not be walked, or a buffer was not accessible.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Indirect descriptors were not negotiated.
    #[error("indirect descriptor in a virtio-mem chain")]
    Indirect,
    /// The first descriptor is device-writable.
    #[error("request descriptor is write-only")]
    WriteOnlyRequest,
    /// The request buffer is shorter than 24 bytes.
    #[error("request buffer of {0} bytes is shorter than 24")]
    RequestTooShort(u32),
    /// There is no second descriptor.
    #[error("no response descriptor")]
    MissingResponse,
    /// The second descriptor is device-readable.
    #[error("response descriptor is read-only")]
    ReadOnlyResponse,
    /// The response buffer is shorter than 10 bytes.
    #[error("response buffer of {0} bytes is shorter than 10")]
    ResponseTooShort(u32),
    /// More than two descriptors.
    #[error("more than two descriptors in the chain")]
    ExtraDescriptors,
    /// An unknown request type.
    #[error("unknown request type {0}")]
    UnknownType(u16),
}

/// The outcome of parsing one chain.
#[derive(Debug)]
pub struct ParsedChain {
    /// Where to write the response, if the chain has a usable response buffer (writable, at
    /// least 10 bytes, accessible), even when the request itself is invalid.
    pub response: Option<u64>,
    /// The request, or why there is none.
    pub request: Result<Request, RequestError>,
}

/// Checks the second buffer as a response buffer: device-writable, at least 10 bytes, and
/// accessible when the chain is parsed (checked again when the response is written).
fn check_response(access: &dyn GuestAccess, buffer: &Buffer) -> Result<u64, RequestError> {
    if buffer.indirect {
        return Err(RequestError::Indirect);
    }
    if !buffer.writable {
        return Err(RequestError::ReadOnlyResponse);
    }
    if u64::from(buffer.len) < RESPONSE_SIZE {
        return Err(RequestError::ResponseTooShort(buffer.len));
    }
    if !access.is_accessible(buffer.addr, RESPONSE_SIZE) {
        return Err(ChainError::Inaccessible {
            addr: buffer.addr,
            len: RESPONSE_SIZE,
        }
        .into());
    }
    Ok(buffer.addr)
}

/// Checks the first buffer and reads the request it holds.
fn read_request<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    buffer: &Buffer,
) -> Result<Request, RequestError> {
    if buffer.indirect {
        return Err(RequestError::Indirect);
    }
    if buffer.writable {
        return Err(RequestError::WriteOnlyRequest);
    }
    if u64::from(buffer.len) < REQUEST_SIZE {
        return Err(RequestError::RequestTooShort(buffer.len));
    }
    let mut bytes = [0u8; REQUEST_SIZE as usize];
    read_buffer(mem, access, buffer.addr, &mut bytes)?;
    Request::decode(&bytes)
}

/// Parses the chain starting at descriptor `head`: exactly one device-readable descriptor of
/// at least 24 bytes, then one device-writable descriptor of at least 10 bytes.
pub fn parse_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
) -> ParsedChain {
    // Two descriptors are all a request may have; a third is only noticed, never read.
    let chain = match walk_chain(mem, access, table, head, 2) {
        Ok(chain) => chain,
        Err(e) => {
            return ParsedChain {
                response: None,
                request: Err(e.into()),
            }
        }
    };
    let [first, rest @ ..] = chain.buffers.as_slice() else {
        return ParsedChain {
            response: None,
            request: Err(RequestError::MissingResponse),
        };
    };
    let (response, response_error) = match rest.first().map(|b| check_response(access, b)) {
        Some(Ok(addr)) => (Some(addr), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, Some(RequestError::MissingResponse)),
    };
    let request = match response_error {
        Some(e) => Err(e),
        None if chain.continues => Err(RequestError::ExtraDescriptors),
        None => read_request(mem, access, first),
    };
    ParsedChain { response, request }
}
