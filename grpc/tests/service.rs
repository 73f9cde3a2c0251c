//! The Snapshots service over a real store and a real unix socket, called with the generated
//! gRPC client: the codes containerd's `errdefs` expects for each refusal, what the messages
//! carry, List streamed in batches, and a shutdown that lets a call in flight finish.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_grpc::proto::containerd::services::snapshots::v1 as pb;
use strata_grpc::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use strata_grpc::SharedStore;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

/// A server on a native store in `dir`, its client, and the trigger that stops it.
struct Served {
    client: SnapshotsClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), strata_grpc::Error>>,
    store: SharedStore,
}

async fn serve(dir: &Path) -> Served {
    let store: SharedStore = Arc::new(strata_tests::native_store(&dir.join("store")));
    let socket = dir.join("s.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(strata_grpc::run(
        Arc::clone(&store),
        listener,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(20),
    ));
    let client = strata_grpc::connect(&socket).await.unwrap();
    Served {
        client,
        stop: Some(stop),
        server,
        store,
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<strata_grpc::proto::containerd::types::Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "strata".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(&[("containerd.io/snapshot.ref", key)]),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn commit(
    c: &mut SnapshotsClient<Channel>,
    name: &str,
    key: &str,
) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "strata".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(&[("layer", name)]),
    })
    .await
    .map(|_| ())
}

/// Asserts `r` failed with `code` and a message naming `about`.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, about: &str) {
    let status = r.expect_err("the call should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(about),
        "the message names {about:?}: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_has_the_code_containerd_expects() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(dir.path()).await;
    let c = &mut s.client;

    let mounts = prepare(c, "ns/1/a", "").await.unwrap();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(!mounts[0].source.is_empty(), "{mounts:?}");
    // AlreadyExists is what lets containerd skip an unpack.
    refused(
        prepare(c, "ns/1/a", "").await,
        Code::AlreadyExists,
        "ns/1/a",
    );
    refused(
        prepare(c, "ns/2/b", "ns/9/missing").await,
        Code::NotFound,
        "ns/9/missing",
    );
    refused(prepare(c, "", "").await, Code::InvalidArgument, "key");
    commit(c, "ns/3/base", "ns/1/a").await.unwrap();
    refused(
        commit(c, "ns/3/other", "ns/1/a").await,
        Code::NotFound,
        "ns/1/a",
    );
    prepare(c, "ns/4/child", "ns/3/base").await.unwrap();
    // A committed snapshot has no mounts; a parent with children cannot go.
    refused(
        c.mounts(pb::MountsRequest {
            snapshotter: "strata".into(),
            key: "ns/3/base".into(),
        })
        .await,
        Code::FailedPrecondition,
        "ns/3/base",
    );
    refused(
        c.remove(pb::RemoveSnapshotRequest {
            snapshotter: "strata".into(),
            key: "ns/3/base".into(),
        })
        .await,
        Code::FailedPrecondition,
        "ns/3/base",
    );
    refused(
        c.stat(pb::StatSnapshotRequest {
            snapshotter: "strata".into(),
            key: "ns/0/nothing".into(),
        })
        .await,
        Code::NotFound,
        "ns/0/nothing",
    );
    refused(
        c.usage(pb::UsageRequest {
            snapshotter: "strata".into(),
            key: "ns/0/nothing".into(),
        })
        .await,
        Code::NotFound,
        "ns/0/nothing",
    );

    // Stat carries what containerd shows.
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: "strata".into(),
            key: "ns/4/child".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, pb::Kind::Active as i32);
    assert_eq!(info.parent, "ns/3/base");
    assert_eq!(
        info.labels
            .get("containerd.io/snapshot.ref")
            .map(String::as_str),
        Some("ns/4/child")
    );
    let created = info.created_at.unwrap();
    assert!(created.seconds > 1_600_000_000, "{created:?}");

    // Update: a field mask of labels.<k> sets or deletes one label; other paths are refused.
    let mut wanted = info.clone();
    wanted.labels = labels(&[("new", "1")]);
    let updated = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "strata".into(),
            info: Some(wanted.clone()),
            update_mask: Some(prost_types_mask(&[
                "labels.new",
                "labels.containerd.io/snapshot.ref",
            ])),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels, labels(&[("new", "1")]));
    refused(
        c.update(pb::UpdateSnapshotRequest {
            snapshotter: "strata".into(),
            info: Some(wanted.clone()),
            update_mask: Some(prost_types_mask(&["parent"])),
        })
        .await,
        Code::InvalidArgument,
        "parent",
    );
    refused(
        c.update(pb::UpdateSnapshotRequest {
            snapshotter: "strata".into(),
            info: None,
            update_mask: None,
        })
        .await,
        Code::InvalidArgument,
        "info",
    );

    // Usage counts what was written into the active snapshot.
    let mounts = prepare(c, "ns/5/u", "").await.unwrap();
    std::fs::write(Path::new(&mounts[0].source).join("f"), vec![7u8; 64 << 10]).unwrap();
    let usage = c
        .usage(pb::UsageRequest {
            snapshotter: "strata".into(),
            key: "ns/5/u".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size >= 64 << 10 && usage.inodes >= 1, "{usage:?}");

    // A malformed filter ends the List stream with InvalidArgument.
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "strata".into(),
            filters: vec!["labels.\"unclosed==1".into()],
        })
        .await
        .unwrap()
        .into_inner();
    refused(stream.message().await, Code::InvalidArgument, "filter");

    // Remove then Cleanup reclaims the storage.
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "strata".into(),
        key: "ns/5/u".into(),
    })
    .await
    .unwrap();
    c.cleanup(pb::CleanupRequest {
        snapshotter: "strata".into(),
    })
    .await
    .unwrap();
    assert!(
        !Path::new(&mounts[0].source).exists(),
        "cleanup reclaimed {}",
        mounts[0].source
    );

    s.stop.take().unwrap().send(()).unwrap();
    s.server.await.unwrap().unwrap();
    drop(s.store);
}

fn prost_types_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_in_batches_and_a_shutdown_lets_it_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(dir.path()).await;
    // Made through the store directly: this test is about the stream.
    let n = 250;
    for i in 0..n {
        let key = format!("ns/{i}/active");
        s.store.prepare(&key, None, strata::Labels::new()).unwrap();
        let mut l = strata::Labels::new();
        l.insert("parity".into(), (i % 2).to_string());
        s.store.commit(&format!("ns/{i}/layer"), &key, l).unwrap();
    }
    let c = &mut s.client;
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "strata".into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.info.len(), 100, "a full batch first");
    // Stop the server while the stream is in flight: it must still deliver everything.
    s.stop.take().unwrap().send(()).unwrap();
    let mut sizes = vec![first.info.len()];
    let mut names: Vec<String> = first.info.into_iter().map(|i| i.name).collect();
    while let Some(m) = stream.message().await.unwrap() {
        sizes.push(m.info.len());
        names.extend(m.info.into_iter().map(|i| i.name));
    }
    assert_eq!(sizes, vec![100, 100, 50]);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n);
    tokio::time::timeout(Duration::from_secs(10), s.server)
        .await
        .expect("the server stops once the stream is done")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_are_containerds() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(dir.path()).await;
    let c = &mut s.client;
    prepare(c, "ns/1/a", "").await.unwrap();
    commit(c, "ns/2/base", "ns/1/a").await.unwrap();
    prepare(c, "ns/3/b", "ns/2/base").await.unwrap();
    // containerd asks this after AlreadyExists on an unpack: the chain's snapshot by its ref.
    let list = |filters: Vec<&str>| {
        let mut c = c.clone();
        let filters = filters.into_iter().map(String::from).collect();
        async move {
            let mut stream = c
                .list(pb::ListSnapshotsRequest {
                    snapshotter: "strata".into(),
                    filters,
                })
                .await
                .unwrap()
                .into_inner();
            let mut names = Vec::new();
            while let Some(m) = stream.message().await.unwrap() {
                names.extend(m.info.into_iter().map(|i| i.name));
            }
            names.sort();
            names
        }
    };
    assert_eq!(list(vec![]).await, ["ns/2/base", "ns/3/b"]);
    assert_eq!(list(vec!["kind==committed"]).await, ["ns/2/base"]);
    assert_eq!(list(vec!["parent==ns/2/base"]).await, ["ns/3/b"]);
    assert_eq!(
        list(vec![
            r#"labels."containerd.io/snapshot.ref"==ns/3/b,parent==ns/2/base"#
        ])
        .await,
        ["ns/3/b"]
    );
    assert_eq!(
        list(vec!["name==ns/3/b", "kind==committed"]).await,
        ["ns/2/base", "ns/3/b"]
    );
    s.stop.take().unwrap().send(()).unwrap();
    s.server.await.unwrap().unwrap();
}
