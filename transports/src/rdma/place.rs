//! Where registered memory lives and which of the opened NICs are nearest to it.
//!
//! DRAM: the NUMA node of the region's first page (`get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`,
//! asked after the first `ibv_reg_mr` has pinned the page, so it is placed). VRAM: the GPU's
//! PCI bus id. [`nearest`] turns the location into a mask of opened NICs (bit = the NIC's
//! index) at the best [`topo`] distance: the NICs the initiator stripes over first.

use std::path::Path;

use super::topo::{self, MemLocation, NicInfo};

/// A set of NICs by index (at most 64, as [`super::wire::MAX_NICS`]).
pub(crate) type NicMask = u64;

/// Every NIC of `n`.
pub(crate) fn all(n: usize) -> NicMask {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The NUMA node holding the page at `addr`, or `None` when the kernel does not say (no NUMA
/// support, an unmapped address, a seccomp filter).
pub(crate) fn numa_node_of(addr: u64) -> Option<u32> {
    const MPOL_F_NODE: libc::c_ulong = 1;
    const MPOL_F_ADDR: libc::c_ulong = 2;
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one int into `node` (the node mask pointer is NULL with a
    // max node of 0, so nothing else is written); `addr` is only looked up by the kernel,
    // which reports EFAULT for an unmapped address.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr as usize as *mut libc::c_void,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    if rc == 0 {
        u32::try_from(node).ok()
    } else {
        None
    }
}

/// The opened NICs (`opened[i]` is the name of NIC `i`) nearest to `loc` by the topology in
/// `nics` (from [`topo::scan`] of `sysfs`). NICs sysfs does not describe count as at an
/// unknown distance. Never empty when `opened` is not: with no information every NIC is
/// nearest.
pub(crate) fn nearest(
    sysfs: &Path,
    nics: &[NicInfo],
    opened: &[String],
    loc: &MemLocation,
) -> NicMask {
    let known: Vec<Option<&NicInfo>> = opened
        .iter()
        .map(|o| nics.iter().find(|n| &n.name == o))
        .collect();
    let infos: Vec<NicInfo> = known.iter().filter_map(|k| k.cloned()).collect();
    let dist = topo::distances(sysfs, &infos, loc);
    let mut it = dist.into_iter();
    let d: Vec<topo::Distance> = known
        .iter()
        .map(|k| match k {
            Some(_) => it.next().unwrap_or(topo::Distance::Unknown),
            None => topo::Distance::Unknown,
        })
        .collect();
    let Some(best) = d.iter().min().copied() else {
        return 0;
    };
    d.iter()
        .enumerate()
        .filter(|(i, x)| **x == best && *i < 64)
        .fold(0, |m, (i, _)| m | (1u64 << i))
}

/// The indices of the opened NICs named in `names`, as a mask; `Err` names the first one that
/// is not opened.
pub(crate) fn named(opened: &[String], names: &[String]) -> Result<NicMask, String> {
    let mut m = 0;
    for n in names {
        match opened.iter().position(|o| o == n) {
            Some(i) if i < 64 => m |= 1u64 << i,
            _ => {
                return Err(format!(
                    "RDMA device '{n}' is not opened by this agent (opened: {})",
                    opened.join(", ")
                ))
            }
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::super::topo::fake::FakeSys;
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Two sockets, two NICs on each.
    fn two_sockets() -> FakeSys {
        let fs = FakeSys::new("place").unwrap();
        for (i, (root, numa)) in [("00", 0), ("20", 0), ("80", 1), ("a0", 1)]
            .iter()
            .enumerate()
        {
            fs.nic(
                &format!("mlx5_{i}"),
                &format!("pci0000:{root}/0000:{root}:01.0/0000:{root}:02.0"),
                *numa,
                &[(true, "InfiniBand")],
            )
            .unwrap();
        }
        fs
    }

    #[test]
    fn dram_prefers_the_nics_of_its_numa_node() {
        let fs = two_sockets();
        let nics = topo::scan(&fs.root).unwrap();
        let opened = names(&["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]);
        assert_eq!(
            nearest(&fs.root, &nics, &opened, &MemLocation::Numa(0)),
            0b0011
        );
        assert_eq!(
            nearest(&fs.root, &nics, &opened, &MemLocation::Numa(1)),
            0b1100
        );
        // A node with no NIC: every NIC is across sockets, so all tie.
        assert_eq!(
            nearest(&fs.root, &nics, &opened, &MemLocation::Numa(7)),
            0b1111
        );
        assert_eq!(nearest(&fs.root, &nics, &opened, &MemLocation::Any), 0b1111);
        // Opened in another order than sysfs lists them: bits follow the opened order.
        let opened = names(&["mlx5_3", "mlx5_0", "mlx5_2"]);
        assert_eq!(
            nearest(&fs.root, &nics, &opened, &MemLocation::Numa(1)),
            0b101
        );
        // A NIC sysfs does not know (unknown distance) loses to a known near one...
        let opened = names(&["rxe_0", "mlx5_2"]);
        assert_eq!(
            nearest(&fs.root, &nics, &opened, &MemLocation::Numa(1)),
            0b10
        );
        // ...and ties with everything when nothing is known.
        let empty = FakeSys::new("place-empty").unwrap();
        assert_eq!(
            nearest(&empty.root, &[], &opened, &MemLocation::Numa(0)),
            0b11
        );
        assert_eq!(nearest(&fs.root, &nics, &[], &MemLocation::Numa(0)), 0);
    }

    #[test]
    fn vram_prefers_the_nic_behind_the_gpus_switch() {
        let fs = FakeSys::new("place-gpu").unwrap();
        let sw = "pci0000:00/0000:00:01.0/0000:01:00.0";
        fs.pci(&format!("{sw}/0000:02:00.0/0000:03:00.0"), 0)
            .unwrap();
        fs.nic(
            "near",
            &format!("{sw}/0000:02:01.0/0000:04:00.0"),
            0,
            &[(true, "InfiniBand")],
        )
        .unwrap();
        fs.nic(
            "far",
            "pci0000:80/0000:80:01.0/0000:81:00.0",
            1,
            &[(true, "InfiniBand")],
        )
        .unwrap();
        let nics = topo::scan(&fs.root).unwrap();
        let opened = names(&["far", "near"]);
        let gpu = MemLocation::Gpu {
            pci_bus_id: "0000:03:00.0".into(),
        };
        assert_eq!(nearest(&fs.root, &nics, &opened, &gpu), 0b10);
        // A GPU sysfs does not know: no PCI path, no NUMA node: every NIC ties.
        let ghost = MemLocation::Gpu {
            pci_bus_id: "0000:ee:00.0".into(),
        };
        assert_eq!(nearest(&fs.root, &nics, &opened, &ghost), 0b11);
    }

    #[test]
    fn named_nics_must_be_opened() {
        let opened = names(&["a", "b", "c"]);
        assert_eq!(named(&opened, &names(&["c", "a"])), Ok(0b101));
        assert_eq!(
            named(&opened, &names(&["z"])).unwrap_err(),
            "RDMA device 'z' is not opened by this agent (opened: a, b, c)"
        );
    }

    #[test]
    fn numa_node_of_a_heap_page_and_of_nothing() {
        let v = vec![1u8; 8192];
        let n = numa_node_of(v.as_ptr() as u64);
        // One node here (or none reported where the syscall is filtered).
        eprintln!("numa node of a heap page: {n:?}");
        assert!(n.is_none() || n < Some(1024), "{n:?}");
        assert_eq!(numa_node_of(0), None, "unmapped address");
        assert_eq!(all(3), 0b111);
        assert_eq!(all(64), u64::MAX);
    }
}
