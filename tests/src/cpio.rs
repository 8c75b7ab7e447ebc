//! newc ("070701") cpio archives, the format Linux unpacks as an initramfs.

use std::io;

/// Appends one "070701" (newc) cpio entry (`mode` includes the file type bits). Header and data are each padded to 4 bytes,
/// counted from the start of `image`, which is where the kernel's parser counts from.
pub fn append_newc_entry(
    image: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    data: &[u8],
) -> io::Result<()> {
    let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB");
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).map_err(too_big)?,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        u32::try_from(name.len() + 1).map_err(too_big)?,
        0, // check
    ];
    image.extend_from_slice(b"070701");
    for field in fields {
        image.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    image.extend_from_slice(name.as_bytes());
    image.push(0);
    image.resize(image.len().next_multiple_of(4), 0);
    image.extend_from_slice(data);
    image.resize(image.len().next_multiple_of(4), 0);
    Ok(())
}
