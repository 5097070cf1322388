# SPDX-License-Identifier: Apache-2.0
"""NIXL's Python API (``nixl._api``) on top of nixl-rs.

Programs written for NIXL (``from nixl._api import nixl_agent, nixl_agent_config``) run
unchanged: the names, arguments, return values and exception classes are NIXL's. Underneath,
an agent is a nixl-rs agent (``nixl._bindings.nixlAgent``) and NIXL's backend names map onto
nixl-rs backends (see ``BACKEND_MAP``).

nixl-rs extensions use names NIXL does not: ``nixl_agent_config(rs_config=..., secret=...)``,
``nixl_agent.wait_xfer``, ``nixl_agent.query_xfer_backend_rs``,
``nixl_agent.serialize_descs_safe`` / ``deserialize_descs_safe``, ``nixlTimeoutError``.

Registering memory trusts the addresses given, as NIXL does: the memory must stay allocated
until it is deregistered, and peers may read and write it at any time while registered.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from enum import Enum
from typing import Any, Optional, Union

import numpy as np

from . import _bindings as nixlBind
from ._bindings import (  # noqa: F401  (re-exported: programs import them from nixl._api)
    nixlBackendError,
    nixlCancelledError,
    nixlInvalidParamError,
    nixlMismatchError,
    nixlNoTelemetryError,
    nixlNotAllowedError,
    nixlNotFoundError,
    nixlNotPostedError,
    nixlNotSupportedError,
    nixlRemoteDisconnectError,
    nixlRepostActiveError,
    nixlTimeoutError,
    nixlUnknownError,
)
from .logging import get_logger

logger = get_logger(__name__)

DEFAULT_COMM_PORT: int = nixlBind.DEFAULT_COMM_PORT

#: NIXL backend (plugin) names and the nixl-rs backends each stands for. nixl-rs's own names
#: ("local", "shm", "tcp", "rdma", "cuda", "uring", "posix", "gds", "object") are accepted too.
BACKEND_MAP: dict[str, list[str]] = {
    "UCX": ["local", "shm", "tcp", "rdma", "cuda"],
    "POSIX": ["posix", "uring"],
    "GDS": ["gds"],
    "GDS_MT": ["gds"],
    "OBJ": ["object"],
}

#: NIXL backends nixl-rs does not provide, and why.
REFUSED_BACKENDS: dict[str, str] = {
    "Mooncake": "nixl-rs has no Mooncake backend: its RDMA path is the 'rdma' backend "
    "(part of \"UCX\" here)",
    "UCCL": "nixl-rs has no UCCL backend: use \"UCX\" (tcp/rdma) instead",
}

_RS_NAMES = ["local", "shm", "tcp", "rdma", "cuda", "uring", "posix", "gds", "object"]
_TO_NIXL = {rs: nixl for nixl, rss in BACKEND_MAP.items() for rs in rss if nixl != "GDS_MT"}

#: Initialization parameters each backend accepts, with their defaults (strings, as NIXL's).
_PLUGIN_PARAMS: dict[str, dict[str, str]] = {
    "UCX": {"num_threads": "0"},
    "POSIX": {"num_threads": "0"},
    "GDS": {},
    "GDS_MT": {"thread_count": "0"},
    "OBJ": {
        "bucket": "",
        "endpoint_override": "",
        "access_key": "",
        "secret_key": "",
        "session_token": "",
        "region": "",
        "num_threads": "0",
    },
}

_MEMS = {
    "DRAM": nixlBind.DRAM_SEG,
    "VRAM": nixlBind.VRAM_SEG,
    "FILE": nixlBind.FILE_SEG,
    "BLOCK": nixlBind.BLK_SEG,
    "BLK": nixlBind.BLK_SEG,
    "OBJ": nixlBind.OBJ_SEG,
    "cpu": nixlBind.DRAM_SEG,
    "cuda": nixlBind.VRAM_SEG,
}
_SEG_NAMES = {
    nixlBind.DRAM_SEG: "DRAM_SEG",
    nixlBind.VRAM_SEG: "VRAM_SEG",
    nixlBind.BLK_SEG: "BLK_SEG",
    nixlBind.OBJ_SEG: "OBJ_SEG",
    nixlBind.FILE_SEG: "FILE_SEG",
}

_SAFE_MAGIC = b"NIXLRSD1"

# Agents are built on first use; two threads that get there at once build one.
_BUILD_LOCK = threading.Lock()

# Opaque handle types, as NIXL names them.
nixl_backend_handle = int


class nixl_thread_sync_t(Enum):
    """Thread synchronization modes (accepted for compatibility: nixl-rs agents are always
    safe to use from several threads)."""

    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 3


def _torch_tensor(obj: object) -> bool:
    # Only a program that imported torch can hand us a tensor: never import it ourselves.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _as_bytes(msg: Union[bytes, str, None]) -> bytes:
    if msg is None:
        return b""
    if isinstance(msg, str):
        return msg.encode()
    return bytes(msg)


class nixl_agent_config:
    """Configuration of a NIXL agent.

    Args:
        enable_prog_thread: accepted (nixl-rs backends run their own progress).
        enable_listen_thread: serve metadata to peers (``fetch_remote_metadata``) and load the
            metadata they send (``send_local_metadata``), on the tcp backend's listener.
        listen_port: the port of that listener (0: any free port; see ``get_listen_port``).
        capture_telemetry: keep per-request telemetry (``get_xfer_telemetry``).
        num_threads: threads of the multi-threaded backends (POSIX).
        backends: backends to create (NIXL names, or nixl-rs names).
        sync_mode: accepted for compatibility.
        rs_config: nixl-rs extension: the agent's whole configuration as TOML (the format of
            ``nixl-agent``'s config file); the listen settings above still apply.
        secret: nixl-rs extension: the shared secret that authenticates every tcp connection
            (also read from ``NIXL_SECRET``).
    """

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: Optional[list[str]] = None,
        sync_mode: Optional[nixl_thread_sync_t] = None,
        rs_config: Optional[str] = None,
        secret: Optional[str] = None,
        **others: Any,
    ):
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(
                f"sync_mode must be a nixl_thread_sync_t (got {type(sync_mode).__name__!r})"
            )
        if others:
            logger.debug("nixl_agent_config: ignoring %s", sorted(others))
        self.backends = ["UCX"] if backends is None else list(backends)
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = int(listen_port)
        self.capture_telemetry = capture_telemetry
        self.num_threads = int(num_threads)
        self.sync_mode = sync_mode
        self.rs_config = rs_config
        self.secret = secret
        self.others = others


class _Handle:
    __slots__ = ("_handle", "_released")

    def __init__(self, handle: Any):
        self._handle = handle
        self._released = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(released={self._released})"

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._handle.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


class nixl_prepped_dlist_handle(_Handle):
    """A prepared descriptor list (from ``prep_xfer_dlist``)."""

    __slots__ = ()


class nixl_xfer_handle(_Handle):
    """A transfer request (from ``initialize_xfer`` or ``make_prepped_xfer``). ``release()``
    cancels a post in flight and waits until nothing touches its memory; dropping the handle
    does the same. It keeps its agent alive, so handles may be dropped in any order."""

    __slots__ = ()


class nixl_agent:
    """A NIXL agent: registers memory, exchanges metadata, creates and posts transfers.

    Args:
        agent_name: the agent's name, unique among the agents that talk to each other.
        nixl_conf: configuration (``nixl_agent_config``); defaults when None.
        instantiate_all: create every available backend.
    """

    def __init__(
        self,
        agent_name: str,
        nixl_conf: Optional[nixl_agent_config] = None,
        instantiate_all: bool = False,
    ):
        if not isinstance(agent_name, str) or not agent_name:
            raise ValueError("agent_name must be a non-empty string")
        if nixl_conf is not None and instantiate_all:
            logger.warning("Ignoring instantiate_all: a config was given")
            instantiate_all = False
        conf = nixl_conf if nixl_conf is not None else nixl_agent_config()
        self.name = agent_name
        self._conf = conf
        self.notifs: dict[str, list[bytes]] = {}
        self.backends: dict[str, nixl_backend_handle] = {}
        self.backend_mems: dict[str, list[str]] = {}
        self.backend_options: dict[str, dict[str, str]] = {}
        self._params: dict[str, dict[str, str]] = {}
        self.plugin_list = list(BACKEND_MAP) + _RS_NAMES
        self.nixl_mems = dict(_MEMS)
        self.nixl_ops = {"WRITE": nixlBind.NIXL_WRITE, "READ": nixlBind.NIXL_READ}
        self._built: Optional[list[str]] = None
        wanted = self.plugin_list[: len(BACKEND_MAP)] if instantiate_all else conf.backends
        for b in wanted:
            if b in REFUSED_BACKENDS:
                logger.warning("Skipping backend %s: %s", b, REFUSED_BACKENDS[b])
            elif b not in self.plugin_list:
                logger.warning("Skipping backend %s: no such plugin", b)
            else:
                init: dict[str, str] = {}
                if conf.num_threads > 0:
                    key = "thread_count" if b == "GDS_MT" else "num_threads"
                    init[key] = str(conf.num_threads)
                self.create_backend(b, init)
        if conf.enable_listen:
            # Peers may fetch our metadata from now on: the listener starts with the agent.
            self._build()
        logger.info("Initialized NIXL agent: %s", agent_name)

    # The nixl-rs agent starts all its backends at once, when first needed: backends created
    # before that (NIXL programs create them right after construction) all take part.
    def __getattr__(self, name: str) -> Any:
        if name == "agent":
            return self._build()
        raise AttributeError(name)

    def _rs_backends(self) -> list[str]:
        names: list[str] = []
        for b in self.backends:
            for rs in BACKEND_MAP.get(b, [b]):
                if rs not in names:
                    names.append(rs)
        return names

    def _toml(self) -> str:
        conf = self._conf
        if conf.rs_config is not None:
            return conf.rs_config
        names = self._rs_backends()
        lines = ["backends = [" + ", ".join(_toml_str(n) for n in names) + "]"]
        threads = int(self._params.get("POSIX", {}).get("num_threads", "0") or 0)
        if threads > 0:
            lines += ["[posix]", f"threads = {threads}"]
        gds_threads = int(self._params.get("GDS_MT", {}).get("thread_count", "0") or 0)
        if gds_threads > 0:
            lines += ["[gds]", f"threads = {gds_threads}"]
        obj = self._params.get("OBJ")
        if obj:
            keys = {
                "bucket": "bucket",
                "endpoint_override": "endpoint",
                "access_key": "access_key_id",
                "secret_key": "secret_access_key",
                "session_token": "session_token",
                "region": "region",
            }
            lines.append("[object]")
            for k, v in keys.items():
                if obj.get(k):
                    lines.append(f"{v} = {_toml_str(obj[k])}")
            if int(obj.get("num_threads", "0") or 0) > 0:
                lines.append(f"threads = {int(obj['num_threads'])}")
        if conf.secret:
            lines += ["[auth]", f"secret = {_toml_str(conf.secret)}"]
        return "\n".join(lines) + "\n"

    def _build(self) -> Any:
        with _BUILD_LOCK:
            agent = self.__dict__.get("agent")
            if agent is not None:
                return agent
            return self._build_locked()

    def _build_locked(self) -> Any:
        listen = self._conf.port if self._conf.enable_listen else None
        agent = nixlBind.nixlAgent(
            self.name, self._toml(), listen, bool(self._conf.capture_telemetry)
        )
        self.__dict__["agent"] = agent
        self._built = [n for n, why in agent.backends() if why is None]
        for n, why in agent.backends():
            if why is not None:
                logger.debug("backend %s unavailable: %s", n, why)
        return agent

    # -- backends -------------------------------------------------------------------------

    def get_plugin_list(self) -> list[str]:
        """Backend names this package offers: NIXL's (see ``BACKEND_MAP``) and nixl-rs's."""
        return list(self.plugin_list)

    def get_plugin_mem_types(self, backend: str) -> list[str]:
        if backend not in self.plugin_list:
            logger.warning("Plugin %s is not available to get its supported mem types.", backend)
            return []
        kinds = nixlBind.known_backends()
        out: list[str] = []
        for rs in BACKEND_MAP.get(backend, [backend]):
            for k in kinds.get(rs, []):
                if k not in out:
                    out.append(k)
        return out

    def get_plugin_params(self, backend: str) -> dict[str, str]:
        if backend not in self.plugin_list:
            logger.warning("Plugin %s is not available to get its parameters.", backend)
            return {}
        return dict(_PLUGIN_PARAMS.get(backend, {}))

    def get_backend_mem_types(self, backend: str) -> list[str]:
        if backend not in self.backend_mems:
            logger.warning("Backend %s not instantiated to get its supported mem types.", backend)
            return []
        return self.backend_mems[backend]

    def get_backend_params(self, backend: str) -> dict[str, str]:
        if backend not in self.backend_options:
            logger.warning("Backend %s not instantiated to get its parameters.", backend)
            return {}
        return self.backend_options[backend]

    def create_backend(self, backend: str, initParams: Optional[dict[str, str]] = None) -> None:
        """Creates a backend (a NIXL name or a nixl-rs name) with its parameters."""
        if backend in REFUSED_BACKENDS:
            raise nixlNotSupportedError(REFUSED_BACKENDS[backend])
        if backend not in self.plugin_list:
            raise nixlNotFoundError(
                f"unknown backend {backend!r} (available: {', '.join(self.plugin_list)})"
            )
        params = {str(k): str(v) for k, v in (initParams or {}).items()}
        if self._built is not None:
            missing = [rs for rs in BACKEND_MAP.get(backend, [backend]) if rs not in self._built]
            if len(missing) == len(BACKEND_MAP.get(backend, [backend])):
                raise nixlNotSupportedError(
                    f"backend {backend} cannot be added to agent '{self.name}' now: nixl-rs starts "
                    "an agent's backends together, at its first registration, metadata or "
                    "transfer (or at construction with the listen thread); create it before that"
                )
        self.backends[backend] = len(self.backends) + 1
        self._params[backend] = params
        self.backend_mems[backend] = self.get_plugin_mem_types(backend)
        opts = dict(_PLUGIN_PARAMS.get(backend, {}))
        opts.update(params)
        self.backend_options[backend] = opts
        logger.info("Backend %s was instantiated", backend)

    def _backend_names(self, backends: list[str]) -> list[str]:
        out: list[str] = []
        for b in backends:
            # nixl-rs's own names need no create_backend: the agent runs them when it can.
            if b not in self.backends and b not in _RS_NAMES:
                raise nixlNotFoundError(f"backend {b!r} was not created on agent '{self.name}'")
            for rs in BACKEND_MAP.get(b, [b]):
                if rs not in out:
                    out.append(rs)
        return out

    def _forced(self, backends: list[str]) -> Optional[str]:
        """The one nixl-rs backend a transfer must use, when the caller named exactly one."""
        if not backends:
            return None
        names = self._backend_names(backends)
        if len(backends) == 1 and backends[0] in _RS_NAMES:
            return names[0]
        return None

    # -- descriptors ----------------------------------------------------------------------

    @staticmethod
    def _tensor_mem_type(tensor: Any) -> str:
        return "DRAM" if tensor.get_device() == -1 else "VRAM"

    def _mem(self, mem_type: Optional[str]) -> int:
        if mem_type not in self.nixl_mems:
            raise nixlInvalidParamError(
                f"memory type {mem_type!r} is not one of {', '.join(self.nixl_mems)}"
            )
        return self.nixl_mems[mem_type]

    @staticmethod
    def _rows_of_tensors(tensors: list[Any]) -> Optional[tuple[str, bytes]]:
        dev = tensors[0].device
        rows = np.zeros((len(tensors), 3), dtype=np.uint64)
        for i, t in enumerate(tensors):
            if t.device != dev:
                logger.error("All tensors of a list must be on one device")
                return None
            if not t.is_contiguous():
                logger.error("Please use a list of contiguous Tensors")
                return None
            gpu = t.get_device()
            rows[i] = (t.data_ptr(), t.numel() * t.element_size(), 0 if gpu == -1 else gpu)
        return nixl_agent._tensor_mem_type(tensors[0]), rows.tobytes()

    @staticmethod
    def _buffer_row(arr: np.ndarray) -> tuple[int, int, int]:
        if not arr.flags["C_CONTIGUOUS"]:
            raise nixlInvalidParamError("numpy arrays must be C-contiguous to be registered")
        return (int(arr.ctypes.data), int(arr.nbytes), 0)

    def _descs(self, descs: Any, mem_type: Optional[str], reg: bool) -> Any:
        cls = nixlBind.nixlRegDList if reg else nixlBind.nixlXferDList
        other = nixlBind.nixlXferDList if reg else nixlBind.nixlRegDList
        if isinstance(descs, cls):
            return descs
        if isinstance(descs, other):
            if reg:
                logger.error("XferList type detected for registration, please use RegList")
                return None
            logger.error("RegList type detected for transfer, please use XferList")
            return None
        if isinstance(descs, np.ndarray):
            is_rows = descs.ndim == 2 and descs.shape[1] == 3 and descs.dtype.kind in "iu"
            if is_rows and mem_type is not None:
                packed = np.ascontiguousarray(descs, dtype=np.uint64).tobytes()
                return cls(self._mem(mem_type), packed)
            if is_rows and mem_type is None:
                logger.error("Please specify a mem type for an Nx3 array of descriptors")
                return None
            if descs.ndim == 2 and descs.shape[1] == 4 and mem_type is not None:
                # (addr, len, dev, meta) rows, as 4-tuples: registration only.
                if not reg:
                    logger.error("Nx3 shape required for transfer descriptor list from numpy array")
                    return None
                rows = []
                for row in descs.tolist():
                    meta = row[3]
                    if isinstance(meta, bytes):
                        meta = meta.decode("utf-8", "replace")
                    elif meta is None:
                        meta = ""
                    if not isinstance(meta, str):
                        logger.error("An Nx4 array's fourth column is meta info: str, bytes or None")
                        return None
                    try:
                        rows.append((int(row[0]), int(row[1]), int(row[2]), meta))
                    except (TypeError, ValueError):
                        logger.error("An Nx4 array's first three columns are integers")
                        return None
                return cls(self._mem(mem_type), rows)
            # nixl-rs extension: any other array is a host buffer of its own.
            return cls(self._mem(mem_type or "DRAM"), [self._buffer_row(descs) + (("",) if reg else ())])
        if _torch_tensor(descs):
            if not descs.is_contiguous():
                logger.error("Please use a list of contiguous Tensors")
                return None
            gpu = descs.get_device()
            row = (descs.data_ptr(), descs.numel() * descs.element_size(), 0 if gpu == -1 else gpu)
            return cls(self._mem(self._tensor_mem_type(descs)), [row + (("",) if reg else ())])
        if isinstance(descs, (list, tuple)):
            if len(descs) == 0:
                return cls(self._mem(mem_type or "DRAM"), [])
            first = descs[0]
            if _torch_tensor(first):
                got = self._rows_of_tensors(list(descs))
                if got is None:
                    return None
                return cls(self._mem(got[0]), got[1])
            if isinstance(first, np.ndarray):
                rows = [self._buffer_row(a) + (("",) if reg else ()) for a in descs]
                return cls(self._mem(mem_type or "DRAM"), rows)
            if isinstance(first, tuple):
                if mem_type is None:
                    logger.error("Please specify a mem type if not using Tensors")
                    return None
                want = (4,) if reg else (3,)
                if len(first) not in want:
                    logger.error(
                        "%s-tuple list needed for %s", want[0], "registration" if reg else "transfer"
                    )
                    return None
                return cls(self._mem(mem_type), list(descs))
        logger.error("Unsupported descriptor input of type %s", type(descs).__name__)
        return None

    def get_xfer_descs(self, descs: Any, mem_type: Optional[str] = None, is_sorted: bool = False) -> Any:
        """A ``nixlXferDList`` from a tensor, a list of tensors, a list of ``(addr, len, dev)``
        tuples or an Nx3 integer numpy array (these two with ``mem_type``), numpy arrays
        (nixl-rs: each a host buffer), or a ``nixlXferDList`` (returned as is). None when the
        input does not fit (logged), as NIXL."""
        return self._descs(descs, mem_type, reg=False)

    def get_reg_descs(self, descs: Any, mem_type: Optional[str] = None, is_sorted: bool = False) -> Any:
        """A ``nixlRegDList`` from the inputs of ``get_xfer_descs``, with
        ``(addr, len, dev, meta)`` tuples instead of 3-tuples; an Nx4 numpy array (object
        dtype, meta a str) with ``mem_type`` gives such rows too."""
        return self._descs(descs, mem_type, reg=True)

    def get_serialized_descs(self, descs: Any) -> bytes:
        """Serializes a descriptor list with pickle, as NIXL does (see ``deserialize_descs``)."""
        return pickle.dumps(descs)

    def deserialize_descs(self, serialized_descs: bytes) -> Any:
        """Deserializes a descriptor list. Bytes from ``serialize_descs_safe`` are decoded
        safely; anything else is unpickled, as NIXL does: NEVER pass bytes from a peer you do
        not trust here (unpickling runs arbitrary code). Use ``deserialize_descs_safe``."""
        if bytes(serialized_descs[:8]) == _SAFE_MAGIC:
            return nixlBind.deserialize_descs_safe(serialized_descs)
        return pickle.loads(serialized_descs)

    def serialize_descs_safe(self, descs: Any) -> bytes:
        """nixl-rs: a descriptor list in a plain, bounded binary form (no pickle)."""
        return descs.to_bytes()

    def deserialize_descs_safe(self, serialized_descs: bytes) -> Any:
        """nixl-rs: decodes ``serialize_descs_safe``'s bytes, and only those (bounded; raises
        ``nixlInvalidParamError`` for anything else): safe with untrusted bytes."""
        return nixlBind.deserialize_descs_safe(bytes(serialized_descs))

    # -- memory ---------------------------------------------------------------------------

    def register_memory(
        self,
        reg_list: Any,
        mem_type: Optional[str] = None,
        backends: Optional[list[str]] = None,
        is_sorted: bool = False,
    ) -> Any:
        """Registers memory (tensors, numpy arrays, ``(addr, len, dev, meta)`` tuples, an Nx3
        array, a ``nixlRegDList``) with the given backends, or every one that takes it.
        Returns the ``nixlRegDList`` to deregister it with. (``is_sorted``, an argument of
        older NIXL versions, is accepted, also in its old place before ``backends``.)"""
        if isinstance(backends, bool):
            backends = None
        descs = self.get_reg_descs(reg_list, mem_type)
        if descs is None:
            raise nixlInvalidParamError("register_memory: unsupported or malformed descriptors")
        names = self._backend_names(backends or [])
        if names:
            kinds = nixlBind.known_backends()
            seg = _SEG_NAMES[descs.getType()]
            running = self.agent.backends()
            up = {n for n, why in running if why is None}
            names = [n for n in names if n in up and seg in kinds.get(n, [])]
            if not names:
                raise nixlNotSupportedError(
                    f"none of the backends {backends} registers {seg} memory on this host"
                )
        self.agent.register(descs, names)
        return descs

    def deregister_memory(self, dereg_list: Any, backends: Optional[list[str]] = None) -> None:
        """Deregisters what ``register_memory`` returned (from every backend that holds it)."""
        descs = self.get_reg_descs(dereg_list)
        if descs is None:
            raise nixlInvalidParamError("deregister_memory: unsupported descriptors")
        self.agent.deregister(descs)

    def query_memory(
        self, reg_list: Any, backend: str, mem_type: Optional[str] = None
    ) -> list[Optional[dict[str, str]]]:
        """For FILE (and BLOCK) descriptors whose meta is a path: ``{"size", "mode", "mtime"}``
        of each (strings, as NIXL's POSIX backend gives them), None where it does not exist."""
        descs = self.get_reg_descs(reg_list, mem_type)
        if descs is None:
            raise nixlInvalidParamError("query_memory: unsupported descriptors")
        if backend not in self.backends:
            raise ValueError(
                f"Backend '{backend}' not found. Available backends: {list(self.backends)}"
            )
        if descs.getType() not in (nixlBind.FILE_SEG, nixlBind.BLK_SEG):
            raise nixlNotSupportedError(
                f"query_memory answers for FILE and BLOCK descriptors, not {_SEG_NAMES[descs.getType()]}"
            )
        out: list[Optional[dict[str, str]]] = []
        for i in range(len(descs)):
            path = descs[i][3]
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append({"size": str(st.st_size), "mode": str(st.st_mode), "mtime": str(int(st.st_mtime))})
        return out

    # -- metadata -------------------------------------------------------------------------

    def get_listen_port(self) -> int:
        """The port of the listener (the listen thread): useful with ``listen_port=0``."""
        port = self.agent.listen_port()
        if port is None:
            raise nixlNotSupportedError(f"agent '{self.name}' runs no listener")
        return port

    def get_agent_metadata(self) -> bytes:
        return self.agent.local_md()

    def get_partial_agent_metadata(
        self, descs: Any, inc_conn_info: bool = False, backends: Optional[list[str]] = None
    ) -> bytes:
        """Metadata describing only the regions of ``descs`` (nixl-rs always includes the
        connection info: it is small, and needed before the first transfer anyway)."""
        reg = self.get_reg_descs(descs) if descs is not None else None
        if reg is None:
            reg = nixlBind.nixlRegDList(nixlBind.DRAM_SEG)
        return self.agent.partial_md(reg)

    def add_remote_agent(self, metadata: bytes) -> str:
        return self.agent.load_remote_md(bytes(metadata))

    def remove_remote_agent(self, agent: str) -> None:
        self.agent.invalidate_remote(agent)

    def check_remote_metadata(self, agent: str, descs: Any = None) -> bool:
        """Whether ``agent``'s metadata is loaded (and describes ``descs``, when given)."""
        x = None
        if descs is not None:
            x = self.get_xfer_descs(descs)
            if x is None:
                return False
        return self.agent.check_remote(agent, x)

    # With ``ip_addr`` empty, the metadata calls use the central metadata store, as NIXL does:
    # etcd, at the endpoints of ``NIXL_ETCD_ENDPOINTS`` (comma-separated; the key prefix is
    # ``NIXL_ETCD_NAMESPACE``, default ``/nixl/agents/``), through nixl-rs's discovery crate.
    # Without it they raise nixlNotSupportedError saying so.

    def fetch_remote_metadata(
        self, remote_agent: str, ip_addr: str = "", port: int = DEFAULT_COMM_PORT, label: str = ""
    ) -> None:
        """Fetches ``remote_agent``'s metadata from its listener at ``ip_addr:port`` and loads
        it (waiting up to 10 s for the listener to come up). Authenticated with the secret,
        when configured. With no ``ip_addr``: from etcd (see above); if it is not published yet,
        it is loaded when it appears within 30 s (poll ``check_remote_metadata``, as with
        NIXL)."""
        if not ip_addr:
            if label:
                raise nixlNotSupportedError("fetch_remote_metadata: labels (partial metadata) "
                                            "are not kept in etcd by nixl-rs")
            self.agent.etcd_fetch(remote_agent, 30_000)
            return
        ip = ip_addr
        known = set(self.agent.peers())
        name = self.agent.fetch_remote_md(ip, int(port), 10_000)
        if name != remote_agent:
            if name not in known:
                self.agent.invalidate_remote(name)
            raise nixlNotFoundError(
                f"the agent listening at {ip}:{port} is '{name}', not '{remote_agent}'"
            )

    def send_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Sends this agent's metadata to the listener at ``ip_addr:port``, which loads it.
        With no ``ip_addr``: publishes it in etcd (see above), where nixl-rs keeps it up to date
        (new registrations included) until ``invalidate_local_metadata()`` or the agent's end."""
        if not ip_addr:
            self.agent.etcd_publish()
            return
        self.agent.send_md(ip_addr, int(port), 10_000)

    def send_partial_agent_metadata(
        self,
        descs: Any,
        inc_conn_info: bool = False,
        backends: Optional[list[str]] = None,
        ip_addr: str = "",
        port: int = DEFAULT_COMM_PORT,
        label: str = "",
    ) -> None:
        """Sends the metadata of the regions of ``descs`` to the listener at ``ip_addr:port``.
        (Not through etcd: nixl-rs publishes whole metadata there, with ``send_local_metadata()``.)"""
        if not ip_addr:
            raise nixlNotSupportedError(
                "send_partial_agent_metadata: nixl-rs keeps only whole metadata in etcd "
                "(send_local_metadata()); give ip_addr to send partial metadata to a listen thread"
            )
        ip = ip_addr
        reg = self.get_reg_descs(descs) if descs is not None else None
        if reg is None:
            reg = nixlBind.nixlRegDList(nixlBind.DRAM_SEG)
        self.agent.send_md(ip, int(port), 10_000, reg)

    def invalidate_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT) -> None:
        """Tells the agent listening at ``ip_addr:port`` to drop this agent's metadata, so that
        its later requests to this agent fail (it must accept pushes, as its listen thread
        does; it drops only the metadata of the agent the connection proved, this one). Nothing
        listening there is not an error: a gone peer holds nothing of this agent. With no
        ``ip_addr``: deletes this agent's metadata from etcd (peers that fetched it keep it
        until they remove it; nixl-rs's daemon's watchers drop it at once)."""
        if not ip_addr:
            if self.agent.etcd_endpoints() is None:
                raise nixlNotSupportedError(
                    "invalidate_local_metadata: no metadata server (give ip_addr, or set "
                    "NIXL_ETCD_ENDPOINTS)"
                )
            self.agent.etcd_unpublish()
            return
        self.agent.invalidate_md(ip_addr, int(port), 10_000)

    def make_connection(self, remote_agent: str, backends: Optional[list[str]] = None) -> None:
        """Accepted (optional in NIXL): nixl-rs connects on the first request to a peer."""
        if not self.agent.check_remote(remote_agent, None):
            raise nixlNotFoundError(f"unknown remote agent '{remote_agent}'")

    # -- transfers ------------------------------------------------------------------------

    def prep_xfer_dlist(
        self,
        agent_name: str,
        xfer_list: Any,
        mem_type: Optional[str] = None,
        backends: Optional[list[str]] = None,
        is_sorted: bool = False,
    ) -> nixl_prepped_dlist_handle:
        """Prepares a descriptor list, local (``""`` or ``"NIXL_INIT_AGENT"``) or of a remote
        agent, whose entries ``make_prepped_xfer`` picks by index. An Nx5 array is strided:
        rows ``(addr, len, dev, stride, count)`` stand for ``count`` blocks ``stride`` apart."""
        if isinstance(backends, bool):  # older NIXL: is_sorted stood here
            backends = None
        if isinstance(xfer_list, np.ndarray) and xfer_list.ndim == 2 and xfer_list.shape[1] == 5:
            if mem_type is None:
                raise ValueError("Please specify a mem type for strided descriptors")
            a = np.ascontiguousarray(xfer_list, dtype=np.uint64)
            counts = a[:, 4].astype(np.int64)
            if (counts < 0).any():
                raise nixlInvalidParamError("strided descriptors: negative count")
            base = np.repeat(a[:, 0], counts)
            step = np.concatenate([np.arange(c, dtype=np.uint64) for c in counts]) if len(counts) else np.zeros(0, np.uint64)
            rows = np.stack(
                [base + step * np.repeat(a[:, 3], counts), np.repeat(a[:, 1], counts), np.repeat(a[:, 2], counts)],
                axis=1,
            )
            descs = nixlBind.nixlXferDList(self._mem(mem_type), rows.astype(np.uint64).tobytes())
        else:
            descs = self.get_xfer_descs(xfer_list, mem_type)
        if descs is None:
            raise nixlInvalidParamError("prep_xfer_dlist: unsupported or malformed descriptors")
        if backends:
            self._backend_names(backends)
        local = agent_name in ("", "NIXL_INIT_AGENT")
        return nixl_prepped_dlist_handle(self.agent.prep_dlist("" if local else agent_name, descs))

    @staticmethod
    def _indices(idx: Any) -> Any:
        if isinstance(idx, np.ndarray):
            return np.ascontiguousarray(idx, dtype=np.int32).tobytes()
        return idx

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: nixl_prepped_dlist_handle,
        local_indices: Union[list[int], np.ndarray],
        remote_xfer_side: nixl_prepped_dlist_handle,
        remote_indices: Union[list[int], np.ndarray],
        notif_msg: Union[bytes, str] = b"",
        backends: Optional[list[str]] = None,
        skip_desc_merge: bool = False,
    ) -> nixl_xfer_handle:
        """A request from entries of two prepared lists (indices: lists or int32 arrays)."""
        if operation not in self.nixl_ops:
            raise nixlInvalidParamError(f"Invalid op {operation!r}")
        h = self.agent.make_prepped(
            operation,
            local_xfer_side._handle,
            self._indices(local_indices),
            remote_xfer_side._handle,
            self._indices(remote_indices),
            _as_bytes(notif_msg),
            self._forced(backends or []),
        )
        return nixl_xfer_handle(h)

    def initialize_xfer(
        self,
        operation: str,
        local_descs: Any,
        remote_descs: Any,
        remote_agent: str,
        notif_msg: Union[bytes, str] = b"",
        backends: Optional[list[str]] = None,
    ) -> nixl_xfer_handle:
        """A request between two descriptor lists: READ brings remote to local, WRITE local to
        remote; ``notif_msg`` reaches ``remote_agent`` after the data of each post."""
        if operation not in self.nixl_ops:
            raise nixlInvalidParamError(f"Invalid op {operation!r}")
        local = self.get_xfer_descs(local_descs)
        remote = self.get_xfer_descs(remote_descs)
        if local is None or remote is None:
            raise nixlInvalidParamError("initialize_xfer: unsupported descriptor lists")
        h = self.agent.create_xfer(
            operation, local, remote, remote_agent, _as_bytes(notif_msg), self._forced(backends or [])
        )
        return nixl_xfer_handle(h)

    def transfer(self, handle: nixl_xfer_handle, notif_msg: Union[bytes, str] = b"") -> str:
        """Posts the request: "DONE" if it completed at once, else "PROC"; raises NIXL's
        exception for a failure."""
        if notif_msg and not isinstance(notif_msg, bytes):
            notif_msg = _as_bytes(notif_msg)
        return handle._handle.post(notif_msg)

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """ "DONE" or "PROC"; raises the failure's exception (``nixlRemoteDisconnectError``,
        ``nixlCancelledError``, ...)."""
        return handle._handle.state()

    def wait_xfer(self, handle: nixl_xfer_handle, timeout_s: Optional[float] = None) -> str:
        """nixl-rs: blocks (without the GIL) until the post ends or ``timeout_s`` passes."""
        ms = -1 if timeout_s is None else int(timeout_s * 1000)
        return "DONE" if handle._handle.wait(ms) == 0 else "PROC"

    def abort_xfer(self, handle: nixl_xfer_handle) -> None:
        """Cancels the post in flight (its state then raises ``nixlCancelledError``)."""
        handle._handle.abort()

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> Any:
        """startTime, postDuration, xferDuration (µs), totalBytes, descCount (and nixl-rs's
        backend) of the last post; needs ``capture_telemetry``."""
        return handle._handle.telemetry()

    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle) -> tuple[int, int, str]:
        """Estimates one post of the request: ``(duration, error margin, method)``, times in
        microseconds, as NIXL returns them. The method is NIXL's ``"ANALYTICAL_BACKEND"``;
        ``estimate_xfer_cost_detail`` (a nixl-rs extension) says where the numbers came from:
        ``"MEASURED_REQUEST"`` (this request's own last posts: median and spread),
        ``"MEASURED_BACKEND"`` (a fit of latency and bandwidth over the posts its backend
        completed in this agent) or ``"CONFIGURED"`` (the backend's nominal latency and
        bandwidth, with a margin of 100 %). Durations are those this process observed, from
        the post to the first state check that saw it done."""
        duration, margin, _ = req_handle._handle.estimate()
        return duration, margin, "ANALYTICAL_BACKEND"

    def estimate_xfer_cost_detail(self, req_handle: nixl_xfer_handle) -> tuple[int, int, str]:
        """As ``estimate_xfer_cost``, with nixl-rs's own method name (a nixl-rs extension)."""
        return tuple(req_handle._handle.estimate())

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        """The backend carrying the request, by the name it was created with."""
        rs = handle._handle.backend()
        if rs in self.backends:
            return rs
        nixl = _TO_NIXL.get(rs, rs)
        return nixl if nixl in self.backends else rs

    def query_xfer_backend_rs(self, handle: nixl_xfer_handle) -> str:
        """nixl-rs: the nixl-rs backend carrying the request ("local", "shm", "tcp", ...)."""
        return handle._handle.backend()

    def release_xfer_handle(self, handle: nixl_xfer_handle) -> None:
        handle.release()

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle) -> None:
        handle.release()

    # -- notifications --------------------------------------------------------------------

    def get_new_notifs(self, backends: Optional[list[str]] = None) -> dict[str, list[bytes]]:
        """Notifications received since the last call: {agent name: [bytes, ...]}."""
        return self.agent.get_notifs()

    def update_notifs(self, backends: Optional[list[str]] = None) -> dict[str, list[bytes]]:
        """Adds new notifications to ``self.notifs`` and returns it."""
        for name, msgs in self.agent.get_notifs().items():
            self.notifs.setdefault(name, []).extend(msgs)
        return self.notifs

    def check_remote_xfer_done(
        self,
        remote_agent_name: str,
        lookup_tag: bytes,
        backends: Optional[list[str]] = None,
        tag_is_prefix: bool = True,
    ) -> bool:
        """Whether a notification from ``remote_agent_name`` starts with (or contains)
        ``lookup_tag``; the one found is removed."""
        self.update_notifs()
        tag = _as_bytes(lookup_tag)
        msgs = self.notifs.get(remote_agent_name, [])
        for i, m in enumerate(msgs):
            if (m.startswith(tag) if tag_is_prefix else tag in m):
                del msgs[i]
                return True
        return False

    def send_notif(
        self, remote_agent_name: str, notif_msg: Union[bytes, str], backend: Optional[str] = None
    ) -> None:
        """Sends a notification of its own to ``remote_agent_name``."""
        self.agent.gen_notif(remote_agent_name, _as_bytes(notif_msg))
