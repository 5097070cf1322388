//! The `object` backend's settings and the names of objects.

use super::*;

use crate::config::de;

/// Settings of the `object` backend (`[object]` in the agent's configuration). Values left
/// `None` come from the standard AWS environment variables.
#[derive(Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectConfig {
    /// `http://host[:port]` or `https://host[:port]` of the S3-compatible server (default:
    /// `https://s3.{region}.amazonaws.com`).
    pub endpoint: Option<String>,
    /// PEM bundle of CA certificates trusted for `https://` endpoints, besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Bucket in the host name (`bucket.host/key`) rather than in the path (`host/bucket/key`).
    pub virtual_host: bool,
    /// Signing region (default `us-east-1`).
    pub region: Option<String>,
    /// Bucket of objects named by id.
    pub bucket: Option<String>,
    /// Object `id` is key `{key_prefix}{id}` in `bucket`.
    pub key_prefix: String,
    /// Explicit names: object id → `"bucket/key"` (`[object.names]`, `"7" = "bucket/key"`).
    #[serde(deserialize_with = "names")]
    pub names: Vec<(u64, String)>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key (never printed).
    pub secret_access_key: Option<Secret>,
    /// Session token of temporary credentials (never printed).
    pub session_token: Option<Secret>,
    /// Size of multipart parts and of the ranges a long READ is split into.
    pub part_size: usize,
    /// WRITEs larger than this are multipart uploads.
    pub multipart_threshold: usize,
    /// HTTP requests in flight per posted request.
    pub max_concurrency: usize,
    /// Longest one HTTP request (a range, a part) may take, answer included.
    #[serde(rename = "request_timeout_ms", deserialize_with = "de::millis")]
    pub request_timeout: Duration,
    /// Longest a connection may take to open.
    #[serde(rename = "connect_timeout_ms", deserialize_with = "de::millis")]
    pub connect_timeout: Duration,
    /// Threads of the backend's runtime.
    pub threads: usize,
    /// Whether unset values are taken from the `AWS_*` environment variables (not a setting of
    /// the file: a backend built from a configuration always looks there).
    #[serde(skip)]
    pub use_env: bool,
}

/// `[object.names]`: TOML keys are strings, so each must read as an object id; each name must be
/// `"bucket/key"`.
fn names<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(u64, String)>, D::Error> {
    use serde::de::Error as _;
    let table: std::collections::BTreeMap<String, String> = serde::Deserialize::deserialize(d)?;
    let mut names = Vec::with_capacity(table.len());
    for (id, name) in table {
        let id: u64 = id.parse().map_err(|_| {
            D::Error::custom(format!(
                "[object.names] key {id:?} is not an object id (a number)"
            ))
        })?;
        ObjectName::parse(&name).map_err(|e| D::Error::custom(format!("[object.names] {e}")))?;
        names.push((id, name));
    }
    Ok(names)
}

impl Default for ObjectConfig {
    fn default() -> ObjectConfig {
        ObjectConfig {
            endpoint: None,
            ca_file: None,
            virtual_host: false,
            region: None,
            bucket: None,
            key_prefix: String::new(),
            names: Vec::new(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            part_size: 8 << 20,
            multipart_threshold: 16 << 20,
            max_concurrency: 16,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            threads: 2,
            use_env: true,
        }
    }
}

impl fmt::Debug for ObjectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectConfig")
            .field("endpoint", &self.endpoint)
            .field("ca_file", &self.ca_file)
            .field("virtual_host", &self.virtual_host)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("key_prefix", &self.key_prefix)
            .field("names", &self.names.len())
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("part_size", &self.part_size)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("max_concurrency", &self.max_concurrency)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("threads", &self.threads)
            .field("use_env", &self.use_env)
            .finish()
    }
}

/// Bucket and key of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectName {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
}

impl ObjectName {
    /// Parses `"bucket/key"` (the key may hold further slashes).
    pub fn parse(s: &str) -> Result<ObjectName> {
        match s.split_once('/') {
            Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok(ObjectName {
                bucket: b.to_owned(),
                key: k.to_owned(),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "object name {s:?}: expected \"bucket/key\""
            ))),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.bucket, self.key)
    }
}
