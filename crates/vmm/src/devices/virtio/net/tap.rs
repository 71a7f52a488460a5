//! The host side of a virtio-net device: a TAP interface opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, nonblocking, with a 12-byte vnet header (the size of
//! `virtio_net_hdr_v1`, so that a frame passes between the TAP and the guest with its header
//! in one piece) and every offload off.
//!
//! No crate fits: `tun-rs` ties `IFF_VNET_HDR` to its own segmentation offload (10-byte
//! headers, GSO done in user space), and tidevm passes headers through instead. So the three
//! ioctls are called here, through vmm-sys-util's wrappers and libc's constants.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::request::NET_HDR_SIZE;

/// Longest interface name Linux takes (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Name pattern of the TAPs `tap=auto` creates (the kernel picks the number).
pub const AUTO_NAME: &str = "tidevm%d";

/// Which TAP to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapName {
    /// An existing TAP interface.
    Existing(String),
    /// A new one, named `tidevm<N>`; it goes away when tidevm closes it.
    Auto,
}

/// Why a TAP could not be opened. The messages name the interface and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid TAP name '{0}': 1 to 15 characters, without '/', '%', ':' or blanks")]
    BadName(String),
    /// There is no interface of that name.
    #[error("TAP device {0} does not exist (create it first, or use tap=auto)")]
    Missing(String),
    /// The interface exists but is not a TAP (a TUN device, or not a tun/tap interface).
    #[error("{0} is not a TAP device")]
    NotTap(String),
    /// Another process (or another --net) has the TAP open.
    #[error("TAP device {0} is busy: another process has it open")]
    Busy(String),
    /// The caller may not open or create it.
    #[error("no permission to open TAP device {name} (needs CAP_NET_ADMIN, or to own it)")]
    Permission {
        /// The interface (or the pattern, for `tap=auto`).
        name: String,
        /// The refusal.
        #[source]
        source: std::io::Error,
    },
    /// `/dev/net/tun` could not be opened (no tun module?).
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] std::io::Error),
    /// A set-up ioctl failed.
    #[error("cannot set up TAP device {name}: {what} failed")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Checks `name` could be a Linux interface name.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !"/%:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// A zeroed `ifreq` with `name` and `flags`.
fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: `ifreq` is plain C data (a byte array and a union of integers, byte arrays,
    // `sockaddr`s and one pointer); all zeroes is a valid value of each (a null pointer).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name was checked to be at most IFNAMSIZ-1 ASCII bytes: the last byte stays NUL.
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // Fits: the TUN flags are below 0x8000.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

/// The interface name the kernel wrote back into `req`.
fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let mut with_nul = bytes;
    with_nul.push(0);
    CStr::from_bytes_with_nul(&with_nul)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Tap {
    /// Opens (or, for [`TapName::Auto`], creates) a TAP interface for a virtio-net device.
    pub fn open(which: &TapName) -> Result<Tap, TapError> {
        let name = match which {
            TapName::Existing(name) => {
                check_name(name)?;
                check_exists(name)?;
                name.as_str()
            }
            TapName::Auto => AUTO_NAME,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => TapError::Permission {
                    name: name.to_string(),
                    source: e,
                },
                _ => TapError::OpenTun(e),
            })?;
        let mut req = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, and `req` is one, alive
        // and exclusively borrowed for the call; `file` is an open /dev/net/tun.
        let rc = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name, source: e },
                Some(libc::EINVAL) => TapError::NotTap(name),
                _ => TapError::Ioctl {
                    name,
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let name = name_of(&req);
        let hdr_size = NET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, and `hdr_size` is one, alive for the call.
        let rc = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_size) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        // No offloads: the TAP then hands over only whole, checksummed frames, which is what
        // a driver that negotiated no offload expects. TUNSETOFFLOAD takes its flags by value.
        // SAFETY: the argument is an integer, not a pointer; nothing in our memory is touched.
        let rc = unsafe { ioctl_with_val(&file, libc::TUNSETOFFLOAD, 0) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "TUNSETOFFLOAD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap { file, name })
    }

    /// The interface's name (for `tap=auto`, the one the kernel picked).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A backend on a second descriptor of the same TAP (one per boot of the VM; the TAP
    /// stays attached, with its name and addresses, while the [`Tap`] is open).
    pub fn backend(&self) -> std::io::Result<NetBackend> {
        Ok(NetBackend {
            file: self.file.try_clone()?,
        })
    }
}

/// Refuses a name that is not an existing tun/tap interface: TUNSETIFF would create one, and
/// a typo would then give the guest a network connected to nothing.
fn check_exists(name: &str) -> Result<(), TapError> {
    let class = Path::new("/sys/class/net");
    if !class.is_dir() {
        // No sysfs: TUNSETIFF is the only check left.
        return Ok(());
    }
    let dev = class.join(name);
    if !dev.exists() {
        return Err(TapError::Missing(name.to_string()));
    }
    if !dev.join("tun_flags").exists() {
        return Err(TapError::NotTap(name.to_string()));
    }
    Ok(())
}

/// Where a virtio-net device's frames go: a descriptor on which one `read` returns one frame
/// and one `write` sends one, each led by the 12-byte vnet header. A TAP opened by [`Tap`]
/// is one; a Unix datagram socket is another (tests use a socketpair: no root, no TAP).
#[derive(Debug)]
pub struct NetBackend {
    file: File,
}

impl NetBackend {
    /// A backend over any frame-preserving, nonblocking descriptor.
    pub fn from_fd(fd: OwnedFd) -> Self {
        NetBackend {
            file: File::from(fd),
        }
    }

    /// Reads one frame (with its header) into `buf`; `WouldBlock` when there is none.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Sends one frame (with its header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for NetBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in [
            "",
            "a/b",
            "tidevm%d",
            "x:1",
            "sixteen-chars-xx",
            "a b",
            "..",
        ] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad:?} accepted"
            );
        }
        for good in ["tap0", "tidevm3", "fifteen-chars-x"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn a_missing_interface_is_refused_not_created() {
        if !Path::new("/sys/class/net").is_dir() {
            return;
        }
        let e = Tap::open(&TapName::Existing("tvm-nosuch0".into())).unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(!Path::new("/sys/class/net/tvm-nosuch0").exists());
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_refused() {
        if !Path::new("/sys/class/net/lo").exists() {
            return;
        }
        let e = Tap::open(&TapName::Existing("lo".into())).unwrap_err();
        assert!(matches!(e, TapError::NotTap(_)), "{e}");
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun: skipped (and says so) without them.
    #[test]
    fn auto_creates_a_tap_that_a_second_open_finds_busy_and_closing_removes() {
        let tap = match Tap::open(&TapName::Auto) {
            Ok(tap) => tap,
            Err(e @ (TapError::Permission { .. } | TapError::OpenTun(_))) => {
                eprintln!("SKIPPED: cannot create a TAP here: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let name = tap.name().to_string();
        assert!(name.starts_with("tidevm") && name.len() > 6, "{name}");
        let sys = Path::new("/sys/class/net").join(&name);
        assert!(sys.join("tun_flags").exists());
        let e = Tap::open(&TapName::Existing(name.clone())).unwrap_err();
        assert!(matches!(e, TapError::Busy(_)), "{e}");
        // A second descriptor of the same TAP does not make it busy for itself.
        let backend = tap.backend().unwrap();
        drop(tap);
        assert!(sys.exists(), "the backend's descriptor keeps the TAP");
        drop(backend);
        assert!(!sys.exists(), "{name} outlived its last descriptor");
    }
}
