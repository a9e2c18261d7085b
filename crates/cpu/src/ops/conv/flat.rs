//! The flattened direct convolution (tactic `cpu.conv.direct`): any 1-D/2-D convolution,
//! without an im2col copy (depthwise convolutions, RGB stems, and k×k convolutions where it
//! beats im2col + GEMM: the tuner times both).
//!
//! Each input plane of a group is padded and split into `sh × sw` stride phases once
//! (phase `(qh, qw)` holds padded rows `qh + sh·r`, columns `qw + sw·t`, `ph × pw` values).
//! Output `(oh, ow)`'s tap `(c, kh, kw)` then reads channel `c`'s phase
//! `(kh·dh mod sh, kw·dw mod sw)` at `(oh + ⌊kh·dh/sh⌋)·pw + ow + ⌊kw·dw/sw⌋`: with the
//! output laid out at row pitch `pw`, every tap is one contiguous run over the whole plane
//! (the `pw − ow` extra columns per row are computed and dropped). The block kernels keep
//! a block of flattened outputs for up to [`MR`] output channels in registers while they
//! walk every tap (one input load feeds `MR` multiply-adds), write the block to an L1
//! chunk, and the chunk gets bias + activation and is copied row by row into the output.

use rayon::prelude::*;
use smallvec::SmallVec;

use super::geom::Spatial3;
use super::kernel::{add_residual, epilogue, planes_per_task, ConvF32, OutPtr};
use super::reference::ConvDims;
use crate::ops::linalg::sgemm::Isa;
use crate::scratch::with_scratch;

/// Output channels one block kernel computes together (sharing each input load), when a
/// group has at least this many.
const MR: usize = 4;

/// The wider block (AVX-512 only).
const MR_MAX: usize = 8;

/// Flattened output positions per chunk (a multiple of every block width): `MR` chunks of
/// accumulators stay in L1.
const CHUNK: usize = 512;

/// Values after the last phase that the block kernels may read (a block past the run's
/// end; the results there are dropped).
const SLACK: usize = 64;

/// Most phase values (C/group × padded plane) the flattened kernel fills per (image, group)
/// with up to [`FEW_CHANNELS`] input channels per group: 16 MiB of scratch.
pub const FLAT_MAX_PHASES: usize = 1 << 22;

/// Most phase values with more input channels per group: 4 MiB, about one core's L2.
/// Every block of outputs reads a few rows of every input channel; once the phases spill
/// out of L2 those rows come from L3 with no prefetch stream to hide it (measured: a
/// 96→24 3×3 conv at 160×160, 10 MiB of phases, ran 2× slower than im2col + GEMM, while
/// at 80×80, 2.5 MiB, it was 12 % faster).
pub const FLAT_MAX_PHASES_MANY: usize = 1 << 20;

/// Input channels per group up to which [`FLAT_MAX_PHASES`] applies.
pub const FEW_CHANNELS: usize = 4;

/// The flattened layout of one convolution's planes.
#[derive(Debug, Clone, Copy)]
pub struct FlatGeom {
    sp: Spatial3,
    /// Rows and columns of one phase.
    ph: usize,
    pw: usize,
    /// Length of the flattened output run: `(oh − 1)·pw + ow`.
    run: usize,
    /// Values of one input channel's phases: `sh·sw·ph·pw`.
    set: usize,
}

impl FlatGeom {
    /// The layout for `sp`, or `None` for a true 3-D window (depth > 1), which only the
    /// depthwise row kernel handles.
    pub fn new(sp: &Spatial3) -> Option<FlatGeom> {
        if sp.input[0] != 1 || sp.kernel[0] != 1 || sp.output[0] != 1 || sp.pad_begin[0] != 0 {
            return None;
        }
        let [_, oh, ow] = sp.output;
        let [_, kh, kw] = sp.kernel;
        if oh == 0 || ow == 0 || kh == 0 || kw == 0 {
            return None;
        }
        let (sh, sw) = (sp.strides[1].max(1), sp.strides[2].max(1));
        let hp = (oh - 1) * sh + (kh - 1) * sp.dilations[1] + 1;
        let wp = (ow - 1) * sw + (kw - 1) * sp.dilations[2] + 1;
        let (ph, pw) = (hp.div_ceil(sh), wp.div_ceil(sw));
        Some(FlatGeom {
            sp: *sp,
            ph,
            pw,
            run: (oh - 1) * pw + ow,
            set: sh * sw * ph * pw,
        })
    }

    /// Whether the phases of `cg` input channels stay within [`FLAT_MAX_PHASES`] (few
    /// channels) or [`FLAT_MAX_PHASES_MANY`].
    pub fn fits(&self, cg: usize) -> bool {
        let cap = if cg <= FEW_CHANNELS {
            FLAT_MAX_PHASES
        } else {
            FLAT_MAX_PHASES_MANY
        };
        cg.saturating_mul(self.set) <= cap
    }

    /// Scratch values for the phases of `cg` input channels.
    fn phases_len(&self, cg: usize) -> usize {
        cg * self.set + SLACK
    }

    /// Writes the padded phases of input plane `x` into `dst` (`set` values).
    fn fill(&self, x: &[f32], dst: &mut [f32]) {
        let sp = &self.sp;
        let [_, ih, iw] = sp.input;
        let (sh, sw) = (sp.strides[1].max(1), sp.strides[2].max(1));
        let (pt, pl) = (sp.pad_begin[1], sp.pad_begin[2]);
        let (ph, pw) = (self.ph, self.pw);
        for qh in 0..sh {
            for qw in 0..sw {
                let phase = &mut dst[(qh * sw + qw) * ph * pw..(qh * sw + qw + 1) * ph * pw];
                // Columns t with qw + sw·t − pl in [0, iw).
                let t_lo = if pl > qw { (pl - qw).div_ceil(sw) } else { 0 };
                let t_hi = if iw + pl > qw {
                    (iw + pl - qw).div_ceil(sw).min(pw)
                } else {
                    0
                };
                for r in 0..ph {
                    let row = qh + sh * r;
                    let prow = &mut phase[r * pw..(r + 1) * pw];
                    if t_lo >= t_hi || row < pt || row - pt >= ih {
                        prow.fill(0.0);
                        continue;
                    }
                    // Only the padding columns are zeroed; the rest is copied over.
                    prow[..t_lo].fill(0.0);
                    prow[t_hi..].fill(0.0);
                    let src = &x[(row - pt) * iw..(row - pt + 1) * iw];
                    let d = &mut prow[t_lo..t_hi];
                    let c0 = qw + sw * t_lo - pl;
                    gather_strided(&src[c0..], sw, d);
                }
            }
        }
    }

    /// Fills the phases of the `cg` input planes in `x` into `dst` (of
    /// [`FlatGeom::phases_len`] values; the slack is zeroed).
    fn fill_channels(&self, x: &[f32], cg: usize, dst: &mut [f32]) {
        let isz = self.sp.in_size();
        for c in 0..cg {
            self.fill(
                &x[c * isz..(c + 1) * isz],
                &mut dst[c * self.set..(c + 1) * self.set],
            );
        }
        dst[cg * self.set..].fill(0.0);
    }

    /// The start of every tap's run in the phases of `cg` channels, in the weights' order
    /// (channel, kh, kw).
    fn offsets(&self, cg: usize, offs: &mut [usize]) {
        let sp = &self.sp;
        let [_, kh_n, kw_n] = sp.kernel;
        let (sh, sw) = (sp.strides[1].max(1), sp.strides[2].max(1));
        let (dh, dw) = (sp.dilations[1], sp.dilations[2]);
        let mut i = 0;
        for c in 0..cg {
            for kh in 0..kh_n {
                let (qh, a) = ((kh * dh) % sh, (kh * dh) / sh);
                for kw in 0..kw_n {
                    let (qw, b) = ((kw * dw) % sw, (kw * dw) / sw);
                    offs[i] = c * self.set + (qh * sw + qw) * self.ph * self.pw + a * self.pw + b;
                    i += 1;
                }
            }
        }
    }
}

/// `dst[j] = src[j·s]` for every `j < dst.len()`: a copy for `s = 1`, a vectorisable
/// de-interleave for `s = 2` (the common strided case), a plain gather otherwise.
pub fn gather_strided(src: &[f32], s: usize, dst: &mut [f32]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    match s {
        1 => dst.copy_from_slice(&src[..n]),
        2 => {
            let (body, last) = dst.split_at_mut(n - 1);
            for (v, pair) in body.iter_mut().zip(src[..2 * (n - 1)].chunks_exact(2)) {
                *v = pair[0];
            }
            last[0] = src[2 * (n - 1)];
        }
        _ => {
            for (j, v) in dst.iter_mut().enumerate() {
                *v = src[j * s];
            }
        }
    }
}

/// A convolution run by the flattened kernel: the problem (its `algo` and `packed` are not
/// read; the weights must be in ONNX layout) and its flattened layout.
pub struct FlatConv<'a> {
    /// The problem.
    pub conv: ConvF32<'a>,
    /// Layout.
    pub geom: FlatGeom,
}

impl FlatConv<'_> {
    /// Computes `out`. Images × groups are split over threads when there are enough of
    /// them; otherwise each (image, group)'s phases are filled once and its output is split
    /// over threads by channel blocks × row ranges.
    pub fn run(&self, out: &mut [f32]) {
        let ConvDims { n, c, m, group } = self.conv.dims;
        let (cg, mg) = (c / group, m / group);
        let k = cg * self.geom.sp.kernel_size();
        let p = self.geom.sp.out_size();
        let units = n * group;
        let threads = crate::parallel::threads();
        let bw = block_channels();
        with_scratch::<usize, _>(k, |offs| {
            self.geom.offsets(cg, offs);
            let offs = &*offs;
            let per_task = planes_per_task(units, mg * p * k, threads);
            let split = per_task == units && planes_per_task(mg, p * k, threads) < mg;
            if !split {
                // Whole (image, group) units per task.
                let body = |first: usize, chunk: &mut [f32]| {
                    with_scratch::<f32, _>(self.geom.phases_len(cg) + chunk_scratch(k), |buf| {
                        let (phases, rest) = buf.split_at_mut(self.geom.phases_len(cg));
                        for (i, out_u) in chunk.chunks_mut(mg * p).enumerate() {
                            self.fill_unit(first + i, phases);
                            for (b, block) in out_u.chunks_mut(bw * p).enumerate() {
                                let mut planes: SmallVec<[&mut [f32]; 8]> =
                                    block.chunks_mut(p).collect();
                                let rows = (0, self.geom.run);
                                let at = (first + i, b * bw, 0);
                                self.channels(at, rows, phases, offs, rest, &mut planes);
                            }
                        }
                    })
                };
                if per_task < units {
                    out.par_chunks_mut(per_task * mg * p)
                        .enumerate()
                        .for_each(|(t, chunk)| body(t * per_task, chunk));
                } else {
                    body(0, out);
                }
                return;
            }
            // Few units: each unit's channel blocks × row ranges split over threads.
            let oh = self.geom.sp.output[1];
            let (ow, pw) = (self.geom.sp.output[2], self.geom.pw);
            let blocks = mg.div_ceil(bw);
            let parts = (4 * threads).div_ceil(blocks).clamp(1, oh);
            let rows_per = oh.div_ceil(parts);
            let parts = oh.div_ceil(rows_per);
            for (u, out_u) in out.chunks_mut(mg * p).enumerate() {
                with_scratch::<f32, _>(self.geom.phases_len(cg), |phases| {
                    self.fill_unit(u, phases);
                    let phases = &*phases;
                    let (shared, len) = (OutPtr(out_u.as_mut_ptr()), out_u.len());
                    crate::parallel::for_each_index(blocks * parts, |t| {
                        let (b, q) = (t / parts, t % parts);
                        let (r0, r1) = (q * rows_per, ((q + 1) * rows_per).min(oh));
                        let (c0, c1) = (b * bw, ((b + 1) * bw).min(mg));
                        let mut planes: SmallVec<[&mut [f32]; 8]> = (c0..c1)
                            .map(|ch| {
                                let (start, n) = (ch * p + r0 * ow, (r1 - r0) * ow);
                                assert!(start + n <= len);
                                // SAFETY: in bounds (checked); task (b, q) alone writes rows
                                // r0..r1 of channels c0..c1, and `out_u` outlives the tasks.
                                unsafe { shared.slice(start, n) }
                            })
                            .collect();
                        let rows = (r0 * pw, (r1 * pw).min(self.geom.run));
                        with_scratch::<f32, _>(chunk_scratch(k), |rest| {
                            self.channels((u, c0, r0), rows, phases, offs, rest, &mut planes)
                        })
                    });
                });
            }
        })
    }

    /// Fills the phases of unit `u` (image `u / group`, group `u % group`).
    fn fill_unit(&self, u: usize, phases: &mut [f32]) {
        let ConvDims { c, group, .. } = self.conv.dims;
        let cg = c / group;
        let (bn, g) = (u / group, u % group);
        let isz = self.geom.sp.in_size();
        let first = bn * c + g * cg;
        self.geom
            .fill_channels(&self.conv.x[first * isz..(first + cg) * isz], cg, phases);
    }

    /// Flattened positions `j_lo..j_hi` of the output channels `o0..o0 + planes.len()` of
    /// unit `u` (`at = (u, o0, r0)`), from its filled phases, with `scratch` of
    /// [`chunk_scratch`] values; each plane holds the channel's output rows from `r0` on.
    fn channels(
        &self,
        (u, o0, r0): (usize, usize, usize),
        (j_lo, j_hi): (usize, usize),
        phases: &[f32],
        offs: &[usize],
        scratch: &mut [f32],
        planes: &mut [&mut [f32]],
    ) {
        let ConvDims { m, group, .. } = self.conv.dims;
        let (mg, g) = (m / group, u % group);
        let k = offs.len();
        let (p, ow) = (self.geom.sp.out_size(), self.geom.sp.output[2]);
        let (wbuf, acc) = scratch.split_at_mut(MR_MAX * k);
        let mut o = 0;
        while o < planes.len() {
            let left = planes.len() - o;
            let rc = [block_channels(), MR, 1]
                .into_iter()
                .find(|&r| r <= left)
                .unwrap_or(1);
            let ch = g * mg + o0 + o;
            debug_assert!(o0 + o + rc <= mg);
            let w = &self.conv.w[ch * k..(ch + rc) * k];
            let wt: &[f32] = if rc == 1 {
                w
            } else {
                // Interleaved: tap t's weights for the rc channels side by side.
                for (t, dst) in wbuf[..rc * k].chunks_exact_mut(rc).enumerate() {
                    for (r, v) in dst.iter_mut().enumerate() {
                        *v = w[r * k + t];
                    }
                }
                &wbuf[..rc * k]
            };
            let mut j0 = j_lo;
            while j0 < j_hi {
                let len = CHUNK.min(j_hi - j0);
                taps(rc, &phases[j0..], offs, wt, acc, len);
                for r in 0..rc {
                    let row = &mut acc[r * CHUNK..r * CHUNK + len];
                    epilogue(
                        row,
                        self.conv.bias.map_or(0.0, |b| b[ch + r]),
                        self.conv.act_before_residual(),
                    );
                    // The residual of this plane's rows from r0 on (plane (u·mg + channel)
                    // of the output).
                    let res = self
                        .conv
                        .residual
                        .map(|res| &res[(u * mg + o0 + o + r) * p + r0 * ow..]);
                    self.copy_rows(row, j0, r0, planes[o + r], res);
                }
                j0 += len;
            }
            o += rc;
        }
    }

    /// Copies the output columns of flattened positions `j0..j0 + acc.len()` into `plane`,
    /// which holds the output rows from `r0` on; with `res` (the residual, laid out as
    /// `plane`), adds it and applies the activation to the copied values.
    fn copy_rows(&self, acc: &[f32], j0: usize, r0: usize, plane: &mut [f32], res: Option<&[f32]>) {
        let (pw, ow) = (self.geom.pw, self.geom.sp.output[2]);
        let j1 = j0 + acc.len();
        let mut r = j0 / pw;
        while r * pw < j1 {
            let lo = j0.max(r * pw);
            let hi = j1.min(r * pw + ow);
            if lo < hi {
                let at = (r - r0) * ow;
                let (a, b) = (at + (lo - r * pw), at + (hi - r * pw));
                plane[a..b].copy_from_slice(&acc[lo - j0..hi - j0]);
                if let Some(res) = res {
                    add_residual(&mut plane[a..b], &res[a..b], self.conv.act);
                }
            }
            r += 1;
        }
    }
}

/// Scratch values [`FlatConv::channels`] needs besides the phases: interleaved weights and
/// [`MR_MAX`] accumulator chunks.
fn chunk_scratch(k: usize) -> usize {
    MR_MAX * k + MR_MAX * CHUNK
}

/// Output channels per block: [`MR_MAX`] with AVX-512 (16 accumulators of its 32
/// registers), else [`MR`].
fn block_channels() -> usize {
    if Isa::detect() == Isa::Avx512 {
        MR_MAX
    } else {
        MR
    }
}

/// `acc[r·CHUNK + j] = Σ_t wt[t·rc + r] · src[offs[t] + j]` for `j < len` (rounded up to
/// the block width) and `r < rc` (1 or [`MR`]), with the best SIMD this CPU has.
fn taps(rc: usize, src: &[f32], offs: &[usize], wt: &[f32], acc: &mut [f32], len: usize) {
    assert!(len <= CHUNK && acc.len() >= rc * CHUNK && wt.len() >= rc * offs.len());
    // Every read stays below max(offs) + CHUNK: inside `src` thanks to the slack.
    assert!(offs
        .iter()
        .all(|&o| o + len.next_multiple_of(64) <= src.len()));
    #[cfg(target_arch = "x86_64")]
    {
        let (s, a) = (src.as_ptr(), acc.as_mut_ptr());
        match (Isa::detect(), rc) {
            // SAFETY: AVX-512F is present (run-time detection); the asserts above bound
            // every read of `src`, `wt` and every write of `acc`.
            (Isa::Avx512, MR_MAX) => {
                return unsafe { avx512::taps::<MR_MAX, 2>(s, offs, wt, a, len) }
            }
            // SAFETY: as above.
            (Isa::Avx512, MR) => return unsafe { avx512::taps::<MR, 2>(s, offs, wt, a, len) },
            // SAFETY: as above.
            (Isa::Avx512, _) => return unsafe { avx512::taps::<1, 4>(s, offs, wt, a, len) },
            // SAFETY: AVX2 and FMA are present (run-time detection); bounds as above.
            (Isa::Avx2, MR) => return unsafe { avx2::taps::<MR, 2>(s, offs, wt, a, len) },
            // SAFETY: as above.
            (Isa::Avx2, _) => return unsafe { avx2::taps::<1, 4>(s, offs, wt, a, len) },
            _ => {}
        }
    }
    taps_portable(rc, src, offs, wt, acc, len)
}

/// The portable build of [`taps`] (any CPU; also the tests' reference).
fn taps_portable(rc: usize, src: &[f32], offs: &[usize], wt: &[f32], acc: &mut [f32], len: usize) {
    for r in 0..rc {
        let row = &mut acc[r * CHUNK..r * CHUNK + len];
        row.fill(0.0);
        for (t, &o) in offs.iter().enumerate() {
            let w = wt[t * rc + r];
            for (a, &x) in row.iter_mut().zip(&src[o..o + len]) {
                *a += w * x;
            }
        }
    }
}

/// Defines the block kernel of [`taps`] for one vector ISA.
macro_rules! block_kernel {
    ($module:ident, $feature:literal, $vec:ty, $lanes:literal, $zero:ident, $load:ident,
     $set1:ident, $fmadd:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use std::arch::x86_64::*;

            /// `R` channels × `NV` vectors of flattened positions per block, in registers
            /// across every tap.
            ///
            /// # Safety
            /// The CPU must support the feature; `src + offs[t] + j` must be readable for
            /// every `t` and `j < len` rounded up to `NV` vectors, `wt` must hold
            /// `R·offs.len()` values, and `acc + r·CHUNK + j` writable likewise.
            #[target_feature(enable = $feature)]
            pub unsafe fn taps<const R: usize, const NV: usize>(
                src: *const f32,
                offs: &[usize],
                wt: &[f32],
                acc: *mut f32,
                len: usize,
            ) {
                let width = NV * $lanes;
                let mut j = 0;
                while j < len {
                    let mut sum = [[$zero(); NV]; R];
                    for (t, &o) in offs.iter().enumerate() {
                        // SAFETY: in bounds by the caller's contract.
                        let p = unsafe { src.add(o + j) };
                        let mut x = [$zero(); NV];
                        for (v, xv) in x.iter_mut().enumerate() {
                            // SAFETY: as above.
                            *xv = unsafe { $load(p.add(v * $lanes)) };
                        }
                        for (r, s) in sum.iter_mut().enumerate() {
                            // SAFETY: `wt` holds R values per tap (caller's contract).
                            let w = $set1(unsafe { *wt.get_unchecked(t * R + r) });
                            for (sv, &xv) in s.iter_mut().zip(&x) {
                                *sv = $fmadd(w, xv, *sv);
                            }
                        }
                    }
                    for (r, s) in sum.iter().enumerate() {
                        for (v, &sv) in s.iter().enumerate() {
                            // SAFETY: in bounds by the caller's contract.
                            unsafe { $store(acc.add(r * super::CHUNK + j + v * $lanes), sv) };
                        }
                    }
                    j += width;
                }
            }
        }
    };
}

block_kernel!(
    avx512,
    "avx512f",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);
block_kernel!(
    avx2,
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::Activation;
    use crate::ops::conv::geom::WindowAttrs;
    use crate::ops::conv::test_util::{max_diff, problem, Lcg};

    /// Whole convolutions through [`FlatConv`] against the reference at 1, 2 and 3 threads:
    /// several input channels per group (the RGB-stem case), channel counts that are and
    /// are not multiples of [`MR`], one unit with many channels (channels split over
    /// threads), depthwise with a multiplier, batches, strides, dilations, asymmetric pads,
    /// 1-D, planes longer than one chunk, no bias.
    #[test]
    fn flat_conv_matches_the_reference_at_1_2_3_threads() {
        /// (n, c, m, group, input, kernel, pads, strides, dilations, bias)
        type Case = (
            usize,
            usize,
            usize,
            usize,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            bool,
        );
        let cases: Vec<Case> = vec![
            (
                1,
                3,
                16,
                1,
                vec![57, 61],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![2, 2],
                vec![1, 1],
                true,
            ),
            (
                2,
                3,
                6,
                1,
                vec![20, 33],
                vec![3, 3],
                vec![1, 0, 1, 2],
                vec![1, 1],
                vec![1, 1],
                false,
            ),
            (
                1,
                4,
                10,
                2,
                vec![15, 16],
                vec![5, 3],
                vec![2, 1, 2, 1],
                vec![2, 1],
                vec![1, 2],
                true,
            ),
            (
                1,
                5,
                15,
                5,
                vec![14, 14],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![1, 1],
                vec![1, 1],
                true,
            ),
            (
                1,
                2,
                9,
                1,
                vec![50],
                vec![7],
                vec![3, 3],
                vec![1],
                vec![1],
                true,
            ),
            (
                1,
                1,
                32,
                1,
                vec![40, 41],
                vec![2, 2],
                vec![0, 0, 0, 0],
                vec![2, 2],
                vec![1, 1],
                true,
            ),
            (
                3,
                8,
                8,
                8,
                vec![9, 9],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![2, 2],
                vec![1, 1],
                true,
            ),
        ];
        for (ci, (n, c, m, group, input, kernel, pads, strides, dil, has_bias)) in
            cases.into_iter().enumerate()
        {
            let win = WindowAttrs {
                pads: Some(pads),
                strides: Some(strides),
                dilations: Some(dil),
                ..Default::default()
            };
            let dims = ConvDims { n, c, m, group };
            let act = Activation::Relu;
            let pr = problem(
                dims,
                &win,
                (&input, &kernel),
                has_bias,
                act,
                ci as u64 + 900,
            );
            let (sp, bias) = (pr.sp, has_bias.then_some(pr.b.as_slice()));
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![f32::NAN; n * m * sp.out_size()];
                let conv = FlatConv {
                    conv: ConvF32 {
                        x: &pr.x,
                        w: &pr.w,
                        bias,
                        dims,
                        sp,
                        act,
                        residual: None,
                        algo: super::super::kernel::ConvAlgo::Direct,
                        packed: None,
                    },
                    geom: FlatGeom::new(&sp).unwrap(),
                };
                pool.install(|| conv.run(&mut got));
                let d = max_diff(&got, &pr.want);
                assert!(d < 1e-4, "case {ci} at {threads} threads: diff {d}");
            }
        }
    }

    /// `gather_strided` for the copy, the de-interleave and the plain gather, odd lengths.
    #[test]
    fn gather_strided_picks_every_s_th_value() {
        let src: Vec<f32> = (0..100).map(|i| i as f32 * 0.5 + 1.0).collect();
        for s in [1, 2, 3, 5] {
            for n in [1, 2, 7, 16, 17] {
                let mut dst = vec![f32::NAN; n];
                gather_strided(&src, s, &mut dst);
                let want: Vec<f32> = (0..n).map(|j| src[j * s]).collect();
                assert_eq!(dst, want, "s={s} n={n}");
            }
        }
    }

    /// Every build of the tap loop (portable, AVX2, AVX-512 where the CPU has them), for one
    /// channel, [`MR`] and [`MR_MAX`] channels, with odd lengths and offsets, against the
    /// portable loop.
    #[test]
    fn every_taps_build_matches_the_portable_loop() {
        let mut r = Lcg(5);
        let src = r.vec(3000);
        let cases = [
            (1, 9, 500),
            (1, 25, 37),
            (MR, 27, 512),
            (MR, 3, 1),
            (1, 1, 64),
            (MR_MAX, 40, 300),
            (MR_MAX, 2, 33),
        ];
        for (rc, k, len) in cases {
            let offs: Vec<usize> = (0..k).map(|t| (t * 37) % 700 + t).collect();
            let wt = r.vec(rc * k);
            let mut want = vec![f32::NAN; MR_MAX * CHUNK];
            taps_portable(rc, &src, &offs, &wt, &mut want, len);
            let mut builds = vec![];
            let mut got = vec![f32::NAN; MR_MAX * CHUNK];
            taps(rc, &src, &offs, &wt, &mut got, len);
            builds.push(("dispatched", got.clone()));
            #[cfg(target_arch = "x86_64")]
            {
                let (s, a) = (src.as_ptr(), got.as_mut_ptr());
                if Isa::Avx2.supported() && rc != MR_MAX {
                    // SAFETY: AVX2 + FMA present; src holds max(offs) + 576 values.
                    unsafe {
                        match rc {
                            MR => avx2::taps::<MR, 2>(s, &offs, &wt, a, len),
                            _ => avx2::taps::<1, 4>(s, &offs, &wt, a, len),
                        }
                    }
                    builds.push(("avx2", got.clone()));
                }
                if Isa::Avx512.supported() {
                    // SAFETY: AVX-512F present; bounds as above.
                    unsafe {
                        match rc {
                            MR_MAX => avx512::taps::<MR_MAX, 2>(s, &offs, &wt, a, len),
                            MR => avx512::taps::<MR, 2>(s, &offs, &wt, a, len),
                            _ => avx512::taps::<1, 4>(s, &offs, &wt, a, len),
                        }
                    }
                    builds.push(("avx512", got.clone()));
                }
            }
            for (name, got) in builds {
                for row in 0..rc {
                    let d = max_diff(
                        &got[row * CHUNK..row * CHUNK + len],
                        &want[row * CHUNK..row * CHUNK + len],
                    );
                    assert!(d < 1e-4, "{name} rc={rc} k={k} len={len}: diff {d}");
                }
            }
        }
    }
}
