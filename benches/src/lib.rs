//! strata's micro-benchmarks live in `benches/hot_paths.rs` (`cargo bench -p strata-benches`);
//! `containerd/main.go` is containerd's side of `scripts/compare-containerd`. This library is
//! empty: it only gives the package a target of its own.
