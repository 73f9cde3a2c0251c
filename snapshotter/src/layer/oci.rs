//! The OCI image format's JSON documents, as far as strata reads and writes them.
//!
//! Imported documents are kept byte for byte in the content store; these types only read
//! the fields strata needs (unknown fields are ignored) and write the documents of images
//! strata builds itself, deterministically: fixed field order, no whitespace, no timestamps
//! unless `SOURCE_DATE_EPOCH` gives one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `application/vnd.oci.image.manifest.v1+json`.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `application/vnd.oci.image.index.v1+json`.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `application/vnd.oci.image.config.v1+json`.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker's schema 2 manifest, read on import.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's manifest list, read on import.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// The annotation naming an image in an index (`org.opencontainers.image.ref.name`).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's annotation for the full image name.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciDescriptor {
    /// What the blob is.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Annotations (image names in an index).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform of an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// The platform an index entry is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// GOARCH-style architecture (`amd64`, `arm64`).
    pub architecture: String,
    /// `linux`.
    pub os: String,
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The image configuration.
    pub config: OciDescriptor,
    /// The layers, bottom first.
    pub layers: Vec<OciDescriptor>,
}

/// An image index (`index.json` of a layout, or a multi-platform list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The manifests (or nested indexes).
    pub manifests: Vec<OciDescriptor>,
}

/// The parts of an image configuration strata reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConfigRootfs {
    /// `rootfs`.
    pub rootfs: Rootfs,
}

/// The layers of an image by diffID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The diffIDs, bottom first.
    pub diff_ids: Vec<String>,
}

/// One step of an image's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When (RFC 3339), only with `SOURCE_DATE_EPOCH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// What made the layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// True only for a step that made no layer; strata's snapshots are all layers (an
    /// unchanged step is the real empty layer, listed in `diff_ids` like any other).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// The image configuration strata writes for images it built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// When, only with `SOURCE_DATE_EPOCH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// GOARCH-style architecture.
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// The runtime configuration (empty: strata stores layers, not run settings).
    pub config: BTreeMap<String, String>,
    /// The layers.
    pub rootfs: Rootfs,
    /// One entry per layer.
    pub history: Vec<History>,
}

impl Index {
    /// Parses an image index (a layout's `index.json`, a nested index or a manifest list) as
    /// `import` reads it: unknown fields are ignored. The error says what is wrong with the
    /// JSON, for the caller to name the document.
    pub fn parse(bytes: &[u8]) -> Result<Index, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not an OCI index: {e}"))
    }
}

impl Manifest {
    /// Parses an image manifest (OCI or Docker schema 2) as `import` reads it; see
    /// [`Index::parse`].
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not an image manifest: {e}"))
    }
}

impl ConfigRootfs {
    /// Parses the `rootfs` part of an image configuration as `import` reads it; see
    /// [`Index::parse`].
    pub fn parse(bytes: &[u8]) -> Result<ConfigRootfs, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not an image config: {e}"))
    }
}

/// This machine's architecture in GOARCH spelling.
pub fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// `SOURCE_DATE_EPOCH` as an RFC 3339 time, when set.
pub fn source_date() -> Option<String> {
    let secs: i64 = std::env::var("SOURCE_DATE_EPOCH")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(rfc3339(secs))
}

/// Seconds since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
