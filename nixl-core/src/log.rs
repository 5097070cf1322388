//! Logging for the library's embeddings (C, Python), which have no `main` of their own to set
//! it up.

use std::sync::Once;

/// Turns on logging to stderr, once per process, when `NIXL_LOG` (e.g. `NIXL_LOG=info`, any
/// `tracing` filter) is set; a subscriber the process installed before is left in place.
pub fn init_logging_from_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("NIXL_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}
