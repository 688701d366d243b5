//! Content addresses.
//!
//! Everything Granary stores is named by the BLAKE3 hash of its bytes:
//! a chunk by the hash of its *raw* (uncompressed) bytes, a tree or chunk
//! list by the hash of its canonical encoding. The two kinds of id are
//! distinct types so that one can never be passed where the other is meant.

use std::fmt;
use std::str::FromStr;

/// Error returned when parsing an id from text fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{input}' is not a valid {kind} id: expected 64 hexadecimal characters")]
pub struct IdParseError {
    kind: &'static str,
    input: String,
}

macro_rules! content_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = 32;

            /// The id of `data`: its BLAKE3 hash.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }

            /// Wraps raw hash bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Reads an id from the first 32 bytes of `bytes`, if there are that many.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.get(..32).map(|b| Self(b.try_into().expect("32 bytes")))
            }

            /// The raw hash bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Full lowercase hexadecimal form (64 characters).
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// The first 12 hex characters, for logs and progress lines.
            pub fn short(&self) -> String {
                let mut s = self.to_hex();
                s.truncate(12);
                s
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                blake3::Hash::from_hex(s).map(Self::from).map_err(|_| IdParseError {
                    kind: $kind,
                    input: s.chars().take(80).collect(),
                })
            }
        }
    };
}

content_id!(
    /// The id of a chunk: BLAKE3 of its raw, uncompressed bytes.
    ChunkId,
    "chunk"
);

content_id!(
    /// The id of a tree object (a directory listing or a spilled chunk list):
    /// BLAKE3 of its canonical encoding.
    TreeId,
    "tree"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_ordering() {
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        assert_eq!(a.to_hex().parse::<ChunkId>().unwrap(), a);
        assert_eq!(a.to_string().len(), 64);
        assert_eq!(a.cmp(&b), a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(a, ChunkId::from(blake3::hash(b"a")));
    }

    #[test]
    fn bad_hex_is_a_clear_error() {
        let err = "xyz".parse::<TreeId>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "'xyz' is not a valid tree id: expected 64 hexadecimal characters"
        );
    }
}
