//! The replicated state machine (openraft `RaftStateMachine`): applies
//! committed entries through the [`App`], builds and installs snapshots.

use std::io::{self, Seek};
use std::path::PathBuf;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, RaftSnapshotBuilder, StoredMembership};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use super::snapshot::{self, KEY_INSTALLING, KEY_LAST_APPLIED, KEY_MEMBERSHIP};
use super::syncer::Syncer;
use super::{blocking, cf, App, CF_SM};
use crate::{Response, TypeConfig};

/// A snapshot as openraft handles it: its meta and the open snapshot file.
pub type Snapshot = SnapshotOf<TypeConfig, tokio::fs::File>;

/// The state machine store; cheap to clone.
pub struct StateMachineStore<A> {
    inner: Arc<Inner<A>>,
}

impl<A> Clone for StateMachineStore<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<A> {
    db: Arc<DB>,
    app: A,
    snapshot_dir: PathBuf,
    /// Answers the clients of applied entries once the entries are durable.
    syncer: Syncer,
}

fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serialize(v).map_err(io::Error::other)
}

impl<A: App> StateMachineStore<A> {
    /// Opens the state machine, finishing a snapshot installation a crash interrupted.
    pub(crate) async fn open(db: Arc<DB>, snapshot_dir: PathBuf, app: A, syncer: Syncer) -> io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let inner = Arc::new(Inner {
            db,
            app,
            snapshot_dir,
            syncer,
        });
        let interrupted = inner
            .db
            .get_cf(cf(&inner.db, CF_SM), KEY_INSTALLING)
            .map_err(io::Error::other)?
            .is_some();
        if interrupted {
            tracing::warn!("a snapshot installation was interrupted; finishing it from the stored snapshot");
            let i = inner.clone();
            blocking(move || {
                snapshot::load(
                    &i.db,
                    i.app.column_families(),
                    &i.snapshot_dir.join(snapshot::CURRENT),
                )
            })
            .await?;
        }
        Ok(Self { inner })
    }

    /// The database, for the application's reads.
    pub fn db(&self) -> &Arc<DB> {
        &self.inner.db
    }

    /// The application.
    pub fn app(&self) -> &A {
        &self.inner.app
    }

    /// The last applied log id and a BLAKE3 digest of the application's
    /// state at that point, read from one consistent RocksDB snapshot.
    pub async fn digest(&self) -> io::Result<(Option<LogIdOf<TypeConfig>>, blake3::Hash)> {
        let i = self.inner.clone();
        blocking(move || {
            let snap = i.db.snapshot();
            let (last, _) = snapshot::applied_state(|k| snap.get_cf(cf(&i.db, CF_SM), k))?;
            let mut h = blake3::Hasher::new();
            for name in i.app.column_families() {
                h.update(name.as_bytes());
                for item in snap.iterator_cf(cf(&i.db, name), IteratorMode::Start) {
                    let (k, v) = item.map_err(io::Error::other)?;
                    h.update(&(k.len() as u64).to_le_bytes());
                    h.update(&k);
                    h.update(&(v.len() as u64).to_le_bytes());
                    h.update(&v);
                }
            }
            Ok((last, h.finalize()))
        })
        .await
    }

    /// The index of the entries the current snapshot covers, if there is one.
    pub fn snapshot_index(&self) -> Option<u64> {
        let path = self.inner.snapshot_dir.join(snapshot::CURRENT);
        let mut f = std::fs::File::open(&path).ok()?;
        let header = snapshot::read_header(&mut f, &path).ok()?;
        header.meta.last_log_id.map(|l| l.index)
    }

    /// A new file to receive a snapshot into: unnamed, so nothing is left
    /// behind if the transfer is abandoned.
    pub async fn snapshot_receiver(&self) -> io::Result<tokio::fs::File> {
        let dir = self.inner.snapshot_dir.clone();
        let file = blocking(move || tempfile::tempfile_in(dir)).await?;
        Ok(tokio::fs::File::from_std(file))
    }

    /// Checks a received snapshot file: intact (its checksum matches) and
    /// covering the entries the leader said it does.
    pub async fn check_received(
        &self,
        file: tokio::fs::File,
        meta: &SnapshotMetaOf<TypeConfig>,
    ) -> io::Result<tokio::fs::File> {
        let mut file = file.into_std().await;
        let label = self.inner.snapshot_dir.join(snapshot::RECEIVED);
        let expected = meta.last_log_id;
        let file = blocking(move || {
            snapshot::verify(&mut file, &label)?;
            let header = snapshot::read_header(&mut file, &label)?;
            if header.meta.last_log_id != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "received snapshot covers {:?}, the leader announced {expected:?}",
                        header.meta.last_log_id
                    ),
                ));
            }
            file.rewind()?;
            Ok(file)
        })
        .await?;
        Ok(tokio::fs::File::from_std(file))
    }
}

/// Applies `entries` in order, each in its own batch written before the
/// next is applied (so the application reads every earlier entry's effects).
fn apply_all<A: App>(i: &Inner<A>, entries: Vec<EntryOf<TypeConfig>>) -> io::Result<Vec<Response>> {
    let db = &i.db;
    let sm = cf(db, CF_SM);
    let mut responses = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut batch = WriteBatch::default();
        let response = match &entry.payload {
            EntryPayload::Blank => Response::default(),
            EntryPayload::Normal(cmd) => Response(i.app.apply(db, &mut batch, entry.log_id.index, &cmd.0)),
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                batch.put_cf(sm, KEY_MEMBERSHIP, encode(&stored)?);
                Response::default()
            }
        };
        batch.put_cf(sm, KEY_LAST_APPLIED, encode(&entry.log_id)?);
        // Unsynced: one sync covers the whole call (see `apply`).
        db.write_opt(batch, &WriteOptions::default())
            .map_err(|e| io::Error::other(format!("applying entry {}: {e}", entry.log_id)))?;
        responses.push(response);
    }
    Ok(responses)
}

impl<A: App> RaftStateMachine<TypeConfig> for StateMachineStore<A> {
    type SnapshotData = tokio::fs::File;
    type SnapshotBuilder = SnapshotBuilder<A>;

    async fn applied_state(
        &mut self,
    ) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        let db = &self.inner.db;
        snapshot::applied_state(|k| db.get_cf(cf(db, CF_SM), k))
    }

    async fn apply<Strm>(&mut self, mut stream: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + Send,
    {
        // openraft hands over every committed entry not yet applied at once,
        // so under load one call carries many entries. They are written
        // unsynced, and their clients are answered by the syncer after its
        // next WAL sync (shared with the log's appends) has made them durable.
        // Waiting for that sync here instead would stall applying behind
        // every fsync (measured: ~10% fewer commits/s at concurrency 64, far
        // worse on a loaded machine). Entries with no client waiting (all of
        // them on followers) need no sync: a crash loses only applied state
        // that is applied again from the log, which is durable.
        let mut entries = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = stream.next().await {
            let (entry, responder) = item?;
            entries.push(entry);
            responders.push(responder);
        }
        let i = self.inner.clone();
        let responses = blocking(move || apply_all(&i, entries)).await?;
        let replies: Vec<_> = responders
            .into_iter()
            .zip(responses)
            .filter_map(|(responder, response)| responder.map(|r| (r, response)))
            .collect();
        if !replies.is_empty() {
            self.inner.syncer.reply(replies)?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            inner: self.inner.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: tokio::fs::File,
    ) -> io::Result<()> {
        let mut file = snapshot.into_std().await;
        let i = self.inner.clone();
        let header =
            blocking(move || snapshot::install(&i.db, i.app.column_families(), &i.snapshot_dir, &mut file))
                .await?;
        if header.meta.last_log_id != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "received snapshot covers {:?}, expected {:?}",
                    header.meta.last_log_id, meta.last_log_id
                ),
            ));
        }
        tracing::info!(snapshot = %meta, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let path = self.inner.snapshot_dir.join(snapshot::CURRENT);
        let opened = blocking(move || {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let header = snapshot::read_header(&mut file, &path)?;
            file.rewind()?;
            Ok(Some((header, file)))
        })
        .await?;
        Ok(opened.map(|(header, file)| Snapshot {
            meta: header.meta,
            snapshot: tokio::fs::File::from_std(file),
        }))
    }
}

/// Builds snapshots from a consistent view of the state machine.
pub struct SnapshotBuilder<A> {
    inner: Arc<Inner<A>>,
}

impl<A: App> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<A> {
    type SnapshotData = tokio::fs::File;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let i = self.inner.clone();
        let (meta, file) = blocking(move || {
            let meta = snapshot::build(&i.db, i.app.column_families(), &i.snapshot_dir)?;
            let file = std::fs::File::open(i.snapshot_dir.join(snapshot::CURRENT))?;
            Ok::<_, io::Error>((meta, file))
        })
        .await?;
        tracing::info!(snapshot = %meta, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: tokio::fs::File::from_std(file),
        })
    }
}
