//! Tree encoding and the ingest pipeline: determinism, sensitivity to every
//! attribute, and a full round trip of awkward directories.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use granary_core::ingest::{
    ingest_dir, ChunkSink, DiscardSink, IngestError, IngestOptions, NewChunk, NoProgress, SinkError,
};
use granary_core::tree::{decode_object, EntryData, FileContent, Timestamp, TreeObject};
use granary_core::{ChunkId, ChunkRef, ChunkerConfig, Tree, TreeEntry, TreeError, TreeId};
use proptest::prelude::*;

fn tiny() -> IngestOptions {
    IngestOptions {
        chunker: ChunkerConfig::tiny(),
        threads: 2,
        block_size: 4096,
        ..IngestOptions::default()
    }
}

fn root_of(dir: &Path) -> TreeId {
    ingest_dir(dir, &tiny(), &DiscardSink, &NoProgress).unwrap().root
}

fn set_mtime(path: &Path, secs: u64) {
    let f = std::fs::File::options().read(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .unwrap();
}

/// A directory with nested dirs, an empty file and dir, a symlink, a
/// non-UTF-8 name, a multi-block file and a file whose chunk list spills.
fn awkward_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("a/small.txt"), b"hello granary\n").unwrap();
    std::fs::write(
        root.join("a/b/c/multi-block.bin"),
        common::random_bytes(1, 50_000),
    )
    .unwrap();
    // > 512 tiny chunks: the chunk list spills into its own object.
    std::fs::write(root.join("a/b/big.bin"), common::random_bytes(2, 400_000)).unwrap();
    std::fs::write(root.join(OsStr::from_bytes(b"caf\xe9-latin1")), b"non-utf8 name").unwrap();
    std::os::unix::fs::symlink("a/small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("../../outside/the/root", root.join("a/escape")).unwrap();
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    std::fs::set_permissions(root.join("a/small.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o700)).unwrap();
    set_mtime(&root.join("a/small.txt"), 1_600_000_000);
}

#[test]
fn awkward_directory_round_trips_exactly() {
    let src = tempfile::tempdir().unwrap();
    awkward_tree(src.path());
    let sink = common::MemSink::default();
    let out = ingest_dir(src.path(), &tiny(), &sink, &NoProgress).unwrap();
    assert_eq!(out.stats.files, 5);
    assert_eq!(out.stats.symlinks, 3);
    assert_eq!(out.stats.dirs, 4);
    let objects: HashMap<TreeId, Vec<u8>> = out.objects.iter().cloned().collect();
    assert_eq!(objects.len(), out.objects.len(), "objects are distinct");
    for (id, bytes) in &objects {
        assert_eq!(TreeId::of(bytes), *id);
        let obj = decode_object(bytes).unwrap();
        if let TreeObject::Tree(t) = obj {
            assert_eq!(&t.encode(), bytes, "canonical encoding");
        }
    }
    let spilled = objects
        .values()
        .any(|b| matches!(decode_object(b), Ok(TreeObject::ChunkList(_))));
    assert!(spilled, "the large file's chunk list spills");
    let dst = tempfile::tempdir().unwrap();
    let chunks = sink.chunks.into_inner().unwrap();
    common::materialize(out.root, &objects, &chunks, dst.path());
    assert_eq!(common::snapshot(dst.path()), common::snapshot(src.path()));
}

#[test]
fn empty_dataset_round_trips() {
    let src = tempfile::tempdir().unwrap();
    let out = ingest_dir(src.path(), &tiny(), &DiscardSink, &NoProgress).unwrap();
    assert_eq!(out.stats.files + out.stats.dirs, 0);
    assert_eq!(out.objects.len(), 1);
    assert!(Tree::decode(&out.objects[0].1).unwrap().entries().is_empty());
}

#[test]
fn tree_id_is_deterministic_and_sensitive_to_every_attribute() {
    let d = tempfile::tempdir().unwrap();
    awkward_tree(d.path());
    let base = root_of(d.path());
    assert_eq!(root_of(d.path()), base, "same directory, same id");
    // Same result with one thread and a different block size.
    let opts = IngestOptions {
        threads: 1,
        block_size: 1 << 20,
        ..tiny()
    };
    assert_eq!(
        ingest_dir(d.path(), &opts, &DiscardSink, &NoProgress)
            .unwrap()
            .root,
        base
    );

    let p = d.path().join("a/small.txt");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let after_mode = root_of(d.path());
    assert_ne!(after_mode, base, "mode");
    set_mtime(&p, 1_600_000_001);
    let after_mtime = root_of(d.path());
    assert_ne!(after_mtime, after_mode, "mtime");
    std::fs::write(&p, b"hello granarY\n").unwrap();
    set_mtime(&p, 1_600_000_001);
    let after_content = root_of(d.path());
    assert_ne!(after_content, after_mtime, "content");
    std::fs::rename(&p, d.path().join("a/small.TXT")).unwrap();
    assert_ne!(root_of(d.path()), after_content, "name");
}

#[test]
fn special_files_are_skipped_and_reported() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("keep"), b"x").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
    let out = ingest_dir(d.path(), &tiny(), &DiscardSink, &NoProgress).unwrap();
    assert_eq!(out.stats.files, 1);
    assert_eq!(out.skipped.len(), 1);
    assert!(out.skipped[0].path.ends_with("sock"));
    assert_eq!(out.skipped[0].reason, "socket");
}

#[test]
fn not_a_directory_and_missing_root_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    let err = ingest_dir(&f, &tiny(), &DiscardSink, &NoProgress).unwrap_err();
    assert!(matches!(err, IngestError::NotADirectory(_)));
    assert!(err.to_string().contains("is not a directory"), "{err}");
    let err = ingest_dir(&d.path().join("missing"), &tiny(), &DiscardSink, &NoProgress).unwrap_err();
    assert!(err.to_string().starts_with("cannot read '"), "{err}");
    assert!(err.to_string().contains("No such file"), "{err}");
}

/// Appends to the file it is reading the first time it sees one of its chunks.
struct GrowingSink;

impl ChunkSink for GrowingSink {
    fn chunk(&self, c: &NewChunk<'_>) -> Result<(), SinkError> {
        use std::io::Write;
        if c.path.ends_with("growing") {
            let mut f = std::fs::OpenOptions::new().append(true).open(c.path)?;
            f.write_all(b"more")?;
        }
        Ok(())
    }
}

#[test]
fn a_file_changing_while_read_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("growing"), common::random_bytes(3, 20_000)).unwrap();
    let err = ingest_dir(d.path(), &tiny(), &GrowingSink, &NoProgress).unwrap_err();
    assert!(matches!(err, IngestError::FileChanged { .. }), "{err}");
    assert!(err.to_string().contains("changed while it was being read"));
}

#[test]
fn each_distinct_chunk_reaches_the_sink_once() {
    let d = tempfile::tempdir().unwrap();
    let data = common::random_bytes(4, 30_000);
    for i in 0..5 {
        std::fs::write(d.path().join(format!("copy{i}")), &data).unwrap();
    }
    let sink = common::MemSink::default(); // panics on a second delivery
    let out = ingest_dir(d.path(), &tiny(), &sink, &NoProgress).unwrap();
    assert_eq!(out.stats.unique_bytes, 30_000);
    assert_eq!(out.stats.bytes, 150_000);
    assert_eq!(out.stats.unique_chunks, sink.chunks.lock().unwrap().len() as u64);
}

fn entry_strategy() -> impl Strategy<Value = TreeEntry> {
    let name = proptest::collection::vec(any::<u8>(), 1..20)
        .prop_filter("valid name", |n| granary_core::tree::validate_name(n).is_ok());
    let data = prop_oneof![
        proptest::collection::vec((any::<[u8; 32]>(), 1u32..100_000), 0..6).prop_map(|cs| {
            let chunks: Vec<ChunkRef> = cs
                .into_iter()
                .map(|(id, len)| ChunkRef {
                    id: ChunkId::from_bytes(id),
                    len,
                })
                .collect();
            EntryData::File {
                size: chunks.iter().map(|c| c.len as u64).sum(),
                content: FileContent::Inline(chunks),
            }
        }),
        (any::<[u8; 32]>(), 513u32..10_000, any::<u64>()).prop_map(|(id, chunks, size)| {
            EntryData::File {
                size,
                content: FileContent::Spilled {
                    list: TreeId::from_bytes(id),
                    chunks,
                },
            }
        }),
        any::<[u8; 32]>().prop_map(|id| EntryData::Dir {
            tree: TreeId::from_bytes(id)
        }),
        proptest::collection::vec(1u8..=255, 1..50).prop_map(|target| EntryData::Symlink { target }),
    ];
    (name, 0u32..=0o7777, any::<i64>(), 0u32..1_000_000_000, data).prop_map(
        |(name, mode, secs, nanos, data)| TreeEntry {
            name,
            mode,
            mtime: Timestamp { secs, nanos },
            data,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn tree_encoding_round_trips(entries in proptest::collection::vec(entry_strategy(), 0..12)) {
        let mut seen = std::collections::HashSet::new();
        let entries: Vec<TreeEntry> = entries.into_iter().filter(|e| seen.insert(e.name.clone())).collect();
        let tree = Tree::new(entries).unwrap();
        let bytes = tree.encode();
        let back = Tree::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &tree);
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn tree_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut b = bytes.clone();
        if b.len() >= 4 {
            let kind = 1 + b[3] % 2;
            b[0..4].copy_from_slice(&[b'G', b'T', 1, kind]);
        }
        let _ = decode_object(&b);
        let _ = decode_object(&bytes);
    }
}

#[test]
fn unsafe_names_are_rejected() {
    for bad in [&b""[..], b".", b"..", b"a/b", b"nul\0"] {
        let e = TreeEntry {
            name: bad.to_vec(),
            mode: 0o644,
            mtime: Timestamp::default(),
            data: EntryData::Dir {
                tree: TreeId::of(b"x"),
            },
        };
        assert!(
            matches!(Tree::new(vec![e]), Err(TreeError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}

/// A cache that vouches for every file it was given, whatever its state.
struct TrustingCache(HashMap<std::path::PathBuf, Vec<ChunkRef>>);

impl granary_core::ingest::FileCache for TrustingCache {
    fn lookup(&self, path: &Path, _meta: &std::fs::Metadata) -> Option<Vec<ChunkRef>> {
        self.0.get(path).cloned()
    }
}

#[test]
fn cached_files_are_not_read_and_records_are_returned() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a"), common::random_bytes(5, 20_000)).unwrap();
    std::fs::write(d.path().join("b"), common::random_bytes(6, 20_000)).unwrap();
    let opts = IngestOptions {
        record_files: true,
        ..tiny()
    };
    let first = ingest_dir(d.path(), &opts, &DiscardSink, &NoProgress).unwrap();
    assert_eq!(first.files.len(), 2);
    assert_eq!(first.stats.cached_files, 0);
    // Vouch for "a" with its recorded chunks: the result must be identical,
    // and the sink must see only b's chunks.
    let rec = first.files.iter().find(|f| f.path.ends_with("a")).unwrap();
    let cache = TrustingCache(HashMap::from([(rec.path.clone(), rec.chunks.clone())]));
    let opts = IngestOptions {
        file_cache: Some(std::sync::Arc::new(cache)),
        ..tiny()
    };
    let sink = common::MemSink::default();
    let second = ingest_dir(d.path(), &opts, &sink, &NoProgress).unwrap();
    assert_eq!(second.root, first.root);
    assert_eq!(second.stats.cached_files, 1);
    let seen = sink.chunks.lock().unwrap();
    assert!(
        rec.chunks.iter().all(|c| !seen.contains_key(&c.id)),
        "cached file was read"
    );
    assert!(!seen.is_empty());
}
