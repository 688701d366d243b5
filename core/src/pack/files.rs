//! Sealed packs on a chunk server's disk: where each lives under the packs
//! directory, reading byte ranges of one, and the disk's free space. Shared
//! by the chunk server and by clients on the same host, which read packs
//! directly and write new ones into it (`granary_client`'s local reads and
//! writes).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The shard directory of pack `id` under `packs_dir`: `XX` = id mod 256 in
/// hex, so no directory holds more than 1/256 of the packs.
pub fn shard_dir(packs_dir: &Path, id: u64) -> PathBuf {
    packs_dir.join(format!("{:02x}", id % 256))
}

/// Where sealed pack `id` lives under `packs_dir`: `XX/ID.pack`.
pub fn sealed_pack_path(packs_dir: &Path, id: u64) -> PathBuf {
    shard_dir(packs_dir, id).join(format!("{id}.pack"))
}

/// Reads byte ranges of the file at `path` into one buffer, in the order
/// given (repeats and gaps allowed); ranges that follow each other in the
/// file are read with one `pread`. A range outside the file is
/// `InvalidInput`; a missing file `NotFound`.
pub fn read_ranges(path: &Path, ranges: &[(u64, u32)]) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &(offset, n) in ranges {
        if offset.checked_add(n as u64).is_none_or(|end| end > len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{n} is outside {} ({len} bytes)", path.display()),
            ));
        }
        match runs.last_mut() {
            Some((o, l)) if *o + *l as u64 == offset => *l += n as usize,
            _ => runs.push((offset, n as usize)),
        }
    }
    let total: usize = runs.iter().map(|(_, l)| l).sum();
    // Not zeroed first (that was 4% of a chunk server's CPU serving reads):
    // each run is read into the spare capacity, and the length only ever
    // covers what the reads filled.
    let mut out: Vec<u8> = Vec::with_capacity(total);
    for (offset, n) in runs {
        let mut done = 0;
        while done < n {
            let at = out.len();
            let spare = &mut out.spare_capacity_mut()[..n - done];
            // SAFETY: `spare` is writable memory of `n - done` bytes owned by
            // `out`; pread writes at most that many.
            let got = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    (offset + done as u64) as libc::off_t,
                )
            };
            match got {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} ended at {} while reading {offset}+{n}",
                            path.display(),
                            offset + done as u64
                        ),
                    ))
                }
                // SAFETY: the read initialised `got` more bytes.
                g if g > 0 => unsafe { out.set_len(at + g as usize) },
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                    continue;
                }
            }
            done += got as usize;
        }
    }
    Ok(out)
}

/// (capacity, free to unprivileged users) bytes of the filesystem holding
/// `path` (a chunk server's packs directory, for the server and for clients
/// that write packs into it), or `None` when it cannot be asked.
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain data; the call fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}
