//! "newc" cpio archives, the format the Linux kernel unpacks
//! into its initramfs. The nested lane appends one such archive (tidevm and
//! its shared libraries) to the cached base image of L1.

use std::collections::BTreeSet;
use std::io::{self, Write};

use cpio::newc::{self, ModeFileType};

/// Builds an archive with the `cpio` crate. Parent directories of every file are added
/// on the way, so the kernel can create the file wherever it goes.
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    directories: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
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
                self.entry(&directory, ModeFileType::Directory, 0o755, 2, &[])?;
            }
        }
        self.entry(path, ModeFileType::Regular, mode & 0o7777, 1, data)
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(self) -> io::Result<W> {
        newc::trailer(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        kind: ModeFileType,
        permissions: u32,
        links: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let file_size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        // The writer borrows `out` for one entry and pads it to 4 bytes on finish.
        let mut entry = newc::Builder::new(name)
            .ino(inode)
            .mode(permissions)
            .set_mode_file_type(kind)
            .nlink(links)
            .write(&mut self.out, file_size);
        entry.write_all(data)?;
        entry.finish()?;
        Ok(())
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
        assert_eq!(text.matches("070701").count(), 5); // usr, usr/local, usr/local/bin, x, trailer
        let usr = text.find("usr\0").unwrap();
        let file = text.find("usr/local/bin/x\0").unwrap();
        assert!(usr < file);
        assert!(text.contains("hello"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        // The file's header: regular file 0755, size 5.
        let header_start = file - 110;
        let header = &text[header_start..file];
        assert!(header.starts_with("070701"));
        assert_eq!(&header[14..22].to_ascii_uppercase(), "000081ED");
        assert_eq!(&header[54..62], "00000005");
    }

    #[test]
    fn reads_back_with_a_cpio_reader() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.add_file("opt/a/one", 0o644, b"first").unwrap();
        writer.add_file("opt/a/two", 0o755, b"second!").unwrap();
        let archive = writer.finish().unwrap();
        let mut input = &archive[..];
        let mut seen = Vec::new();
        loop {
            let mut reader = newc::Reader::new(input).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let entry = reader.entry();
            let (name, mode) = (entry.name().to_string(), entry.mode());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            seen.push((name, mode, String::from_utf8(data).unwrap()));
            input = reader.finish().unwrap();
        }
        let expect = |name: &str, mode: u32, data: &str| (name.to_string(), mode, data.to_string());
        assert_eq!(
            seen,
            vec![
                expect("opt", 0o040_755, ""),
                expect("opt/a", 0o040_755, ""),
                expect("opt/a/one", 0o100_644, "first"),
                expect("opt/a/two", 0o100_755, "second!"),
            ]
        );
    }
}
