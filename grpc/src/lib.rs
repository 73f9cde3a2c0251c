//! strata as a containerd proxy snapshotter: containerd's `snapshots.v1` gRPC API served
//! over a strata store on a unix socket.
//!
//! containerd loads it with
//!
//! ```toml
//! [proxy_plugins.strata]
//!   type = "snapshot"
//!   address = "/run/strata/strata.sock"
//!   capabilities = ["remap-ids"]
//! ```
//!
//! ([`proxy_plugin_config`]; `strata serve --print-config` prints it for a root). A proxy
//! plugin cannot tell containerd its capabilities over the API: containerd (1.7 and later)
//! reads them from this configuration. `remap-ids` says the snapshotter presents snapshots
//! prepared with the `containerd.io/snapshot/uidmapping`/`gidmapping` labels under those ids
//! itself ([`strata::idmap`]), so containerd does not chown a copy of the image; containerd
//! 1.6 ignores the key and passes the labels when asked (`ctr run --remap-labels`).
//!
//! and calls Prepare, View, Mounts, Commit, Remove, Stat, Update, List, Usage and Cleanup on
//! it. Keys arrive namespaced by containerd (`default/12/sha256:…`); the store treats them as
//! opaque. Store errors become the gRPC codes containerd's `errdefs` turns back into its own
//! classes ([`service::status`]). The served store is marked containerd-managed, so strata's
//! own gc never removes a snapshot containerd made.
//!
//! [`serve`] is the whole server as `strata serve` runs it: one server per store (an `flock`
//! under the root), the socket bound with mode 0600 (a stale one replaced, a live one
//! refused), SIGTERM or SIGINT finishes the calls in flight and removes the socket.

pub mod proto;
pub mod service;
pub mod socket;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use crate::proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
pub use crate::service::{SharedStore, SnapshotService};
use crate::socket::{ServeLock, Socket};

/// What can stop a server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another `strata serve` holds the store.
    #[error("another `strata serve` (pid {holder}) is serving the store at {root}; stop it first, or serve another --root")]
    StoreServed {
        /// The store root.
        root: PathBuf,
        /// What the lock file says of its holder (its pid), possibly empty.
        holder: String,
    },

    /// A live server already listens on the socket path.
    #[error("something is already listening on {path}; stop it, or pass another --address")]
    AddressInUse {
        /// The socket path.
        path: PathBuf,
    },

    /// The socket path exists and is not a socket.
    #[error("{path} exists and is not a socket; it is left alone: pass another --address")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },

    /// A file system call failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The async runtime could not start.
    #[error("start the server's runtime: {0}")]
    Runtime(#[source] std::io::Error),

    /// The store refused (marking it containerd-managed, closing it).
    #[error(transparent)]
    Store(#[from] strata::Error),

    /// The gRPC transport failed.
    #[error("serve gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How [`serve`] runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The unix socket containerd connects to.
    pub address: PathBuf,
    /// After SIGTERM/SIGINT, how long calls in flight may take before the server stops anyway.
    pub grace: Duration,
}

/// What strata declares to containerd for a store of backend `backend`: `remap-ids`
/// (every backend presents idmapped snapshots; devmapper's through a file system strata
/// mounts itself).
pub fn capabilities(backend: &str) -> &'static [&'static str] {
    let _ = backend;
    &["remap-ids"]
}

/// containerd's configuration of strata as proxy snapshotter `name` on socket `address`,
/// with the [`capabilities`] of `backend`.
pub fn proxy_plugin_config(name: &str, address: &Path, backend: &str) -> String {
    let caps = capabilities(backend)
        .iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {:?}\n  capabilities = [{caps}]\n",
        address.display().to_string()
    )
}

/// Serves `store` on `opts.address` until SIGTERM or SIGINT; then lets the calls in flight
/// finish (up to `opts.grace`), removes the socket and closes the store.
pub fn serve(store: SharedStore, opts: &ServeOptions) -> Result<(), Error> {
    let _lock = ServeLock::take(store.root())?;
    store.set_managed(true)?;
    tracing::info!(
        backend = store.backend_name(),
        capabilities = ?capabilities(store.backend_name()),
        "declare the capabilities in containerd's proxy_plugins entry (strata serve --print-config)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strata-serve")
        .build()
        .map_err(Error::Runtime)?;
    let address = opts.address.clone();
    let grace = opts.grace;
    let served = runtime.block_on({
        let store = Arc::clone(&store);
        async move {
            // Watch the signals before the socket exists: a client that connects as soon as it
            // appears and then stops the server must find SIGTERM handled, not fatal.
            let signals = Signals::watch()?;
            let mut socket = Socket::bind(&address)?;
            let io_err = |context: &'static str| {
                let path = address.clone();
                move |source| Error::Io {
                    path,
                    context,
                    source,
                }
            };
            let Some(listener) = socket.take_listener() else {
                return Ok(());
            };
            listener
                .set_nonblocking(true)
                .map_err(io_err("make the socket non-blocking"))?;
            let listener = tokio::net::UnixListener::from_std(listener)
                .map_err(io_err("register the socket"))?;
            tracing::info!(
                socket = %address.display(),
                root = %store.root().display(),
                backend = store.backend_name(),
                "serving containerd's snapshots API"
            );
            let served = run(store, listener, signals.first(), grace).await;
            // The socket goes as soon as the server stops taking calls.
            drop(socket);
            served
        }
    });
    // Blocking calls still running past the grace period are abandoned with the process.
    runtime.shutdown_timeout(grace);
    served?;
    store.close()?;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `store` on `listener` until `shutdown` completes, then waits up to `grace` for the
/// calls in flight. [`serve`] runs this; tests call it with their own listener and trigger.
pub async fn run(
    store: SharedStore,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), Error> {
    let stopping = Arc::new(tokio::sync::Notify::new());
    let trigger = {
        let stopping = Arc::clone(&stopping);
        async move {
            shutdown.await;
            tracing::info!("shutting down: finishing the calls in flight");
            stopping.notify_one();
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotService::new(store)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), trigger);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => Ok(served?),
        () = async {
            stopping.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "calls still running after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// A client of the Snapshots service at the unix socket `path` (what containerd's proxy
/// plugin is, for Rust callers and tests).
pub async fn connect(path: &Path) -> Result<SnapshotsClient<Channel>, Error> {
    let path = path.to_path_buf();
    // The URI is required by the API and unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://strata.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(SnapshotsClient::new(channel))
}

/// SIGTERM and SIGINT, handled by the server from [`Signals::watch`] on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Replaces the default (fatal) action of SIGTERM and SIGINT; needs the runtime.
    fn watch() -> Result<Signals, Error> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(Error::Runtime)?,
            int: signal(SignalKind::interrupt()).map_err(Error::Runtime)?,
        })
    }

    /// Completes at the first of them.
    async fn first(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM"),
            _ = self.int.recv() => tracing::info!("SIGINT"),
        }
    }
}
