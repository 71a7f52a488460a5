//! PCI configuration space through both ways the guest reaches it: the CF8 latch and CFC
//! data window (`PciConfigIo`, also port 0xcf9's reset) and ECAM (`PciConfigMmio`), on a
//! `PciRoot` holding the host bridge and a device with the real config-space emulation
//! (identity, a 64-bit BAR, a capability with writable bits).
//!
//! Invariants after every access: nothing panics; both mechanisms read the same value for
//! every register of every slot; absent slots, buses and functions read all ones; the guest
//! only ever changes bits the device declared writable; only a one-byte write of bit 2 to
//! port 0xcf9 asks for a reset.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tidevm_vmm::devices::pci::config_space::{Bar64, PciIdentity, BAR0_REG};
use tidevm_vmm::devices::pci::{PciConfigIo, PciConfigMmio, PciConfigSpace, PciDevice, PciRoot};
use tidevm_vmm::devices::BusDevice;
use tidevm_vmm::vstate::{ExitRequester, VmEvent};

const REGS: usize = 64;

struct Dev(PciConfigSpace);

impl PciDevice for Dev {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.0.read_register(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.0.write_register(reg, offset, data)
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A port access at 0xcf8 + `port % 8`.
    Port {
        port: u8,
        write: bool,
        len: u8,
        value: u32,
    },
    /// Sets the latch to an enabled address for (bus, device, function, reg).
    Latch {
        bus: u8,
        dev: u8,
        func: u8,
        reg: u8,
        enable: bool,
    },
    /// An ECAM access.
    Ecam {
        bus: u8,
        dev: u8,
        func: u8,
        reg: u16,
        write: bool,
        len: u8,
        value: u32,
    },
}

fn io_read(io: &mut PciConfigIo, offset: u64, len: usize) -> u32 {
    let mut data = [0u8; 4];
    io.read(offset, &mut data[..len]);
    u32::from_le_bytes(data)
}

fn ecam_read(ecam: &mut PciConfigMmio, dev: u64, reg: u64) -> u32 {
    let mut data = [0u8; 4];
    ecam.read((dev << 15) | (reg * 4), &mut data);
    u32::from_le_bytes(data)
}

fuzz_target!(|ops: Vec<Op>| {
    let mut space = PciConfigSpace::new(PciIdentity {
        vendor: 0x1af4,
        device: 0x1058,
        class: 0xff_0000,
        revision: 1,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    });
    space.add_bar64(
        0,
        Bar64 {
            addr: 0xe000_0000,
            size: 0x8000,
        },
    );
    let cap = space.add_capability(0x11, &[0; 10]);
    space.set_writable(cap / 4, 0xc000_0000);
    let mut writable = [0u32; REGS];
    writable[1] = 0x0000_0407;
    writable[15] = 0xff;
    writable[BAR0_REG] = !(0x8000u32 - 1) & !0xf;
    writable[BAR0_REG + 1] = 0xffff_ffff;
    writable[cap / 4] = 0xc000_0000;
    let initial: Vec<u32> = (0..REGS).map(|r| space.read_register(r)).collect();

    let mut root = PciRoot::default();
    let slot = root.add_device(Arc::new(Mutex::new(Dev(space)))).unwrap();
    assert_eq!(slot, 1);
    let root = Arc::new(Mutex::new(root));
    let events: Arc<Mutex<Vec<VmEvent>>> = Arc::default();
    let sink = events.clone();
    let mut io = PciConfigIo::new(
        root.clone(),
        ExitRequester::new(move |e| sink.lock().unwrap().push(e)),
    );
    let mut ecam = PciConfigMmio::new(root);

    for op in ops.iter().take(128) {
        let mut reset_expected = false;
        match *op {
            Op::Port {
                port,
                write,
                len,
                value,
            } => {
                let offset = u64::from(port % 8);
                let len = [1usize, 2, 4][usize::from(len % 3)];
                // The port bus routes only accesses inside the 8 ports.
                if offset + len as u64 <= 8 {
                    if write {
                        let bytes = value.to_le_bytes();
                        reset_expected = offset == 1 && len == 1 && bytes[0] & 4 != 0;
                        io.write(offset, &bytes[..len]);
                    } else {
                        io_read(&mut io, offset, len);
                    }
                }
            }
            Op::Latch {
                bus,
                dev,
                func,
                reg,
                enable,
            } => {
                let address = u32::from(enable) << 31
                    | u32::from(bus % 2) << 16
                    | u32::from(dev % 4) << 11
                    | u32::from(func % 2) << 8
                    | u32::from(reg) & 0xfc;
                io.write(0, &address.to_le_bytes());
            }
            Op::Ecam {
                bus,
                dev,
                func,
                reg,
                write,
                len,
                value,
            } => {
                let offset = u64::from(bus % 2) << 20
                    | u64::from(dev % 4) << 15
                    | u64::from(func % 2) << 12
                    | u64::from(reg % 0x1000);
                let len = [1usize, 2, 4, 8][usize::from(len % 4)];
                let bytes = u64::from(value).to_le_bytes();
                if write {
                    ecam.write(offset, &bytes[..len]);
                } else {
                    let mut data = [0u8; 8];
                    ecam.read(offset, &mut data[..len]);
                    if (offset & 3) as usize + len > 4 {
                        assert!(data[..len].iter().all(|b| *b == 0xff));
                    }
                }
            }
        }
        let got: Vec<VmEvent> = events.lock().unwrap().drain(..).collect();
        match (reset_expected, got.as_slice()) {
            (true, [VmEvent::Reset]) | (false, []) => {}
            (expected, got) => panic!("reset expected: {expected}, events: {got:?}"),
        }
        // Both mechanisms agree; the latch is saved and restored around the check.
        let latch = io_read(&mut io, 0, 4);
        for dev in 0..3u64 {
            for reg in 0..REGS as u64 {
                io.write(
                    0,
                    &(0x8000_0000u32 | (dev as u32) << 11 | (reg as u32) << 2).to_le_bytes(),
                );
                let via_port = io_read(&mut io, 4, 4);
                let via_ecam = ecam_read(&mut ecam, dev, reg);
                assert_eq!(via_port, via_ecam, "device {dev} register {reg}");
                if dev == 2 {
                    assert_eq!(via_port, 0xffff_ffff, "empty slot");
                }
                if dev == 1 {
                    let r = reg as usize;
                    assert_eq!(
                        (via_port ^ initial[r]) & !writable[r],
                        0,
                        "read-only bits of register {r} changed: {via_port:#x} was {:#x}",
                        initial[r]
                    );
                }
            }
        }
        // Function 1 and bus 1 do not exist.
        let mut func1 = [0u8; 4];
        ecam.read(1 << 15 | 1 << 12, &mut func1);
        assert_eq!(func1, [0xff; 4]);
        let mut far = [0u8; 4];
        ecam.read(1 << 20 | 1 << 15, &mut far);
        assert_eq!(far, [0xff; 4]);
        io.write(0, &latch.to_le_bytes());
        assert_eq!(io_read(&mut io, 0, 4), latch);
    }
});
