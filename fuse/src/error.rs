//! [`FsError`]: what can go wrong serving a mount, and the one place where
//! errors become errno values.

use granary_client::ClientError;

/// A failure inside the filesystem logic. Cheap to clone: a failed batch fetch
/// is handed to every reader that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    /// No such inode or name.
    #[error("no such file or directory")]
    NotFound,
    /// A directory operation on something else.
    #[error("not a directory")]
    NotDir,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsDir,
    /// readlink on something that is not a symlink, or a bad handle.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The cluster could not deliver data (unreachable, damaged, missing).
    #[error("fetching from the cluster failed: {0}")]
    Remote(String),
    /// A local I/O problem (disk cache).
    #[error("local I/O error: {0}")]
    Io(String),
}

impl FsError {
    /// The errno this error is reported as.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Remote(_) | FsError::Io(_) => libc::EIO,
        }
    }
}

impl From<ClientError> for FsError {
    fn from(e: ClientError) -> Self {
        if e.is_not_found() {
            FsError::NotFound
        } else {
            FsError::Remote(e.to_string())
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError::Io(e.to_string())
    }
}
