//! Metadata bytes come from peers, files and etcd: decoding any input must return Ok or Err,
//! never panic or allocate without bound, and whatever decodes must re-encode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_core::AgentMetadata;

fuzz_target!(|data: &[u8]| {
    let Ok(md) = AgentMetadata::decode(data) else {
        return;
    };
    let bytes = md.encode();
    let again = AgentMetadata::decode(&bytes).expect("re-encoded metadata decodes");
    assert_eq!(again, md, "decode(encode(md)) != md");
    // The encoding is canonical: the only thing a decode drops is entries of backends unknown to
    // this build (at least 5 bytes each), so an input of the same length must be the same bytes.
    if bytes.len() == data.len() {
        assert_eq!(bytes, data, "decoded input does not re-encode to itself");
    } else {
        assert!(bytes.len() < data.len(), "re-encoding grew the input");
    }
});
