//! Depthwise convolution on blocks of [`LANES`] channels (tactic `cpu.conv.direct.cblock`).
//!
//! The plane kernels ([`super::flat`], the row kernel) vectorise along an output row, so a
//! 7×7 or 14×14 plane (the late layers of MobileNet-style networks) leaves most of a
//! vector idle and pays the loop bookkeeping once per tap and row. Here the vector runs
//! across channels instead: each (image, block of 16 output channels) copies its input
//! planes, zero-padded, into a channel-interleaved buffer (`[position][16]`), every output
//! position is then `Σ_taps w[tap] · x[position + tap]` with 16-lane multiply-adds (four
//! positions per step, so each tap's weights are loaded once per four), and the result is
//! transposed back into the output planes. Any window (1-D to 3-D), stride, dilation,
//! padding and channel multiplier is taken; blocks of one image write disjoint output
//! planes, so the (image, block) pairs run in parallel.

use rayon::prelude::*;

use kiln_core::{KilnError, Result};

use super::geom::Spatial3;
use super::kernel::{add_residual, epilogue, ConvF32};
use super::reference::ConvDims;
use crate::fused::Activation;
#[cfg(target_arch = "x86_64")]
use crate::ops::linalg::sgemm::Isa;

/// Channels per block: one AVX-512 vector or two AVX2 vectors.
pub const LANES: usize = 16;

/// Output positions per register tile (each tap's weight vector is reused this often).
const TILE: usize = 4;

/// The region of the zero-padded input that the window reaches, per spatial dimension:
/// padded coordinate `q` is input coordinate `q − pad_begin`.
pub(super) fn padded_dims(sp: &Spatial3) -> [usize; 3] {
    std::array::from_fn(|d| {
        (sp.output[d].max(1) - 1) * sp.strides[d] + (sp.kernel[d] - 1) * sp.dilations[d] + 1
    })
}

/// Scratch values one block needs: the padded input, the weights, the bias and the output,
/// all channel-interleaved.
pub(super) fn block_scratch(sp: &Spatial3) -> usize {
    let [pd, ph, pw] = padded_dims(sp);
    LANES * (pd * ph * pw + sp.kernel_size() + 1 + sp.out_size())
}

/// Runs a depthwise convolution (one input channel per group) on channel blocks.
pub fn run(conv: &ConvF32<'_>, out: &mut [f32]) -> Result<()> {
    let dims = conv.dims;
    check_depthwise(&dims, "channel-block direct")?;
    let p = conv.sp.out_size();
    let plane_block = LANES * p;
    let image = dims.m * p;
    if p == 0 || image == 0 {
        return Ok(());
    }
    let blocks = dims.m.div_ceil(LANES);
    let parallel = crate::parallel::threads() > 1 && dims.n * blocks > 1;
    let block = |bn: usize, blk: usize, dst: &mut [f32]| {
        crate::scratch::with_scratch::<f32, _>(block_scratch(&conv.sp), |buf| {
            run_block(conv, bn, blk * LANES, dst, buf)
        })
    };
    if parallel {
        out.par_chunks_mut(image).enumerate().for_each(|(bn, img)| {
            img.par_chunks_mut(plane_block)
                .enumerate()
                .for_each(|(blk, dst)| block(bn, blk, dst))
        });
    } else {
        for (bn, img) in out.chunks_mut(image).enumerate() {
            for (blk, dst) in img.chunks_mut(plane_block).enumerate() {
                block(bn, blk, dst);
            }
        }
    }
    Ok(())
}

/// Output channels `om0..` of image `bn` (as many as `dst` holds planes, at most
/// [`LANES`]) into `dst`, with `buf` of [`block_scratch`] values.
fn run_block(conv: &ConvF32<'_>, bn: usize, om0: usize, dst: &mut [f32], buf: &mut [f32]) {
    let sp = &conv.sp;
    let (p, isz, ksz) = (sp.out_size(), sp.in_size(), sp.kernel_size());
    let nb = dst.len() / p;
    let mg = conv.dims.m / conv.dims.group;
    let [pd, ph, pw] = padded_dims(sp);
    let (xb, rest) = buf.split_at_mut(LANES * pd * ph * pw);
    let (wb, rest) = rest.split_at_mut(LANES * ksz);
    let (bb, rest) = rest.split_at_mut(LANES);
    let ob = &mut rest[..LANES * p];
    let plane = |l: usize| {
        let cin = (om0 + l) / mg;
        let at = (bn * conv.dims.c + cin) * isz;
        &conv.x[at..at + isz]
    };
    let simd = avx2();
    pack_input(sp, nb, plane, xb, simd);
    fill_weights(conv, om0, nb, wb, bb);
    accumulate(sp, xb, wb, bb, ob);
    let act = conv.act_before_residual();
    if act != Activation::None {
        epilogue(ob, 0.0, act);
    }
    unpack_output(ob, p, dst, simd);
    if let Some(res) = conv.residual {
        let at = (bn * conv.dims.m + om0) * p;
        for (plane, r) in dst.chunks_exact_mut(p).zip(res[at..].chunks_exact(p)) {
            add_residual(plane, r, conv.act);
        }
    }
}

/// The weights (`[tap][LANES]`) and bias of output channels `om0..om0 + nb` into `wb` and
/// `bb`, channel-interleaved; lanes `nb..` are zero.
pub(super) fn fill_weights(
    conv: &ConvF32<'_>,
    om0: usize,
    nb: usize,
    wb: &mut [f32],
    bb: &mut [f32],
) {
    let ksz = conv.sp.kernel_size();
    for (l, lanes) in (0..LANES).map(|l| (l, l < nb)) {
        let om = om0 + l;
        for t in 0..ksz {
            wb[t * LANES + l] = if lanes { conv.w[om * ksz + t] } else { 0.0 };
        }
        bb[l] = match conv.bias {
            Some(b) if lanes => b[om],
            _ => 0.0,
        };
    }
}

/// Errors unless `dims` is a depthwise problem (one input channel per group), naming the
/// `kernel` that needs it.
pub(super) fn check_depthwise(dims: &ConvDims, kernel: &str) -> Result<()> {
    if dims.group == 0 || dims.c != dims.group || !dims.m.is_multiple_of(dims.group) {
        return Err(KilnError::kernel(
            "Conv",
            format!(
                "the {kernel} kernel needs one input channel per group (depthwise), got {} input channels in {} groups",
                dims.c, dims.group
            ),
        ));
    }
    Ok(())
}

/// Whether the AVX2 transposes may run (the AVX2 and AVX-512 levels both have AVX2).
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::detect() != Isa::Scalar
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Copies the planes of lanes `0..nb` (`plane(l)`) into `xb`, channel-interleaved and
/// zero-padded to [`padded_dims`]; lanes `nb..` are zero. `simd`: with the AVX2
/// transposes (only where [`avx2`] says so).
fn pack_input<'x>(
    sp: &Spatial3,
    nb: usize,
    plane: impl Fn(usize) -> &'x [f32],
    xb: &mut [f32],
    simd: bool,
) {
    let [pd, ph, pw] = padded_dims(sp);
    let [id_n, ih_n, iw_n] = sp.input;
    let [bd, bh, bw] = sp.pad_begin;
    // Padded columns bw..bw + iw_n hold the input row (clipped to the padded width).
    let (c0, c1) = (bw.min(pw), (bw + iw_n).min(pw));
    let planes: [&[f32]; LANES] = std::array::from_fn(|l| if l < nb { plane(l) } else { &[] });
    for (r, row) in xb.chunks_exact_mut(LANES * pw).take(pd * ph).enumerate() {
        let (qd, qh) = (r / ph, r % ph);
        let input_row = match (qd.checked_sub(bd), qh.checked_sub(bh)) {
            (Some(id), Some(ih)) if id < id_n && ih < ih_n => Some((id * ih_n + ih) * iw_n),
            _ => None,
        };
        let Some(at) = input_row.filter(|_| c0 < c1) else {
            row.fill(0.0);
            continue;
        };
        row[..LANES * c0].fill(0.0);
        row[LANES * c1..].fill(0.0);
        let body = &mut row[LANES * c0..LANES * c1];
        let n = c1 - c0;
        for l0 in (0..LANES).step_by(8) {
            #[cfg(target_arch = "x86_64")]
            if l0 + 8 <= nb && simd {
                let src: [&[f32]; 8] = std::array::from_fn(|i| &planes[l0 + i][at..at + n]);
                // SAFETY: AVX2 is present (the AVX2 and AVX-512 levels both have it); `src` rows hold `n`
                // values and `body` holds `n` positions of LANES values.
                unsafe { simd::interleave8(src, n, &mut body[l0..]) };
                continue;
            }
            for (l, src) in planes.iter().enumerate().skip(l0).take(8) {
                let positions = body.chunks_exact_mut(LANES);
                if l < nb {
                    for (d, &v) in positions.zip(&src[at..at + n]) {
                        d[l] = v;
                    }
                } else {
                    positions.for_each(|d| d[l] = 0.0);
                }
            }
        }
    }
}

/// Writes the channel-interleaved `ob` (`[position][LANES]`) back as the planes of `dst`
/// (`p` positions each, at most [`LANES`] planes); `simd` as for [`pack_input`].
fn unpack_output(ob: &[f32], p: usize, dst: &mut [f32], simd: bool) {
    let nb = dst.len() / p;
    for l0 in (0..nb).step_by(8) {
        let lanes = (nb - l0).min(8);
        let group = &mut dst[l0 * p..(l0 + lanes) * p];
        #[cfg(target_arch = "x86_64")]
        if lanes == 8 && simd {
            // SAFETY: AVX2 is present (the AVX2 and AVX-512 levels both have it); `ob` holds `p` positions
            // of LANES values and `group` 8 planes of `p`.
            unsafe { simd::deinterleave8(&ob[l0..], p, group) };
            continue;
        }
        for (l, plane) in group.chunks_exact_mut(p).enumerate() {
            for (o, v) in plane.iter_mut().zip(ob.chunks_exact(LANES)) {
                *o = v[l0 + l];
            }
        }
    }
}

/// `ob[o] = bb + Σ_taps wb[tap] · xb[o·stride + tap·dilation]` for every output position,
/// with the best SIMD this CPU has.
pub(super) fn accumulate(sp: &Spatial3, xb: &[f32], wb: &[f32], bb: &[f32], ob: &mut [f32]) {
    check_lengths(sp, xb, wb, bb, ob);
    #[cfg(target_arch = "x86_64")]
    {
        match Isa::detect() {
            // SAFETY: the CPU supports the features (run-time detection); the buffer
            // lengths were checked above.
            Isa::Avx512 => return unsafe { simd::accumulate_avx512(sp, xb, wb, bb, ob) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { simd::accumulate_avx2(sp, xb, wb, bb, ob) },
            Isa::Scalar => {}
        }
    }
    accumulate_portable(sp, xb, wb, bb, ob)
}

/// Panics unless the buffers have the lengths [`run_block`] gives them: every index the
/// SIMD loops form is then in bounds (the largest input index is the last padded position,
/// by [`padded_dims`]).
fn check_lengths(sp: &Spatial3, xb: &[f32], wb: &[f32], bb: &[f32], ob: &[f32]) {
    let [pd, ph, pw] = padded_dims(sp);
    assert!(
        xb.len() >= LANES * pd * ph * pw
            && wb.len() >= LANES * sp.kernel_size()
            && bb.len() >= LANES
            && ob.len() >= LANES * sp.out_size(),
        "dw_block buffers too short"
    );
}

/// Calls `f(tap, offset)` for every tap of the window, in weight order, with the tap's
/// offset (in values) from a window origin in the padded buffer.
#[inline(always)]
fn for_each_tap(sp: &Spatial3, ph: usize, pw: usize, mut f: impl FnMut(usize, usize)) {
    let [kd_n, kh_n, kw_n] = sp.kernel;
    let [dd, dh, dw] = sp.dilations;
    let mut t = 0;
    for kd in 0..kd_n {
        for kh in 0..kh_n {
            let row = (kd * dd * ph + kh * dh) * pw * LANES;
            for kw in 0..kw_n {
                f(t, row + kw * dw * LANES);
                t += 1;
            }
        }
    }
}

/// Offset of output position `[od, oh, ow]`'s window origin in the padded buffer.
#[inline(always)]
fn origin(sp: &Spatial3, ph: usize, pw: usize, o: [usize; 3]) -> usize {
    let [sd, sh, sw] = sp.strides;
    ((o[0] * sd * ph + o[1] * sh) * pw + o[2] * sw) * LANES
}

/// The portable loop of [`accumulate`].
fn accumulate_portable(sp: &Spatial3, xb: &[f32], wb: &[f32], bb: &[f32], ob: &mut [f32]) {
    let [_, ph, pw] = padded_dims(sp);
    let [od_n, oh_n, ow_n] = sp.output;
    for (i, o) in ob
        .chunks_exact_mut(LANES)
        .take(od_n * oh_n * ow_n)
        .enumerate()
    {
        let at = origin(sp, ph, pw, [i / (oh_n * ow_n), (i / ow_n) % oh_n, i % ow_n]);
        o.copy_from_slice(&bb[..LANES]);
        for_each_tap(sp, ph, pw, |t, off| {
            let (w, x) = (&wb[t * LANES..][..LANES], &xb[at + off..][..LANES]);
            for l in 0..LANES {
                o[l] += w[l] * x[l];
            }
        });
    }
}

/// The AVX-512 and AVX2 loops of [`accumulate`]: output rows in tiles of [`TILE`]
/// positions (single positions at the end of a row), each tap's weight vector loaded once
/// per tile.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{for_each_tap, origin, padded_dims, Spatial3, LANES, TILE};

    /// 16 lanes as one AVX-512 register.
    #[derive(Clone, Copy)]
    struct V512(__m512);

    /// 16 lanes as two AVX2 registers.
    #[derive(Clone, Copy)]
    struct V256([__m256; 2]);

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load512(p: *const f32) -> V512 {
        // SAFETY: the caller passes 16 readable values.
        V512(unsafe { _mm512_loadu_ps(p) })
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma512(a: V512, w: V512, x: V512) -> V512 {
        V512(_mm512_fmadd_ps(w.0, x.0, a.0))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store512(p: *mut f32, v: V512) {
        // SAFETY: the caller passes 16 writable values.
        unsafe { _mm512_storeu_ps(p, v.0) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load256(p: *const f32) -> V256 {
        // SAFETY: the caller passes 16 readable values.
        unsafe { V256([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256(a: V256, w: V256, x: V256) -> V256 {
        V256([
            _mm256_fmadd_ps(w.0[0], x.0[0], a.0[0]),
            _mm256_fmadd_ps(w.0[1], x.0[1], a.0[1]),
        ])
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store256(p: *mut f32, v: V256) {
        // SAFETY: the caller passes 16 writable values.
        unsafe {
            _mm256_storeu_ps(p, v.0[0]);
            _mm256_storeu_ps(p.add(8), v.0[1]);
        }
    }

    /// The 8×8 transpose of rows `r`: result `j` is `[r[0][j], …, r[7][j]]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// A mask of the first `n` (≤ 8) lanes for the masked loads and stores.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn first_lanes(n: usize) -> __m256i {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane)
    }

    /// `dst[q·LANES + i] = src[i][q]` for all `n` positions `q` and 8 lanes `i` (the
    /// interleaved layout with `dst` starting at the first of the 8 lanes).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn interleave8(src: [&[f32]; 8], n: usize, dst: &mut [f32]) {
        assert!(src.iter().all(|r| r.len() >= n) && (n == 0 || dst.len() >= (n - 1) * LANES + 8));
        for q in (0..n).step_by(8) {
            let valid = (n - q).min(8);
            let mask = first_lanes(valid);
            // SAFETY: the masked loads read only the rows' first `n` values, the stores
            // reach position `n − 1` of `dst` (asserted).
            let rows = std::array::from_fn(|i| unsafe {
                _mm256_maskload_ps(src[i].as_ptr().add(q), mask)
            });
            for (j, v) in transpose8(rows).into_iter().take(valid).enumerate() {
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add((q + j) * LANES), v) };
            }
        }
    }

    /// `dst[i·p + q] = src[q·LANES + i]` for 8 lanes `i` and all `p` positions `q`
    /// (`src` starting at the first of the 8 lanes).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn deinterleave8(src: &[f32], p: usize, dst: &mut [f32]) {
        assert!(dst.len() >= 8 * p && (p == 0 || src.len() >= (p - 1) * LANES + 8));
        for q in (0..p).step_by(8) {
            let valid = (p - q).min(8);
            let mask = first_lanes(valid);
            // SAFETY: rows past position `p − 1` are not read (zeros instead), the
            // masked stores write only positions below `p` of the 8 planes (asserted).
            let rows = std::array::from_fn(|i| {
                if i < valid {
                    unsafe { _mm256_loadu_ps(src.as_ptr().add((q + i) * LANES)) }
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (j, v) in transpose8(rows).into_iter().enumerate() {
                unsafe { _mm256_maskstore_ps(dst.as_mut_ptr().add(j * p + q), mask, v) };
            }
        }
    }

    /// One accumulate loop per instruction set, from the same text.
    macro_rules! accumulate_with {
        ($(#[$doc:meta])* $name:ident, $feat:literal, $load:ident, $fma:ident, $store:ident) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU must have the named features and the buffers the lengths
            /// `check_lengths` asks for.
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(
                sp: &Spatial3,
                xb: &[f32],
                wb: &[f32],
                bb: &[f32],
                ob: &mut [f32],
            ) {
                let [_, ph, pw] = padded_dims(sp);
                let [od_n, oh_n, ow_n] = sp.output;
                let step = sp.strides[2] * LANES;
                let (x, w, out) = (xb.as_ptr(), wb.as_ptr(), ob.as_mut_ptr());
                // SAFETY (every block below): offsets stay inside the checked lengths:
                // each output position's window lies in the padded buffer, weights are
                // `ksz` vectors, outputs `out_size` vectors.
                let bias = unsafe { $load(bb.as_ptr()) };
                let mut o = 0;
                for od in 0..od_n {
                    for oh in 0..oh_n {
                        let row = origin(sp, ph, pw, [od, oh, 0]);
                        let mut ow = 0;
                        while ow + TILE <= ow_n {
                            let base = row + ow * step;
                            let mut acc = [bias; TILE];
                            for_each_tap(sp, ph, pw, |t, off| {
                                let wv = unsafe { $load(w.add(t * LANES)) };
                                for (j, a) in acc.iter_mut().enumerate() {
                                    let xv = unsafe { $load(x.add(base + off + j * step)) };
                                    *a = unsafe { $fma(*a, wv, xv) };
                                }
                            });
                            for (j, a) in acc.iter().enumerate() {
                                unsafe { $store(out.add((o + j) * LANES), *a) };
                            }
                            o += TILE;
                            ow += TILE;
                        }
                        while ow < ow_n {
                            let base = row + ow * step;
                            let mut a = bias;
                            for_each_tap(sp, ph, pw, |t, off| {
                                let wv = unsafe { $load(w.add(t * LANES)) };
                                let xv = unsafe { $load(x.add(base + off)) };
                                a = unsafe { $fma(a, wv, xv) };
                            });
                            unsafe { $store(out.add(o * LANES), a) };
                            o += 1;
                            ow += 1;
                        }
                    }
                }
            }
        };
    }

    accumulate_with!(
        /// The loop on AVX-512 registers.
        accumulate_avx512, "avx512f,avx2,fma", load512, fma512, store512
    );
    accumulate_with!(
        /// The loop on pairs of AVX2 registers.
        accumulate_avx2, "avx2,fma", load256, fma256, store256
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::test_util::Lcg;

    fn geometry(input: [usize; 3], kernel: [usize; 3], s: [usize; 3], d: [usize; 3]) -> Spatial3 {
        let pad_begin = [kernel[0] / 2, kernel[1] / 2, kernel[2].saturating_sub(2)];
        let output = std::array::from_fn(|i| {
            let span = (kernel[i] - 1) * d[i] + 1;
            (input[i] + pad_begin[i] + 1).saturating_sub(span) / s[i] + 1
        });
        Spatial3 {
            input,
            kernel,
            strides: s,
            dilations: d,
            pad_begin,
            output,
        }
    }

    /// The AVX2 transposes and the SIMD accumulate loop give exactly what the portable code
    /// gives, for partial blocks, rows shorter and longer than 8 and odd windows (so the
    /// portable path, which this machine's dispatch never takes, is checked too).
    #[test]
    fn simd_and_portable_paths_agree_bit_for_bit() {
        if !avx2() {
            return;
        }
        let cases = [
            ([1, 7, 7], [1, 5, 5], [1, 1, 1], [1, 1, 1]),
            ([1, 14, 14], [1, 3, 3], [1, 2, 2], [1, 1, 1]),
            ([1, 9, 21], [1, 3, 5], [1, 2, 3], [1, 2, 1]),
            ([3, 5, 6], [2, 3, 3], [1, 1, 2], [2, 1, 1]),
            ([1, 1, 29], [1, 1, 4], [1, 1, 1], [1, 1, 3]),
        ];
        let mut r = Lcg(11);
        for (i, &(input, kernel, s, d)) in cases.iter().enumerate() {
            let sp = geometry(input, kernel, s, d);
            let isz = sp.in_size();
            for nb in [16, 8, 13, 5] {
                let x = r.vec(nb * isz);
                let plane = |l: usize| &x[l * isz..(l + 1) * isz];
                let [pd, ph, pw] = padded_dims(&sp);
                let len = LANES * pd * ph * pw;
                let (mut xs, mut xv) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                pack_input(&sp, nb, plane, &mut xs, false);
                pack_input(&sp, nb, plane, &mut xv, true);
                assert_eq!(xs, xv, "case {i}, {nb} lanes: packing");
                assert!(
                    xs.iter().all(|v| v.is_finite()),
                    "case {i}: unwritten values"
                );
                let wb = r.vec(LANES * sp.kernel_size());
                let bb = r.vec(LANES);
                let p = sp.out_size();
                let (mut os, mut ov) = (vec![0.0; LANES * p], vec![0.0; LANES * p]);
                accumulate_portable(&sp, &xs, &wb, &bb, &mut os);
                accumulate(&sp, &xs, &wb, &bb, &mut ov);
                let diff = os
                    .iter()
                    .zip(&ov)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-5, "case {i}: accumulate differs by {diff}");
                let (mut ds, mut dv) = (vec![f32::NAN; nb * p], vec![f32::NAN; nb * p]);
                unpack_output(&ov, p, &mut ds, false);
                unpack_output(&ov, p, &mut dv, true);
                assert_eq!(ds, dv, "case {i}, {nb} lanes: unpacking");
                for (l, plane) in ds.chunks_exact(p).enumerate() {
                    for (q, &v) in plane.iter().enumerate() {
                        assert_eq!(v, ov[q * LANES + l]);
                    }
                }
            }
        }
    }
}
