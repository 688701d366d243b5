//! End-to-end tests of the metadata cluster: real `granary server` processes
//! on loopback ports, crashed with kill -9 and restarted from their data
//! directories, driven through the client SDK and the `granary admin` CLI.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use granary_client::{proto, MetaClient};
use granary_core::tree::{EntryData, FileContent, Timestamp};
use granary_core::{ChunkId, ChunkRef, Tree, TreeEntry, TreeId};

const SEC: Duration = Duration::from_secs(1);

/// Commits `n` versions to `dataset` on top of `parent`, each with message
/// `"{prefix} {number}"`; returns the last version number.
async fn commit_chain(
    client: &MetaClient,
    dataset: &str,
    root: &TreeId,
    mut parent: Option<u64>,
    n: u64,
    prefix: &str,
) -> u64 {
    for _ in 0..n {
        let number = parent.unwrap_or(0) + 1;
        let v = client
            .commit_version(commit_req(dataset, root, parent, &format!("{prefix} {number}")))
            .await
            .unwrap_or_else(|e| panic!("commit {dataset}@{number}: {e}"));
        assert_eq!(
            v.number, number,
            "{dataset}: version numbers must follow the parent"
        );
        assert_eq!(v.parent, parent);
        parent = Some(number);
    }
    parent.unwrap_or(0)
}

/// The versions of `dataset`, sorted by number, checked to be exactly 1..=n.
async fn versions_of(client: &MetaClient, dataset: &str) -> Vec<proto::Version> {
    let mut vs = client
        .list_versions(dataset)
        .await
        .unwrap_or_else(|e| panic!("list versions of {dataset}: {e}"));
    vs.sort_by_key(|v| v.number);
    let numbers: Vec<u64> = vs.iter().map(|v| v.number).collect();
    let want: Vec<u64> = (1..=vs.len() as u64).collect();
    assert_eq!(numbers, want, "{dataset}: version numbers are not 1..=n");
    vs
}

/// Commits one version of `dataset` with `message` on top of the latest one,
/// retrying errors until `deadline`. A retried commit that was in fact
/// committed (the reply was lost) is recognized by its message.
async fn commit_retrying(
    client: &MetaClient,
    dataset: &str,
    root: &TreeId,
    message: &str,
    deadline: Instant,
) -> Result<proto::Version, String> {
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let parent = match client.get_version(dataset, None).await {
                Ok(v) if v.message == message => return Ok(v),
                Ok(v) => Some(v.number),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(format!("latest version: {e}")),
            };
            client
                .commit_version(commit_req(dataset, root, parent, message))
                .await
                .map_err(|e| format!("commit: {e}"))
        };
        match tokio::time::timeout(12 * SEC, attempt).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = e,
            Err(_) => last = "attempt timed out after 12 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last)
}

/// Requirement 1: a cluster formed with --join; 1,000 versions committed
/// through a follower reach every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_then_1000_commits_through_a_follower_reach_every_node() {
    let c = Cluster::start(3).await;
    let all = c.ids();
    let leader = c.wait_leader(&all, 10 * SEC).await;
    let follower = *all.iter().find(|&&i| i != leader).unwrap();
    // Every node lists every member at its address.
    for s in c.statuses(&all).await.unwrap() {
        assert_eq!(s.voters, all, "node {}", s.node_id);
        let want: BTreeMap<u64, String> = all.iter().map(|&i| (i, c.addr(i))).collect();
        assert_eq!(s.nodes, want, "node {}", s.node_id);
    }

    let client = c.client(follower);
    let (root, tree) = empty_tree();
    assert_eq!(client.put_trees(vec![(root, tree)]).await.unwrap(), 1);
    let started = Instant::now();
    assert_eq!(
        commit_chain(&client, "chain", &root, None, 1000, "version").await,
        1000
    );
    eprintln!(
        "1000 commits through follower {follower}: {:?}",
        started.elapsed()
    );
    let s = c.status(follower).await.unwrap();
    assert_eq!(s.state, "Follower", "the client's node must still be a follower");

    let st = c.wait_converged(&all, 30 * SEC).await;
    assert!(st.applied_index.unwrap() >= 1000, "{st:?}");

    let vs = versions_of(&client, "chain").await;
    assert_eq!(vs.len(), 1000);
    for v in &vs {
        assert_eq!(v.message, format!("version {}", v.number));
        assert_eq!(v.parent, v.number.checked_sub(1).filter(|&p| p > 0));
        assert_eq!(v.root, root.as_bytes().to_vec());
        assert_eq!(v.dataset, "chain");
    }
    // Every node serves the same history.
    for &id in &all {
        let cl = c.client(id);
        assert_eq!(
            cl.get_version("chain", None).await.unwrap().number,
            1000,
            "node {id}"
        );
        let ds = cl.list_datasets().await.unwrap();
        let chain = ds.iter().find(|d| d.name == "chain").expect("dataset listed");
        assert_eq!((chain.versions, chain.latest), (1000, 1000), "node {id}");
    }
}

/// Requirement 2: kill -9 the leader; a new leader takes over and commits
/// through a surviving node resume within 5 s; the old leader restarts from
/// its data directory and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_new_leader_within_5s_and_old_leader_catches_up() {
    let mut c = Cluster::start(3).await;
    let all = c.ids();
    let old = c.wait_leader(&all, 10 * SEC).await;
    let survivors: Vec<u64> = all.iter().copied().filter(|&i| i != old).collect();
    let via = survivors[0];
    let client = c.client(via);
    let (root, tree) = empty_tree();
    client.put_trees(vec![(root, tree)]).await.unwrap();
    commit_chain(&client, "failover", &root, None, 20, "before").await;
    let term = c.status(old).await.unwrap().term;

    c.kill(old);
    let killed = Instant::now();
    let v = commit_retrying(&client, "failover", &root, "first after crash", killed + 20 * SEC)
        .await
        .unwrap_or_else(|e| panic!("no commit within 20 s of the leader's crash: {e}"));
    let took = killed.elapsed();
    eprintln!("first commit {took:?} after killing leader {old}");
    assert_eq!(v.number, 21);
    assert!(
        took < 5 * SEC,
        "commits resumed only {took:?} after the leader crashed (want < 5 s)"
    );

    let new = c.wait_leader(&survivors, 10 * SEC).await;
    assert_ne!(new, old);
    assert!(
        c.status(new).await.unwrap().term > term,
        "a new leader needs a new term"
    );
    commit_chain(&client, "failover", &root, Some(21), 19, "after").await;

    c.restart(old);
    let st = c.wait_converged(&all, 30 * SEC).await;
    assert!(st.applied_index.unwrap() >= 40);
    let s = c.status(old).await.unwrap();
    assert!(s.voters == all, "the restarted node lost its membership: {s:?}");
    // The restarted node serves the whole history.
    let vs = versions_of(&c.client(old), "failover").await;
    assert_eq!(vs.len(), 40);
    assert_eq!(vs[0].message, "before 1");
    assert_eq!(vs[20].message, "first after crash");
    assert_eq!(vs[39].message, "after 40");
}

/// Requirement 3: a follower is down while more than 20,000 entries are
/// committed, so the log it needs is purged; after a restart it catches up
/// through a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_down_for_20000_entries_catches_up_through_a_snapshot() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 20_000 / TASKS + 1; // 20,032 commits in all
    let mut c = Cluster::start(3).await;
    let all = c.ids();
    let leader = c.wait_leader(&all, 10 * SEC).await;
    let lagger = *all.iter().find(|&&i| i != leader).unwrap();
    let others: Vec<u64> = all.iter().copied().filter(|&i| i != lagger).collect();
    let client = c.client_of(&others);
    let (root, tree) = empty_tree();
    client.put_trees(vec![(root, tree)]).await.unwrap();
    commit_chain(&client, "early", &root, None, 3, "early").await;
    c.wait_converged(&all, 20 * SEC).await;
    let before = c.status(lagger).await.unwrap();
    let old_last = before.last_log_index.unwrap();

    c.kill(lagger);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let ds = format!("load-{t}");
                for n in 1..=PER_TASK {
                    let parent = (n > 1).then_some(n - 1);
                    let req = commit_req(&ds, &root, parent, &format!("{ds} {n}"));
                    let v = client
                        .commit_version(req)
                        .await
                        .map_err(|e| format!("commit {ds}@{n}: {e}"))?;
                    if v.number != n {
                        return Err(format!("commit {ds}@{n} got number {}", v.number));
                    }
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    eprintln!(
        "{} commits with {TASKS} tasks while node {lagger} was down: {:?}",
        TASKS * PER_TASK,
        started.elapsed()
    );

    // The survivors' logs moved on by 20,000+ entries and were purged past
    // everything the lagging node has, so it can only catch up through a
    // snapshot. (A snapshot is built every 10,000 applied entries and keeps
    // 1,000 entries of log behind it; whether the second one is due yet
    // depends on how many other entries, such as heartbeats, interleaved,
    // so the test asks only for what the claim needs.)
    let leader = c.wait_leader(&others, 10 * SEC).await;
    let ls = wait_for("the leader to purge its log", 30 * SEC, || async {
        let s = c.status(leader).await?;
        match s.purged_index {
            Some(p) if p > old_last + 1_000 => Ok(s),
            _ => Err(format!(
                "purged {:?}, snapshot {:?}",
                s.purged_index, s.snapshot_index
            )),
        }
    })
    .await;
    assert!(
        ls.last_log_index.unwrap() >= old_last + TASKS * PER_TASK,
        "{ls:?}"
    );
    let purged = ls.purged_index.unwrap();

    c.restart(lagger);
    let s = wait_for("the restarted node to install a snapshot", 60 * SEC, || async {
        let s = c.status(lagger).await?;
        match s.snapshot_index {
            Some(i) if i >= purged => Ok(s),
            other => Err(format!("snapshot {other:?}, applied {:?}", s.applied_index)),
        }
    })
    .await;
    assert!(s.snapshot_index.unwrap() > purged, "{s:?}");
    let st = c.wait_converged(&all, 60 * SEC).await;
    assert!(st.applied_index.unwrap() >= old_last + TASKS * PER_TASK);

    // The restarted node serves what it received through the snapshot.
    let lc = c.client(lagger);
    let ds = lc.list_datasets().await.unwrap();
    let loaded: Vec<_> = ds.iter().filter(|d| d.name.starts_with("load-")).collect();
    assert_eq!(loaded.len() as u64, TASKS);
    assert!(
        loaded
            .iter()
            .all(|d| d.latest == PER_TASK && d.versions == PER_TASK),
        "{loaded:?}"
    );
    let v = lc.get_version("load-17", Some(PER_TASK / 2)).await.unwrap();
    assert_eq!(v.message, format!("load-17 {}", PER_TASK / 2));
    assert_eq!(versions_of(&lc, "early").await.len(), 3);
}

/// Asserts that a write through `client` fails, with a message starting
/// "no quorum", within 15 s.
/// The commit names the dataset's latest version as its parent, so that
/// nothing but the missing quorum can make it fail.
async fn assert_no_quorum(client: &MetaClient, root: &TreeId, parent: u64, what: &str) {
    let started = Instant::now();
    let r = tokio::time::timeout(
        20 * SEC,
        client.commit_version(commit_req(
            "keep",
            root,
            Some(parent),
            &format!("no quorum: {what}"),
        )),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: a write without quorum hangs (> 20 s)"));
    let took = started.elapsed();
    let e = r.expect_err("a write without quorum succeeded");
    eprintln!("{what}: write failed after {took:?}: {e}");
    let msg = e.to_string();
    assert!(msg.starts_with("no quorum"), "{what}: {msg}");
    assert_eq!(code_name(&e), "Unavailable", "{what}: {msg}");
    assert!(took < 15 * SEC, "{what}: the write took {took:?} to fail");
}

/// Requirement 4: with 2 of 3 nodes down writes fail fast with "no quorum";
/// once a majority is back they resume, and nothing committed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_quorum_fails_fast_and_nothing_committed_is_lost() {
    let mut c = Cluster::start(3).await;
    let all = c.ids();
    let leader = c.wait_leader(&all, 10 * SEC).await;
    let f: Vec<u64> = all.iter().copied().filter(|&i| i != leader).collect();
    let (a, b) = (f[0], f[1]);
    let (root, tree) = empty_tree();
    c.client(leader).put_trees(vec![(root, tree)]).await.unwrap();
    commit_chain(&c.client(leader), "keep", &root, None, 30, "keep").await;
    commit_chain(&c.client(a), "other", &root, None, 5, "other").await;
    c.wait_converged(&all, 20 * SEC).await;

    // Both followers down: the leader cannot commit.
    c.kill(a);
    c.kill(b);
    assert_no_quorum(&c.client(leader), &root, 30, "leader alone").await;

    // One follower back: a majority again.
    c.restart(a);
    let deadline = Instant::now() + 30 * SEC;
    let resumed = commit_retrying(&c.client(leader), "keep", &root, "resumed 1", deadline)
        .await
        .unwrap_or_else(|e| panic!("writes did not resume with nodes {leader} and {a}: {e}"));

    // Now the leader goes too: the lone follower has no leader and no quorum.
    c.kill(leader);
    assert_no_quorum(&c.client(a), &root, resumed.number, "follower alone").await;

    // The other follower, down all along, comes back: it must learn from `a`
    // everything committed while it was away.
    c.restart(b);
    let deadline = Instant::now() + 30 * SEC;
    let resumed2 = commit_retrying(&c.client(b), "keep", &root, "resumed 2", deadline)
        .await
        .unwrap_or_else(|e| panic!("writes did not resume with nodes {a} and {b}: {e}"));
    assert!(resumed2.number > resumed.number);

    c.restart(leader);
    c.wait_converged(&all, 30 * SEC).await;
    for &id in &all {
        let cl = c.client(id);
        let keep = versions_of(&cl, "keep").await;
        for (i, v) in keep.iter().take(30).enumerate() {
            assert_eq!(v.message, format!("keep {}", i + 1), "node {id}");
        }
        // Only the writes that failed for lack of quorum may or may not be there.
        let rest: Vec<&str> = keep[30..]
            .iter()
            .map(|v| v.message.as_str())
            .filter(|m| !m.starts_with("no quorum"))
            .collect();
        assert_eq!(rest, ["resumed 1", "resumed 2"], "node {id}");
        let other = versions_of(&cl, "other").await;
        assert_eq!(other.len(), 5, "node {id}");
    }
}

fn random_id() -> [u8; 32] {
    let mut b = [0u8; 32];
    b.iter_mut().for_each(|x| *x = fastrand::u8(..));
    b
}

/// Requirement 5: bad input gets the right code and a readable one-line
/// message, and leaves the state exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_clear_errors_and_changes_nothing() {
    let c = Cluster::start(1).await;
    let client = c.client(1);
    let (root, tree) = empty_tree();
    client.put_trees(vec![(root, tree)]).await.unwrap();
    commit_chain(&client, "good", &root, None, 2, "good").await;
    let digest = c.wait_converged(&[1], 10 * SEC).await.digest;

    // Invalid dataset names, in every call that takes one.
    let long = "a".repeat(256);
    for name in [
        "",
        "/",
        "..",
        long.as_str(),
        "bad\nname",
        "tab\tname",
        "nul\0name",
    ] {
        let what = format!("dataset name {name:?}");
        let invalid = |m: &str| m.starts_with("invalid dataset name");
        expect_err(
            &what,
            client.create_dataset(name).await,
            "InvalidArgument",
            invalid,
        );
        expect_err(
            &what,
            client.commit_version(commit_req(name, &root, None, "x")).await,
            "InvalidArgument",
            invalid,
        );
    }
    // 255 bytes is the limit, not an error (checked without creating it).
    let max = "b".repeat(255);
    expect_err(
        "255-byte name",
        client.get_version(&max, None).await,
        "NotFound",
        |_| true,
    );

    // Unknown dataset and version.
    expect_err(
        "unknown dataset",
        client.get_version("nope", None).await,
        "NotFound",
        |m| m.contains("nope"),
    );
    expect_err(
        "unknown dataset",
        client.list_versions("nope").await,
        "NotFound",
        |m| m.contains("nope"),
    );
    expect_err(
        "unknown version",
        client.get_version("good", Some(99)).await,
        "NotFound",
        |m| m.contains("99"),
    );

    // Stale parents: none when the dataset has versions, an old one, a future one.
    for parent in [None, Some(1), Some(7)] {
        let r = client
            .commit_version(commit_req("good", &root, parent, "stale"))
            .await;
        expect_err(&format!("parent {parent:?}"), r, "FailedPrecondition", |m| {
            m.contains("stale parent")
        });
    }
    // A parent on a dataset that has no version yet.
    let r = client
        .commit_version(commit_req("fresh", &root, Some(1), "stale"))
        .await;
    expect_err("parent on a new dataset", r, "FailedPrecondition", |m| {
        m.contains("stale parent")
    });

    // A root tree that is not stored.
    let missing = TreeId::from_slice(&random_id()).unwrap();
    let r = client
        .commit_version(commit_req("good", &missing, Some(2), "missing root"))
        .await;
    expect_err("missing root", r, "FailedPrecondition", |m| {
        m.contains(&missing.to_hex())
    });
    let r = client
        .commit_version(commit_req("newds", &missing, None, "missing root"))
        .await;
    expect_err("missing root, new dataset", r, "FailedPrecondition", |m| {
        m.contains(&missing.to_hex())
    });
    let r = client
        .commit_version(proto::CommitRequest {
            root: vec![1, 2, 3],
            ..commit_req("good", &root, Some(2), "short root")
        })
        .await;
    expect_err("malformed root id", r, "InvalidArgument", |_| true);

    // A tree object whose id is not the hash of its bytes.
    let (_, empty) = empty_tree();
    let wrong = TreeId::of(b"something else");
    let r = client.put_trees(vec![(wrong, empty.clone())]).await;
    let actual = TreeId::of(&empty).to_hex();
    expect_err("tree with a wrong id", r, "InvalidArgument", |m| {
        m.contains(&wrong.to_hex()) || m.contains(&actual)
    });
    // Bytes that are not a tree at all.
    let junk = b"not a tree".to_vec();
    let r = client.put_trees(vec![(TreeId::of(&junk), junk)]).await;
    expect_err("undecodable tree", r, "InvalidArgument", |_| true);

    // A tree referencing a chunk that is not stored.
    let chunk = ChunkId::of(b"never uploaded");
    let file = TreeEntry {
        name: b"data.bin".to_vec(),
        mode: 0o644,
        mtime: Timestamp::default(),
        data: EntryData::File {
            size: 14,
            content: FileContent::Inline(vec![ChunkRef { id: chunk, len: 14 }]),
        },
    };
    let t = Tree::new(vec![file]).unwrap().encode();
    let r = client.put_trees(vec![(TreeId::of(&t), t)]).await;
    expect_err("missing chunk", r, "FailedPrecondition", |m| {
        m.contains(&chunk.to_hex())
    });
    // A tree referencing a subtree that is not stored.
    let sub = TreeId::of(b"no such subtree");
    let dir = TreeEntry {
        name: b"sub".to_vec(),
        mode: 0o755,
        mtime: Timestamp::default(),
        data: EntryData::Dir { tree: sub },
    };
    let t = Tree::new(vec![dir]).unwrap().encode();
    let r = client.put_trees(vec![(TreeId::of(&t), t)]).await;
    expect_err("missing subtree", r, "FailedPrecondition", |m| {
        m.contains(&sub.to_hex())
    });

    // None of that changed anything.
    let after = c.wait_converged(&[1], 10 * SEC).await;
    assert_eq!(after.digest, digest, "refused requests changed the state");
    assert_eq!(versions_of(&client, "good").await.len(), 2);
    for ds in ["fresh", "newds", "nope"] {
        expect_err(ds, client.list_versions(ds).await, "NotFound", |_| true);
    }

    // The digest does see real changes: a forced commit over a stale parent.
    let v = client
        .commit_version(proto::CommitRequest {
            force: true,
            ..commit_req("good", &root, Some(1), "forced")
        })
        .await
        .unwrap();
    assert_eq!(v.number, 3);
    let changed = c.wait_converged(&[1], 10 * SEC).await;
    assert_ne!(changed.digest, digest);
}

/// `granary admin status` (text and JSON) and `granary admin remove-node`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_and_remove_node_through_the_cli() {
    let c = Cluster::start(3).await;
    let all = c.ids();
    let leader = c.wait_leader(&all, 10 * SEC).await;
    let a1 = c.addr(1);

    let v = c.admin_status(1).unwrap();
    let node: NodeStatus = serde_json::from_value(v["node"].clone()).unwrap();
    assert_eq!(node.node_id, 1);
    assert_eq!(node.addr, a1);
    assert_eq!(node.voters, all);
    assert_eq!(node.leader, Some(leader));
    assert_eq!(node.digest.len(), 64);
    let cluster = v["cluster"].as_array().expect("cluster array");
    assert_eq!(cluster.len(), 3, "{v}");
    let mut seen: Vec<u64> = cluster
        .iter()
        .map(|m| {
            let s: NodeStatus =
                serde_json::from_value(m.clone()).unwrap_or_else(|e| panic!("member {m}: {e}"));
            assert_eq!(s.addr, c.addr(s.node_id));
            assert_eq!(s.state == "Leader", s.node_id == leader, "{m}");
            s.node_id
        })
        .collect();
    seen.sort();
    assert_eq!(seen, all);

    let o = c.cli(&["admin", "status", "--server", &a1]);
    assert!(
        o.status.success(),
        "admin status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    eprintln!("granary admin status:\n{text}");
    assert!(text.contains("Leader"), "{text}");
    assert!(text.contains("Follower"), "{text}");
    for &id in &all {
        assert!(text.contains(&c.addr(id)), "text status lacks node {id}:\n{text}");
    }

    // Through a follower when possible: it must forward the change to the leader.
    let via = if leader == 1 { 2 } else { 1 };
    let o = c.cli(&["admin", "remove-node", "3", "--server", &c.addr(via)]);
    assert!(
        o.status.success(),
        "remove-node failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for id in [1, 2] {
        let s = c.wait_voters(id, &[1, 2], 10 * SEC).await;
        assert!(!s.nodes.contains_key(&3), "node {id} still lists node 3: {s:?}");
    }
    let v = c.admin_status(2).unwrap();
    assert_eq!(v["cluster"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["node"]["voters"], serde_json::json!([1, 2]));

    // Removing a node that is not a member is an error, in one line.
    let o = c.cli(&["admin", "remove-node", "9", "--server", &a1]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );

    // The two remaining nodes still commit.
    let client = c.client(2);
    let (root, tree) = empty_tree();
    client.put_trees(vec![(root, tree)]).await.unwrap();
    let v = client
        .commit_version(commit_req("after-remove", &root, None, "x"))
        .await
        .unwrap();
    assert_eq!(v.number, 1);
}
