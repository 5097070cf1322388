//! Layouts from C: checked, encoded and decoded, and the descriptors of a block mapping
//! between two of them.

use super::*;

pub(crate) fn layout_from(l: &nixl_kv_layout) -> Res<KvLayout> {
    let kind = match l.kind {
        NIXL_KV_SPLIT => KvKind::Split,
        NIXL_KV_MLA => KvKind::Mla,
        k => {
            return Err(Fail::invalid(format!(
                "layout kind {k} is not NIXL_KV_SPLIT or NIXL_KV_MLA"
            )))
        }
    };
    let order = match l.order {
        NIXL_KV_LAYER_FIRST_NHD => Order::LayerFirstNhd,
        NIXL_KV_LAYER_FIRST_HND => Order::LayerFirstHnd,
        NIXL_KV_BLOCK_FIRST_NHD => Order::BlockFirstNhd,
        NIXL_KV_BLOCK_FIRST_HND => Order::BlockFirstHnd,
        o => {
            return Err(Fail::invalid(format!(
                "layout order {o} is not one of NIXL_KV_*_NHD/HND"
            )))
        }
    };
    let k = KvLayout {
        layers: l.layers,
        blocks: l.blocks,
        tokens_per_block: l.tokens_per_block,
        total_heads: l.total_heads,
        head_dim: l.head_dim,
        dtype_bytes: l.dtype_bytes,
        kind,
        order,
        tp_rank: l.tp_rank,
        tp_size: l.tp_size,
        base: l.base,
        dev_id: l.dev_id,
    };
    k.validate().map_err(kv_fail)?;
    Ok(k)
}

pub(crate) fn layout_to(k: &KvLayout) -> nixl_kv_layout {
    nixl_kv_layout {
        layers: k.layers,
        blocks: k.blocks,
        tokens_per_block: k.tokens_per_block,
        total_heads: k.total_heads,
        head_dim: k.head_dim,
        dtype_bytes: k.dtype_bytes,
        kind: match k.kind {
            KvKind::Split => NIXL_KV_SPLIT,
            KvKind::Mla => NIXL_KV_MLA,
        },
        order: match k.order {
            Order::LayerFirstNhd => NIXL_KV_LAYER_FIRST_NHD,
            Order::LayerFirstHnd => NIXL_KV_LAYER_FIRST_HND,
            Order::BlockFirstNhd => NIXL_KV_BLOCK_FIRST_NHD,
            Order::BlockFirstHnd => NIXL_KV_BLOCK_FIRST_HND,
        },
        tp_rank: k.tp_rank,
        tp_size: k.tp_size,
        base: k.base,
        dev_id: k.dev_id,
    }
}

pub(crate) fn layout_arg(p: *const nixl_kv_layout, what: &str) -> Res<KvLayout> {
    let l = array_arg(p, 1, 1, what)?;
    layout_from(&l[0]).map_err(|f| Fail::new(f.code, format!("{what}: {}", f.msg)))
}

pub(crate) fn layouts_arg(p: *const nixl_kv_layout, n: usize, what: &str) -> Res<Vec<KvLayout>> {
    array_arg(p, n, nixl_kv::layout::limits::MAX_TP as usize, what)?
        .iter()
        .enumerate()
        .map(|(i, l)| {
            layout_from(l).map_err(|f| Fail::new(f.code, format!("{what}[{i}]: {}", f.msg)))
        })
        .collect()
}

/// Checks a layout: `NIXL_OK`, or `NIXL_ERR_INVALID` with the field at fault.
///
/// # Safety
/// `layout` is NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_layout_validate(layout: *const nixl_kv_layout) -> nixl_status {
    guard(|| {
        layout_arg(layout, "layout")?;
        Ok(NIXL_OK)
    })
}

/// Encodes a (valid) layout into `NIXL_KV_LAYOUT_BYTES` bytes at `out` (`cap` bytes), for the
/// peer; writes the length to `*len`.
///
/// # Safety
/// `layout` is NULL or readable; `out` has `cap` writable bytes; `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_layout_encode(
    layout: *const nixl_kv_layout,
    out: *mut u8,
    cap: usize,
    len: *mut usize,
) -> nixl_status {
    guard(|| {
        let l = layout_arg(layout, "layout")?;
        if out.is_null() {
            return Err(Fail::invalid("out is NULL"));
        }
        if len.is_null() || !len.is_aligned() {
            return Err(Fail::invalid("len is NULL or misaligned"));
        }
        let b = l.encode();
        if b.len() > cap {
            return Err(Fail::new(
                NIXL_ERR_BUFFER_TOO_SMALL,
                format!("out: {} bytes needed, capacity is {cap}", b.len()),
            ));
        }
        // SAFETY: `out` is non-NULL with `cap >= b.len()` writable bytes; `b` is ours.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out, b.len()) };
        write_out(len, b.len(), "len")?;
        Ok(NIXL_OK)
    })
}

/// Decodes a peer's encoded layout (every field checked) into `*out`.
///
/// # Safety
/// `bytes` points to `len` readable bytes; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_layout_decode(
    bytes: *const u8,
    len: usize,
    out: *mut nixl_kv_layout,
) -> nixl_status {
    guard(|| {
        let b = bytes_arg(bytes, len, "bytes")?;
        let l = KvLayout::decode(b).map_err(kv_fail)?;
        write_out(out, layout_to(&l), "out")?;
        Ok(NIXL_OK)
    })
}

/// The descriptors that move blocks `src[i]` of the prefill group (`prefill`, `nprefill`
/// layouts in rank order) into blocks `dst[i]` of `decode`, for the part read from prefill rank
/// `rank`: decode-side (`local`) and prefill-side (`remote`) lists of `*count` entries each,
/// contiguous runs merged. With fewer than `*count` places (`cap`) it returns
/// `NIXL_ERR_BUFFER_TOO_SMALL` with `*count` set. Layouts that cannot hand KV over are
/// `NIXL_ERR_INVALID` with the reason.
///
/// # Safety
/// The arrays hold the counts given; `local` and `remote` have `cap` writable entries; `count`
/// is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_descs(
    prefill: *const nixl_kv_layout,
    nprefill: usize,
    decode: *const nixl_kv_layout,
    src: *const u32,
    dst: *const u32,
    nblocks: usize,
    rank: u32,
    local: *mut nixl_desc,
    remote: *mut nixl_desc,
    cap: usize,
    count: *mut usize,
) -> nixl_status {
    guard(|| {
        let pre = layouts_arg(prefill, nprefill, "prefill")?;
        let dec = layout_arg(decode, "decode")?;
        let src = array_arg(src, nblocks, NIXL_KV_MAX_BLOCKS, "src")?;
        let dst = array_arg(dst, nblocks, NIXL_KV_MAX_BLOCKS, "dst")?;
        if rank as usize >= pre.len() {
            return Err(Fail::invalid(format!(
                "rank {rank} of {} prefill ranks",
                pre.len()
            )));
        }
        if count.is_null() || !count.is_aligned() {
            return Err(Fail::invalid("count is NULL or misaligned"));
        }
        for (p, what) in [(local, "local"), (remote, "remote")] {
            if (p.is_null() && cap > 0) || (!p.is_null() && !p.is_aligned()) {
                return Err(Fail::invalid(format!("{what} is NULL or misaligned")));
            }
        }
        let mapping: Vec<(u32, u32)> = src.iter().copied().zip(dst.iter().copied()).collect();
        let runs = nixl_kv::plan(&pre, &dec, &mapping).map_err(kv_fail)?;
        let (l, r) = nixl_kv::descs(&runs, rank, &pre[rank as usize], &dec, MemKind::Dram)
            .map_err(kv_fail)?;
        let n = l.len();
        write_out(count, n, "count")?;
        if n > cap {
            return Err(Fail::new(
                NIXL_ERR_BUFFER_TOO_SMALL,
                format!("{n} descriptors, capacity is {cap} (*count says how many)"),
            ));
        }
        for (i, (a, b)) in l.descs().iter().zip(r.descs()).enumerate() {
            let c = |d: &Desc| nixl_desc {
                addr: d.addr,
                len: d.len,
                dev_id: d.dev_id,
            };
            // SAFETY: i < n <= cap entries, non-NULL (n > 0 here) and aligned, checked above.
            unsafe {
                local.add(i).write(c(a));
                remote.add(i).write(c(b));
            }
        }
        Ok(NIXL_OK)
    })
}
