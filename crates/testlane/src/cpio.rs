//! A writer for "newc" cpio archives, the format the Linux kernel unpacks
//! into its initramfs. The nested lane appends one such archive (tidevm and
//! its shared libraries) to the cached base image of L1.

use std::collections::BTreeSet;
use std::io::{self, Write};

const NEWC_MAGIC: &str = "070701";
const MODE_DIRECTORY: u32 = 0o040_000;
const MODE_REGULAR: u32 = 0o100_000;

/// Builds an archive in memory. Parent directories of every file are added
/// on the way, so the kernel can create the file wherever it goes.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    directories: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            // Far above the inode numbers GNU cpio gives the base archive;
            // the kernel uses them only to detect hard links within one
            // archive, but distinct numbers cost nothing.
            next_inode: 0x0100_0000,
            directories: BTreeSet::new(),
        }
    }

    /// Adds a regular file at `path` (relative, no leading slash).
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            if self.directories.insert(parent.clone()) {
                let directory = parent.clone();
                self.entry(&directory, MODE_DIRECTORY | 0o755, 2, &[])?;
            }
        }
        self.entry(path, MODE_REGULAR | (mode & 0o7777), 1, data)
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, links: u32, data: &[u8]) -> io::Result<()> {
        let name_size = name.len() + 1;
        let inode = self.next_inode;
        self.next_inode += 1;
        let file_size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let header = format!(
            "{NEWC_MAGIC}{inode:08X}{mode:08X}{uid:08X}{gid:08X}{links:08X}{mtime:08X}\
{file_size:08X}{dev_major:08X}{dev_minor:08X}{rdev_major:08X}{rdev_minor:08X}\
{name_size:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dev_major = 0,
            dev_minor = 0,
            rdev_major = 0,
            rdev_minor = 0,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// newc aligns both the name and the data to 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_aligned_entries_with_parent_directories() {
        let mut writer = CpioWriter::new(Vec::new());
        writer
            .add_file("/usr/local/bin/x", 0o755, b"hello")
            .unwrap();
        let archive = writer.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        let text = String::from_utf8_lossy(&archive);
        assert_eq!(text.matches(NEWC_MAGIC).count(), 5); // usr, usr/local, usr/local/bin, x, trailer
        let usr = text.find("usr\0").unwrap();
        let file = text.find("usr/local/bin/x\0").unwrap();
        assert!(usr < file);
        assert!(text.contains("hello"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        // The file's header: regular file 0755, size 5.
        let header_start = file - 110;
        let header = &text[header_start..file];
        assert!(header.starts_with(NEWC_MAGIC));
        assert_eq!(&header[14..22], "000081ED");
        assert_eq!(&header[54..62], "00000005");
    }
}
