//! strata's overlay backend (being written).
