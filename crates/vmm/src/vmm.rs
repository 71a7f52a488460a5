//! The control loop: one thread that owns the running VM, answers API requests and handles
//! power-off and reset.

mod api;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use kvm_ioctls::Kvm;
use tidevm_api::{ApiError, ApiRequest, ApiRequestCounts, ApiResponse, RequestHandler};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_vm, open_nets, BuildError, NetAttachment, RunningVm};
use crate::config::VmConfig;
use crate::console::{Console, ConsoleError};
use crate::events::EventBus;
use crate::memory_service::{ViolationLog, ViolationOutcome};
use crate::metrics::{MetricsSnapshot, MetricsSources};
use crate::vstate::vcpu::{install_kick_handler, stop_vcpus};
use crate::vstate::vm::{open_kvm, VmError};
use crate::vstate::{ExitRequester, VmEvent, VmFailure};

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
    #[error("the VM failed")]
    GuestFailed(#[from] VmFailure),
}

/// What reaches the control loop.
pub enum ControlEvent {
    /// A vCPU or device of VM number `generation` asks to stop or reset.
    VmExit {
        /// Which boot of the VM sent it (stale requests from before a reset are ignored).
        generation: u64,
        /// Why.
        reason: VmEvent,
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
    /// The event stream, subscribed to without going through the control loop.
    bus: Arc<EventBus>,
    /// How long to wait for the control loop's answer ([`API_REPLY_TIMEOUT`]).
    reply_timeout: Duration,
}

impl RequestHandler for ApiBridge {
    fn subscribe_events(&self) -> Result<std::sync::mpsc::Receiver<String>, ApiError> {
        self.bus.subscribe()
    }

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

/// What woke the control loop for a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The driver notified the queue (its ioeventfd).
    Notify,
    /// The device's backend became readable.
    Backend,
}

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
    /// What each epoll token (minus one) stands for: a virtio device, one of its queues, and
    /// whether the event is the queue's notification or the device's backend being readable.
    queue_tokens: Vec<(usize, usize, Source)>,
    /// The networks' TAPs, open for as long as the VMM runs (across reboots).
    nets: Vec<NetAttachment>,
    /// Counters kept outside the memory service (vCPU exits, API requests), across reboots.
    metrics: MetricsSources,
    /// The event stream.
    bus: Arc<EventBus>,
}

impl Vmm {
    /// Opens KVM and the console; nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        // First: a missing, busy or non-TAP interface is a user's mistake to report as such,
        // whatever else this host lacks.
        let nets = open_nets(&config)?;
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
            nets,
            metrics: MetricsSources::default(),
            bus: Arc::new(EventBus::new()),
        })
    }

    /// Exports the API server's request counts in the metrics (`tidevm_api_requests_total`).
    pub fn set_api_request_counts(&mut self, counts: Arc<ApiRequestCounts>) {
        self.metrics.api_requests = Some(counts);
    }

    fn sender(&self) -> Result<ControlSender, VmmError> {
        ControlSender::new(self.events_tx.clone(), &self.wake).map_err(VmmError::Epoll)
    }

    /// The handler to give the API server.
    pub fn api_handler(&self) -> Result<Arc<dyn RequestHandler>, VmmError> {
        Ok(Arc::new(ApiBridge {
            events: self.sender()?,
            bus: self.bus.clone(),
            reply_timeout: API_REPLY_TIMEOUT,
        }))
    }

    /// Boots the VM; `violations` continues the log of the boot before.
    fn boot(&mut self, violations: ViolationLog) -> Result<(), VmmError> {
        self.generation += 1;
        let generation = self.generation;
        let sender = self.sender()?;
        let exit = ExitRequester::new(move |reason| {
            sender.send(ControlEvent::VmExit { generation, reason });
        });
        let mut vm = build_vm(
            &self.kvm,
            &self.config,
            &self.nets,
            &self.console,
            &exit,
            &self.metrics.vcpu_exits,
            &self.bus,
        )?;
        vm.memory.carry_violations(violations);
        self.watch_events(&vm)?;
        self.vm = Some(vm);
        tracing::info!("VM booting (boot #{generation})");
        Ok(())
    }

    /// A fresh epoll set: the control eventfd plus every queue notification of `vm`.
    fn watch_events(&mut self, vm: &RunningVm) -> Result<(), VmmError> {
        self.epoll = Epoll::new().map_err(VmmError::Epoll)?;
        self.queue_tokens.clear();
        let add = |epoll: &Epoll, fd: i32, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(VmmError::Epoll)
        };
        add(
            &self.epoll,
            self.wake.as_raw_fd(),
            EventSet::IN,
            CONTROL_TOKEN,
        )?;
        for (device_index, device) in vm.virtio.iter().enumerate() {
            let device = device.lock().unwrap_or_else(|e| e.into_inner());
            for (queue_index, evt) in device.queue_events().iter().enumerate() {
                self.queue_tokens
                    .push((device_index, queue_index, Source::Notify));
                let token = self.queue_tokens.len() as u64;
                add(&self.epoll, evt.as_raw_fd(), EventSet::IN, token)?;
            }
            // Edge-triggered: a backend with frames the guest has no buffer for stays
            // readable, and level-triggered epoll would wake the loop for it again and again.
            // The device reads until the backend would block, or until the guest runs out of
            // buffers (its next notification resumes), or asks to run again at its budget.
            if let Some((fd, queue_index)) = device.backend_fd() {
                self.queue_tokens
                    .push((device_index, queue_index, Source::Backend));
                let token = self.queue_tokens.len() as u64;
                add(
                    &self.epoll,
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    token,
                )?;
            }
        }
        Ok(())
    }

    /// Stops the VM; returns its violation log. What the memory service changed (requested
    /// sizes, DIMMs, the balloon target) goes back into the configuration for the next boot.
    fn stop_vm(&mut self) -> ViolationLog {
        let Some(mut vm) = self.vm.take() else {
            return ViolationLog::default();
        };
        vm.stop.store(true, std::sync::atomic::Ordering::Release);
        stop_vcpus(std::mem::take(&mut vm.vcpus));
        let settings = vm.memory.settings();
        settings.write_back(&mut self.config);
        settings.violations.clone()
    }

    /// Reboots: the same VM, rebuilt in this process.
    fn reboot(&mut self) -> Result<(), VmmError> {
        let violations = self.stop_vm();
        self.boot(violations)
    }

    /// Boots the VM and runs the control loop until the VM powers off or is shut down.
    /// Returns the process exit code.
    pub fn run(mut self) -> Result<i32, VmmError> {
        self.boot(ViolationLog::default())?;
        let mut ready = vec![EpollEvent::default(); 32];
        loop {
            let tick = match self.vm.as_mut() {
                Some(vm) => vm.memory.tick(Instant::now()),
                None => Default::default(),
            };
            if tick.stop_for_reuse {
                self.stop_vm();
                return Err(VmFailure::BalloonReuse.into());
            }
            let timeout_ms = tick.next_in.map_or(-1, |d| {
                (d.as_millis().min(i32::MAX as u128 - 1) as i32).saturating_add(1)
            });
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

    fn process_queue_notification(&mut self, token: u64) {
        let Some(&(device_index, queue_index, source)) = self.queue_tokens.get(token as usize - 1)
        else {
            return;
        };
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        let Some(device) = vm.virtio.get(device_index) else {
            return;
        };
        let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
        if source == Source::Notify {
            let _ = device.queue_events()[queue_index].read();
        }
        let manager = vm.memory.manager_mut();
        let guest_memory = manager.guest_memory().clone();
        device.process_queue(queue_index, &guest_memory, manager);
    }

    fn handle_event(&mut self, event: ControlEvent) -> Result<Option<i32>, VmmError> {
        match event {
            ControlEvent::VmExit { generation, .. } if generation != self.generation => {}
            ControlEvent::VmExit { reason, .. } => match reason {
                VmEvent::Poweroff => {
                    tracing::info!("guest powered off");
                    self.stop_vm();
                    return Ok(Some(0));
                }
                VmEvent::Reset => {
                    tracing::info!("guest reset: rebooting");
                    self.reboot()?;
                }
                VmEvent::Failed(failure) => {
                    self.stop_vm();
                    return Err(failure.into());
                }
                VmEvent::DimmEjected { slot } => {
                    if let Some(vm) = self.vm.as_mut() {
                        vm.memory.dimm_ejected(slot);
                    }
                }
                VmEvent::Violation {
                    gpa,
                    access,
                    vcpu,
                    unreported,
                } => {
                    let outcome = self
                        .vm
                        .as_mut()
                        .map(|vm| vm.memory.record_violation(gpa, access, vcpu, unreported));
                    if outcome == Some(ViolationOutcome::Stop) {
                        self.stop_vm();
                        return Err(VmFailure::Violation { gpa }.into());
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
        let answer = match request {
            ApiRequest::VmInfo => Ok(ApiResponse::VmInfo(api::vm_info(
                self.vm.as_ref().map(|vm| &vm.memory),
                self.vm.as_ref().map_or(&[], |vm| &vm.disks[..]),
                self.vm.as_ref().map_or(&[], |vm| &vm.nets[..]),
                &self.config,
            ))),
            ApiRequest::Shutdown => {
                self.stop_vm();
                let _ = reply.send(Ok(ApiResponse::Empty));
                tracing::info!("shut down through the API");
                return Ok(Some(0));
            }
            ApiRequest::Reboot => {
                self.reboot()?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Metrics => {
                let memory = self.vm.as_mut().map(|vm| &mut vm.memory);
                let snapshot = MetricsSnapshot::take(memory, &self.metrics);
                Ok(ApiResponse::Metrics(crate::metrics::encode(snapshot)))
            }
            memory_request => match self.vm.as_mut() {
                Some(vm) => api::memory_request(&mut vm.memory, memory_request),
                None => Err(api::not_running()),
            },
        };
        let _ = reply.send(answer);
        Ok(None)
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
                bus: Arc::new(EventBus::new()),
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
