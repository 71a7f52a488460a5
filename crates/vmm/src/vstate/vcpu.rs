//! vCPU threads: run KVM_RUN and route the exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
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
            Ok(exit) => handle_exit(exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            // A kernel without KVM_CAP_MEMORY_FAULT_INFO for this path says only EFAULT: KVM
            // found a slot but could not fault the host page in, and the one kind of page
            // tidevm keeps closed under a slot is an unplugged hotplug block.
            Err(e) if e.errno() == libc::EFAULT => {
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
