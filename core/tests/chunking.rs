//! Chunker properties: chunks tile the input, streaming equals slicing,
//! boundaries are stable under insertions.

mod common;

use std::collections::HashSet;
use std::io::Read;

use granary_core::{ChunkId, Chunker, ChunkerConfig};
use proptest::prelude::*;

/// A reader that returns at most a few bytes at a time, in a pattern set by `steps`.
struct ShortReads<'a> {
    data: &'a [u8],
    steps: Vec<usize>,
    i: usize,
}

impl Read for ShortReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let step = self.steps[self.i % self.steps.len()];
        self.i += 1;
        let n = step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn stream_chunks(chunker: &Chunker, reader: impl Read, block: usize) -> Vec<Vec<u8>> {
    let mut r = chunker.reader(reader, block);
    let mut out = Vec::new();
    while let Some(batch) = r.next_batch().unwrap() {
        out.extend(batch.chunks().map(|c| c.to_vec()));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn chunks_tile_the_input_within_size_limits(seed in any::<u64>(), len in 0usize..20_000) {
        let data = common::random_bytes(seed, len);
        let cfg = ChunkerConfig::tiny();
        let chunker = Chunker::new(cfg).unwrap();
        let ends = chunker.cuts(&data);
        let mut start = 0;
        let mut joined = Vec::new();
        for (i, &end) in ends.iter().enumerate() {
            let n = end - start;
            prop_assert!(n > 0 && n <= cfg.max_size as usize);
            if i + 1 < ends.len() {
                prop_assert!(n >= cfg.min_size as usize);
            }
            joined.extend_from_slice(&data[start..end]);
            start = end;
        }
        prop_assert_eq!(joined, data);
    }

    #[test]
    fn streaming_gives_the_same_chunks_as_slicing(
        seed in any::<u64>(),
        len in 0usize..30_000,
        steps in proptest::collection::vec(1usize..3000, 1..8),
        block in 0usize..8192,
    ) {
        let data = common::random_bytes(seed, len);
        let chunker = Chunker::new(ChunkerConfig::tiny()).unwrap();
        let ends = chunker.cuts(&data);
        let mut expected = Vec::new();
        let mut start = 0;
        for end in ends {
            expected.push(data[start..end].to_vec());
            start = end;
        }
        let got = stream_chunks(&chunker, ShortReads { data: &data, steps, i: 0 }, block);
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn inserting_100_bytes_in_a_16_mib_file_changes_at_most_3_chunks() {
    let data = common::random_bytes(42, 16 << 20);
    let mut edited = data.clone();
    let insert = common::random_bytes(43, 100);
    let mid = data.len() / 2;
    edited.splice(mid..mid, insert);
    let chunker = Chunker::new(ChunkerConfig::default()).unwrap();
    let ids = |d: &[u8]| -> Vec<ChunkId> {
        let mut start = 0;
        chunker
            .cuts(d)
            .into_iter()
            .map(|end| {
                let id = ChunkId::of(&d[start..end]);
                start = end;
                id
            })
            .collect()
    };
    let before: HashSet<ChunkId> = ids(&data).into_iter().collect();
    let after = ids(&edited);
    let changed = after.iter().filter(|id| !before.contains(id)).count();
    assert!(before.len() > 100, "expected many chunks, got {}", before.len());
    assert!(changed <= 3, "{changed} chunk ids changed");
    assert!(changed >= 1, "the edit must change at least one chunk");
}
