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
            eprintln!("cuda driver present: {:?}", d.facts());
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
