//! Process limits that the GPU and RDMA backends run into, with fixes in the error text.
//!
//! - `RLIMIT_NOFILE`: the `cuda` backend exports one fd per VMM chunk (PyTorch's expandable
//!   segments map 20 MB chunks, so a 70 GB KV pool is thousands of fds) and a peer imports as
//!   many; the default soft limit of 1024 runs out long before the hard one. [`raise_nofile`]
//!   raises the soft limit to the hard limit once per process, as most servers do at start.
//! - `RLIMIT_MEMLOCK`: `ibv_reg_mr` pins the memory it registers, and containers often allow
//!   64 KiB to 8 MiB; [`memlock_hint`] turns a failed registration's errno into the limit in
//!   force and the fix.

use std::sync::OnceLock;

/// `(soft, hard)` of a resource limit; `None` for "unlimited".
fn get(resource: libc::__rlimit_resource_t) -> Option<(Option<u64>, Option<u64>)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes one rlimit.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return None;
    }
    let f = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Some((f(r.rlim_cur), f(r.rlim_max)))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, once per process; returns the soft
/// limit now in force (`None`: unlimited or unknown).
pub(crate) fn raise_nofile() -> Option<u64> {
    static DONE: OnceLock<Option<u64>> = OnceLock::new();
    *DONE.get_or_init(|| {
        let (soft, hard) = get(libc::RLIMIT_NOFILE)?;
        if soft.is_some() && soft != hard {
            let r = libc::rlimit {
                rlim_cur: hard.unwrap_or(libc::RLIM_INFINITY),
                rlim_max: hard.unwrap_or(libc::RLIM_INFINITY),
            };
            // SAFETY: reads one rlimit; raising the soft limit up to the hard one needs no
            // privilege.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } == 0 {
                tracing::debug!(from = ?soft, to = ?hard, "raised the open-file limit");
                return hard;
            }
        }
        soft
    })
}

/// What to tell the user when pinning memory failed with `errno` (ENOMEM or EPERM from
/// `ibv_reg_mr`): the memlock limit in force and how to raise it; `None` when the limit is not
/// the likely cause.
pub(crate) fn memlock_hint(errno: i32) -> Option<String> {
    if errno != libc::ENOMEM && errno != libc::EPERM {
        return None;
    }
    let (soft, _) = get(libc::RLIMIT_MEMLOCK)?;
    let soft = soft?;
    Some(format!(
        "the locked-memory limit is {} KiB (ulimit -l), too small to pin registered memory: \
         raise it (ulimit -l unlimited; docker run --ulimit memlock=-1; a systemd unit's \
         LimitMEMLOCK=infinity; Kubernetes pods inherit the container runtime's limit)",
        soft / 1024
    ))
}

/// What to tell the user when an fd could not be made (EMFILE/ENFILE): the open-file limit in
/// force and the fix; `None` for other errors.
pub(crate) fn nofile_hint(errno: i32) -> Option<String> {
    if errno != libc::EMFILE && errno != libc::ENFILE {
        return None;
    }
    let (soft, hard) = get(libc::RLIMIT_NOFILE)?;
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
    Some(format!(
        "out of file descriptors (ulimit -n {}, hard {}): the cuda backend holds one per \
         exported or imported VMM chunk; raise the hard limit (ulimit -Hn, LimitNOFILE= in a \
         systemd unit, --ulimit nofile= for docker)",
        show(soft),
        show(hard)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_is_raised_to_the_hard_limit() {
        let now = raise_nofile();
        let (soft, hard) = get(libc::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard, "soft limit not raised");
        assert_eq!(now, soft);
        // Idempotent.
        assert_eq!(raise_nofile(), now);
    }

    #[test]
    fn hints_name_the_limit_and_the_fix_only_for_their_errors() {
        assert!(memlock_hint(libc::EINVAL).is_none());
        assert!(nofile_hint(libc::ENOMEM).is_none());
        let n = nofile_hint(libc::EMFILE).unwrap();
        assert!(n.contains("ulimit -n") && n.contains("LimitNOFILE"), "{n}");
        // memlock may be unlimited here (root): then there is no hint to give.
        if let Some(Some(_)) = get(libc::RLIMIT_MEMLOCK).map(|(s, _)| s) {
            let m = memlock_hint(libc::ENOMEM).unwrap();
            assert!(m.contains("ulimit -l") && m.contains("memlock"), "{m}");
        }
    }
}
