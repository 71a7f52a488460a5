//! virtio-mem requests: parsing a descriptor chain into a typed [`Request`], and encoding the
//! response.
//!
//! The guest driver controls every byte read here (descriptor table entries, addresses,
//! lengths, flags, the request itself), so the parser walks the chain itself instead of using
//! `virtio_queue::DescriptorChain`: that iterator follows indirect tables and reads buffers
//! without asking whether the memory is plugged, and reading an unplugged (PROT_NONE) block
//! would kill the VMM. Here every read is preceded by a [`GuestAccess`] check.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::memory::MemoryManager;

/// Size of a request on the wire.
pub const REQUEST_SIZE: u64 = 24;
/// Size of a response on the wire.
pub const RESPONSE_SIZE: u64 = 10;
/// Size of a split-queue descriptor.
const DESCRIPTOR_SIZE: u64 = 16;

/// Request type: plug blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug everything.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: query block state.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Who decides whether the VMM may touch a guest range. [`MemoryManager`] is the real one;
/// the fuzz target and tests use simpler ones.
pub trait GuestAccess {
    /// Whether `[gpa, gpa+len)` can be read and written without faulting.
    fn is_accessible(&self, gpa: u64, len: u64) -> bool;
}

impl GuestAccess for MemoryManager {
    fn is_accessible(&self, gpa: u64, len: u64) -> bool {
        MemoryManager::is_accessible(self, gpa, len)
    }
}

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
    /// A descriptor index beyond the queue size.
    #[error("descriptor index {index} beyond queue size {queue_size}")]
    DescriptorIndex {
        /// The index.
        index: u16,
        /// The queue size.
        queue_size: u16,
    },
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
    /// A buffer or descriptor lies (partly) outside accessible guest memory.
    #[error("guest range {addr:#x}+{len:#x} is not accessible")]
    Inaccessible {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Guest memory refused an access the manager allowed (stale memory view).
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// An unknown request type.
    #[error("unknown request type {0}")]
    UnknownType(u16),
}

/// Where a queue's descriptor table lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Guest-physical address.
    pub addr: u64,
    /// Number of descriptors.
    pub size: u16,
}

/// The outcome of parsing one chain.
#[derive(Debug)]
pub struct ParsedChain {
    /// Where to write the response, if the chain has a usable response buffer (writable, at
    /// least 10 bytes, accessible), even when the request itself is invalid.
    pub response: Option<GuestAddress>,
    /// The request, or why there is none.
    pub request: Result<Request, RequestError>,
}

/// Reads descriptor `index` of `table` after checking it is in range and accessible.
fn read_descriptor<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    index: u16,
) -> Result<Descriptor, RequestError> {
    if index >= table.size {
        return Err(RequestError::DescriptorIndex {
            index,
            queue_size: table.size,
        });
    }
    let addr = table
        .addr
        .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
        .filter(|a| access.is_accessible(*a, DESCRIPTOR_SIZE))
        .ok_or(RequestError::Inaccessible {
            addr: table.addr,
            len: u64::from(table.size) * DESCRIPTOR_SIZE,
        })?;
    let raw: RawDescriptor = mem
        .read_obj(GuestAddress(addr))
        .map_err(RequestError::Memory)?;
    Ok(Descriptor::from(raw))
}

fn has(desc: &Descriptor, flag: u32) -> bool {
    u32::from(desc.flags()) & flag != 0
}

/// Checks the second descriptor as a response buffer.
fn check_response(
    access: &dyn GuestAccess,
    desc: &Descriptor,
) -> Result<GuestAddress, RequestError> {
    if has(desc, VRING_DESC_F_INDIRECT) {
        return Err(RequestError::Indirect);
    }
    if !has(desc, VRING_DESC_F_WRITE) {
        return Err(RequestError::ReadOnlyResponse);
    }
    if u64::from(desc.len()) < RESPONSE_SIZE {
        return Err(RequestError::ResponseTooShort(desc.len()));
    }
    let addr = desc.addr().0;
    if !access.is_accessible(addr, RESPONSE_SIZE) {
        return Err(RequestError::Inaccessible {
            addr,
            len: RESPONSE_SIZE,
        });
    }
    Ok(desc.addr())
}

/// Checks the first descriptor and reads the request it points to.
fn read_request<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    desc: &Descriptor,
) -> Result<Request, RequestError> {
    if has(desc, VRING_DESC_F_INDIRECT) {
        return Err(RequestError::Indirect);
    }
    if has(desc, VRING_DESC_F_WRITE) {
        return Err(RequestError::WriteOnlyRequest);
    }
    if u64::from(desc.len()) < REQUEST_SIZE {
        return Err(RequestError::RequestTooShort(desc.len()));
    }
    let addr = desc.addr().0;
    if !access.is_accessible(addr, REQUEST_SIZE) {
        return Err(RequestError::Inaccessible {
            addr,
            len: REQUEST_SIZE,
        });
    }
    let mut bytes = [0u8; REQUEST_SIZE as usize];
    mem.read_slice(&mut bytes, desc.addr())
        .map_err(RequestError::Memory)?;
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
    let first = match read_descriptor(mem, access, table, head) {
        Ok(desc) => desc,
        Err(e) => {
            return ParsedChain {
                response: None,
                request: Err(e),
            }
        }
    };
    let second = has(&first, VRING_DESC_F_NEXT)
        .then(|| read_descriptor(mem, access, table, first.next()))
        .transpose();
    let (response, second_error) = match &second {
        Ok(Some(desc)) => match check_response(access, desc) {
            Ok(addr) => (Some(addr), None),
            Err(e) => (None, Some(e)),
        },
        Ok(None) => (None, Some(RequestError::MissingResponse)),
        Err(_) => (None, None),
    };
    let request = match (second, second_error) {
        (Err(e), _) => Err(e),
        (_, Some(e)) => Err(e),
        (Ok(Some(desc)), None) if has(&desc, VRING_DESC_F_NEXT) => {
            Err(RequestError::ExtraDescriptors)
        }
        _ => read_request(mem, access, &first),
    };
    ParsedChain { response, request }
}
