//! libcufile, loaded at run time: the few types and entry points `gds` uses, and what its
//! status codes mean.

#![allow(non_snake_case)]

use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::OnceLock;

use libloading::Library;

/// `CUfileError_t`: plain integers (a value the library returns that is not a variant of a
/// Rust enum must not be read as one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CuFileError {
    pub(super) err: c_int,
    pub(super) cu_err: c_int,
}

/// `CUfileDescr_t` with an fd handle.
#[repr(C)]
pub(super) struct CuFileDescr {
    pub(super) type_: c_int,
    /// The union `{ int fd; void *handle; }`: the fd in its first four bytes.
    pub(super) handle: CuFileDescrHandle,
    pub(super) fs_ops: *const c_void,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) union CuFileDescrHandle {
    pub(super) fd: c_int,
    pub(super) handle: *mut c_void,
}

// The layouts above are cudarc's generated ones (which use Rust enums for the integer fields).
const _: () = {
    use cudarc::cufile::sys as s;
    assert!(std::mem::size_of::<CuFileError>() == std::mem::size_of::<s::CUfileError_t>());
    assert!(std::mem::size_of::<CuFileDescr>() == std::mem::size_of::<s::CUfileDescr_t>());
    assert!(
        std::mem::offset_of!(CuFileDescr, handle) == std::mem::offset_of!(s::CUfileDescr_t, handle)
    );
    assert!(
        std::mem::offset_of!(CuFileDescr, fs_ops) == std::mem::offset_of!(s::CUfileDescr_t, fs_ops)
    );
};

pub(super) const CU_FILE_SUCCESS: c_int =
    cudarc::cufile::sys::CUfileOpError::CU_FILE_SUCCESS as c_int;
pub(super) const CU_FILE_HANDLE_TYPE_OPAQUE_FD: c_int =
    cudarc::cufile::sys::CUfileFileHandleType::CU_FILE_HANDLE_TYPE_OPAQUE_FD as c_int;

/// What a cuFile status code means, for messages.
pub(super) fn op_error_text(code: c_int) -> String {
    use cudarc::cufile::sys::CUfileOpError as E;
    let known: &[(E, &str)] = &[
        (
            E::CU_FILE_DRIVER_NOT_INITIALIZED,
            "cuFile driver not initialised",
        ),
        (
            E::CU_FILE_DRIVER_INVALID_PROPS,
            "invalid cuFile driver properties",
        ),
        (
            E::CU_FILE_DRIVER_VERSION_MISMATCH,
            "cuFile driver version mismatch",
        ),
        (
            E::CU_FILE_PLATFORM_NOT_SUPPORTED,
            "platform not supported by GDS",
        ),
        (
            E::CU_FILE_IO_NOT_SUPPORTED,
            "I/O not supported on this file (file system or mount)",
        ),
        (E::CU_FILE_DEVICE_NOT_SUPPORTED, "GPU not supported by GDS"),
        (
            E::CU_FILE_NVFS_DRIVER_ERROR,
            "nvidia-fs driver error (is the module loaded?)",
        ),
        (E::CU_FILE_CUDA_DRIVER_ERROR, "CUDA driver error"),
        (E::CU_FILE_CUDA_POINTER_INVALID, "invalid device pointer"),
        (
            E::CU_FILE_CUDA_MEMORY_TYPE_INVALID,
            "memory is not device memory",
        ),
        (
            E::CU_FILE_CUDA_POINTER_RANGE_ERROR,
            "device pointer range out of the allocation",
        ),
        (E::CU_FILE_CUDA_CONTEXT_MISMATCH, "CUDA context mismatch"),
        (E::CU_FILE_INVALID_MAPPING_SIZE, "invalid mapping size"),
        (E::CU_FILE_INVALID_FILE_TYPE, "invalid file type"),
        (
            E::CU_FILE_INVALID_FILE_OPEN_FLAG,
            "file opened with unsupported flags",
        ),
        (
            E::CU_FILE_HANDLE_ALREADY_REGISTERED,
            "file handle already registered",
        ),
        (
            E::CU_FILE_HANDLE_NOT_REGISTERED,
            "file handle not registered",
        ),
        (
            E::CU_FILE_MEMORY_ALREADY_REGISTERED,
            "buffer already registered",
        ),
        (E::CU_FILE_MEMORY_NOT_REGISTERED, "buffer not registered"),
        (E::CU_FILE_PERMISSION_DENIED, "permission denied"),
        (E::CU_FILE_IO_DISABLED, "I/O disabled by configuration"),
        (E::CU_FILE_INTERNAL_ERROR, "internal cuFile error"),
    ];
    known.iter().find(|(e, _)| *e as c_int == code).map_or_else(
        || format!("cuFile status {code}"),
        |(_, t)| format!("{t} (cuFile status {code})"),
    )
}

pub(super) fn describe(e: CuFileError) -> String {
    if e.cu_err != 0 {
        format!("{}; CUDA error {}", op_error_text(e.err), e.cu_err)
    } else {
        op_error_text(e.err)
    }
}

pub(super) type HandleT = *mut c_void;

/// libcufile's entry points, resolved once.
pub(super) struct CuFileLib {
    _lib: Library,
    pub(super) driver_open: unsafe extern "C" fn() -> CuFileError,
    pub(super) handle_register: unsafe extern "C" fn(*mut HandleT, *mut CuFileDescr) -> CuFileError,
    pub(super) handle_deregister: unsafe extern "C" fn(HandleT),
    pub(super) buf_register: unsafe extern "C" fn(*const c_void, usize, c_int) -> CuFileError,
    pub(super) buf_deregister: unsafe extern "C" fn(*const c_void) -> CuFileError,
    pub(super) read: unsafe extern "C" fn(HandleT, *mut c_void, usize, i64, i64) -> isize,
    pub(super) write: unsafe extern "C" fn(HandleT, *const c_void, usize, i64, i64) -> isize,
}

impl fmt::Debug for CuFileLib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CuFileLib")
    }
}

/// Loads the first of `names` that opens and has every symbol.
pub(super) fn load_cufile(names: &[&str]) -> std::result::Result<CuFileLib, String> {
    let mut why = Vec::new();
    for name in names {
        // SAFETY: loading libcufile runs its initialisers, which only set up the library's own
        // state; it is NVIDIA's documented way to use it.
        let lib = match unsafe { Library::new(*name) } {
            Ok(l) => l,
            Err(e) => {
                why.push(format!("{name}: {e}"));
                continue;
            }
        };
        macro_rules! sym {
            ($n:literal) => {
                // SAFETY: the symbol's type is the one declared in cufile.h for this name; the
                // pointer stays valid while `lib` (kept in the table) is loaded.
                match unsafe { lib.get($n) } {
                    Ok(s) => *s,
                    Err(e) => {
                        why.push(format!("{name}: {e}"));
                        continue;
                    }
                }
            };
        }
        let t = CuFileLib {
            driver_open: sym!(b"cuFileDriverOpen\0"),
            handle_register: sym!(b"cuFileHandleRegister\0"),
            handle_deregister: sym!(b"cuFileHandleDeregister\0"),
            buf_register: sym!(b"cuFileBufRegister\0"),
            buf_deregister: sym!(b"cuFileBufDeregister\0"),
            read: sym!(b"cuFileRead\0"),
            write: sym!(b"cuFileWrite\0"),
            _lib: lib,
        };
        return Ok(t);
    }
    Err(format!("libcufile not found ({})", why.join("; ")))
}

pub(super) fn cufile() -> std::result::Result<&'static CuFileLib, String> {
    static LIB: OnceLock<std::result::Result<CuFileLib, String>> = OnceLock::new();
    LIB.get_or_init(|| load_cufile(&["libcufile.so.0", "libcufile.so"]))
        .as_ref()
        .map_err(Clone::clone)
}
