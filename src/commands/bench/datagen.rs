//! Deterministic benchmark data: incompressible bytes and text-like files.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Fills `buf` with incompressible bytes determined by `seed` (BLAKE3 XOF).
pub fn random_bytes(seed: u64, buf: &mut [u8]) {
    let mut h = blake3::Hasher::new();
    h.update(b"granary bench random");
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(buf);
}

/// Generates text that compresses like prose or logs (lz4 keeps roughly half):
/// common English words and syllable-built rarer words drawn with a Zipf-like
/// skew, numbers, punctuation and line breaks.
pub struct TextGen {
    rng: fastrand::Rng,
    vocab: Vec<Vec<u8>>,
}

const COMMON: &[&str] = &[
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
    "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
    "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when",
    "will", "would", "who", "so", "no", "data", "model", "training", "loss", "epoch", "batch", "error",
    "value", "result",
];
const SYLLABLES: &[&str] = &[
    "ka", "ri", "ton", "mel", "sa", "dor", "in", "ex", "ve", "lo", "pra", "tic", "al", "ment", "ing", "con",
    "ser", "na", "tu", "re", "ble", "ous", "ly", "par", "di", "gen", "ter", "mo", "fi", "cal",
];

impl TextGen {
    pub fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut vocab: Vec<Vec<u8>> = COMMON.iter().map(|w| w.as_bytes().to_vec()).collect();
        while vocab.len() < 20_000 {
            let syllables = rng.usize(1..5);
            let word = (0..syllables)
                .flat_map(|_| SYLLABLES[rng.usize(..SYLLABLES.len())].bytes())
                .collect();
            vocab.push(word);
        }
        Self { rng, vocab }
    }

    /// Appends exactly `len` bytes of text to `out`.
    pub fn fill(&mut self, out: &mut Vec<u8>, len: usize) {
        let target = out.len() + len;
        let n = self.vocab.len() as f64;
        let mut words_in_line = 0;
        while out.len() < target {
            if self.rng.u8(..50) == 0 {
                write!(out, "{}", self.rng.u32(..100_000)).expect("write to Vec");
            } else {
                // Zipf-like: P(rank < k) = ln k / ln n.
                let idx = n.powf(self.rng.f64()) as usize - 1;
                out.extend_from_slice(&self.vocab[idx.min(self.vocab.len() - 1)]);
            }
            words_in_line += 1;
            if words_in_line >= 12 && self.rng.u8(..4) == 0 {
                out.extend_from_slice(b".\n");
                words_in_line = 0;
            } else if self.rng.u8(..12) == 0 {
                out.extend_from_slice(b", ");
            } else {
                out.push(b' ');
            }
        }
        out.truncate(target);
    }
}

/// Writes `count` files of `size` bytes named `{prefix}{i:05}` into `dir`,
/// their contents produced by `fill(i, buf)`.
pub fn write_files(
    dir: &Path,
    prefix: &str,
    count: usize,
    size: usize,
    mut fill: impl FnMut(usize, &mut Vec<u8>),
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut buf = Vec::with_capacity(size);
    let mut paths = Vec::with_capacity(count);
    for i in 0..count {
        buf.clear();
        fill(i, &mut buf);
        buf.resize(size, 0);
        let path = dir.join(format!("{prefix}{i:05}"));
        std::fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}
