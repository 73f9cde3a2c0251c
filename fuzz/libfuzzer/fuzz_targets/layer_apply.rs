//! libFuzzer entry point of `strata_fuzz::layer_apply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz::layer_apply(data));
