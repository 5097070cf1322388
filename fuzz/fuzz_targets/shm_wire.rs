//! What a process on this node sends the `shm` backend's Unix socket: a byte stream cut into
//! frames (`len u32 | type u8 | payload`) by `Framer`, each decoded by `Frame::decode`. The
//! input is split into reads at points the first bytes choose, so frames straddle reads as they
//! do on a real socket. Any input gives Ok or Err, never a panic; a frame that decodes re-encodes
//! to bytes that decode to the same frame; an oversized length prefix is an error, not an
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_transports::fuzzing::shm_wire::{Frame, Framer};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 61) + 1;
    let mut f = Framer::default();
    for chunk in stream.chunks(step) {
        let room = f.spare(chunk.len());
        room.copy_from_slice(chunk);
        f.commit(chunk.len(), chunk.len());
        loop {
            match f.next_frame() {
                Ok(Some(body)) => {
                    if let Ok(frame) = Frame::decode(&body) {
                        let again = frame.encode();
                        // `encode` writes the length prefix; decode what follows it.
                        assert_eq!(Frame::decode(&again[4..]).expect("re-encoded"), frame);
                    }
                }
                Ok(None) => break,
                Err(_) => return, // the connection would be dropped here
            }
        }
    }
});
