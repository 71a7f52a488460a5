//! The control loop: one thread that owns the running VM, answers API requests and handles
//! power-off and reset.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use tidevm_api::{ApiError, ApiRequest, ApiResponse, MemoryInfo, RequestHandler, VmInfo, VmState};

use crate::builder::{build_vm, BuildError, RunningVm};
use crate::config::VmConfig;
use crate::console::{Console, ConsoleError};
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

/// How long an API request may wait for the control loop (a reboot takes a moment).
const API_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Forwards API requests from the server's threads to the control loop.
pub struct ApiBridge {
    events: Mutex<Sender<ControlEvent>>,
}

impl RequestHandler for ApiBridge {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let (reply_tx, reply_rx) = channel();
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(ControlEvent::Api(request, reply_tx))
            .map_err(|_| ApiError::internal("the VMM is shutting down"))?;
        reply_rx
            .recv_timeout(API_REPLY_TIMEOUT)
            .map_err(|_| ApiError::internal("the VMM did not answer in time"))?
    }
}

/// Owns the VM across reboots.
pub struct Vmm {
    kvm: Kvm,
    config: VmConfig,
    console: Console,
    events_tx: Sender<ControlEvent>,
    events: Receiver<ControlEvent>,
    generation: u64,
    vm: Option<RunningVm>,
}

impl Vmm {
    /// Opens KVM and the console; nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        install_kick_handler().map_err(VmmError::Signal)?;
        let kvm = open_kvm()?;
        let console = Console::open(&config.serial)?;
        let (events_tx, events) = channel();
        Ok(Vmm {
            kvm,
            config,
            console,
            events_tx,
            events,
            generation: 0,
            vm: None,
        })
    }

    /// The handler to give the API server.
    pub fn api_handler(&self) -> Arc<dyn RequestHandler> {
        Arc::new(ApiBridge {
            events: Mutex::new(self.events_tx.clone()),
        })
    }

    fn boot(&mut self) -> Result<(), VmmError> {
        self.generation += 1;
        let generation = self.generation;
        let tx = Mutex::new(self.events_tx.clone());
        let exit = ExitRequester::new(move |reason| {
            let _ = tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(ControlEvent::VmExit { generation, reason });
        });
        self.vm = Some(build_vm(&self.kvm, &self.config, &self.console, &exit)?);
        tracing::info!("VM booting (boot #{generation})");
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
        loop {
            let Ok(event) = self.events.recv() else {
                return Ok(0);
            };
            match event {
                ControlEvent::VmExit { generation, .. } if generation != self.generation => {}
                ControlEvent::VmExit { reason, .. } => match reason {
                    VmExitReason::Poweroff => {
                        tracing::info!("guest powered off");
                        self.stop_vm();
                        return Ok(0);
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
                },
                ControlEvent::Api(request, reply) => {
                    if let Some(code) = self.handle_api(request, reply)? {
                        return Ok(code);
                    }
                }
            }
        }
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
            ApiRequest::ResizeVirtioMem { id, .. } => {
                let _ = reply.send(Err(ApiError::not_found(format!(
                    "no virtio-mem device with id {id}"
                ))));
            }
        }
        Ok(None)
    }

    fn info(&self) -> VmInfo {
        let to_api = |r: &crate::arch::x86_64::layout::GuestRange| tidevm_api::GuestRange {
            start: r.start,
            size: r.size,
        };
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
            },
            virtio_mem: Vec::new(),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vm();
        Console::cleanup(&self.config.serial);
    }
}
