//! Property tests: round trips of the small formats strata parses and writes — digests,
//! chainIDs, containerd filters (through `strata_fuzz::render_filter`) and OCI documents.
//! (Trees and layers: `tests/tests/layer_props.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::SystemTime;

use proptest::prelude::*;
use strata::filter::{Field, Filter, Op, Selector};
use strata::layer::oci::{ConfigRootfs, Index, Manifest, OciDescriptor, Platform};
use strata::layer::{chain_id, Digest};
use strata::{Info, Kind};

fn hex64() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<u8>(), 32)
        .prop_map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
}

fn digest() -> impl Strategy<Value = Digest> {
    hex64().prop_map(|h| Digest::parse(&format!("sha256:{h}")).unwrap())
}

proptest! {
    #[test]
    fn digests_parse_what_they_display(h in hex64()) {
        let s = format!("sha256:{h}");
        let d = Digest::parse(&s).unwrap();
        prop_assert_eq!(d.to_string(), s.clone());
        prop_assert_eq!(d.as_str(), s.as_str());
        prop_assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
    }

    #[test]
    fn digests_of_bytes_are_valid(b in proptest::collection::vec(any::<u8>(), 0..256)) {
        let d = Digest::of(&b);
        prop_assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
    }

    #[test]
    fn malformed_digests_are_refused_naming_them(s in ".{0,80}") {
        let well_formed = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        match Digest::parse(&s) {
            Ok(d) => { prop_assert!(well_formed); prop_assert_eq!(d.as_str(), s.as_str()); }
            Err(e) => { prop_assert!(!well_formed); prop_assert!(e.contains(&format!("{s:?}")), "{}", e); }
        }
    }

    #[test]
    fn uppercase_digests_are_refused(h in hex64()) {
        prop_assume!(h.bytes().any(|b| b.is_ascii_alphabetic()));
        let upper = format!("sha256:{}", h.to_uppercase());
        prop_assert!(Digest::parse(&upper).is_err());
    }

    #[test]
    fn chain_ids_extend_one_layer_at_a_time(ds in proptest::collection::vec(digest(), 1..8), next in digest()) {
        let base = chain_id(&ds).unwrap();
        let mut longer = ds.clone();
        longer.push(next.clone());
        prop_assert_eq!(
            chain_id(&longer).unwrap(),
            Digest::of(format!("{base} {next}").as_bytes())
        );
        prop_assert_eq!(chain_id(&ds[..1]).unwrap(), ds[0].clone());
    }

    #[test]
    fn chain_ids_depend_on_order_and_depth(a in digest(), b in digest()) {
        prop_assume!(a != b);
        let ab = chain_id(&[a.clone(), b.clone()]).unwrap();
        prop_assert_ne!(ab.clone(), chain_id(&[b.clone(), a.clone()]).unwrap());
        prop_assert_ne!(ab.clone(), chain_id(&[a.clone(), b.clone(), b.clone()]).unwrap());
        prop_assert_ne!(ab, b);
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9._/-]{1,12}",
        ".{0,12}",
        Just("containerd.io/snapshot.ref".to_string()),
        Just("a, b\"c\\d".to_string()),
    ]
}

fn selector() -> impl Strategy<Value = Selector> {
    let field = prop_oneof![
        Just(Field::Name),
        Just(Field::Parent),
        Just(Field::Kind),
        text().prop_map(Field::Label),
    ];
    (field, 0..3u8, text(), 0..3usize).prop_map(|(field, op, v, k)| {
        let v = if field == Field::Kind {
            ["active", "view", "committed"][k].to_string()
        } else {
            v
        };
        let op = match op {
            0 => Op::Present,
            1 => Op::Equal(v),
            _ => Op::NotEqual(v),
        };
        Selector { field, op }
    })
}

fn filter() -> impl Strategy<Value = Filter> {
    proptest::collection::vec(proptest::collection::vec(selector(), 1..4), 0..4)
        .prop_map(|any| Filter { any })
}

fn info() -> impl Strategy<Value = Info> {
    (
        0..3usize,
        text(),
        proptest::option::of(text()),
        proptest::collection::btree_map(text(), text(), 0..4),
    )
        .prop_map(|(k, name, parent, labels)| Info {
            kind: [Kind::Active, Kind::View, Kind::Committed][k],
            name,
            parent,
            labels,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        })
}

proptest! {
    #[test]
    fn filters_parse_what_they_render(f in filter()) {
        let strings = strata_fuzz::render_filter(&f);
        let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
        let parsed = Filter::parse_all(&refs)
            .unwrap_or_else(|e| panic!("{strings:?} does not parse: {e}"));
        prop_assert_eq!(parsed, f);
    }

    #[test]
    fn filters_are_the_or_of_their_strings(f in filter(), i in info()) {
        let strings = strata_fuzz::render_filter(&f);
        let any = strings.iter().any(|s| Filter::parse_all(&[s]).unwrap().matches(&i));
        prop_assert_eq!(f.matches(&i), f.any.is_empty() || any);
    }

    #[test]
    fn filter_strings_parse_or_fail_naming_the_filter(s in ".{0,40}") {
        if let Err(e) = Filter::parse_all(&[&s]) {
            prop_assert!(e.to_string().contains("filter"), "{}", e);
        }
    }
}

fn descriptor() -> impl Strategy<Value = OciDescriptor> {
    (
        text(),
        digest(),
        any::<u64>(),
        proptest::collection::btree_map(text(), text(), 0..3),
        proptest::option::of((text(), text())),
    )
        .prop_map(
            |(media_type, d, size, annotations, platform)| OciDescriptor {
                media_type,
                digest: d.to_string(),
                size,
                annotations,
                platform: platform.map(|(architecture, os)| Platform { architecture, os }),
            },
        )
}

proptest! {
    #[test]
    fn indexes_parse_what_they_write(
        media_type in text(),
        manifests in proptest::collection::vec(descriptor(), 0..4),
    ) {
        let index = Index { schema_version: 2, media_type, manifests };
        let json = serde_json::to_vec(&index).unwrap();
        prop_assert_eq!(Index::parse(&json).unwrap(), index);
    }

    #[test]
    fn manifests_parse_what_they_write(
        media_type in text(),
        config in descriptor(),
        layers in proptest::collection::vec(descriptor(), 0..4),
    ) {
        let manifest = Manifest { schema_version: 2, media_type, config, layers };
        let json = serde_json::to_vec(&manifest).unwrap();
        let parsed = Manifest::parse(&json).unwrap();
        prop_assert_eq!(serde_json::to_vec(&parsed).unwrap(), json);
        prop_assert_eq!(parsed, manifest);
    }

    #[test]
    fn configs_give_back_their_diff_ids(ids in proptest::collection::vec(digest(), 0..6)) {
        let ids: Vec<String> = ids.iter().map(Digest::to_string).collect();
        let json = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": ids },
            "history": [],
        });
        let parsed = ConfigRootfs::parse(&serde_json::to_vec(&json).unwrap()).unwrap();
        prop_assert_eq!(parsed.rootfs.diff_ids, ids);
        prop_assert_eq!(parsed.rootfs.kind, "layers");
    }

    #[test]
    fn documents_that_do_not_parse_say_what_they_are_not(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Err(e) = Index::parse(&b) { prop_assert!(e.starts_with("not an OCI index: "), "{}", e); }
        if let Err(e) = Manifest::parse(&b) { prop_assert!(e.starts_with("not an image manifest: "), "{}", e); }
        if let Err(e) = ConfigRootfs::parse(&b) { prop_assert!(e.starts_with("not an image config: "), "{}", e); }
    }
}
