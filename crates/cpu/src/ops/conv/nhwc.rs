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

use super::dw_block::{
    accumulate, block_scratch, check_depthwise, fill_weights, padded_dims, LANES,
};
use super::kernel::{epilogue, ConvF32};
use super::reference::ConvDims;
use crate::ops::linalg::blas::{gemm_epi, GemmEpilogue, MatRef};

/// Transpose `perm` taking an NCHW tensor to NHWC (output axis i = input axis perm[i]).
pub const NCHW_TO_NHWC: [usize; 4] = [0, 2, 3, 1];
/// Transpose `perm` taking an NHWC tensor back to NCHW.
pub const NHWC_TO_NCHW: [usize; 4] = [0, 3, 1, 2];

/// `s` with its axes taken in `perm` order; a shape of another rank than 4 is returned as
/// it is. Collects into any container (a `Shape` keeps it off the heap).
fn permuted<T: Clone, C: FromIterator<T>>(s: &[T], perm: [usize; 4]) -> C {
    if s.len() != 4 {
        return s.iter().cloned().collect();
    }
    perm.iter().map(|&a| s[a].clone()).collect()
}

/// `[n, c, h, w]` → `[n, h, w, c]` (the NHWC shape of an NCHW one).
pub fn to_nhwc<T: Clone, C: FromIterator<T>>(s: &[T]) -> C {
    permuted(s, NCHW_TO_NHWC)
}

/// `[n, h, w, c]` → `[n, c, h, w]` (the NCHW shape of an NHWC one).
pub fn to_nchw<T: Clone, C: FromIterator<T>>(s: &[T]) -> C {
    permuted(s, NHWC_TO_NCHW)
}

/// The values `v` of an NCHW tensor of shape `nchw` in NHWC order (`to_nhwc`), or the
/// values of its NHWC form back in NCHW order (`!to_nhwc`). For tests.
#[cfg(test)]
pub(crate) fn permute_data<T: Copy + Default>(v: &[T], nchw: [usize; 4], to_nhwc: bool) -> Vec<T> {
    let [_, c, h, w] = nchw;
    let mut out = vec![T::default(); v.len()];
    for i in 0..v.len() {
        let (b, ch, q) = (i / (c * h * w), (i / (h * w)) % c, i % (h * w));
        let j = (b * h * w + q) * c + ch;
        if to_nhwc {
            out[j] = v[i];
        } else {
            out[i] = v[j];
        }
    }
    out
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
    let epi = GemmEpilogue {
        row_bias: None,
        col_bias: conv.bias,
        residual: conv.residual.map(|r| MatRef::row_major(r, m)),
        act: conv.act,
    };
    // With several threads the product splits its rows (the activations, packed on every
    // call) when they outweigh the weights: `sgemm::split_grid`.
    let x = MatRef::row_major(conv.x, c);
    let parallel = crate::parallel::threads() > 1;
    gemm_epi(rows, m, c, out, m, false, x, b, 1.0, parallel, &epi)
}

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
    check_depthwise(&dims, "channels-last depthwise")?;
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
            }
            for (l, v) in d[..nb].iter_mut().enumerate() {
                *v = image[at + (om0 + l) / mg];
            }
            d[nb..].fill(0.0);
        }
    }
    fill_weights(conv, om0, nb, wb, bb);
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
        assert_eq!(to_nhwc::<_, Vec<_>>(&s), vec![2, 5, 7, 3]);
        assert_eq!(to_nchw::<_, Vec<_>>(&to_nhwc::<_, Vec<_>>(&s)), s.to_vec());
        assert_eq!(to_nhwc::<_, Vec<_>>(&[4usize, 5]), vec![4, 5]);
        // the data permutation agrees with the shape's, and round-trips
        let v: Vec<usize> = (0..2 * 3 * 5 * 7).collect();
        let t = permute_data(&v, s, true);
        assert_eq!(t[1], 5 * 7); // NHWC [0,0,0,1] is NCHW [0,1,0,0]
        assert_eq!(permute_data(&t, s, false), v);
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
