//! What changed between two versions, found by walking both trees and
//! skipping every subtree whose id is the same in both.

use granary_core::tree::EntryData;
use granary_core::{EntryKind, TreeEntry, TreeId};

use crate::error::ClientError;
use crate::version::VersionReader;

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added {
        path: String,
        kind: EntryKind,
    },
    Removed {
        path: String,
        kind: EntryKind,
    },
    /// Same name, different content, kind or attributes.
    Modified {
        path: String,
        kind: EntryKind,
    },
}

impl Change {
    pub fn path(&self) -> &str {
        match self {
            Change::Added { path, .. } | Change::Removed { path, .. } | Change::Modified { path, .. } => path,
        }
    }
}

fn join(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir.is_empty() {
        name.into_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// Changes from `a` to `b`, sorted by path. Added or removed directories are
/// reported once, not with their contents.
pub async fn diff(a: &VersionReader, b: &VersionReader) -> Result<Vec<Change>, ClientError> {
    let mut out = Vec::new();
    let mut stack: Vec<(String, TreeId, TreeId)> = vec![(String::new(), a.root(), b.root())];
    while let Some((dir, ta, tb)) = stack.pop() {
        if ta == tb {
            continue;
        }
        let (ea, eb) = (a.tree(ta).await?, b.tree(tb).await?);
        let (mut i, mut j) = (0, 0);
        let (xa, xb): (&[TreeEntry], &[TreeEntry]) = (ea.entries(), eb.entries());
        while i < xa.len() || j < xb.len() {
            let order = match (xa.get(i), xb.get(j)) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    out.push(Change::Removed {
                        path: join(&dir, &xa[i].name),
                        kind: xa[i].kind(),
                    });
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(Change::Added {
                        path: join(&dir, &xb[j].name),
                        kind: xb[j].kind(),
                    });
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (x, y) = (&xa[i], &xb[j]);
                    let path = join(&dir, &x.name);
                    match (&x.data, &y.data) {
                        (EntryData::Dir { tree: p }, EntryData::Dir { tree: q }) => {
                            if x.mode != y.mode || x.mtime != y.mtime {
                                out.push(Change::Modified {
                                    path: path.clone(),
                                    kind: EntryKind::Dir,
                                });
                            }
                            stack.push((path, *p, *q));
                        }
                        _ if x != y => out.push(Change::Modified { path, kind: y.kind() }),
                        _ => {}
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
    }
    out.sort_by(|p, q| p.path().cmp(q.path()));
    Ok(out)
}
