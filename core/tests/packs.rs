//! Pack properties: sealed packs read back verified, any damage is reported,
//! unsealed packs recover from a torn tail.

mod common;

use std::path::Path;

use granary_core::pack::{PackWriter, PACK_HEADER_LEN};
use granary_core::{ChunkId, PackError, PackReader};
use proptest::prelude::*;

/// Chunks of mixed compressibility.
fn chunks(seed: u64, n: usize, max: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let len = rng.usize(1..max);
            if i % 2 == 0 {
                common::random_bytes(seed ^ i as u64, len)
            } else {
                b"granary pack "
                    .iter()
                    .copied()
                    .cycle()
                    .take(len.max(600))
                    .collect()
            }
        })
        .collect()
}

fn write_pack(path: &Path, data: &[Vec<u8>]) -> Vec<ChunkId> {
    let mut w = PackWriter::create(path, 7).unwrap();
    let ids: Vec<ChunkId> = data
        .iter()
        .map(|d| {
            let id = ChunkId::of(d);
            w.append_chunk(&id, d).unwrap();
            id
        })
        .collect();
    w.seal().unwrap();
    ids
}

#[test]
fn sealed_pack_reads_back_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("1.pack");
    let data = chunks(1, 50, 5000);
    let ids = write_pack(&path, &data);
    let r = PackReader::open(&path).unwrap();
    assert_eq!(r.pack_id(), 7);
    assert_eq!(r.entries().len(), 50);
    for (id, d) in ids.iter().zip(&data) {
        assert_eq!(&r.read_chunk(id).unwrap(), d);
    }
    let report = r.verify().unwrap();
    assert_eq!((report.ok, report.bad.len()), (50, 0));
    let report = r.verify_crc().unwrap();
    assert_eq!((report.ok, report.bad.len()), (50, 0));
    let missing = ChunkId::of(b"not here");
    assert!(matches!(r.read_chunk(&missing), Err(PackError::NotFound { .. })));
    // A sealed pack cannot be reopened for appending.
    assert!(matches!(
        PackWriter::open_unsealed(&path),
        Err(PackError::Sealed { .. })
    ));
}

#[test]
fn every_flipped_byte_of_a_sealed_pack_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pack");
    let data = chunks(2, 4, 700);
    write_pack(&path, &data);
    let good = std::fs::read(&path).unwrap();
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        std::fs::write(&path, &bad).unwrap();
        // Both the full check and the CRC-only one (used before a pack is
        // copied to the object tier) notice it.
        let (full, crc) = match PackReader::open(&path) {
            Err(_) => (true, true),
            Ok(r) => (
                !r.verify().unwrap().bad.is_empty(),
                !r.verify_crc().unwrap().bad.is_empty(),
            ),
        };
        assert!(full, "flip at byte {i} of {} went unnoticed", good.len());
        assert!(
            crc,
            "flip at byte {i} of {} went unnoticed by the CRC check",
            good.len()
        );
    }
}

#[test]
fn every_truncation_of_a_sealed_pack_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pack");
    write_pack(&path, &chunks(3, 3, 500));
    let good = std::fs::read(&path).unwrap();
    for len in 0..good.len() {
        std::fs::write(&path, &good[..len]).unwrap();
        assert!(
            PackReader::open(&path).is_err(),
            "truncation to {len} bytes went unnoticed"
        );
    }
}

#[test]
fn unsealed_pack_truncated_anywhere_in_its_last_frame_recovers_the_previous_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.pack");
    let data = chunks(4, 6, 3000);
    let mut w = PackWriter::create(&path, 9).unwrap();
    for d in &data {
        w.append_chunk(&ChunkId::of(d), d).unwrap();
    }
    w.sync().unwrap();
    let last = *w.entries().last().unwrap();
    drop(w);
    let full = std::fs::read(&path).unwrap();
    assert_eq!(full.len() as u64, last.end());
    for cut in last.offset..last.end() {
        std::fs::write(&path, &full[..cut as usize]).unwrap();
        let (w, rec) = PackWriter::open_unsealed(&path).unwrap();
        assert_eq!(rec.frames, data.len() - 1, "cut at {cut}");
        assert_eq!(rec.truncated_bytes, cut - last.offset);
        assert_eq!(w.len(), last.offset);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), last.offset);
    }
    // After recovery, appending and sealing gives a valid pack with every chunk.
    let (mut w, _) = PackWriter::open_unsealed(&path).unwrap();
    let d = data.last().unwrap();
    w.append_chunk(&ChunkId::of(d), d).unwrap();
    w.seal().unwrap();
    let r = PackReader::open(&path).unwrap();
    for d in &data {
        assert_eq!(&r.read_chunk(&ChunkId::of(d)).unwrap(), d);
    }
}

#[test]
fn unsealed_pack_with_garbage_tail_keeps_good_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.pack");
    let data = chunks(5, 3, 2000);
    let mut w = PackWriter::create(&path, 1).unwrap();
    for d in &data {
        w.append_chunk(&ChunkId::of(d), d).unwrap();
    }
    w.sync().unwrap();
    let end = w.len();
    drop(w);
    // A crash may leave zeroes (preallocated blocks) after the last frame.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&path, &bytes).unwrap();
    let (_, rec) = PackWriter::open_unsealed(&path).unwrap();
    assert_eq!(rec.frames, 3);
    assert_eq!(rec.truncated_bytes, 4096);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), end);
}

#[test]
fn append_frame_rejects_damaged_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = PackWriter::create(&dir.path().join("x.pack"), 1).unwrap();
    let (_, mut frame) = granary_core::frame::frame_chunk(b"some chunk bytes");
    frame[50] ^= 1;
    assert!(matches!(w.append_frame(&frame), Err(PackError::BadFrame { .. })));
    assert!(w.is_empty());
    assert_eq!(w.len(), PACK_HEADER_LEN as u64);
}

#[test]
fn append_frames_writes_a_verified_run_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.pack");
    let data = chunks(7, 6, 5000);
    let mut run = Vec::new();
    let mut ids = Vec::new();
    for d in &data {
        let (id, frame) = granary_core::frame::frame_chunk(d);
        run.extend_from_slice(&frame);
        ids.push(id);
    }
    let mut w = PackWriter::create(&path, 1).unwrap();
    // A damaged frame anywhere in the run, or a run cut short: nothing of it is written.
    let last = run.len() - 1;
    for bad in [
        {
            let mut r = run.clone();
            r[last] ^= 1;
            r
        },
        run[..run.len() - 3].to_vec(),
    ] {
        assert!(matches!(w.append_frames(&bad), Err(PackError::BadFrame { .. })));
        assert!(w.is_empty());
        assert_eq!(w.len(), PACK_HEADER_LEN as u64);
    }
    assert_eq!(w.append_frames(&run).unwrap(), data.len());
    assert_eq!(w.append_frames(&[]).unwrap(), 0);
    w.seal().unwrap();
    let r = PackReader::open(&path).unwrap();
    assert_eq!(r.entries().len(), data.len());
    for (id, d) in ids.iter().zip(&data) {
        assert_eq!(&r.read_chunk(id).unwrap(), d);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn any_sealed_pack_round_trips(seed in any::<u64>(), n in 0usize..30, max in 2usize..9000) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pack");
        let data = chunks(seed, n, max);
        let ids = write_pack(&path, &data);
        let r = PackReader::open(&path).unwrap();
        prop_assert_eq!(r.entries().len(), n);
        for (id, d) in ids.iter().zip(&data) {
            prop_assert_eq!(&r.read_chunk(id).unwrap(), d);
        }
    }
}
