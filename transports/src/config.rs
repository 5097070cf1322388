//! The agent's configuration file (TOML), shared by the daemon, the CLIs and the C ABI.
//!
//! ```toml
//! backends = ["local", "shm", "tcp", "cuda", "rdma", "uring", "posix", "gds", "object"]   # default: all
//!
//! [tcp]
//! listen = "10.0.0.5:7000"   # default: the host's first non-loopback address, port 0 (free)
//! conns_per_peer = 2
//! chunk_bytes = 524288
//! window = 4
//! io_timeout_ms = 5000       # no progress for this long with work outstanding: TimedOut
//! connect_timeout_ms = 3000  # connecting and the whole handshake, at the initiator
//! handshake_timeout_ms = 5000   # a listener drops a connection whose handshake takes longer
//! socket_buffer = 4194304
//! accept_pushes = false      # load metadata peers push (only each agent's own); off by default
//! max_conns = 1024           # connections the listener serves at once (one thread, one fd
//!                            # each); at most half the process's fd limit
//! max_conns_per_ip = 256     # of them from one peer address
//! idle_timeout_ms = 300000   # an opened connection silent this long between frames is closed
//! frame_memory = 268435456   # bytes buffered at once for frames over 64 KiB (metadata pushes,
//!                            # control requests, large notifications), all connections together
//!
//! [auth]
//! secret = "..."             # or NIXL_SECRET: a shared secret, any host that holds it gets in
//! secret_file = "/path"      # or NIXL_SECRET_FILE; without a shared secret, this user's per-host
//!                            # secret (default ~/.config/nixl/secret, created 0600 on first use):
//!                            # only this user's agents on this host get in
//! allow_open = false         # true (and no shared secret): NO authentication, anyone gets in
//!
//! [tls]                      # with a secret (shared or per-user), every tcp connection is TLS
//!                            # 1.3 (see tcp::Auth)
//! mode = "encrypt"           # the only mode: "integrity-only" is refused (TLS 1.3 has no
//!                            # integrity-only cipher suite)
//! cert = "/etc/nixl/agent.pem"   # optional, all three or none, with a shared secret only: this
//!                            # agent's certificate chain,
//! key = "/etc/nixl/agent.key"    # its private key (PEM), and the CA bundle peers' certificates
//! ca = "/etc/nixl/ca.pem"        # must chain to (mutual TLS); default: an ephemeral self-signed
//!                            # certificate, the secret alone authenticating
//!
//! [shm]
//! socket_dir = "/run/nixl"   # default $XDG_RUNTIME_DIR/nixl, else $TMPDIR/nixl-<uid>; created
//!                            # 0700, refused unless ours and writable by nobody else
//! op_timeout_ms = 5000
//! cma_grants = true          # false: the target does every cross-memory copy (a round trip)
//!
//! [uring]                    # DRAM <-> FILE through io_uring
//! queue_depth = 64
//! max_io_bytes = 1048576
//! enabled = true             # false: files go through posix
//! fixed_files = 1024         # fixed-file table entries (0: none)
//! fixed_buffers = 1024       # registered-buffer table entries (0: none)
//! max_fixed_buffer = 1073741824   # larger DRAM registrations are not registered buffers
//!
//! [posix]                    # DRAM <-> FILE with preadv/pwritev
//! threads = 4
//! max_io_bytes = 4194304     # larger requests are cut so the threads share them
//!
//! [object]                   # DRAM <-> OBJECT in an S3-compatible store (see transports::object)
//! endpoint = "https://minio.local:9000"   # or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; http:// or
//!                            # https:// (default: AWS, https://s3.{region}.amazonaws.com)
//! ca_file = "/etc/nixl/store-ca.pem"   # or AWS_CA_BUNDLE: PEM CA certificates trusted for https
//!                            # besides the system's; unreadable or empty: a config error
//! virtual_host = false       # true: bucket in the host name (bucket.host/key), not the path
//! region = "us-east-1"       # or AWS_REGION / AWS_DEFAULT_REGION
//! bucket = "kv"              # object id N is key "{key_prefix}N" in this bucket
//! key_prefix = "node-3/"
//! access_key_id = "..."      # or AWS_ACCESS_KEY_ID (and AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)
//! secret_access_key = "..."  # never printed nor logged
//! part_size = 8388608        # multipart part size, and the largest ranged GET
//! multipart_threshold = 16777216   # larger WRITEs are multipart uploads
//! max_concurrency = 16       # HTTP requests in flight per posted request
//! request_timeout_ms = 30000 # one range or part; a dead server ends the request Failed
//! connect_timeout_ms = 3000
//! threads = 2                # the backend's runtime
//! [object.names]             # explicit names: object id = "bucket/key"
//! "7" = "weights/layer-7.bin"
//!
//! [cuda]                     # VRAM; unavailable (with the reason) without libcuda and a GPU
//! streams_per_device = 4     # copies of one request spread over these streams
//! max_batch = 1048576        # most descriptors per request
//! staging_buffer_size = 8388608   # chunks of the staged path (VRAM over tcp, to files)
//! staging_buffers = 4       # chunks in flight (pinned memory: size x buffers)
//! socket_dir = "/run/nixl"   # the Unix socket that grants VMM handles to peers on this node
//! allow_fabric = true        # publish fabric handles where the GPU supports them (NVL72)
//! op_timeout_ms = 5000
//! inline_wait_us = 20        # post polls a small request's copies this long itself (0: off)
//! batch_copies = true        # cuMemcpyBatchAsync where the driver has it (CUDA 12.8+)
//! gather_kernel = true       # many small runs: one kernel launch per post (table at prepare)
//!
//! [gds]                      # VRAM <-> FILE with GPUDirect Storage (libcufile)
//! enabled = true
//! threads = 4
//! max_io_bytes = 16777216
//! register_buffers = true    # cuFileBufRegister VRAM registrations
//! allow_compat_mode = false  # run without nvidia-fs (cuFile compatibility mode); else staged
//!
//! [rdma]                     # RDMA verbs (libibverbs loaded at run time)
//! devices = ["mlx5_0", "mlx5_1"]   # default: every device with an active port
//! qps_per_nic = 4            # queue pairs per NIC per peer
//! slice_bytes = 1048576      # largest work request; big transfers are striped in slices
//! max_outstanding = 32       # work requests in flight per queue pair
//! max_retries = 2            # a failed slice moves to another NIC/QP this many times
//! connect_timeout_ms = 5000  # the queue-pair handshake over the tcp listener
//! gid_index = 3              # RoCE: default the first RoCE v2 GID
//! [rdma.gpu_devices]         # override the topology: NICs per GPU PCI bus id
//! "0000:19:00.0" = ["mlx5_0"]
//!
//! [agent]                    # read by the C ABI (nixl_agent_new)
//! allow_duplicate_name = false   # a second live agent of the same name in one process
//! notif_queue_bytes = 67108864    # received notifications not yet taken, at most; past it
//!                            # they are refused and the sender told (where its backend can)
//!
//! [etcd]                     # read by nixl-discovery
//! endpoints = ["http://127.0.0.1:2379"]
//!
//! [daemon]                   # read by `nixl-agent serve` (see the nixl-agent crate)
//! name = "node-3"
//! ```
//!
//! Unknown keys are errors, so a typo does not silently fall back to a default.

use std::path::PathBuf;
use std::sync::Arc;

use nixl_core::{Backend, Error, Result};
use serde::Deserialize;

use crate::control::{ControlChannel, Unserved};
use crate::cuda::{CudaBackend, CudaConfig};
use crate::gds::{GdsBackend, GdsConfig};
use crate::local::LocalBackend;
use crate::object::{ObjectBackend, ObjectConfig};
use crate::posix::{PosixBackend, PosixConfig};
use crate::rdma::{RdmaBackend, RdmaConfig};
use crate::shm::{ShmBackend, ShmConfig};
use crate::tcp::{Auth, CertFiles, TcpBackend, TcpConfig, TlsMode, TlsSettings};
use crate::uring::{UringBackend, UringConfig};

/// What [`Config::backends_and_control`] builds.
#[derive(Debug)]
pub struct Built {
    /// The backends, as [`Config::backends`] returns them.
    pub backends: Vec<Arc<dyn Backend>>,
    /// The `tcp` backend's control channel, when it runs.
    pub tcp_control: Option<Arc<crate::tcp::TcpControl>>,
}

/// A parsed configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Backends to run, by name (default: every one this crate builds).
    pub backends: Option<Vec<String>>,
    /// `[tcp]` (its `auth` comes from `[auth]` and `[tls]`: see [`Config::tcp_config`]).
    #[serde(default)]
    pub tcp: TcpConfig,
    /// `[auth]`.
    #[serde(default)]
    pub auth: AuthSection,
    /// `[tls]`.
    #[serde(default)]
    pub tls: TlsSection,
    /// `[shm]`.
    #[serde(default)]
    pub shm: ShmConfig,
    /// `[uring]`.
    #[serde(default)]
    pub uring: UringConfig,
    /// `[posix]`.
    #[serde(default)]
    pub posix: PosixConfig,
    /// `[object]`.
    #[serde(default)]
    pub object: ObjectConfig,
    /// `[cuda]`.
    #[serde(default)]
    pub cuda: CudaConfig,
    /// `[gds]`.
    #[serde(default)]
    pub gds: GdsConfig,
    /// `[rdma]`.
    #[serde(default)]
    pub rdma: RdmaConfig,
    /// `[agent]`.
    #[serde(default)]
    pub agent: AgentSection,
    /// `[etcd]`, kept as written for the discovery crate.
    pub etcd: Option<toml::Table>,
    /// `[daemon]`, kept as written for the agent daemon (which refuses unknown keys in it).
    pub daemon: Option<toml::Table>,
    /// Whether the document wrote `accept_pushes` in `[tcp]`.
    #[serde(skip)]
    accept_pushes_written: bool,
}

/// `[auth]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_open: bool,
}

/// `[tls]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub mode: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl TlsSection {
    /// The settings, or why they are wrong (files are read when the backend first needs them,
    /// and checked by [`Config::from_toml`]).
    pub fn settings(&self) -> Result<TlsSettings> {
        let bad = |why: String| Error::InvalidArgument(format!("config: {why}"));
        let mode = match &self.mode {
            Some(m) => TlsMode::parse(m).map_err(bad)?,
            None => TlsMode::default(),
        };
        let files = match (&self.cert, &self.key, &self.ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => {
                return Err(bad(
                    "[tls] cert, key and ca go together: name all three".into()
                ))
            }
        };
        Ok(TlsSettings::new(mode, files))
    }
}

/// `[agent]`: how the agent itself is run.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Allow a second live agent with the same name in one process (the C ABI refuses it
    /// otherwise: two agents of one name confuse every peer that loads both).
    #[serde(default)]
    pub allow_duplicate_name: bool,
    /// Byte budget of the queue of received notifications not yet taken.
    pub notif_queue_bytes: Option<usize>,
}

/// Deserializers for the units settings are written in; the backends' config structs name them
/// in `#[serde(deserialize_with = ...)]`, so each setting is declared once, in its backend.
pub(crate) mod de {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// A duration written in milliseconds (`op_timeout_ms = 5000`).
    pub(crate) fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }

    /// A duration written in microseconds (`inline_wait_us = 20`).
    pub(crate) fn micros<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_micros)
    }
}

const ALL: [&str; 9] = [
    "local", "shm", "tcp", "cuda", "rdma", "uring", "posix", "gds", "object",
];

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Config> {
        let bad = |e: toml::de::Error| Error::InvalidArgument(format!("config: {}", e.message()));
        let mut cfg: Config = toml::from_str(text).map_err(bad)?;
        let raw: toml::Table = toml::from_str(text).map_err(bad)?;
        cfg.accept_pushes_written = raw
            .get("tcp")
            .and_then(|t| t.get("accept_pushes"))
            .is_some();
        let tcp = cfg.tcp_config()?;
        tcp.check()?;
        if cfg.tls.mode.is_some() {
            // A mode nobody can use is an error even before a secret is set.
            tcp.auth
                .tls()
                .check()
                .map_err(|e| Error::InvalidArgument(format!("config: {e}")))?;
        }
        cfg.object_config()?;
        if let Some(list) = &cfg.backends {
            for b in list {
                if !ALL.contains(&b.as_str()) {
                    return Err(Error::UnknownBackend(format!(
                        "{b} (this build has {})",
                        ALL.join(", ")
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &std::path::Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("config {}", path.display()), e))?;
        Config::from_toml(&text)
    }

    /// A builder for an agent named `name` with the `[agent]` settings (add the backends).
    pub fn agent_builder(&self, name: impl Into<String>) -> nixl_core::AgentBuilder {
        nixl_core::Agent::builder(name).notif_queue_bytes(
            self.agent
                .notif_queue_bytes
                .unwrap_or(nixl_core::DEFAULT_NOTIF_QUEUE_BYTES),
        )
    }

    /// How connections authenticate (a wrong `[tls]` section is reported by
    /// [`Config::from_toml`]; here it falls back to the defaults).
    pub fn auth(&self) -> Auth {
        Auth::from_settings(
            self.auth.secret.as_deref(),
            self.auth.secret_file.as_deref(),
            self.auth.allow_open,
        )
        .with_tls(self.tls.settings().unwrap_or_default())
    }

    /// The `tcp` backend's settings: `[tcp]`, with `auth` from `[auth]` and `[tls]`.
    pub fn tcp_config(&self) -> Result<TcpConfig> {
        Ok(TcpConfig {
            auth: self.auth().with_tls(self.tls.settings()?),
            ..self.tcp.clone()
        })
    }

    /// Makes the `tcp` listener accept pushed metadata (`accept_pushes = accept`), unless the
    /// document wrote `accept_pushes` in `[tcp]` itself.
    pub fn accept_pushes_unless_set(&mut self, accept: bool) -> &mut Config {
        if !self.accept_pushes_written {
            self.tcp.accept_pushes = accept;
        }
        self
    }

    /// The `object` backend's settings (unset ones come from the `AWS_*` environment when the
    /// backend is built).
    pub fn object_config(&self) -> Result<ObjectConfig> {
        if let Some(path) = &self.object.ca_file {
            // Read now, so that a wrong path is an error of the configuration, not a backend
            // that later turns out unavailable.
            crate::object::s3::read_ca_file("[object] ca_file", path)
                .map_err(|e| Error::InvalidArgument(format!("config: {e}")))?;
        }
        Ok(self.object.clone())
    }

    /// The backends this configuration asks for, built.
    pub fn backends(&self) -> Result<Vec<Arc<dyn Backend>>> {
        Ok(self.backends_and_control()?.backends)
    }

    /// [`Config::backends`], with the `tcp` backend's control channel when it runs (the
    /// daemon's canaries ping peers through it: [`crate::tcp::TcpControl::ping`]).
    pub fn backends_and_control(&self) -> Result<Built> {
        let want = |n: &str| {
            self.backends
                .as_ref()
                .is_none_or(|l| l.iter().any(|b| b == n))
        };
        let mut out: Vec<Arc<dyn Backend>> = Vec::new();
        if want("local") {
            out.push(Arc::new(LocalBackend::new()));
        }
        if want("shm") {
            out.push(Arc::new(ShmBackend::new(self.shm.clone())));
        }
        let mut control: Option<Arc<dyn ControlChannel>> = None;
        let mut tcp_control = None;
        if want("tcp") {
            let tcp = Arc::new(TcpBackend::new(self.tcp_config()?));
            control = Some(tcp.control());
            tcp_control = Some(tcp.control());
            out.push(tcp);
        }
        if want("cuda") {
            // Peers on other nodes of an NVLink domain announce imports, take revocations and
            // send notifications over the tcp listener's control channel.
            out.push(match &control {
                Some(c) => CudaBackend::with_control(self.cuda.clone(), Arc::clone(c)),
                None => CudaBackend::new(self.cuda.clone()),
            });
        }
        if want("rdma") {
            let control = control.unwrap_or_else(|| {
                Arc::new(Unserved(
                    "rdma connects its queue pairs through the tcp backend's listener, which                      this configuration does not run"
                        .into(),
                ))
            });
            out.push(RdmaBackend::new(self.rdma.clone(), control));
        }
        if want("uring") {
            out.push(Arc::new(UringBackend::new(self.uring.clone())));
        }
        if want("posix") {
            out.push(Arc::new(PosixBackend::new(self.posix.clone())));
        }
        if want("gds") {
            out.push(Arc::new(GdsBackend::new(self.gds.clone())));
        }
        if want("object") {
            out.push(Arc::new(ObjectBackend::new(self.object_config()?)));
        }
        Ok(Built {
            backends: out,
            tcp_control,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn full_document_parses() {
        let c = Config::from_toml(
            r#"
            backends = ["tcp"]
            [tcp]
            listen = "[::1]:0"
            conns_per_peer = 3
            io_timeout_ms = 1500
            handshake_timeout_ms = 700
            [auth]
            secret = "x"
            [tls]
            mode = "encrypt"
            [shm]
            op_timeout_ms = 10
            [object]
            bucket = "kv"
            secret_access_key = "hidden-one"
            [object.names]
            "7" = "w/layer-7"
            [agent]
            allow_duplicate_name = true
            [etcd]
            endpoints = ["http://127.0.0.1:2379"]
            [daemon]
            name = "n"
            "#,
        )
        .unwrap();
        assert!(c.agent.allow_duplicate_name);
        let t = c.tcp_config().unwrap();
        assert_eq!(t.conns_per_peer, 3);
        assert_eq!(t.io_timeout, Duration::from_millis(1500));
        assert_eq!(t.handshake_timeout, Duration::from_millis(700));
        assert_eq!(t.auth.tls().mode, TlsMode::Encrypt);
        assert!(t.listen.unwrap().is_ipv6());
        assert!(c.auth().has_secret());
        assert_eq!(c.backends().unwrap().len(), 1);
        assert!(c.etcd.is_some());
        assert_eq!(c.daemon.as_ref().unwrap()["name"].as_str(), Some("n"));
        assert_eq!(
            c.object_config().unwrap().names,
            vec![(7, "w/layer-7".into())]
        );
        assert!(!format!("{c:?}").contains("hidden-one"));
    }

    #[test]
    fn tcp_helpers_fill_in_only_what_the_document_left_unset() {
        let any: std::net::SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let mut c = Config::from_toml("").unwrap();
        c.tcp.listen_unless_set(any);
        c.accept_pushes_unless_set(true);
        let t = c.tcp_config().unwrap();
        assert_eq!(t.listen, Some(any));
        assert!(t.accept_pushes);
        let mut c =
            Config::from_toml("[tcp]\nlisten = \"127.0.0.1:0\"\naccept_pushes = false").unwrap();
        c.tcp.listen_unless_set(any);
        c.accept_pushes_unless_set(true);
        let t = c.tcp_config().unwrap();
        assert_eq!(t.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert!(!t.accept_pushes, "the document's false stands");
        c.tcp.listen_on(Some(any));
        assert_eq!(c.tcp.listen, Some(any));
        c.tcp.listen_on(None);
        assert_eq!(c.tcp.listen, Some(any));
        let e = Config::from_toml("[tcp]\nlisten = \"nope\"").unwrap_err();
        assert!(e.to_string().contains("tcp listen address \"nope\""), "{e}");
    }

    #[test]
    fn each_backend_states_its_own_preference_in_the_documented_order() {
        let c = Config::from_toml(
            "backends = [\"tcp\", \"object\", \"posix\", \"uring\", \"rdma\", \"shm\", \"gds\", \
             \"cuda\", \"local\"]\n[auth]\nsecret = \"x\"",
        )
        .unwrap();
        let mut built: Vec<(u8, nixl_core::BackendName)> = c
            .backends()
            .unwrap()
            .iter()
            .map(|b| (b.caps().preference, b.name()))
            .collect();
        built.sort();
        let order: Vec<&str> = built.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            order,
            ["local", "cuda", "gds", "shm", "rdma", "uring", "posix", "object", "tcp"]
        );
        let prefs: Vec<u8> = built.iter().map(|(p, _)| *p).collect();
        assert_eq!(prefs, (0..9).collect::<Vec<u8>>(), "one preference each");
    }

    #[test]
    fn settings_land_in_the_backend_configs_and_the_rest_keep_their_defaults() {
        let c = Config::from_toml(
            "[cuda]\nop_timeout_ms = 7\ninline_wait_us = 3\n\
             [rdma]\nconnect_timeout_ms = 9\ngid_index = 2\n[rdma.gpu_devices]\n\"0:1\" = [\"m\"]\n\
             [uring]\nqueue_depth = 8\n[posix]\nthreads = 3\n[gds]\nenabled = false",
        )
        .unwrap();
        let cuda = c.cuda.clone();
        assert_eq!(cuda.op_timeout, Duration::from_millis(7));
        assert_eq!(cuda.inline_wait, Duration::from_micros(3));
        assert_eq!(cuda.max_batch, CudaConfig::default().max_batch);
        let rdma = c.rdma.clone();
        assert_eq!(rdma.connect_timeout, Duration::from_millis(9));
        assert_eq!(rdma.gid_index, Some(2));
        assert_eq!(rdma.gpu_devices["0:1"], vec!["m".to_string()]);
        assert_eq!(rdma.sysfs, RdmaConfig::default().sysfs);
        assert_eq!(rdma.cq_depth, RdmaConfig::default().cq_depth);
        assert_eq!(c.uring.clone().queue_depth, 8);
        assert_eq!(
            c.uring.clone().max_io_bytes,
            UringConfig::default().max_io_bytes
        );
        assert_eq!(c.posix.clone().threads, 3);
        assert!(!c.gds.clone().enabled);
    }

    #[test]
    fn mistakes_are_errors() {
        for bad in [
            "[tcp]\nlisten = 5",
            "[tcp]\nlisten = \"nowhere\"",
            "[tcp]\nlisen = \"127.0.0.1:0\"",
            "[tcp]\nconns_per_peer = 0",
            "[auth]\nsecret = 1",
            "backends = [\"rdma2\"]",
            "[object]\nbuckt = \"x\"",
            "[object.names]\nseven = \"b/k\"",
            "[object.names]\n\"7\" = \"nokey\"",
            "[[[",
            "[rdma]\nqps = 4",
            "[cuda]\nstreams = 4",
            "[gds]\nthreads = \"x\"",
            "[tls]\nmode = \"none\"",
            "[tls]\nmode = \"integrity-only\"",
            "[tls]\ncert = \"/a.pem\"",
            "[tls]\nciphers = \"null\"",
            "[tcp]\nhandshake_timeout_ms = 1",
            // Settings the backends do not take from the file, and fields by their Rust names.
            "[rdma]\nsysfs = \"/tmp\"",
            "[rdma]\npoll = 1",
            "[rdma]\nconnect_timeout = 5",
            "[cuda]\nop_timeout = 5",
            "[shm]\nop_timeout = 5",
            "[tcp]\nio_timeout = 5",
            "[tcp]\nconnect_timeout = 5",
            "[tcp]\nhandshake_timeout = 5",
            "[tcp]\nidle_timeout = 5",
            "[tcp]\nauth = \"x\"",
            "[tcp]\nlisten = \"not an address\"",
            "[shm]\ncopy_threads = 2",
            "[object]\nrequest_timeout = 5",
            "[object]\nuse_env = false",
            "[uring]\nqueue_dept = 3",
            "[posix]\nthreads = -1",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
        assert!(Config::from_toml("").unwrap().backends().unwrap().len() == 9);
    }
}
