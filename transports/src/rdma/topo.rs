//! NIC discovery and choice by topology, read from sysfs (a root path given as a parameter,
//! `/sys` in production, a fake tree in tests).
//!
//! For each RDMA device, `/sys/class/infiniband/<dev>/device` resolves to its PCI function
//! under `/sys/devices/pciDDDD:BB/...`; `numa_node` sits there (`-1`: unknown); the ports are
//! `/sys/class/infiniband/<dev>/ports/<n>/{state,link_layer,rate}`. A GPU is found by its PCI
//! bus id under `/sys/bus/pci/devices/<bus id>`.
//!
//! The distance between a NIC and memory orders, nearest first: behind a common PCIe bridge
//! (a switch or root port: the deeper the common ancestor, the nearer), on the same root
//! complex (`pciDDDD:BB`), on the same NUMA node, unknown (a `numa_node` of -1), across
//! sockets. [`select`] returns every usable NIC (one with an active port) at the best
//! distance: several when several are equally near, never capped at two.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// One port of a NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortInfo {
    /// Port number (from 1).
    pub num: u8,
    /// Whether `state` says ACTIVE.
    pub active: bool,
    /// `InfiniBand` or `Ethernet`.
    pub link_layer: String,
    /// As sysfs writes it (e.g. `400 Gb/sec (4X NDR)`).
    pub rate: String,
}

/// One RDMA device as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NicInfo {
    /// Device name (`mlx5_0`).
    pub name: String,
    /// Resolved PCI path components below `devices/` (`pci0000:00`, `0000:00:01.0`, ...);
    /// empty if the device has no PCI parent (software devices such as rxe).
    pub pci_path: Vec<String>,
    /// NUMA node, `None` for -1 or missing.
    pub numa_node: Option<u32>,
    /// Ports.
    pub ports: Vec<PortInfo>,
}

impl NicInfo {
    /// The first active port.
    pub(crate) fn active_port(&self) -> Option<&PortInfo> {
        self.ports.iter().find(|p| p.active)
    }
}

/// Where the memory of a transfer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemLocation {
    /// GPU memory of the GPU at this PCI bus id (`0000:19:00.0`).
    Gpu {
        /// The bus id.
        pci_bus_id: String,
    },
    /// Host memory on this NUMA node.
    Numa(u32),
    /// Unknown: every usable NIC is as near as any other.
    Any,
}

/// How far a NIC is from some memory; smaller is nearer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Distance {
    /// Behind a common PCIe bridge; `depth` is how many bridges below the root complex the
    /// two share (larger is nearer, so it is stored negated for ordering).
    Bridge {
        /// Negated count of shared path components below the root complex.
        neg_depth: i32,
    },
    /// Same root complex (host bridge), nothing below it in common.
    RootComplex,
    /// Same NUMA node.
    Numa,
    /// Unknown (missing PCI path or NUMA node).
    Unknown,
    /// Across sockets.
    CrossSocket,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn parse_numa(s: Option<String>) -> Option<u32> {
    s.and_then(|s| s.parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok())
}

/// The PCI path components of a sysfs device directory (resolved), below `devices/`.
fn pci_components(sysfs: &Path, dev_link: &Path) -> Vec<String> {
    let Ok(real) = fs::canonicalize(dev_link) else {
        return Vec::new();
    };
    let Ok(devices) = fs::canonicalize(sysfs.join("devices")) else {
        return Vec::new();
    };
    let Ok(rel) = real.strip_prefix(&devices) else {
        return Vec::new();
    };
    let comps: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if comps.first().is_some_and(|c| c.starts_with("pci")) {
        comps
    } else {
        Vec::new()
    }
}

/// Reads every RDMA device under `<sysfs>/class/infiniband`, sorted by name. An absent
/// directory is no devices.
pub(crate) fn scan(sysfs: &Path) -> io::Result<Vec<NicInfo>> {
    let class = sysfs.join("class/infiniband");
    let entries = match fs::read_dir(&class) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut nics = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = class.join(&name);
        let dev = dir.join("device");
        let pci_path = pci_components(sysfs, &dev);
        let numa_node = parse_numa(read_trim(&dev.join("numa_node")));
        let mut ports = Vec::new();
        if let Ok(pe) = fs::read_dir(dir.join("ports")) {
            for p in pe.flatten() {
                let Ok(num) = p.file_name().to_string_lossy().parse::<u8>() else {
                    continue;
                };
                let pd = p.path();
                let state = read_trim(&pd.join("state")).unwrap_or_default();
                ports.push(PortInfo {
                    num,
                    active: state.starts_with("4:") || state.ends_with("ACTIVE"),
                    link_layer: read_trim(&pd.join("link_layer")).unwrap_or_default(),
                    rate: read_trim(&pd.join("rate")).unwrap_or_default(),
                });
            }
        }
        ports.sort_by_key(|p| p.num);
        nics.push(NicInfo {
            name,
            pci_path,
            numa_node,
            ports,
        });
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nics)
}

/// Why `<sysfs>/class/infiniband` holds no usable device, for the probe's message.
pub(crate) fn describe_empty(sysfs: &Path) -> String {
    let class = sysfs.join("class/infiniband");
    match fs::read_dir(&class) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            format!("{} does not exist", class.display())
        }
        Err(e) => format!("{} is unreadable: {e}", class.display()),
        Ok(mut d) => {
            if d.next().is_none() {
                format!("{} is empty", class.display())
            } else {
                format!("{} lists devices", class.display())
            }
        }
    }
}

/// Where a memory location is: (PCI path, NUMA node).
fn locate(sysfs: &Path, loc: &MemLocation) -> (Vec<String>, Option<u32>) {
    match loc {
        MemLocation::Gpu { pci_bus_id } => {
            let dev = sysfs
                .join("bus/pci/devices")
                .join(pci_bus_id.to_ascii_lowercase());
            (
                pci_components(sysfs, &dev),
                parse_numa(read_trim(&dev.join("numa_node"))),
            )
        }
        MemLocation::Numa(n) => (Vec::new(), Some(*n)),
        MemLocation::Any => (Vec::new(), None),
    }
}

fn distance_to(nic: &NicInfo, path: &[String], numa: Option<u32>) -> Distance {
    if !nic.pci_path.is_empty() && !path.is_empty() && nic.pci_path[0] == path[0] {
        // Shared components after the root complex, not counting the end devices themselves.
        let common = nic
            .pci_path
            .iter()
            .zip(path)
            .take_while(|(a, b)| a == b)
            .count();
        let max_shared = nic.pci_path.len().min(path.len()).saturating_sub(1);
        let below_root = common.min(max_shared).saturating_sub(1);
        if below_root > 0 {
            return Distance::Bridge {
                neg_depth: -(below_root as i32),
            };
        }
        return Distance::RootComplex;
    }
    match (nic.numa_node, numa) {
        (Some(a), Some(b)) if a == b => Distance::Numa,
        (Some(_), Some(_)) => Distance::CrossSocket,
        _ => Distance::Unknown,
    }
}

/// The distance of each NIC from `loc` (same order as `nics`).
pub(crate) fn distances(sysfs: &Path, nics: &[NicInfo], loc: &MemLocation) -> Vec<Distance> {
    if *loc == MemLocation::Any {
        return vec![Distance::Unknown; nics.len()];
    }
    let (path, numa) = locate(sysfs, loc);
    nics.iter().map(|n| distance_to(n, &path, numa)).collect()
}

/// A configured choice of NICs that replaces the topology.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NicOverride {
    /// Use only these devices (for every memory location), if set.
    pub devices: Option<Vec<String>>,
    /// Devices per GPU PCI bus id (lower case), taking precedence for that GPU.
    pub per_gpu: BTreeMap<String, Vec<String>>,
}

/// The NICs to use for memory at `loc`: the override if it names some for `loc`, else every
/// usable NIC (active port; within `over.devices` if set) at the best distance. Names, in
/// `nics` order. `Err` names what is missing.
pub(crate) fn select(
    sysfs: &Path,
    nics: &[NicInfo],
    loc: &MemLocation,
    over: &NicOverride,
) -> Result<Vec<String>, String> {
    let usable = |n: &NicInfo| n.active_port().is_some();
    if let MemLocation::Gpu { pci_bus_id } = loc {
        if let Some(names) = over.per_gpu.get(&pci_bus_id.to_ascii_lowercase()) {
            return pick_named(nics, names, usable);
        }
    }
    let allowed: Vec<&NicInfo> = match &over.devices {
        Some(names) => {
            pick_named(nics, names, usable)?;
            nics.iter().filter(|n| names.contains(&n.name)).collect()
        }
        None => nics.iter().filter(|n| usable(n)).collect(),
    };
    if allowed.is_empty() {
        return Err("no RDMA device has an active port".into());
    }
    let owned: Vec<NicInfo> = allowed.into_iter().cloned().collect();
    let d = distances(sysfs, &owned, loc);
    let best = d.iter().min().copied().unwrap_or(Distance::Unknown);
    Ok(owned
        .iter()
        .zip(&d)
        .filter(|(_, &x)| x == best)
        .map(|(n, _)| n.name.clone())
        .collect())
}

fn pick_named(
    nics: &[NicInfo],
    names: &[String],
    usable: impl Fn(&NicInfo) -> bool,
) -> Result<Vec<String>, String> {
    if names.is_empty() {
        return Err("the configured RDMA device list is empty".into());
    }
    for want in names {
        match nics.iter().find(|n| &n.name == want) {
            None => return Err(format!("configured RDMA device '{want}' is not present")),
            Some(n) if !usable(n) => {
                return Err(format!(
                    "configured RDMA device '{want}' has no active port"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(names.to_vec())
}

/// The GID index to use on a RoCE port: the first RoCE v2 GID, IPv4-mapped ones first, from
/// `ports/<port>/gid_attrs/types/<i>` and `ports/<port>/gids/<i>`. `None` if none is RoCE v2.
pub(crate) fn roce_v2_gid_index(sysfs: &Path, dev: &str, port: u8) -> Option<u8> {
    let base = sysfs
        .join("class/infiniband")
        .join(dev)
        .join("ports")
        .join(port.to_string());
    let mut v2: Vec<(bool, u8)> = Vec::new();
    for i in 0..=u8::MAX {
        let Some(t) = read_trim(&base.join(format!("gid_attrs/types/{i}"))) else {
            if i > 0 && !base.join(format!("gids/{i}")).exists() {
                break;
            }
            continue;
        };
        let gid = read_trim(&base.join(format!("gids/{i}"))).unwrap_or_default();
        let zero = gid.chars().all(|c| c == '0' || c == ':');
        if t.eq_ignore_ascii_case("RoCE v2") && !zero {
            let v4 = gid.starts_with("0000:0000:0000:0000:0000:ffff:");
            v2.push((!v4, i));
        }
    }
    v2.into_iter().min().map(|(_, i)| i)
}

#[cfg(test)]
/// A fake sysfs tree for tests (real directories and symlinks in a temporary directory).
pub(crate) mod fake {
    use super::*;
    use std::path::PathBuf;

    /// A fake sysfs root, removed on drop.
    #[derive(Debug)]
    pub(crate) struct FakeSys {
        /// The root (pass it as the sysfs path).
        pub root: PathBuf,
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    impl FakeSys {
        /// An empty tree in a fresh temporary directory.
        pub(crate) fn new(tag: &str) -> io::Result<FakeSys> {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let root = std::env::temp_dir().join(format!(
                "nixl-fakesys-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("devices"))?;
            fs::create_dir_all(root.join("class/infiniband"))?;
            fs::create_dir_all(root.join("bus/pci/devices"))?;
            Ok(FakeSys { root })
        }

        /// Creates a PCI function at `path` (e.g. `pci0000:00/0000:00:01.0/0000:0c:00.0`)
        /// with a `numa_node` and its `bus/pci/devices` link; returns its directory.
        pub(crate) fn pci(&self, path: &str, numa: i32) -> io::Result<PathBuf> {
            let dir = self.root.join("devices").join(path);
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("numa_node"), format!("{numa}\n"))?;
            let bus_id = path.rsplit('/').next().unwrap_or(path);
            let link = self.root.join("bus/pci/devices").join(bus_id);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&dir, link)?;
            Ok(dir)
        }

        /// Adds an RDMA device at PCI `path` with ports (state ACTIVE or DOWN, link layer).
        pub(crate) fn nic(
            &self,
            name: &str,
            path: &str,
            numa: i32,
            ports: &[(bool, &str)],
        ) -> io::Result<()> {
            let dir = self.pci(path, numa)?;
            let cdir = self.root.join("class/infiniband").join(name);
            fs::create_dir_all(&cdir)?;
            std::os::unix::fs::symlink(&dir, cdir.join("device"))?;
            for (i, (up, ll)) in ports.iter().enumerate() {
                let p = cdir.join(format!("ports/{}", i + 1));
                fs::create_dir_all(&p)?;
                let st = if *up { "4: ACTIVE" } else { "1: DOWN" };
                fs::write(p.join("state"), format!("{st}\n"))?;
                fs::write(p.join("link_layer"), format!("{ll}\n"))?;
                fs::write(p.join("rate"), "400 Gb/sec (4X NDR)\n")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSys;
    use super::*;

    /// The NICs `select` picks for `loc`, without overrides.
    fn nearest(fs: &FakeSys, nics: &[NicInfo], loc: &MemLocation) -> Vec<String> {
        select(&fs.root, nics, loc, &NicOverride::default()).unwrap()
    }

    fn gpu(id: &str) -> MemLocation {
        MemLocation::Gpu {
            pci_bus_id: id.into(),
        }
    }

    /// DGX-like: 4 root complexes (2 per socket), one switch each with 2 GPUs and 2 NICs.
    fn dgx() -> FakeSys {
        let fs = FakeSys::new("dgx").unwrap();
        for sw in 0..4u32 {
            let root = format!("pci0000:{:02x}", sw * 0x40);
            let numa = (sw / 2) as i32;
            let up = format!(
                "{root}/0000:{:02x}:01.0/0000:{:02x}:00.0",
                sw * 0x40,
                sw * 0x40 + 1
            );
            for k in 0..2u32 {
                let g = sw * 2 + k;
                let bus = sw * 0x40 + 2 + k * 2;
                fs.pci(
                    &format!(
                        "{up}/0000:{:02x}:0{k}.0/0000:{:02x}:00.0",
                        sw * 0x40 + 1,
                        bus
                    ),
                    numa,
                )
                .unwrap();
                fs.nic(
                    &format!("mlx5_{g}"),
                    &format!(
                        "{up}/0000:{:02x}:1{k}.0/0000:{:02x}:00.0",
                        sw * 0x40 + 1,
                        bus + 1
                    ),
                    numa,
                    &[(true, "InfiniBand")],
                )
                .unwrap();
            }
        }
        fs
    }

    fn gpu_bus(g: u32) -> String {
        let sw = g / 2;
        let k = g % 2;
        format!("0000:{:02x}:00.0", sw * 0x40 + 2 + k * 2)
    }

    #[test]
    fn dgx_like_each_gpu_gets_the_nics_behind_its_switch() {
        let fs = dgx();
        let nics = scan(&fs.root).unwrap();
        assert_eq!(nics.len(), 8);
        assert!(nics[0].pci_path[0].starts_with("pci0000:"));
        for g in 0..8u32 {
            let sel = nearest(&fs, &nics, &gpu(&gpu_bus(g)));
            let sw = g / 2;
            assert_eq!(
                sel,
                vec![format!("mlx5_{}", sw * 2), format!("mlx5_{}", sw * 2 + 1)],
                "gpu {g}"
            );
        }
        // A CPU socket: the 4 NICs of that NUMA node.
        let sel = nearest(&fs, &nics, &MemLocation::Numa(1));
        assert_eq!(sel, vec!["mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7"]);
        // Unknown location: all 8, not capped.
        let sel = nearest(&fs, &nics, &MemLocation::Any);
        assert_eq!(sel.len(), 8);
    }

    #[test]
    fn distances_order_switch_root_numa_socket() {
        let fs = FakeSys::new("order").unwrap();
        fs.pci(
            "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
            0,
        )
        .unwrap();
        // Same switch (deep), same root port only, same root complex, same numa, other socket.
        for (name, path, numa) in [
            (
                "sw",
                "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
                0,
            ),
            ("rp", "pci0000:00/0000:00:01.0/0000:05:00.0", 0),
            ("rc", "pci0000:00/0000:00:02.0/0000:06:00.0", 0),
            ("numa", "pci0000:20/0000:20:01.0/0000:21:00.0", 0),
            ("sock", "pci0000:80/0000:80:01.0/0000:81:00.0", 1),
        ] {
            fs.nic(name, path, numa, &[(true, "InfiniBand")]).unwrap();
        }
        let nics = scan(&fs.root).unwrap();
        let d = distances(&fs.root, &nics, &gpu("0000:03:00.0"));
        let by: BTreeMap<&str, Distance> = nics.iter().map(|n| n.name.as_str()).zip(d).collect();
        assert!(by["sw"] < by["rp"], "{by:?}");
        assert!(by["rp"] < by["rc"], "{by:?}");
        assert_eq!(by["rc"], Distance::RootComplex);
        assert_eq!(by["numa"], Distance::Numa);
        assert_eq!(by["sock"], Distance::CrossSocket);
        let sel = nearest(&fs, &nics, &gpu("0000:03:00.0"));
        assert_eq!(sel, vec!["sw"]);
    }

    #[test]
    fn two_nics_per_gpu_port_down_skipped_and_unknown_numa() {
        let fs = FakeSys::new("two").unwrap();
        let sw = "pci0000:00/0000:00:01.0/0000:01:00.0";
        fs.pci(&format!("{sw}/0000:02:00.0/0000:03:00.0"), -1)
            .unwrap();
        fs.nic(
            "a",
            &format!("{sw}/0000:02:01.0/0000:04:00.0"),
            -1,
            &[(true, "Ethernet")],
        )
        .unwrap();
        fs.nic(
            "b",
            &format!("{sw}/0000:02:02.0/0000:05:00.0"),
            -1,
            &[(false, "Ethernet"), (true, "Ethernet")],
        )
        .unwrap();
        fs.nic(
            "down",
            &format!("{sw}/0000:02:03.0/0000:06:00.0"),
            -1,
            &[(false, "Ethernet")],
        )
        .unwrap();
        let nics = scan(&fs.root).unwrap();
        assert_eq!(
            nics.iter()
                .find(|n| n.name == "b")
                .unwrap()
                .active_port()
                .unwrap()
                .num,
            2
        );
        assert_eq!(nics[0].numa_node, None, "numa_node -1 is unknown");
        let sel = nearest(&fs, &nics, &gpu("0000:03:00.0"));
        assert_eq!(sel, vec!["a", "b"], "the NIC whose port is down is skipped");
        // NUMA location with every numa_node -1: all usable NICs tie as unknown.
        let sel = nearest(&fs, &nics, &MemLocation::Numa(0));
        assert_eq!(sel, vec!["a", "b"]);
    }

    #[test]
    fn overrides_and_their_errors() {
        let fs = dgx();
        let nics = scan(&fs.root).unwrap();
        let mut over = NicOverride {
            devices: Some(vec!["mlx5_7".into(), "mlx5_0".into()]),
            ..Default::default()
        };
        // Restricted set, then ranked: GPU 0 is behind mlx5_0's switch.
        let sel = select(&fs.root, &nics, &gpu(&gpu_bus(0)), &over).unwrap();
        assert_eq!(sel, vec!["mlx5_0"]);
        over.per_gpu.insert(gpu_bus(0), vec!["mlx5_3".into()]);
        assert_eq!(
            select(&fs.root, &nics, &gpu(&gpu_bus(0)), &over).unwrap(),
            vec!["mlx5_3"]
        );
        over.devices = Some(vec!["mlx5_9".into()]);
        let e = select(&fs.root, &nics, &MemLocation::Any, &over).unwrap_err();
        assert_eq!(e, "configured RDMA device 'mlx5_9' is not present");
    }

    #[test]
    fn empty_or_missing_sysfs() {
        let fs = FakeSys::new("empty").unwrap();
        assert!(scan(&fs.root).unwrap().is_empty());
        assert!(describe_empty(&fs.root).ends_with("is empty"));
        let missing = fs.root.join("nope");
        assert!(scan(&missing).unwrap().is_empty());
        let e = select(&fs.root, &[], &MemLocation::Any, &NicOverride::default()).unwrap_err();
        assert!(e.contains("no RDMA device"), "{e}");
    }

    #[test]
    fn roce_v2_gid_prefers_ipv4_mapped() {
        let fs = FakeSys::new("gid").unwrap();
        fs.nic(
            "r",
            "pci0000:00/0000:00:01.0/0000:01:00.0",
            0,
            &[(true, "Ethernet")],
        )
        .unwrap();
        let p = fs.root.join("class/infiniband/r/ports/1");
        fs::create_dir_all(p.join("gid_attrs/types")).unwrap();
        fs::create_dir_all(p.join("gids")).unwrap();
        let gids = [
            ("IB/RoCE v1", "fe80:0000:0000:0000:0000:0000:0000:0001"),
            ("RoCE v2", "fe80:0000:0000:0000:0000:0000:0000:0001"),
            ("IB/RoCE v1", "0000:0000:0000:0000:0000:ffff:0a00:0001"),
            ("RoCE v2", "0000:0000:0000:0000:0000:ffff:0a00:0001"),
        ];
        for (i, (t, g)) in gids.iter().enumerate() {
            fs::write(p.join(format!("gid_attrs/types/{i}")), t).unwrap();
            fs::write(p.join(format!("gids/{i}")), g).unwrap();
        }
        assert_eq!(roce_v2_gid_index(&fs.root, "r", 1), Some(3));
        fs::write(p.join("gid_attrs/types/3"), "IB/RoCE v1").unwrap();
        assert_eq!(roce_v2_gid_index(&fs.root, "r", 1), Some(1));
        assert_eq!(roce_v2_gid_index(&fs.root, "absent", 1), None);
    }
}
