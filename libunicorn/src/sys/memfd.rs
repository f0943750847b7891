//! memfds and seals. A memfd that both sides map must not shrink under the other side's mapping
//! (the next access would be SIGBUS), so every shared memfd carries `F_SEAL_SHRINK` and
//! `F_SEAL_GROW`, and the receiving side checks the seals with `F_GET_SEALS` before mapping.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use memmap2::{Mmap, MmapOptions};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::stat::fstat;
use nix::unistd::ftruncate;

use crate::error::Error;
use crate::status::Status;

/// Seals every shared memfd must carry.
pub const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_GROW);

/// A new memfd of `size` bytes (zero-filled), sealed against shrinking, growing and further
/// sealing.
pub fn create_sealed_memfd(name: &str, size: usize) -> Result<OwnedFd, Error> {
    let fd = create_memfd(name, size)?;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(REQUIRED_SEALS | SealFlag::F_SEAL_SEAL))
        .map_err(|e| Error::os("sealing memfd", e))?;
    Ok(fd)
}

/// A new memfd of `size` bytes that still allows sealing (the caller seals it).
pub fn create_memfd(name: &str, size: usize) -> Result<OwnedFd, Error> {
    let name = format!("unicorn:{name}");
    let fd = memfd_create(name.as_str(), MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| Error::os("memfd_create", e))?;
    let len = i64::try_from(size)
        .map_err(|_| Error::new(Status::InvalidArgument, format!("memfd size {size} too large")))?;
    ftruncate(&fd, len).map_err(|e| Error::os("ftruncate memfd", e))?;
    Ok(fd)
}

/// Adds seals to a memfd this process created.
pub fn add_seals(fd: &impl AsFd, seals: SealFlag) -> Result<(), Error> {
    fcntl(fd.as_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| Error::os("F_ADD_SEALS", e))?;
    Ok(())
}

/// The seals of a descriptor; an error for descriptors that cannot carry seals (anything that
/// is not a memfd or similar shmem file).
pub fn seals(fd: &impl AsFd) -> Result<SealFlag, Error> {
    let bits = fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS).map_err(|e| {
        Error::new(
            Status::InvalidArgument,
            format!("descriptor cannot carry seals (not a memfd): {e}"),
        )
    })?;
    Ok(SealFlag::from_bits_retain(bits))
}

/// Fails unless `fd` is sealed against shrinking and growing.
pub fn require_size_seals(fd: &impl AsFd) -> Result<(), Error> {
    let have = seals(fd)?;
    if !have.contains(REQUIRED_SEALS) {
        return Err(Error::new(
            Status::InvalidArgument,
            format!(
                "memfd must be sealed with F_SEAL_SHRINK | F_SEAL_GROW before it is shared (has {have:?})"
            ),
        ));
    }
    Ok(())
}

/// A read-only mapping of the whole memfd `fd`, which must be sealed against writing as well as
/// shrinking and growing: its bytes then cannot change or go away while mapped, and can be read
/// as plain memory. Mapped private, so the write seal's refusal of shared writable mappings
/// does not apply; the pages are still the memfd's own, shared with every process that maps it.
pub fn map_sealed(fd: &impl AsFd) -> Result<Mmap, Error> {
    let need = REQUIRED_SEALS | SealFlag::F_SEAL_WRITE;
    let have = seals(fd)?;
    if !have.contains(need) {
        return Err(Error::new(
            Status::InvalidArgument,
            format!("memfd must be sealed with {need:?} to be read in place (has {have:?})"),
        ));
    }
    let size = file_size(fd)?;
    let len = usize::try_from(size)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| Error::protocol(format!("cannot map a memfd of {size} bytes")))?;
    // SAFETY: the seals checked above forbid every write to the file and every change of its
    // size, for as long as it exists, so the mapped bytes never change and never go beyond the
    // end of the file.
    unsafe { MmapOptions::new().len(len).map_copy_read_only(fd.as_fd().as_raw_fd()) }
        .map_err(|e| Error::os("mmap", e))
}

/// The size of the file behind `fd`.
pub fn file_size(fd: &impl AsFd) -> Result<u64, Error> {
    let st = fstat(fd.as_fd()).map_err(|e| Error::os("fstat", e))?;
    u64::try_from(st.st_size).map_err(|_| Error::protocol("negative file size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfds_cannot_change_size() {
        let fd = create_sealed_memfd("t", 8192).unwrap();
        assert_eq!(file_size(&fd).unwrap(), 8192);
        require_size_seals(&fd).unwrap();
        assert!(ftruncate(&fd, 4096).is_err());
        assert!(ftruncate(&fd, 16384).is_err());
        assert!(add_seals(&fd, SealFlag::F_SEAL_WRITE).is_err(), "F_SEAL_SEAL blocks more seals");
    }

    #[test]
    fn unsealed_and_non_memfds_are_refused() {
        let fd = create_memfd("t", 4096).unwrap();
        assert_eq!(require_size_seals(&fd).unwrap_err().status(), Status::InvalidArgument);
        add_seals(&fd, SealFlag::F_SEAL_SHRINK).unwrap();
        assert!(require_size_seals(&fd).is_err(), "shrink alone is not enough");
        add_seals(&fd, SealFlag::F_SEAL_GROW).unwrap();
        require_size_seals(&fd).unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(require_size_seals(&file).is_err());
    }
}
