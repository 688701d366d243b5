//! Downloading a version into a directory, byte- and metadata-identical to
//! what was uploaded (contents, modes, mtimes, symlinks, empty files and
//! directories, non-UTF-8 names).
//!
//! Trees are walked from the root; names were validated when the trees were
//! stored (no '/', '.', '..' or NUL), so nothing can be written outside the
//! target directory. Files are fetched in windows of at most 16 MiB of frames
//! (every frame verified), several files at a time; directory modes and mtimes
//! are set last, deepest first, since filling a directory changes its mtime.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use granary_core::tree::{EntryData, Timestamp};
use granary_core::{ChunkRef, TreeEntry, TreeId};
use tokio::task::JoinSet;

use crate::chunks::MAX_FETCH;
use crate::error::ClientError;
use crate::version::VersionReader;

/// Files fetched at the same time.
const PARALLEL_FILES: usize = 8;

/// What a download wrote.
#[derive(Debug, Clone, Default)]
pub struct DownloadReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Frame bytes read directly from the packs of chunk servers on this
    /// host (local reads) rather than fetched from them.
    pub local_bytes: u64,
    /// Frame bytes read directly from the object tier rather than through
    /// a chunk server.
    pub object_read_bytes: u64,
}

fn io_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Invalid(format!("cannot write '{}': {e}", path.display()))
}

fn set_mtime(path: &Path, t: Timestamp) -> Result<(), ClientError> {
    let when = if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
    };
    std::fs::File::options()
        .read(true)
        .open(path)
        .and_then(|f| f.set_modified(when))
        .map_err(|e| io_err(path, e))
}

/// Writes the version open in `reader` into `dest` (created if missing; must be empty).
pub async fn download(
    reader: &VersionReader,
    dest: &Path,
    bytes_done: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<DownloadReport, ClientError> {
    std::fs::create_dir_all(dest).map_err(|e| io_err(dest, e))?;
    if std::fs::read_dir(dest)
        .map_err(|e| io_err(dest, e))?
        .next()
        .is_some()
    {
        return Err(ClientError::Invalid(format!(
            "'{}' is not empty; download into a new or empty directory",
            dest.display()
        )));
    }
    let mut report = DownloadReport::default();
    let local_before = reader.chunk_servers().local_read_bytes();
    let object_before = reader.chunk_servers().object_read_bytes();
    let mut dirs: Vec<(PathBuf, u32, Timestamp)> = Vec::new();
    let mut files: Vec<(PathBuf, TreeEntry)> = Vec::new();
    let mut stack: Vec<(PathBuf, TreeId)> = vec![(dest.to_path_buf(), reader.root())];
    while let Some((dir, id)) = stack.pop() {
        let tree = reader.tree(id).await?;
        for e in tree.entries() {
            let path = dir.join(OsStr::from_bytes(&e.name));
            match &e.data {
                EntryData::Dir { tree } => {
                    std::fs::create_dir(&path).map_err(|err| io_err(&path, err))?;
                    dirs.push((path.clone(), e.mode, e.mtime));
                    stack.push((path, *tree));
                    report.dirs += 1;
                }
                EntryData::Symlink { target } => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                        .map_err(|err| io_err(&path, err))?;
                    report.symlinks += 1;
                }
                EntryData::File { size, .. } => {
                    report.files += 1;
                    report.bytes += size;
                    files.push((path, e.clone()));
                }
            }
        }
    }
    let mut tasks = JoinSet::new();
    for (path, entry) in files {
        while tasks.len() >= PARALLEL_FILES {
            tasks
                .join_next()
                .await
                .expect("non-empty")
                .map_err(|e| ClientError::Invalid(e.to_string()))??;
        }
        let reader = reader.clone();
        let done = bytes_done.clone();
        tasks.spawn(async move { write_file(&reader, &path, &entry, done.as_ref()).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| ClientError::Invalid(e.to_string()))??;
    }
    // Deepest directories first: setting a child's attributes must not disturb its parent.
    dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (path, mode, mtime) in dirs {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err(&path, e))?;
        set_mtime(&path, mtime)?;
    }
    report.local_bytes = reader.chunk_servers().local_read_bytes() - local_before;
    report.object_read_bytes = reader.chunk_servers().object_read_bytes() - object_before;
    Ok(report)
}

async fn write_file(
    reader: &VersionReader,
    path: &Path,
    entry: &TreeEntry,
    bytes_done: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), ClientError> {
    use std::io::Write;
    let list = reader.chunk_list(entry).await?;
    let mut out =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(|e| io_err(path, e))?);
    let mut window: Vec<ChunkRef> = Vec::new();
    let mut window_bytes = 0usize;
    let flush = async |window: &mut Vec<ChunkRef>,
                       out: &mut std::io::BufWriter<std::fs::File>|
           -> Result<(), ClientError> {
        let ids: Vec<_> = window.iter().map(|c| c.id).collect();
        let raws = reader
            .chunk_servers()
            .fetch(&ids, crate::ReadPattern::Demand)
            .await?;
        for raw in raws {
            out.write_all(&raw).map_err(|e| io_err(path, e))?;
            bytes_done(raw.len() as u64);
        }
        window.clear();
        Ok(())
    };
    for c in list {
        if window_bytes + c.len as usize > MAX_FETCH && !window.is_empty() {
            flush(&mut window, &mut out).await?;
            window_bytes = 0;
        }
        window_bytes += c.len as usize;
        window.push(c);
    }
    if !window.is_empty() {
        flush(&mut window, &mut out).await?;
    }
    let file = out.into_inner().map_err(|e| io_err(path, e.into_error()))?;
    file.sync_all().map_err(|e| io_err(path, e))?;
    drop(file);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode))
        .map_err(|e| io_err(path, e))?;
    set_mtime(path, entry.mtime)
}
