use super::*;

struct Fake {
    init: CuResult,
    version: Result<i32, CuResult>,
    count: Result<i32, CuResult>,
}

impl InitApi for Fake {
    fn init(&self) -> CuResult {
        self.init
    }
    fn version(&self) -> Result<i32, CuResult> {
        self.version
    }
    fn device_count(&self) -> Result<i32, CuResult> {
        self.count
    }
    fn error_name(&self, code: CuResult) -> String {
        format!("E{code}")
    }
}

fn fake(init: CuResult, version: i32, count: i32) -> Fake {
    Fake {
        init,
        version: Ok(version),
        count: Ok(count),
    }
}

#[test]
fn probe_reasons() {
    assert_eq!(
        check_init(&fake(0, 12080, 2)),
        Ok(DriverFacts {
            version: 12080,
            devices: 2
        })
    );
    let e = check_init(&fake(CUDA_ERROR_NO_DEVICE, 12080, 0)).unwrap_err();
    assert!(e.starts_with("no CUDA devices"), "{e}");
    let e = check_init(&fake(0, 12080, 0)).unwrap_err();
    assert!(e.starts_with("no CUDA devices"), "{e}");
    let e = check_init(&fake(0, 11040, 1)).unwrap_err();
    assert_eq!(e, "driver too old: CUDA 11.4 driver, 12.0 or newer needed");
    let e = check_init(&fake(CUDA_ERROR_INSUFFICIENT_DRIVER, 0, 0)).unwrap_err();
    assert!(e.starts_with("driver too old"), "{e}");
    let e = check_init(&fake(CUDA_ERROR_STUB_LIBRARY, 0, 0)).unwrap_err();
    assert!(e.contains("stub"), "{e}");
    let e = check_init(&fake(CUDA_ERROR_NOT_INITIALIZED, 0, 0)).unwrap_err();
    assert_eq!(e, "cuInit failed: E3 (3)");
    let e = check_init(&Fake {
        init: 0,
        version: Err(999),
        count: Ok(1),
    })
    .unwrap_err();
    assert!(e.contains("cuDriverGetVersion failed: E999"), "{e}");
    let e = check_init(&Fake {
        init: 0,
        version: Ok(12000),
        count: Err(101),
    })
    .unwrap_err();
    assert!(e.contains("cuDeviceGetCount failed: E101"), "{e}");
}

#[test]
fn missing_library_is_a_reason_not_a_panic() {
    let e = probe_names(&["libnixl-no-such-cuda.so.1"]).unwrap_err();
    assert!(
        e.starts_with("libnixl-no-such-cuda.so.1 not found: "),
        "{e}"
    );
}

#[test]
fn library_without_the_symbols_is_too_old() {
    // libc loads but exports no cuInit: reported as a missing symbol, not a panic.
    let e = probe_names(&["libc.so.6"]).unwrap_err();
    assert!(
        e.starts_with("libc.so.6 lacks cuInit: driver too old"),
        "{e}"
    );
}

#[test]
fn real_probe_on_this_host() {
    match driver() {
        Ok(d) => {
            eprintln!("cuda driver present: {d:?}");
            assert!(d.device_count() > 0);
        }
        Err(e) => {
            // Without a driver the reason names the library, the cause, and never panics.
            eprintln!("cuda unavailable here: {e}");
            assert!(
                e.starts_with("libcuda.so.1 not found: ")
                    || e.starts_with("no CUDA devices")
                    || e.starts_with("driver too old")
                    || e.contains("lacks"),
                "{e}"
            );
            // The result is cached: the same text again.
            assert_eq!(driver().unwrap_err(), e);
        }
    }
}

#[test]
fn every_symbol_is_listed_once() {
    let mut s = SYMBOLS.to_vec();
    s.sort_unstable();
    s.dedup();
    assert_eq!(s.len(), SYMBOLS.len());
    assert!(SYMBOLS.contains(&"cuInit"));
    assert!(SYMBOLS.contains(&"cuDeviceGetPCIBusId"));
    // Optional: a driver without it still loads.
    assert!(!SYMBOLS.contains(&"cuMemGetHandleForAddressRange"));
}

#[test]
fn bus_ids_in_sysfs_form() {
    assert_eq!(sysfs_bus_id("0000:19:00.0"), "0000:19:00.0");
    assert_eq!(sysfs_bus_id("00000000:1B:00.0"), "0000:1b:00.0");
    assert_eq!(sysfs_bus_id("00010000:1b:00.0"), "00010000:1b:00.0");
    assert_eq!(sysfs_bus_id(" 0001:AB:00.1\n"), "0001:ab:00.1");
    assert_eq!(sysfs_bus_id("garbage"), "garbage");
}

/// A device context over [`Api::fake`]: every driver call is recorded, none does anything.
fn fake_ctx() -> Arc<DeviceCtx> {
    // SAFETY: libc is loaded in every process already; it only stands in for the library the
    // driver keeps open (no symbol of it is called).
    let lib = unsafe { Library::new("libc.so.6") }.expect("libc");
    let drv: &'static Driver = Box::leak(Box::new(Driver {
        api: Api::fake(),
        opt: OptionalApi {
            flush_gdr_writes: None,
            module_load_data: None,
            module_get_function: None,
            module_unload: None,
            launch_kernel: None,
            mem_get_handle_for_address_range: None,
            memcpy_batch_v2: None,
            memcpy_batch_v1: None,
        },
        facts: DriverFacts {
            version: 12080,
            devices: 1,
        },
        _lib: lib,
    }));
    Arc::new(DeviceCtx {
        drv,
        ordinal: 0,
        dev: 0,
        ctx: std::ptr::null_mut(),
        uuid: [0; 16],
        vmm: true,
        posix_fd: true,
        fabric: false,
        gdr_vmm: false,
    })
}

/// The fake driver calls made on this thread since the last look (but the error names asked
/// for the messages), and which call fails from now on.
fn calls(fail: Option<&'static str>) -> Vec<&'static str> {
    FAKE_FAIL.with(|f| f.set(fail));
    let mut c = FAKE_CALLS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    c.retain(|&c| c != "cuGetErrorName");
    c
}

const PUSH: &str = "cuCtxPushCurrent_v2";
const POP: &str = "cuCtxPopCurrent_v2";

#[test]
fn an_owned_object_is_released_once_in_its_context_and_the_context_after_it() {
    let ctx = fake_ctx();
    calls(None);
    let s = Stream::new(&ctx).unwrap();
    assert_eq!(calls(None), [PUSH, "cuStreamCreate", POP]);
    let ev = Event::record(&s).unwrap();
    assert_eq!(calls(None), [PUSH, "cuEventCreate", "cuEventRecord", POP]);
    // The stream holds the context: dropping our reference releases nothing.
    drop(ctx);
    assert_eq!(calls(None), Vec::<&str>::new());
    drop(ev);
    assert_eq!(calls(None), [PUSH, "cuEventDestroy_v2", POP]);
    drop(s);
    assert_eq!(
        calls(None),
        [
            PUSH,
            "cuStreamDestroy_v2",
            POP,
            "cuDevicePrimaryCtxRelease_v2"
        ]
    );
}

#[test]
fn a_vmm_allocation_is_unmapped_freed_and_released_in_that_order() {
    let ctx = fake_ctx();
    calls(None);
    let a = VmmAlloc::new(&ctx, 1 << 21, HANDLE_POSIX_FD).unwrap();
    let made = [
        PUSH,
        "cuMemCreate",
        "cuMemAddressReserve",
        "cuMemMap",
        "cuMemSetAccess",
        POP,
    ];
    assert_eq!(calls(None), made);
    drop(a);
    let released = [PUSH, "cuMemUnmap", "cuMemAddressFree", "cuMemRelease", POP];
    assert_eq!(calls(None), released);
}

#[test]
fn a_vmm_allocation_failing_midway_releases_only_what_was_made() {
    let ctx = fake_ctx();
    calls(Some("cuMemMap"));
    let e = VmmAlloc::new(&ctx, 1 << 21, HANDLE_POSIX_FD).unwrap_err();
    assert_eq!(e.op, "cuMemMap");
    let c = calls(Some("cuMemAddressReserve"));
    let mapped_at = c.iter().position(|&c| c == "cuMemMap").unwrap();
    // Released (in a second push of the context, the first still current) before the pop of
    // the construction: the range and the handle, no unmap of the failed map.
    assert_eq!(
        c[mapped_at + 1..],
        [PUSH, "cuMemAddressFree", "cuMemRelease", POP, POP]
    );
    let e = VmmAlloc::new(&ctx, 1 << 21, HANDLE_POSIX_FD).unwrap_err();
    assert_eq!(e.op, "cuMemAddressReserve");
    let c = calls(None);
    assert_eq!(
        c,
        [
            PUSH,
            "cuMemCreate",
            "cuMemAddressReserve",
            PUSH,
            "cuMemRelease",
            POP,
            POP
        ]
    );
    // A device address the driver does not give is an error, the range it gave freed.
    let e = VmmAlloc::new_at(&ctx, 1 << 21, HANDLE_POSIX_FD, 1 << 40).unwrap_err();
    assert!(e.name.contains("is taken in this process"), "{e}");
    assert!(!calls(None).contains(&"cuMemMap"));
}

#[test]
fn a_failed_release_is_logged_not_raised() {
    let ctx = fake_ctx();
    let m = DeviceAlloc::new(&ctx, 4096).unwrap();
    calls(Some("cuMemFree_v2"));
    drop(m);
    assert_eq!(calls(None), [PUSH, "cuMemFree_v2", POP]);
    // A context that cannot be made current leaks the object (logged) rather than release it
    // in another context.
    let m = LegacyImport::open(&ctx, &[0; 64]).unwrap();
    calls(Some(PUSH));
    drop(m);
    assert_eq!(calls(None), [PUSH]);
}
