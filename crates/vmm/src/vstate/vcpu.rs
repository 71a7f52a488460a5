//! vCPU threads: run KVM_RUN and route the exits to the buses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::{Access, ExitRequester, VmEvent, VmFailure};
use crate::arch::x86_64::layout::GuestRange;
use crate::devices::Bus;
use crate::logging::RateLimit;

/// The signal that knocks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler: its only purpose is to make KVM_RUN return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from)
}

/// Why `KVM_RUN` returned, as counted for the metrics endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Port I/O.
    Io,
    /// MMIO (devices, and touches of unplugged chunks).
    Mmio,
    /// `hlt`.
    Hlt,
    /// An interrupt window opened or a host interrupt ended the run.
    Interrupt,
    /// A triple fault.
    Shutdown,
    /// A power-off, reset or crash event.
    SystemEvent,
    /// `KVM_EXIT_MEMORY_FAULT`, or a bare `EFAULT` from `KVM_RUN`.
    MemoryFault,
    /// Entry failures and internal errors.
    Failure,
    /// Anything else.
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`VcpuExits::counts`].
    pub const ALL: [ExitReason; 9] = [
        ExitReason::Io,
        ExitReason::Mmio,
        ExitReason::Hlt,
        ExitReason::Interrupt,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::MemoryFault,
        ExitReason::Failure,
        ExitReason::Other,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            ExitReason::Io => "io",
            ExitReason::Mmio => "mmio",
            ExitReason::Hlt => "hlt",
            ExitReason::Interrupt => "interrupt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::MemoryFault => "memory_fault",
            ExitReason::Failure => "failure",
            ExitReason::Other => "other",
        }
    }

    fn of(exit: &VcpuExit) -> ExitReason {
        match exit {
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => ExitReason::Io,
            VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => ExitReason::Mmio,
            VcpuExit::Hlt => ExitReason::Hlt,
            VcpuExit::IrqWindowOpen | VcpuExit::Intr => ExitReason::Interrupt,
            VcpuExit::Shutdown => ExitReason::Shutdown,
            VcpuExit::SystemEvent(..) => ExitReason::SystemEvent,
            VcpuExit::MemoryFault { .. } => ExitReason::MemoryFault,
            VcpuExit::FailEntry(..) | VcpuExit::InternalError => ExitReason::Failure,
            _ => ExitReason::Other,
        }
    }
}

/// vCPU exits by reason, over every vCPU and every boot of the VMM. One relaxed atomic add
/// per exit; read at scrape time.
#[derive(Debug, Default)]
pub struct VcpuExits([AtomicU64; ExitReason::ALL.len()]);

impl VcpuExits {
    /// Counts one exit.
    pub fn count(&self, reason: ExitReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count.
    pub fn counts(&self) -> Vec<(ExitReason, u64)> {
        ExitReason::ALL
            .iter()
            .map(|&reason| (reason, self.0[reason as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u8,
    /// Port I/O.
    pub io_bus: Arc<Bus>,
    /// MMIO.
    pub mmio_bus: Arc<Bus>,
    /// Where to report power-off, reset and failures.
    pub exit: ExitRequester,
    /// Set by the control loop to stop every vCPU.
    pub stop: Arc<AtomicBool>,
    /// Guest-physical ranges of hotplug regions: an exit on an address in them is the guest
    /// touching memory it does not own (unplugged blocks are not accessible).
    pub hotplug_ranges: Arc<Vec<GuestRange>>,
    /// Exit counters, shared by every vCPU (and kept by the control loop across reboots).
    pub exits: Arc<VcpuExits>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts `vcpu` on its own thread.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", ctx.index))
            .spawn(move || run_vcpu(vcpu, ctx))?;
        Ok(VcpuThread { handle })
    }
}

/// Stops all `threads` (whose `stop` flag the caller has set) and waits for them.
pub fn stop_vcpus(threads: Vec<VcpuThread>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    // A kick can land just before a thread enters KVM_RUN, so keep kicking until all are out.
    while threads.iter().any(|t| !t.handle.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.handle.is_finished()) {
            let _ = t.handle.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        if t.handle.is_finished() {
            let _ = t.handle.join();
        } else {
            tracing::error!("a vCPU thread did not stop");
        }
    }
}

fn run_vcpu(mut vcpu: VcpuFd, ctx: VcpuContext) {
    while !ctx.stop.load(Ordering::Acquire) {
        let outcome = match vcpu.run() {
            Ok(exit) => {
                ctx.exits.count(ExitReason::of(&exit));
                handle_exit(exit, &ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            // A kernel without KVM_CAP_MEMORY_FAULT_INFO for this path says only EFAULT: KVM
            // found a slot but could not fault the host page in, and the one kind of page
            // tidevm keeps closed under a slot is an unplugged hotplug block.
            Err(e) if e.errno() == libc::EFAULT => {
                ctx.exits.count(ExitReason::MemoryFault);
                // Recorded as a violation too (with no address), so the API shows it.
                ctx.exit.request(VmEvent::Violation {
                    gpa: None,
                    access: Access::Unknown,
                    vcpu: ctx.index,
                    unreported: 0,
                });
                Some(VmEvent::Failed(VmFailure::UnbackedAccess {
                    vcpu: ctx.index,
                }))
            }
            Err(source) => Some(VmEvent::Failed(VmFailure::KvmRun {
                vcpu: ctx.index,
                source,
            })),
        };
        if let Some(reason) = outcome {
            ctx.exit.request(reason);
            return;
        }
    }
}

/// An MMIO exit no device claimed. Inside a hotplug region it means the guest touched an
/// unplugged block: an address in no KVM slot (a whole unplugged 128 MiB chunk) is an MMIO
/// exit under any paging mode, and under shadow paging a PROT_NONE page inside a slot is too.
fn report_unclaimed(ctx: &VcpuContext, addr: u64, write: bool) {
    if ctx.hotplug_ranges.iter().any(|r| r.contains(addr)) {
        // Bounded: the guest can loop on this. What is not sent is counted in the next event.
        static EVENTS: RateLimit = RateLimit::new();
        let Some(unreported) = EVENTS.allow() else {
            return;
        };
        ctx.exit.request(VmEvent::Violation {
            gpa: Some(addr),
            access: if write { Access::Write } else { Access::Read },
            vcpu: ctx.index,
            unreported,
        });
    } else {
        tracing::debug!(
            "unclaimed MMIO {} at {addr:#x}",
            if write { "write" } else { "read" }
        );
    }
}

/// Handles one exit; returns a reason when the VM has to stop.
fn handle_exit(exit: VcpuExit, ctx: &VcpuContext) -> Option<VmEvent> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.io_bus.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ctx.io_bus.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio_bus.read(addr, data) {
                data.fill(0xff);
                report_unclaimed(ctx, addr, false);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio_bus.write(addr, data) {
                report_unclaimed(ctx, addr, true);
            }
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        VcpuExit::Shutdown => {
            // A triple fault: what a PC does is reset. Worth a warning: a guest that did
            // not ask for it crashed.
            tracing::warn!(
                "vCPU {}: the guest triple-faulted; resetting the VM",
                ctx.index
            );
            return Some(VmEvent::Reset);
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::Poweroff,
                KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmEvent::Failed(VmFailure::GuestCrashed),
                other => VmEvent::Failed(VmFailure::UnknownSystemEvent(other)),
            });
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VmEvent::Failed(VmFailure::EntryFailed {
                vcpu: ctx.index,
                cpu,
                reason,
            }));
        }
        VcpuExit::InternalError => {
            return Some(VmEvent::Failed(VmFailure::KvmInternal { vcpu: ctx.index }));
        }
        VcpuExit::MemoryFault { gpa, .. } if ctx.hotplug_ranges.iter().any(|r| r.contains(gpa)) => {
            // On a TDP host an access to a protected (unplugged) page cannot be emulated:
            // report it and stop the VM, whatever the policy. KVM's memory fault exit has
            // no direction bit, so the access kind is unknown.
            ctx.exit.request(VmEvent::Violation {
                gpa: Some(gpa),
                access: Access::Unknown,
                vcpu: ctx.index,
                unreported: 0,
            });
            return Some(VmEvent::Failed(VmFailure::UnpluggedMemoryFault {
                vcpu: ctx.index,
                gpa,
            }));
        }
        VcpuExit::MemoryFault { gpa, size, .. } => {
            return Some(VmEvent::Failed(VmFailure::UnbackedMemoryFault {
                vcpu: ctx.index,
                gpa,
                size,
            }));
        }
        other => {
            crate::guest_warn!("vCPU {}: unhandled exit {other:?}", ctx.index);
        }
    }
    None
}
