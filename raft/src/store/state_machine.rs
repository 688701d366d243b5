//! The replicated state machine (openraft `RaftStateMachine`): applies
//! committed entries through the [`App`], builds and installs snapshots.

use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use super::snapshot::{self, KEY_INSTALLING, KEY_LAST_APPLIED, KEY_MEMBERSHIP};
use super::{blocking, cf, App, CF_SM};
use crate::{NodeId, Response, TypeConfig};

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
}

fn sm_read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::error(e.to_string())).into()
}

fn sm_write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snapshot_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

impl<A: App> StateMachineStore<A> {
    /// Opens the state machine, finishing a snapshot installation a crash interrupted.
    pub(crate) async fn open(
        db: Arc<DB>,
        snapshot_dir: PathBuf,
        app: A,
    ) -> Result<Self, StorageError<NodeId>> {
        std::fs::create_dir_all(&snapshot_dir).map_err(snapshot_err)?;
        let inner = Arc::new(Inner {
            db,
            app,
            snapshot_dir,
        });
        let interrupted = inner
            .db
            .get_cf(cf(&inner.db, CF_SM), KEY_INSTALLING)
            .map_err(sm_read_err)?
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
            .await
            .map_err(snapshot_err)?;
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
    pub async fn digest(&self) -> Result<(Option<LogId<NodeId>>, blake3::Hash), StorageError<NodeId>> {
        let i = self.inner.clone();
        blocking(move || {
            let snap = i.db.snapshot();
            let (last, _) =
                snapshot::applied_state(|k| snap.get_cf(cf(&i.db, CF_SM), k)).map_err(sm_read_err)?;
            let mut h = blake3::Hasher::new();
            for name in i.app.column_families() {
                h.update(name.as_bytes());
                for item in snap.iterator_cf(cf(&i.db, name), IteratorMode::Start) {
                    let (k, v) = item.map_err(sm_read_err)?;
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
}

impl<A: App> RaftStateMachine<TypeConfig> for StateMachineStore<A> {
    type SnapshotBuilder = SnapshotBuilder<A>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let db = &self.inner.db;
        snapshot::applied_state(|k| db.get_cf(cf(db, CF_SM), k)).map_err(sm_read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let i = self.inner.clone();
        blocking(move || {
            let db = &i.db;
            let sm = cf(db, CF_SM);
            let mut responses = Vec::with_capacity(entries.len());
            for entry in entries {
                let mut batch = WriteBatch::default();
                let response = match &entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(cmd) => {
                        Response(i.app.apply(db, &mut batch, entry.log_id.index, &cmd.0))
                    }
                    EntryPayload::Membership(m) => {
                        let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                        batch.put_cf(
                            sm,
                            KEY_MEMBERSHIP,
                            bincode::serialize(&stored).map_err(sm_write_err)?,
                        );
                        Response::default()
                    }
                };
                batch.put_cf(
                    sm,
                    KEY_LAST_APPLIED,
                    bincode::serialize(&entry.log_id).map_err(sm_write_err)?,
                );
                db.write_opt(batch, &WriteOptions::default())
                    .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
                responses.push(response);
            }
            // Not synced here: openraft applies one entry per call under load,
            // and a sync per call capped the whole cluster at one fsync per
            // commit. The writer waits for a shared WAL sync instead before its
            // client is answered (`RaftNode::write_as_leader`), and an apply a
            // crash loses is applied again from the log, which is durable.
            Ok(responses)
        })
        .await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            inner: self.inner.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        // An unnamed temporary file: nothing is left behind if the transfer is abandoned.
        let f = tempfile::tempfile_in(&self.inner.snapshot_dir).map_err(snapshot_err)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &openraft::SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut file = snapshot.into_std().await;
        let i = self.inner.clone();
        let header =
            blocking(move || snapshot::install(&i.db, i.app.column_families(), &i.snapshot_dir, &mut file))
                .await
                .map_err(snapshot_err)?;
        if header.meta.last_log_id != meta.last_log_id {
            return Err(snapshot_err(format!(
                "received snapshot covers {:?}, expected {:?}",
                header.meta.last_log_id, meta.last_log_id
            )));
        }
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let path = self.inner.snapshot_dir.join(snapshot::CURRENT);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snapshot_err(e)),
        };
        let header = snapshot::read_header(&mut file, &path).map_err(snapshot_err)?;
        use std::io::Seek;
        file.rewind().map_err(snapshot_err)?;
        Ok(Some(Snapshot {
            meta: header.meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

/// Builds snapshots from a consistent view of the state machine.
pub struct SnapshotBuilder<A> {
    inner: Arc<Inner<A>>,
}

impl<A: App> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<A> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let i = self.inner.clone();
        let meta = blocking(move || snapshot::build(&i.db, i.app.column_families(), &i.snapshot_dir))
            .await
            .map_err(snapshot_err)?;
        let file =
            std::fs::File::open(self.inner.snapshot_dir.join(snapshot::CURRENT)).map_err(snapshot_err)?;
        tracing::info!(snapshot = %meta.snapshot_id, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}
