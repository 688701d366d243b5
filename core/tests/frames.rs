//! Frame properties: round trips for both codecs, every corruption detected, no panics.

use granary_core::frame::{
    decode_frame, decode_frame_shared, encode_frame, frame_chunk, Codec, FrameHeader, FRAME_HEADER_LEN,
};
use granary_core::ChunkId;
use proptest::prelude::*;

/// Data that lz4 compresses: a short random alphabet repeated with variation.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let words: Vec<Vec<u8>> = (0..16)
        .map(|_| (0..rng.usize(3..9)).map(|_| rng.alphanumeric() as u8).collect())
        .collect();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&words[rng.usize(..words.len())]);
        out.push(b' ');
    }
    out.truncate(len);
    out
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut v);
    v
}

/// A chunk (compressible when `lz4`), its id, and its frame with the byte
/// at `pos` xored with `mask`, and that byte's index.
fn flipped(
    seed: u64,
    len: usize,
    lz4: bool,
    pos: prop::sample::Index,
    mask: u8,
) -> (Vec<u8>, ChunkId, Vec<u8>, usize) {
    let data = if lz4 {
        compressible(seed, len.max(600))
    } else {
        random(seed, len)
    };
    let (id, mut frame) = frame_chunk(&data);
    let i = pos.index(frame.len());
    frame[i] ^= mask;
    (data, id, frame, i)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn round_trip_lz4(seed in any::<u64>(), len in 600usize..70_000) {
        let data = compressible(seed, len);
        let (id, frame) = frame_chunk(&data);
        prop_assert_eq!(FrameHeader::parse(&frame).unwrap().codec, Codec::Lz4);
        prop_assert_eq!(decode_frame(&frame, Some(&id)).unwrap(), data);
    }

    #[test]
    fn round_trip_raw(seed in any::<u64>(), len in 0usize..70_000) {
        let data = random(seed, len);
        let (id, frame) = frame_chunk(&data);
        prop_assert_eq!(FrameHeader::parse(&frame).unwrap().codec, Codec::Raw);
        prop_assert_eq!(decode_frame(&frame, Some(&id)).unwrap(), data);
    }

    #[test]
    fn any_flipped_byte_is_detected(seed in any::<u64>(), len in 1usize..3000, lz4 in any::<bool>(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let (_, id, frame, i) = flipped(seed, len, lz4, pos, mask);
        prop_assert!(decode_frame(&frame, None).is_err(), "flip at {} of {} not detected", i, frame.len());
        prop_assert!(decode_frame(&frame, Some(&id)).is_err());
    }

    /// Readers skip the CRC: whatever byte is flipped, they get an error or
    /// exactly the chunk's bytes (a flipped CRC field), never other bytes.
    #[test]
    fn a_reader_never_gets_wrong_bytes(seed in any::<u64>(), len in 1usize..3000, lz4 in any::<bool>(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let (data, id, frame, i) = flipped(seed, len, lz4, pos, mask);
        for expected in [None, Some(&id)] {
            if let Ok(got) = decode_frame_shared(bytes::Bytes::from(frame.clone()), expected) {
                prop_assert_eq!(&got[..], &data[..], "flip at {} of {}", i, frame.len());
            }
        }
    }

    #[test]
    fn any_truncation_is_detected(seed in any::<u64>(), len in 1usize..3000, lz4 in any::<bool>(), cut in any::<prop::sample::Index>()) {
        let data = if lz4 { compressible(seed, len.max(600)) } else { random(seed, len) };
        let (_, frame) = frame_chunk(&data);
        let keep = cut.index(frame.len());
        prop_assert!(decode_frame(&frame[..keep], None).is_err());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), lz4 in any::<bool>()) {
        // Give the garbage a valid-looking header so the payload paths are exercised too.
        let mut frame = bytes.clone();
        if frame.len() >= FRAME_HEADER_LEN {
            frame[0..2].copy_from_slice(b"GF");
            frame[2] = 1;
            frame[3] = lz4 as u8;
            let stored = (frame.len() - FRAME_HEADER_LEN) as u32;
            frame[8..12].copy_from_slice(&stored.to_le_bytes());
        }
        let _ = decode_frame(&frame, None);
        let _ = decode_frame(&bytes, None);
    }
}

#[test]
fn empty_chunk_round_trips() {
    let mut out = Vec::new();
    let id = ChunkId::of(b"");
    assert_eq!(encode_frame(&id, b"", &mut out), Codec::Raw);
    assert_eq!(out.len(), FRAME_HEADER_LEN);
    assert_eq!(decode_frame(&out, Some(&id)).unwrap(), b"");
}
