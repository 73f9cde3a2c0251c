//! Containerd filter syntax.
