//! The daemon's configuration: the agent's TOML ([`nixl_transports::config::Config`]) and its
//! `[daemon]` section.
//!
//! ```toml
//! [daemon]
//! name = "node-3"                    # default: the host name
//! http_listen = "127.0.0.1:9464"     # /metrics, /healthz, /readyz
//! control_socket = "/run/nixl/agent.sock"   # default; $XDG_RUNTIME_DIR/nixl/agent.sock when
//!                                    # not root (else /tmp/nixl-<uid>/agent.sock)
//! socket_mode = "0600"               # or "0660" to let the socket's group in
//! pool_size = "4GiB"                 # host memory pool lent to jobs (default 0: none)
//! drain_timeout = "30s"              # on SIGTERM: in-flight transfers finish or are cancelled
//! canary_interval = "10s"            # a peer is pinged when this long without an answer
//! canary_timeout = "3s"              # no answer in this long marks it down
//! canary_backoff_max = "60s"         # a down peer is retried after 1 s, 2 s, 4 s, ... up to this
//! ```
//!
//! Sizes take `B`, `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`) or a plain number of bytes;
//! durations take `ms`, `s`, `m` or a plain number of seconds. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixl_discovery::EtcdConfig;
use nixl_transports::config::Config;
use serde::Deserialize;

/// Default `http_listen`.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9464";
/// Default `drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `canary_interval`.
pub const DEFAULT_CANARY_INTERVAL: Duration = Duration::from_secs(10);
/// Default `canary_timeout`.
pub const DEFAULT_CANARY_TIMEOUT: Duration = Duration::from_secs(3);
/// Default `canary_backoff_max`.
pub const DEFAULT_CANARY_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A configuration that cannot be used, with what is wrong (the key where one is to blame).
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The `[daemon]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    name: Option<String>,
    http_listen: Option<String>,
    control_socket: Option<PathBuf>,
    socket_mode: Option<String>,
    pool_size: Option<toml::Value>,
    drain_timeout: Option<toml::Value>,
    canary_interval: Option<toml::Value>,
    canary_timeout: Option<toml::Value>,
    canary_backoff_max: Option<toml::Value>,
}

/// The `[daemon]` section, with the defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The agent's name (unique in the fleet).
    pub name: String,
    /// Where /metrics, /healthz and /readyz are served.
    pub http_listen: SocketAddr,
    /// The control API's Unix socket.
    pub control_socket: PathBuf,
    /// The socket's permission bits (0600 or 0660).
    pub socket_mode: u32,
    /// Bytes of the host memory pool (0: none).
    pub pool_size: u64,
    /// How long a drain waits for transfers before cancelling them.
    pub drain_timeout: Duration,
    /// A peer without an answer for this long gets a canary.
    pub canary_interval: Duration,
    /// A canary unanswered this long marks the peer down.
    pub canary_timeout: Duration,
    /// Longest pause between canaries to a down peer.
    pub canary_backoff_max: Duration,
}

/// Everything `nixl-agent serve` reads.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The agent's configuration (backends and their settings).
    pub agent: Config,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[etcd]`, when set.
    pub etcd: Option<EtcdConfig>,
}

impl ServeConfig {
    /// The embedded defaults (no file): every backend, no etcd, see [`DaemonConfig`].
    pub fn defaults() -> Result<ServeConfig, ConfigError> {
        ServeConfig::from_toml("")
    }

    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config {}: {e}", path.display())))?;
        ServeConfig::from_toml(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Parses a configuration document.
    pub fn from_toml(text: &str) -> Result<ServeConfig, ConfigError> {
        let agent = Config::from_toml(text).map_err(|e| ConfigError(e.to_string()))?;
        let section: DaemonSection = match &agent.daemon {
            Some(t) => t
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError(format!("[daemon]: {}", e.message())))?,
            None => DaemonSection::default(),
        };
        let daemon = DaemonConfig::from_section(section)?;
        let etcd = match &agent.etcd {
            Some(t) => {
                Some(EtcdConfig::from_table(t).map_err(|e| ConfigError(format!("[etcd]: {e}")))?)
            }
            None => None,
        };
        Ok(ServeConfig {
            agent,
            daemon,
            etcd,
        })
    }
}

impl DaemonConfig {
    fn from_section(s: DaemonSection) -> Result<DaemonConfig, ConfigError> {
        let bad = |key: &str, why: String| ConfigError(format!("[daemon] {key}: {why}"));
        let name = match s.name {
            Some(n) => n,
            None => {
                hostname().map_err(|e| bad("name", format!("no host name to default to: {e}")))?
            }
        };
        if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control() || c == '/') {
            return Err(bad(
                "name",
                format!("{name:?} must be 1..=255 characters, no '/' or control characters"),
            ));
        }
        let http = s.http_listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN);
        let http_listen = http
            .parse()
            .map_err(|_| bad("http_listen", format!("{http:?} is not ADDR:PORT")))?;
        let socket_mode = match s.socket_mode.as_deref() {
            None | Some("0600") | Some("600") => 0o600,
            Some("0660") | Some("660") => 0o660,
            Some(m) => return Err(bad("socket_mode", format!("{m:?}: \"0600\" or \"0660\""))),
        };
        let pool_size = match &s.pool_size {
            None => 0,
            Some(toml::Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(toml::Value::String(t)) if t.trim() == "0" => 0,
            Some(toml::Value::String(t)) => {
                parse_size(t).map_err(|e| bad("pool_size", e.to_string()))?
            }
            Some(v) => {
                return Err(bad(
                    "pool_size",
                    format!("{v} is not a size such as \"4GiB\""),
                ))
            }
        };
        let dur = |key: &str, v: &Option<toml::Value>, d: Duration| match v {
            None => Ok(d),
            Some(v) => parse_duration(v).map_err(|e| bad(key, e)),
        };
        let cfg = DaemonConfig {
            name,
            http_listen,
            control_socket: s.control_socket.unwrap_or_else(default_control_socket),
            socket_mode,
            pool_size,
            drain_timeout: dur("drain_timeout", &s.drain_timeout, DEFAULT_DRAIN_TIMEOUT)?,
            canary_interval: dur(
                "canary_interval",
                &s.canary_interval,
                DEFAULT_CANARY_INTERVAL,
            )?,
            canary_timeout: dur("canary_timeout", &s.canary_timeout, DEFAULT_CANARY_TIMEOUT)?,
            canary_backoff_max: dur(
                "canary_backoff_max",
                &s.canary_backoff_max,
                DEFAULT_CANARY_BACKOFF_MAX,
            )?,
        };
        for (key, d) in [
            ("canary_interval", cfg.canary_interval),
            ("canary_timeout", cfg.canary_timeout),
            ("canary_backoff_max", cfg.canary_backoff_max),
        ] {
            if d < Duration::from_millis(100) {
                return Err(bad(key, format!("{d:?} is under 100 ms")));
            }
        }
        if cfg.control_socket.as_os_str().is_empty() {
            return Err(bad("control_socket", "empty path".into()));
        }
        Ok(cfg)
    }
}

/// `/run/nixl/agent.sock` for root, else `$XDG_RUNTIME_DIR/nixl/agent.sock`, else
/// `/tmp/nixl-<uid>/agent.sock`.
pub fn default_control_socket() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/nixl/agent.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("nixl/agent.sock"),
        _ => PathBuf::from(format!("/tmp/nixl-{uid}/agent.sock")),
    }
}

/// The pool socket beside a control socket: `agent.sock` -> `agent.pool.sock`, in the same
/// (private) directory. Local processes of the daemon's user get a lease's memfd there (see
/// [`crate::pool_client`]).
pub fn pool_socket_for(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("pool.sock")
}

/// The host's name (the kernel's UTS name).
pub fn hostname() -> Result<String, String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("/proc/sys/kernel/hostname: {e}"))?;
    let name = raw.trim().to_owned();
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    Ok(name)
}

pub use nixl_transports::units::parse_size;

/// Parses `"500ms"`, `"10s"`, `"2m"`, or a number of seconds.
pub fn parse_duration(v: &toml::Value) -> Result<Duration, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
        toml::Value::Float(f) if f.is_finite() && *f >= 0.0 && *f < 1e9 => {
            Ok(Duration::from_secs_f64(*f))
        }
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
            let secs = match unit.trim() {
                "ms" => n / 1000.0,
                "" | "s" => n,
                "m" | "min" => n * 60.0,
                u => return Err(format!("unknown duration unit {u:?} in {s:?} (ms, s, m)")),
            };
            if !(0.0..1e9).contains(&secs) {
                return Err(format!("duration {s:?} out of range"));
            }
            Ok(Duration::from_secs_f64(secs))
        }
        v => Err(format!("{v} is not a duration such as \"30s\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_a_full_section() {
        let d = ServeConfig::defaults().unwrap().daemon;
        assert_eq!(d.http_listen, DEFAULT_HTTP_LISTEN.parse().unwrap());
        assert_eq!(d.pool_size, 0);
        assert_eq!(d.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(d.name, hostname().unwrap());
        let c = ServeConfig::from_toml(
            r#"
            [daemon]
            name = "n1"
            http_listen = "[::1]:9000"
            control_socket = "/tmp/x.sock"
            socket_mode = "0660"
            pool_size = "64MiB"
            drain_timeout = "1500ms"
            canary_interval = 2
            canary_timeout = "0.5s"
            [etcd]
            endpoints = ["http://127.0.0.1:2379"]
            "#,
        )
        .unwrap();
        assert_eq!(c.daemon.pool_size, 64 << 20);
        assert_eq!(c.daemon.socket_mode, 0o660);
        assert_eq!(c.daemon.drain_timeout, Duration::from_millis(1500));
        assert_eq!(c.daemon.canary_interval, Duration::from_secs(2));
        assert_eq!(c.daemon.canary_timeout, Duration::from_millis(500));
        assert!(c.etcd.is_some());
    }

    #[test]
    fn mistakes_name_their_key() {
        for (doc, key) in [
            ("[daemon]\nnmae = \"x\"", "nmae"),
            ("[daemon]\nhttp_listen = \"nowhere\"", "http_listen"),
            ("[daemon]\npool_size = \"4 parsecs\"", "pool_size"),
            ("[daemon]\npool_size = true", "pool_size"),
            ("[daemon]\ndrain_timeout = \"soon\"", "drain_timeout"),
            ("[daemon]\ncanary_timeout = \"1ms\"", "canary_timeout"),
            ("[daemon]\nsocket_mode = \"0777\"", "socket_mode"),
            ("[daemon]\nname = \"a/b\"", "name"),
            ("[deamon]\nname = \"x\"", "deamon"),
            ("[etcd]\nendpoint = \"x\"", "endpoint"),
            ("[tcp]\nlisen = \"x\"", "lisen"),
        ] {
            let e = ServeConfig::from_toml(doc).unwrap_err().to_string();
            assert!(e.contains(key), "{doc}: {e}");
        }
    }
}
