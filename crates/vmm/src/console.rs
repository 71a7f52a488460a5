//! The guest console's host side: where serial output goes and where input comes from.
//!
//! The console outlives a guest reboot: the same UART and interrupt eventfd are wired into
//! each new VM, so a client stays connected across resets.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::devices::serial::SerialDevice;

/// Errors while opening the console backend.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file, socket or listener could not be created.
    #[error("cannot open the serial console {target}")]
    Open {
        /// What we tried to open.
        target: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Output to whichever client is connected now (socket and TCP consoles); dropped when none.
#[derive(Clone, Default)]
struct ConnectedClient(Arc<Mutex<Option<Box<dyn Write + Send>>>>);

impl Write for ConnectedClient {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut client = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(out) = client.as_mut() {
            if out.write_all(buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART plus its host plumbing.
#[derive(Debug)]
pub struct Console {
    device: Arc<Mutex<SerialDevice>>,
    irq: EventFd,
}

impl Console {
    /// Opens the backend named by `config` and starts its input thread, if any.
    pub fn open(config: &SerialConfig) -> Result<Self, ConsoleError> {
        let open_err = |target: String| move |source| ConsoleError::Open { target, source };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(open_err("interrupt".into()))?;
        let irq_for_uart = irq.try_clone().map_err(open_err("interrupt".into()))?;
        let client = ConnectedClient::default();
        let out: Box<dyn Write + Send> = match config {
            SerialConfig::Stdout => Box::new(io::stdout()),
            SerialConfig::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(open_err(path.display().to_string()))?,
            ),
            SerialConfig::Socket(_) | SerialConfig::Tcp(_) => Box::new(client.clone()),
            SerialConfig::Off => Box::new(io::sink()),
        };
        let device = Arc::new(Mutex::new(SerialDevice::new(irq_for_uart, out)));
        match config {
            SerialConfig::Stdout => spawn_input(device.clone(), io::stdin()),
            SerialConfig::Socket(path) => {
                let _ = std::fs::remove_file(path);
                let listener =
                    UnixListener::bind(path).map_err(open_err(path.display().to_string()))?;
                let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
                spawn_acceptor(incoming, device.clone(), client);
            }
            SerialConfig::Tcp(addr) => {
                let listener =
                    std::net::TcpListener::bind(addr).map_err(open_err(addr.to_string()))?;
                let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
                spawn_acceptor(incoming, device.clone(), client);
            }
            SerialConfig::File(_) | SerialConfig::Off => {}
        }
        Ok(Console { device, irq })
    }

    /// The UART, to be placed on the port I/O bus.
    pub fn device(&self) -> Arc<Mutex<SerialDevice>> {
        self.device.clone()
    }

    /// The eventfd that raises the UART's interrupt (registered as an irqfd per VM).
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    /// Removes a console socket file, if the console has one.
    pub fn cleanup(config: &SerialConfig) {
        if let SerialConfig::Socket(path) = config {
            let _ = std::fs::remove_file(Path::new(path));
        }
    }
}

/// Feeds bytes from `input` into the UART, waiting while its FIFO is full.
fn spawn_input(device: Arc<Mutex<SerialDevice>>, mut input: impl Read + Send + 'static) {
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = device
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
}

/// A console client connection: readable for input, clonable for output.
trait ConsoleStream: Read + Write + Send + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
}

impl ConsoleStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl ConsoleStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// Hands the console to each client that connects (the newest one gets the output).
fn spawn_acceptor<S: ConsoleStream>(
    incoming: impl Iterator<Item = io::Result<S>> + Send + 'static,
    device: Arc<Mutex<SerialDevice>>,
    client: ConnectedClient,
) {
    let _ = std::thread::Builder::new()
        .name("console-accept".into())
        .spawn(move || {
            for stream in incoming.flatten() {
                if let Ok(writer) = stream.try_clone_stream() {
                    *client.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(writer));
                    spawn_input(device.clone(), stream);
                }
            }
        });
}
