//! A scripted peer process for the multi-process tests: see [`nixl_tests::scripted_peer`].

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = nixl_tests::scripted_peer::run(&args) {
        eprintln!("nixl-test-peer: {e}");
        std::process::exit(1);
    }
}
