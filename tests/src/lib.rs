//! Test support: tree builders and comparison with a flat copy.
