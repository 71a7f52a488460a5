//! Host mappings of guest memory and the syscalls on them: a hotplug region's mapping
//! (protect, populate, discard), and the release and residency queries every guest mapping
//! uses (boot RAM and DIMMs too).
//!
//! The memory manager's modules are the only code allowed to map, protect, discard or register
//! memory (`clippy.toml` forbids those calls elsewhere); this one holds the hotplug mappings.
//! Every operation takes an offset and length relative to the mapping and checks them against
//! the mapping's size first, so the unsafe calls below can only ever touch memory this manager
//! owns.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use super::discard::DISCARD_GRANULE;
use super::hotplug::Backing;

/// The host mapping behind one hotplug region.
#[derive(Debug)]
pub(crate) struct HostMapping {
    /// The mapping itself, shared with the guest memory collection (which keeps it alive for
    /// as long as any clone of that collection lives).
    region: Arc<GuestRegionMmap>,
    backing: Backing,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

/// Host pointer to `offset` in `region` after checking `[offset, offset+len)` lies inside it.
fn checked_range(
    region: &GuestRegionMmap,
    offset: u64,
    len: u64,
) -> io::Result<(*mut libc::c_void, usize)> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| invalid("range wraps"))?;
    if end > region.len() {
        return Err(invalid("range outside the mapping"));
    }
    // `end <= region.len()`, which fits in usize because the mapping exists.
    let ptr = region.as_ptr().wrapping_add(offset as usize);
    Ok((ptr.cast(), len as usize))
}

/// One byte per 4 KiB host page of `[offset, offset+len)` of any guest memory mapping, bit 0
/// set when the page is resident (mincore's answer; it faults nothing in).
pub(crate) fn residency(region: &GuestRegionMmap, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let (ptr, ulen) = checked_range(region, offset, len)?;
    let mut vec = vec![0u8; ulen.div_ceil(4096)];
    // SAFETY: the range is inside the mapping (checked; mincore also accepts PROT_NONE
    // ranges) and `vec` has one byte per 4 KiB page of it, as mincore requires.
    if unsafe { libc::mincore(ptr, ulen, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec)
}

/// Number of resident 4 KiB host pages in `[offset, offset+len)` of any guest memory mapping.
pub(crate) fn resident_pages(region: &GuestRegionMmap, offset: u64, len: u64) -> io::Result<usize> {
    Ok(residency(region, offset, len)?
        .iter()
        .filter(|b| **b & 1 != 0)
        .count())
}

/// Creates a memfd of `size` bytes, hugetlb-backed with pages of `huge_page` bytes if given.
fn create_memfd(size: u64, huge_page: Option<u64>) -> io::Result<File> {
    let name: &CStr = c"tidevm-hotplug";
    let mut flags = libc::MFD_CLOEXEC;
    if let Some(page) = huge_page {
        if !page.is_power_of_two() {
            return Err(invalid("huge page size is not a power of two"));
        }
        // The page size is encoded as its log2 in the high flag bits (MFD_HUGE_2MB = 21 << 26).
        flags |= libc::MFD_HUGETLB | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    }
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no memory effects
    // beyond returning a new descriptor, whose ownership we take right below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

impl HostMapping {
    /// Maps `size` bytes for a hotplug region at guest address `gpa`, entirely `PROT_NONE`:
    /// nothing of a new region is plugged, so nothing may be touched yet. Plugging opens
    /// blocks with [`HostMapping::protect`].
    pub(crate) fn new(gpa: u64, size: u64, backing: Backing) -> io::Result<Self> {
        let len = usize::try_from(size).map_err(|_| invalid("region too large"))?;
        let mut builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_NONE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        match backing {
            Backing::Anonymous => {}
            Backing::Memfd | Backing::Hugetlbfs { .. } => {
                let page = match backing {
                    Backing::Hugetlbfs { page_size } => Some(page_size),
                    _ => None,
                };
                let file = create_memfd(size, page)?;
                builder = builder
                    .with_file_offset(FileOffset::new(file, 0))
                    .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_SHARED)
                    .with_hugetlbfs(page.is_some());
            }
        }
        let mapping = builder
            .build()
            .map_err(|e| io::Error::other(e.to_string()))?;
        if backing == Backing::Anonymous {
            // SAFETY: exactly the range `mapping` owns; MADV_HUGEPAGE only changes how the
            // kernel backs it (hosts commonly run THP in `madvise` mode). Failure is harmless.
            unsafe { libc::madvise(mapping.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        }
        let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
            .ok_or_else(|| invalid("region wraps the guest address space"))?;
        Ok(HostMapping {
            region: Arc::new(region),
            backing,
        })
    }

    /// The mapping as a guest memory region.
    pub(crate) fn region(&self) -> &Arc<GuestRegionMmap> {
        &self.region
    }

    /// Host address of the first byte.
    pub(crate) fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// Host pointer to `offset` after checking `[offset, offset+len)` lies inside the mapping.
    fn checked(&self, offset: u64, len: u64) -> io::Result<(*mut libc::c_void, usize)> {
        checked_range(&self.region, offset, len)
    }

    /// Makes `[offset, offset+len)` readable and writable (`true`) or inaccessible (`false`).
    /// A guest access to an inaccessible page that KVM maps then fails in KVM's page fault
    /// (KVM_RUN returns a memory fault with the guest-physical address) instead of quietly
    /// faulting in host memory.
    pub(crate) fn protect(&self, offset: u64, len: u64, accessible: bool) -> io::Result<()> {
        let (ptr, len) = self.checked(offset, len)?;
        let prot = if accessible {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        // SAFETY: `checked` proved the range lies inside the mapping `self.region` owns, and
        // the manager passes block-aligned (hence page-aligned) offsets. Changing protection
        // invalidates no Rust reference: nothing in tidevm holds references into hotplug
        // memory; every device access goes through vm-memory right after
        // `MemoryManager::is_accessible` approved it, on the control thread, which is also the
        // only thread that calls this (through `&mut MemoryManager`), so the two never overlap.
        if unsafe { libc::mprotect(ptr, len, prot) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Faults `[offset, offset+len)` in writable so the backing exists before the guest uses
    /// it; an empty hugetlb pool or a memory cgroup limit becomes an error here instead of a
    /// SIGBUS or an OOM kill at guest access time.
    pub(crate) fn populate(&self, offset: u64, len: u64) -> io::Result<()> {
        let (ptr, len) = self.checked(offset, len)?;
        // SAFETY: the range lies inside our mapping (`checked`) and the caller has just made
        // it PROT_READ|PROT_WRITE. POPULATE_WRITE only faults pages in; contents of fresh pages
        // are zero and the guest does not own this memory yet, so nothing observes the change.
        if unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frees the host memory behind `[offset, offset+len)`; later reads see zeros. Blocks
    /// are whole huge pages on hugetlbfs, so nothing of them is left behind.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        release(&self.region, offset, len).map(|_| ())
    }

    /// The backing kind.
    pub(crate) fn backing(&self) -> Backing {
        self.backing
    }

    /// The memfd, if the region is file backed (tests look at its allocated blocks).
    #[cfg(test)]
    pub(crate) fn file(&self) -> Option<&File> {
        self.region.file_offset().map(|f| f.file())
    }

    /// Number of resident 4 KiB host pages in `[offset, offset+len)`.
    pub(crate) fn resident_pages(&self, offset: u64, len: u64) -> io::Result<usize> {
        resident_pages(&self.region, offset, len)
    }
}

/// Releases the host memory behind `[offset, offset+len)` of one guest memory mapping (boot
/// RAM, a hotplug region or a DIMM); returns the bytes released. The one discard path: private
/// anonymous memory with `MADV_DONTNEED`, file backing by punching a hole (hugetlbfs only in
/// whole huge pages, so a partial huge page at either end is left in place).
pub(crate) fn release(region: &GuestRegionMmap, offset: u64, len: u64) -> io::Result<u64> {
    // The caller derived offset/len from a guest range inside this region; check anyway,
    // because the unsafe calls below rely on it.
    let end = offset
        .checked_add(len)
        .filter(|end| *end <= region.len())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    match region.file_offset() {
        None => {
            // `end <= region.len()` and the mapping exists, so both fit in usize.
            let ptr = region.as_ptr().wrapping_add(offset as usize);
            // SAFETY: `[ptr, ptr+len)` lies inside this private anonymous mapping, which the
            // manager owns and keeps mapped for its lifetime (checked above). The range is
            // guest memory the guest gave up (inflated or reported free), so dropping its
            // pages (later reads see zeros) cannot break the VMM; no Rust reference points
            // into guest memory across this call (all accesses go through volatile copies).
            if unsafe { libc::madvise(ptr.cast(), len as usize, libc::MADV_DONTNEED) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(len)
        }
        Some(file) => {
            // Shared file backing: DONTNEED would only drop our page table entries and leave
            // the pages in the file, so punch a hole. hugetlbfs frees only whole huge pages
            // (and would zero partial ones for nothing): keep the aligned middle only.
            let page = if region.is_hugetlbfs() == Some(true) {
                file.file().metadata()?.blksize().max(DISCARD_GRANULE)
            } else {
                DISCARD_GRANULE
            };
            let start = (file.start() + offset).next_multiple_of(page);
            let stop = (file.start() + end) / page * page;
            if start >= stop {
                return Ok(0);
            }
            let (Ok(s), Ok(l)) = (i64::try_from(start), i64::try_from(stop - start)) else {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            };
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on the manager's own memfd, over the file range backing the
            // checked part of this mapping; it frees those pages (unmapping them everywhere),
            // which is the intent for memory the guest gave up. No memory is accessed.
            if unsafe { libc::fallocate(file.file().as_raw_fd(), mode, s, l) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stop - start)
        }
    }
}
