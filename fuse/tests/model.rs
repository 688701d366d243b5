//! The filesystem logic ([`GranaryFs`]) against a reference model, without FUSE.
//!
//! A random version (directories, files cut into random chunks, symlinks) is
//! built both as a plain map of path -> content (the model) and as trees and
//! chunks in a [`MemSource`]. The filesystem must list, look up, stat,
//! readlink and read (random offsets and lengths, across chunk boundaries,
//! at and past EOF) exactly what the model holds, through a memory and a disk
//! cache small enough to evict all the time, whose size caps must hold after
//! every operation. Further tests cover corrupt cache files, a warm disk
//! cache, readahead on sequential and random reads, fetch failures and
//! concurrent readers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use granary_core::tree::{file_content, EntryData, Timestamp};
use granary_core::{Tree, TreeEntry, TreeId};
use granary_fuse::cache::Want;
use granary_fuse::fs::{Kind, ROOT_INO};
use granary_fuse::{ChunkCache, DiskCache, FsConfig, FsError, GranaryFs, MemSource, Source};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum M {
    Dir(u32),
    File(Vec<u8>, u32),
    Link(Vec<u8>),
}

/// A random version: path ("a/b") -> node, every parent present.
fn model(seed: u64, max_entries: usize) -> BTreeMap<String, M> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut m = BTreeMap::new();
    let mut dirs = vec![String::new()];
    for _ in 0..rng.usize(1..=max_entries) {
        let parent = dirs[rng.usize(..dirs.len())].clone();
        let name = format!(
            "{}{}",
            ["a", "b", "c", "dd", "e e", "f.bin"][rng.usize(..6)],
            rng.u8(..20)
        );
        let path = if parent.is_empty() {
            name
        } else {
            format!("{parent}/{name}")
        };
        if m.contains_key(&path) {
            continue;
        }
        let node = match rng.u8(..10) {
            0..=2 => {
                dirs.push(path.clone());
                M::Dir([0o755, 0o700, 0o555][rng.usize(..3)])
            }
            3 => M::Link(format!("../target{}", rng.u16(..)).into_bytes()),
            _ => {
                let len = match rng.u8(..4) {
                    0 => rng.usize(..3),
                    1 => rng.usize(..300),
                    _ => rng.usize(..5000),
                };
                let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                M::File(data, [0o644, 0o600, 0o755, 0o444][rng.usize(..4)])
            }
        };
        m.insert(path, node);
    }
    m
}

fn mtime(path: &str) -> Timestamp {
    Timestamp {
        secs: 1_600_000_000 + path.len() as i64,
        nanos: 123,
    }
}

/// Builds the trees and chunks of directory `dir` of the model; returns its tree id.
fn build_dir(src: &mut MemSource, m: &BTreeMap<String, M>, dir: &str, rng: &mut fastrand::Rng) -> TreeId {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut entries = Vec::new();
    for (path, node) in m.range(prefix.clone()..) {
        if !path.starts_with(&prefix) {
            break;
        }
        let name = &path[prefix.len()..];
        if name.contains('/') {
            continue;
        }
        let (mode, data) = match node {
            M::Dir(mode) => (
                *mode,
                EntryData::Dir {
                    tree: build_dir(src, m, path, rng),
                },
            ),
            M::Link(t) => (0o777, EntryData::Symlink { target: t.clone() }),
            M::File(bytes, mode) => {
                let mut chunks = Vec::new();
                let mut pos = 0;
                while pos < bytes.len() {
                    let n = rng.usize(1..=700).min(bytes.len() - pos);
                    chunks.push(src.add_chunk(&bytes[pos..pos + n]));
                    pos += n;
                }
                let (content, spilled) = file_content(chunks.clone());
                if let Some((id, _)) = spilled {
                    src.lists.insert(id, chunks);
                }
                (
                    *mode,
                    EntryData::File {
                        size: bytes.len() as u64,
                        content,
                    },
                )
            }
        };
        entries.push(TreeEntry {
            name: name.as_bytes().to_vec(),
            mode,
            mtime: mtime(path),
            data,
        });
    }
    src.add_tree(Tree::new(entries).expect("valid tree"))
}

fn source_of(m: &BTreeMap<String, M>, seed: u64) -> MemSource {
    let mut src = MemSource::default();
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    src.root = build_dir(&mut src, m, "", &mut rng);
    src
}

/// Bytes of the disk cache's segment files, as `ls` would add them up.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir.join("segments-v2")) else {
        return 0;
    };
    rd.flatten().map(|f| f.metadata().unwrap().len()).sum()
}

/// Where the disk cache keeps chunk `id`: its segment file and the offset of its bytes.
fn record_of(disk: &DiskCache, id: &granary_core::ChunkId) -> (std::path::PathBuf, u64, u32) {
    let (_, path, off, len) = disk
        .records()
        .into_iter()
        .find(|r| r.0 == *id)
        .expect("chunk is cached");
    (path, off, len)
}

/// Overwrites `bytes` at `off` of `path`.
fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn mount(src: MemSource, mem: u64, dir: &Path, disk: u64, cfg: FsConfig) -> (Arc<GranaryFs>, Arc<MemSource>) {
    let src = Arc::new(src);
    let cache = ChunkCache::new(mem, Some(DiskCache::open(dir, disk).unwrap()));
    let dyn_src: Arc<dyn Source> = src.clone();
    (GranaryFs::new(dyn_src, cache, cfg), src)
}

/// Walks the filesystem: path -> (ino, attr kind, size, perm).
async fn walk(fs: &GranaryFs) -> BTreeMap<String, (u64, Kind, u64, u16)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((ino, path)) = stack.pop() {
        for (name, a) in fs.readdir(ino).await.unwrap() {
            let name = String::from_utf8(name).unwrap();
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}/{name}")
            };
            let looked = fs.lookup(ino, name.as_bytes()).await.unwrap();
            assert_eq!(looked, a, "lookup and readdir disagree on {p}");
            assert_eq!(fs.getattr(a.ino).await.unwrap(), a);
            assert_eq!(a.mtime, mtime(&p));
            if a.kind == Kind::Dir {
                assert_eq!(fs.parent_of(a.ino), ino);
                stack.push((a.ino, p.clone()));
            }
            out.insert(p, (a.ino, a.kind, a.size, a.perm));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn filesystem_matches_model(seed in any::<u64>(), reads in prop::collection::vec((any::<u64>(), 0u32..9000), 1..40)) {
        let m = model(seed, 40);
        let tmp = tempfile::tempdir().unwrap();
        let disk_cap = 6000;
        let (fs, _src) = mount(source_of(&m, seed), 3000, tmp.path(), disk_cap, FsConfig::default());
        rt().block_on(async {
            let seen = walk(&fs).await;
            let names: Vec<&String> = seen.keys().collect();
            let want: Vec<&String> = m.keys().collect();
            assert_eq!(names, want);
            for (path, node) in &m {
                let (ino, kind, size, perm) = seen[path];
                match node {
                    M::Dir(mode) => assert_eq!((kind, perm), (Kind::Dir, *mode as u16), "{path}"),
                    M::Link(t) => {
                        assert_eq!((kind, size), (Kind::Symlink, t.len() as u64), "{path}");
                        assert_eq!(&fs.readlink(ino).await.unwrap(), t);
                        assert!(matches!(fs.open(ino).await, Err(FsError::Invalid(_))));
                    }
                    M::File(data, mode) => {
                        assert_eq!((kind, size, perm), (Kind::File, data.len() as u64, *mode as u16), "{path}");
                        assert!(matches!(fs.readdir(ino).await, Err(FsError::NotDir)));
                        let fh = fs.open(ino).await.unwrap();
                        for (off, len) in &reads {
                            let off = off % (data.len() as u64 + 100);
                            let got = fs.read(fh, off, *len).await.unwrap();
                            let from = (off as usize).min(data.len());
                            let to = (from + *len as usize).min(data.len());
                            assert_eq!(got, &data[from..to], "{path} at {off}+{len}");
                            let (used, _) = fs.cache().disk().unwrap().usage();
                            assert!(used <= disk_cap, "disk cache over its cap");
                        }
                        // Sequential reads of the whole file in odd sizes.
                        let mut whole = Vec::new();
                        while whole.len() < data.len() {
                            let got = fs.read(fh, whole.len() as u64, 333).await.unwrap();
                            assert!(!got.is_empty());
                            whole.extend(got);
                        }
                        assert_eq!(&whole, data);
                        assert!(fs.read(fh, data.len() as u64, 10).await.unwrap().is_empty());
                        fs.release(fh);
                    }
                }
            }
            fs.cache().flush().await;
            let on_disk = disk_bytes(tmp.path());
            assert!(on_disk <= disk_cap);
            assert_eq!(fs.cache().disk().unwrap().usage().0, on_disk);
            assert!(matches!(fs.lookup(ROOT_INO, b"no-such-name").await, Err(FsError::NotFound)));
            assert!(matches!(fs.open(ROOT_INO).await, Err(FsError::IsDir)));
            assert_eq!(fs.open_handles(), 0);
            assert_eq!(fs.stats().snapshot().corrupt, 0);
            // Inode numbers are a function of the version: a second mount agrees.
            let tmp2 = tempfile::tempdir().unwrap();
            let (fs2, _) = mount(source_of(&m, seed), 1 << 20, tmp2.path(), 1 << 20, FsConfig::default());
            assert_eq!(walk(&fs2).await, seen);
        });
    }
}

/// One file of `len` random bytes in chunks of `chunk` bytes.
fn one_file(len: usize, chunk: usize) -> (MemSource, Vec<u8>) {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    let mut src = MemSource::default();
    let chunks: Vec<_> = data.chunks(chunk).map(|c| src.add_chunk(c)).collect();
    let (content, spilled) = file_content(chunks.clone());
    if let Some((id, _)) = spilled {
        src.lists.insert(id, chunks);
    }
    let entry = TreeEntry {
        name: b"f".to_vec(),
        mode: 0o644,
        mtime: Timestamp::default(),
        data: EntryData::File {
            size: len as u64,
            content,
        },
    };
    src.root = src.add_tree(Tree::new(vec![entry]).unwrap());
    (src, data)
}

#[test]
fn corrupt_disk_cache_file_is_deleted_and_refetched() {
    let (src, data) = one_file(50_000, 4096);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, src) = mount(src, 0, tmp.path(), 1 << 20, FsConfig::default());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let fh = fs.open(ino).await.unwrap();
        assert_eq!(fs.read(fh, 0, 60_000).await.unwrap(), data);
        let fetched = src.chunks_fetched.load(Ordering::Relaxed);
        assert_eq!(fetched, 13);
        fs.cache().flush().await;
        // Damage one cached chunk (one bit flipped) and zero another's bytes.
        let chunks = fs.chunks_of(ino).await.unwrap();
        let disk = fs.cache().disk().unwrap();
        let (p0, off0, _) = record_of(disk, &chunks[0].id);
        patch(&p0, off0 + 7, &[data[7] ^ 1]);
        let (p5, off5, len5) = record_of(disk, &chunks[5].id);
        patch(&p5, off5, &vec![0u8; len5 as usize]);
        assert_eq!(fs.read(fh, 0, 60_000).await.unwrap(), data);
        let s = fs.stats().snapshot();
        assert_eq!(s.corrupt, 2, "{s:?}");
        assert_eq!(src.chunks_fetched.load(Ordering::Relaxed), fetched + 2);
        fs.cache().flush().await;
        let (p, off, len) = record_of(disk, &chunks[0].id);
        assert_ne!(
            (&p, off),
            (&p0, off0),
            "refetched chunk is cached again, elsewhere"
        );
        let mut again = vec![0u8; len as usize];
        {
            use std::os::unix::fs::FileExt;
            std::fs::File::open(&p)
                .unwrap()
                .read_exact_at(&mut again, off)
                .unwrap();
        }
        assert_eq!(again, &data[..4096]);
        // A new process over the directory does not serve the damaged records either.
        drop(fs);
        let (fs, src) = mount(
            one_file(50_000, 4096).0,
            0,
            tmp.path(),
            1 << 20,
            FsConfig::default(),
        );
        let fh = fs
            .open(fs.lookup(ROOT_INO, b"f").await.unwrap().ino)
            .await
            .unwrap();
        assert_eq!(fs.read(fh, 0, 60_000).await.unwrap(), data);
        assert_eq!(src.chunks_fetched.load(Ordering::Relaxed), 0);
        assert_eq!(
            fs.stats().snapshot().corrupt,
            0,
            "dead records are skipped, not re-reported"
        );
    });
}

#[test]
fn warm_disk_cache_serves_everything_without_fetching() {
    let (src, data) = one_file(300_000, 1000);
    let tmp = tempfile::tempdir().unwrap();
    let r = rt();
    r.block_on(async {
        let (fs, src) = mount(src, 1 << 20, tmp.path(), 1 << 20, FsConfig::default());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let fh = fs.open(ino).await.unwrap();
        assert_eq!(fs.read(fh, 0, 400_000).await.unwrap(), data);
        assert_eq!(src.chunks_fetched.load(Ordering::Relaxed), 300);
        fs.cache().flush().await;
    });
    // A new process: fresh memory cache over the same directory.
    let (src2, _) = one_file(300_000, 1000);
    r.block_on(async {
        let (fs, src) = mount(src2, 1 << 20, tmp.path(), 1 << 20, FsConfig::default());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let fh = fs.open(ino).await.unwrap();
        assert_eq!(fs.read(fh, 0, 400_000).await.unwrap(), data);
        assert_eq!(src.fetch_calls.load(Ordering::Relaxed), 0);
        let mut s = fs.stats().snapshot();
        assert_eq!((s.bytes_fetched, s.disk_hits), (0, 300), "{s:?}");
        // Disk hits handed to a waiting read are not copied into memory.
        fs.cache().fill(&mut s);
        assert_eq!(s.mem_bytes, 0, "{s:?}");
    });
}

#[test]
fn local_reads_are_not_copied_to_the_disk_cache_except_by_prefetch() {
    let (src, data) = one_file(300_000, 1000);
    src.local.store(true, Ordering::Relaxed);
    let src: Arc<dyn Source> = Arc::new(src);
    let r = rt();
    // A mount reads chunks from a chunk server's disk on this host: they
    // are counted as local and the disk cache stays empty.
    let tmp = tempfile::tempdir().unwrap();
    r.block_on(async {
        let cache = ChunkCache::new(1 << 20, Some(DiskCache::open(tmp.path(), 1 << 20).unwrap()));
        let fs = GranaryFs::new(src.clone(), cache.clone(), FsConfig::default());
        let fh = fs
            .open(fs.lookup(ROOT_INO, b"f").await.unwrap().ino)
            .await
            .unwrap();
        assert_eq!(fs.read(fh, 0, 400_000).await.unwrap(), data);
        cache.flush().await;
        let s = fs.stats().snapshot();
        assert_eq!((s.bytes_fetched, s.local_bytes), (300_000, 300_000), "{s:?}");
        assert_eq!(cache.disk().unwrap().usage().0, 0);
        cache.close().await;
    });
    // `granary prefetch`'s cache keeps them: that is what it is for.
    let tmp = tempfile::tempdir().unwrap();
    r.block_on(async {
        let cache = ChunkCache::prefetching(0, DiskCache::open(tmp.path(), 1 << 20).unwrap());
        let fs = GranaryFs::new(src.clone(), cache.clone(), FsConfig::default());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let chunks = fs.chunks_of(ino).await.unwrap();
        let stats = Arc::default();
        cache
            .get_many(&src, &chunks, Want::Prefetch, &stats)
            .await
            .unwrap();
        cache.flush().await;
        assert!(chunks.iter().all(|c| cache.is_cached(&c.id)));
        assert!(cache.disk().unwrap().usage().0 >= 300_000);
        cache.close().await;
    });
}

#[test]
fn chunks_readahead_takes_from_disk_stay_in_memory_only_until_read() {
    let (src, data) = one_file(300_000, 1000);
    let tmp = tempfile::tempdir().unwrap();
    let r = rt();
    r.block_on(async {
        let (fs, _) = mount(src, 1 << 20, tmp.path(), 1 << 20, ra_config());
        let fh = fs
            .open(fs.lookup(ROOT_INO, b"f").await.unwrap().ino)
            .await
            .unwrap();
        assert_eq!(fs.read(fh, 0, 400_000).await.unwrap(), data);
        fs.cache().close().await;
    });
    // A fresh mount on the warm disk cache reads the file sequentially:
    // readahead stages the next chunks from disk, each read drops what it took.
    let (src2, _) = one_file(300_000, 1000);
    r.block_on(async {
        let (fs, src) = mount(src2, 1 << 20, tmp.path(), 1 << 20, ra_config());
        let fh = fs
            .open(fs.lookup(ROOT_INO, b"f").await.unwrap().ino)
            .await
            .unwrap();
        let mut whole = Vec::new();
        while whole.len() < data.len() {
            whole.extend(fs.read(fh, whole.len() as u64, 1000).await.unwrap());
        }
        assert_eq!(whole, data);
        assert_eq!(src.fetch_calls.load(Ordering::Relaxed), 0);
        let mut s = fs.stats().snapshot();
        assert!(
            s.mem_hits > 100,
            "readahead staged chunks the reads found in memory: {s:?}"
        );
        fs.cache().fill(&mut s);
        // Staged chunks are gone once read (before, all 300 stayed: 300,000 bytes).
        assert_eq!(s.mem_bytes, 0, "{s:?}");
    });
}

#[test]
fn fetched_chunks_stay_in_memory_only_until_read_when_a_disk_cache_exists() {
    // 50 chunks of 1,000 bytes, read whole with a 1 MiB memory cache.
    let read_all = |disk: Option<DiskCache>| {
        let (src, data) = one_file(50_000, 1000);
        let src = Arc::new(src);
        let r = rt();
        r.block_on(async {
            let cache = ChunkCache::new(1 << 20, disk);
            let fs = GranaryFs::new(src.clone(), cache.clone(), FsConfig::default());
            let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
            let got = fs.read_inode(ino, 0, 50_000).await.unwrap();
            assert_eq!(got, data);
            cache.flush().await;
            let mut s = fs.stats().snapshot();
            cache.fill(&mut s);
            // Read again: from memory or disk, never fetched twice.
            assert_eq!(fs.read_inode(ino, 0, 50_000).await.unwrap(), data);
            assert_eq!(src.chunks_fetched.load(Ordering::Relaxed), 50);
            cache.close().await;
            s.mem_bytes
        })
    };
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        read_all(Some(DiskCache::open(tmp.path(), 1 << 20).unwrap())),
        0,
        "with a disk cache, consumed chunks leave memory"
    );
    assert!(disk_bytes(tmp.path()) > 50_000, "and are on disk");
    assert_eq!(read_all(None), 50_000, "without one, memory keeps them");
}

#[test]
fn disk_cache_respects_its_cap_and_reopens_within_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = one_file(100_000, 1000);
    let src: Arc<dyn Source> = Arc::new(src);
    let r = rt();
    r.block_on(async {
        let cache = ChunkCache::new(0, Some(DiskCache::open(tmp.path(), 10_000).unwrap()));
        let stats = Arc::default();
        let fs = GranaryFs::new(src.clone(), cache.clone(), FsConfig::default());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let chunks = fs.chunks_of(ino).await.unwrap();
        for c in chunks.chunks(7) {
            cache.get_many(&src, c, Want::Read, &stats).await.unwrap();
            cache.flush().await;
            assert!(disk_bytes(tmp.path()) <= 10_000);
        }
        // Full: within one segment (here one record: 1,000 bytes, a 44-byte
        // header and a 64-byte footer) of the cap.
        let full = disk_bytes(tmp.path());
        assert!(full > 10_000 - 1108, "{full}");
        assert_eq!(cache.disk().unwrap().usage().0, full);
        // The most recent chunks stayed.
        assert!(cache.is_cached(&chunks[99].id));
        assert!(!cache.is_cached(&chunks[0].id));
        cache.close().await;
    });
    // A segment left open by a process that died is sealed (its whole
    // records kept, a torn tail dropped) by the next process to open.
    let mut torn = std::fs::read_dir(tmp.path().join("segments-v2"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let bytes = std::fs::read(&torn).unwrap();
    std::fs::remove_file(&torn).unwrap();
    torn.set_extension("open");
    let cut = bytes.len() - 1000; // into the footer and the last record
    std::fs::write(&torn, &bytes[..cut]).unwrap();
    // Reopening with a smaller cap trims the oldest segments.
    let d = DiskCache::open(tmp.path(), 4000).unwrap();
    let (used, cap) = d.usage();
    assert!(used <= 4000 && used > 4000 - 2 * 1108 && cap == 4000, "{used}");
    assert_eq!(disk_bytes(tmp.path()), used);
    assert!(std::fs::read_dir(tmp.path().join("segments-v2"))
        .unwrap()
        .all(|e| e.unwrap().path().extension().unwrap() == "seg"));
    let stats = granary_fuse::Stats::default();
    for (id, ..) in d.records() {
        assert!(d.get(&id, &stats).is_some());
    }
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
}

fn ra_config() -> FsConfig {
    FsConfig {
        readahead_initial: 64 << 10,
        readahead_max: 1 << 20,
        readahead_global: 4 << 20,
        prefetch_batch: 128 << 10,
        ..FsConfig::default()
    }
}

#[test]
fn sequential_reads_prefetch_with_a_growing_window() {
    let (src, data) = one_file(8 << 20, 16 << 10);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, src) = mount(src, 64 << 20, tmp.path(), 64 << 20, ra_config());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let fh = fs.open(ino).await.unwrap();
        let mut pos = 0;
        while pos < data.len() {
            let got = fs.read(fh, pos as u64, 128 << 10).await.unwrap();
            assert_eq!(got, &data[pos..pos + got.len()]);
            pos += got.len();
        }
        let s = fs.stats().snapshot();
        assert!(
            s.prefetched_chunks > 400,
            "sequential reads should be served ahead: {s:?}"
        );
        assert!(s.misses < 40, "{s:?}");
        // Each chunk is fetched once (prefetch and reads share fetches in flight).
        assert!(src.chunks_fetched.load(Ordering::Relaxed) <= 512 + 16, "{s:?}");
        for _ in 0..100 {
            if fs.prefetch_inflight() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(fs.prefetch_inflight(), 0);
    });
}

#[test]
fn random_reads_do_not_prefetch() {
    let (src, data) = one_file(8 << 20, 16 << 10);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, _src) = mount(src, 8 << 20, tmp.path(), 8 << 20, ra_config());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let fh = fs.open(ino).await.unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let off = rng.usize(..data.len());
            let got = fs.read(fh, off as u64, 4096).await.unwrap();
            assert_eq!(got, &data[off..(off + 4096).min(data.len())]);
        }
        let s = fs.stats().snapshot();
        assert_eq!(s.prefetched_chunks, 0, "{s:?}");
    });
}

/// A directory named `name` of `n` files `fNNNN` of `len` random bytes
/// each, one chunk each, added to `src`: its entry and the files' bytes.
fn dir_of_files(
    src: &mut MemSource,
    rng: &mut fastrand::Rng,
    name: &str,
    n: usize,
    len: usize,
) -> (TreeEntry, Vec<Vec<u8>>) {
    let mut files = Vec::new();
    let mut entries = Vec::new();
    for i in 0..n {
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let (content, _) = file_content(vec![src.add_chunk(&data)]);
        entries.push(TreeEntry {
            name: format!("f{i:04}").into_bytes(),
            mode: 0o644,
            mtime: Timestamp::default(),
            data: EntryData::File {
                size: len as u64,
                content,
            },
        });
        files.push(data);
    }
    let tree = src.add_tree(Tree::new(entries).unwrap());
    let entry = TreeEntry {
        name: name.as_bytes().to_vec(),
        mode: 0o755,
        mtime: Timestamp::default(),
        data: EntryData::Dir { tree },
    };
    (entry, files)
}

/// A directory `d` of `n` files of `len` random bytes each, one chunk each.
fn many_small_files(n: usize, len: usize) -> (MemSource, Vec<Vec<u8>>) {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let mut src = MemSource::default();
    let (d, files) = dir_of_files(&mut src, &mut rng, "d", n, len);
    src.root = src.add_tree(Tree::new(vec![d]).unwrap());
    (src, files)
}

/// Reads files `order` of directory `d` whole, with the kernel's zero-message opens.
async fn read_files(fs: &GranaryFs, files: &[Vec<u8>], order: &[usize]) {
    let dir = fs.lookup(ROOT_INO, b"d").await.unwrap().ino;
    for &i in order {
        let ino = fs.lookup(dir, format!("f{i:04}").as_bytes()).await.unwrap().ino;
        let got = fs.read_inode(ino, 0, 1 << 20).await.unwrap();
        assert_eq!(got, files[i], "file {i}");
    }
}

/// `n_dirs` directories `dNN` of `files` files of `len` random bytes each
/// (one chunk each, from `seed`) under the root: the source and the bytes.
fn dirs_of_files(seed: u64, n_dirs: usize, files: usize, len: usize) -> (MemSource, Vec<Vec<Vec<u8>>>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut src = MemSource::default();
    let (mut dirs, mut contents) = (Vec::new(), Vec::new());
    for d in 0..n_dirs {
        let (entry, bytes) = dir_of_files(&mut src, &mut rng, &format!("d{d:02}"), files, len);
        dirs.push(entry);
        contents.push(bytes);
    }
    src.root = src.add_tree(Tree::new(dirs).unwrap());
    (src, contents)
}

/// Reads every file of directory `dNN` (`d`) whole, in name order, and checks its bytes.
async fn read_dir_in_name_order(fs: &GranaryFs, d: usize, files: &[Vec<u8>]) {
    let dir = fs
        .lookup(ROOT_INO, format!("d{d:02}").as_bytes())
        .await
        .unwrap()
        .ino;
    for (i, want) in files.iter().enumerate() {
        let ino = fs.lookup(dir, format!("f{i:04}").as_bytes()).await.unwrap().ino;
        assert_eq!(
            &fs.read_inode(ino, 0, 1 << 20).await.unwrap(),
            want,
            "d{d:02}/f{i:04}"
        );
    }
}

/// Waits (up to 5 s) for the background prefetches to end, so that counts
/// taken after it are final.
async fn settle(fs: &GranaryFs) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while fs.prefetch_inflight() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[test]
fn reading_a_directory_in_name_order_prefetches_the_next_files() {
    let (src, files) = many_small_files(400, 4096);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, src) = mount(src, 64 << 20, tmp.path(), 64 << 20, ra_config());
        let order: Vec<usize> = (0..files.len()).collect();
        read_files(&fs, &files, &order).await;
        settle(&fs).await;
        let s = fs.stats().snapshot();
        // Only the first few files (before the streak starts) and the reads
        // that overtake a prefetch miss; the rest was fetched ahead.
        assert!(s.prefetched_chunks > 300, "{s:?}");
        assert!(s.misses < 40, "{s:?}");
        // Fetched in batches, not one call per file, and each chunk once.
        let calls = src.fetch_calls.load(Ordering::Relaxed);
        assert!(calls < 100, "{s:?}");
        assert!(src.chunks_fetched.load(Ordering::Relaxed) <= 400, "{s:?}");
        // The source is told which fetches are readahead (a chunk server
        // reads those from the object tier in whole blocks): all but the
        // reads that missed.
        let ahead = src.prefetch_calls.load(Ordering::Relaxed);
        assert!(
            ahead > 0 && calls <= ahead + s.misses,
            "{ahead} of {calls} calls ahead; {s:?}"
        );
    });
}

#[test]
fn a_name_order_pass_goes_on_into_the_next_directories() {
    // d00..d03, read one after the other in name order, as a walk of a
    // dataset reads them: the readahead started in d00 carries into d01 and
    // on, so only d00's first files wait for a fetch. Each directory's pass
    // starting afresh would miss at least its first 3 files (12 in all).
    let (src, contents) = dirs_of_files(11, 4, 50, 4096);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, src) = mount(src, 64 << 20, tmp.path(), 64 << 20, ra_config());
        let mut misses_in_d00 = 0;
        for (d, files) in contents.iter().enumerate() {
            read_dir_in_name_order(&fs, d, files).await;
            if d == 0 {
                misses_in_d00 = fs.stats().snapshot().misses;
            }
        }
        settle(&fs).await;
        let s = fs.stats().snapshot();
        assert!(s.misses <= 5, "{s:?}");
        // d01..d03 were read ahead: at most one read there overtook a prefetch.
        assert!(
            s.misses <= misses_in_d00 + 1,
            "{misses_in_d00} misses in d00; {s:?}"
        );
        assert!(s.prefetched_chunks >= 190, "{s:?}");
        assert!(
            src.chunks_fetched.load(Ordering::Relaxed) <= 200,
            "each chunk once: {s:?}"
        );
        // Every reservation is given back once the background prefetches end.
        assert_eq!(fs.prefetch_inflight(), 0);
    });
}

#[test]
fn a_second_epoch_goes_on_into_the_next_directories_again() {
    // d00..d03 read in name order twice, as two epochs of a training loop,
    // with caches too small to keep the first epoch: the second pass must
    // carry its readahead into d01.. again, although the first pass left
    // their states finished (not seeded). Starting each afresh would miss
    // at least its first 3 files (9 in d01..d03).
    let (src, contents) = dirs_of_files(12, 4, 50, 256 << 10);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, _src) = mount(src, 8 << 20, tmp.path(), 8 << 20, ra_config());
        let mut misses = Vec::new();
        for _epoch in 0..2 {
            for (d, files) in contents.iter().enumerate() {
                let before = fs.stats().snapshot().misses;
                read_dir_in_name_order(&fs, d, files).await;
                misses.push(fs.stats().snapshot().misses - before);
            }
        }
        let s = fs.stats().snapshot();
        // Misses per directory, first epoch then second.
        assert!(misses[0] >= 1, "the first pass starts cold: {misses:?}; {s:?}");
        assert!(
            misses[4] >= 1,
            "the caches did not keep the first epoch: {misses:?}; {s:?}"
        );
        let later: u64 = misses[5..].iter().sum();
        assert!(
            later <= 1,
            "the second pass carried into d01..d03: {misses:?}; {s:?}"
        );
        settle(&fs).await;
        assert_eq!(fs.prefetch_inflight(), 0);
    });
}

#[test]
fn reading_files_in_random_order_prefetches_nothing() {
    let (src, files) = many_small_files(400, 4096);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, src) = mount(src, 64 << 20, tmp.path(), 64 << 20, ra_config());
        // Every file 20 positions from the one before (more than
        // SIBLING_NEAR): no streak can start.
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by_key(|&i| (i % 20, i));
        read_files(&fs, &files, &order).await;
        let s = fs.stats().snapshot();
        assert_eq!(s.prefetched_chunks, 0, "{s:?}");
        assert_eq!(s.misses, 400, "{s:?}");
        assert_eq!(src.prefetch_calls.load(Ordering::Relaxed), 0, "{s:?}");
    });
}

#[test]
fn concurrent_name_order_readers_stay_within_the_prefetch_budget() {
    // 16 directories of 64 one-chunk files, each read in name order by its
    // own task at once, from a slow cluster: every directory's readahead
    // wants a window ahead of its reader, together far more than the budget.
    let (src, want) = dirs_of_files(16, 16, 64, 16 << 10);
    src.delay_ms.store(5, Ordering::Relaxed);
    let budget = 256 << 10;
    let cfg = FsConfig {
        readahead_global: budget,
        ..ra_config()
    };
    let want = Arc::new(want);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, _src) = mount(src, 64 << 20, tmp.path(), 64 << 20, cfg);
        let mut tasks = Vec::new();
        for d in 0..16 {
            let (fs, want) = (fs.clone(), want.clone());
            tasks.push(tokio::spawn(async move {
                let dir = fs
                    .lookup(ROOT_INO, format!("d{d:02}").as_bytes())
                    .await
                    .unwrap()
                    .ino;
                for (i, data) in want[d].iter().enumerate() {
                    let ino = fs.lookup(dir, format!("f{i:04}").as_bytes()).await.unwrap().ino;
                    assert_eq!(
                        &fs.read_inode(ino, 0, 1 << 20).await.unwrap(),
                        data,
                        "d{d:02}/f{i:04}"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = fs.stats().snapshot();
        assert!(
            s.prefetched_chunks > 0,
            "name-order readers should prefetch: {s:?}"
        );
        assert!(
            fs.prefetch_peak() <= budget,
            "prefetch in flight reached {} bytes, over the {budget}-byte budget",
            fs.prefetch_peak()
        );
        for _ in 0..200 {
            if fs.prefetch_inflight() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(fs.prefetch_inflight(), 0, "every reservation is given back");
    });
}

#[test]
fn concurrent_lookups_of_new_and_known_names_do_not_deadlock() {
    // Lookups that find a known name and lookups that create one, from
    // several threads at once (the fuser threads): once, the first kind
    // held the name table while it waited for the inode table, which the
    // second kind held while it waited for the name table.
    let mut rng = fastrand::Rng::with_seed(8);
    let mut src = MemSource::default();
    let mut dirs = Vec::new();
    for d in 0..8 {
        dirs.push(dir_of_files(&mut src, &mut rng, &format!("d{d}"), 400, 16).0);
    }
    src.root = src.add_tree(Tree::new(dirs).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let (fs, _src) = mount(src, 1 << 20, tmp.path(), 1 << 20, FsConfig::default());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for t in 0..8u64 {
        let (fs, done) = (fs.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(t);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                for _ in 0..4000 {
                    let d = fs
                        .lookup(ROOT_INO, format!("d{}", rng.usize(..8)).as_bytes())
                        .await
                        .unwrap();
                    let name = format!("f{:04}", rng.usize(..400));
                    assert_eq!(fs.lookup(d.ino, name.as_bytes()).await.unwrap().size, 16);
                }
            });
            done.send(()).unwrap();
        });
    }
    for _ in 0..8 {
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("lookups deadlocked (no thread finished within 60 s)");
    }
}

#[test]
fn fetch_failures_are_errors_and_reads_recover() {
    let (src, data) = one_file(10_000, 1000);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, src) = mount(src, 1 << 20, tmp.path(), 1 << 20, FsConfig::default());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let fh = fs.open(ino).await.unwrap();
        src.fail.store(true, Ordering::Relaxed);
        let e = fs.read(fh, 0, 5000).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        src.fail.store(false, Ordering::Relaxed);
        assert_eq!(fs.read(fh, 0, 20_000).await.unwrap(), data);
        assert!(fs.read(999, 0, 1).await.is_err());
    });
}

#[test]
fn concurrent_readers_get_the_right_bytes() {
    let (src, data) = one_file(2 << 20, 8 << 10);
    let data = Arc::new(data);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (fs, _src) = mount(src, 1 << 20, tmp.path(), 1 << 30, ra_config());
        let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (fs, data) = (fs.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                let fh = fs.open(ino).await.unwrap();
                let mut rng = fastrand::Rng::with_seed(t);
                for _ in 0..100 {
                    let off = rng.usize(..data.len());
                    let len = rng.u32(1..200_000);
                    let got = fs.read(fh, off as u64, len).await.unwrap();
                    assert_eq!(got, &data[off..(off + len as usize).min(data.len())]);
                }
                fs.release(fh);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(fs.open_handles(), 0);
    });
}

#[test]
fn two_processes_sharing_a_disk_cache_stay_within_its_cap_together() {
    let tmp = tempfile::tempdir().unwrap();
    let cap = 50_000;
    // Two caches on one directory stand for two mount processes.
    let a = Arc::new(DiskCache::open(tmp.path(), cap).unwrap());
    let b = Arc::new(DiskCache::open(tmp.path(), cap).unwrap());
    let stats = Arc::new(granary_fuse::Stats::default());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (a, b, stats) = (a.clone(), b.clone(), stats.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t);
                for i in 0..150 {
                    let data: Vec<u8> = (0..rng.usize(1..3000)).map(|_| rng.u8(..)).collect();
                    let id = granary_core::ChunkId::of(&data);
                    let cache = if (i + t) % 2 == 0 { &a } else { &b };
                    cache.put(&id, &data, &stats).unwrap();
                    // The shared count (exact under the directory lock; a walk
                    // here would race with the other threads).
                    assert!(cache.usage().0 <= cap, "over the cap");
                    if rng.bool() {
                        // Reads through the other "process" of what this one wrote.
                        let other = if (i + t) % 2 == 0 { &b } else { &a };
                        if let Some(got) = other.get(&id, &stats) {
                            assert_eq!(got, data);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let on_disk = disk_bytes(tmp.path());
    assert!(on_disk <= cap && on_disk > cap / 2, "{on_disk}");
    assert_eq!(a.usage(), (on_disk, cap), "the shared count matches the files");
    assert_eq!(b.usage(), (on_disk, cap));
    assert!(stats.disk_evictions.load(Ordering::Relaxed) > 0);
    // A damaged record is reported once (by whoever reads it first) and
    // then skipped by every process, including one that opens later.
    a.close();
    b.close();
    let (id, path, off, len) = a.records().into_iter().next().unwrap();
    patch(&path, off, &vec![0u8; len as usize]);
    let before = stats.corrupt.load(Ordering::Relaxed);
    assert!(a.get(&id, &stats).is_none());
    assert!(b.get(&id, &stats).is_none());
    assert!(DiskCache::open(tmp.path(), cap)
        .unwrap()
        .get(&id, &stats)
        .is_none());
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), before + 1);
    // Every other record reads back through the other process.
    // One batch: a read of a record in an old segment renews it (writes it
    // again) after the batch, and making room for that may evict segments
    // that hold records not read yet.
    let ids: Vec<_> = a.records().into_iter().skip(1).map(|r| r.0).collect();
    let got = b.get_many(&ids, &stats);
    let missing: Vec<_> = ids
        .iter()
        .zip(&got)
        .filter(|(_, g)| g.is_none())
        .map(|(id, _)| id)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} records did not read back: {missing:?}",
        missing.len(),
        ids.len()
    );
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), before + 1);
}
