//! `RdmaConfig`, the `[rdma]` section, and how the poller waits (`PollPolicy`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::de;

/// How the poller thread waits for completions.
#[derive(Clone, Debug)]
pub struct PollPolicy {
    /// Empty polls of every CQ before the poller starts sleeping.
    pub spin_polls: u32,
    /// Sleep between polls while idle.
    pub idle_sleep: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            spin_polls: 2000,
            idle_sleep: Duration::from_micros(50),
        }
    }
}

/// Settings of the `rdma` backend (`[rdma]` in the agent's configuration).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RdmaConfig {
    /// Use only these devices (by name); `None`: every device with an active port.
    pub devices: Option<Vec<String>>,
    /// Devices per GPU PCI bus id (`0000:19:00.0`), overriding the topology for that GPU.
    pub gpu_devices: BTreeMap<String, Vec<String>>,
    /// Root of sysfs (tests point it at a fake tree).
    #[serde(skip)]
    pub sysfs: PathBuf,
    /// Queue pairs per NIC per peer.
    pub qps_per_nic: usize,
    /// Largest work request.
    pub slice_bytes: u64,
    /// Most work requests in flight per queue pair.
    pub max_outstanding: u32,
    /// Most SGEs per work request (also capped by the device).
    #[serde(skip)]
    pub max_sge: usize,
    /// Completion queue entries per NIC (shared by all its QPs; QPs are refused beyond it).
    #[serde(skip)]
    pub cq_depth: u32,
    /// Times one slice is retried on another lane after a failure.
    pub max_retries: u32,
    /// How long connecting (the QP handshake) may take.
    #[serde(rename = "connect_timeout_ms", deserialize_with = "de::millis")]
    pub connect_timeout: Duration,
    /// Largest notification received; receive buffers of this size are posted per QP.
    #[serde(skip)]
    pub max_notif: u32,
    /// Receive buffers posted per target-side QP.
    #[serde(skip)]
    pub recv_depth: u32,
    /// GID index on RoCE ports; `None`: the first RoCE v2 GID (IPv4-mapped first).
    pub gid_index: Option<u8>,
    /// QP local ACK timeout exponent (4.096 µs × 2^n).
    #[serde(skip)]
    pub qp_timeout: u8,
    /// QP transport retries before a path is declared failed.
    #[serde(skip)]
    pub retry_cnt: u8,
    /// Traffic class on RoCE.
    pub traffic_class: u8,
    /// Service level.
    pub service_level: u8,
    /// How the poller waits.
    #[serde(skip)]
    pub poll: PollPolicy,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            devices: None,
            gpu_devices: BTreeMap::new(),
            sysfs: PathBuf::from("/sys"),
            qps_per_nic: 4,
            slice_bytes: 1 << 20,
            max_outstanding: 32,
            max_sge: 4,
            cq_depth: 16384,
            max_retries: 2,
            connect_timeout: Duration::from_secs(5),
            max_notif: 4096,
            recv_depth: 32,
            gid_index: None,
            qp_timeout: 14,
            retry_cnt: 7,
            traffic_class: 0,
            service_level: 0,
            poll: PollPolicy::default(),
        }
    }
}

impl RdmaConfig {
    pub(super) fn check(&self) -> std::result::Result<(), String> {
        if self.qps_per_nic == 0 || self.qps_per_nic > 64 {
            return Err(format!("[rdma] qps_per_nic {} (1..=64)", self.qps_per_nic));
        }
        if self.slice_bytes == 0 || self.slice_bytes > 1 << 30 {
            return Err(format!(
                "[rdma] slice_bytes {} (1..=1 GiB)",
                self.slice_bytes
            ));
        }
        if self.max_outstanding == 0 || self.max_sge == 0 || self.recv_depth == 0 {
            return Err("[rdma] max_outstanding, max_sge and recv_depth must be > 0".into());
        }
        if self.max_notif == 0 || self.max_notif > 1 << 20 {
            return Err(format!("[rdma] max_notif {} (1..=1 MiB)", self.max_notif));
        }
        Ok(())
    }
}
