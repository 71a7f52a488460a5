//! The control loop: one thread that owns the running VM, answers API requests and handles
//! power-off and reset.

mod dimms;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::AsRawFd;

use kvm_ioctls::Kvm;
use tidevm_api::{
    ApiError, ApiRequest, ApiResponse, BalloonInfo, BalloonStats, HostRss, MemoryInfo,
    MemoryViolation, RequestHandler, VirtioMemCounters, VirtioMemInfo, VmInfo, VmState,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_vm, BuildError, RunningVm};
use crate::config::{ViolationPolicy, VmConfig};
use crate::console::{Console, ConsoleError};
use crate::devices::virtio::balloon::device::STATS_QUEUE;
use crate::devices::virtio::balloon::BalloonDevice;
use crate::devices::virtio::transport_pci::VirtioPciDevice;
use crate::vstate::vcpu::{install_kick_handler, stop_vcpus};
use crate::vstate::vm::{open_kvm, VmError};
use crate::vstate::{ExitRequester, VmExitReason};

/// Errors that end the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM is not usable.
    #[error(transparent)]
    Kvm(#[from] VmError),
    /// The console could not be opened.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The vCPU kick signal could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// The control loop's epoll or eventfd failed.
    #[error("control loop I/O failed")]
    Epoll(#[source] std::io::Error),
    /// The guest or KVM failed while running.
    #[error("the VM failed: {0}")]
    GuestFailed(String),
}

/// What reaches the control loop.
pub enum ControlEvent {
    /// A vCPU or device of VM number `generation` asks to stop or reset.
    VmExit {
        /// Which boot of the VM sent it (stale requests from before a reset are ignored).
        generation: u64,
        /// Why.
        reason: VmExitReason,
    },
    /// An API request and where to send the answer.
    Api(ApiRequest, Sender<Result<ApiResponse, ApiError>>),
}

/// Sends events to the control loop and wakes it (the loop sleeps in epoll).
pub struct ControlSender {
    tx: Mutex<Sender<ControlEvent>>,
    wake: EventFd,
}

impl ControlSender {
    fn new(tx: Sender<ControlEvent>, wake: &EventFd) -> std::io::Result<Self> {
        Ok(ControlSender {
            tx: Mutex::new(tx),
            wake: wake.try_clone()?,
        })
    }

    /// Queues `event`; false if the control loop is gone.
    pub fn send(&self, event: ControlEvent) -> bool {
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(event)
            .is_ok();
        sent && self.wake.write(1).is_ok()
    }
}

/// How long an API request may wait for the control loop (a reboot takes a moment).
const API_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Forwards API requests from the server's threads to the control loop.
pub struct ApiBridge {
    events: ControlSender,
    /// How long to wait for the control loop's answer ([`API_REPLY_TIMEOUT`]).
    reply_timeout: Duration,
}

impl RequestHandler for ApiBridge {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let (reply_tx, reply_rx) = channel();
        if !self.events.send(ControlEvent::Api(request, reply_tx)) {
            return Err(ApiError::internal("the VMM is shutting down"));
        }
        match reply_rx.recv_timeout(self.reply_timeout) {
            Ok(answer) => answer,
            // The request stays in the control loop's queue (or is being carried out) and
            // cannot be taken back: say so, so that a client does not retry a resize or a
            // DIMM add believing it failed.
            Err(RecvTimeoutError::Timeout) => Err(ApiError::new(
                504,
                format!(
                    "the VMM did not answer within {} s; the request was not cancelled: it is \
                     still queued or in progress and will be carried out (check GET /vm/info \
                     before retrying)",
                    self.reply_timeout.as_secs_f64()
                ),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(ApiError::internal(
                "the VMM dropped the request without answering (it is stopping)",
            )),
        }
    }
}

/// Epoll token of the control eventfd; queue notifications use 1 and up.
const CONTROL_TOKEN: u64 = 0;

/// Owns the VM across reboots.
pub struct Vmm {
    kvm: Kvm,
    config: VmConfig,
    console: Console,
    events_tx: Sender<ControlEvent>,
    events: Receiver<ControlEvent>,
    wake: EventFd,
    generation: u64,
    vm: Option<RunningVm>,
    epoll: Epoll,
    /// What each epoll token (minus one) stands for: a virtio device and one of its queues.
    queue_tokens: Vec<(usize, usize)>,
    /// The most recent guest accesses to memory it does not own.
    violations: Vec<MemoryViolation>,
    /// All such accesses since start.
    violation_count: u64,
    /// When the balloon's statistics are due next.
    next_stats: Option<std::time::Instant>,
    /// The balloon's reuse scan found the guest writing inflated pages, and its policy is
    /// to stop the VM.
    reuse_stop: bool,
}

/// How many memory violations the API keeps.
const MAX_VIOLATIONS_KEPT: usize = 16;

impl Vmm {
    /// Opens KVM and the console; nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        install_kick_handler().map_err(VmmError::Signal)?;
        let kvm = open_kvm()?;
        let console = Console::open(&config.serial)?;
        let (events_tx, events) = channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Epoll)?;
        let epoll = Epoll::new().map_err(VmmError::Epoll)?;
        Ok(Vmm {
            kvm,
            config,
            console,
            events_tx,
            events,
            wake,
            generation: 0,
            vm: None,
            epoll,
            queue_tokens: Vec::new(),
            violations: Vec::new(),
            violation_count: 0,
            next_stats: None,
            reuse_stop: false,
        })
    }

    fn sender(&self) -> Result<ControlSender, VmmError> {
        ControlSender::new(self.events_tx.clone(), &self.wake).map_err(VmmError::Epoll)
    }

    /// The handler to give the API server.
    pub fn api_handler(&self) -> Result<Arc<dyn RequestHandler>, VmmError> {
        Ok(Arc::new(ApiBridge {
            events: self.sender()?,
            reply_timeout: API_REPLY_TIMEOUT,
        }))
    }

    fn boot(&mut self) -> Result<(), VmmError> {
        self.generation += 1;
        let generation = self.generation;
        let sender = self.sender()?;
        let exit = ExitRequester::new(move |reason| {
            sender.send(ControlEvent::VmExit { generation, reason });
        });
        let vm = build_vm(&self.kvm, &self.config, &self.console, &exit)?;
        self.watch_events(&vm)?;
        self.vm = Some(vm);
        tracing::info!("VM booting (boot #{generation})");
        Ok(())
    }

    /// A fresh epoll set: the control eventfd plus every queue notification of `vm`.
    fn watch_events(&mut self, vm: &RunningVm) -> Result<(), VmmError> {
        self.epoll = Epoll::new().map_err(VmmError::Epoll)?;
        self.queue_tokens.clear();
        let add = |epoll: &Epoll, fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VmmError::Epoll)
        };
        add(&self.epoll, self.wake.as_raw_fd(), CONTROL_TOKEN)?;
        for (device_index, device) in vm.virtio.iter().enumerate() {
            let device = device.lock().unwrap_or_else(|e| e.into_inner());
            for (queue_index, evt) in device.queue_events().iter().enumerate() {
                self.queue_tokens.push((device_index, queue_index));
                add(&self.epoll, evt.as_raw_fd(), self.queue_tokens.len() as u64)?;
            }
        }
        Ok(())
    }

    fn stop_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop.store(true, std::sync::atomic::Ordering::Release);
            stop_vcpus(std::mem::take(&mut vm.vcpus));
        }
    }

    /// Boots the VM and runs the control loop until the VM powers off or is shut down.
    /// Returns the process exit code.
    pub fn run(mut self) -> Result<i32, VmmError> {
        self.boot()?;
        let mut ready = vec![EpollEvent::default(); 32];
        loop {
            let timeout_ms = self.poll_balloon_stats();
            if std::mem::take(&mut self.reuse_stop) {
                self.stop_vm();
                return Err(VmmError::GuestFailed(
                    "the guest wrote pages it had given to the balloon (on-reuse=stop)".into(),
                ));
            }
            let count = match self.epoll.wait(timeout_ms, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmmError::Epoll(e)),
            };
            for event in ready.iter().take(count) {
                let token = event.data();
                if token != CONTROL_TOKEN {
                    self.process_queue_notification(token);
                }
            }
            let _ = self.wake.read();
            while let Ok(event) = self.events.try_recv() {
                if let Some(code) = self.handle_event(event)? {
                    return Ok(code);
                }
            }
        }
    }

    /// Asks the guest for fresh balloon statistics when the interval has passed; returns how
    /// long the control loop may sleep (-1: no timer).
    fn poll_balloon_stats(&mut self) -> i32 {
        let Some(vm) = self.vm.as_mut() else {
            return -1;
        };
        let Some(balloon) = vm.balloon.clone() else {
            return -1;
        };
        let mut transport = balloon.lock().unwrap_or_else(|e| e.into_inner());
        let Some(interval) = transport.device().stats_interval() else {
            return -1;
        };
        let now = std::time::Instant::now();
        let due = *self.next_stats.get_or_insert(now + interval);
        if now >= due {
            let guest_memory = vm.memory.guest_memory().clone();
            transport.activate_and_drain(&guest_memory, &mut vm.memory);
            let signal = transport
                .device_mut()
                .request_stats(&guest_memory, &vm.memory);
            transport.raise(signal, STATS_QUEUE);
            if transport.device_mut().scan_for_reuse(&vm.memory) {
                self.reuse_stop = true;
            }
            self.next_stats = Some(now + interval);
            return interval.as_millis().min(i32::MAX as u128) as i32;
        }
        (due - now).as_millis().min(i32::MAX as u128) as i32 + 1
    }

    fn process_queue_notification(&mut self, token: u64) {
        let Some(&(device_index, queue_index)) = self.queue_tokens.get(token as usize - 1) else {
            return;
        };
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        let Some(device) = vm.virtio.get(device_index) else {
            return;
        };
        let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
        let _ = device.queue_events()[queue_index].read();
        let guest_memory = vm.memory.guest_memory().clone();
        device.process_queue(queue_index, &guest_memory, &mut vm.memory);
    }

    fn handle_event(&mut self, event: ControlEvent) -> Result<Option<i32>, VmmError> {
        match event {
            ControlEvent::VmExit { generation, .. } if generation != self.generation => {}
            ControlEvent::VmExit { reason, .. } => match reason {
                VmExitReason::Poweroff => {
                    tracing::info!("guest powered off");
                    self.stop_vm();
                    return Ok(Some(0));
                }
                VmExitReason::Reset => {
                    tracing::info!("guest reset: rebooting");
                    self.stop_vm();
                    self.boot()?;
                }
                VmExitReason::Failed(message) => {
                    self.stop_vm();
                    return Err(VmmError::GuestFailed(message));
                }
                VmExitReason::DimmEjected { slot } => self.dimm_ejected(slot),
                VmExitReason::Violation { gpa, write, vcpu } => {
                    self.record_violation(gpa, write, vcpu);
                    if self.config.violation_policy == ViolationPolicy::Stop {
                        self.stop_vm();
                        return Err(VmmError::GuestFailed(format!(
                            "the guest touched memory it does not own at {gpa:#x}"
                        )));
                    }
                }
            },
            ControlEvent::Api(request, reply) => return self.handle_api(request, reply),
        }
        Ok(None)
    }

    /// Answers one request; returns an exit code when the VMM must end.
    fn handle_api(
        &mut self,
        request: ApiRequest,
        reply: Sender<Result<ApiResponse, ApiError>>,
    ) -> Result<Option<i32>, VmmError> {
        match request {
            ApiRequest::VmInfo => {
                let _ = reply.send(Ok(ApiResponse::VmInfo(self.info())));
            }
            ApiRequest::Shutdown => {
                self.stop_vm();
                let _ = reply.send(Ok(ApiResponse::Empty));
                tracing::info!("shut down through the API");
                return Ok(Some(0));
            }
            ApiRequest::Reboot => {
                self.stop_vm();
                self.boot()?;
                let _ = reply.send(Ok(ApiResponse::Empty));
            }
            ApiRequest::BalloonStatus => {
                let _ = reply.send(self.balloon_info().map(ApiResponse::Balloon));
            }
            ApiRequest::SetBalloon { target_size } => {
                let _ = reply.send(self.set_balloon(target_size));
            }
            ApiRequest::ResizeVirtioMem { id, requested_size } => {
                let _ = reply.send(self.resize_virtio_mem(&id, requested_size));
            }
            ApiRequest::AddDimm(body) => {
                let _ = reply.send(self.add_dimm(body));
            }
            ApiRequest::RemoveDimm { id } => {
                let _ = reply.send(self.remove_dimm(&id));
            }
        }
        Ok(None)
    }

    /// Records a guest access to memory it does not own (kept for the API and logged).
    fn record_violation(&mut self, gpa: u64, write: bool, vcpu: u8) {
        let device = self.vm.as_ref().and_then(|vm| {
            vm.virtio_mem.iter().find_map(|d| {
                let d = d.lock().unwrap_or_else(|e| e.into_inner());
                let status = d.device().status();
                status.region.contains(gpa).then_some(status.id)
            })
        });
        tracing::warn!(
            "guest vCPU {vcpu} {} unplugged memory it does not own at {gpa:#x} (device {})",
            if write { "wrote" } else { "read" },
            device.as_deref().unwrap_or("?")
        );
        self.violation_count += 1;
        if self.violations.len() == MAX_VIOLATIONS_KEPT {
            self.violations.remove(0);
        }
        self.violations.push(MemoryViolation {
            gpa,
            write,
            vcpu: u32::from(vcpu),
            device,
        });
    }

    fn balloon_handle(&self) -> Result<&Arc<Mutex<VirtioPciDevice<BalloonDevice>>>, ApiError> {
        self.vm
            .as_ref()
            .and_then(|vm| vm.balloon.as_ref())
            .ok_or_else(|| ApiError::not_found("this VM has no balloon (start it with --balloon)"))
    }

    /// Sets the balloon's target and tells the guest.
    fn set_balloon(&mut self, bytes: u64) -> Result<ApiResponse, ApiError> {
        if bytes > self.config.memory.size {
            return Err(ApiError::bad_request(format!(
                "balloon target {bytes} bytes is more than the boot memory ({} bytes)",
                self.config.memory.size
            )));
        }
        let mut transport = self
            .balloon_handle()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let signal = transport
            .device_mut()
            .set_target(bytes)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        transport.raise(signal, 0);
        drop(transport);
        if let Some(balloon) = self.config.balloon.as_mut() {
            balloon.size = bytes;
        }
        tracing::info!("balloon target now {bytes} bytes");
        Ok(ApiResponse::Empty)
    }

    fn balloon_info(&self) -> Result<BalloonInfo, ApiError> {
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| ApiError::conflict("the VM is not running"))?;
        let status = {
            let mut transport = self
                .balloon_handle()?
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Fresh, so that what the API shows is exact now; a stop policy acts on the
            // next stats poll.
            transport.device_mut().scan_for_reuse(&vm.memory);
            transport.device().status()
        };
        let split = vm.memory.resident();
        let plugged: u64 = vm
            .virtio_mem
            .iter()
            .map(|d| {
                d.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .status()
                    .plugged_size
            })
            .sum();
        // DIMMs are guest RAM too: their resident memory is in `split.guest`.
        let dimm_bytes: u64 = self.config.dimms.iter().map(|d| d.size).sum();
        let mut warnings = Vec::new();
        if status.reused.reused_pages > 0 {
            warnings.push(format!(
                "the guest wrote {} pages it had inflated, without deflating them first",
                status.reused.reused_pages
            ));
        }
        if let Some(warning) = self
            .balloon_handle()?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .audit(split.guest, self.config.memory.size + plugged + dimm_bytes)
        {
            warnings.push(warning);
        }
        if let Some(stats) = &status.stats {
            if stats.stale {
                warnings.push("the guest's statistics are stale: it stopped answering".into());
            }
            warnings.extend(stats.inconsistencies.iter().cloned());
        }
        Ok(BalloonInfo {
            target_bytes: status.target_bytes,
            actual_bytes: status.actual_bytes,
            inflated_bytes: status.inflated_bytes,
            discarded_bytes: status.discarded_bytes,
            reported_free_bytes: status.reported_free_bytes,
            bad_pfns: status.bad_pfns,
            discard_syscalls: status.discard_syscalls,
            discard_ns: status.discard_time.as_nanos() as u64,
            stats: status.stats.map(|s| BalloonStats {
                age_seconds: s.age.as_secs(),
                values: s.values,
            }),
            warnings,
            host_rss: HostRss {
                total_bytes: split.total,
                guest_memory_bytes: split.guest,
                vmm_bytes: split.total.saturating_sub(split.guest),
            },
            reused_pages: status.reused.reused_pages,
            reused_ranges: status
                .reused
                .reused_ranges
                .iter()
                .map(|r| tidevm_api::GuestRange {
                    start: r.start,
                    size: r.size,
                })
                .collect(),
            refaulted_zero_pages: status.reused.refaulted_zero_pages,
        })
    }

    /// Sets a virtio-mem device's requested size and tells the guest.
    fn resize_virtio_mem(&mut self, id: &str, bytes: u64) -> Result<ApiResponse, ApiError> {
        let vm = self
            .vm
            .as_mut()
            .ok_or_else(|| ApiError::conflict("the VM is not running"))?;
        let index = self
            .config
            .virtio_mem
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no virtio-mem device with id {id}")))?;
        let mut transport = vm.virtio_mem[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let signal = transport
            .device_mut()
            .set_requested_size(bytes)
            .map_err(|e| ApiError::bad_request(format!("cannot resize {id}: {e}")))?;
        transport.raise(signal, 0);
        // Remembered for the next boot: after a reboot the guest plugs back up to it.
        self.config.virtio_mem[index].requested = bytes;
        tracing::info!("virtio-mem {id}: requested size now {bytes} bytes");
        Ok(ApiResponse::Empty)
    }

    fn info(&self) -> VmInfo {
        let to_api = |r: &crate::arch::x86_64::layout::GuestRange| tidevm_api::GuestRange {
            start: r.start,
            size: r.size,
        };
        let host_rss = self.vm.as_ref().map_or_else(Default::default, |vm| {
            let split = vm.memory.resident();
            HostRss {
                total_bytes: split.total,
                guest_memory_bytes: split.guest,
                vmm_bytes: split.total.saturating_sub(split.guest),
            }
        });
        let (ram_ranges, hotplug_area) = match &self.vm {
            Some(vm) => {
                let layout = vm.memory.layout();
                (
                    layout.ram.iter().map(to_api).collect(),
                    to_api(&layout.hotplug_area),
                )
            }
            None => (Vec::new(), tidevm_api::GuestRange { start: 0, size: 0 }),
        };
        VmInfo {
            state: if self.vm.is_some() {
                VmState::Running
            } else {
                VmState::ShuttingDown
            },
            vcpus: u32::from(self.config.cpus),
            memory: MemoryInfo {
                boot_ram_bytes: self.config.memory.size,
                ram_ranges,
                hotplug_area,
                host_rss,
            },
            virtio_mem: self.virtio_mem_info(),
            memory_violations: self.violations.clone(),
            memory_violation_count: self.violation_count,
            dimms: self.dimms_info(),
            disks: self.disks_info(),
        }
    }
}

impl Vmm {
    fn disks_info(&self) -> Vec<tidevm_api::DiskInfo> {
        let Some(vm) = &self.vm else {
            return Vec::new();
        };
        vm.disks
            .iter()
            .map(|d| {
                let transport = d.lock().unwrap_or_else(|e| e.into_inner());
                let device = transport.device();
                let disk = device.disk();
                let m = device.metrics();
                tidevm_api::DiskInfo {
                    id: device.id().to_owned(),
                    path: disk.options().path.display().to_string(),
                    readonly: disk.options().readonly,
                    direct: disk.options().direct,
                    capacity_bytes: disk.capacity(),
                    // 512 or 4096.
                    block_size: disk.block_size() as u32,
                    counters: tidevm_api::DiskCounters {
                        read_requests: m.requests.read,
                        write_requests: m.requests.write,
                        flush_requests: m.requests.flush,
                        get_id_requests: m.requests.get_id,
                        discard_requests: m.requests.discard,
                        write_zeroes_requests: m.requests.write_zeroes,
                        unsupported_requests: m.requests.unsupported,
                        bytes_read: m.bytes_read,
                        bytes_written: m.bytes_written,
                        bytes_discarded: m.bytes_discarded,
                        bytes_zeroed: m.bytes_zeroed,
                        io_errors: m.io_errors,
                        malformed: m.malformed,
                        dropped: m.dropped,
                        host_errors: m.host_errors,
                    },
                }
            })
            .collect()
    }

    fn virtio_mem_info(&self) -> Vec<VirtioMemInfo> {
        let Some(vm) = &self.vm else {
            return Vec::new();
        };
        vm.virtio_mem
            .iter()
            .map(|d| {
                let transport = d.lock().unwrap_or_else(|e| e.into_inner());
                let status = transport.device().status();
                let m = transport.device().metrics();
                let all = [m.plug, m.unplug, m.unplug_all, m.state];
                let counters = VirtioMemCounters {
                    ack: all.iter().map(|c| c.ack).sum(),
                    nack: all.iter().map(|c| c.nack).sum(),
                    busy: all.iter().map(|c| c.busy).sum(),
                    error: all.iter().map(|c| c.error).sum(),
                    malformed: m.malformed,
                    bytes_plugged: m.bytes_plugged,
                    bytes_unplugged: m.bytes_unplugged,
                    plug_handling_ns: m.plug_time.as_nanos() as u64,
                    unplug_handling_ns: m.unplug_time.as_nanos() as u64,
                };
                VirtioMemInfo {
                    counters,
                    id: status.id,
                    node: status.node.unwrap_or(0),
                    region: tidevm_api::GuestRange {
                        start: status.region.start,
                        size: status.region.size,
                    },
                    block_size: status.block_size,
                    plugged_size: status.plugged_size,
                    requested_size: status.requested_size,
                    usable_region_size: status.usable_region_size,
                    last_busy_reason: status.last_busy_reason,
                }
            })
            .collect()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vm();
        Console::cleanup(&self.config.serial);
    }
}

#[cfg(test)]
mod bridge_tests {
    use super::*;

    fn bridge(reply_timeout: Duration) -> (ApiBridge, Receiver<ControlEvent>) {
        let (tx, rx) = channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = ControlSender::new(tx, &wake).unwrap();
        (
            ApiBridge {
                events,
                reply_timeout,
            },
            rx,
        )
    }

    #[test]
    fn a_late_answer_is_reported_as_still_queued_not_as_failed() {
        let (bridge, events) = bridge(Duration::from_millis(50));
        // The control loop is busy: the request stays queued.
        let error = bridge.handle(ApiRequest::Reboot).unwrap_err();
        assert_eq!(error.status, 504, "{}", error.message);
        assert!(
            error.message.contains("still") && error.message.contains("carried out"),
            "{}",
            error.message
        );
        // The request really is still queued: the control loop will run it.
        assert!(matches!(
            events.try_recv(),
            Ok(ControlEvent::Api(ApiRequest::Reboot, _))
        ));
    }

    #[test]
    fn a_control_loop_that_drops_the_request_is_a_500() {
        let (bridge, events) = bridge(Duration::from_secs(10));
        let dropper = std::thread::spawn(move || drop(events.recv()));
        let error = bridge.handle(ApiRequest::VmInfo).unwrap_err();
        dropper.join().unwrap();
        assert_eq!(error.status, 500, "{}", error.message);
        assert!(
            error.message.contains("without answering"),
            "{}",
            error.message
        );
    }
}
