//! Pack files on local disk.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use granary_core::pack::{AdoptedPack, PackReader, PackWriter, SealedPack};
use granary_core::PackError;

/// The directory in the packs directory where clients on this host write new packs.
const INCOMING: &str = "incoming";

/// The packs of one chunk server.
#[derive(Debug, Clone)]
pub struct PackStore {
    dir: PathBuf,
    /// Held by the sweep of unlisted packs while it checks a file's age and
    /// deletes it, and by [`PackStore::keep`], so a copy reused just now is
    /// never swept as an old one.
    sweep: std::sync::Arc<std::sync::Mutex<()>>,
}

impl PackStore {
    /// Opens `dir`, removing `.open` files left by sessions that a crash
    /// interrupted (they were never registered, so nothing refers to them),
    /// and packs that clients on this host left unfinished in
    /// [`incoming`](Self::incoming_dir).
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let incoming = dir.join(INCOMING);
        std::fs::create_dir_all(&incoming)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Only this server's user writes there.
            std::fs::set_permissions(&incoming, std::fs::Permissions::from_mode(0o700))?;
        }
        for f in std::fs::read_dir(&incoming)? {
            let p = f?.path();
            tracing::info!(path = %p.display(), "removing a pack a client left unfinished");
            std::fs::remove_file(&p)?;
        }
        for shard in std::fs::read_dir(dir)? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&shard)? {
                let p = f?.path();
                if p.extension().is_some_and(|e| e == "open" || e == "restore") {
                    tracing::info!(path = %p.display(), "removing a pack from an interrupted session");
                    std::fs::remove_file(&p)?;
                }
            }
        }
        Ok(Self {
            // Absolute: `LocalReads` hands it to clients on this host.
            dir: std::path::absolute(dir)?,
            sweep: Default::default(),
        })
    }

    fn shard(&self, id: u64) -> PathBuf {
        granary_core::pack::shard_dir(&self.dir, id)
    }

    /// The packs directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where clients on this host write new packs for this server to adopt
    /// ([`adopt`](Self::adopt)): `incoming/` in the packs directory, so a
    /// pack moves to its place with a rename.
    pub fn incoming_dir(&self) -> PathBuf {
        self.dir.join(INCOMING)
    }

    fn incoming_path(&self, id: u64) -> PathBuf {
        self.incoming_dir().join(format!("{id}.part"))
    }

    /// Opens pack `id` that a client on this host wrote into
    /// [`incoming`](Self::incoming_dir), for verifying and sealing in place.
    /// It must be a plain file (not a link) with no other name, owned by
    /// this server's user: a client that can create such a file could
    /// write the packs directory anyway, and a file with another name (a
    /// hard link to a sealed pack, say) is never appended to.
    pub fn adopt(&self, id: u64) -> Result<AdoptedPack, PackError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let shard = self.shard(id);
        std::fs::create_dir_all(&shard).map_err(|source| PackError::Io { path: shard, source })?;
        let path = self.incoming_path(id);
        let io = |source| PackError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.nlink() != 1 || meta.uid() != euid {
            return Err(io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "not a plain file of this server's user (uid {euid}) with one name; \
                     it was not written by a client of this server"
                ),
            )));
        }
        AdoptedPack::open(file, &path, id)
    }

    /// Removes files in [`incoming`](Self::incoming_dir) not modified for
    /// `grace`: packs whose client died before handing them over. Returns
    /// how many.
    pub fn sweep_incoming(&self, grace: std::time::Duration) -> usize {
        let Ok(rd) = std::fs::read_dir(self.incoming_dir()) else {
            return 0;
        };
        let mut removed = 0;
        for f in rd.flatten() {
            let old = f
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() >= grace);
            if old && std::fs::remove_file(f.path()).is_ok() {
                tracing::info!(path = %f.path().display(), "removed a pack a client left unfinished");
                removed += 1;
            }
        }
        removed
    }

    /// Where sealed pack `id` lives.
    pub fn sealed_path(&self, id: u64) -> PathBuf {
        granary_core::pack::sealed_pack_path(&self.dir, id)
    }

    fn open_path(&self, id: u64) -> PathBuf {
        self.shard(id).join(format!("{id}.open"))
    }

    /// Starts writing pack `id`.
    pub fn create(&self, id: u64) -> Result<PackWriter, PackError> {
        let shard = self.shard(id);
        std::fs::create_dir_all(&shard).map_err(|source| PackError::Io { path: shard, source })?;
        let path = self.open_path(id);
        // A previous attempt of the same session may have left a file.
        let _ = std::fs::remove_file(&path);
        PackWriter::create(&path, id)
    }

    /// Seals a pack (fsync), moves it to its final name and fsyncs the directory.
    pub fn finish(&self, writer: PackWriter) -> Result<SealedPack, PackError> {
        let id = writer.pack_id();
        let mut sealed = writer.seal()?;
        let dest = self.sealed_path(id);
        std::fs::rename(&sealed.path, &dest).map_err(|source| PackError::Io {
            path: dest.clone(),
            source,
        })?;
        File::open(self.shard(id))
            .and_then(|d| d.sync_all())
            .map_err(|source| PackError::Io {
                path: self.shard(id),
                source,
            })?;
        sealed.path = dest;
        Ok(sealed)
    }

    /// Starts writing `writer`'s bytes from `from` to the disk without waiting
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the fsync at seal time
    /// finds little left to do and the disk stays busy while frames arrive.
    pub fn start_writeback(&self, writer: &mut PackWriter, from: u64) -> Result<(), PackError> {
        use std::os::unix::io::AsRawFd;
        writer.flush()?;
        let len = writer.len().saturating_sub(from);
        // SAFETY: a plain syscall on a file descriptor that `writer` keeps open.
        // Only a hint: errors are ignored, durability comes from the seal's fsync.
        unsafe {
            libc::sync_file_range(
                writer.as_raw_fd(),
                from as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        Ok(())
    }

    /// Where a copy of pack `id` being restored is written before it is verified.
    pub fn restore_path(&self, id: u64) -> io::Result<PathBuf> {
        std::fs::create_dir_all(self.shard(id))?;
        Ok(self.shard(id).join(format!("{id}.restore")))
    }

    /// Verifies the restored copy at [`restore_path`](Self::restore_path)
    /// (every frame), makes it durable and moves it to its final name.
    pub fn install_restored(&self, id: u64) -> Result<u64, String> {
        let tmp = self.restore_path(id).map_err(|e| e.to_string())?;
        let result = (|| {
            let len = verify_pack(&tmp, id)?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, self.sealed_path(id)).map_err(|e| e.to_string())?;
            File::open(self.shard(id))
                .and_then(|d| d.sync_all())
                .map_err(|e| e.to_string())?;
            Ok(len)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Moves a damaged pack out of the way (into `quarantine/` next to the
    /// packs) so nothing reads it and an operator can look at it.
    pub fn quarantine(&self, id: u64) -> io::Result<PathBuf> {
        let dir = self.dir.with_file_name("quarantine");
        std::fs::create_dir_all(&dir)?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dest = dir.join(format!("{id}.pack.{ts}"));
        std::fs::rename(self.sealed_path(id), &dest)?;
        tracing::warn!(pack = id, path = %dest.display(), "quarantined a damaged pack");
        Ok(dest)
    }

    /// Deletes the local copy of pack `id`; true if there was one.
    pub fn delete(&self, id: u64) -> bool {
        std::fs::remove_file(self.sealed_path(id)).is_ok()
    }

    /// Drops an unfinished pack (also one a client wrote into `incoming/`).
    pub fn abort(&self, id: u64) {
        let _ = std::fs::remove_file(self.open_path(id));
        let _ = std::fs::remove_file(self.incoming_path(id));
    }

    /// Deletes sealed pack `id` (one that will never be registered); true if
    /// it was there.
    pub fn remove_sealed(&self, id: u64) -> bool {
        let removed = std::fs::remove_file(self.sealed_path(id)).is_ok();
        if removed {
            tracing::info!(pack = id, "removed a pack that was never registered");
        }
        removed
    }

    /// Marks sealed pack `id` as just written (its modification time), so the
    /// sweep of unlisted packs gives it a full grace period: a copy reused by
    /// a restore is unlisted until meta records it. False if it is gone.
    pub fn keep(&self, id: u64) -> io::Result<bool> {
        let _sweep = self.sweep.lock().expect("sweep lock");
        match std::fs::File::open(self.sealed_path(id)) {
            Ok(f) => f.set_modified(std::time::SystemTime::now()).map(|_| true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes sealed pack `id` if it is at least `grace` old (the sweep of
    /// unlisted packs); true if it was deleted.
    pub fn remove_if_older(&self, id: u64, grace: std::time::Duration) -> bool {
        let _sweep = self.sweep.lock().expect("sweep lock");
        let old = std::fs::metadata(self.sealed_path(id))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() >= grace);
        old && self.remove_sealed(id)
    }

    /// Every sealed pack on this server, with its modification time.
    pub fn list_sealed(&self) -> io::Result<Vec<(u64, std::time::SystemTime)>> {
        let mut out = Vec::new();
        for shard in std::fs::read_dir(&self.dir)? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&shard)? {
                let f = f?;
                let p = f.path();
                if p.extension().is_some_and(|e| e == "pack") {
                    if let Some(id) = p
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.parse().ok())
                    {
                        out.push((id, f.metadata()?.modified()?));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Size of sealed pack `id`, if this server has it.
    pub fn size(&self, id: u64) -> Option<u64> {
        std::fs::metadata(self.sealed_path(id)).ok().map(|m| m.len())
    }

    /// Reads byte ranges of sealed pack `id` into one buffer, in order
    /// ([`granary_core::pack::read_ranges`]: adjacent ranges in one `pread`).
    pub fn read_ranges(&self, id: u64, ranges: &[(u64, u32)]) -> io::Result<Vec<u8>> {
        granary_core::pack::read_ranges(&self.sealed_path(id), ranges)
    }

    /// Bytes a pack session must leave free: 10% of the disk, at most 1 GiB,
    /// so the metadata (RocksDB, which stops on a full disk) keeps room.
    pub fn reserve(&self) -> u64 {
        let (capacity, _) = self.usage();
        (capacity / 10).min(1 << 30)
    }

    /// Fails when writing `more` bytes would eat into the [`reserve`](Self::reserve).
    pub fn check_space(&self, more: u64) -> Result<(), (u64, u64)> {
        let (capacity, used) = self.usage();
        let free = capacity.saturating_sub(used);
        let reserve = self.reserve();
        if capacity > 0 && free < reserve + more {
            return Err((free, reserve));
        }
        Ok(())
    }

    /// (capacity, used) bytes of the filesystem holding the packs.
    pub fn usage(&self) -> (u64, u64) {
        match granary_core::pack::disk_space(&self.dir) {
            Some((capacity, free)) => (capacity, capacity.saturating_sub(free)),
            None => (0, 0),
        }
    }
}

/// Checks every frame of the sealed pack at `path` and that it is pack `id`.
/// Returns its length, or one line saying what is wrong.
pub fn verify_pack(path: &Path, id: u64) -> Result<u64, String> {
    check_pack(path, id, true)
}

/// Like [`verify_pack`] with each frame's CRC-32 only (no decompression, no
/// BLAKE3): for a pack of this server's own, verified in full when it was
/// written, before it is copied where it will be the only copy (the object
/// tier). It catches damage since; scrub does the full check.
pub fn verify_pack_crc(path: &Path, id: u64) -> Result<u64, String> {
    check_pack(path, id, false)
}

fn check_pack(path: &Path, id: u64, full: bool) -> Result<u64, String> {
    let reader = PackReader::open(path).map_err(|e| e.to_string())?;
    if reader.pack_id() != id {
        return Err(format!(
            "{} holds pack {}, not pack {id}",
            path.display(),
            reader.pack_id()
        ));
    }
    let report = if full {
        reader.verify()
    } else {
        reader.verify_crc()
    }
    .map_err(|e| e.to_string())?;
    if let Some((entry, err)) = report.bad.first() {
        return Err(format!(
            "pack {id}: {} damaged frame(s), the first at offset {}: {err}",
            report.bad.len(),
            entry.offset
        ));
    }
    Ok(reader.len())
}

/// How long a sealed pack may stay unregistered before the sweep removes it.
/// `GRANARY_PACK_GRACE_SECS` overrides the default of 10 minutes (tests use seconds).
pub fn unregistered_grace() -> std::time::Duration {
    crate::settings::env_secs("GRANARY_PACK_GRACE_SECS", 600)
}

/// How long a pack a client writes into `incoming/` may go unmodified
/// before the sweep removes it (its client died before handing it over).
/// Longer than any pause of a live upload: a removed file fails that
/// upload. `GRANARY_INCOMING_GRACE_SECS` overrides the default of an hour.
pub fn incoming_grace() -> std::time::Duration {
    crate::settings::env_secs("GRANARY_INCOMING_GRACE_SECS", 3600)
}

/// Removes sealed packs older than `grace` that meta does not list for this
/// node: copies whose session failed after this replica sealed them, or
/// whose first replica died before registering. A pack with a queued move
/// stays: a move back to SSD restores (or reuses) copies before it lists
/// them, and a mover held up between the two must find its copy still
/// there (it lists it, and then drops the object copy). Does nothing when
/// meta cannot be asked. Returns the packs removed.
pub async fn sweep_unregistered(
    store: &PackStore,
    meta: &granary_client::MetaClient,
    node_id: u64,
    grace: std::time::Duration,
) -> Vec<u64> {
    let now = std::time::SystemTime::now();
    let old: Vec<u64> = match store.list_sealed() {
        Ok(list) => list
            .into_iter()
            .filter(|(_, t)| now.duration_since(*t).unwrap_or_default() >= grace)
            .map(|(id, _)| id)
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list packs for the sweep: {e}");
            return Vec::new();
        }
    };
    if old.is_empty() {
        return Vec::new();
    }
    let registered: std::collections::HashSet<u64> = match meta.list_packs(Some(node_id), None).await {
        Ok(packs) => packs.into_iter().map(|p| p.id).collect(),
        Err(e) => {
            tracing::debug!("pack sweep skipped, meta unavailable: {e}");
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for id in old.into_iter().filter(|id| !registered.contains(id)) {
        match meta.get_pack(id).await {
            // Queued for a move, or listed here since the list above.
            Ok(p) if !p.moving_to.is_empty() || p.replicas.contains(&node_id) => continue,
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::debug!(pack = id, "pack sweep skipped this pack, meta unavailable: {e}");
                continue;
            }
        }
        if store.remove_if_older(id, grace) {
            removed.push(id);
        }
    }
    removed
}

/// The proof a client on this host gives itself before reading this chunk
/// server's packs directly: a random token, written at start to a file the
/// `LocalReads` RPC names. A client that reads the same token there sees the
/// same disk (a client elsewhere cannot, whatever paths it has).
#[derive(Debug, Clone)]
pub struct LocalReadToken {
    pub path: PathBuf,
    pub token: String,
}

impl LocalReadToken {
    /// Writes a fresh token to `path` (temp file + rename).
    pub fn write(path: &Path) -> io::Result<Self> {
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &token)?;
        std::fs::rename(&tmp, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::PackStore;

    /// A pack a client would write into `incoming/`: header and two frames.
    fn client_pack(store: &PackStore, id: u64) -> std::path::PathBuf {
        let mut bytes = granary_core::pack::encode_header(id).to_vec();
        for raw in [&b"first chunk"[..], &[7u8; 5000][..]] {
            bytes.extend(granary_core::frame::frame_chunk(raw).1);
        }
        let path = store.incoming_dir().join(format!("{id}.part"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn adopting_takes_only_a_plain_file_with_one_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(&dir.path().join("packs")).unwrap();

        // A plain file: verified, sealed in place and moved to its shard.
        client_pack(&store, 1);
        let mut adopted = store.adopt(1).unwrap();
        while adopted.next_run().unwrap().is_some() {}
        let sealed = store.finish(adopted.into_writer().unwrap()).unwrap();
        assert_eq!(sealed.path, store.sealed_path(1));
        assert_eq!(sealed.entries.len(), 2);
        assert!(super::verify_pack(&store.sealed_path(1), 1).is_ok());
        assert!(!store.incoming_dir().join("1.part").exists());

        // A second name (a hard link to it elsewhere): never appended to.
        let path = client_pack(&store, 2);
        let other = dir.path().join("other-name");
        std::fs::hard_link(&path, &other).unwrap();
        let e = store
            .adopt(2)
            .err()
            .expect("adopted a file with two names")
            .to_string();
        assert!(e.contains("one name; it was not written by a client"), "{e}");

        // A symlink to a file: not followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"not a pack").unwrap();
        std::os::unix::fs::symlink(&target, store.incoming_dir().join("3.part")).unwrap();
        assert!(store.adopt(3).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"not a pack");

        // Missing: an error naming the file.
        let e = store.adopt(4).err().expect("adopted a missing file").to_string();
        assert!(e.contains("4.part"), "{e}");

        // A restart removes what clients left.
        drop(store);
        let store = PackStore::open(&dir.path().join("packs")).unwrap();
        assert_eq!(std::fs::read_dir(store.incoming_dir()).unwrap().count(), 0);
        assert!(store.sealed_path(1).is_file());
    }

    #[test]
    fn read_ranges_joins_adjacent_ranges_and_refuses_ranges_outside_the_pack() {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = store.sealed_path(5);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        // Adjacent (one read), a gap, out of order, a repeat, and empty.
        let ranges = [
            (0, 10),
            (10, 90),
            (500, 1000),
            (100, 3),
            (100, 3),
            (9_999, 1),
            (42, 0),
        ];
        let got = store.read_ranges(5, &ranges).unwrap();
        let want: Vec<u8> = ranges
            .iter()
            .flat_map(|&(o, n)| bytes[o as usize..o as usize + n as usize].to_vec())
            .collect();
        assert_eq!(got, want);
        let e = store.read_ranges(5, &[(0, 10), (9_999, 2)]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("is outside") && e.to_string().contains("5.pack"),
            "{e}"
        );
        let e = store.read_ranges(6, &[(0, 1)]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
