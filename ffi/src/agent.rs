//! An agent's life (`nixl_agent_new`, `nixl_agent_free`) and its memory: registration of
//! descriptors and of files the library opens.

use super::*;

/// Creates an agent named `name` (non-empty, UTF-8) and writes it to `*out`.
///
/// `config_toml` NULL means the defaults (backends `local`, `shm`, `tcp`); otherwise a TOML
/// document with the agent's configuration keys (`backends`, `[tcp]`, `[auth]`, `[shm]`,
/// `[agent]`); unknown keys are `NIXL_ERR_INVALID`. A second live agent with the same name in
/// this process is `NIXL_ERR_INVALID` unless `[agent] allow_duplicate_name = true`. Backends
/// that cannot run on this host are left out and reported by `nixl_backend_status`.
/// `NIXL_LOG` (e.g. `NIXL_LOG=info`) in the environment turns on logging to stderr.
///
/// # Safety
/// `name` and `config_toml` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_agent_new(
    name: *const c_char,
    config_toml: *const c_char,
    out: *mut *mut nixl_agent,
) -> nixl_status {
    guard(|| {
        nixl_core::init_logging_from_env();
        if out.is_null() {
            return Err(Fail::invalid("out is NULL"));
        }
        let name = str_arg(name, "name")?;
        if name.is_empty() {
            return Err(Fail::invalid("name is empty"));
        }
        let config = if config_toml.is_null() {
            Config::default()
        } else {
            Config::from_toml(str_arg(config_toml, "config_toml")?)?
        };
        {
            let mut names = NAMES.lock();
            let n = names.entry(name.to_owned()).or_insert(0);
            if *n > 0 && !config.agent.allow_duplicate_name {
                return Err(Fail::invalid(format!(
                    "an agent named '{name}' is already live in this process (set [agent] \
                     allow_duplicate_name = true to allow it)"
                )));
            }
            *n += 1;
        }
        let built = config
            .backends()
            .and_then(|b| config.agent_builder(name).backends(b).build());
        let agent = match built {
            Ok(a) => a,
            Err(e) => {
                let mut names = NAMES.lock();
                if let Some(n) = names.get_mut(name) {
                    *n -= 1;
                    if *n == 0 {
                        names.remove(name);
                    }
                }
                return Err(e.into());
            }
        };
        let handle = AgentHandle {
            magic: AGENT_MAGIC,
            shared: Arc::new(Shared {
                agent: Arc::new(agent),
                notifs: Mutex::new(VecDeque::new()),
                auth: config.auth(),
                files: Mutex::new(HashMap::new()),
                kv_sides: Default::default(),
                kv_pending: Mutex::new(VecDeque::new()),
            }),
        };
        publish(out, handle)?;
        Ok(NIXL_OK)
    })
}

/// Frees an agent handle. Transfers still in flight end `NIXL_ERR_CANCELLED`, and the agent
/// shuts down, once its last request (`nixl_xfer`) is freed too. NULL is a no-op.
///
/// # Safety
/// `agent` is NULL or a handle from `nixl_agent_new` not yet freed; no other thread uses it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_agent_free(agent: *mut nixl_agent) {
    // SAFETY: the caller's contract (above) is `free_handle`'s.
    guard(|| unsafe { free_handle::<AgentHandle>(agent, |_| {}) });
}

/// Registers `count` descriptors of memory `kind` with every running backend that handles
/// that kind. DRAM descriptors are (address, length, 0); FILE descriptors are (offset, length,
/// fd). The memory must stay allocated until deregistered (or the agent is freed).
///
/// # Safety
/// `descs` points to `count` descriptors; DRAM and VRAM descriptors name memory that stays
/// allocated, readable and writable until it is deregistered, and that peers may read and
/// write at any time while it is registered.
#[no_mangle]
pub unsafe extern "C" fn nixl_register(
    agent: *mut nixl_agent,
    kind: i32,
    descs: *const nixl_desc,
    count: usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let list = descs_arg(kind, descs, count, "descs")?;
        // SAFETY: the caller's contract (above) is `Agent::register`'s.
        let reg = unsafe { a.shared.agent.register(&list) }?;
        // Regions stay registered until nixl_deregister or the agent goes.
        reg.forget();
        Ok(())
    })
}

/// Deregisters regions by the exact descriptors they were registered with, waiting for
/// transfers that still use them. A descriptor not registered is `NIXL_ERR_NOT_FOUND` (the
/// ones before it in the array are deregistered).
///
/// # Safety
/// `descs` points to `count` descriptors.
#[no_mangle]
pub unsafe extern "C" fn nixl_deregister(
    agent: *mut nixl_agent,
    kind: i32,
    descs: *const nixl_desc,
    count: usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let list = descs_arg(kind, descs, count, "descs")?;
        for d in list.descs() {
            a.shared
                .agent
                .deregister(list.kind(), std::slice::from_ref(d))?;
            if list.kind() == MemKind::File {
                // A file this library opened (nixl_register_file) is closed with its region.
                a.shared.files.lock().remove(&d.dev_id);
            }
        }
        Ok(())
    })
}

/// Opens the file at `path` and registers `[offset, offset + len)` of it as a FILE region
/// (`len` 0: up to the file's current end, which must then be past `offset`). `flags` is a
/// combination of `NIXL_FILE_DIRECT`, `NIXL_FILE_READ_ONLY` and `NIXL_FILE_CREATE` (0: an
/// existing file, read-write, buffered). Writes the descriptor to use in transfers,
/// `(offset, len, fd)`, to `*out`. The agent owns the fd: `nixl_deregister` of that descriptor
/// closes it. A missing file is `NIXL_ERR_NOT_FOUND`; a file the process may not open is
/// `NIXL_ERR_DENIED`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_register_file(
    agent: *mut nixl_agent,
    path: *const c_char,
    offset: u64,
    len: u64,
    flags: u32,
    out: *mut nixl_desc,
) -> nixl_status {
    guard(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let a = agent_ref(agent)?;
        let path = str_arg(path, "path")?;
        out_arg(out, "out")?;
        let known = NIXL_FILE_DIRECT | NIXL_FILE_READ_ONLY | NIXL_FILE_CREATE;
        if flags & !known != 0 {
            return Err(Fail::invalid(format!(
                "flags {flags:#x}: unknown bits {:#x}",
                flags & !known
            )));
        }
        let read_only = flags & NIXL_FILE_READ_ONLY != 0;
        let mut o = std::fs::OpenOptions::new();
        o.read(true)
            .write(!read_only)
            .create(!read_only && flags & NIXL_FILE_CREATE != 0);
        if flags & NIXL_FILE_DIRECT != 0 {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => NIXL_ERR_NOT_FOUND,
                std::io::ErrorKind::PermissionDenied => NIXL_ERR_DENIED,
                _ => NIXL_ERR_INVALID,
            };
            Fail::new(code, format!("opening {path}: {e}"))
        })?;
        let len = if len == 0 {
            let size = file
                .metadata()
                .map_err(|e| Fail::new(NIXL_ERR_BACKEND, format!("stat {path}: {e}")))?
                .len();
            if size <= offset {
                return Err(Fail::invalid(format!(
                    "{path} is {size} bytes: nothing past offset {offset} to register (give a \
                     length to register a range to be written)"
                )));
            }
            size - offset
        } else {
            len
        };
        let fd: OwnedFd = file.into();
        let desc = Desc::new(offset, len, fd.as_raw_fd() as u64);
        let list = DescList::from_descs(MemKind::File, vec![desc])
            .map_err(|e| Fail::new(code_of(&e), e.to_string()))?;
        // SAFETY: FILE descriptors carry no memory contract.
        let reg = unsafe { a.shared.agent.register(&list) }?;
        reg.forget();
        a.shared.files.lock().insert(desc.dev_id, fd);
        write_out(
            out,
            nixl_desc {
                addr: desc.addr,
                len: desc.len,
                dev_id: desc.dev_id,
            },
            "out",
        )?;
        Ok(NIXL_OK)
    })
}
