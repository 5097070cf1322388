//! A post's plan: its descriptors cut and batched into chunks, and each chunk's frame.

use std::io;

use nixl_core::{Run, XferOp, XferPlan};

use super::net::Span;
use super::wire::{self, Piece};

/// A post's transfer, prepared once.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) op: XferOp,
    pub(super) body: Body,
    pub(super) chunks: Vec<Chunk>,
    pub(super) notif: Option<Vec<u8>>,
}

/// The pieces of a plan; a [`Chunk`] indexes into them.
#[derive(Debug)]
pub(super) enum Body {
    /// A local span and a remote piece (any region) per piece: WRITE and READ frames.
    Pieces {
        local: Vec<Span>,
        remote: Vec<Piece>,
    },
    /// The core's runs (one remote region, `key`), kept as they came: SPAN_WRITE and SPAN_READ
    /// frames of 12 bytes a span, the local side read and written straight from the runs.
    Runs { runs: Vec<Run>, key: u64 },
}

/// A chunk's local memory, of either body.
#[derive(Clone, Copy)]
pub(super) enum Local<'a> {
    Spans(&'a [Span]),
    Runs(&'a [Run]),
}

impl Plan {
    pub(super) fn local(&self, c: Chunk) -> Local<'_> {
        let r = c.start as usize..c.end as usize;
        match &self.body {
            Body::Pieces { local, .. } => Local::Spans(&local[r]),
            Body::Runs { runs, .. } => Local::Runs(&runs[r]),
        }
    }

    /// Writes the frame that asks for chunk `idx` of post `id` into `out`; returns whether it
    /// is a WRITE (its data follows it). `spans`: the lane's listener takes SPAN frames; a
    /// plan of runs cannot be sent without them.
    pub(super) fn frame(
        &self,
        out: &mut Vec<u8>,
        id: u64,
        idx: u32,
        spans: bool,
    ) -> io::Result<bool> {
        let c = self.chunks[idx as usize];
        let write = self.op == XferOp::Write;
        let r = c.start as usize..c.end as usize;
        match &self.body {
            Body::Pieces { remote, .. } => {
                let ty = if write { wire::WRITE } else { wire::READ };
                wire::xfer_head(out, ty, id, idx, c.end - c.start);
                for p in &remote[r] {
                    wire::put_piece(out, p);
                }
            }
            Body::Runs { runs, key } => {
                if !spans {
                    return Err(io::Error::other(
                        "the peer's listener no longer takes SPAN frames (it was replaced by \
                         an older version): prepare the request again",
                    ));
                }
                let ty = if write {
                    wire::SPAN_WRITE
                } else {
                    wire::SPAN_READ
                };
                wire::span_head(out, ty, id, idx, *key, c.end - c.start);
                for run in &runs[r] {
                    // Runs are cut to at most a chunk (`cut_runs`), under u32::MAX.
                    wire::put_span(out, run.remote, run.len as u32);
                }
            }
        }
        wire::finish(out);
        Ok(write)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk {
    start: u32,
    end: u32,
    pub(super) bytes: u64,
}

pub(super) fn make_plan(p: &XferPlan, chunk_bytes: u64) -> Plan {
    let mut local = Vec::with_capacity(p.segments.len());
    let mut remote = Vec::with_capacity(p.segments.len());
    let mut chunks = Vec::new();
    let mut start = 0u32;
    let mut bytes = 0u64;
    for seg in &p.segments {
        let key = p.remote_regions[seg.remote_region as usize].key;
        let mut off = 0u64;
        while off < seg.local.len {
            let take = (seg.local.len - off).min(chunk_bytes - bytes);
            local.push(Span {
                addr: seg.local.addr + off,
                len: take,
            });
            remote.push(Piece {
                addr: seg.remote.addr + off,
                len: take,
                key,
            });
            off += take;
            bytes += take;
            if bytes == chunk_bytes || local.len() - start as usize == wire::MAX_PIECES {
                chunks.push(Chunk {
                    start,
                    end: local.len() as u32,
                    bytes,
                });
                start = local.len() as u32;
                bytes = 0;
            }
        }
    }
    if (start as usize) < local.len() {
        chunks.push(Chunk {
            start,
            end: local.len() as u32,
            bytes,
        });
    }
    Plan {
        op: p.op,
        body: Body::Pieces { local, remote },
        chunks,
        notif: p.notif.clone(),
    }
}

/// Cuts runs into chunks of SPAN frames: a chunk ends before the run that would take it over
/// `chunk_bytes` or past [`wire::MAX_SPANS`] spans; a run longer than `chunk_bytes` is first cut
/// into pieces of `chunk_bytes` (a new list only then: blocks of a KV cache never are), and
/// empty runs are dropped. The runs' order is kept.
pub(super) fn cut_runs(mut runs: Vec<Run>, chunk_bytes: u64) -> (Vec<Run>, Vec<Chunk>) {
    if runs.iter().any(|r| r.len > chunk_bytes || r.len == 0) {
        let mut cut = Vec::with_capacity(runs.len());
        for r in &runs {
            let mut off = 0;
            while off < r.len {
                let len = (r.len - off).min(chunk_bytes);
                cut.push(Run {
                    local: r.local + off,
                    remote: r.remote + off,
                    len,
                });
                off += len;
            }
        }
        runs = cut;
    }
    let mut chunks = Vec::with_capacity(runs.len() / 64 + 1);
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, r) in runs.iter().enumerate() {
        if i > start && (bytes + r.len > chunk_bytes || i - start == wire::MAX_SPANS) {
            chunks.push(Chunk {
                start: start as u32,
                end: i as u32,
                bytes,
            });
            (start, bytes) = (i, 0);
        }
        bytes += r.len;
    }
    if start < runs.len() {
        chunks.push(Chunk {
            start: start as u32,
            end: runs.len() as u32,
            bytes,
        });
    }
    (runs, chunks)
}

#[cfg(test)]
#[path = "client_plan_tests.rs"]
mod tests;
