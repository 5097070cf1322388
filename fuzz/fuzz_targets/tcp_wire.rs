//! What a tcp peer sends after the handshake: frame bodies of every type (OPEN, WRITE/READ with
//! their pieces, SPAN_WRITE/SPAN_READ with their spans, ACK/DATA answers, NOTIF, metadata frames (MD_PUSH, MD_DROP, MD) and control frames), and the per-purpose
//! admission check a listener makes from a frame's header before reading its body. Any input
//! gives Ok or Err, never a panic or an allocation beyond the frame; a body that decodes
//! re-encodes to one that decodes to the same value; a decoded transfer never holds more than
//! `MAX_PIECES` pieces, a decoded span list never more than `MAX_SPANS` non-empty spans, all
//! inside the hull it reports, of at most `MAX_CHUNK` bytes in all; an admitted size never
//! exceeds the largest frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_transports::fuzzing::tcp_wire::{self as wire, Purpose};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();
    match which % 10 {
        0 => {
            if let Ok(o) = wire::decode_open(body) {
                wire::open(&mut out, o.purpose, &o.name, o.instance, o.expect);
                assert_eq!(wire::decode_open(&out[5..]).expect("re-encoded"), o);
            }
        }
        1 => {
            if let Ok((st, inst, text)) = wire::decode_opened(body) {
                wire::opened(&mut out, st, inst, &text);
                assert_eq!(wire::decode_opened(&out[5..]).expect("re-encoded"), (st, inst, text));
            }
        }
        2 => {
            let mut pieces = Vec::new();
            if wire::decode_xfer(body, &mut pieces).is_ok() {
                assert!(pieces.len() <= wire::MAX_PIECES);
            }
        }
        3 | 4 => {
            let ty = if which % 10 == 3 { wire::ACK } else { wire::DATA };
            if let Ok(r) = wire::decode_reply(ty, body) {
                assert!(r.len <= wire::MAX_CHUNK);
            }
        }
        5 => {
            if let Ok((id, msg)) = wire::decode_notif(body) {
                assert!(msg.len() <= wire::MAX_NOTIF);
                wire::notif(&mut out, id, msg);
                assert_eq!(wire::decode_notif(&out[5..]).expect("re-encoded"), (id, msg));
            }
        }
        6 => {
            let _ = wire::decode_md(body);
            let _ = wire::decode_ctrl_re(body);
        }
        7 => {
            let _ = wire::decode_ctrl(body);
            if wire::decode_md_drop(body).is_ok() {
                assert!(body.is_empty());
            }
        }
        8 => {
            let mut spans = Vec::new();
            if let Ok(x) = wire::decode_spans(body, &mut spans) {
                assert!(spans.len() <= wire::MAX_SPANS);
                assert!(x.total <= wire::MAX_CHUNK);
                let mut total = 0;
                for s in &spans {
                    assert!(s.len > 0 && s.addr >= x.lo && s.addr + s.len <= x.hi);
                    total += s.len;
                }
                assert_eq!(total, x.total);
                wire::span_head(&mut out, wire::SPAN_READ, x.id, x.chunk, x.key, spans.len() as u32);
                for s in &spans {
                    wire::put_span(&mut out, s.addr, s.len as u32);
                }
                wire::finish(&mut out);
                let mut again = Vec::new();
                assert_eq!(wire::decode_spans(&out[5..], &mut again).expect("re-encoded"), x);
                assert_eq!(again, spans);
            }
        }
        _ => {
            // The admission check: any purpose (or none yet) and any type byte.
            let purpose = match body.first().map(|b| b % 4) {
                Some(0) => Some(Purpose::Data),
                Some(1) => Some(Purpose::Metadata),
                Some(2) => Some(Purpose::Control),
                _ => None,
            };
            let ty = body.get(1).copied().unwrap_or(0);
            if let Some(limit) = wire::purpose_limit(purpose, ty) {
                assert!(limit <= wire::frame_limit(ty).max(wire::MAX_FRAME) + (1 << 20));
            }
        }
    }
});
