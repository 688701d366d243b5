//! The object tier: sealed packs in an S3 bucket or a local directory,
//! through the `object_store` crate.
//!
//! A tier is named by a URL: `s3://bucket[/prefix]` (endpoint, region and
//! credentials from the usual `AWS_*` environment variables) or
//! `file:///abs/path` (a directory, created if missing, written with fsync).
//!
//! **Keys.** A pack GC writes (a compaction's new pack) is the object
//! `<prefix>/packs/<id as 16 hex digits>.pack` ([`ObjectTier::pack_key`]); a
//! pack the mover uploads gets `<prefix>/packs/<id>-<random 16 hex digits>.pack`
//! ([`ObjectTier::move_key`]), a key no earlier or later upload of the same pack
//! shares, so a stale task deleting the object it recorded can never delete
//! another move's copy. Meta records the key; nothing derives it from the id.
//! The fixed-width hex names sort like the id and let
//! [`ObjectTier::list_packs`] tell packs from any other key under the prefix.
//!
//! **Uploads.** A file below 16 MiB goes up in one PUT; a larger one as a
//! multipart upload of 8 MiB parts with at most four parts in flight, read from
//! disk as the parts go out, so an upload holds at most ~40 MiB whatever the
//! file size. A failed multipart upload is aborted. Every upload ends with a
//! HEAD that checks the stored size.
//!
//! **Range reads.** [`ObjectTier::get_ranges`] merges ranges less than 1 MiB
//! apart (adjacent frames of a pack become one request), fetches the merged
//! ranges concurrently and checks that every byte asked for came back. It
//! coalesces itself instead of calling `ObjectStore::get_ranges`: in
//! object_store 0.14 the default (HTTP) implementation panics when a range
//! past the end of the object is merged with one inside it.

use std::fmt::Display;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResultPayload, ObjectStore, PutMultipartOptions, PutOptions, WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Files at least this large are uploaded as multipart uploads.
const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Part size of multipart uploads.
const PART_SIZE: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Ranges at most this far apart are fetched with one request.
const COALESCE_GAP: u64 = 1 << 20;
/// Merged ranges fetched at once by [`ObjectTier::get_ranges`].
const RANGE_FETCHES_IN_FLIGHT: usize = 8;

/// The URL forms [`ObjectTier::from_url`] accepts, for error messages.
const URL_FORMS: &str = "s3://bucket[/prefix] or file:///absolute/path";

/// Errors of the object tier.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The tier URL cannot be used; the message names the accepted forms.
    #[error("{0}")]
    BadUrl(String),
    /// The object does not exist.
    #[error("object {key} is not in the object tier {url}")]
    NotFound {
        /// The tier's URL.
        url: String,
        /// The object key.
        key: String,
    },
    /// An operation failed (network, credentials, local I/O, size mismatch).
    #[error("object tier {url}: {op} {key} failed: {message}")]
    Failed {
        /// The tier's URL.
        url: String,
        /// The operation: `put`, `get`, `head`, `delete` or `list`.
        op: &'static str,
        /// The object key (the listed prefix for `list`).
        key: String,
        /// The cause, on one line.
        message: String,
    },
}

/// A pack object found by [`ObjectTier::list_pack_objects`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackObject {
    pub id: u64,
    pub key: String,
    pub size: u64,
    /// Last modification, ms since the Unix epoch.
    pub modified_ms: u64,
}

/// What a tier is opened for (see [`ObjectTier::for_reads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access<'a> {
    /// A chunk server: reads and writes, creates a `file://` directory.
    Serve,
    /// A client reading packs directly, from a store a chunk server reaches
    /// at `server_endpoint`.
    Read { server_endpoint: &'a str },
}

/// Sets of environment variables, any complete one of which gives
/// object_store S3 credentials without asking an instance metadata service
/// (the same pairs `AmazonS3Builder::build` checks, in its order).
const CREDENTIAL_SETS: [&[&str]; 4] = [
    &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
    &["AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"],
    &["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"],
    &[
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    ],
];

/// The S3 endpoint this process's environment names (`AWS_ENDPOINT`, else
/// `AWS_ENDPOINT_URL`), without a trailing slash; empty for AWS itself.
pub fn env_endpoint() -> String {
    ["AWS_ENDPOINT", "AWS_ENDPOINT_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_default()
}

/// One object tier: a bucket (or directory) and an optional key prefix.
#[derive(Debug, Clone)]
pub struct ObjectTier {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// The node's default `file://DATA_DIR/objects` (no URL was given):
    /// no other node sees it.
    node_default: bool,
    /// Key prefix without leading or trailing slashes; `None` for the root.
    prefix: Option<String>,
    /// The S3 endpoint ([`env_endpoint`]) of an `s3://` tier; empty for AWS
    /// itself and for a `file://` tier.
    endpoint: String,
}

impl ObjectTier {
    /// Opens the tier at `url`: `s3://bucket[/prefix]` (endpoint, region and
    /// credentials from the `AWS_*` environment variables via
    /// `AmazonS3Builder::from_env`; plain HTTP is allowed when `AWS_ENDPOINT`
    /// or `AWS_ENDPOINT_URL` starts with `http://`; without `AWS_REGION` or
    /// `AWS_DEFAULT_REGION` the region is `us-east-1`) or `file:///abs/path` (the directory is created if
    /// missing). Anything else is [`ObjectError::BadUrl`].
    pub fn from_url(url: &str) -> Result<Self, ObjectError> {
        Self::open(url, Access::Serve)
    }

    /// Opens the tier at `url` only to read packs, as a client reading the
    /// object tier directly does: like [`Self::from_url`], except that a
    /// `file://` directory must already exist (nothing is created); an
    /// `s3://` tier needs credentials in this process's environment (a key
    /// id and secret, or a complete web-identity or container-credentials
    /// set: without one, object_store would ask a cloud's instance metadata
    /// service) and the same endpoint as the chunk server that named the
    /// tier (`server_endpoint`, its [`Self::endpoint`]), so the requests
    /// go to the store the cluster uses and nowhere else; a connection
    /// must open within 3 s and a failed request is retried once within
    /// 3 s (not three times within 20 s): such a client falls back to
    /// reading through a chunk server, so it must not wait long.
    pub fn for_reads(url: &str, server_endpoint: &str) -> Result<Self, ObjectError> {
        Self::open(url, Access::Read { server_endpoint })
    }

    /// The S3 endpoint this tier's requests go to (`AWS_ENDPOINT` or
    /// `AWS_ENDPOINT_URL` when it was opened); empty for AWS itself and for
    /// a `file://` tier.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn open(url: &str, access: Access) -> Result<Self, ObjectError> {
        let bad = |why: &str| ObjectError::BadUrl(format!("bad object tier URL `{url}`: {why}"));
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(&format!("the bucket name is missing; expected {URL_FORMS}")));
            }
            if bucket.contains(['?', '#', '@', ':']) {
                return Err(bad(&format!(
                    "`{bucket}` is not a bucket name; expected {URL_FORMS}"
                )));
            }
            let prefix = prefix.trim_matches('/');
            let prefix = if prefix.is_empty() {
                None
            } else {
                Path::parse(prefix)
                    .map_err(|e| bad(&format!("the key prefix `{prefix}` is invalid: {e}")))?;
                Some(prefix.to_string())
            };
            let endpoint = env_endpoint();
            if let Access::Read { server_endpoint } = access {
                let server_endpoint = server_endpoint.trim_end_matches('/');
                if endpoint != server_endpoint {
                    let name = |e: &str| {
                        if e.is_empty() {
                            "AWS itself".to_string()
                        } else {
                            e.to_string()
                        }
                    };
                    return Err(ObjectError::BadUrl(format!(
                        "the chunk server reaches {url} at {}, this process at {} (AWS_ENDPOINT)",
                        name(server_endpoint),
                        name(&endpoint)
                    )));
                }
                let has = |set: &[&str]| {
                    set.iter()
                        .all(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
                };
                if !CREDENTIAL_SETS.iter().any(|set| has(set)) {
                    return Err(bad(&format!(
                        "no S3 credentials in this process's environment (set {})",
                        CREDENTIAL_SETS.map(|set| set.join(" and ")).join(", or ")
                    )));
                }
            }
            // A few quick retries: a reader waiting on a dead endpoint for the
            // default ~3 minutes would hang a mount's read that long.
            let retry = match access {
                Access::Serve => object_store::RetryConfig {
                    max_retries: 3,
                    retry_timeout: std::time::Duration::from_secs(20),
                    ..Default::default()
                },
                Access::Read { .. } => object_store::RetryConfig {
                    max_retries: 1,
                    retry_timeout: std::time::Duration::from_secs(3),
                    ..Default::default()
                },
            };
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            let plain_http = ["AWS_ENDPOINT", "AWS_ENDPOINT_URL"]
                .iter()
                .any(|v| std::env::var(v).is_ok_and(|e| e.starts_with("http://")));
            if plain_http {
                builder = builder.with_allow_http(true);
            }
            if matches!(access, Access::Read { .. }) {
                builder = builder.with_config(
                    object_store::aws::AmazonS3ConfigKey::Client(
                        object_store::ClientConfigKey::ConnectTimeout,
                    ),
                    "3s",
                );
            }
            let store = builder.build().map_err(|e| bad(&one_line(e)))?;
            Ok(Self {
                store: Arc::new(store),
                url: url.to_string(),
                prefix,
                node_default: false,
                endpoint,
            })
        } else if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad(&format!("the path must be absolute; expected {URL_FORMS}")));
            }
            match access {
                Access::Serve => {
                    std::fs::create_dir_all(dir).map_err(|e| bad(&format!("cannot create {dir}: {e}")))?
                }
                Access::Read { .. } if !FsPath::new(dir).is_dir() => {
                    return Err(bad(&format!("{dir} is not a directory on this host")))
                }
                Access::Read { .. } => {}
            }
            let store = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| bad(&one_line(e)))?
                .with_fsync(true);
            Ok(Self {
                store: Arc::new(store),
                url: url.to_string(),
                prefix: None,
                node_default: false,
                endpoint: String::new(),
            })
        } else {
            Err(bad(&format!("expected {URL_FORMS}")))
        }
    }

    /// The URL the tier was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Marks this tier as the node's default directory (no URL was given).
    pub fn node_default(mut self) -> Self {
        self.node_default = true;
        self
    }

    /// Whether this is the node's default directory, seen by no other node.
    pub fn is_node_default(&self) -> bool {
        self.node_default
    }

    /// Object key of pack `id`: `<prefix>/packs/<id as 16 hex digits>.pack`
    /// (no leading slash when there is no prefix).
    pub fn pack_key(&self, id: u64) -> String {
        format!("{}{id:016x}.pack", self.packs_dir())
    }

    /// A fresh object key for one upload of pack `id` by the mover:
    /// `<prefix>/packs/<id as 16 hex digits>-<random 16 hex digits>.pack`.
    pub fn move_key(&self, id: u64) -> String {
        format!("{}{id:016x}-{:016x}.pack", self.packs_dir(), fastrand::u64(..))
    }

    /// `<prefix>/packs/` or `packs/`.
    fn packs_dir(&self) -> String {
        match &self.prefix {
            Some(p) => format!("{p}/packs/"),
            None => "packs/".to_string(),
        }
    }

    /// Uploads the file at `path` as object `key`: one PUT below 16 MiB, a
    /// multipart upload (8 MiB parts, at most four in flight, the file read
    /// as parts go out) above. Afterwards checks with HEAD that the stored
    /// size equals the file size. Returns the size.
    pub async fn put_file(&self, key: &str, path: &FsPath) -> Result<u64, ObjectError> {
        let location = self.location("put", key)?;
        let local = |e: std::io::Error| self.failed("put", key, format!("reading {}: {e}", path.display()));
        let mut file = tokio::fs::File::open(path).await.map_err(local)?;
        let len = file.metadata().await.map_err(local)?.len();
        let sent = if len < SINGLE_PUT_MAX {
            let mut buf = Vec::with_capacity(len as usize);
            (&mut file)
                .take(SINGLE_PUT_MAX)
                .read_to_end(&mut buf)
                .await
                .map_err(local)?;
            let sent = buf.len() as u64;
            self.store
                .put_opts(&location, Bytes::from(buf).into(), PutOptions::default())
                .await
                .map_err(|e| self.map_err("put", key, e))?;
            sent
        } else {
            self.put_multipart(&location, key, path, file).await?
        };
        if sent != len {
            return Err(self.failed(
                "put",
                key,
                format!(
                    "{} changed size during the upload ({len} bytes, then {sent})",
                    path.display()
                ),
            ));
        }
        match self.size(key).await? {
            Some(stored) if stored == len => Ok(len),
            Some(stored) => Err(self.failed(
                "put",
                key,
                format!("the stored object has {stored} bytes, the file {len}"),
            )),
            None => Err(self.failed("put", key, "the object is missing right after the upload")),
        }
    }

    /// The multipart half of [`Self::put_file`]; returns the bytes sent.
    async fn put_multipart(
        &self,
        location: &Path,
        key: &str,
        path: &FsPath,
        mut file: tokio::fs::File,
    ) -> Result<u64, ObjectError> {
        let upload = self
            .store
            .put_multipart_opts(location, PutMultipartOptions::default())
            .await
            .map_err(|e| self.map_err("put", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut sent = 0u64;
        let fed: Result<(), ObjectError> = async {
            loop {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.map_err("put", key, e))?;
                let mut part = BytesMut::with_capacity(PART_SIZE);
                while part.len() < PART_SIZE {
                    let n = file
                        .read_buf(&mut part)
                        .await
                        .map_err(|e| self.failed("put", key, format!("reading {}: {e}", path.display())))?;
                    if n == 0 {
                        break;
                    }
                }
                let last = part.len() < PART_SIZE;
                sent += part.len() as u64;
                if !part.is_empty() {
                    writer.put(part.freeze());
                }
                if last {
                    return Ok(());
                }
            }
        }
        .await;
        match fed {
            Ok(()) => {
                writer.finish().await.map_err(|e| self.map_err("put", key, e))?;
                Ok(sent)
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key, error = %one_line(abort), "aborting a failed multipart upload failed");
                }
                Err(e)
            }
        }
    }

    /// Stores `data` as object `key` with one PUT.
    pub async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), ObjectError> {
        let location = self.location("put", key)?;
        self.store
            .put_opts(&location, data.into(), PutOptions::default())
            .await
            .map_err(|e| self.map_err("put", key, e))?;
        Ok(())
    }

    /// Reads byte ranges `(offset, len)` of object `key` and returns them
    /// concatenated in request order. Ranges less than 1 MiB apart are fetched
    /// with one request. A range that is not wholly inside the object is an
    /// error ([`ObjectError::Failed`]); empty ranges contribute nothing.
    pub async fn get_ranges(&self, key: &str, ranges: &[(u64, u32)]) -> Result<Vec<u8>, ObjectError> {
        let location = self.location("get", key)?;
        let mut wanted = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            let end = offset
                .checked_add(u64::from(len))
                .ok_or_else(|| self.failed("get", key, format!("range at {offset} overflows")))?;
            if len > 0 {
                wanted.push(offset..end);
            }
        }
        let merged = merge_ranges(&wanted);
        let fetched: Vec<Bytes> = futures::stream::iter(merged.iter().cloned())
            .map(|range| self.fetch_range(&location, key, range))
            .buffered(RANGE_FETCHES_IN_FLIGHT)
            .try_collect()
            .await?;
        let total = wanted.iter().map(|r| r.end - r.start).sum::<u64>();
        let mut out = Vec::with_capacity(total as usize);
        for range in &wanted {
            // The merged range that starts at or before `range` and, being a
            // cover of every wanted range, contains it.
            let i = merged.partition_point(|m| m.start <= range.start) - 1;
            let start = (range.start - merged[i].start) as usize;
            let end = (range.end - merged[i].start) as usize;
            out.extend_from_slice(&fetched[i][start..end]);
        }
        Ok(out)
    }

    /// Bytes `offset..offset + len` of object `key` with one request (no
    /// copy of what arrives); fails unless every byte came back.
    pub async fn get_range(&self, key: &str, offset: u64, len: u32) -> Result<Bytes, ObjectError> {
        let location = self.location("get", key)?;
        let end = offset
            .checked_add(u64::from(len))
            .ok_or_else(|| self.failed("get", key, format!("range at {offset} overflows")))?;
        self.fetch_range(&location, key, offset..end).await
    }

    /// One range read; fails unless every byte of `range` came back.
    async fn fetch_range(&self, location: &Path, key: &str, range: Range<u64>) -> Result<Bytes, ObjectError> {
        let options = GetOptions::new().with_range(Some(range.clone()));
        let result = self
            .store
            .get_opts(location, options)
            .await
            .map_err(|e| self.map_err("get", key, e))?;
        let size = result.meta.size;
        let bytes = result.bytes().await.map_err(|e| self.map_err("get", key, e))?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(self.failed(
                "get",
                key,
                format!(
                    "bytes {}..{} are past the end of the object ({size} bytes)",
                    range.start, range.end
                ),
            ));
        }
        Ok(bytes)
    }

    /// Streams the whole object `key` into `path` (created or truncated, then
    /// fsynced) without holding it in memory. Returns the number of bytes.
    pub async fn get_to_file(&self, key: &str, path: &FsPath) -> Result<u64, ObjectError> {
        let location = self.location("get", key)?;
        let result = self
            .store
            .get_opts(&location, GetOptions::default())
            .await
            .map_err(|e| self.map_err("get", key, e))?;
        let expected = result.meta.size;
        let local = |e: std::io::Error| self.failed("get", key, format!("writing {}: {e}", path.display()));
        let written = match result.payload {
            // Local tier: a plain file copy (copy_file_range on Linux).
            GetResultPayload::File(mut src, _) => {
                let dest = path.to_path_buf();
                let range = result.range;
                tokio::task::spawn_blocking(move || copy_range(&mut src, range, &dest))
                    .await
                    .map_err(|e| self.failed("get", key, e))?
                    .map_err(local)?
            }
            GetResultPayload::Stream(mut stream) => {
                let mut file = tokio::fs::File::create(path).await.map_err(local)?;
                let mut written = 0u64;
                while let Some(chunk) = stream.try_next().await.map_err(|e| self.map_err("get", key, e))? {
                    file.write_all(&chunk).await.map_err(local)?;
                    written += chunk.len() as u64;
                }
                file.sync_all().await.map_err(local)?;
                written
            }
        };
        if written != expected {
            return Err(self.failed(
                "get",
                key,
                format!("got {written} bytes of an object of {expected} bytes"),
            ));
        }
        Ok(written)
    }

    /// Size of object `key`, `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        let location = self.location("head", key)?;
        match self
            .store
            .get_opts(&location, GetOptions::new().with_head(true))
            .await
        {
            Ok(result) => Ok(Some(result.meta.size)),
            Err(e) if missing_object(&e) => Ok(None),
            Err(e) => Err(self.map_err("head", key, e)),
        }
    }

    /// Deletes object `key`; an absent object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let location = self.location("delete", key)?;
        let mut results = self
            .store
            .delete_stream(futures::stream::once(async { Ok(location) }).boxed());
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => {}
                Err(e) if missing_object(&e) => {}
                Err(e) => return Err(self.map_err("delete", key, e)),
            }
        }
        Ok(())
    }

    /// Every pack object under this tier's prefix as `(pack id, size)`, by
    /// id. Keys that are neither [`Self::pack_key`] nor [`Self::move_key`]
    /// names are ignored.
    pub async fn list_packs(&self) -> Result<Vec<(u64, u64)>, ObjectError> {
        Ok(self
            .list_pack_objects()
            .await?
            .into_iter()
            .map(|p| (p.id, p.size))
            .collect())
    }

    /// Every pack object under this tier's prefix with its size and
    /// modification time, sorted by pack id.
    pub async fn list_pack_objects(&self) -> Result<Vec<PackObject>, ObjectError> {
        let dir = self.packs_dir();
        let location = self.location("list", &dir)?;
        let mut listing = self.store.list(Some(&location));
        let mut packs = Vec::new();
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|e| self.map_err("list", &dir, e))?
        {
            let name = meta
                .location
                .as_ref()
                .strip_prefix(dir.as_str())
                .and_then(|n| n.strip_suffix(".pack"));
            if let Some(id) = name.and_then(pack_id_of) {
                packs.push(PackObject {
                    id,
                    key: meta.location.to_string(),
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
                });
            }
        }
        packs.sort_unstable_by_key(|p| p.id);
        Ok(packs)
    }

    /// `key` as an object_store path (`Failed` when it is not a valid key).
    fn location(&self, op: &'static str, key: &str) -> Result<Path, ObjectError> {
        Path::parse(key).map_err(|e| self.failed(op, key, format!("invalid key: {}", one_line(e))))
    }

    fn failed(&self, op: &'static str, key: &str, cause: impl Display) -> ObjectError {
        ObjectError::Failed {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            message: one_line(cause),
        }
    }

    /// `NotFound` only for a missing object that was to be read (see [`missing_object`]).
    fn map_err(&self, op: &'static str, key: &str, e: object_store::Error) -> ObjectError {
        if (op == "get" || op == "head") && missing_object(&e) {
            ObjectError::NotFound {
                url: self.url.clone(),
                key: key.to_string(),
            }
        } else if matches!(e, object_store::Error::NotFound { .. }) {
            self.failed(op, key, format!("the bucket does not exist ({})", one_line(e)))
        } else {
            self.failed(op, key, e)
        }
    }
}

/// Whether `e` says the object does not exist. S3 also answers requests into
/// a missing bucket with 404 (object_store's `NotFound`), which is a
/// misconfigured tier, not a missing object; the error body names it.
fn missing_object(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && !e.to_string().contains("NoSuchBucket")
}

/// Sorted, merged cover of `ranges`: ranges at most [`COALESCE_GAP`] apart
/// (or overlapping) become one.
fn merge_ranges(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(COALESCE_GAP) => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Copies `range` of `src` into a new file at `dest` and fsyncs it.
fn copy_range(src: &mut std::fs::File, range: Range<u64>, dest: &FsPath) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    src.seek(SeekFrom::Start(range.start))?;
    let mut out = std::fs::File::create(dest)?;
    let n = std::io::copy(&mut src.take(range.end - range.start), &mut out)?;
    out.sync_all()?;
    Ok(n)
}

/// An error (with its sources, as object_store formats them) on one line, an
/// S3 XML error body shortened to `Code: Message`.
fn one_line(e: impl Display) -> String {
    let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else {
        return text;
    };
    let end = text[start..]
        .find("</Error>")
        .map_or(text.len(), |i| start + i + "</Error>".len());
    let body = &text[start..end];
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let from = body.find(&open)? + open.len();
        let to = from + body[from..].find(&format!("</{name}>"))?;
        Some(body[from..to].trim().to_string())
    };
    let summary = match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => return text,
    };
    format!("{}{summary}{}", &text[..start], &text[end..])
}

/// The pack id in an object name below `packs/` without its `.pack`:
/// `<16 hex digits>` or `<16 hex digits>-<16 hex digits>`.
fn pack_id_of(name: &str) -> Option<u64> {
    let hex16 = |h: &str| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit());
    let (id, nonce) = match name.split_once('-') {
        Some((id, nonce)) => (id, Some(nonce)),
        None => (name, None),
    };
    if !hex16(id) || !nonce.is_none_or(hex16) {
        return None;
    }
    u64::from_str_radix(id, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_near_and_adjacent_ranges() {
        let m = merge_ranges(&[10..20, 0..10, 20..30, 5..8, (3 << 20)..(3 << 20) + 1, 31..40]);
        assert_eq!(m, vec![0..40, (3 << 20)..(3 << 20) + 1]);
        assert!(merge_ranges(&[]).is_empty());
    }

    #[test]
    fn one_line_errors() {
        assert_eq!(one_line("a\n  b\tc"), "a b c");
        let s3 = "GET x - 404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code>\
                  <Message>The specified bucket does not exist</Message><RequestId>r</RequestId></Error>";
        assert_eq!(
            one_line(s3),
            "GET x - 404 Not Found: NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(
            one_line("<Error>no code</Error> tail"),
            "<Error>no code</Error> tail"
        );
    }

    #[test]
    fn a_reader_opens_only_a_directory_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-here");
        let url = format!("file://{}", missing.display());
        let e = ObjectTier::for_reads(&url, "").unwrap_err();
        assert!(matches!(e, ObjectError::BadUrl(_)), "{e}");
        assert!(e.to_string().contains("is not a directory on this host"), "{e}");
        assert!(!missing.exists(), "a reader creates nothing");
        ObjectTier::from_url(&url).unwrap();
        assert!(missing.is_dir(), "a chunk server creates its directory");
        assert_eq!(ObjectTier::for_reads(&url, "").unwrap().url(), url);
    }

    #[test]
    fn pack_keys() {
        let dir = tempfile::tempdir().unwrap();
        let root = ObjectTier::from_url(&format!("file://{}", dir.path().display())).unwrap();
        assert_eq!(root.pack_key(0xab), "packs/00000000000000ab.pack");
        let mut prefixed = root.clone();
        prefixed.prefix = Some("a/b".into());
        assert_eq!(prefixed.pack_key(u64::MAX), "a/b/packs/ffffffffffffffff.pack");
        let (a, b) = (prefixed.move_key(0xab), prefixed.move_key(0xab));
        assert_ne!(a, b, "every upload of a pack gets its own key");
        for key in [a, b, prefixed.pack_key(0xab)] {
            let name = key
                .strip_prefix("a/b/packs/")
                .unwrap()
                .strip_suffix(".pack")
                .unwrap();
            assert_eq!(pack_id_of(name), Some(0xab), "{key}");
        }
        for bad in [
            "ab",
            "00000000000000ab-",
            "00000000000000ab-12",
            "00000000000000ag",
            "x-00000000000000ab",
        ] {
            assert_eq!(pack_id_of(bad), None, "{bad}");
        }
    }
}
