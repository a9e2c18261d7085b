//! Convolutions on channels-last (NHWC) activations: the tactics of the `fp32/nhwc` format
//! (`cpu.conv.nhwc.gemm_1x1`, `cpu.conv.nhwc.dw`).
//!
//! The tuner may keep a run of layers in NHWC so that the depthwise kernel, which
//! vectorises across channels, reads and writes its natural layout with no per-layer
//! interleave and de-interleave, and the pointwise convolutions are one plain product over
//! every image's positions. Transposes (ONNX `Transpose` layers) are inserted only where a
//! run starts or ends; the tuner counts their time ([`crate::ops::conv::tactics`]).
//!
//! Layouts: X is N × H × W × C, the output and a fused residual N × OH × OW × M. The
//! pointwise kernel's weights are either ONNX's M × C (read as a transposed matrix) or, when
//! the builder packed them ([`transpose_weights`]), C × M; the depthwise kernel reads
//! ONNX's M × 1 × KH × KW.

use rayon::prelude::*;

use kiln_core::{KilnError, Result};

use super::dw_block::{accumulate, block_scratch, padded_dims, LANES};
use super::kernel::{epilogue, ConvF32};
use super::reference::ConvDims;
use crate::ops::linalg::blas::{gemm_epi, GemmEpilogue, MatRef};

/// `[n, c, h, w]` → `[n, h, w, c]` (the NHWC shape of an NCHW one).
pub fn to_nhwc<T: Clone>(s: &[T]) -> Vec<T> {
    if s.len() != 4 {
        return s.to_vec();
    }
    vec![s[0].clone(), s[2].clone(), s[3].clone(), s[1].clone()]
}

/// `[n, h, w, c]` → `[n, c, h, w]` (the NCHW shape of an NHWC one).
pub fn to_nchw<T: Clone>(s: &[T]) -> Vec<T> {
    if s.len() != 4 {
        return s.to_vec();
    }
    vec![s[0].clone(), s[3].clone(), s[1].clone(), s[2].clone()]
}

/// ONNX pointwise weights (M × C) as the C × M matrix the packed pointwise kernel reads.
pub fn transpose_weights(w: &[f32], m: usize) -> Result<Vec<f32>> {
    if m == 0 || !w.len().is_multiple_of(m) {
        return Err(KilnError::kernel(
            "Conv",
            format!("cannot read {} weights as {m} filters", w.len()),
        ));
    }
    let c = w.len() / m;
    let mut out = vec![0.0f32; w.len()];
    for (o, row) in w.chunks_exact(c).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * m + o] = v;
        }
    }
    Ok(out)
}

/// A 1×1, stride-1, unpadded, ungrouped convolution on NHWC data: one product
/// `Y[N·H·W × M] = X[N·H·W × C] · Wᵀ` with bias, residual and activation in its epilogue.
/// `transposed_w`: `w` holds C × M (packed at build time) instead of ONNX's M × C.
pub fn pointwise(conv: &ConvF32<'_>, transposed_w: bool, out: &mut [f32]) -> Result<()> {
    let ConvDims { n, c, m, group } = conv.dims;
    if group != 1 || !conv.sp.is_pointwise() {
        return Err(KilnError::kernel(
            "Conv",
            format!(
                "the channels-last 1×1 kernel needs an ungrouped 1×1 window with unit strides and no padding, got {group} groups, kernel {:?}, strides {:?}",
                conv.sp.kernel, conv.sp.strides
            ),
        ));
    }
    let rows = n * conv.sp.out_size();
    let b = if transposed_w {
        MatRef::row_major(conv.w, m)
    } else {
        MatRef::transposed(conv.w, c)
    };
    // Rows `r0..r0 + out.len() / m` of the product, serial or with the product's own
    // threads (which split the columns, each packing all of the rows' activations).
    let part = |r0: usize, out: &mut [f32], parallel: bool| {
        let epi = GemmEpilogue {
            row_bias: None,
            col_bias: conv.bias,
            residual: conv.residual.map(|r| MatRef::row_major(&r[r0 * m..], m)),
            act: conv.act,
        };
        let x = MatRef::row_major(&conv.x[r0 * c..], c);
        gemm_epi(
            out.len() / m,
            m,
            c,
            out,
            m,
            false,
            x,
            b,
            1.0,
            parallel,
            &epi,
        )
    };
    let threads = crate::parallel::threads();
    if threads > 1 && rows >= ROWS_PER_TASK_MIN * threads && rows > m && m > 0 {
        // More activations than weights: threads take row ranges (each packs its own
        // rows and the weights) instead of column ranges (each packing every row).
        let per_task = rows.div_ceil(threads).next_multiple_of(ROWS_PER_TASK_MIN);
        return out
            .par_chunks_mut(per_task * m)
            .enumerate()
            .try_for_each(|(i, o)| part(i * per_task, o, false));
    }
    part(0, out, threads > 1)
}

/// Rows (output positions) below which a thread does not take a range of its own in
/// [`pointwise`].
const ROWS_PER_TASK_MIN: usize = 16;

/// The output pointer shared by the channel-block tasks of [`depthwise`].
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks of one call write disjoint (image, channel block) parts of the output.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// A depthwise convolution (one input channel per group, any channel multiplier) on NHWC
/// data, in blocks of [`LANES`] output channels: each (image, block) copies its channels,
/// zero-padded, into the interleaved buffer of [`super::dw_block`] (a plain strided copy:
/// the data is channel-minor already), runs its multiply-adds, and writes the block's
/// channels of every output position.
pub fn depthwise(conv: &ConvF32<'_>, out: &mut [f32]) -> Result<()> {
    let dims = conv.dims;
    if dims.group == 0 || dims.c != dims.group || !dims.m.is_multiple_of(dims.group) {
        return Err(KilnError::kernel(
            "Conv",
            format!(
                "the channels-last depthwise kernel needs one input channel per group, got {} input channels in {} groups",
                dims.c, dims.group
            ),
        ));
    }
    if conv.sp.input[0] != 1 || conv.sp.kernel[0] != 1 {
        return Err(KilnError::kernel(
            "Conv",
            "the channels-last kernels take 2-D windows only",
        ));
    }
    let p = conv.sp.out_size();
    if p == 0 || dims.m == 0 || dims.n == 0 {
        return Ok(());
    }
    if out.len() != dims.n * p * dims.m {
        return Err(KilnError::kernel(
            "Conv",
            "the output has the wrong number of elements",
        ));
    }
    let blocks = dims.m.div_ceil(LANES);
    let dst = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (bn, blk) = (t / blocks, t % blocks);
        crate::scratch::with_scratch::<f32, _>(block_scratch(&conv.sp), |buf| {
            // SAFETY: `dst` covers n · p · m values (checked above); this task writes only
            // channels blk·LANES.. of image bn, which no other task writes.
            unsafe { run_block(conv, bn, blk * LANES, dst, buf) }
        })
    };
    let tasks = dims.n * blocks;
    if crate::parallel::threads() > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    Ok(())
}

/// `dst = src` for one block of [`LANES`] values, as one fixed-size copy (no call per
/// position); slices of another length are left alone.
#[inline(always)]
fn copy_block(dst: &mut [f32], src: &[f32]) {
    if let (Ok(d), Ok(s)) = (
        <&mut [f32; LANES]>::try_from(dst),
        <&[f32; LANES]>::try_from(src),
    ) {
        *d = *s;
    }
}

/// Output channels `om0..om0 + LANES` (clipped to M) of image `bn`.
///
/// # Safety
/// `dst` points at the whole N × OH × OW × M output, and no other thread touches this
/// block's channels of image `bn` meanwhile.
unsafe fn run_block(conv: &ConvF32<'_>, bn: usize, om0: usize, dst: OutPtr, buf: &mut [f32]) {
    let sp = &conv.sp;
    let (c, m) = (conv.dims.c, conv.dims.m);
    let (p, isz, ksz) = (sp.out_size(), sp.in_size(), sp.kernel_size());
    let nb = (m - om0).min(LANES);
    let mg = m / conv.dims.group;
    let [_, ph, pw] = padded_dims(sp);
    let (xb, rest) = buf.split_at_mut(LANES * ph * pw);
    let (wb, rest) = rest.split_at_mut(LANES * ksz);
    let (bb, rest) = rest.split_at_mut(LANES);
    let ob = &mut rest[..LANES * p];
    // The block's input channels, position by position, zero-padded.
    let [_, ih_n, iw_n] = sp.input;
    let [_, bh, bw] = sp.pad_begin;
    let image = &conv.x[bn * isz * c..(bn + 1) * isz * c];
    for (r, row) in xb.chunks_exact_mut(LANES * pw).take(ph).enumerate() {
        let ih = r.checked_sub(bh).filter(|&ih| ih < ih_n);
        for (q, d) in row.chunks_exact_mut(LANES).enumerate() {
            let iw = q.checked_sub(bw).filter(|&iw| iw < iw_n);
            let (Some(ih), Some(iw)) = (ih, iw) else {
                d.fill(0.0);
                continue;
            };
            let at = (ih * iw_n + iw) * c;
            if mg == 1 && nb == LANES {
                copy_block(d, &image[at + om0..at + om0 + LANES]);
                continue;
            } else if mg == 1 {
                d[..nb].copy_from_slice(&image[at + om0..at + om0 + nb]);
            } else {
                for (l, v) in d[..nb].iter_mut().enumerate() {
                    *v = image[at + (om0 + l) / mg];
                }
            }
            d[nb..].fill(0.0);
        }
    }
    for l in 0..LANES {
        let om = om0 + l;
        for t in 0..ksz {
            wb[t * LANES + l] = if l < nb { conv.w[om * ksz + t] } else { 0.0 };
        }
        bb[l] = match conv.bias {
            Some(b) if l < nb => b[om],
            _ => 0.0,
        };
    }
    accumulate(sp, xb, wb, bb, ob);
    if let Some(res) = conv.residual {
        for (q, o) in ob.chunks_exact_mut(LANES).enumerate() {
            let at = (bn * p + q) * m + om0;
            for (v, r) in o[..nb].iter_mut().zip(&res[at..at + nb]) {
                *v += r;
            }
        }
    }
    epilogue(ob, 0.0, conv.act);
    for (q, o) in ob.chunks_exact(LANES).enumerate() {
        let at = (bn * p + q) * m + om0;
        // SAFETY: `at + nb ≤ n · p · m` (caller's contract), and these values belong to
        // this task alone.
        unsafe {
            if let (LANES, Ok(src)) = (nb, <&[f32; LANES]>::try_from(o)) {
                // A whole block: one fixed-size store (no call per position).
                std::ptr::write_unaligned(dst.0.add(at).cast::<[f32; LANES]>(), *src);
            } else {
                std::ptr::copy_nonoverlapping(o.as_ptr(), dst.0.add(at), nb);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_permutations_round_trip() {
        let s = [2usize, 3, 5, 7];
        assert_eq!(to_nhwc(&s), vec![2, 5, 7, 3]);
        assert_eq!(to_nchw(&to_nhwc(&s)), s.to_vec());
        assert_eq!(to_nhwc(&[4usize, 5]), vec![4, 5]);
    }

    #[test]
    fn transposed_weights_are_c_by_m() {
        let w: Vec<f32> = (0..6).map(|v| v as f32).collect(); // 2 filters × 3 channels
        assert_eq!(
            transpose_weights(&w, 2).unwrap(),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        assert!(transpose_weights(&w, 4).is_err());
    }
}
