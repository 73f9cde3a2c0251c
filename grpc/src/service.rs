//! The Snapshots service: each call runs the store's method on a blocking thread and maps
//! its result to the message and gRPC code containerd expects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use strata::{AnyStore, ErrorKind, Labels};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::services::snapshots::v1::snapshots_server::Snapshots;
use crate::proto::containerd::types as pbtypes;

/// How many snapshots one List message carries (containerd's own server sends 100).
const LIST_BATCH: usize = 100;

/// The store a server shares between its calls.
pub type SharedStore = Arc<dyn AnyStore + Send + Sync>;

/// containerd's `snapshots.v1.Snapshots` service over a strata store.
#[derive(Clone)]
pub struct SnapshotService {
    store: SharedStore,
}

impl SnapshotService {
    /// Serves `store`.
    pub fn new(store: SharedStore) -> SnapshotService {
        SnapshotService { store }
    }

    /// Runs `f` on a blocking thread (the store does file system and SQLite work) and logs
    /// the call: at debug level when it worked, at info when the store said no (containerd
    /// probes with calls that fail on purpose, e.g. Stat of a snapshot it may not have yet).
    async fn call<T, F>(&self, op: &'static str, key: String, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn AnyStore) -> strata::Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| {
                Status::internal(format!("{op} {key:?}: the call's worker failed: {e}"))
            })?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(v) => {
                tracing::debug!(op, key = %key, ms, "done");
                Ok(v)
            }
            Err(e) => {
                let status = status(&e);
                if status.code() == Code::Internal || status.code() == Code::DataLoss {
                    tracing::warn!(op, key = %key, ms, error = %e, "failed");
                } else {
                    tracing::info!(op, key = %key, ms, error = %e, "refused");
                }
                Err(status)
            }
        }
    }
}

/// The gRPC status for a store error: containerd's `errdefs.FromGRPC` turns the first four
/// codes back into its own error classes (AlreadyExists lets it skip an unpack, NotFound makes
/// it unpack). The message is the store's, which names the snapshot and what to do.
pub fn status(e: &strata::Error) -> Status {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        // Retrying later helps: containerd maps Unavailable to its ErrUnavailable.
        ErrorKind::Busy | ErrorKind::Closed => Code::Unavailable,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn parent(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

fn labels(m: std::collections::HashMap<String, String>) -> Labels {
    m.into_iter().collect()
}

fn mounts(ms: Vec<strata::Mount>) -> Vec<pbtypes::Mount> {
    ms.into_iter()
        .map(|m| pbtypes::Mount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind(k: strata::Kind) -> i32 {
    match k {
        strata::Kind::View => pb::Kind::View as i32,
        strata::Kind::Active => pb::Kind::Active as i32,
        strata::Kind::Committed => pb::Kind::Committed as i32,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn info(i: strata::Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: kind(i.kind),
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

/// The strata Info an Update names: only the name and the labels matter to the store.
fn info_from(i: pb::Info) -> strata::Info {
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    strata::Info {
        kind: match pb::Kind::try_from(i.kind) {
            Ok(pb::Kind::View) => strata::Kind::View,
            Ok(pb::Kind::Active) => strata::Kind::Active,
            _ => strata::Kind::Committed,
        },
        name: i.name,
        parent: parent(i.parent),
        labels: labels(i.labels),
        created: time(i.created_at),
        updated: time(i.updated_at),
    }
}

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let ms = self
            .call("prepare", key, move |s| {
                s.prepare(&r.key, parent(r.parent).as_deref(), labels(r.labels))
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let ms = self
            .call("view", key, move |s| {
                s.view(&r.key, parent(r.parent).as_deref(), labels(r.labels))
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let ms = self.call("mounts", key, move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(ms) }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let what = format!("{} -> {}", r.key, r.name);
        self.call("commit", what, move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        self.call("remove", key, move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let i = self.call("stat", key, move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(wanted) = r.info else {
            return Err(Status::invalid_argument(
                "update: the request has no info (name and labels of the snapshot to update)",
            ));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let wanted = info_from(wanted);
        let key = wanted.name.clone();
        let i = self
            .call("update", key, move |s| {
                let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
                s.update(&wanted, &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream = ReceiverStream<Result<pb::ListSnapshotsResponse, Status>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = Arc::clone(&self.store);
        // The walk runs on a blocking thread and sends a message per LIST_BATCH snapshots as
        // it goes: a large store streams without being held in memory. A client that goes
        // away stops the walk.
        tokio::task::spawn_blocking(move || {
            let gone = AtomicBool::new(false);
            let filters_ref: Vec<&str> = filters.iter().map(String::as_str).collect();
            let mut batch = Vec::with_capacity(LIST_BATCH);
            let send = |batch: Vec<pb::Info>| -> strata::Result<()> {
                if tx
                    .blocking_send(Ok(pb::ListSnapshotsResponse { info: batch }))
                    .is_err()
                {
                    gone.store(true, Ordering::Relaxed);
                    return Err(strata::Error::invalid("list", "the client went away"));
                }
                Ok(())
            };
            let walked = store.walk(&filters_ref, &mut |i| {
                batch.push(info(i.clone()));
                if batch.len() == LIST_BATCH {
                    send(std::mem::take(&mut batch))?;
                }
                Ok(())
            });
            let walked = walked.and_then(|()| {
                if batch.is_empty() {
                    Ok(())
                } else {
                    send(batch)
                }
            });
            match walked {
                Ok(()) => tracing::debug!(op = "list", ?filters, "done"),
                Err(_) if gone.load(Ordering::Relaxed) => {
                    tracing::info!(op = "list", "the client went away")
                }
                Err(e) => {
                    tracing::info!(op = "list", ?filters, error = %e, "refused");
                    let _ = tx.blocking_send(Err(status(&e)));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let u = self.call("usage", key, move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("cleanup", String::new(), |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
