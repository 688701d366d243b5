//! Group commit: one thread that makes the database's writes durable with
//! one WAL sync shared by everyone waiting.
//!
//! The log's appends and the state machine's applies are written without
//! `sync` (fast, and readable at once) and handed here: the syncer takes
//! every request that is waiting, runs one `flush_wal(true)`, and then
//! reports the appended entries flushed to openraft (`IOFlushed`) and
//! answers the clients of the applied ones. While one fsync runs, the next
//! requests queue up behind it, so under load one fsync covers many appends
//! and applies instead of one each. Both go to the same WAL, so one sync
//! covers both.

use std::io;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Weak};

use openraft::storage::{ApplyResponder, IOFlushed};
use rocksdb::DB;

use crate::{Response, TypeConfig};

/// A handle to the syncer thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct Syncer {
    tx: Sender<Request>,
}

/// Something waiting for the WAL to be synced.
enum Request {
    /// Entries openraft appended to the log.
    Flushed(IOFlushed<TypeConfig>),
    /// Applied entries whose clients wait for their replies.
    Reply(Vec<(ApplyResponder<TypeConfig>, Response)>),
}

fn stopped() -> io::Error {
    io::Error::other("the log syncer stopped")
}

impl Syncer {
    /// Starts the syncer thread for `db`.
    ///
    /// The thread holds the database weakly: it may outlive the stores (it
    /// ends only when every handle is gone), and the database must close
    /// when its owners drop it, not whenever this thread happens to finish —
    /// RocksDB closing while the process exits aborts it.
    pub(crate) fn start(db: &Arc<DB>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let db = Arc::downgrade(db);
        std::thread::Builder::new()
            .name("granary-log-sync".into())
            .spawn(move || run(db, rx))
            .expect("spawn the log syncer thread");
        Self { tx }
    }

    /// Reports `callback` flushed after the next WAL sync.
    pub(crate) fn flushed(&self, callback: IOFlushed<TypeConfig>) -> io::Result<()> {
        self.tx.send(Request::Flushed(callback)).map_err(|e| {
            if let Request::Flushed(callback) = e.0 {
                callback.io_completed(Err(stopped()));
            }
            stopped()
        })
    }

    /// Answers the clients of applied entries after the next WAL sync has
    /// made the entries' effects durable. If the sync fails they get no
    /// answer (openraft reports the dropped responder to them as an error).
    pub(crate) fn reply(&self, replies: Vec<(ApplyResponder<TypeConfig>, Response)>) -> io::Result<()> {
        self.tx.send(Request::Reply(replies)).map_err(|_| stopped())
    }
}

/// Syncs the WAL for every waiting request at once, then completes them.
fn run(db: Weak<DB>, rx: Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the log database is closed".to_string()),
        };
        for request in waiting {
            match (request, &result) {
                (Request::Flushed(callback), Ok(())) => callback.io_completed(Ok(())),
                (Request::Flushed(callback), Err(e)) => {
                    callback.io_completed(Err(io::Error::other(e.clone())))
                }
                (Request::Reply(replies), Ok(())) => {
                    replies.into_iter().for_each(|(r, response)| r.send(response))
                }
                (Request::Reply(replies), Err(e)) => tracing::error!(
                    "{} applied writes are not answered: the WAL sync failed: {e}",
                    replies.len()
                ),
            }
        }
    }
}
