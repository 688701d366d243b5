//! The RocksDB log store and state machine against openraft's own storage
//! test suite, plus crash-safety of snapshot installation.

use granary_raft::store::{self, LogStore, StateMachineStore};
use granary_raft::{App, NodeId, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder, StorageError,
};
use rocksdb::{WriteBatch, DB};
use tempfile::TempDir;

/// A key-value application: a command `key=value` stores value under key.
struct Kv;

impl App for Kv {
    fn column_families(&self) -> &'static [&'static str] {
        &["kv"]
    }

    fn apply(&self, db: &DB, batch: &mut WriteBatch, index: u64, command: &[u8]) -> Vec<u8> {
        let cf = db.cf_handle("kv").unwrap();
        let text = String::from_utf8_lossy(command);
        let (k, v) = text.split_once('=').unwrap_or((&text, ""));
        batch.put_cf(cf, k.as_bytes(), v.as_bytes());
        index.to_be_bytes().to_vec()
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<Kv>, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore<Kv>), StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = store::open(dir.path(), Kv).await?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload,
    }
}

fn kv(index: u64, k: &str, v: &str) -> Entry<TypeConfig> {
    entry(
        index,
        EntryPayload::Normal(granary_raft::Command(format!("{k}={v}").into_bytes())),
    )
}

#[tokio::test]
async fn snapshot_transfer_replaces_state_and_survives_a_crash_mid_install() {
    let a_dir = TempDir::new().unwrap();
    let (_, mut a) = store::open(a_dir.path(), Kv).await.unwrap();
    let members = Membership::new(vec![[1u64].into()], None);
    let mut entries = vec![entry(1, EntryPayload::Membership(members))];
    entries.extend((2..2000).map(|i| kv(i, &format!("key{i:05}"), &"v".repeat(100))));
    let responses = a.apply(entries).await.unwrap();
    assert_eq!(responses.len(), 1999);
    assert_eq!(responses[5].0, 6u64.to_be_bytes(), "response of entry 6");
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let (a_at, a_digest) = a.digest().await.unwrap();
    assert_eq!(a_at.unwrap().index, 1999);

    // B has different state; install A's snapshot into it.
    let b_dir = TempDir::new().unwrap();
    {
        let (_, mut b) = store::open(b_dir.path(), Kv).await.unwrap();
        b.apply(vec![kv(1, "stale", "x")]).await.unwrap();
        let mut recv = b.begin_receiving_snapshot().await.unwrap();
        let mut src = snap.snapshot;
        tokio::io::copy(&mut src, &mut *recv).await.unwrap();
        b.install_snapshot(&snap.meta, recv).await.unwrap();
        let (b_at, b_digest) = b.digest().await.unwrap();
        assert_eq!((b_at, b_digest), (a_at, a_digest));
        assert_eq!(b.applied_state().await.unwrap().0, a_at);
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
    a.apply(vec![kv(1, "k", "v"), kv(2, "k2", "v2")]).await.unwrap();
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let b_dir = TempDir::new().unwrap();
    let (_, mut b) = store::open(b_dir.path(), Kv).await.unwrap();
    b.apply(vec![kv(1, "mine", "1")]).await.unwrap();
    let before = b.digest().await.unwrap();
    let mut recv = b.begin_receiving_snapshot().await.unwrap();
    let mut bytes = Vec::new();
    let mut src = snap.snapshot;
    tokio::io::AsyncReadExt::read_to_end(&mut src, &mut bytes)
        .await
        .unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &bytes)
        .await
        .unwrap();
    let err = b.install_snapshot(&snap.meta, recv).await.unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(b.digest().await.unwrap(), before, "state unchanged");
}
