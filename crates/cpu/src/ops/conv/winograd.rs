//! Winograd convolution F(m×m, 3×3) for 2-D 3×3 convolutions with unit strides and
//! dilations (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! The 1-D algorithm F(m, 3) computes `m` outputs of a 3-tap correlation from `α = m + 2`
//! inputs as `y = Aᵀ[(G g) ⊙ (Bᵀ d)]`; nested in 2-D, an `m × m` output tile is
//! `Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`. Summed over input channels, the element-wise product
//! becomes `α²` independent matrix products `M_ξ[K × tiles] = U_ξ[K × C] · V_ξ[C × tiles]`
//! (one per position ξ of the α × α transformed tile), which run on kiln's sgemm:
//!
//! 1. filter transform `U = G g Gᵀ`, once when the plan is built ([`transform_weights`],
//!    each ξ's `K × C` matrix in the packed-A layout of the GEMM) or per call into scratch;
//! 2. input transform `V = Bᵀ d B` of the α × α input patches (zero outside the image), a
//!    block of tiles at a time (`[ξ][C][tiles]`, the block sized to stay in L2);
//! 3. the α² products;
//! 4. output transform `Y = Aᵀ M A`, bias and the fused activation, edge tiles clipped.
//!
//! The matrices are the Toom–Cook construction on the interpolation points `p` (finite)
//! plus the point at infinity: F(2, 3) on 0, 1, −1, ∞ and F(4, 3) on 0, 1, −1, 2, −2, ∞.
//! With `N_j = Π_{l≠j}(p_j − p_l)` over the finite points:
//! `Aᵀ[i][j] = p_jⁱ` (the ∞ column is 1 in the last row only), `G[j][k] = p_jᵏ / N_j` (the ∞
//! row picks `g₂`), and row `j` of `Bᵀ` holds the coefficients (constant term first) of
//! `Π_{l≠j}(x − p_l)`, the ∞ row those of `Π_l(x − p_l)`. The test
//! `matrices_are_the_toom_cook_construction` derives them from the points and checks the
//! 1-D identity.
//!
//! F(4, 3) does 36 multiplies per 16 outputs where direct convolution does 144 (4×; F(2, 3):
//! 16 per 4, 2.25×), but the transforms' larger coefficients lose more precision.

use rayon::prelude::*;

use kiln_core::{KilnError, Result};

use super::geom::Spatial3;
use super::kernel::{add_residual, epilogue, ConvF32, OutPtr};
use super::reference::ConvDims;
use crate::fused::Activation;
use crate::ops::linalg::blas::{self, MatRef};
use crate::ops::linalg::sgemm::{pack_a_whole, Isa};

/// The Winograd variant: output tile size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WinoTile {
    /// F(2×2, 3×3): 4 × 4 transformed tiles, 16 products.
    F23,
    /// F(4×4, 3×3): 6 × 6 transformed tiles, 36 products.
    F43,
}

/// Bᵀ of F(2, 3) (α × α, row-major).
const BT23: [f32; 16] = [
    -1.0, 0.0, 1.0, 0.0, //
    0.0, 1.0, 1.0, 0.0, //
    0.0, -1.0, 1.0, 0.0, //
    0.0, -1.0, 0.0, 1.0,
];
/// G of F(2, 3) (α × 3).
const G23: [f32; 12] = [
    -1.0, 0.0, 0.0, //
    0.5, 0.5, 0.5, //
    0.5, -0.5, 0.5, //
    0.0, 0.0, 1.0,
];
/// Aᵀ of F(2, 3) (m × α).
const AT23: [f32; 8] = [
    1.0, 1.0, 1.0, 0.0, //
    0.0, 1.0, -1.0, 1.0,
];
/// Bᵀ of F(4, 3).
const BT43: [f32; 36] = [
    4.0, 0.0, -5.0, 0.0, 1.0, 0.0, //
    0.0, -4.0, -4.0, 1.0, 1.0, 0.0, //
    0.0, 4.0, -4.0, -1.0, 1.0, 0.0, //
    0.0, -2.0, -1.0, 2.0, 1.0, 0.0, //
    0.0, 2.0, -1.0, -2.0, 1.0, 0.0, //
    0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
];
/// G of F(4, 3).
const G43: [f32; 18] = [
    1.0 / 4.0,
    0.0,
    0.0,
    -1.0 / 6.0,
    -1.0 / 6.0,
    -1.0 / 6.0,
    -1.0 / 6.0,
    1.0 / 6.0,
    -1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 12.0,
    1.0 / 6.0,
    1.0 / 24.0,
    -1.0 / 12.0,
    1.0 / 6.0,
    0.0,
    0.0,
    1.0,
];
/// Aᵀ of F(4, 3).
const AT43: [f32; 24] = [
    1.0, 1.0, 1.0, 1.0, 1.0, 0.0, //
    0.0, 1.0, -1.0, 2.0, -2.0, 0.0, //
    0.0, 1.0, 1.0, 4.0, 4.0, 0.0, //
    0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
];

impl WinoTile {
    /// Output tile side `m`.
    pub fn m(self) -> usize {
        match self {
            WinoTile::F23 => 2,
            WinoTile::F43 => 4,
        }
    }

    /// Transformed tile side `α = m + 2`.
    pub fn alpha(self) -> usize {
        self.m() + 2
    }

    /// Stable name (`f23`, `f43`), as in tactic ids.
    pub fn name(self) -> &'static str {
        match self {
            WinoTile::F23 => "f23",
            WinoTile::F43 => "f43",
        }
    }

    /// The variant a [`WinoTile::name`] names.
    pub fn from_name(name: &str) -> Option<WinoTile> {
        [WinoTile::F23, WinoTile::F43]
            .into_iter()
            .find(|t| t.name() == name)
    }

    #[cfg(test)]
    fn bt(self) -> &'static [f32] {
        match self {
            WinoTile::F23 => &BT23,
            WinoTile::F43 => &BT43,
        }
    }

    fn g(self) -> &'static [f32] {
        match self {
            WinoTile::F23 => &G23,
            WinoTile::F43 => &G43,
        }
    }

    #[cfg(test)]
    fn at(self) -> &'static [f32] {
        match self {
            WinoTile::F23 => &AT23,
            WinoTile::F43 => &AT43,
        }
    }
}

/// Whether the Winograd kernels take this window: 2-D, 3 × 3, unit strides and dilations
/// (any padding).
pub fn applies(sp: &Spatial3) -> bool {
    sp.kernel == [1, 3, 3]
        && sp.strides == [1, 1, 1]
        && sp.dilations == [1, 1, 1]
        && sp.input[0] == 1
        && sp.output[0] == 1
        && sp.pad_begin[0] == 0
}

/// Channels per group (input and output) from which the tuner is offered the Winograd
/// tactics: below it the products are too thin for the transforms to pay (PP-OCR det's 96→24
/// layers lost at run time with F(4,3) after a near-tie in the tuner).
pub const MIN_CHANNELS: usize = 32;

/// Number of values of the transformed weights of `m` filters with `cg` input channels.
pub fn transformed_len(tile: WinoTile, m: usize, cg: usize) -> usize {
    tile.alpha() * tile.alpha() * m * cg
}

/// The transformed weights `U = G g Gᵀ` of 3 × 3 filters `w` (M × C/group × 3 × 3): per
/// group, per position ξ of the α × α tile, the `M/group × C/group` matrix `U_ξ`, row-major
/// or (with `isa`) in the packed-A layout of [`pack_a_whole`]. Length
/// [`transformed_len`].
pub fn transform_weights(
    tile: WinoTile,
    w: &[f32],
    m: usize,
    group: usize,
    isa: Option<Isa>,
) -> Result<Vec<f32>> {
    let cg = check_weights(w, m, group)?;
    let mut out = vec![0.0f32; transformed_len(tile, m, cg)];
    transform_weights_into(tile, w, m, group, isa, &mut out);
    Ok(out)
}

/// Checks `w` holds `m` filters of 3 × 3 in `group` groups; returns the channels per group.
fn check_weights(w: &[f32], m: usize, group: usize) -> Result<usize> {
    if m == 0 || group == 0 || !m.is_multiple_of(group) || !w.len().is_multiple_of(9 * m) {
        return Err(KilnError::kernel(
            "Conv",
            format!(
                "cannot transform {} weights as {m} 3×3 filters in {group} groups",
                w.len()
            ),
        ));
    }
    Ok(w.len() / (9 * m))
}

/// [`transform_weights`] into `out` (checked lengths).
fn transform_weights_into(
    tile: WinoTile,
    w: &[f32],
    m: usize,
    group: usize,
    isa: Option<Isa>,
    out: &mut [f32],
) {
    let a = tile.alpha();
    let a2 = a * a;
    let mg = m / group;
    let cg = w.len() / (9 * m);
    let block = mg * cg;
    let gm = tile.g();
    // One group's α² matrices, row-major.
    let fill = |dst: &mut [f32], g: usize| {
        for k in 0..mg {
            for ci in 0..cg {
                let f = &w[((g * mg + k) * cg + ci) * 9..][..9];
                // t = G·f (α × 3), then u = t·Gᵀ (α × α), in f64.
                let mut t = [0.0f64; 18];
                for i in 0..a {
                    for col in 0..3 {
                        t[i * 3 + col] = (0..3)
                            .map(|r| gm[i * 3 + r] as f64 * f[r * 3 + col] as f64)
                            .sum();
                    }
                }
                for i in 0..a {
                    for j in 0..a {
                        let u: f64 = (0..3).map(|b| t[i * 3 + b] * gm[j * 3 + b] as f64).sum();
                        dst[(i * a + j) * block + k * cg + ci] = u as f32;
                    }
                }
            }
        }
    };
    for g in 0..group {
        let dst = &mut out[g * a2 * block..(g + 1) * a2 * block];
        match isa {
            None => fill(dst, g),
            Some(isa) => crate::scratch::with_scratch::<f32, _>(a2 * block, |plain| {
                fill(plain, g);
                for (src, d) in plain.chunks_exact(block).zip(dst.chunks_exact_mut(block)) {
                    pack_a_whole(isa, mg, cg, src, d);
                }
            }),
        }
    }
}

/// Largest scratch per block (bytes) the block size aims for: transformed inputs and
/// products of a block stay in L2.
const BLOCK_BYTES: usize = 2 << 20;
/// Fewest tiles per block when there are enough (the products' column count).
const MIN_BLOCK: usize = 64;
/// Most tiles per block.
const MAX_BLOCK: usize = 512;

/// The geometry of one Winograd convolution.
#[derive(Debug, Clone, Copy)]
struct Geo {
    tile: WinoTile,
    /// Output tile side and transformed tile side.
    mt: usize,
    alpha: usize,
    ih: usize,
    iw: usize,
    oh: usize,
    ow: usize,
    /// Padding before (rows, columns).
    pt: usize,
    pl: usize,
    /// Tiles per output row, per image.
    tw: usize,
    tpi: usize,
}

impl Geo {
    fn new(tile: WinoTile, sp: &Spatial3) -> Geo {
        let (mt, alpha) = (tile.m(), tile.alpha());
        let [_, ih, iw] = sp.input;
        let [_, oh, ow] = sp.output;
        let (th, tw) = (oh.div_ceil(mt), ow.div_ceil(mt));
        Geo {
            tile,
            mt,
            alpha,
            ih,
            iw,
            oh,
            ow,
            pt: sp.pad_begin[1],
            pl: sp.pad_begin[2],
            tw,
            tpi: th * tw,
        }
    }

    /// Splits tiles `t0..t0 + n` into runs along one tile row: `(image, tile row, first
    /// tile column, count, offset in the block)`.
    fn runs(&self, t0: usize, n: usize, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
        let mut t = t0;
        while t < t0 + n {
            let (b, rem) = (t / self.tpi, t % self.tpi);
            let (ty, tx) = (rem / self.tw, rem % self.tw);
            let len = (self.tw - tx).min(t0 + n - t);
            f(b, ty, tx, len, t - t0);
            t += len;
        }
    }
}

/// Tiles per block, a multiple of [`LANES`]: the scratch of a block (`per_tile` values a
/// tile) within [`BLOCK_BYTES`], between [`MIN_BLOCK`] and [`MAX_BLOCK`], no more than
/// there are, and small enough that `tasks_wanted` blocks exist when there are enough tiles.
fn block_tiles(per_tile: usize, total: usize, tasks_wanted: usize) -> usize {
    let fit = (BLOCK_BYTES / 4 / per_tile.max(1) / LANES * LANES).clamp(MIN_BLOCK, MAX_BLOCK);
    let mut nb = fit.min(total.next_multiple_of(LANES));
    if tasks_wanted > 1 {
        nb = nb.min(total.div_ceil(tasks_wanted).next_multiple_of(LANES));
    }
    nb.max(LANES)
}

/// Tiles transformed together: one AVX-512 vector (two AVX2 ones) per coefficient.
const LANES: usize = 16;

/// `Σ_r coef[r] · vec(r)` over `LANES` tiles (zero coefficients skipped; with the
/// matrix a constant and the loops unrolled, the checks fold away).
#[inline(always)]
fn comb<const A: usize>(coef: &[f32], vec: impl Fn(usize) -> [f32; LANES]) -> [f32; LANES] {
    let mut acc = [0.0f32; LANES];
    for (r, &c) in coef[..A].iter().enumerate() {
        if c == 0.0 {
            continue;
        }
        for (a, x) in acc.iter_mut().zip(vec(r)) {
            *a += c * x;
        }
    }
    acc
}

/// `LANES` values of `src` from `at`.
#[inline(always)]
fn load(src: &[f32], at: usize) -> [f32; LANES] {
    src[at..at + LANES].try_into().unwrap()
}

/// `dst[q] = src[q·MT]`: whole chunks of `LANES` with fixed offsets (unrolled, no
/// bounds checks inside), then the tail.
#[inline(always)]
fn gather_strided<const MT: usize>(src: &[f32], dst: &mut [f32]) {
    let mut chunks = dst.chunks_exact_mut(LANES);
    let mut off = 0;
    for c in &mut chunks {
        let s = &src[off..off + (LANES - 1) * MT + 1];
        for (i, o) in c.iter_mut().enumerate() {
            *o = s[i * MT];
        }
        off += LANES * MT;
    }
    // (After whole chunks `off` may lie past the end of `src`: then there is no tail.)
    let tail = src.get(off..).unwrap_or(&[]);
    for (o, &x) in chunks
        .into_remainder()
        .iter_mut()
        .zip(tail.iter().step_by(MT))
    {
        *o = x;
    }
}

/// The input transform `Bᵀ d B` of `LANES` tiles: `d[(r·A + s)·nb + j..]` holds patch
/// value (r, s) of tile `j..`; position ξ goes to `v[ξ·stride + j0..][..LANES]`.
#[inline(always)]
fn in_chunk<const A: usize>(
    bt: &[f32],
    d: &[f32],
    nb: usize,
    j: usize,
    v: &mut [f32],
    stride: usize,
    j0: usize,
) {
    let mut t = [[[0.0f32; LANES]; A]; A];
    for (i, ti) in t.iter_mut().enumerate() {
        for (s, ts) in ti.iter_mut().enumerate() {
            *ts = comb::<A>(&bt[i * A..], |r| load(d, (r * A + s) * nb + j));
        }
    }
    for (i, ti) in t.iter().enumerate() {
        for jj in 0..A {
            let val = comb::<A>(&bt[jj * A..], |s| ti[s]);
            v[(i * A + jj) * stride + j0..][..LANES].copy_from_slice(&val);
        }
    }
}

/// The output transform `Aᵀ M A` of `LANES` tiles: product ξ at `prod[ξ·stride + j..]`;
/// output (i, jj) goes to `y[(i·MT + jj)·nb + j..][..LANES]`.
#[inline(always)]
fn out_chunk<const A: usize, const MT: usize>(
    at: &[f32],
    prod: &[f32],
    stride: usize,
    j: usize,
    y: &mut [f32],
    nb: usize,
) {
    let mut t = [[[0.0f32; LANES]; A]; MT];
    for (i, ti) in t.iter_mut().enumerate() {
        for (s, ts) in ti.iter_mut().enumerate() {
            *ts = comb::<A>(&at[i * A..], |r| load(prod, (r * A + s) * stride + j));
        }
    }
    for (i, ti) in t.iter().enumerate() {
        for jj in 0..MT {
            let val = comb::<A>(&at[jj * A..], |s| ti[s]);
            y[(i * MT + jj) * nb + j..][..LANES].copy_from_slice(&val);
        }
    }
}

/// The input side of one block of tiles of one group.
struct InBlock<'a> {
    geo: Geo,
    /// The whole input (N × C × H × W).
    x: &'a [f32],
    /// Channels of the input, first channel of the group, channels of the group.
    c: usize,
    c0: usize,
    cg: usize,
    /// First tile, tiles, row stride of the block's buffers.
    t0: usize,
    n: usize,
    nb: usize,
}

impl InBlock<'_> {
    /// Gathers and transforms: `v[(ξ·cg + c)·nb + j] = (Bᵀ d B)_ξ` of tile `t0 + j`,
    /// channel `c`, with `d` (the gathered patches) α²·nb values.
    #[inline(always)]
    fn run_body(&self, d: &mut [f32], v: &mut [f32]) {
        let g = &self.geo;
        let (a, nb, n) = (g.alpha, self.nb, self.n);
        let isz = g.ih * g.iw;
        for ci in 0..self.cg {
            // Gather the α × α patches (zero outside the image).
            g.runs(self.t0, n, |b, ty, tx0, len, j0| {
                let plane = &self.x[(b * self.c + self.c0 + ci) * isz..][..isz];
                for r in 0..a {
                    let iy = (ty * g.mt + r) as isize - g.pt as isize;
                    if iy < 0 || iy >= g.ih as isize {
                        for s in 0..a {
                            d[(r * a + s) * nb + j0..][..len].fill(0.0);
                        }
                        continue;
                    }
                    let row = &plane[iy as usize * g.iw..][..g.iw];
                    // Tile columns whose whole patch row lies inside the image.
                    let lo = g.pl.div_ceil(g.mt).max(tx0).min(tx0 + len);
                    let hi = if g.iw + g.pl >= a {
                        ((g.iw + g.pl - a) / g.mt + 1).clamp(lo, tx0 + len)
                    } else {
                        lo
                    };
                    for s in 0..a {
                        let dst = &mut d[(r * a + s) * nb + j0..][..len];
                        let edge = |tx: usize| {
                            let ix = (tx * g.mt + s) as isize - g.pl as isize;
                            if ix >= 0 && ix < g.iw as isize {
                                row[ix as usize]
                            } else {
                                0.0
                            }
                        };
                        let (l, h) = (lo - tx0, hi - tx0);
                        for (q, o) in dst[..l].iter_mut().enumerate() {
                            *o = edge(tx0 + q);
                        }
                        if h > l {
                            let src = &row[lo * g.mt + s - g.pl..];
                            match g.tile {
                                WinoTile::F23 => gather_strided::<2>(src, &mut dst[l..h]),
                                WinoTile::F43 => gather_strided::<4>(src, &mut dst[l..h]),
                            }
                        }
                        for (q, o) in dst[h..].iter_mut().enumerate() {
                            *o = edge(tx0 + h + q);
                        }
                    }
                }
            });
            // Whole vectors: the tail's patch values are 0 (its columns are never used).
            let nv = n.next_multiple_of(LANES);
            for row in d.chunks_exact_mut(nb).take(a * a) {
                row[n..nv].fill(0.0);
            }
            let stride = self.cg * nb;
            for j in (0..nv).step_by(LANES) {
                let (v, j0) = (&mut *v, ci * nb + j);
                match g.tile {
                    WinoTile::F23 => in_chunk::<4>(&BT23, d, nb, j, v, stride, j0),
                    WinoTile::F43 => in_chunk::<6>(&BT43, d, nb, j, v, stride, j0),
                }
            }
        }
    }
}

/// The output side of one block of tiles of one group.
struct OutBlock<'a> {
    geo: Geo,
    /// Output channels of the layer, first channel of the group, channels of the group.
    m: usize,
    k0: usize,
    mg: usize,
    /// The group's bias.
    bias: Option<&'a [f32]>,
    act: Activation,
    /// The whole residual (laid out as the output), added before `act`.
    residual: Option<&'a [f32]>,
    t0: usize,
    n: usize,
    nb: usize,
    /// The whole output (N × M × OH × OW), written at this block's tiles only.
    out: OutPtr,
}

impl OutBlock<'_> {
    /// Transforms the products `prod[(ξ·mg + k)·nb + j]` back (`Aᵀ M A`), adds the bias,
    /// applies the activation and writes the tiles' pixels inside the output; `y` holds
    /// m²·nb values.
    ///
    /// # Safety
    /// `out` must point at the whole output, and no other thread may access the pixels of
    /// this block's tiles while it runs.
    #[inline(always)]
    unsafe fn run_body(&self, prod: &[f32], y: &mut [f32]) {
        let g = &self.geo;
        let (mt, nb, n) = (g.mt, self.nb, self.n);
        let osz = g.oh * g.ow;
        let nv = n.next_multiple_of(LANES);
        for k in 0..self.mg {
            let pk = &prod[k * nb..];
            for j in (0..nv).step_by(LANES) {
                match g.tile {
                    WinoTile::F23 => out_chunk::<4, 2>(&AT23, pk, self.mg * nb, j, y, nb),
                    WinoTile::F43 => out_chunk::<6, 4>(&AT43, pk, self.mg * nb, j, y, nb),
                }
            }
            let bias = self.bias.map_or(0.0, |b| b[k]);
            let act = match self.residual {
                Some(_) => Activation::None,
                None => self.act,
            };
            for yv in y.chunks_exact_mut(nb).take(mt * mt) {
                epilogue(&mut yv[..n], bias, act);
            }
            g.runs(self.t0, n, |b, ty, tx0, len, j0| {
                let plane = (b * self.m + self.k0 + k) * osz;
                let x0 = tx0 * mt;
                let width = (len * mt).min(g.ow - x0);
                for i in 0..mt {
                    let oy = ty * mt + i;
                    if oy >= g.oh {
                        break;
                    }
                    // SAFETY: the row segment lies inside the output (oy < oh, x0 + width
                    // ≤ ow) and belongs to this block's tiles, which no other task touches
                    // (the caller's contract).
                    let row = unsafe { self.out.slice(plane + oy * g.ow + x0, width) };
                    for j in 0..mt {
                        let src = &y[(i * mt + j) * nb + j0..][..len];
                        for (q, &val) in src.iter().enumerate() {
                            if let Some(o) = row.get_mut(q * mt + j) {
                                *o = val;
                            }
                        }
                    }
                    if let Some(res) = self.residual {
                        let at = plane + oy * g.ow + x0;
                        add_residual(row, &res[at..at + width], self.act);
                    }
                }
            });
        }
    }
}

/// Which build of the transforms runs (the portable one, or it compiled for AVX2 / AVX-512
/// so the loops over a block's tiles vectorise).
fn run_in(simd: Isa, blk: &InBlock<'_>, d: &mut [f32], v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: callers pass a family this CPU supports (`Isa::supported`).
        Isa::Avx512 => return unsafe { in_avx512(blk, d, v) },
        // SAFETY: as above.
        Isa::Avx2 => return unsafe { in_avx2(blk, d, v) },
        Isa::Scalar => {}
    }
    let _ = simd;
    blk.run_body(d, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn in_avx512(blk: &InBlock<'_>, d: &mut [f32], v: &mut [f32]) {
    blk.run_body(d, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn in_avx2(blk: &InBlock<'_>, d: &mut [f32], v: &mut [f32]) {
    blk.run_body(d, v)
}

/// The output transform in the build `simd` names.
///
/// # Safety
/// As [`OutBlock::run_body`]; `simd` must be supported by this CPU.
unsafe fn run_out(simd: Isa, blk: &OutBlock<'_>, prod: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the caller's contract.
        Isa::Avx512 => return unsafe { out_avx512(blk, prod, y) },
        // SAFETY: the caller's contract.
        Isa::Avx2 => return unsafe { out_avx2(blk, prod, y) },
        Isa::Scalar => {}
    }
    let _ = simd;
    // SAFETY: the caller's contract.
    unsafe { blk.run_body(prod, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn out_avx512(blk: &OutBlock<'_>, prod: &[f32], y: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { blk.run_body(prod, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn out_avx2(blk: &OutBlock<'_>, prod: &[f32], y: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { blk.run_body(prod, y) }
}

/// Runs `conv` (a window [`applies`] takes) with Winograd F(`tile`) into `out` (checked
/// by the caller). With `conv.packed = Some(isa)`, `conv.w` holds [`transform_weights`]
/// for `isa`; otherwise the plain weights, transformed into scratch on every call.
pub fn run(conv: &ConvF32<'_>, tile: WinoTile, out: &mut [f32]) -> Result<()> {
    run_with(conv, tile, out, Isa::detect())
}

/// [`run`] with the transforms' build `simd` (one this CPU supports).
fn run_with(conv: &ConvF32<'_>, tile: WinoTile, out: &mut [f32], simd: Isa) -> Result<()> {
    if !applies(&conv.sp) {
        return Err(KilnError::kernel(
            "Conv",
            "the Winograd tactic needs a 2-D 3×3 window with unit strides and dilations",
        ));
    }
    let ConvDims { m, group, c, .. } = conv.dims;
    let cg = c / group;
    match conv.packed {
        Some(isa) => {
            if conv.w.len() != transformed_len(tile, m, cg) {
                return Err(KilnError::kernel(
                    "Conv",
                    "the Winograd weights have the wrong number of elements; rebuild the plan",
                ));
            }
            run_transformed(conv, tile, conv.w, Some(isa), out, simd)
        }
        None => {
            check_weights(conv.w, m, group)?;
            crate::scratch::with_scratch::<f32, _>(transformed_len(tile, m, cg), |u| {
                transform_weights_into(tile, conv.w, m, group, None, u);
                run_transformed(conv, tile, u, None, out, simd)
            })
        }
    }
}

/// The blocks of tiles, with the weights `u` transformed (packed for `isa`, or row-major).
fn run_transformed(
    conv: &ConvF32<'_>,
    tile: WinoTile,
    u: &[f32],
    isa: Option<Isa>,
    out: &mut [f32],
    simd: Isa,
) -> Result<()> {
    let ConvDims { n, c, m, group } = conv.dims;
    let (cg, mg) = (c / group, m / group);
    let geo = Geo::new(tile, &conv.sp);
    let (a2, mt2) = (geo.alpha * geo.alpha, geo.mt * geo.mt);
    let total = n * geo.tpi;
    if total == 0 || out.is_empty() {
        return Ok(());
    }
    let threads = crate::parallel::threads();
    // Scratch values per tile: transformed inputs, products, patches, outputs.
    let per_tile = a2 * (cg + mg) + a2 + mt2;
    let nb = block_tiles(per_tile, total, threads.div_ceil(group));
    let blocks = total.div_ceil(nb);
    let tasks = group * blocks;
    let parallel = tasks > 1 && threads > 1;
    // One block: the products split over threads instead when it is the only task.
    let par_products = tasks == 1 && threads > 1 && mg * nb * cg * a2 >= blas::PARALLEL_THRESHOLD;
    let dst = OutPtr(out.as_mut_ptr());
    let ublock = mg * cg;
    let body = |task: usize| -> Result<()> {
        let (g, blk) = (task / blocks, task % blocks);
        let t0 = blk * nb;
        let nbt = nb.min(total - t0);
        // The products run on whole vectors of tiles (the tail's inputs are 0).
        let nv = nbt.next_multiple_of(LANES);
        let len = a2 * cg * nb + a2 * mg * nb + a2 * nb + mt2 * nb;
        crate::scratch::with_scratch::<f32, _>(len, |buf| {
            let (v, rest) = buf.split_at_mut(a2 * cg * nb);
            let (prod, rest) = rest.split_at_mut(a2 * mg * nb);
            let (d, y) = rest.split_at_mut(a2 * nb);
            let inb = InBlock {
                geo,
                x: conv.x,
                c,
                c0: g * cg,
                cg,
                t0,
                n: nbt,
                nb,
            };
            run_in(simd, &inb, d, v);
            let ug = &u[g * a2 * ublock..(g + 1) * a2 * ublock];
            let product = |xi: usize, dst: &mut [f32]| -> Result<()> {
                let uk = &ug[xi * ublock..(xi + 1) * ublock];
                let b = MatRef {
                    data: &v[xi * cg * nb..(xi + 1) * cg * nb],
                    rs: nb,
                    cs: 1,
                };
                match isa {
                    Some(isa) => {
                        blas::gemm_packed_a(isa, mg, nv, cg, dst, nb, false, uk, b, 1.0, false)
                    }
                    None => blas::gemm(
                        mg,
                        nv,
                        cg,
                        dst,
                        nb,
                        false,
                        MatRef::row_major(uk, cg),
                        b,
                        1.0,
                        false,
                    ),
                }
            };
            if par_products {
                prod.par_chunks_mut(mg * nb)
                    .enumerate()
                    .try_for_each(|(xi, dst)| product(xi, dst))?;
            } else {
                for (xi, dst) in prod.chunks_mut(mg * nb).enumerate() {
                    product(xi, dst)?;
                }
            }
            let outb = OutBlock {
                geo,
                m,
                k0: g * mg,
                mg,
                bias: conv.bias.map(|b| &b[g * mg..(g + 1) * mg]),
                act: conv.act,
                residual: conv.residual,
                t0,
                n: nbt,
                nb,
                out: dst,
            };
            // SAFETY: `dst` is the whole output (`out`, checked by the caller), tasks
            // cover disjoint tiles (one block of one group each) and `out` is not used
            // otherwise while they run.
            unsafe { run_out(simd, &outb, prod, y) };
            Ok(())
        })
    };
    if parallel {
        (0..tasks).into_par_iter().try_for_each(body)
    } else {
        (0..tasks).try_for_each(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::geom::WindowAttrs;
    use crate::ops::conv::kernel::ConvAlgo;
    use crate::ops::conv::test_util::{max_diff, problem};

    /// The Toom–Cook matrices from the points (f64): Bᵀ, G, Aᵀ.
    fn derive(points: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let a = points.len() + 1;
        let m = a - 2;
        // Coefficients (constant first) of Π (x − p) over `ps`.
        let poly = |ps: &[f64]| {
            let mut c = vec![1.0f64];
            for &p in ps {
                let mut next = vec![0.0; c.len() + 1];
                for (i, &v) in c.iter().enumerate() {
                    next[i + 1] += v;
                    next[i] -= p * v;
                }
                c = next;
            }
            c
        };
        let mut bt = vec![0.0; a * a];
        let mut g = vec![0.0; a * 3];
        let mut at = vec![0.0; m * a];
        for (j, &p) in points.iter().enumerate() {
            let others: Vec<f64> = points
                .iter()
                .enumerate()
                .filter(|&(l, _)| l != j)
                .map(|(_, &q)| q)
                .collect();
            for (r, v) in poly(&others).into_iter().enumerate() {
                bt[j * a + r] = v;
            }
            let nj: f64 = others.iter().map(|q| p - q).product();
            for k in 0..3 {
                g[j * 3 + k] = p.powi(k as i32) / nj;
            }
            for i in 0..m {
                at[i * a + j] = p.powi(i as i32);
            }
        }
        for (r, v) in poly(points).into_iter().enumerate() {
            bt[(a - 1) * a + r] = v;
        }
        g[(a - 1) * 3 + 2] = 1.0;
        at[(m - 1) * a + a - 1] = 1.0;
        (bt, g, at)
    }

    /// The constants are the construction on the documented points, and the 1-D identity
    /// `Σ_j Aᵀ[i][j] G[j][k] Bᵀ[j][r] = [r = i + k]` holds (so `y = Aᵀ[(Gg) ⊙ (Bᵀd)]` is the
    /// correlation of `d` with `g`).
    #[test]
    fn matrices_are_the_toom_cook_construction() {
        for (tile, points) in [
            (WinoTile::F23, vec![0.0, 1.0, -1.0]),
            (WinoTile::F43, vec![0.0, 1.0, -1.0, 2.0, -2.0]),
        ] {
            let (bt, g, at) = derive(&points);
            let close = |a: &[f32], b: &[f64]| {
                a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| (x as f64 - y).abs() < 1e-7)
            };
            assert!(close(tile.bt(), &bt), "{tile:?} Bᵀ");
            assert!(close(tile.g(), &g), "{tile:?} G");
            assert!(close(tile.at(), &at), "{tile:?} Aᵀ");
            let (a, m) = (tile.alpha(), tile.m());
            for i in 0..m {
                for k in 0..3 {
                    for r in 0..a {
                        let s: f64 = (0..a)
                            .map(|j| {
                                tile.at()[i * a + j] as f64
                                    * tile.g()[j * 3 + k] as f64
                                    * tile.bt()[j * a + r] as f64
                            })
                            .sum();
                        let want = if r == i + k { 1.0 } else { 0.0 };
                        assert!((s - want).abs() < 1e-6, "{tile:?} i={i} k={k} r={r}: {s}");
                    }
                }
            }
        }
    }

    /// Tolerance relative to the output's magnitude: F(2, 3) loses little, F(4, 3) more
    /// (its transforms scale values by up to 8 and 1/24), yet both stay far below the
    /// error of a wrong transform (of the order of the values themselves).
    fn tolerance(tile: WinoTile, want: &[f32]) -> f32 {
        let scale = want.iter().fold(1.0f32, |a, &v| a.max(v.abs()));
        match tile {
            WinoTile::F23 => 2e-6 * scale,
            WinoTile::F43 => 2e-5 * scale,
        }
    }

    /// (n, c, m, group, input, pads, bias, act)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        [usize; 2],
        [usize; 4],
        bool,
        Activation,
    );

    fn cases() -> Vec<Case> {
        vec![
            (1, 3, 5, 1, [7, 9], [1, 1, 1, 1], true, Activation::None),
            (1, 17, 3, 1, [7, 9], [0, 0, 0, 0], false, Activation::Relu),
            (1, 4, 6, 1, [1, 1], [1, 1, 1, 1], true, Activation::None),
            (
                2,
                5,
                7,
                1,
                [2, 5],
                [1, 1, 1, 1],
                true,
                Activation::HardSwish,
            ),
            (1, 6, 17, 1, [3, 3], [0, 0, 0, 0], true, Activation::None),
            (2, 6, 4, 2, [9, 7], [1, 0, 2, 1], true, Activation::Relu),
            (
                1,
                34,
                10,
                2,
                [11, 13],
                [0, 2, 1, 0],
                false,
                Activation::None,
            ),
            (
                2,
                17,
                17,
                1,
                [13, 11],
                [2, 2, 2, 2],
                true,
                Activation::Sigmoid,
            ),
            (1, 8, 16, 1, [40, 37], [1, 1, 1, 1], true, Activation::Relu),
            (
                2,
                9,
                33,
                3,
                [23, 29],
                [1, 1, 1, 1],
                true,
                Activation::Clip { min: 0.0, max: 6.0 },
            ),
        ]
    }

    fn check(tile: WinoTile, threads: &[usize], every_build: bool) {
        for (ci, (n, c, m, group, input, pads, bias, act)) in cases().into_iter().enumerate() {
            let win = WindowAttrs {
                pads: Some(pads.to_vec()),
                ..Default::default()
            };
            let dims = ConvDims { n, c, m, group };
            let pr = problem(dims, &win, (&input, &[3, 3]), bias, act, ci as u64 + 700);
            assert!(applies(&pr.sp));
            let tol = tolerance(tile, &pr.want);
            let isa = Isa::detect();
            let packed = transform_weights(tile, &pr.w, m, group, Some(isa)).unwrap();
            let builds: Vec<Isa> = if every_build {
                [Isa::Scalar, Isa::Avx2, Isa::Avx512]
                    .into_iter()
                    .filter(|i| i.supported())
                    .collect()
            } else {
                vec![isa]
            };
            for &threads in threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for (w, wisa) in [(&pr.w, None), (&packed, Some(isa))] {
                    for &simd in &builds {
                        let conv = ConvF32 {
                            x: &pr.x,
                            w,
                            bias: bias.then_some(pr.b.as_slice()),
                            dims,
                            sp: pr.sp,
                            act,
                            residual: None,
                            algo: ConvAlgo::Winograd(tile),
                            packed: wisa,
                        };
                        let mut got = vec![f32::NAN; pr.want.len()];
                        pool.install(|| run_with(&conv, tile, &mut got, simd))
                            .unwrap();
                        let d = max_diff(&got, &pr.want);
                        assert!(
                            d <= tol,
                            "{tile:?} case {ci} threads {threads} packed {wisa:?} \
                             build {simd:?}: diff {d} > {tol}"
                        );
                        // The public entry (through ConvF32::run) agrees.
                        if simd == isa {
                            let mut again = vec![f32::NAN; pr.want.len()];
                            pool.install(|| conv.run(&mut again)).unwrap();
                            assert_eq!(again, got);
                        }
                    }
                }
            }
        }
    }

    /// F(2×2, 3×3) against the reference: odd sizes (7×9, 1×1, 2×5), paddings 0, 1 and
    /// asymmetric, channel counts not multiples of 8, groups, batches, bias and
    /// activations, plain and packed weights, at 1 and 3 threads.
    #[test]
    fn f23_matches_the_reference() {
        check(WinoTile::F23, &[1, 3], false);
    }

    /// F(4×4, 3×3), the same cases.
    #[test]
    fn f43_matches_the_reference() {
        check(WinoTile::F43, &[1, 3], false);
    }

    /// Every build of the transforms (portable, AVX2, AVX-512 where present) gives the
    /// reference's result.
    #[test]
    fn every_transform_build_matches_the_reference() {
        for tile in [WinoTile::F23, WinoTile::F43] {
            check(tile, &[1], true);
        }
    }

    /// The tolerance is tight enough to catch a wrong transform: F(4, 3) with one
    /// transformed weight off by 0.01 fails it.
    #[test]
    fn tolerance_catches_a_perturbed_weight() {
        let win = WindowAttrs {
            pads: Some(vec![1; 4]),
            ..Default::default()
        };
        let dims = ConvDims {
            n: 1,
            c: 8,
            m: 8,
            group: 1,
        };
        let pr = problem(dims, &win, (&[9, 9], &[3, 3]), true, Activation::None, 5);
        let isa = Isa::detect();
        let mut u = transform_weights(WinoTile::F43, &pr.w, 8, 1, Some(isa)).unwrap();
        u[7] += 0.01;
        let conv = ConvF32 {
            x: &pr.x,
            w: &u,
            bias: Some(&pr.b),
            dims,
            sp: pr.sp,
            act: Activation::None,
            residual: None,
            algo: ConvAlgo::Winograd(WinoTile::F43),
            packed: Some(isa),
        };
        let mut got = vec![0.0; pr.want.len()];
        conv.run(&mut got).unwrap();
        assert!(max_diff(&got, &pr.want) > tolerance(WinoTile::F43, &pr.want));
    }

    /// The strided gather on every length (whole chunks, tails, none), with `src` exactly
    /// as long as it needs to be.
    #[test]
    fn gather_strided_takes_every_mt_th_value() {
        for n in 0..50usize {
            let src2: Vec<f32> = (0..(n.max(1) - 1) * 2 + 1).map(|v| v as f32).collect();
            let mut dst = vec![f32::NAN; n];
            gather_strided::<2>(&src2, &mut dst);
            assert!(
                dst.iter().enumerate().all(|(q, &v)| v == (2 * q) as f32),
                "n {n}"
            );
            let src4: Vec<f32> = (0..(n.max(1) - 1) * 4 + 1).map(|v| v as f32).collect();
            let mut dst = vec![f32::NAN; n];
            gather_strided::<4>(&src4, &mut dst);
            assert!(
                dst.iter().enumerate().all(|(q, &v)| v == (4 * q) as f32),
                "n {n}"
            );
        }
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_tiles(100, 10, 1), 16);
        assert_eq!(block_tiles(100, 40, 1), 48);
        assert_eq!(block_tiles(100, 10_000, 1), 512);
        let nb = block_tiles(36 * 512, 10_000, 1);
        assert_eq!(nb, MIN_BLOCK);
        let nb = block_tiles(100, 1000, 2);
        assert!(nb <= 512 && 1000_usize.div_ceil(nb) >= 2 && nb.is_multiple_of(LANES));
        let nb = block_tiles(36 * 200, 5000, 1);
        assert!(nb >= MIN_BLOCK && nb.is_multiple_of(LANES));
    }
}
