//! Guest console output written in batches.
//!
//! The UART model flushes after every byte the guest writes, and every byte is already a VM
//! exit: writing each one to the file or stdout as it comes would add a system call to each
//! exit. The guest's console is the one device a booting kernel talks to the most (its whole
//! boot log, a byte at a time), so the bytes go into a buffer instead, and a flusher thread
//! writes what has gathered every [`FLUSH_INTERVAL`] (at once when [`FLUSH_AT`] bytes wait).
//! Output reaches the file at most that late; dropping the writer flushes the rest.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long guest output may wait in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(5);
/// Buffered bytes that wake the flusher at once.
pub const FLUSH_AT: usize = 4096;
/// Bytes kept at most: beyond that the writer waits for the flusher (a full disk or a
/// stopped reader must not make the VMM grow without bound).
pub const BUFFER_LIMIT: usize = 1 << 20;

#[derive(Default)]
struct Shared {
    bytes: Vec<u8>,
    closed: bool,
}

struct State {
    shared: Mutex<Shared>,
    wake: Condvar,
}

/// The guest's side: a `Write` whose `flush` only wakes the flusher when enough waits.
pub struct BufferedOutput {
    state: Arc<State>,
    flusher: Option<JoinHandle<()>>,
}

impl BufferedOutput {
    /// Output to `out`, written by a thread of its own.
    pub fn new(mut out: Box<dyn Write + Send>) -> io::Result<Self> {
        let state = Arc::new(State {
            shared: Mutex::new(Shared::default()),
            wake: Condvar::new(),
        });
        let flusher_state = Arc::clone(&state);
        let flusher = std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || loop {
                let (bytes, closed) = {
                    let mut shared = flusher_state
                        .shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if shared.bytes.is_empty() && !shared.closed {
                        shared = flusher_state
                            .wake
                            .wait_timeout(shared, FLUSH_INTERVAL)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    (std::mem::take(&mut shared.bytes), shared.closed)
                };
                if !bytes.is_empty() {
                    // Nowhere to report a console write error to but the log: the guest
                    // goes on either way.
                    let _ = out.write_all(&bytes).and_then(|()| out.flush());
                    flusher_state.wake.notify_all();
                }
                if closed {
                    return;
                }
                std::thread::sleep(FLUSH_INTERVAL);
            })?;
        Ok(BufferedOutput {
            state,
            flusher: Some(flusher),
        })
    }
}

impl Write for BufferedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut shared = self.state.shared.lock().unwrap_or_else(|e| e.into_inner());
        while shared.bytes.len() >= BUFFER_LIMIT {
            self.state.wake.notify_all();
            shared = self
                .state
                .wake
                .wait_timeout(shared, FLUSH_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        shared.bytes.extend_from_slice(buf);
        if shared.bytes.len() >= FLUSH_AT {
            self.state.wake.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The flusher writes within FLUSH_INTERVAL; waiting here would cost the vCPU the
        // system call this type exists to save.
        Ok(())
    }
}

impl Drop for BufferedOutput {
    fn drop(&mut self) {
        {
            let mut shared = self.state.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.closed = true;
        }
        self.state.wake.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records what it got and how many writes it took.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut r = self.0.lock().unwrap();
            r.0.extend_from_slice(buf);
            r.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_arrive_in_order_in_few_writes_and_all_are_flushed_at_drop() {
        let recorder = Recorder::default();
        let mut out = BufferedOutput::new(Box::new(recorder.clone())).unwrap();
        let text: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for byte in &text {
            out.write_all(&[*byte]).unwrap();
            out.flush().unwrap();
        }
        drop(out);
        let (got, writes) = recorder.0.lock().unwrap().clone();
        assert_eq!(got, text);
        assert!(writes < 2_000, "{writes} writes for 20000 bytes");
    }

    #[test]
    fn a_partial_line_shows_up_without_a_newline() {
        let recorder = Recorder::default();
        let mut out = BufferedOutput::new(Box::new(recorder.clone())).unwrap();
        out.write_all(b"tidevm-guest# ").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while recorder.0.lock().unwrap().0.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the prompt never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(recorder.0.lock().unwrap().0, b"tidevm-guest# ");
    }
}
