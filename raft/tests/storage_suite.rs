//! The RocksDB log store and state machine against openraft's own storage
//! test suite, plus crash-safety of snapshot installation.

mod common;

use common::Kv;
use futures::stream;
use granary_raft::store::{self, LogStore, StateMachineStore};
use granary_raft::TypeConfig;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::RaftStateMachine;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder, StorageError};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<Kv>, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore<Kv>), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = store::open(dir.path(), Kv)
            .await
            .map_err(|e| StorageError::write(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test]
async fn openraft_storage_suite() {
    Suite::test_all(Builder).await.unwrap();
}

type KvEntry = openraft::type_config::alias::EntryOf<TypeConfig>;

fn entry(index: u64, payload: openraft::type_config::alias::PayloadOf<TypeConfig>) -> KvEntry {
    Entry {
        log_id: LogId::new(LeaderId { term: 1, node_id: 1 }, index),
        payload,
    }
}

/// Applies `entries` the way openraft does (a stream, no client waiting).
async fn apply(sm: &mut StateMachineStore<Kv>, entries: Vec<KvEntry>) {
    let items = entries.into_iter().map(|e| Ok((e, None)));
    sm.apply(stream::iter(items)).await.unwrap();
}

fn kv(index: u64, k: &str, v: &str) -> KvEntry {
    entry(
        index,
        EntryPayload::Normal(granary_raft::Command(format!("{k}={v}").into_bytes())),
    )
}

/// Copies a snapshot into a receiving file of `to`, as the peer service does.
async fn receive(
    to: &StateMachineStore<Kv>,
    snapshot: store::Snapshot,
    damage: bool,
) -> (
    openraft::type_config::alias::SnapshotMetaOf<TypeConfig>,
    tokio::fs::File,
) {
    let mut bytes = Vec::new();
    let mut src = snapshot.snapshot;
    tokio::io::AsyncReadExt::read_to_end(&mut src, &mut bytes)
        .await
        .unwrap();
    if damage {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
    }
    let mut recv = to.snapshot_receiver().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut recv, &bytes)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::flush(&mut recv).await.unwrap();
    (snapshot.meta, recv)
}

#[tokio::test]
async fn snapshot_transfer_replaces_state_and_survives_a_crash_mid_install() {
    let a_dir = TempDir::new().unwrap();
    let (_, mut a) = store::open(a_dir.path(), Kv).await.unwrap();
    let members = Membership::new_with_defaults(vec![[1u64].into()], []);
    let mut entries = vec![entry(1, EntryPayload::Membership(members))];
    entries.extend((2..2000).map(|i| kv(i, &format!("key{i:05}"), &"v".repeat(100))));
    apply(&mut a, entries).await;
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let (a_at, a_digest) = a.digest().await.unwrap();
    assert_eq!(a_at.unwrap().index, 1999);

    // B has different state; install A's snapshot into it.
    let b_dir = TempDir::new().unwrap();
    {
        let (_, mut b) = store::open(b_dir.path(), Kv).await.unwrap();
        apply(&mut b, vec![kv(1, "stale", "x")]).await;
        let (meta, recv) = receive(&b, snap, false).await;
        let recv = b.check_received(recv, &meta).await.unwrap();
        b.install_snapshot(&meta, recv).await.unwrap();
        let (b_at, b_digest) = b.digest().await.unwrap();
        assert_eq!((b_at, b_digest), (a_at, a_digest));
        assert_eq!(b.applied_state().await.unwrap().0, a_at);
        assert_eq!(b.get_current_snapshot().await.unwrap().unwrap().meta, meta);
    }

    // Simulate a crash in the middle of loading: half-wiped state plus the marker.
    {
        let db = store::open_db(&b_dir.path().join("db"), &["kv"]).unwrap();
        let cf = db.cf_handle("kv").unwrap();
        db.delete_cf(cf, b"key00010").unwrap();
        db.put_cf(cf, b"garbage", b"x").unwrap();
        db.put_cf(db.cf_handle("sm_state").unwrap(), b"installing", b"1")
            .unwrap();
    }
    let (_, b) = store::open(b_dir.path(), Kv).await.unwrap();
    assert_eq!(
        b.digest().await.unwrap(),
        (a_at, a_digest),
        "reopening finishes the install"
    );
}

#[tokio::test]
async fn a_damaged_snapshot_transfer_is_refused() {
    let a_dir = TempDir::new().unwrap();
    let (_, mut a) = store::open(a_dir.path(), Kv).await.unwrap();
    apply(&mut a, vec![kv(1, "k", "v"), kv(2, "k2", "v2")]).await;
    let b_dir = TempDir::new().unwrap();
    let (_, mut b) = store::open(b_dir.path(), Kv).await.unwrap();
    apply(&mut b, vec![kv(1, "mine", "1")]).await;
    let before = b.digest().await.unwrap();

    // Refused on receipt, before openraft sees it...
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let (meta, recv) = receive(&b, snap, true).await;
    let err = b.check_received(recv, &meta).await.unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");

    // ...and by the install itself.
    let snap = a.get_current_snapshot().await.unwrap().unwrap();
    let (meta, recv) = receive(&b, snap, true).await;
    let err = b.install_snapshot(&meta, recv).await.unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(b.digest().await.unwrap(), before, "state unchanged");
}

#[tokio::test]
async fn a_snapshot_for_other_entries_is_refused_on_receipt() {
    let a_dir = TempDir::new().unwrap();
    let (_, mut a) = store::open(a_dir.path(), Kv).await.unwrap();
    apply(&mut a, vec![kv(1, "k", "v"), kv(2, "k2", "v2")]).await;
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let b_dir = TempDir::new().unwrap();
    let (_, b) = store::open(b_dir.path(), Kv).await.unwrap();
    let (mut meta, recv) = receive(&b, snap, false).await;
    meta.last_log_id = Some(LogId::new(LeaderId { term: 1, node_id: 1 }, 7));
    let err = b.check_received(recv, &meta).await.unwrap_err();
    assert!(err.to_string().contains("the leader announced"), "{err}");
}

/// A follower catching up gets AppendEntries of bounded size: the log
/// reader hands out at most `MAX_BATCH_BYTES` of entries (always one).
#[tokio::test]
async fn catch_up_batches_are_bounded_in_bytes() {
    use granary_raft::store::MAX_BATCH_BYTES;
    use openraft::storage::{RaftLogReader, RaftLogStorageExt};
    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = store::open(dir.path(), Kv).await.unwrap();
    let big = "x".repeat(MAX_BATCH_BYTES * 3 / 8); // two fit in one batch, not three
    let entries: Vec<KvEntry> = (1..=10).map(|i| kv(i, "k", &big)).collect();
    log.blocking_append(entries).await.unwrap();
    let batch = log.limited_get_log_entries(1, 11).await.unwrap();
    assert_eq!(batch.len(), 2, "3/8 + 3/8 of the limit fit, a third does not");
    assert_eq!(batch[0].log_id.index, 1);
    // The end bound holds, and one entry comes even when it alone is over.
    assert_eq!(log.limited_get_log_entries(4, 5).await.unwrap().len(), 1);
    let huge = "y".repeat(MAX_BATCH_BYTES + 1);
    log.blocking_append(vec![kv(11, "k", &huge)]).await.unwrap();
    let batch = log.limited_get_log_entries(11, 12).await.unwrap();
    assert_eq!(batch.len(), 1);
    // Small entries come all at once.
    let small: Vec<KvEntry> = (12..=100).map(|i| kv(i, "k", "v")).collect();
    log.blocking_append(small).await.unwrap();
    assert_eq!(log.limited_get_log_entries(12, 101).await.unwrap().len(), 89);
}
