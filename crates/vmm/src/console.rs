//! The guest console's host side: where serial output goes and where input comes from.
//!
//! The console outlives a guest reboot: the same UART and interrupt eventfd are wired into
//! each new VM, so a client stays connected across resets.
//!
//! A socket or TCP console serves one client at a time; others are told the console is in
//! use and closed. Output to the client never blocks the vCPU that writes the UART (it
//! holds the UART lock): what the client's socket cannot take right away is dropped and
//! counted, and a client whose socket fails is disconnected.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Something that is not a socket is at the console socket's path; it is left alone.
    #[error("cannot create the console socket {path}: the path exists and is not a socket")]
    NotASocket {
        /// The path given with `--serial socket=PATH`.
        path: PathBuf,
    },
    /// Another process serves a socket at the console socket's path.
    #[error("console socket {path} is already in use by another process")]
    InUse {
        /// The path given with `--serial socket=PATH`.
        path: PathBuf,
    },
}

/// What a console client connection must offer: reading for input, a clone for the input
/// thread, its fd for non-blocking output, and a way to cut it off.
trait ConsoleStream: Read + Write + AsRawFd + Send + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;

    /// Ends the connection both ways (the input thread's read returns 0).
    fn shut_down(&self);
}

impl ConsoleStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl ConsoleStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// A connected client's output end.
trait ClientOutput: AsRawFd + Send {
    fn shut_down(&self);
}

impl<S: ConsoleStream> ClientOutput for S {
    fn shut_down(&self) {
        ConsoleStream::shut_down(self);
    }
}

/// How a send to the client went.
enum Sent {
    /// Everything, or as much as the socket could take now (the count).
    Bytes(usize),
    /// The socket is full: the client is not reading.
    Full,
    /// The connection is broken.
    Failed,
}

/// One non-blocking send of `buf` to `fd`: never sleeps, never raises SIGPIPE.
fn send_nonblocking(fd: &impl AsRawFd, buf: &[u8]) -> Sent {
    // SAFETY: `buf` is a live slice and we pass its own pointer and length, so the kernel
    // reads only memory we own; `fd` is borrowed from a stream that outlives the call.
    // MSG_DONTWAIT makes this one call non-blocking without changing the fd's flags (the
    // input thread still reads it blocking), and MSG_NOSIGNAL turns a closed peer into
    // EPIPE instead of a SIGPIPE that would kill the VMM.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(sent) {
        Ok(sent) => Sent::Bytes(sent),
        Err(_) => match io::Error::last_os_error().kind() {
            // An interrupted non-blocking send sent nothing; the output is dropped rather
            // than retried so that a stopping vCPU is never held here.
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Sent::Full,
            _ => Sent::Failed,
        },
    }
}

/// The client connected now (socket and TCP consoles).
#[derive(Default)]
struct ClientSlot {
    output: Option<Box<dyn ClientOutput>>,
    /// Tells clients apart, so that a finished input thread frees only its own slot.
    generation: u64,
}

/// Output to whichever client is connected now (socket and TCP consoles); dropped when none.
#[derive(Clone, Default)]
struct ConnectedClient {
    slot: Arc<Mutex<ClientSlot>>,
    /// Output bytes lost because the client did not read fast enough.
    dropped: Arc<AtomicU64>,
}

impl ConnectedClient {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClientSlot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `output` the client unless one is connected; returns its generation.
    fn take(&self, output: Box<dyn ClientOutput>) -> Option<u64> {
        let mut slot = self.lock();
        if let Some(current) = &slot.output {
            if !peer_closed(current.as_ref()) {
                return None;
            }
            // It hung up and its input thread has not noticed yet.
            current.shut_down();
        }
        slot.generation += 1;
        slot.output = Some(output);
        Some(slot.generation)
    }

    /// The client of `generation` is gone (its input ended).
    fn release(&self, generation: u64) {
        let mut slot = self.lock();
        if slot.generation == generation {
            if let Some(output) = slot.output.take() {
                output.shut_down();
            }
        }
    }
}

/// Whether the peer of a connected client has closed its end (a read would return EOF).
fn peer_closed(output: &dyn ClientOutput) -> bool {
    let mut byte = 0u8;
    // SAFETY: `byte` is one writable byte on our stack and we pass its address and a length
    // of 1; the fd is borrowed from a live stream. MSG_PEEK leaves any input for the input
    // thread, MSG_DONTWAIT keeps the call from sleeping.
    let peeked = unsafe {
        libc::recv(
            output.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    peeked == 0 || (peeked < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

impl Write for ConnectedClient {
    /// Never blocks: called by a vCPU holding the UART lock.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut slot = self.lock();
        let Some(output) = slot.output.as_ref() else {
            return Ok(buf.len());
        };
        let mut pending = buf;
        while !pending.is_empty() {
            match send_nonblocking(output, pending) {
                Sent::Bytes(0) | Sent::Full => {
                    self.dropped
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    break;
                }
                Sent::Bytes(sent) => pending = &pending[sent.min(pending.len())..],
                Sent::Failed => {
                    output.shut_down();
                    slot.output = None;
                    break;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Box<dyn ClientOutput> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.as_ref().as_raw_fd()
    }
}

/// The UART plus its host plumbing.
#[derive(Debug)]
pub struct Console {
    device: Arc<Mutex<SerialDevice>>,
    irq: EventFd,
    dropped: Arc<AtomicU64>,
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
        let dropped = Arc::clone(&client.dropped);
        let device = Arc::new(Mutex::new(SerialDevice::new(irq_for_uart, out)));
        match config {
            SerialConfig::Stdout => {
                // Without an input thread the console still shows output.
                let _ = spawn_input(device.clone(), io::stdin(), || {});
            }
            SerialConfig::Socket(path) => {
                remove_stale_socket(path)?;
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
        Ok(Console {
            device,
            irq,
            dropped,
        })
    }

    /// The UART, to be placed on the port I/O bus.
    pub fn device(&self) -> Arc<Mutex<SerialDevice>> {
        self.device.clone()
    }

    /// The eventfd that raises the UART's interrupt (registered as an irqfd per VM).
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    /// Guest output a socket or TCP client lost because it did not read fast enough.
    pub fn dropped_output_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Removes a console socket file, if the console has one (and only a socket).
    pub fn cleanup(config: &SerialConfig) {
        if let SerialConfig::Socket(path) = config {
            let is_socket = std::fs::symlink_metadata(path)
                .is_ok_and(|metadata| metadata.file_type().is_socket());
            if is_socket {
                let _ = std::fs::remove_file(Path::new(path));
            }
        }
    }
}

/// Makes way for the console socket at `path`: nothing there is fine, a socket nobody
/// serves is removed; anything else (a file, a directory, a symlink, a live socket) is
/// left alone and refused.
fn remove_stale_socket(path: &Path) -> Result<(), ConsoleError> {
    let open_error = |source| ConsoleError::Open {
        target: path.display().to_string(),
        source,
    };
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(open_error(error)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ConsoleError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ConsoleError::InUse {
            path: path.to_owned(),
        }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => Err(open_error(error)),
                _ => Ok(()),
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(open_error(error)),
    }
}

/// Feeds bytes from `input` into the UART, waiting while its FIFO is full; calls `done`
/// when the input ends.
fn spawn_input(
    device: Arc<Mutex<SerialDevice>>,
    mut input: impl Read + Send + 'static,
    done: impl FnOnce() + Send + 'static,
) -> bool {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
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
            done();
        })
        .is_ok()
}

/// What a client that finds the console taken is told before it is closed.
const CONSOLE_BUSY: &[u8] = b"tidevm: the console is in use by another client\r\n";

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Gives the console to a client that connects while nobody has it; turns the others away.
/// So there is one input thread at a time (two for a moment while one winds down).
fn spawn_acceptor<S: ConsoleStream>(
    incoming: impl Iterator<Item = io::Result<S>> + Send + 'static,
    device: Arc<Mutex<SerialDevice>>,
    client: ConnectedClient,
) {
    let _ = std::thread::Builder::new()
        .name("console-accept".into())
        .spawn(move || {
            for stream in incoming {
                let Ok(stream) = stream else {
                    std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                    continue;
                };
                let Ok(writer) = stream.try_clone_stream() else {
                    continue;
                };
                let Some(generation) = client.take(Box::new(writer)) else {
                    let _ = send_nonblocking(&stream, CONSOLE_BUSY);
                    continue;
                };
                let release = client.clone();
                if !spawn_input(device.clone(), stream, move || release.release(generation)) {
                    client.release(generation);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::time::Instant;

    /// A socket path in a fresh directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("tidevm-console-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> PathBuf {
            self.0.join("console.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The guest writes `bytes` bytes to the UART's transmit register, on another thread;
    /// true if that finished within `limit`.
    fn guest_writes(console: &Console, bytes: usize, limit: Duration) -> bool {
        let device = console.device();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..bytes {
                device.lock().unwrap().write(0, &[b'a' + (i % 26) as u8]);
            }
            let _ = done_tx.send(());
        });
        done_rx.recv_timeout(limit).is_ok()
    }

    /// Waits until the console has taken `stream` as its client (it echoes nothing, so
    /// give the acceptor a moment).
    fn settle() {
        std::thread::sleep(Duration::from_millis(300));
    }

    #[test]
    fn a_client_that_never_reads_does_not_block_the_guest() {
        let dir = TempDir::new("stuck-client");
        let console = Console::open(&SerialConfig::Socket(dir.path())).unwrap();
        let _stuck = UnixStream::connect(dir.path()).unwrap();
        settle();
        let started = Instant::now();
        assert!(
            guest_writes(&console, 1 << 20, Duration::from_secs(20)),
            "the guest's output blocked on a client that does not read"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        // What the client's socket could not take was dropped and counted.
        let dropped = console.dropped_output_bytes();
        assert!(dropped > 0 && dropped < 1 << 20, "{dropped}");
    }

    #[test]
    fn a_second_client_is_turned_away_with_a_message() {
        let dir = TempDir::new("second-client");
        let console = Console::open(&SerialConfig::Socket(dir.path())).unwrap();
        let mut first = UnixStream::connect(dir.path()).unwrap();
        settle();
        let mut second = UnixStream::connect(dir.path()).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut refusal = String::new();
        second.read_to_string(&mut refusal).unwrap();
        assert!(refusal.contains("in use"), "{refusal:?}");
        // The first client still has the console.
        assert!(guest_writes(&console, 2, Duration::from_secs(5)));
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut echoed = [0u8; 2];
        first.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"ab");
        // Once it leaves, the next client gets the console.
        drop(first);
        settle();
        let mut third = UnixStream::connect(dir.path()).unwrap();
        settle();
        assert!(guest_writes(&console, 1, Duration::from_secs(5)));
        third
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        third.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"a");
    }

    #[test]
    fn socket_path_that_is_not_a_socket_is_left_alone() {
        let dir = TempDir::new("not-a-socket");
        let path = dir.path();
        std::fs::write(&path, "precious").unwrap();
        let error = Console::open(&SerialConfig::Socket(path.clone())).unwrap_err();
        assert!(error.to_string().contains("not a socket"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        Console::cleanup(&SerialConfig::Socket(path.clone()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");

        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(Console::open(&SerialConfig::Socket(path.clone())).is_err());
        assert!(path.is_dir());
        std::fs::remove_dir(&path).unwrap();

        let target = dir.0.join("target");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(Console::open(&SerialConfig::Socket(path.clone())).is_err());
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    }

    #[test]
    fn a_stale_console_socket_is_replaced() {
        let dir = TempDir::new("stale");
        drop(UnixListener::bind(dir.path()).unwrap());
        let _console = Console::open(&SerialConfig::Socket(dir.path())).unwrap();
        UnixStream::connect(dir.path()).unwrap();
    }
}
