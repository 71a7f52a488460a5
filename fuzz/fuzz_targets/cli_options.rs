//! Every command-line option parser of `config.rs` (and the API's socket mode) on arbitrary
//! strings, then `VmConfig::validate` on what they accepted.
//!
//! Invariants: nothing panics; what a parser accepts obeys its documented rules (a virtio-mem
//! size is a non-zero multiple of 128 MiB and of its power-of-two block size, requested fits;
//! a balloon size is 4 KiB aligned; slots and maxmem come together and leave room for a DIMM);
//! a parsed size prints and parses back to itself; and a configuration `validate` accepts has
//! sums that fit without wrapping (checked here in 128-bit arithmetic): NUMA memory adds up to
//! the boot memory, the hotplug regions and DIMM budget fit the hotplug area.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tidevm_vmm::arch::x86_64::layout::{HOTPLUG_AREA_ALIGN, HOTPLUG_AREA_SIZE};
use tidevm_vmm::config::{
    format_size, parse_size, BalloonDeviceConfig, MemoryConfig, NumaNodeConfig, SerialConfig,
    VirtioMemDeviceConfig, VmConfig, DIMM_ALIGN, MAX_DIMM_SLOTS, MAX_STATS_INTERVAL_SECS,
};

const MIB: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    size: String,
    memory: String,
    serial: String,
    virtio_mem: Vec<String>,
    balloon: Option<String>,
    numa: Vec<String>,
    cpus: u8,
    socket_mode: String,
    memory_policy: String,
}

fuzz_target!(|input: Input| {
    // The autopilot's policy: an accepted one is in range and aligned.
    if let Ok(policy) =
        tidevm_vmm::memory_service::autopilot::PolicyConfig::parse(&input.memory_policy)
    {
        assert!(policy.min <= policy.max, "{policy:?}");
        assert_eq!(policy.min % (128 << 20), 0, "{policy:?}");
        assert_eq!(policy.max % (128 << 20), 0, "{policy:?}");
        assert!(!policy.interval.is_zero(), "{policy:?}");
    }
    if let Ok(n) = parse_size(&input.size) {
        assert_eq!(parse_size(&n.to_string()).ok(), Some(n));
        if n % (1 << 30) == 0 {
            assert_eq!(parse_size(&format!("{}G", n >> 30)).ok(), Some(n));
        }
        let _ = format_size(n);
    }
    let _ = tidevm_api::parse_socket_mode(&input.socket_mode);
    let _ = SerialConfig::parse(&input.serial);

    let memory = MemoryConfig::parse(&input.memory);
    if let Ok(m) = &memory {
        assert_eq!(m.slots == 0, m.maxmem == 0, "{m:?}");
        if m.slots > 0 {
            assert!(m.slots <= MAX_DIMM_SLOTS);
            assert!(u128::from(m.maxmem) >= u128::from(m.size) + u128::from(DIMM_ALIGN));
        }
        let budget = m.dimm_budget();
        assert!(budget % DIMM_ALIGN == 0 && budget <= m.maxmem.saturating_sub(m.size));
    }

    let mut devices = Vec::new();
    for text in input.virtio_mem.iter().take(4) {
        if let Ok(d) = VirtioMemDeviceConfig::parse(text) {
            assert!(
                d.block_size.is_power_of_two() && d.block_size >= 4096,
                "{d:?}"
            );
            assert!(d.size > 0 && d.size % (128 * MIB) == 0, "{d:?}");
            assert!(d.size % d.block_size == 0, "{d:?}");
            assert!(
                d.requested <= d.size && d.requested % d.block_size == 0,
                "{d:?}"
            );
            assert!(!d.id.is_empty() && d.id.len() <= 64, "{d:?}");
            devices.push(d);
        }
    }
    let balloon = input.balloon.as_deref().and_then(|text| {
        let b = BalloonDeviceConfig::parse(text).ok()?;
        assert!(b.size % 4096 == 0, "{b:?}");
        if let Some(i) = b.stats_interval {
            assert!(
                i.as_secs() >= 1 && i.as_secs() <= MAX_STATS_INTERVAL_SECS,
                "{b:?}"
            );
        }
        Some(b)
    });
    let numa: Vec<NumaNodeConfig> = input
        .numa
        .iter()
        .take(4)
        .filter_map(|t| NumaNodeConfig::parse(t).ok())
        .collect();

    let Ok(memory) = memory else {
        return;
    };
    let config = VmConfig {
        kernel: PathBuf::from("/dev/null"),
        initramfs: None,
        cmdline: String::new(),
        cpus: input.cpus,
        memory: memory.clone(),
        serial: SerialConfig::Off,
        virtio_mem: devices.clone(),
        violation_policy: Default::default(),
        numa: numa.clone(),
        balloon: balloon.clone(),
        dimms: Vec::new(),
        memory_policy: None,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    if config.validate(Some(u64::MAX)).is_ok() {
        assert!(memory.size >= 128 * MIB && memory.size % (2 * MIB) == 0);
        assert!((1..=254).contains(&input.cpus));
        if !numa.is_empty() {
            let total: u128 = numa.iter().map(|n| u128::from(n.memory)).sum();
            assert_eq!(total, u128::from(memory.size), "NUMA memory sum");
            let cpus: usize = numa.iter().map(|n| n.cpus.len()).sum();
            assert_eq!(
                cpus,
                usize::from(input.cpus),
                "every vCPU on exactly one node"
            );
        }
        if let Some(b) = &balloon {
            assert!(b.size <= memory.size);
        }
        let align = u128::from(HOTPLUG_AREA_ALIGN);
        let hotplug: u128 = devices
            .iter()
            .map(|d| u128::from(d.size).div_ceil(align) * align)
            .sum::<u128>()
            + u128::from(memory.dimm_budget());
        assert!(
            hotplug <= u128::from(HOTPLUG_AREA_SIZE),
            "hotplug {hotplug:#x}"
        );
        for (i, d) in devices.iter().enumerate() {
            assert!(devices[..i].iter().all(|e| e.id != d.id), "duplicate id");
        }
    }
});
