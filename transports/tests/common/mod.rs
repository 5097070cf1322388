//! Helpers shared by the integration tests of this crate.

pub use nixl_testkit::pattern;
