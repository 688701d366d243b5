//! The object tier against a local directory (`file://`) and a real S3 server
//! (`$GRANARY_TEST_S3_URL`, the moto server `scripts/test` starts), with the
//! same checks: multipart and single uploads, range reads, size, delete,
//! listing, missing objects.

use std::path::Path;

use bytes::Bytes;
use granary_client::object::{ObjectError, ObjectTier};

const MIB: usize = 1 << 20;

/// Deterministic incompressible bytes (xorshift64*).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A prefix no other test (or earlier run) uses.
fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{test}-{}-{nanos:x}", std::process::id())
}

fn assert_failed(result: Result<Vec<u8>, ObjectError>, what: &str) {
    match result {
        Err(ObjectError::Failed { .. }) => {}
        other => panic!("{what}: expected ObjectError::Failed, got {other:?}"),
    }
}

/// Every check, on one tier whose prefix nothing else uses.
async fn exercise(tier: &ObjectTier, scratch: &Path) {
    let prefix = tier
        .pack_key(0)
        .strip_suffix("packs/0000000000000000.pack")
        .unwrap()
        .to_string();

    // A multipart upload (40 MiB and a short last part) and a single PUT.
    let big = data(40 * MIB + 4321, 1);
    let small = data(MIB, 2);
    let big_path = scratch.join("big");
    let small_path = scratch.join("small");
    std::fs::write(&big_path, &big).unwrap();
    std::fs::write(&small_path, &small).unwrap();
    let (big_key, small_key) = (tier.pack_key(7), tier.pack_key(8));
    assert_eq!(
        tier.put_file(&big_key, &big_path).await.unwrap(),
        big.len() as u64
    );
    assert_eq!(
        tier.put_file(&small_key, &small_path).await.unwrap(),
        small.len() as u64
    );
    assert_eq!(tier.size(&big_key).await.unwrap(), Some(big.len() as u64));
    assert_eq!(tier.size(&small_key).await.unwrap(), Some(small.len() as u64));

    for (key, want) in [(&big_key, &big), (&small_key, &small)] {
        let back = scratch.join("back");
        std::fs::write(&back, b"old contents that must be truncated away").unwrap();
        assert_eq!(tier.get_to_file(key, &back).await.unwrap(), want.len() as u64);
        assert!(std::fs::read(&back).unwrap() == *want, "{key} did not round-trip");
    }

    // Range reads: adjacent, overlapping, out of order, across a part
    // boundary, at the very end, far apart, empty.
    let end = big.len() as u64;
    let ranges: Vec<(u64, u32)> = vec![
        (0, 100),
        (100, 50),
        (150, 1),
        (1000, 10),
        (90, 20),
        (8 * MIB as u64 - 10, 20),
        (5, 0),
        (30 * MIB as u64, 4096),
        (end - 5, 5),
        (MIB as u64, MIB as u32),
    ];
    let want: Vec<u8> = ranges
        .iter()
        .flat_map(|&(o, l)| big[o as usize..o as usize + l as usize].iter().copied())
        .collect();
    assert!(
        tier.get_ranges(&big_key, &ranges).await.unwrap() == want,
        "ranges of the big object"
    );
    assert_eq!(
        tier.get_ranges(&small_key, &[(10, 3)]).await.unwrap(),
        small[10..13].to_vec()
    );
    assert!(tier.get_ranges(&small_key, &[]).await.unwrap().is_empty());

    // Ranges not wholly inside the object.
    assert_failed(
        tier.get_ranges(&big_key, &[(end - 5, 10)]).await,
        "a range over the end",
    );
    assert_failed(
        tier.get_ranges(&big_key, &[(end + 10, 1)]).await,
        "a range past the end",
    );
    assert_failed(
        tier.get_ranges(&big_key, &[(end - 100, 10), (end + 100, 10)])
            .await,
        "a range past the end merged with one inside",
    );

    // Missing objects.
    let missing = format!("{prefix}packs/{:016x}.pack", 99);
    match tier.get_ranges(&missing, &[(0, 1)]).await {
        Err(e @ ObjectError::NotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&missing) && msg.contains(tier.url()), "{msg}");
        }
        other => panic!("get_ranges of a missing key: {other:?}"),
    }
    match tier.get_to_file(&missing, &scratch.join("missing")).await {
        Err(ObjectError::NotFound { .. }) => {}
        other => panic!("get_to_file of a missing key: {other:?}"),
    }
    assert_eq!(tier.size(&missing).await.unwrap(), None);
    tier.delete(&missing).await.unwrap();

    // Listing: packs only, by id, with their sizes.
    tier.put_bytes(&tier.pack_key(0xdead_beef), Bytes::from_static(b"hello"))
        .await
        .unwrap();
    tier.put_bytes(&tier.pack_key(1), Bytes::new()).await.unwrap();
    for other in [
        "packs/readme.txt",
        "packs/zz.pack",
        "packs/00000000000000000.pack",
        "other/0000000000000002.pack",
    ] {
        tier.put_bytes(&format!("{prefix}{other}"), Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let packs = tier.list_packs().await.unwrap();
    assert_eq!(
        packs,
        vec![
            (1, 0),
            (7, big.len() as u64),
            (8, small.len() as u64),
            (0xdead_beef, 5)
        ]
    );

    // Delete.
    tier.delete(&big_key).await.unwrap();
    tier.delete(&big_key).await.unwrap();
    assert_eq!(tier.size(&big_key).await.unwrap(), None);
    match tier.get_ranges(&big_key, &[(0, 1)]).await {
        Err(ObjectError::NotFound { .. }) => {}
        other => panic!("get_ranges of a deleted key: {other:?}"),
    }
    let packs = tier.list_packs().await.unwrap();
    assert_eq!(packs, vec![(1, 0), (8, small.len() as u64), (0xdead_beef, 5)]);

    // Leave the bucket tidy.
    for (id, _) in packs {
        tier.delete(&tier.pack_key(id)).await.unwrap();
    }
    assert!(tier.list_packs().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn file_tier() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tier");
    let tier = ObjectTier::from_url(&format!("file://{}", root.display())).unwrap();
    assert!(root.is_dir(), "from_url creates the directory");
    assert_eq!(tier.pack_key(0xab), "packs/00000000000000ab.pack");
    exercise(&tier, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_tier() {
    let base = std::env::var("GRANARY_TEST_S3_URL").unwrap_or_else(|_| {
        panic!("GRANARY_TEST_S3_URL is not set; run the suite with ./scripts/test, which starts an S3 server")
    });
    let prefix = unique("object-tier");
    let tier = ObjectTier::from_url(&format!("{}/{prefix}", base.trim_end_matches('/'))).unwrap();
    assert_eq!(
        tier.pack_key(0xab),
        format!("{prefix}/packs/00000000000000ab.pack")
    );
    let scratch = tempfile::tempdir().unwrap();
    exercise(&tier, scratch.path()).await;
}

#[test]
fn bad_urls() {
    for url in [
        "",
        "/abs/path",
        "http://host/bucket",
        "gs://bucket",
        "s3://",
        "s3:///prefix",
        "file://relative/dir",
    ] {
        match ObjectTier::from_url(url) {
            Err(e @ ObjectError::BadUrl(_)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("s3://bucket") && msg.contains("file://"),
                    "{url}: {msg}"
                );
            }
            other => panic!("{url:?}: expected BadUrl, got {other:?}"),
        }
    }
}
