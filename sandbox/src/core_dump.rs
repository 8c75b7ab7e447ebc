//! Keeping guest data out of core dumps.
//!
//! A Citadel process holds guest memory mapped (the VMM all of guest RAM, a backend what its
//! frontend shared) and, in the VMM, vCPU state: a core file written by a crash would copy a
//! tenant's memory to the host's disk, readable by whoever collects crash reports. So every
//! Citadel program sets a core size limit of 0 (soft and hard) as the first thing it does, and
//! marks each guest memory mapping `MADV_DONTDUMP`, which also holds when a core is written
//! anyway (a `core_pattern` pipe helper may ignore the limit).

/// Sets `RLIMIT_CORE` to 0, soft and hard, so no core file is written and the process cannot
/// raise the limit again; processes it starts inherit it.
pub fn disable_core_dumps() -> Result<(), crate::Error> {
    crate::set_limit(crate::Limit::CoreSize(0))
}

/// Marks `len` bytes of mappings at `addr` (page aligned) `MADV_DONTDUMP`, leaving them out of
/// any core dump.
pub fn exclude_from_core_dumps(addr: *const u8, len: usize) -> std::io::Result<()> {
    // SAFETY: MADV_DONTDUMP only sets a flag on the VMAs of the range; it neither reads nor
    // changes their contents, and an unmapped or misaligned range is refused with an error.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags line of the mapping that contains `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (s..e).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_string();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn a_marked_mapping_carries_the_dd_flag() {
        let len = 2 * 4096;
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let has_dd = |f: &str| f.split_whitespace().any(|flag| flag == "dd");
        assert!(!has_dd(&vm_flags(ptr as usize)));
        exclude_from_core_dumps(ptr.cast(), len).unwrap();
        assert!(has_dd(&vm_flags(ptr as usize)));
        assert!(exclude_from_core_dumps(ptr.cast::<u8>().wrapping_add(1), 4096).is_err());
        // SAFETY: unmapping exactly what was mapped above.
        unsafe { libc::munmap(ptr, len) };
    }
}
