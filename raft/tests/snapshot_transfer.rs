//! Two real nodes on loopback: a node that joins after the leader purged its
//! log catches up through a snapshot streamed over the peer protocol in many
//! chunks.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Kv;
use granary_raft::network::PeerService;
use granary_raft::{NodeConfig, NodeId, RaftNode};
use tempfile::TempDir;

/// Opens node `id` and serves its peer protocol on a free loopback port.
async fn start(id: NodeId, dir: &Path) -> (RaftNode<Kv>, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cfg = NodeConfig::new(id, addr.clone(), dir);
    // Small chunks, so that even this small snapshot takes many of them.
    cfg.raft.snapshot_max_chunk_size = 64 << 10;
    let node = RaftNode::open(cfg, Kv).await.unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(PeerService::server(node.clone()))
        .serve(addr.parse().unwrap());
    tokio::spawn(server);
    (node, addr)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_catches_up_through_a_snapshot_sent_in_chunks() {
    let dir = TempDir::new().unwrap();
    let (a, a_addr) = start(1, &dir.path().join("a")).await;
    a.bootstrap_or_join(None).await.unwrap();
    let value = "v".repeat(4096);
    let mut last = 0;
    for i in 0..300 {
        let reply = a.write(format!("key{i:04}={value}").into_bytes()).await.unwrap();
        last = u64::from_be_bytes(reply.try_into().expect("the reply is the entry's index"));
    }

    // Snapshot everything and drop the log behind it, so a new node can
    // only catch up through the snapshot (~1.2 MiB: ~19 chunks of 64 KiB).
    a.raft().trigger().snapshot().await.unwrap();
    eventually("the snapshot is built", async || {
        a.status().await.unwrap().snapshot_index == Some(last)
    })
    .await;
    a.raft().trigger().purge_log(last).await.unwrap();
    eventually("the log is purged", async || {
        a.status().await.unwrap().purged_index == Some(last)
    })
    .await;

    let (b, _) = start(2, &dir.path().join("b")).await;
    b.bootstrap_or_join(Some(&a_addr)).await.unwrap();
    eventually("node 2 has the leader's state", async || {
        let (sa, sb) = (a.status().await.unwrap(), b.status().await.unwrap());
        sb.digest_index == sa.digest_index && sb.digest == sa.digest
    })
    .await;
    let status = b.status().await.unwrap();
    assert_eq!(status.snapshot_index, Some(last), "node 2 installed the snapshot");
    assert_eq!(status.voters, vec![1, 2]);
    a.shutdown().await;
    b.shutdown().await;
}

/// A snapshot for a peer that cannot be reached must fail as a network error,
/// which openraft retries. (It once failed as a storage error when the
/// transport dropped the chunk stream before the call reported why, and
/// openraft stops a node on a storage error: a follower being down took the
/// leader's Raft down with it.)
#[tokio::test]
async fn snapshot_to_an_unreachable_peer_is_a_network_error() {
    use granary_raft::network::NetworkFactory;
    use granary_raft::TypeConfig;
    use openraft::error::StreamingError;
    use openraft::network::{RPCOption, RaftNetworkFactory};
    use openraft::type_config::alias::VoteOf;
    use openraft::{BasicNode, RaftNetworkV2};

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("snap");
    std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut client = NetworkFactory::default()
        .new_client(2, &BasicNode::new(format!("127.0.0.1:{port}")))
        .await;
    for _ in 0..20 {
        let snapshot = granary_raft::store::Snapshot {
            meta: Default::default(),
            snapshot: tokio::fs::File::open(&path).await.unwrap(),
        };
        let err = client
            .full_snapshot(
                VoteOf::<TypeConfig>::new(1, 1),
                snapshot,
                std::future::pending(),
                RPCOption::new(Duration::from_secs(5)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, StreamingError::Unreachable(_) | StreamingError::Network(_)),
            "{err}"
        );
    }
}
