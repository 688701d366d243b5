//! Snapshot files: the state machine streamed to and from disk, never whole
//! in memory.
//!
//! ```text
//! "GRSNAP01" | header_len: u32 LE | header (JSON: snapshot meta + column family names)
//! record*    | record := cf_index: u8 | key_len: u32 LE | key | value_len: u32 LE | value
//! 0xFF       | BLAKE3 of every preceding byte (32 bytes)
//! ```
//!
//! A node keeps one current snapshot, `snapshots/current.snap`, replaced by
//! rename. Building reads a consistent RocksDB snapshot of the application's
//! column families. Installing a received snapshot is crash-safe:
//! 1. verify the received file's checksum;
//! 2. copy it to `current.snap` (temp file, fsync, rename, fsync directory);
//! 3. write the `installing` marker (synced);
//! 4. wipe the application's column families and load the records in batches;
//! 5. write `last_applied` and the membership and delete the marker, synced.
//!
//! A node that finds the marker on start-up has crashed during step 4 and
//! simply runs steps 4 and 5 again from `current.snap`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, StoredMembershipOf};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::{cf, CF_SM};
use crate::TypeConfig;

pub(crate) const CURRENT: &str = "current.snap";
/// How errors name a received snapshot (an unnamed temp file).
pub(crate) const RECEIVED: &str = "(received)";
const MAGIC: &[u8; 8] = b"GRSNAP01";
const END: u8 = 0xFF;
pub(crate) const KEY_LAST_APPLIED: &[u8] = b"last_applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"membership";
pub(crate) const KEY_INSTALLING: &[u8] = b"installing";
/// Flush a load batch once it holds this many bytes.
const LOAD_BATCH_BYTES: usize = 4 << 20;

pub(crate) type Meta = SnapshotMetaOf<TypeConfig>;
/// The last applied log id and the membership it implies.
pub(crate) type AppliedState = (Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>);

#[derive(Serialize, Deserialize)]
pub(crate) struct Header {
    pub meta: Meta,
    pub cfs: Vec<String>,
}

fn bad(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot {}: {what}", path.display()),
    )
}

/// A writer that hashes what it writes.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the applied state from `sm_state` (through a RocksDB snapshot when given).
pub(crate) fn applied_state(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error>,
) -> io::Result<AppliedState> {
    let decode_err = |e: bincode::Error| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let last = match get(KEY_LAST_APPLIED).map_err(io::Error::other)? {
        Some(v) => Some(bincode::deserialize(&v).map_err(decode_err)?),
        None => None,
    };
    let membership = match get(KEY_MEMBERSHIP).map_err(io::Error::other)? {
        Some(v) => bincode::deserialize::<StoredMembershipOf<TypeConfig>>(&v).map_err(decode_err)?,
        None => StoredMembershipOf::<TypeConfig>::default(),
    };
    Ok((last, membership))
}

/// Builds a snapshot of `app_cfs` as of now and makes it the current one.
pub(crate) fn build(db: &DB, app_cfs: &[&str], dir: &Path) -> io::Result<Meta> {
    std::fs::create_dir_all(dir)?;
    let snap = db.snapshot();
    let (last_log_id, last_membership) = applied_state(|k| snap.get_cf(cf(db, CF_SM), k))?;
    let meta = Meta {
        last_log_id,
        last_membership,
    };
    let header = serde_json::to_vec(&Header {
        meta: meta.clone(),
        cfs: app_cfs.iter().map(|s| s.to_string()).collect(),
    })
    .map_err(io::Error::other)?;
    // Removed if the build fails; a crash may leave it behind (`build-*.tmp`).
    let tmp = tempfile::Builder::new()
        .prefix("build-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, tmp),
        hasher: blake3::Hasher::new(),
    };
    w.write_all(MAGIC)?;
    w.write_all(&(header.len() as u32).to_le_bytes())?;
    w.write_all(&header)?;
    for (i, name) in app_cfs.iter().enumerate() {
        for item in snap.iterator_cf(cf(db, name), IteratorMode::Start) {
            let (k, v) = item.map_err(io::Error::other)?;
            w.write_all(&[i as u8])?;
            w.write_all(&(k.len() as u32).to_le_bytes())?;
            w.write_all(&k)?;
            w.write_all(&(v.len() as u32).to_le_bytes())?;
            w.write_all(&v)?;
        }
    }
    w.write_all(&[END])?;
    let hash = w.hasher.finalize();
    let mut inner = w.inner;
    inner.write_all(hash.as_bytes())?;
    let tmp = inner.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(CURRENT)).map_err(|e| e.error)?;
    sync_dir(dir)?;
    Ok(meta)
}

/// Reads the header of a snapshot file (from its start).
pub(crate) fn read_header(file: &mut File, path: &Path) -> io::Result<Header> {
    file.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad(path, "not a granary snapshot (bad magic)"));
    }
    let mut len = [0u8; 4];
    file.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(bad(path, "header too large"));
    }
    let mut header = vec![0u8; len];
    file.read_exact(&mut header)?;
    serde_json::from_slice(&header).map_err(|e| bad(path, &format!("bad header: {e}")))
}

/// Checks the trailing BLAKE3 of a snapshot file.
pub(crate) fn verify(file: &mut File, path: &Path) -> io::Result<()> {
    let len = file.seek(SeekFrom::End(0))?;
    if len < 8 + 4 + 1 + 32 {
        return Err(bad(path, "truncated"));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    io::copy(
        &mut BufReader::with_capacity(1 << 20, &mut *file).take(len - 32),
        &mut hasher,
    )?;
    let mut expected = [0u8; 32];
    file.seek(SeekFrom::Start(len - 32))?;
    file.read_exact(&mut expected)?;
    if hasher.finalize().as_bytes() != &expected {
        return Err(bad(path, "checksum mismatch (damaged or incomplete transfer)"));
    }
    Ok(())
}

/// Verifies a received snapshot, makes it current and loads it (steps 1-5).
pub(crate) fn install(db: &DB, app_cfs: &[&str], dir: &Path, received: &mut File) -> io::Result<Header> {
    std::fs::create_dir_all(dir)?;
    let label = dir.join(RECEIVED);
    verify(received, &label)?;
    let tmp = dir.join("install.tmp");
    let mut out = File::create(&tmp)?;
    received.seek(SeekFrom::Start(0))?;
    io::copy(received, &mut out)?;
    out.sync_all()?;
    std::fs::rename(&tmp, dir.join(CURRENT))?;
    sync_dir(dir)?;
    let mut marker = WriteOptions::default();
    marker.set_sync(true);
    db.put_cf_opt(cf(db, CF_SM), KEY_INSTALLING, b"1", &marker)
        .map_err(io::Error::other)?;
    load(db, app_cfs, &dir.join(CURRENT))
}

/// Replaces the application's state with the snapshot at `path` (steps 4-5).
pub(crate) fn load(db: &DB, app_cfs: &[&str], path: &Path) -> io::Result<Header> {
    let mut file = File::open(path)?;
    let header = read_header(&mut file, path)?;
    let names: Vec<&str> = header.cfs.iter().map(String::as_str).collect();
    if names != app_cfs {
        return Err(bad(
            path,
            "column families differ from this build's; upgrade granary",
        ));
    }
    // Wipe.
    for name in app_cfs {
        let handle = cf(db, name);
        let mut batch = WriteBatch::default();
        for item in db.iterator_cf(handle, IteratorMode::Start) {
            let (k, _) = item.map_err(io::Error::other)?;
            batch.delete_cf(handle, k);
            if batch.size_in_bytes() >= LOAD_BATCH_BYTES {
                db.write(std::mem::take(&mut batch)).map_err(io::Error::other)?;
            }
        }
        db.write(batch).map_err(io::Error::other)?;
    }
    // Load.
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut batch = WriteBatch::default();
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        if tag[0] == END {
            break;
        }
        let name = app_cfs
            .get(tag[0] as usize)
            .ok_or_else(|| bad(path, "record names an unknown column family"))?;
        let k = read_blob(&mut r)?;
        let v = read_blob(&mut r)?;
        batch.put_cf(cf(db, name), k, v);
        if batch.size_in_bytes() >= LOAD_BATCH_BYTES {
            db.write(std::mem::take(&mut batch)).map_err(io::Error::other)?;
        }
    }
    match &header.meta.last_log_id {
        Some(id) => batch.put_cf(
            cf(db, CF_SM),
            KEY_LAST_APPLIED,
            bincode::serialize(id).map_err(io::Error::other)?,
        ),
        None => batch.delete_cf(cf(db, CF_SM), KEY_LAST_APPLIED),
    }
    batch.put_cf(
        cf(db, CF_SM),
        KEY_MEMBERSHIP,
        bincode::serialize(&header.meta.last_membership).map_err(io::Error::other)?,
    );
    batch.delete_cf(cf(db, CF_SM), KEY_INSTALLING);
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync).map_err(io::Error::other)?;
    Ok(header)
}

fn read_blob(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 256 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot record larger than 256 MiB",
        ));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}
