//! `filter`: the bytes, split at newlines, are filter strings. Either they parse, or the
//! parser and the store both refuse them with an InvalidArgument error naming the filter.
//! When they parse: the store's walk (which evaluates filters in SQL) selects exactly the
//! snapshots [`Filter::matches`] selects in memory; the filters mean the OR of each one
//! alone; and [`render`] of the parsed filter parses back to the same filter.

use std::path::PathBuf;
use std::sync::OnceLock;

use strata::filter::{Field, Filter, Op, Selector};
use strata::{ErrorKind, Info, Labels, Snapshotter, Store, StoreOptions};
use strata_native::NativeBackend;

/// The process's store with a few snapshots of every kind, labels with dots, slashes,
/// quotes and empty values. It lives as long as the process; its directory is named after
/// the process, and those of processes that are gone are removed when it is made.
struct Fixture {
    store: Store<NativeBackend>,
    infos: Vec<Info>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A directory of the system's temporary directory for this process's long-lived fixtures
/// (`strata-fuzz-<name>-<pid>`); those of processes that are gone are removed first.
pub fn process_dir(name: &str) -> PathBuf {
    let tmp = std::env::temp_dir();
    let prefix = format!("strata-fuzz-{name}-");
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = n.strip_prefix(&prefix) {
                if pid.parse::<u32>().is_ok() && !PathBuf::from(format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = process_dir("filter");
        let opts = StoreOptions {
            durable: false,
            ..StoreOptions::default()
        };
        let store = Store::open(&root, NativeBackend::open(&root).unwrap(), opts).unwrap();
        let s = &store;
        s.prepare("b", None, Labels::new()).unwrap();
        s.commit(
            "base",
            "b",
            labels(&[("stage", "base"), ("a.b/c", "x y"), ("q\"uote", "\"")]),
        )
        .unwrap();
        s.prepare("m", Some("base"), Labels::new()).unwrap();
        s.commit(
            "mid",
            "m",
            labels(&[("stage", "mid"), ("containerd.io/snapshot.ref", "r,1")]),
        )
        .unwrap();
        s.prepare("work", Some("mid"), labels(&[("owner", ""), ("stage", "")]))
            .unwrap();
        s.view("look", Some("base"), labels(&[("é", "ü")])).unwrap();
        s.prepare("solo", None, Labels::new()).unwrap();
        s.prepare("name with space", None, labels(&[("k", "v")]))
            .unwrap();
        let mut infos = Vec::new();
        s.walk(&[], &mut |i: &Info| {
            infos.push(i.clone());
            Ok(())
        })
        .unwrap();
        Fixture { store, infos }
    })
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_selector(s: &Selector) -> String {
    let field = match &s.field {
        Field::Name => "name".to_string(),
        Field::Parent => "parent".to_string(),
        Field::Kind => "kind".to_string(),
        Field::Label(k) => format!("labels.{}", quote(k)),
    };
    match &s.op {
        Op::Present => field,
        Op::Equal(v) => format!("{field}=={}", quote(v)),
        Op::NotEqual(v) => format!("{field}!={}", quote(v)),
    }
}

/// Filter strings that mean `f`: one per alternative (none: match everything), selectors
/// joined by commas, label keys and values quoted.
pub fn render(f: &Filter) -> Vec<String> {
    f.any
        .iter()
        .map(|all| {
            all.iter()
                .map(render_selector)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

fn names(f: &Filter, infos: &[Info]) -> Vec<String> {
    let mut v: Vec<String> = infos
        .iter()
        .filter(|i| f.matches(i))
        .map(|i| i.name.clone())
        .collect();
    v.sort();
    v
}

/// The target: see the module docs.
pub fn filter(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let strings: Vec<&str> = text.split('\n').take(6).collect();
    let fx = fixture();
    let mut walked = Vec::new();
    let walk = fx.store.walk(&strings, &mut |i: &Info| {
        walked.push(i.name.clone());
        Ok(())
    });
    walked.sort();
    let parsed = match Filter::parse_all(&strings) {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            assert!(e.to_string().contains("filter"), "{e}");
            let w = walk.expect_err("the parser refused filters the store's walk took");
            assert_eq!(w.kind(), ErrorKind::InvalidArgument, "{w}");
            return;
        }
        Ok(f) => f,
    };
    walk.unwrap_or_else(|e| panic!("filters parse, yet the walk fails: {e}"));
    let expected = names(&parsed, &fx.infos);
    assert_eq!(
        walked, expected,
        "the store's walk and Filter::matches disagree on {strings:?} ({parsed:?})"
    );
    // The OR of the alternatives: each string alone.
    for info in &fx.infos {
        let any = strings.iter().any(|s| {
            Filter::parse_all(&[s])
                .unwrap_or_else(|e| panic!("{s:?} alone does not parse: {e}"))
                .matches(info)
        });
        assert_eq!(
            parsed.matches(info),
            any,
            "OR of {strings:?} on {}",
            info.name
        );
    }
    // Rendered back to strings, the filter parses to itself.
    let rendered = render(&parsed);
    let refs: Vec<&str> = rendered.iter().map(String::as_str).collect();
    let again = Filter::parse_all(&refs)
        .unwrap_or_else(|e| panic!("{rendered:?} (rendered from {strings:?}) does not parse: {e}"));
    assert_eq!(again, parsed, "{strings:?} rendered as {rendered:?}");
}
