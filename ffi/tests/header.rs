//! `include/nixl.h` is what cbindgen makes of `src/lib.rs` today: the test fails when the
//! committed header is out of date. `NIXL_BLESS=1` rewrites it instead.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen could not generate the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = dir.join("include/nixl.h");
    if std::env::var_os("NIXL_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write include/nixl.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "ffi/include/nixl.h is out of date with ffi/src/lib.rs: run \
         `NIXL_BLESS=1 cargo test -p nixl-ffi --test header` and commit the result"
    );
}
