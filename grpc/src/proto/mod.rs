//! containerd's API as tonic generates it from `proto/` (committed; `tests/generated.rs`
//! checks it is current, so building strata needs no protoc).

#![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

/// The `containerd.*` protobuf packages strata uses.
pub mod containerd {
    /// `containerd.types`: the Mount message.
    pub mod types {
        include!("containerd.types.rs");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the Snapshots service.
            pub mod v1 {
                include!("containerd.services.snapshots.v1.rs");
            }
        }
    }
}
