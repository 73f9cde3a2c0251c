//! libFuzzer entry point of `strata_fuzz::oci_import`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz::oci_import(data));
