//! Where etcd is and how agents are kept there: [`EtcdConfig`], from the `[etcd]` table.

use super::*;

/// Where etcd is and how agents are kept there: the `[etcd]` table of the agent's
/// configuration (see the [crate docs](crate) for the TOML keys).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "EtcdSection")]
pub struct EtcdConfig {
    /// Client URLs, such as `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix; an agent's key is the prefix followed by its name. End it with `/`.
    pub prefix: String,
    /// Lease time to live: how long a dead agent stays listed. etcd counts whole seconds; this
    /// is rounded up, and must be at least one second.
    pub ttl: Duration,
    /// How long connecting, and each request, may take.
    pub connect_timeout: Duration,
}

/// The TOML form of [`EtcdConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EtcdSection {
    pub(crate) endpoints: Vec<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) ttl_s: Option<u64>,
    pub(crate) connect_timeout_ms: Option<u64>,
}

impl TryFrom<EtcdSection> for EtcdConfig {
    type Error = DiscoveryError;

    fn try_from(s: EtcdSection) -> Result<EtcdConfig> {
        let cfg = EtcdConfig {
            endpoints: s.endpoints,
            prefix: s.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
            ttl: s.ttl_s.map_or(DEFAULT_TTL, Duration::from_secs),
            connect_timeout: s
                .connect_timeout_ms
                .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_millis),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl EtcdConfig {
    /// These endpoints, with the defaults for the rest.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Reads an `[etcd]` table (as the agent's configuration keeps it).
    pub fn from_table(table: &toml::Table) -> Result<EtcdConfig> {
        table
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| DiscoveryError::Config(e.message().to_owned()))
    }

    /// Reads the `[etcd]` table of a whole configuration document; other tables are ignored.
    pub fn from_toml(text: &str) -> Result<EtcdConfig> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| DiscoveryError::Config(e.message().to_owned()))?;
        match doc.get("etcd") {
            Some(toml::Value::Table(t)) => EtcdConfig::from_table(t),
            Some(_) => Err(DiscoveryError::Config("`etcd` is not a table".into())),
            None => Err(DiscoveryError::Config("no [etcd] table".into())),
        }
    }

    /// Checks the values (done by [`Registry::connect`] and when deserializing).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(DiscoveryError::Config(m.to_owned()));
        if self.endpoints.is_empty() {
            return bad("no endpoints");
        }
        if self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return bad("an empty endpoint");
        }
        if self.prefix.is_empty() {
            return bad("empty prefix");
        }
        if self.ttl < Duration::from_secs(1) {
            return bad("ttl must be at least 1 s");
        }
        if self.ttl > Duration::from_secs(i64::MAX as u64 / 2) {
            return bad("ttl too large");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must not be zero");
        }
        Ok(())
    }

    /// The lease TTL in whole seconds, rounded up.
    pub(crate) fn ttl_secs(&self) -> i64 {
        let s = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        i64::try_from(s).unwrap_or(i64::MAX)
    }

    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The agent name a key stands for, if it is under the prefix and valid UTF-8.
    pub(crate) fn name_of(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let name = std::str::from_utf8(rest).ok()?;
        (!name.is_empty()).then(|| name.to_owned())
    }
}
