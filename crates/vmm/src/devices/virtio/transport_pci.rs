//! The virtio-pci modern transport: capabilities, common configuration, ISR, device
//! configuration, notifications (ioeventfds) and MSI-X, all in one 64-bit BAR.
//!
//! ```text
//! BAR0 + 0x0000  common configuration
//!        0x1000  ISR status
//!        0x2000  device configuration
//!        0x3000  notifications (4 bytes per queue)
//!        0x4000  MSI-X table
//!        0x5000  MSI-X pending bits
//! ```

use std::sync::{Arc, Weak};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::chain::rings_accessible;
use super::msix::{MsixTable, NO_VECTOR};
use super::{ActivateError, Signal, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::Bus;
use crate::devices::pci::config_space::{Bar64, PciConfigSpace, PciIdentity, BAR0_REG};
use crate::devices::pci::PciDevice;
use crate::devices::BusDevice;
use crate::memory::MemoryManager;
use crate::vstate::interrupts::{InterruptError, MsiRouting};

const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const PCI_CAP_VENDOR: u8 = 0x09;
const PCI_CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;
const MSIX_ENABLE: u32 = 1 << 31;
const MSIX_FUNCTION_MASK: u32 = 1 << 30;

/// Per-queue registers as the driver programs them.
#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    msix_vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Where the driver is in bringing the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    NotReady,
    /// DRIVER_OK was written; the control thread activates on its next look.
    Pending,
    Active,
    Failed,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice<D: VirtioDevice> {
    id: String,
    config: PciConfigSpace,
    msix_cap_reg: usize,
    device: D,
    bar_addr: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    config_msix_vector: u16,
    queues: Vec<QueueRegs>,
    isr: u8,
    msix: MsixTable,
    queue_evts: Vec<EventFd>,
    activation: Activation,
    vm: Arc<VmFd>,
    /// The MMIO bus BAR0 sits on, so that a BAR the guest moves moves there too. Weak: the
    /// bus holds this transport, and a strong reference back would keep both (and the VM fd
    /// the transport holds) alive after the VM is dropped, one leaked VM per reboot.
    mmio_bus: Weak<Bus>,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioPciDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("id", &self.id)
            .field("bar", &format_args!("{:#x}", self.bar_addr))
            .field("status", &self.status)
            .finish()
    }
}

/// What the control loop needs from any virtio transport, whatever its device.
pub trait VirtioTransport: Send + std::fmt::Debug {
    /// The device's name.
    fn id(&self) -> &str;
    /// One eventfd per queue, signalled when the driver notifies it.
    fn queue_events(&self) -> &[EventFd];
    /// Processes queue `index` and raises the interrupts it needs.
    fn process_queue(
        &mut self,
        index: usize,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    );
    /// The device's backend descriptor and the queue it feeds (see
    /// [`VirtioDevice::backend_fd`]).
    fn backend_fd(&self) -> Option<(std::os::fd::RawFd, usize)>;
}

impl<D: VirtioDevice> VirtioTransport for VirtioPciDevice<D> {
    fn id(&self) -> &str {
        &self.id
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn process_queue(
        &mut self,
        index: usize,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    ) {
        self.activate_and_drain(guest_memory, memory);
        if self.activation != Activation::Active || index >= self.queues.len() {
            return;
        }
        let signal = self.device.process_queue(index, guest_memory, memory);
        self.raise(signal, index);
    }

    fn backend_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        self.device.backend_fd()
    }
}

/// Errors while creating the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// Interrupt setup failed.
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    /// An ioeventfd could not be created or registered.
    #[error("cannot register the queue notification of {0}")]
    IoEvent(String, #[source] std::io::Error),
}

fn write_le(value: u64, offset_in_field: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = bytes
            .get(offset_in_field as usize + i)
            .copied()
            .unwrap_or(0);
    }
}

fn read_le(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

/// Replaces the 32-bit half `high` (or low) of `field` with `value`.
fn set_half(field: &mut u64, high: bool, value: u64) {
    if high {
        *field = (*field & 0xffff_ffff) | (value << 32);
    } else {
        *field = (*field & !0xffff_ffff) | (value & 0xffff_ffff);
    }
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wraps `device`, with BAR0 at `bar_addr` and one MSI-X vector per queue plus config.
    pub fn new(
        id: String,
        device: D,
        bar_addr: u64,
        routing: Arc<MsiRouting>,
        vm: Arc<VmFd>,
        mmio_bus: Arc<Bus>,
    ) -> Result<Self, VirtioPciError> {
        let queue_count = device.queue_max_sizes().len();
        let mut config = PciConfigSpace::new(PciIdentity {
            vendor: VIRTIO_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device.device_type() as u16,
            // "Other" class: Linux matches virtio by vendor/device ID.
            class: 0xff_0000,
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.add_bar64(
            0,
            Bar64 {
                addr: bar_addr,
                size: BAR_SIZE,
            },
        );
        let vendor_cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(
            PCI_CAP_VENDOR,
            &vendor_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
        );
        config.add_capability(
            PCI_CAP_VENDOR,
            &vendor_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                queue_count as u64 * u64::from(NOTIFY_MULTIPLIER),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        );
        config.add_capability(PCI_CAP_VENDOR, &vendor_cap(CFG_ISR, ISR_OFFSET, 1, &[]));
        config.add_capability(
            PCI_CAP_VENDOR,
            &vendor_cap(CFG_DEVICE, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE, &[]),
        );
        config.add_capability(PCI_CAP_VENDOR, &vendor_cap(CFG_PCI, 0, 0, &[0; 4]));
        let vectors = queue_count as u16 + 1;
        let mut msix_body = Vec::new();
        msix_body.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(PCI_CAP_MSIX, &msix_body);
        let msix_cap_reg = msix_cap / 4;
        config.set_writable(msix_cap_reg, MSIX_ENABLE | MSIX_FUNCTION_MASK);

        let queue_evts = (0..queue_count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VirtioPciError::IoEvent(id.clone(), e))?;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs::new(max))
            .collect();
        let transport = VirtioPciDevice {
            id,
            config,
            msix_cap_reg,
            device,
            bar_addr,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            config_msix_vector: NO_VECTOR,
            queues,
            isr: 0,
            msix: MsixTable::new(vectors, routing)?,
            queue_evts,
            activation: Activation::NotReady,
            vm,
            mmio_bus: Arc::downgrade(&mmio_bus),
        };
        transport.register_ioevents(true)?;
        Ok(transport)
    }

    /// BAR0's current guest-physical address.
    pub fn bar_addr(&self) -> u64 {
        self.bar_addr
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, mutably (host requests such as a resize).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn register_ioevents(&self, register: bool) -> Result<(), VirtioPciError> {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            let addr = IoEventAddress::Mmio(
                self.bar_addr + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_MULTIPLIER),
            );
            let result = if register {
                self.vm.register_ioevent(evt, &addr, NoDatamatch)
            } else {
                self.vm.unregister_ioevent(evt, &addr, NoDatamatch)
            };
            result.map_err(|e| VirtioPciError::IoEvent(self.id.clone(), e.into()))?;
        }
        Ok(())
    }

    /// Activates the device if the driver finished setting it up. Called on the control
    /// thread, which owns guest memory, before processing a queue.
    pub fn activate_if_pending(&mut self, guest_memory: &GuestMemoryMmap, memory: &MemoryManager) {
        if self.activation != Activation::Pending {
            return;
        }
        match self.build_queues(guest_memory, memory) {
            Ok(queues) => match self.device.activate(queues) {
                Ok(()) => self.activation = Activation::Active,
                Err(e) => self.fail(&e),
            },
            Err(e) => self.fail(&e),
        }
    }

    /// Activates the device once the driver set DRIVER_OK, then processes every queue once.
    ///
    /// Drivers may make buffers available and kick before DRIVER_OK (Linux's balloon posts
    /// its first statistics buffer that way); those kicks found the device not yet active,
    /// so the buffers are picked up here or they would wait forever.
    pub fn activate_and_drain(
        &mut self,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    ) {
        if self.activation != Activation::Pending {
            return;
        }
        self.activate_if_pending(guest_memory, memory);
        if self.activation != Activation::Active {
            return;
        }
        for index in 0..self.queues.len() {
            let signal = self.device.process_queue(index, guest_memory, memory);
            self.raise(signal, index);
        }
    }

    fn fail(&mut self, reason: &ActivateError) {
        crate::guest_warn!(
            "virtio device {} cannot start: {}",
            self.id,
            crate::error_chain(reason)
        );
        self.activation = Activation::Failed;
        self.status |= STATUS_FAILED;
    }

    fn build_queues(
        &self,
        guest_memory: &GuestMemoryMmap,
        memory: &MemoryManager,
    ) -> Result<Vec<Queue>, ActivateError> {
        let mut queues = Vec::new();
        for (index, regs) in self.queues.iter().enumerate() {
            let mut queue = Queue::new(regs.max_size)
                .map_err(|source| ActivateError::Queue { index, source })?;
            if regs.enabled {
                queue.set_size(regs.size);
                queue
                    .set_desc_table_address(Some(regs.desc as u32), Some((regs.desc >> 32) as u32));
                queue.set_avail_ring_address(
                    Some(regs.driver as u32),
                    Some((regs.driver >> 32) as u32),
                );
                queue.set_used_ring_address(
                    Some(regs.device as u32),
                    Some((regs.device >> 32) as u32),
                );
                queue.set_ready(true);
                // The rings must lie in memory the guest owns: the VMM reads them.
                if !queue.is_valid(guest_memory) || !rings_accessible(&queue, memory) {
                    return Err(ActivateError::RingsOutsideRam(index));
                }
            }
            queues.push(queue);
        }
        Ok(queues)
    }

    /// Raises what `signal` asks for (`queue` refers to queue `index`).
    pub fn raise(&mut self, signal: Signal, index: usize) {
        if signal.more {
            // The pass stopped at its budget: notify the queue again, so the control loop
            // comes back to it after the other events that are ready now.
            if let Some(evt) = self.queue_evts.get(index) {
                let _ = evt.write(1);
            }
        }
        if signal.needs_reset && self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            crate::guest_warn!(
                "virtio device {}: queue {index} is unusable, asking the driver to reset",
                self.id
            );
            self.status |= STATUS_DEVICE_NEEDS_RESET;
        }
        let config = signal.config || signal.needs_reset;
        if signal.queue {
            self.isr |= ISR_QUEUE;
            if let Some(regs) = self.queues.get(index) {
                if regs.msix_vector != NO_VECTOR {
                    self.msix.trigger(regs.msix_vector);
                }
            }
        }
        if config {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.isr |= ISR_CONFIG;
            if self.config_msix_vector != NO_VECTOR {
                self.msix.trigger(self.config_msix_vector);
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.driver_features = 0;
        self.isr = 0;
        self.config_msix_vector = NO_VECTOR;
        self.queue_select = 0;
        for regs in &mut self.queues {
            *regs = QueueRegs::new(regs.max_size);
        }
        self.activation = Activation::NotReady;
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        // Only a reset clears status bits ("the driver MUST NOT clear a device status bit"):
        // a driver that clears DRIVER_OK and sets it again must not re-activate the queues
        // from index 0 and replay every request. DEVICE_NEEDS_RESET is the device's to set.
        let value = (value & !STATUS_DEVICE_NEEDS_RESET) | self.status;
        let newly = value & !self.status;
        let mut value = value;
        if newly & STATUS_FEATURES_OK != 0 {
            let acceptable = self.driver_features & VIRTIO_F_VERSION_1 != 0
                && self.device.ack_features(self.driver_features);
            if !acceptable {
                value &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 {
            self.activation = Activation::Pending;
        }
        self.status = value;
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let features = self.device.features();
        let queue_count = self.queues.len() as u64;
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let (field, value) = match offset {
            0x00..=0x03 => (0x00, u64::from(self.device_feature_select)),
            0x04..=0x07 => (
                0x04,
                match self.device_feature_select {
                    0 => features & 0xffff_ffff,
                    1 => features >> 32,
                    _ => 0,
                },
            ),
            0x08..=0x0b => (0x08, u64::from(self.driver_feature_select)),
            0x0c..=0x0f => (
                0x0c,
                match self.driver_feature_select {
                    0 => self.driver_features & 0xffff_ffff,
                    1 => self.driver_features >> 32,
                    _ => 0,
                },
            ),
            0x10..=0x11 => (0x10, u64::from(self.config_msix_vector)),
            0x12..=0x13 => (0x12, queue_count),
            0x14 => (0x14, u64::from(self.status)),
            0x15 => (0x15, u64::from(self.config_generation)),
            0x16..=0x17 => (0x16, u64::from(self.queue_select)),
            0x18..=0x19 => (0x18, q.map_or(0, |q| u64::from(q.size))),
            0x1a..=0x1b => (
                0x1a,
                q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            ),
            0x1c..=0x1d => (0x1c, q.map_or(0, |q| u64::from(q.enabled))),
            0x1e..=0x1f => (0x1e, u64::from(self.queue_select)),
            0x20..=0x27 => (0x20, q.map_or(0, |q| q.desc)),
            0x28..=0x2f => (0x28, q.map_or(0, |q| q.driver)),
            0x30..=0x37 => (0x30, q.map_or(0, |q| q.device)),
            _ => (offset, 0),
        };
        write_le(value, offset - field, data);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = read_le(data);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => {
                // Features can only change before FEATURES_OK.
                if self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_feature_select {
                        0 => set_half(&mut self.driver_features, false, value),
                        1 => set_half(&mut self.driver_features, true, value),
                        _ => {}
                    }
                }
            }
            (0x10, 2) => {
                self.config_msix_vector = self.accept_vector(value as u16);
            }
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) => {
                if let Some(q) = self.selected_queue() {
                    let size = value as u16;
                    if size.is_power_of_two() && size <= q.max_size {
                        q.size = size;
                    }
                }
            }
            (0x1a, 2) => {
                let vector = self.accept_vector(value as u16);
                if let Some(q) = self.selected_queue() {
                    q.msix_vector = vector;
                }
            }
            (0x1c, 2) => {
                if let Some(q) = self.selected_queue() {
                    q.enabled = value == 1;
                }
            }
            (0x20..=0x37, 4 | 8) => self.write_queue_address(offset, data.len(), value),
            _ => tracing::debug!("{}: ignored common config write at {offset:#x}", self.id),
        }
    }

    fn write_queue_address(&mut self, offset: u64, len: usize, value: u64) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        if q.enabled {
            return;
        }
        let field = match offset & !7 {
            0x20 => &mut q.desc,
            0x28 => &mut q.driver,
            _ => &mut q.device,
        };
        if len == 8 {
            *field = value;
        } else {
            set_half(field, offset % 8 == 4, value);
        }
    }

    fn accept_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn move_bar(&mut self, new_addr: u64) {
        if new_addr == self.bar_addr || !new_addr.is_multiple_of(BAR_SIZE) {
            return;
        }
        // The MMIO bus entry first: if the guest put the BAR over another device, nothing
        // moves (the guest's next accesses at the new address find no device).
        let Some(bus) = self.mmio_bus.upgrade() else {
            return;
        };
        if let Err(e) = bus.relocate(self.bar_addr, new_addr) {
            crate::guest_warn!("{}: BAR0 cannot move to {new_addr:#x}: {e}", self.id);
            return;
        }
        if self.register_ioevents(false).is_err() {
            tracing::warn!("{}: cannot move queue notifications", self.id);
        }
        tracing::info!(
            "{}: BAR0 moved from {:#x} to {new_addr:#x}",
            self.id,
            self.bar_addr
        );
        self.bar_addr = new_addr;
        if let Err(e) = self.register_ioevents(true) {
            tracing::warn!("{}: {e}", self.id);
        }
    }
}

impl<D: VirtioDevice> BusDevice for VirtioPciDevice<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o, data),
            ISR_OFFSET => {
                data[0] = self.isr;
                self.isr = 0;
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if o >= MSIX_PBA_OFFSET => self.msix.read_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o, data),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Reached only when the ioeventfd did not catch the write: forward it.
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_evts.get(index) {
                    let _ = evt.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_register(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_register(reg, offset, data);
        if reg == self.msix_cap_reg {
            let control = self.config.read_register(reg);
            self.msix.set_control(
                control & MSIX_ENABLE != 0,
                control & MSIX_FUNCTION_MASK != 0,
            );
        }
        if reg == BAR0_REG || reg == BAR0_REG + 1 {
            if let Some(bar) = self.config.bar(0) {
                // Ignore the transient values of the sizing protocol (all ones).
                if bar.addr != !(BAR_SIZE - 1) && bar.addr & 0xffff_ffff != 0xffff_8000 {
                    self.move_bar(bar.addr);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "transport_pci_tests.rs"]
mod tests;
