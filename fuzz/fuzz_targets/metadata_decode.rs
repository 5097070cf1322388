//! Metadata bytes come from peers, files and etcd: decoding any input must return Ok or Err,
//! never panic or allocate without bound, and whatever decodes must re-encode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_core::AgentMetadata;

fuzz_target!(|data: &[u8]| {
    if let Ok(md) = AgentMetadata::decode(data) {
        let again = AgentMetadata::decode(&md.encode()).expect("re-encoded metadata decodes");
        assert_eq!(again, md);
    }
});
