//! The KV layout a worker publishes: shape, order, tensor-parallel place, and where it lives.
//! Versioned and bounded: a peer's layout is decoded with every field checked, and every
//! offset it implies fits in its region.

use crate::{KvError, Result};

/// Version of the encoded layout.
pub const LAYOUT_VERSION: u16 = 1;
/// Encoded size of a layout, in bytes (fixed).
pub const LAYOUT_BYTES: usize = 2 + 1 + 1 + 4 * 8 + 8 * 3;

/// Bounds on every field a peer can send (generous for today's models).
pub mod limits {
    /// Layers.
    pub const MAX_LAYERS: u32 = 1024;
    /// Blocks per worker.
    pub const MAX_BLOCKS: u32 = 1 << 24;
    /// Tokens per block.
    pub const MAX_TOKENS_PER_BLOCK: u32 = 4096;
    /// KV heads of the whole model.
    pub const MAX_HEADS: u32 = 1024;
    /// Elements per head.
    pub const MAX_HEAD_DIM: u32 = 8192;
    /// Bytes per element.
    pub const MAX_DTYPE_BYTES: u32 = 8;
    /// Tensor-parallel size.
    pub const MAX_TP: u32 = 256;
}

/// K and V as two tensors (MHA/GQA), or one joint latent per token (MLA, replicated across
/// tensor-parallel ranks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvKind {
    /// Separate K and V of `kv_heads` heads each.
    Split,
    /// One latent vector per token (`kv_heads` must be 1); every rank holds all of it.
    Mla,
}

/// Order of the dimensions in memory, outermost first. Within a (layer, K/V, block), `Nhd` is
/// token-major (`[token][head][dim]`), `Hnd` head-major (`[head][token][dim]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    /// `[layer][kv][block][token][head][dim]`.
    LayerFirstNhd,
    /// `[layer][kv][block][head][token][dim]`.
    LayerFirstHnd,
    /// `[block][layer][kv][token][head][dim]` (a block's bytes contiguous: one descriptor).
    BlockFirstNhd,
    /// `[block][layer][kv][head][token][dim]`.
    BlockFirstHnd,
}

impl Order {
    fn code(self) -> u8 {
        self as u8
    }
    fn from_code(c: u8) -> Option<Order> {
        [
            Order::LayerFirstNhd,
            Order::LayerFirstHnd,
            Order::BlockFirstNhd,
            Order::BlockFirstHnd,
        ]
        .get(c as usize)
        .copied()
    }
    fn block_first(self) -> bool {
        matches!(self, Order::BlockFirstNhd | Order::BlockFirstHnd)
    }
    fn head_major(self) -> bool {
        matches!(self, Order::LayerFirstHnd | Order::BlockFirstHnd)
    }
}

/// The KV cache of one worker (one tensor-parallel rank): one contiguous region at `base`.
///
/// ```
/// use nixl_kv::{KvKind, KvLayout, Order};
/// let l = KvLayout {
///     layers: 2, blocks: 8, tokens_per_block: 16, total_heads: 8, head_dim: 64, dtype_bytes: 2,
///     kind: KvKind::Split, order: Order::LayerFirstNhd, tp_rank: 1, tp_size: 2,
///     base: 0x10000, dev_id: 0,
/// };
/// l.validate().unwrap();
/// assert_eq!(l.heads(), 4); // this rank's share of the 8 heads
/// assert_eq!(KvLayout::decode(&l.encode()).unwrap(), l);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Layers.
    pub layers: u32,
    /// Blocks in this worker's cache.
    pub blocks: u32,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// KV heads of the whole model (this rank holds `total_heads / tp_size`, or all for MLA).
    pub total_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Bytes per element.
    pub dtype_bytes: u32,
    /// Split K/V or MLA.
    pub kind: KvKind,
    /// Order in memory.
    pub order: Order,
    /// This worker's tensor-parallel rank.
    pub tp_rank: u32,
    /// Tensor-parallel size of its group.
    pub tp_size: u32,
    /// Address of the region (registered with the worker's agent).
    pub base: u64,
    /// Device id of the region (GPU ordinal for VRAM, 0 for DRAM).
    pub dev_id: u64,
}

impl KvLayout {
    /// Heads this rank holds.
    pub fn heads(&self) -> u32 {
        match self.kind {
            KvKind::Mla => self.total_heads,
            KvKind::Split => self.total_heads / self.tp_size.max(1),
        }
    }

    /// 2 for split K/V, 1 for MLA.
    pub fn kv_planes(&self) -> u32 {
        match self.kind {
            KvKind::Split => 2,
            KvKind::Mla => 1,
        }
    }

    /// Bytes of one head of one token.
    pub fn unit_bytes(&self) -> u64 {
        self.head_dim as u64 * self.dtype_bytes as u64
    }

    /// Bytes of one (layer, K/V, block).
    pub fn plane_block_bytes(&self) -> u64 {
        self.unit_bytes() * self.heads() as u64 * self.tokens_per_block as u64
    }

    /// Bytes of the whole region.
    pub fn region_bytes(&self) -> u64 {
        self.plane_block_bytes() * self.kv_planes() as u64 * self.layers as u64 * self.blocks as u64
    }

    /// Checks every field against [`limits`] and the rules between them.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let bad = |why: String| Err(KvError::Layout(why));
        let range = |name: &str, v: u32, max: u32| {
            if v == 0 || v > max {
                Err(KvError::Layout(format!("{name} = {v} is not in 1..={max}")))
            } else {
                Ok(())
            }
        };
        range("layers", self.layers, MAX_LAYERS)?;
        range("blocks", self.blocks, MAX_BLOCKS)?;
        range(
            "tokens_per_block",
            self.tokens_per_block,
            MAX_TOKENS_PER_BLOCK,
        )?;
        range("total_heads", self.total_heads, MAX_HEADS)?;
        range("head_dim", self.head_dim, MAX_HEAD_DIM)?;
        range("dtype_bytes", self.dtype_bytes, MAX_DTYPE_BYTES)?;
        range("tp_size", self.tp_size, MAX_TP)?;
        if self.tp_rank >= self.tp_size {
            return bad(format!(
                "tp_rank {} is not below tp_size {}",
                self.tp_rank, self.tp_size
            ));
        }
        match self.kind {
            KvKind::Mla if self.total_heads != 1 => {
                return bad(format!(
                    "MLA holds one latent per token: total_heads must be 1, not {}",
                    self.total_heads
                ))
            }
            KvKind::Split if self.total_heads % self.tp_size != 0 => {
                return bad(format!(
                    "{} KV heads do not split evenly over tp_size {} (replicated KV heads are not \
                     supported)",
                    self.total_heads, self.tp_size
                ))
            }
            _ => {}
        }
        // Bounded above, so no overflow: 2^13·2^3·2^10·2^12·2·2^10·2^24 = 2^75 could overflow
        // u64, hence the checked product.
        let size = [
            self.unit_bytes(),
            self.heads() as u64,
            self.tokens_per_block as u64,
            self.kv_planes() as u64,
            self.layers as u64,
            self.blocks as u64,
        ]
        .iter()
        .try_fold(1u64, |a, &b| a.checked_mul(b));
        match size.and_then(|s| s.checked_add(self.base)) {
            Some(_) => Ok(()),
            None => bad("the region overflows the address space".into()),
        }
    }

    /// Offset from `base` of the `head_dim` elements of (layer, plane, block, local head, token).
    /// The caller keeps every index in range ([`KvLayout::validate`]d layout).
    pub fn offset(&self, layer: u32, plane: u32, block: u32, head: u32, token: u32) -> u64 {
        let (h, t) = (self.heads() as u64, self.tokens_per_block as u64);
        let inner = if self.order.head_major() {
            head as u64 * t + token as u64
        } else {
            token as u64 * h + head as u64
        };
        let planes = self.kv_planes() as u64;
        let pb = if self.order.block_first() {
            (block as u64 * self.layers as u64 + layer as u64) * planes + plane as u64
        } else {
            (layer as u64 * planes + plane as u64) * self.blocks as u64 + block as u64
        };
        (pb * h * t + inner) * self.unit_bytes()
    }

    /// The fixed-size little-endian encoding (version first).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(LAYOUT_BYTES);
        b.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
        b.push(match self.kind {
            KvKind::Split => 0,
            KvKind::Mla => 1,
        });
        b.push(self.order.code());
        for v in [
            self.layers,
            self.blocks,
            self.tokens_per_block,
            self.total_heads,
            self.head_dim,
            self.dtype_bytes,
            self.tp_rank,
            self.tp_size,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.base, self.dev_id, 0u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes and [`validate`](KvLayout::validate)s a layout from a peer.
    pub fn decode(b: &[u8]) -> Result<KvLayout> {
        if b.len() != LAYOUT_BYTES {
            return Err(KvError::Layout(format!(
                "encoded layout is {} bytes, expected {LAYOUT_BYTES}",
                b.len()
            )));
        }
        let version = u16::from_le_bytes([b[0], b[1]]);
        if version != LAYOUT_VERSION {
            return Err(KvError::Layout(format!(
                "layout version {version}, this build reads {LAYOUT_VERSION}"
            )));
        }
        let kind = match b[2] {
            0 => KvKind::Split,
            1 => KvKind::Mla,
            k => return Err(KvError::Layout(format!("unknown KV kind {k}"))),
        };
        let order = Order::from_code(b[3])
            .ok_or_else(|| KvError::Layout(format!("unknown order {}", b[3])))?;
        let u32_at = |i: usize| {
            let o = 4 + 4 * i;
            u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
        };
        let u64_at = |i: usize| {
            let o = 36 + 8 * i;
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let l = KvLayout {
            layers: u32_at(0),
            blocks: u32_at(1),
            tokens_per_block: u32_at(2),
            total_heads: u32_at(3),
            head_dim: u32_at(4),
            dtype_bytes: u32_at(5),
            tp_rank: u32_at(6),
            tp_size: u32_at(7),
            kind,
            order,
            base: u64_at(0),
            dev_id: u64_at(1),
        };
        if u64_at(2) != 0 {
            return Err(KvError::Layout("reserved field is not zero".into()));
        }
        l.validate()?;
        Ok(l)
    }
}
