//! strata's native backend (being written).
