//! The short fuzz run of the test suite, on stable Rust: every target over its seed corpus
//! (`fuzz/corpus/NAME/`, regression inputs included), then a fixed number of deterministic
//! mutations of it (bit flips, byte changes, inserts, deletes, copies and splices, from a
//! seeded splitmix64): 3000 for the parsers, 30 to 100 for the targets that build trees or
//! open a store; a target stops early at a time budget, saying so. A failing input is written under
//! the system temporary directory and its path printed. The libFuzzer crashes committed under
//! `fuzz/libfuzzer/artifacts/NAME/`, if any, are replayed too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use strata_tests::Rng;

/// The time after which a target stops early (a slow machine), saying so.
const BUDGET: Duration = Duration::from_secs(8);
const MAX_LEN: usize = 64 << 10;

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'/', b'.', b'\n', b'"', b',', b'=', b'0', b'7',
];

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut d = corpus[rng.index(corpus.len())].clone();
    for _ in 0..1 + rng.index(4) {
        let len = d.len();
        match rng.index(7) {
            0 if len > 0 => {
                let i = rng.index(len);
                d[i] ^= 1 << rng.index(8);
            }
            1 if len > 0 => {
                let i = rng.index(len);
                d[i] = INTERESTING[rng.index(INTERESTING.len())];
            }
            2 => {
                let i = rng.index(len + 1);
                d.insert(i, rng.next_u64() as u8);
            }
            3 if len > 0 => {
                let i = rng.index(len);
                let n = 1 + rng.index((len - i).min(16));
                d.drain(i..i + n);
            }
            4 if len > 0 => {
                // Copy a chunk over another place.
                let (a, b) = (rng.index(len), rng.index(len));
                let n = 1 + rng.index((len - a.max(b)).min(32));
                let chunk = d[a..a + n].to_vec();
                d[b..b + n].copy_from_slice(&chunk);
            }
            5 => {
                // Splice: a prefix of this input and a suffix of another.
                let other = &corpus[rng.index(corpus.len())];
                let cut = rng.index(len + 1);
                let from = rng.index(other.len() + 1);
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let i = rng.index(len);
                d[i] = rng.next_u64() as u8;
            }
            _ => d.push(rng.next_u64() as u8),
        }
    }
    d.truncate(MAX_LEN);
    d
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v.into_iter()
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect()
}

fn target(name: &str) -> fn(&[u8]) {
    strata_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no target {name}"))
        .1
}

/// Runs `f` on `data`; on a panic, writes the input to a file and fails naming it.
fn run_one(name: &str, f: fn(&[u8]), data: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| f(data))).is_err() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        let path = std::env::temp_dir().join(format!("strata-fuzz-failed-{name}-{h:016x}"));
        std::fs::write(&path, data).unwrap();
        panic!(
            "fuzz target {name} failed on {what}; the input is in {} \
             (replay: cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer {name} {})",
            path.display(),
            path.display()
        );
    }
}

/// Runs target `name` over its corpus, then `iterations` mutations of it.
fn smoke(name: &str, iterations: usize) {
    // The appliers restore owners and make devices, and the whiteout target reads
    // overlayfs' trusted.* attributes: root only, as the rest of the layer tests.
    // Without root: skipped, or a failure under STRATA_REQUIRE_PRIVILEGED=1 (CI).
    if ["layer_apply", "whiteout", "oci_import"].contains(&name)
        && !strata_tests::require_root(&format!("the {name} fuzz target"))
    {
        return;
    }
    let f = target(name);
    let seeds = files(&corpus_dir(name));
    assert!(
        !seeds.is_empty(),
        "no seed corpus in {}",
        corpus_dir(name).display()
    );
    let start = Instant::now();
    for (p, d) in &seeds {
        run_one(name, f, d, &format!("seed {}", p.display()));
    }
    let corpus: Vec<Vec<u8>> = seeds.into_iter().map(|(_, d)| d).collect();
    let mut rng = Rng(name
        .bytes()
        .fold(0x5eed, |h, b| h.wrapping_mul(31) ^ u64::from(b)));
    let mut done = 0;
    while done < iterations && start.elapsed() < BUDGET {
        let input = mutate(&mut rng, &corpus);
        run_one(name, f, &input, &format!("mutation {done}"));
        done += 1;
    }
    eprintln!(
        "{name}: {} seeds, {done} mutations in {:.1} s{}",
        corpus.len(),
        start.elapsed().as_secs_f64(),
        if done < iterations {
            " (stopped at the time budget)"
        } else {
            ""
        }
    );
}

#[test]
fn layer_apply() {
    smoke("layer_apply", 100);
}

#[test]
fn whiteout() {
    smoke("whiteout", 100);
}

#[test]
fn filter() {
    smoke("filter", 3000);
}

#[test]
fn oci() {
    smoke("oci", 3000);
}

#[test]
fn oci_import() {
    smoke("oci_import", 30);
}

#[test]
fn ffi() {
    smoke("ffi", 40);
}

#[test]
fn every_target_has_a_libfuzzer_target_and_a_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, _) in strata_fuzz::TARGETS {
        let t = root
            .join("libfuzzer/fuzz_targets")
            .join(format!("{name}.rs"));
        let src = std::fs::read_to_string(&t).unwrap_or_else(|e| panic!("{}: {e}", t.display()));
        assert!(
            src.contains(&format!("strata_fuzz::{name}(")),
            "{} does not call {name}",
            t.display()
        );
        assert!(corpus_dir(name).is_dir(), "no corpus for {name}");
    }
}

/// Crashes libFuzzer wrote and someone committed as regression inputs.
#[test]
fn libfuzzer_artifacts_replay() {
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("libfuzzer/artifacts");
    for (name, f) in strata_fuzz::TARGETS {
        for (p, d) in files(&artifacts.join(name)) {
            run_one(name, *f, &d, &format!("artifact {}", p.display()));
        }
    }
}

/// Writes the generated seeds into `fuzz/corpus/` (run by hand after changing them).
#[test]
#[ignore = "a tool, not a check: rewrites fuzz/corpus/ from the seed generator"]
fn write_seed_corpus() {
    for (target, name, data) in strata_fuzz::seeds::all() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}
