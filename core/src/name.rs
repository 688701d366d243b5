//! Dataset names and version references as users type them.
//!
//! A dataset name is 1 to 255 bytes of ASCII letters, digits, `.`, `_` and
//! `-`, starting with a letter or digit: safe as a path component, in a URL
//! and in a shell. A version reference is `NAME` (the latest version) or
//! `NAME@N` (N >= 1); a path reference appends `:PATH` inside the version.

use std::fmt;

/// Longest dataset name, in bytes.
pub const MAX_DATASET_NAME: usize = 255;

/// Why a name or reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid dataset name {shown}: {reason}; use 1-255 letters, digits, '.', '_' or '-', starting with a letter or digit")]
pub struct NameError {
    shown: String,
    reason: &'static str,
}

impl NameError {
    fn new(name: &str, reason: &'static str) -> Self {
        let shown: String = name.chars().take(64).collect();
        Self {
            shown: format!(
                "{:?}{}",
                shown,
                if name.chars().count() > 64 { "..." } else { "" }
            ),
            reason,
        }
    }
}

/// Checks a dataset name.
pub fn validate_dataset_name(name: &str) -> Result<(), NameError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_DATASET_NAME {
        Some("it is longer than 255 bytes")
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains control characters")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name == "."
        || name == ".."
        || name.starts_with('.')
        || name.starts_with('-')
        || name.starts_with('_')
    {
        Some("it must start with a letter or digit")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        Some("it contains a character other than letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(r) => Err(NameError::new(name, r)),
        None => Ok(()),
    }
}

/// `NAME` or `NAME@N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRef {
    pub dataset: String,
    /// `None` means the latest version.
    pub number: Option<u64>,
}

/// A malformed `NAME[@N][:PATH]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "invalid version in {0:?}: expected NAME@N with N a version number >= 1 (see `granary log NAME`)"
    )]
    Version(String),
}

impl VersionRef {
    /// Parses `NAME` or `NAME@N`.
    pub fn parse(s: &str) -> Result<Self, RefError> {
        let (dataset, number) = match s.split_once('@') {
            Some((d, n)) => {
                let n: u64 = n.parse().map_err(|_| RefError::Version(s.to_string()))?;
                if n == 0 {
                    return Err(RefError::Version(s.to_string()));
                }
                (d, Some(n))
            }
            None => (s, None),
        };
        validate_dataset_name(dataset)?;
        Ok(Self {
            dataset: dataset.to_string(),
            number,
        })
    }

    /// Parses `NAME[@N][:PATH]`, returning the path ("" for the root).
    pub fn parse_with_path(s: &str) -> Result<(Self, String), RefError> {
        match s.split_once(':') {
            Some((v, p)) => Ok((Self::parse(v)?, p.trim_matches('/').to_string())),
            None => Ok((Self::parse(s)?, String::new())),
        }
    }
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number {
            Some(n) => write!(f, "{}@{n}", self.dataset),
            None => f.write_str(&self.dataset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["mnist", "ImageNet-1k", "a", "v1.2_final", &"x".repeat(255)] {
            validate_dataset_name(ok).unwrap();
        }
        for bad in [
            "",
            "/",
            "a/b",
            "..",
            ".hidden",
            "-x",
            "tab\there",
            "nul\0",
            "spa ce",
            "ümlaut",
            "a@b",
            "a:b",
        ] {
            assert!(validate_dataset_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_dataset_name(&"x".repeat(256)).is_err());
        let e = validate_dataset_name("a/b").unwrap_err().to_string();
        assert_eq!(e, "invalid dataset name \"a/b\": it contains '/'; use 1-255 letters, digits, '.', '_' or '-', starting with a letter or digit");
    }

    #[test]
    fn refs() {
        assert_eq!(VersionRef::parse("ds").unwrap().number, None);
        assert_eq!(VersionRef::parse("ds@3").unwrap().number, Some(3));
        assert!(VersionRef::parse("ds@0").is_err());
        assert!(VersionRef::parse("ds@x").is_err());
        let (r, p) = VersionRef::parse_with_path("ds@2:/a/b/").unwrap();
        assert_eq!((r.to_string(), p.as_str()), ("ds@2".to_string(), "a/b"));
    }
}
