//! Builds nothing. It exists so that `protoc-bin-vendored` (its build dependency) is fetched
//! with this crate: etcd-client's build script runs protoc, and `.cargo/config.toml` points
//! `PROTOC` at `scripts/protoc`, which runs the protoc that crate ships (see that script).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = protoc_bin_vendored::protoc_bin_path() {
        println!("cargo:warning=no vendored protoc for this host ({e}); set PROTOC to a protoc");
    }
}
