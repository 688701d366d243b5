//! What the raft crate's tests share.

use granary_raft::App;
use rocksdb::{WriteBatch, DB};

/// A key-value application: a command `key=value` stores value under key
/// and answers with the entry's index.
pub struct Kv;

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
