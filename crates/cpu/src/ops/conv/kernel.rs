//! The production f32 convolution: a direct kernel for depthwise convolutions, a plain
//! GEMM for 1×1 convolutions, and tiled im2col + GEMM for everything else. Bias, a fused
//! residual (a tensor of the output's shape) and the fused activation are applied by the
//! GEMM kernels in the final store of each output tile ([`blas::GemmEpilogue`]), and by
//! the direct and Winograd kernels in the same pass over each freshly computed output row
//! (bias first, then [`add_residual`] adds the residual and applies the activation).

use rayon::prelude::*;

use kiln_core::{KilnError, Result};

use super::flat::{FlatConv, FlatGeom};
use super::geom::Spatial3;
use super::reference::ConvDims;
use super::winograd::{self, WinoTile};
use crate::fused::Activation;
use crate::ops::linalg::blas::{self, GemmEpilogue, MatRef};
use crate::ops::linalg::sgemm::{pack_a_whole, Isa};

/// Target number of im2col elements per tile (keeps the scratch in L2): the default.
pub const TILE_ELEMS: usize = 1 << 16;

/// How a [`ConvF32`] computes: the op's heuristic, or one tactic the tuner chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgo {
    /// Direct kernel for depthwise convolutions, im2col + GEMM (tile [`TILE_ELEMS`]) for the
    /// rest, parallel over images × groups when there are several.
    #[default]
    Auto,
    /// Tiled im2col + GEMM (a plain GEMM for 1×1 convolutions).
    Im2colGemm {
        /// Target im2col elements per tile.
        tile_elems: usize,
        /// Parallel over images × groups (true) or inside each GEMM (false).
        parallel_outer: bool,
    },
    /// The direct kernel for depthwise convolutions and any 1-D/2-D convolution whose
    /// padded input planes fit ([`super::flat::FlatGeom::fits`]): planes flattened so every
    /// tap is one long multiply-add ([`FlatConv`]; true 3-D depthwise windows use the row
    /// kernel).
    Direct,
    /// The direct kernel row by row (depthwise only): no padded copy of the plane and no
    /// work on padding, but vector runs only as long as an output row.
    DirectRows,
    /// The depthwise kernel on blocks of 16 channels ([`super::dw_block`]): vectors across
    /// channels, so small planes keep them full.
    DirectBlocked,
    /// Winograd F(m×m, 3×3) ([`super::winograd`]): 2-D 3×3 windows with unit strides and
    /// dilations only.
    Winograd(WinoTile),
    /// Channels-last 1×1 product ([`super::nhwc::pointwise`]): X, Y and a residual are
    /// N × H × W × C (tactic `cpu.conv.nhwc.gemm_1x1`, format `fp32/nhwc`).
    NhwcPointwise,
    /// Channels-last depthwise kernel ([`super::nhwc::depthwise`]; tactic
    /// `cpu.conv.nhwc.dw`, format `fp32/nhwc`).
    NhwcDepthwise,
}

impl ConvAlgo {
    /// One of the depthwise direct kernels.
    pub fn is_direct(self) -> bool {
        matches!(
            self,
            ConvAlgo::Direct
                | ConvAlgo::DirectRows
                | ConvAlgo::DirectBlocked
                | ConvAlgo::NhwcDepthwise
        )
    }

    /// One of the channels-last tactics: activations are N × H × W × C.
    pub fn is_nhwc(self) -> bool {
        matches!(self, ConvAlgo::NhwcPointwise | ConvAlgo::NhwcDepthwise)
    }
}

/// Output positions per image up to which a batch of images (one group) runs as one product
/// with the images side by side ([`ConvF32::run_batch_columns`]).
pub const BATCH_COLUMNS_MAX_P: usize = 16;

/// Output rows at least this wide run the depthwise row kernel when no tactic was chosen
/// (the row loop's vector body covers them; narrower rows gain from [`FlatConv`]).
pub const DIRECT_ROWS_MIN_WIDTH: usize = 32;

/// Whether the flattened direct kernel takes a convolution with `cg` input channels per
/// group: a 1-D/2-D window whose padded planes fit ([`super::flat::FlatGeom::fits`]).
pub fn flat_fits(cg: usize, sp: &Spatial3) -> bool {
    FlatGeom::new(sp).is_some_and(|g| g.fits(cg))
}

/// One f32 convolution problem (NC(D)(H)W layout, weights M × C/group × kernel).
#[derive(Debug, Clone, Copy)]
pub struct ConvF32<'a> {
    /// Input.
    pub x: &'a [f32],
    /// Weights.
    pub w: &'a [f32],
    /// Optional bias (M values).
    pub bias: Option<&'a [f32]>,
    /// Channel counts.
    pub dims: ConvDims,
    /// Window geometry.
    pub sp: Spatial3,
    /// Fused activation.
    pub act: Activation,
    /// A tensor of the output's shape (N × M × output spatial) added before the activation
    /// (kiln's fused `Conv → Add`); it must not be the output buffer.
    pub residual: Option<&'a [f32]>,
    /// Which implementation to run.
    pub algo: ConvAlgo,
    /// `Some(isa)`: `w` holds each group's `mg × k` weights in the packed-A layout of
    /// [`crate::ops::linalg::sgemm::pack_a_whole`] for `isa` (see [`pack_weights`]).
    pub packed: Option<Isa>,
}

/// Packs conv weights (M × C/group × kernel, f32) group by group into the packed-A layout
/// the GEMM tactics read for `isa`, so they are packed once at build time. The result has
/// as many values as `w` (each group's block stays at its offset).
pub fn pack_weights(w: &[f32], m: usize, group: usize, isa: Isa) -> Result<Vec<f32>> {
    if group == 0 || !m.is_multiple_of(group) || !w.len().is_multiple_of(m.max(1)) {
        return Err(KilnError::kernel(
            "Conv",
            format!(
                "cannot pack {} weights as {m} filters in {group} groups",
                w.len()
            ),
        ));
    }
    let mg = m / group;
    let k = w.len() / m.max(1);
    let mut out = vec![0.0f32; w.len()];
    for (src, dst) in w.chunks_exact(mg * k).zip(out.chunks_exact_mut(mg * k)) {
        pack_a_whole(isa, mg, k, src, dst);
    }
    Ok(out)
}

/// Adds `b` to every value and applies `act`, in one pass.
#[inline]
pub fn epilogue(row: &mut [f32], b: f32, act: Activation) {
    if b == 0.0 && act == Activation::None {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::linalg::sgemm::Isa;
        match Isa::detect() {
            // SAFETY: the CPU supports the features (run-time detection).
            Isa::Avx512 => return unsafe { epilogue_avx512(row, b, act) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { epilogue_avx2(row, b, act) },
            Isa::Scalar => {}
        }
    }
    epilogue_body(row, b, act)
}

/// [`epilogue_body`] compiled for AVX-512 (16 lanes instead of the baseline's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn epilogue_avx512(row: &mut [f32], b: f32, act: Activation) {
    epilogue_body(row, b, act)
}

/// [`epilogue_body`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn epilogue_avx2(row: &mut [f32], b: f32, act: Activation) {
    epilogue_body(row, b, act)
}

/// `row[i] = act(row[i] + res[i])` in one pass: the residual tail of the kernels that do
/// not end in a GEMM store (direct, Winograd, the batch-columns scatter). `res` must be
/// at least as long as `row`.
#[inline]
pub fn add_residual(row: &mut [f32], res: &[f32], act: Activation) {
    let res = &res[..row.len()];
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::linalg::sgemm::Isa;
        match Isa::detect() {
            // SAFETY: the CPU supports the features (run-time detection).
            Isa::Avx512 => return unsafe { add_residual_avx512(row, res, act) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { add_residual_avx2(row, res, act) },
            Isa::Scalar => {}
        }
    }
    add_residual_body(row, res, act)
}

/// [`add_residual_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn add_residual_avx512(row: &mut [f32], res: &[f32], act: Activation) {
    add_residual_body(row, res, act)
}

/// [`add_residual_body`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_residual_avx2(row: &mut [f32], res: &[f32], act: Activation) {
    add_residual_body(row, res, act)
}

/// The pass of [`add_residual`], for the compiler to vectorize per build.
#[inline(always)]
fn add_residual_body(row: &mut [f32], res: &[f32], act: Activation) {
    let pairs = row.iter_mut().zip(res);
    match act {
        Activation::None => pairs.for_each(|(v, r)| *v += r),
        Activation::Relu => pairs.for_each(|(v, r)| *v = (*v + r).max(0.0)),
        Activation::Clip { min, max } => pairs.for_each(|(v, r)| *v = (*v + r).max(min).min(max)),
        Activation::HardSwish => pairs.for_each(|(v, r)| {
            let x = *v + r;
            *v = x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0)
        }),
        other => pairs.for_each(|(v, r)| *v = other.apply(*v + r)),
    }
}

/// The bias + activation pass of [`epilogue`], for the compiler to vectorize per build.
#[inline(always)]
fn epilogue_body(row: &mut [f32], b: f32, act: Activation) {
    match act {
        Activation::None => {
            if b != 0.0 {
                row.iter_mut().for_each(|v| *v += b);
            }
        }
        Activation::Relu => row.iter_mut().for_each(|v| *v = (*v + b).max(0.0)),
        Activation::Clip { min, max } => {
            row.iter_mut().for_each(|v| *v = (*v + b).max(min).min(max))
        }
        Activation::HardSwish => row.iter_mut().for_each(|v| {
            let x = *v + b;
            *v = x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0)
        }),
        // Sigmoid, Swish, Tanh with the vectorisable exp (the GEMM store's arithmetic).
        other => row
            .iter_mut()
            .for_each(|v| *v = crate::ops::linalg::sgemm::act_value(other, *v + b)),
    }
}

impl ConvF32<'_> {
    fn check(&self, out: &[f32]) -> Result<()> {
        let ConvDims { n, c, m, group } = self.dims;
        let err = |what: &str| {
            Err(KilnError::kernel(
                "Conv",
                format!("{what} has the wrong number of elements"),
            ))
        };
        if group == 0 || c % group != 0 || m % group != 0 {
            return Err(KilnError::kernel(
                "Conv",
                format!("channels {c}→{m} do not split into {group} groups"),
            ));
        }
        if self.x.len() != n * c * self.sp.in_size() {
            return err("X");
        }
        let w_len = match (self.algo, self.packed) {
            (ConvAlgo::Winograd(t), Some(_)) => winograd::transformed_len(t, m, c / group),
            _ => m * (c / group) * self.sp.kernel_size(),
        };
        if self.w.len() != w_len {
            return err("W");
        }
        if self.bias.is_some_and(|b| b.len() != m) {
            return err("B");
        }
        if out.len() != n * m * self.sp.out_size() {
            return err("the output");
        }
        if self.residual.is_some_and(|r| r.len() != out.len()) {
            return err("the residual");
        }
        Ok(())
    }

    /// The activation the kernels apply together with the bias: none when a residual
    /// follows ([`add_residual`] applies [`ConvF32::act`] after adding it).
    pub fn act_before_residual(&self) -> Activation {
        if self.residual.is_some() {
            Activation::None
        } else {
            self.act
        }
    }

    /// The residual of output rows `start..` as a matrix with row stride `rs`.
    fn res_mat(&self, start: usize, rs: usize) -> Option<MatRef<'_, f32>> {
        self.residual.map(|r| MatRef {
            data: &r[start..],
            rs,
            cs: 1,
        })
    }

    /// Runs the convolution into `out` (N × M × output spatial).
    pub fn run(&self, out: &mut [f32]) -> Result<()> {
        self.check(out)?;
        let ConvDims { n, c, m, group } = self.dims;
        let (cg, mg) = (c / group, m / group);
        let p = self.sp.out_size();
        if out.is_empty() {
            return Ok(());
        }
        let depthwise = cg == 1 && group > 1;
        if self.packed.is_some()
            && (self.algo.is_direct() || (depthwise && self.algo == ConvAlgo::Auto))
        {
            return Err(KilnError::kernel(
                "Conv",
                "weights packed for GEMM but the direct kernel was chosen; rebuild the plan",
            ));
        }
        let (tile_elems, outer) = match self.algo {
            ConvAlgo::Winograd(tile) => return winograd::run(self, tile, out),
            ConvAlgo::NhwcPointwise => {
                return super::nhwc::pointwise(self, self.packed.is_some(), out)
            }
            ConvAlgo::NhwcDepthwise => return super::nhwc::depthwise(self, out),
            ConvAlgo::Auto if depthwise => {
                return self.run_direct(out, self.sp.output[2] >= DIRECT_ROWS_MIN_WIDTH)
            }
            ConvAlgo::Auto => (TILE_ELEMS, true),
            ConvAlgo::Direct if depthwise || flat_fits(cg, &self.sp) => {
                return self.run_direct(out, false)
            }
            ConvAlgo::DirectRows if depthwise => return self.run_direct(out, true),
            ConvAlgo::DirectBlocked if depthwise => return super::dw_block::run(self, out),
            ConvAlgo::Direct | ConvAlgo::DirectRows | ConvAlgo::DirectBlocked => {
                return Err(KilnError::kernel(
                    "Conv",
                    "the direct tactic needs one input channel per group (depthwise), or a 1-D/2-D window whose padded input planes fit in scratch (16 MiB for up to 4 input channels per group, 4 MiB for more)",
                ))
            }
            ConvAlgo::Im2colGemm {
                tile_elems,
                parallel_outer,
            } => (tile_elems.max(1), parallel_outer),
        };
        if group == 1 && n > 1 && p <= BATCH_COLUMNS_MAX_P {
            return self.run_batch_columns(out);
        }
        let chunks = n * group;
        let threads = crate::parallel::threads();
        let parallel_outer = outer && chunks > 1 && threads > 1;
        if !parallel_outer && threads > 1 && !self.sp.is_pointwise() {
            // One (image, group) at a time: the output positions split over threads, each
            // task running its own im2col tiles and a serial product.
            let k = cg * self.sp.kernel_size();
            let tasks = position_tasks(mg * k, p, threads);
            if tasks > 1 {
                for (idx, chunk) in out.chunks_mut(mg * p).enumerate() {
                    let (bn, g) = (idx / group, idx % group);
                    let xg = &self.x[(bn * c + g * cg) * self.sp.in_size()
                        ..(bn * c + (g + 1) * cg) * self.sp.in_size()];
                    let wg = &self.w[g * mg * k..(g + 1) * mg * k];
                    let bias = self.bias.map(|b| &b[g * mg..(g + 1) * mg]);
                    let at = (bias, idx * mg * p);
                    self.run_group_split(xg, wg, at, cg, mg, chunk, tasks, tile_elems)?;
                }
                return Ok(());
            }
        }
        let body = |(idx, chunk): (usize, &mut [f32])| -> Result<()> {
            let (bn, g) = (idx / group, idx % group);
            let xg = &self.x[(bn * c + g * cg) * self.sp.in_size()
                ..(bn * c + (g + 1) * cg) * self.sp.in_size()];
            let wg = &self.w
                [g * mg * cg * self.sp.kernel_size()..(g + 1) * mg * cg * self.sp.kernel_size()];
            let bias = self.bias.map(|b| &b[g * mg..(g + 1) * mg]);
            let at = (bias, idx * mg * p);
            self.run_group(xg, wg, at, cg, mg, chunk, !parallel_outer, tile_elems)
        };
        if parallel_outer {
            out.par_chunks_mut(mg * p).enumerate().try_for_each(body)
        } else {
            out.chunks_mut(mg * p).enumerate().try_for_each(body)
        }
    }

    /// Every image in one product when each has few output positions (one group):
    /// `tmp[M × N·P] = W[M × K] · col[K × N·P]` with the images' im2col matrices side by
    /// side (bias + activation in the product's epilogue), then a scatter into N × M × P. The weights are
    /// read once for the batch instead of once per image, and the product gets N·P columns
    /// instead of P.
    fn run_batch_columns(&self, out: &mut [f32]) -> Result<()> {
        let ConvDims { n, c, m, .. } = self.dims;
        let (p, isz) = (self.sp.out_size(), self.sp.in_size());
        let k = c * self.sp.kernel_size();
        let cols = n * p;
        let ks = self.sp.kernel_size();
        let table_ok = isz < PAD_OFFSET as usize;
        crate::scratch::with_scratch::<f32, _>(k * cols + m * cols, |buf| {
            let (col, tmp) = buf.split_at_mut(k * cols);
            // Each image's im2col block written straight into its columns: one offset
            // table for every image and channel.
            crate::scratch::with_scratch::<u32, _>(if table_ok { ks * p } else { 0 }, |table| {
                if table_ok {
                    im2col_offsets(&self.sp, 0, p, table);
                }
                for b in 0..n {
                    let xb = &self.x[b * c * isz..(b + 1) * c * isz];
                    let dst = &mut col[b * p..];
                    if table_ok {
                        im2col_gather(xb, c, isz, table, p, dst, cols);
                    } else {
                        im2col_segments(xb, c, &self.sp, 0, p, dst, cols);
                    }
                }
            });
            let par = m * cols * k >= blas::PARALLEL_THRESHOLD;
            self.product(
                m,
                cols,
                k,
                tmp,
                cols,
                self.w,
                MatRef::row_major(col, cols),
                par,
                &GemmEpilogue {
                    row_bias: self.bias,
                    act: self.act_before_residual(),
                    ..GemmEpilogue::default()
                },
            )?;
            for (r, row) in tmp.chunks_exact(cols).enumerate() {
                for (b, src) in row.chunks_exact(p).enumerate() {
                    let at = (b * m + r) * p;
                    let dst = &mut out[at..at + p];
                    copy_short(dst, src);
                    if let Some(res) = self.residual {
                        add_residual(dst, &res[at..at + p], self.act);
                    }
                }
            }
            Ok(())
        })
    }

    /// One (image, group): out[mg × P] = W_g[mg × K] · col[K × P]; `(bias, base)`: the
    /// group's bias and the offset of `out` in the whole output (where its residual is).
    #[allow(clippy::too_many_arguments)]
    fn run_group(
        &self,
        xg: &[f32],
        wg: &[f32],
        (bias, base): (Option<&[f32]>, usize),
        cg: usize,
        mg: usize,
        out: &mut [f32],
        par: bool,
        tile_elems: usize,
    ) -> Result<()> {
        let p = self.sp.out_size();
        let k = cg * self.sp.kernel_size();
        let par = par && mg * p * k >= blas::PARALLEL_THRESHOLD;
        if self.sp.is_pointwise() {
            return self.product(
                mg,
                p,
                k,
                out,
                p,
                wg,
                MatRef::row_major(xg, p),
                par,
                &self.epi(bias, self.res_mat(base, p)),
            );
        }
        let tile = (tile_elems / k.max(1)).max(128).min(p);
        crate::scratch::with_scratch::<f32, _>(k * tile, |col| {
            self.tiles(xg, wg, (bias, base), cg, mg, out, par, tile, col)
        })
    }

    /// One (image, group) with its output positions split into `tasks` parallel ranges:
    /// each task runs im2col tiles of its range with a serial product (epilogue included)
    /// into a scratch tile (`mg × tile`) and copies the rows into `out` (`(bias, base)` as
    /// in [`ConvF32::run_group`]).
    #[allow(clippy::too_many_arguments)]
    fn run_group_split(
        &self,
        xg: &[f32],
        wg: &[f32],
        (bias, base): (Option<&[f32]>, usize),
        cg: usize,
        mg: usize,
        out: &mut [f32],
        tasks: usize,
        tile_elems: usize,
    ) -> Result<()> {
        let p = self.sp.out_size();
        let k = cg * self.sp.kernel_size();
        let per = p.div_ceil(tasks);
        let tile = (tile_elems / k.max(1)).max(128).min(per);
        let dst = OutPtr(out.as_mut_ptr());
        debug_assert_eq!(out.len(), mg * p);
        (0..tasks).into_par_iter().try_for_each(|t| -> Result<()> {
            let (r0, r1) = (p * t / tasks, p * (t + 1) / tasks);
            crate::scratch::with_scratch::<f32, _>(k * tile, |col| {
                crate::scratch::with_scratch::<f32, _>(mg * tile, |acc| {
                    let mut p0 = r0;
                    while p0 < r1 {
                        let p1 = (p0 + tile).min(r1);
                        let tw = p1 - p0;
                        im2col_tile(xg, cg, &self.sp, p0, p1, &mut col[..k * tw]);
                        let acc = &mut acc[..mg * tw];
                        self.product(
                            mg,
                            tw,
                            k,
                            acc,
                            tw,
                            wg,
                            MatRef::row_major(&col[..k * tw], tw),
                            false,
                            &self.epi(bias, self.res_mat(base + p0, p)),
                        )?;
                        for (r, row) in acc.chunks_exact(tw).enumerate() {
                            // SAFETY: row r, columns p0..p1 of the mg × p output lie inside
                            // `out` (checked length); tasks own disjoint column ranges
                            // r0..r1, so no two tasks write the same element, and `out`
                            // is not read while the tasks run.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    row.as_ptr(),
                                    dst.ptr().add(r * p + p0),
                                    tw,
                                )
                            };
                        }
                        p0 = p1;
                    }
                    Ok(())
                })
            })
        })
    }

    /// The im2col tiles of [`ConvF32::run_group`], with `col` holding `k × tile` values.
    #[allow(clippy::too_many_arguments)]
    fn tiles(
        &self,
        xg: &[f32],
        wg: &[f32],
        (bias, base): (Option<&[f32]>, usize),
        cg: usize,
        mg: usize,
        out: &mut [f32],
        par: bool,
        tile: usize,
        col: &mut [f32],
    ) -> Result<()> {
        let p = self.sp.out_size();
        let k = cg * self.sp.kernel_size();
        let mut p0 = 0;
        while p0 < p {
            let p1 = (p0 + tile).min(p);
            let tw = p1 - p0;
            im2col_tile(xg, cg, &self.sp, p0, p1, &mut col[..k * tw]);
            self.product(
                mg,
                tw,
                k,
                &mut out[p0..],
                p,
                wg,
                MatRef::row_major(&col[..k * tw], tw),
                par,
                &self.epi(bias, self.res_mat(base + p0, p)),
            )?;
            p0 = p1;
        }
        Ok(())
    }

    /// The GEMM epilogue of a group whose output channels have `bias`: that bias per row
    /// of the product, the residual of the product's rows, then the fused activation.
    fn epi<'b>(
        &self,
        bias: Option<&'b [f32]>,
        residual: Option<MatRef<'b, f32>>,
    ) -> GemmEpilogue<'b> {
        GemmEpilogue {
            row_bias: bias,
            residual,
            act: self.act,
            ..GemmEpilogue::default()
        }
    }

    /// `out[mg × n] = epi(W_g · b)`, with the group's weights plain or prepacked.
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        mg: usize,
        n: usize,
        k: usize,
        out: &mut [f32],
        out_rs: usize,
        wg: &[f32],
        b: MatRef<'_, f32>,
        par: bool,
        epi: &GemmEpilogue<'_>,
    ) -> Result<()> {
        match self.packed {
            Some(isa) => {
                blas::gemm_packed_a_epi(isa, mg, n, k, out, out_rs, false, wg, b, 1.0, par, epi)
            }
            None => blas::gemm_epi(
                mg,
                n,
                k,
                out,
                out_rs,
                false,
                MatRef::row_major(wg, k),
                b,
                1.0,
                par,
                epi,
            ),
        }
    }

    /// The direct kernels: flattened ([`FlatConv`]: depthwise or few weights per output
    /// channel; 1-D/2-D windows) unless `rows` or the window is 3-D, else the depthwise row
    /// kernel per output plane, planes grouped into parallel tasks of at least
    /// [`DW_TASK_WORK`] multiply-adds.
    fn run_direct(&self, out: &mut [f32], rows: bool) -> Result<()> {
        if !rows {
            if let Some(geom) = FlatGeom::new(&self.sp) {
                FlatConv { conv: *self, geom }.run(out);
                return Ok(());
            }
        }
        let ConvDims { c, m, group, .. } = self.dims;
        if c != group {
            return Err(KilnError::kernel(
                "Conv",
                "the direct row kernel needs one input channel per group (depthwise)",
            ));
        }
        let mg = m / group;
        let (p, isz, ksz) = (self.sp.out_size(), self.sp.in_size(), self.sp.kernel_size());
        let planes = out.len() / p;
        let scratch = {
            let [id_n, ih_n, iw_n] = self.sp.input;
            let sw = self.sp.strides[2];
            if sw == 1 {
                0
            } else {
                id_n * ih_n * sw * iw_n.div_ceil(sw)
            }
        };
        let body = |first: usize, chunk: &mut [f32]| {
            crate::scratch::with_scratch::<f32, _>(scratch, |buf| {
                for (i, plane) in chunk.chunks_mut(p).enumerate() {
                    let idx = first + i;
                    let (bn, om) = (idx / m, idx % m);
                    let cin = om / mg;
                    let xp = &self.x[(bn * c + cin) * isz..(bn * c + cin + 1) * isz];
                    let wk = &self.w[om * ksz..(om + 1) * ksz];
                    let bias = self.bias.map_or(0.0, |b| b[om]);
                    let act = self.act_before_residual();
                    if self.sp.strides[2] == 1 {
                        direct_plane(xp, wk, bias, &self.sp, act, plane);
                    } else {
                        // Strided: the plane's rows split into `sw` phases first, so every
                        // tap reads a contiguous run (and the loop vectorises).
                        phase_split(xp, self.sp.input[2], self.sp.strides[2], buf);
                        direct_plane(buf, wk, bias, &self.sp, act, plane);
                    }
                    if let Some(res) = self.residual {
                        add_residual(plane, &res[idx * p..(idx + 1) * p], self.act);
                    }
                }
            })
        };
        let per_task = planes_per_task(planes, p * ksz, crate::parallel::threads());
        if per_task < planes {
            out.par_chunks_mut(per_task * p)
                .enumerate()
                .for_each(|(t, chunk)| body(t * per_task, chunk));
        } else {
            body(0, out);
        }
        Ok(())
    }
}

/// The output of one (image, group), shared by the tasks of
/// [`ConvF32::run_group_split`], which write disjoint column ranges through it.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint elements (see `run_group_split`).
unsafe impl Send for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// `start + len` must lie inside the output, no two live slices may overlap, and the
    /// output must outlive them.
    pub(super) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: in bounds and exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Minimum multiply-adds per task when an im2col convolution's output positions are
/// split over threads.
pub const POSITION_TASK_WORK: usize = 1 << 17;

/// How many parallel tasks the `p` output positions of one (image, group) get when each
/// position costs `per_position` multiply-adds: at most `threads`, each task at least
/// [`POSITION_TASK_WORK`] and 64 positions; 1 (serial) for small problems.
pub fn position_tasks(per_position: usize, p: usize, threads: usize) -> usize {
    let work = per_position.saturating_mul(p);
    threads.min(work / POSITION_TASK_WORK).min(p / 64).max(1)
}

/// Minimum multiply-adds per parallel task of the depthwise kernel (below it a task costs
/// about as much to schedule as to run).
pub const DW_TASK_WORK: usize = 1 << 15;

/// Planes per task when `planes` planes of `work` multiply-adds each are split over
/// `threads` threads: `planes` (one serial task) when there is one thread or too little
/// work, else about four tasks per thread, none below [`DW_TASK_WORK`].
pub fn planes_per_task(planes: usize, work: usize, threads: usize) -> usize {
    let total = planes.saturating_mul(work.max(1));
    if threads <= 1 || planes <= 1 || total < 2 * DW_TASK_WORK {
        return planes.max(1);
    }
    let tasks = (threads * 4).min(planes).min(total / DW_TASK_WORK).max(1);
    planes.div_ceil(tasks)
}

/// Splits every row of `iw` values of `x` into `s` phases: row `r` of `out` (length
/// `s·⌈iw/s⌉`) holds `x[r][q + s·t]` at `q·⌈iw/s⌉ + t` (the unused tail of a phase is 0).
fn phase_split(x: &[f32], iw: usize, s: usize, out: &mut [f32]) {
    let pl = iw.div_ceil(s);
    for (src, dst) in x.chunks_exact(iw).zip(out.chunks_exact_mut(s * pl)) {
        for (q, ph) in dst.chunks_exact_mut(pl).enumerate() {
            // Phase q has ⌈(iw − q)/s⌉ values; the rest of its row is 0.
            let n = (iw - q.min(iw)).div_ceil(s);
            let (vals, rest) = ph.split_at_mut(n);
            super::flat::gather_strided(&src[q.min(iw)..], s, vals);
            rest.fill(0.0);
        }
    }
}

/// One output plane of a single-input-channel convolution with the best SIMD this CPU
/// has (AVX-512 or AVX2+FMA builds of the same loop, detected at run time; portable code
/// otherwise). With a stride above 1 in the last dim, `xp` is the [`phase_split`] plane.
fn direct_plane(
    xp: &[f32],
    wk: &[f32],
    bias: f32,
    sp: &Spatial3,
    act: Activation,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::linalg::sgemm::Isa;
        match Isa::detect() {
            // SAFETY: the CPU supports the features (run-time detection).
            Isa::Avx512 => return unsafe { direct_plane_avx512(xp, wk, bias, sp, act, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { direct_plane_avx2(xp, wk, bias, sp, act, out) },
            Isa::Scalar => {}
        }
    }
    direct_plane_body(xp, wk, bias, sp, act, out, |o, w, i| *o += w * i)
}

/// [`direct_plane_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn direct_plane_avx512(
    xp: &[f32],
    wk: &[f32],
    bias: f32,
    sp: &Spatial3,
    act: Activation,
    out: &mut [f32],
) {
    direct_plane_body(xp, wk, bias, sp, act, out, |o, w, i| *o = w.mul_add(i, *o))
}

/// [`direct_plane_body`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn direct_plane_avx2(
    xp: &[f32],
    wk: &[f32],
    bias: f32,
    sp: &Spatial3,
    act: Activation,
    out: &mut [f32],
) {
    direct_plane_body(xp, wk, bias, sp, act, out, |o, w, i| *o = w.mul_add(i, *o))
}

/// One output plane, row by row (the output row stays in L1 while every tap is
/// accumulated into it with `fma(out, w, in)`); every tap reads a contiguous input run.
#[inline(always)]
fn direct_plane_body(
    xp: &[f32],
    wk: &[f32],
    bias: f32,
    sp: &Spatial3,
    act: Activation,
    out: &mut [f32],
    fma: impl Fn(&mut f32, f32, f32),
) {
    let [kd_n, kh_n, kw_n] = sp.kernel;
    let [_, ih_n, iw_n] = sp.input;
    let [od_n, oh_n, ow_n] = sp.output;
    let (sw, dw, pw) = (sp.strides[2], sp.dilations[2], sp.pad_begin[2]);
    // Input row length in `xp`: phase-split rows are `sw` phases of ⌈iw/sw⌉.
    let pl = iw_n.div_ceil(sw);
    let row_len = sw * pl;
    let ranges: smallvec::SmallVec<[(usize, usize); 16]> =
        (0..kw_n).map(|kw| sp.valid_range(2, kw)).collect();
    for od in 0..od_n {
        for oh in 0..oh_n {
            let orow = &mut out[(od * oh_n + oh) * ow_n..(od * oh_n + oh + 1) * ow_n];
            orow.fill(0.0);
            for kd in 0..kd_n {
                let Some(id) = sp.in_coord(0, od, kd) else {
                    continue;
                };
                for kh in 0..kh_n {
                    let Some(ih) = sp.in_coord(1, oh, kh) else {
                        continue;
                    };
                    let irow = &xp[(id * ih_n + ih) * row_len..(id * ih_n + ih + 1) * row_len];
                    for (kw, &(lo, hi)) in ranges.iter().enumerate() {
                        if lo >= hi {
                            continue;
                        }
                        let wv = wk[(kd * kh_n + kh) * kw_n + kw];
                        // Input index of output lo: base; of lo + j: base + sw·j, i.e.
                        // phase base % sw, position base / sw + j.
                        let base = lo * sw + kw * dw - pw;
                        let start = (base % sw) * pl + base / sw;
                        let src = &irow[start..start + (hi - lo)];
                        for (ov, &iv) in orow[lo..hi].iter_mut().zip(src) {
                            fma(ov, wv, iv);
                        }
                    }
                }
            }
            epilogue(orow, bias, act);
        }
    }
}

/// Copies a short run (a few output positions) without a `memcpy` call, whose fixed cost
/// exceeds the copy itself for runs of ≤ 16 values.
#[inline]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let mut i = 0;
    while i + 4 <= n {
        let v = [src[i], src[i + 1], src[i + 2], src[i + 3]];
        dst[i..i + 4].copy_from_slice(&v);
        i += 4;
    }
    if i + 2 <= n {
        dst[i] = src[i];
        dst[i + 1] = src[i + 1];
        i += 2;
    }
    if i < n {
        dst[i] = src[i];
    }
}

/// Tiles of at most this many output positions are gathered through a table of input
/// offsets ([`im2col_offsets`], [`im2col_gather`]) instead of row segments: with a handful
/// of positions per row, the segment bookkeeping (valid ranges, coordinate divisions, a
/// copy call per row) costs more than the values moved.
pub const IM2COL_TABLE_MAX_TW: usize = 32;

/// Marks a (tap, position) of [`im2col_offsets`] that lands in the padding.
const PAD_OFFSET: u32 = u32::MAX;

/// Writes columns `p0..p1` (flattened output positions) of the im2col matrix of one group
/// (`cg` channels) into `col` (K × (p1 − p0), row-major).
pub fn im2col_tile(xg: &[f32], cg: usize, sp: &Spatial3, p0: usize, p1: usize, col: &mut [f32]) {
    im2col_tile_ld(xg, cg, sp, p0, p1, col, p1 - p0);
}

/// [`im2col_tile`] into rows `ld` apart: row `r` of the tile is `col[r·ld..r·ld + p1 − p0]`
/// (`ld ≥ p1 − p0`; values between the rows are left alone).
pub fn im2col_tile_ld(
    xg: &[f32],
    cg: usize,
    sp: &Spatial3,
    p0: usize,
    p1: usize,
    col: &mut [f32],
    ld: usize,
) {
    let tw = p1 - p0;
    if tw == 0 {
        return;
    }
    if tw <= IM2COL_TABLE_MAX_TW && sp.in_size() < PAD_OFFSET as usize {
        let ks = sp.kernel_size();
        crate::scratch::with_scratch::<u32, _>(ks * tw, |table| {
            im2col_offsets(sp, p0, p1, table);
            im2col_gather(xg, cg, sp.in_size(), table, tw, col, ld);
        });
        return;
    }
    im2col_segments(xg, cg, sp, p0, p1, col, ld);
}

/// For every kernel tap (row order of the im2col matrix within one channel) and output
/// position `p0..p1`, the offset of the input value inside one channel's plane, or
/// [`PAD_OFFSET`] in the padding. `table` holds `kernel_size · (p1 − p0)` entries and
/// `sp.in_size()` must be below [`PAD_OFFSET`].
pub fn im2col_offsets(sp: &Spatial3, p0: usize, p1: usize, table: &mut [u32]) {
    let tw = p1 - p0;
    let [kd_n, kh_n, kw_n] = sp.kernel;
    let [_, ih_n, iw_n] = sp.input;
    let [_, oh_n, ow_n] = sp.output;
    let mut rows = table.chunks_exact_mut(tw);
    for kd in 0..kd_n {
        for kh in 0..kh_n {
            for kw in 0..kw_n {
                let Some(dst) = rows.next() else { return };
                for (p, d) in (p0..p1).zip(dst.iter_mut()) {
                    let ow = p % ow_n;
                    let r = p / ow_n;
                    let (oh, od) = (r % oh_n, r / oh_n);
                    *d = match (
                        sp.in_coord(0, od, kd),
                        sp.in_coord(1, oh, kh),
                        sp.in_coord(2, ow, kw),
                    ) {
                        (Some(id), Some(ih), Some(iw)) => ((id * ih_n + ih) * iw_n + iw) as u32,
                        _ => PAD_OFFSET,
                    };
                }
            }
        }
    }
}

/// Gathers the im2col rows of `cg` channels (planes of `isz` values in `xg`) through
/// `table` ([`im2col_offsets`] of `tw` positions): row `c·taps + t` of the result is
/// `col[(c·taps + t)·ld..][..tw]`, zeros where the table says padding.
pub fn im2col_gather(
    xg: &[f32],
    cg: usize,
    isz: usize,
    table: &[u32],
    tw: usize,
    col: &mut [f32],
    ld: usize,
) {
    if tw == 0 {
        return;
    }
    let taps = table.len() / tw;
    for c in 0..cg {
        let xc = &xg[c * isz..(c + 1) * isz];
        for (t, offs) in table.chunks_exact(tw).enumerate() {
            let dst = &mut col[(c * taps + t) * ld..][..tw];
            for (d, &o) in dst.iter_mut().zip(offs) {
                // A padding entry (u32::MAX) is never a valid index: `get` gives None.
                *d = xc.get(o as usize).copied().unwrap_or(0.0);
            }
        }
    }
}

/// The row-segment im2col of [`im2col_tile_ld`] (long tiles: each row's valid run copied
/// at once).
fn im2col_segments(
    xg: &[f32],
    cg: usize,
    sp: &Spatial3,
    p0: usize,
    p1: usize,
    col: &mut [f32],
    ld: usize,
) {
    let tw = p1 - p0;
    let [kd_n, kh_n, kw_n] = sp.kernel;
    let [_, ih_n, iw_n] = sp.input;
    let [_, oh_n, ow_n] = sp.output;
    let (sw, dw, pw) = (sp.strides[2], sp.dilations[2], sp.pad_begin[2]);
    let isz = sp.in_size();
    let mut row = 0;
    for c in 0..cg {
        let xc = &xg[c * isz..(c + 1) * isz];
        for kd in 0..kd_n {
            for kh in 0..kh_n {
                for kw in 0..kw_n {
                    let dst = &mut col[row * ld..row * ld + tw];
                    row += 1;
                    let (lo, hi) = sp.valid_range(2, kw);
                    let mut p = p0;
                    while p < p1 {
                        let ow = p % ow_n;
                        let r = p / ow_n;
                        let (oh, od) = (r % oh_n, r / oh_n);
                        let end = (p - ow + ow_n).min(p1);
                        let seg = &mut dst[p - p0..end - p0];
                        let (a, b) = (ow, ow + (end - p));
                        match (sp.in_coord(0, od, kd), sp.in_coord(1, oh, kh)) {
                            (Some(id), Some(ih)) => {
                                let irow =
                                    &xc[(id * ih_n + ih) * iw_n..(id * ih_n + ih + 1) * iw_n];
                                let (vlo, vhi) =
                                    (lo.clamp(a, b), hi.clamp(a, b).max(lo.clamp(a, b)));
                                seg[..vlo - a].fill(0.0);
                                seg[vhi - a..].fill(0.0);
                                if vlo < vhi {
                                    let base = vlo * sw + kw * dw - pw;
                                    let mid = &mut seg[vlo - a..vhi - a];
                                    if sw == 1 {
                                        mid.copy_from_slice(&irow[base..base + (vhi - vlo)]);
                                    } else {
                                        for (j, v) in mid.iter_mut().enumerate() {
                                            *v = irow[base + j * sw];
                                        }
                                    }
                                }
                            }
                            _ => seg.fill(0.0),
                        }
                        p = end;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::geom::WindowAttrs;
    use crate::ops::conv::reference::conv_reference;
    use crate::ops::conv::test_util::{max_diff, Lcg};
    use crate::ops::linalg::sgemm::Isa;

    /// The whole depthwise path (flattened planes for 1-D/2-D, the row kernel for 3-D,
    /// planes split over tasks) against the reference convolution, at odd channel counts,
    /// multipliers > 1, batches, every stride/dilation/pad mix below, and 1, 2 and 3
    /// threads.
    #[test]
    fn depthwise_matches_the_reference_at_1_2_3_threads() {
        /// (n, channels, multiplier, input, kernel, pads (begin..., end...), strides, dilations)
        type Case = (
            usize,
            usize,
            usize,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            (
                1,
                7,
                1,
                vec![14, 14],
                vec![5, 5],
                vec![2, 2, 2, 2],
                vec![1, 1],
                vec![1, 1],
            ),
            (
                2,
                5,
                1,
                vec![9, 53],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![2, 2],
                vec![1, 1],
            ),
            (
                1,
                3,
                2,
                vec![13, 17],
                vec![3, 5],
                vec![1, 2, 0, 1],
                vec![2, 3],
                vec![1, 2],
            ),
            (
                3,
                33,
                1,
                vec![7, 7],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![1, 1],
                vec![1, 1],
            ),
            (
                1,
                9,
                1,
                vec![6, 6],
                vec![3, 3],
                vec![0, 0, 0, 0],
                vec![1, 4],
                vec![2, 1],
            ),
            (
                1,
                65,
                1,
                vec![31, 29],
                vec![5, 5],
                vec![4, 1, 3, 0],
                vec![3, 2],
                vec![1, 1],
            ),
            (
                1,
                4,
                1,
                vec![3, 2],
                vec![3, 3],
                vec![2, 2, 2, 2],
                vec![1, 1],
                vec![2, 2],
            ),
            (2, 11, 1, vec![40], vec![7], vec![3, 3], vec![1], vec![1]),
            (1, 6, 1, vec![37], vec![4], vec![0, 2], vec![3], vec![2]),
            (
                1,
                3,
                1,
                vec![5, 6, 7],
                vec![3, 3, 3],
                vec![1, 1, 1, 1, 1, 1],
                vec![1, 2, 1],
                vec![1, 1, 1],
            ),
            (
                1,
                129,
                1,
                vec![60, 61],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![2, 2],
                vec![1, 1],
            ),
        ];
        for (ci, (n, c, mult, input, kernel, pads, strides, dil)) in cases.into_iter().enumerate() {
            let win = WindowAttrs {
                pads: Some(pads),
                strides: Some(strides),
                dilations: Some(dil),
                ..Default::default()
            };
            let sp = win
                .resolve("Conv", &input, &kernel)
                .unwrap()
                .to3("Conv")
                .unwrap();
            let m = c * mult;
            let dims = ConvDims { n, c, m, group: c };
            let mut r = Lcg(ci as u64 + 77);
            let x = r.vec(n * c * sp.in_size());
            let w = r.vec(m * sp.kernel_size());
            let b = r.vec(m);
            let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
            let want: Vec<f32> = conv_reference(&f64v(&x), &f64v(&w), Some(&f64v(&b)), dims, &sp)
                .iter()
                .map(|&v| Activation::HardSwish.apply(v as f32))
                .collect();
            for (threads, algo) in [1, 2, 3].into_iter().flat_map(|t| {
                [
                    (t, ConvAlgo::Direct),
                    (t, ConvAlgo::DirectRows),
                    (t, ConvAlgo::DirectBlocked),
                ]
            }) {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![f32::NAN; n * m * sp.out_size()];
                let conv = ConvF32 {
                    x: &x,
                    w: &w,
                    bias: Some(&b),
                    dims,
                    sp,
                    act: Activation::HardSwish,
                    residual: None,
                    algo,
                    packed: None,
                };
                pool.install(|| conv.run(&mut got)).unwrap();
                let d = max_diff(&got, &want);
                assert!(
                    d < 1e-5,
                    "case {ci} {algo:?} at {threads} threads: diff {d}"
                );
                if input.len() == 2 && algo == ConvAlgo::DirectBlocked {
                    // The channels-last kernel, on the same problem in NHWC.
                    let planes = |v: &[f32], ch: usize, hw: usize| {
                        super::super::nhwc::permute_data(v, [n, ch, hw, 1], true)
                    };
                    let xt = planes(&x, c, sp.in_size());
                    let mut got = vec![f32::NAN; n * m * sp.out_size()];
                    let conv = ConvF32 {
                        x: &xt,
                        algo: ConvAlgo::NhwcDepthwise,
                        ..conv
                    };
                    pool.install(|| conv.run(&mut got)).unwrap();
                    let d = max_diff(&got, &planes(&want, m, sp.out_size()));
                    assert!(d < 1e-5, "case {ci} NHWC at {threads} threads: diff {d}");
                }
            }
        }
    }

    /// Batches of images with few output positions (one product with the images side by
    /// side), 1-D and 2-D, pointwise and k×k, with and without bias, plain and packed
    /// weights, against the reference convolution.
    #[test]
    fn batch_columns_match_the_reference() {
        use crate::ops::conv::test_util::problem;
        // (n, c, m, input, kernel, pads, strides, bias)
        type Case = (
            usize,
            usize,
            usize,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            bool,
        );
        let cases: Vec<Case> = vec![
            (8, 13, 11, vec![4], vec![3], vec![1, 1], vec![1], true),
            (3, 9, 17, vec![5], vec![3], vec![0, 0], vec![2], false),
            // STFT-like: one channel, a long window with a large stride, few positions.
            (5, 1, 19, vec![71], vec![24], vec![0, 0], vec![11], true),
            (7, 3, 6, vec![9], vec![5], vec![3, 2], vec![3], true),
            (
                4,
                20,
                9,
                vec![1, 1],
                vec![1, 1],
                vec![0, 0, 0, 0],
                vec![1, 1],
                true,
            ),
            (
                2,
                5,
                7,
                vec![3, 4],
                vec![3, 3],
                vec![1, 1, 1, 1],
                vec![1, 1],
                true,
            ),
        ];
        for (ci, (n, c, m, input, kernel, pads, strides, bias)) in cases.into_iter().enumerate() {
            let win = WindowAttrs {
                pads: Some(pads),
                strides: Some(strides),
                ..Default::default()
            };
            let dims = ConvDims { n, c, m, group: 1 };
            let act = Activation::Relu;
            let pr = problem(dims, &win, (&input, &kernel), bias, act, ci as u64 + 500);
            assert!(pr.sp.out_size() <= BATCH_COLUMNS_MAX_P);
            let packed = pack_weights(&pr.w, m, 1, Isa::detect()).unwrap();
            for (w, isa) in [(&pr.w, None), (&packed, Some(Isa::detect()))] {
                let mut got = vec![f32::NAN; n * m * pr.sp.out_size()];
                let conv = ConvF32 {
                    x: &pr.x,
                    w,
                    bias: bias.then_some(pr.b.as_slice()),
                    dims,
                    sp: pr.sp,
                    act,
                    residual: None,
                    algo: ConvAlgo::Auto,
                    packed: isa,
                };
                conv.run(&mut got).unwrap();
                let d = max_diff(&got, &pr.want);
                assert!(d < 1e-4, "case {ci} packed {isa:?}: diff {d}");
            }
        }
    }

    /// The offset-table im2col (short tiles) against the row-segment one, 1-D/2-D/3-D
    /// windows with padding, strides and dilations, tiles at odd offsets, rows `ld` apart
    /// (the values between rows untouched).
    #[test]
    fn im2col_table_matches_segments() {
        // (input, kernel, pads, strides, dilations, channels)
        type Case = (
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            usize,
        );
        let cases: Vec<Case> = vec![
            (vec![37], vec![5], vec![2, 3], vec![3], vec![2], 3),
            (vec![71], vec![24], vec![0, 0], vec![11], vec![1], 1),
            (
                vec![9, 11],
                vec![3, 2],
                vec![1, 0, 2, 1],
                vec![2, 1],
                vec![1, 3],
                2,
            ),
            (
                vec![5, 4, 7],
                vec![2, 3, 3],
                vec![1, 1, 0, 0, 2, 1],
                vec![1, 2, 2],
                vec![2, 1, 1],
                3,
            ),
        ];
        for (ci, (input, kernel, pads, strides, dilations, cg)) in cases.into_iter().enumerate() {
            let sp = WindowAttrs {
                pads: Some(pads),
                strides: Some(strides),
                dilations: Some(dilations),
                ..Default::default()
            }
            .resolve("Conv", &input, &kernel)
            .unwrap()
            .to3("Conv")
            .unwrap();
            let x = Lcg(ci as u64 + 900).vec(cg * sp.in_size());
            let k = cg * sp.kernel_size();
            let p = sp.out_size();
            for (p0, p1) in [(0, p), (1, p.min(6)), (p / 3, p - p / 4), (p - 1, p)] {
                if p0 >= p1 {
                    continue;
                }
                let tw = p1 - p0;
                let ld = tw + 3;
                let mut want = vec![f32::NAN; k * ld];
                im2col_segments(&x, cg, &sp, p0, p1, &mut want, ld);
                let mut got = vec![f32::NAN; k * ld];
                let mut table = vec![0u32; sp.kernel_size() * tw];
                im2col_offsets(&sp, p0, p1, &mut table);
                im2col_gather(&x, cg, sp.in_size(), &table, tw, &mut got, ld);
                for (r, (g, w)) in got.chunks(ld).zip(want.chunks(ld)).enumerate() {
                    assert_eq!(&g[..tw], &w[..tw], "case {ci} tile {p0}..{p1} row {r}");
                    assert!(
                        g[tw..].iter().all(|v| v.is_nan()),
                        "case {ci}: wrote past a row"
                    );
                }
                let mut dispatched = vec![f32::NAN; k * tw];
                im2col_tile(&x, cg, &sp, p0, p1, &mut dispatched);
                for (g, w) in dispatched.chunks(tw).zip(want.chunks(ld)) {
                    assert_eq!(g, &w[..tw], "case {ci} tile {p0}..{p1}: im2col_tile");
                }
            }
        }
    }

    /// im2col convolutions with the output positions split over 1, 2 and 3 threads (one
    /// image and group, several groups, batches; one or several tiles per task; plain and
    /// packed weights) against the reference convolution.
    #[test]
    fn im2col_position_split_matches_the_reference_at_1_2_3_threads() {
        /// (n, c, m, group, input, kernel, pads, strides)
        type Case = (
            usize,
            usize,
            usize,
            usize,
            [usize; 2],
            [usize; 2],
            [usize; 4],
            [usize; 2],
        );
        let cases: [Case; 4] = [
            (1, 3, 16, 1, [67, 71], [3, 3], [1, 1, 1, 1], [2, 2]),
            (1, 5, 13, 1, [41, 37], [3, 3], [1, 0, 1, 2], [1, 1]),
            (2, 6, 10, 2, [30, 33], [5, 3], [2, 1, 2, 1], [1, 1]),
            (1, 4, 7, 1, [20, 150], [1, 7], [0, 3, 0, 3], [1, 1]),
        ];
        for (ci, (n, c, m, group, input, kernel, pads, strides)) in cases.into_iter().enumerate() {
            let win = WindowAttrs {
                pads: Some(pads.to_vec()),
                strides: Some(strides.to_vec()),
                ..Default::default()
            };
            let sp = win
                .resolve("Conv", &input, &kernel)
                .unwrap()
                .to3("Conv")
                .unwrap();
            let dims = ConvDims { n, c, m, group };
            let mut r = Lcg(ci as u64 + 300);
            let x = r.vec(n * c * sp.in_size());
            let w = r.vec(m * (c / group) * sp.kernel_size());
            let b = r.vec(m);
            let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
            let want: Vec<f32> = conv_reference(&f64v(&x), &f64v(&w), Some(&f64v(&b)), dims, &sp)
                .iter()
                .map(|&v| Activation::Relu.apply(v as f32))
                .collect();
            let isa = Isa::detect();
            let packed = pack_weights(&w, m, group, isa).unwrap();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for tile_elems in [TILE_ELEMS, 2048] {
                    for prepacked in [false, true] {
                        let conv = ConvF32 {
                            x: &x,
                            w: if prepacked { &packed } else { &w },
                            bias: Some(&b),
                            dims,
                            sp,
                            act: Activation::Relu,
                            residual: None,
                            algo: ConvAlgo::Im2colGemm {
                                tile_elems,
                                parallel_outer: false,
                            },
                            packed: prepacked.then_some(isa),
                        };
                        let mut got = vec![f32::NAN; n * m * sp.out_size()];
                        pool.install(|| conv.run(&mut got)).unwrap();
                        let d = max_diff(&got, &want);
                        assert!(
                            d < 1e-4,
                            "case {ci} at {threads} threads, tile {tile_elems}, \
                             prepacked {prepacked}: diff {d}"
                        );
                    }
                }
            }
        }
        assert_eq!(position_tasks(27 * 16, 1224, 2), 2);
        assert_eq!(position_tasks(27 * 16, 100, 2), 1);
        assert_eq!(position_tasks(27 * 16, 12544, 1), 1);
    }

    /// Pointwise convolutions (the product split over threads, bias + activation in its
    /// epilogue) at 1, 2 and 3 threads with odd channel counts.
    #[test]
    fn pointwise_parallel_epilogue_matches_the_reference_at_1_2_3_threads() {
        let sp = WindowAttrs::default()
            .resolve("Conv", &[29, 31], &[1, 1])
            .unwrap()
            .to3("Conv")
            .unwrap();
        let (c, m) = (37, 77);
        let dims = ConvDims {
            n: 1,
            c,
            m,
            group: 1,
        };
        let mut r = Lcg(901);
        let x = r.vec(c * sp.in_size());
        let w = r.vec(m * c);
        let b = r.vec(m);
        let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let want: Vec<f32> = conv_reference(&f64v(&x), &f64v(&w), Some(&f64v(&b)), dims, &sp)
            .iter()
            .map(|&v| Activation::HardSwish.apply(v as f32))
            .collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let conv = ConvF32 {
                x: &x,
                w: &w,
                bias: Some(&b),
                dims,
                sp,
                act: Activation::HardSwish,
                residual: None,
                algo: ConvAlgo::Im2colGemm {
                    tile_elems: TILE_ELEMS,
                    parallel_outer: false,
                },
                packed: None,
            };
            let mut got = vec![f32::NAN; m * sp.out_size()];
            pool.install(|| conv.run(&mut got)).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{threads} threads: diff {d}");
        }
    }

    /// The channels-last 1×1 product at 1, 2 and 3 threads, with a residual, plain and with
    /// transposed weights: many positions (threads split the rows) and few (they split the
    /// columns), against the reference convolution.
    #[test]
    fn nhwc_pointwise_matches_the_reference_at_1_2_3_threads() {
        for (ci, (n, input, c, m)) in [
            (3, [29, 31], 37, 77),
            (1, [3, 5], 37, 77),
            (2, [1, 1], 5, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let sp = WindowAttrs::default()
                .resolve("Conv", &input, &[1, 1])
                .unwrap()
                .to3("Conv")
                .unwrap();
            let p = sp.out_size();
            let dims = ConvDims { n, c, m, group: 1 };
            let mut r = Lcg(911 + ci as u64);
            let x = r.vec(n * c * p);
            let w = r.vec(m * c);
            let b = r.vec(m);
            let res = r.vec(n * m * p);
            let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
            let raw = conv_reference(&f64v(&x), &f64v(&w), Some(&f64v(&b)), dims, &sp);
            // NCHW → NHWC of `v` with `ch` channels.
            let nhwc =
                |v: &[f64], ch: usize| super::super::nhwc::permute_data(v, [n, ch, p, 1], true);
            let res_nhwc: Vec<f32> = nhwc(&f64v(&res), m).iter().map(|&v| v as f32).collect();
            let want: Vec<f32> = nhwc(&raw, m)
                .iter()
                .zip(&res_nhwc)
                .map(|(&v, &r)| Activation::HardSwish.apply(v as f32 + r))
                .collect();
            let x_nhwc: Vec<f32> = nhwc(&f64v(&x), c).iter().map(|&v| v as f32).collect();
            let w_t = super::super::nhwc::transpose_weights(&w, m).unwrap();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for (weights, packed) in [(&w, None), (&w_t, Some(Isa::detect()))] {
                    let conv = ConvF32 {
                        x: &x_nhwc,
                        w: weights,
                        bias: Some(&b),
                        dims,
                        sp,
                        act: Activation::HardSwish,
                        residual: Some(&res_nhwc),
                        algo: ConvAlgo::NhwcPointwise,
                        packed,
                    };
                    let mut got = vec![f32::NAN; n * m * p];
                    pool.install(|| conv.run(&mut got)).unwrap();
                    let d = max_diff(&got, &want);
                    assert!(
                        d < 1e-4,
                        "case {ci}, {threads} threads, {packed:?}: diff {d}"
                    );
                }
            }
        }
    }

    /// Task sizing: serial for one thread or little work, at least the minimum work per task
    /// otherwise, every plane covered.
    #[test]
    fn planes_per_task_keeps_small_problems_serial() {
        assert_eq!(planes_per_task(256, 196 * 25, 1), 256);
        assert_eq!(planes_per_task(3, 10, 2), 3);
        assert_eq!(planes_per_task(1, 1 << 20, 2), 1);
        for (planes, work, threads) in [(256, 196 * 25, 2), (7, 1 << 16, 3), (1000, 49 * 9, 2)] {
            let per = planes_per_task(planes, work, threads);
            assert!(per >= 1 && per < planes);
            assert!(per * work >= DW_TASK_WORK || per * work * 2 >= DW_TASK_WORK);
        }
    }

    /// Every build of the bias + activation epilogue equals `Activation::apply` of the
    /// biased value, for every activation, on odd lengths.
    #[test]
    fn every_epilogue_build_matches_apply() {
        let acts = [
            Activation::None,
            Activation::Relu,
            Activation::Clip {
                min: -0.5,
                max: 1.5,
            },
            Activation::Sigmoid,
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Activation::HardSwish,
            Activation::Swish,
            Activation::LeakyRelu { alpha: 0.1 },
            Activation::Tanh,
        ];
        let mut r = Lcg(31);
        for act in acts {
            for len in [1, 15, 16, 17, 100] {
                let x: Vec<f32> = r.vec(len).iter().map(|v| v * 8.0).collect();
                for b in [0.0f32, 0.75] {
                    let want: Vec<f32> = x.iter().map(|&v| act.apply(v + b)).collect();
                    let mut builds: Vec<(&str, Vec<f32>)> = Vec::new();
                    let mut got = x.clone();
                    epilogue(&mut got, b, act);
                    builds.push(("dispatched", got));
                    let mut got = x.clone();
                    epilogue_body(&mut got, b, act);
                    builds.push(("portable", got));
                    #[cfg(target_arch = "x86_64")]
                    if Isa::Avx2.supported() {
                        let mut got = x.clone();
                        // SAFETY: AVX2 and FMA are present (checked above).
                        unsafe { epilogue_avx2(&mut got, b, act) };
                        builds.push(("avx2", got));
                    }
                    #[cfg(target_arch = "x86_64")]
                    if Isa::Avx512.supported() {
                        let mut got = x.clone();
                        // SAFETY: AVX-512 is present (checked above).
                        unsafe { epilogue_avx512(&mut got, b, act) };
                        builds.push(("avx512", got));
                    }
                    for (name, got) in builds {
                        // Sigmoid/Swish/Tanh use the polynomial exp (~2e-7 relative).
                        for (g, w) in got.iter().zip(&want) {
                            let d = (g - w).abs();
                            assert!(
                                d <= 1e-6 * (1.0 + w.abs()),
                                "{act:?} len {len} bias {b} {name}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every build of the depthwise row loop (portable, AVX2, AVX-512 where the CPU has
    /// them) against the reference convolution of one plane, strided and dilated.
    #[test]
    fn every_direct_plane_build_matches_the_reference() {
        /// Input plane, kernel, pads, strides, dilations.
        type Case = ([usize; 2], [usize; 2], [usize; 4], [usize; 2], [usize; 2]);
        let cases: [Case; 4] = [
            ([9, 53], [3, 3], [1, 1, 1, 1], [2, 2], [1, 1]),
            ([13, 17], [3, 5], [1, 2, 0, 1], [2, 3], [1, 2]),
            ([7, 40], [5, 5], [2, 2, 2, 2], [1, 1], [1, 1]),
            ([6, 6], [3, 3], [0, 0, 0, 0], [1, 4], [2, 1]),
        ];
        for (ci, (input, kernel, pads, strides, dil)) in cases.into_iter().enumerate() {
            let win = WindowAttrs {
                pads: Some(pads.to_vec()),
                strides: Some(strides.to_vec()),
                dilations: Some(dil.to_vec()),
                ..Default::default()
            };
            let sp = win
                .resolve("Conv", &input, &kernel)
                .unwrap()
                .to3("Conv")
                .unwrap();
            let mut r = Lcg(ci as u64 + 40);
            let x = r.vec(sp.in_size());
            let w = r.vec(sp.kernel_size());
            let bias = r.next();
            let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
            let dims = ConvDims {
                n: 1,
                c: 1,
                m: 1,
                group: 1,
            };
            let want: Vec<f32> =
                conv_reference(&f64v(&x), &f64v(&w), Some(&[bias as f64]), dims, &sp)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
            let sw = sp.strides[2];
            let mut src = vec![0.0f32; sp.input[0] * sp.input[1] * sw * sp.input[2].div_ceil(sw)];
            phase_split(&x, sp.input[2], sw, &mut src);
            let mut builds: Vec<(&str, Vec<f32>)> = Vec::new();
            let mut out = vec![f32::NAN; sp.out_size()];
            direct_plane_body(
                &src,
                &w,
                bias,
                &sp,
                Activation::None,
                &mut out,
                |o, w, i| *o += w * i,
            );
            builds.push(("portable", out.clone()));
            #[cfg(target_arch = "x86_64")]
            {
                if Isa::Avx2.supported() {
                    out.fill(f32::NAN);
                    // SAFETY: AVX2 and FMA are present (checked above).
                    unsafe { direct_plane_avx2(&src, &w, bias, &sp, Activation::None, &mut out) };
                    builds.push(("avx2", out.clone()));
                }
                if Isa::Avx512.supported() {
                    out.fill(f32::NAN);
                    // SAFETY: AVX-512F is present (checked above).
                    unsafe { direct_plane_avx512(&src, &w, bias, &sp, Activation::None, &mut out) };
                    builds.push(("avx512", out.clone()));
                }
            }
            for (name, got) in builds {
                let d = max_diff(&got, &want);
                assert!(d < 1e-5, "case {ci} {name}: diff {d}");
            }
        }
    }
}
