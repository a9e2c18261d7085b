//! ConvTranspose whose taps never overlap ((kernel − 1) · dilation < stride in every
//! dimension, e.g. the 2×2 stride-2 upsampling of detection heads): each output element
//! gets at most one product, so there is nothing to scatter-add. The GEMM runs on tiles of
//! input rows small enough for the columns to stay in L2, and each tile's columns are
//! written straight to their output positions with the bias added: no column buffer of the
//! whole image, no zero fill, no read-modify-write. Tiles write disjoint output rows, so
//! they run in parallel. Positions no tap reaches (stride > kernel, pads, output padding)
//! hold the bias, written first.

use rayon::prelude::*;

use kiln_core::Result;

use super::kernel::OutPtr;
use super::transpose::TGeom;
use crate::ops::linalg::blas::{self, MatRef};
use crate::scratch::with_scratch;

/// Column values per tile (the L2-resident product of one tile): 32 Ki f32 = 128 KiB.
const TILE_VALUES: usize = 1 << 15;

/// True when no two taps of the geometry land on one output element.
pub fn non_overlapping(g: &TGeom) -> bool {
    (0..3).all(|d| (g.kernel[d] - 1) * g.dilations[d] < g.strides[d])
}

/// True when every output element is reached by exactly one tap (no bias-only positions):
/// kernel = stride, unit dilation (or a 1-wide kernel), no padding, output = input · stride.
fn covers_output(g: &TGeom) -> bool {
    (0..3).all(|d| {
        g.kernel[d] == g.strides[d]
            && (g.kernel[d] == 1 || g.dilations[d] == 1)
            && g.pad_begin[d] == 0
            && g.output[d] == g.input[d] * g.strides[d]
    })
}

/// Input rows (of the flattened depth × height) per tile for `rows` column rows of
/// `width` values: enough for about [`TILE_VALUES`] column values, at least one.
fn rows_per_tile(rows: usize, width: usize) -> usize {
    (TILE_VALUES / (rows * width).max(1)).max(1)
}

/// The input positions `lo..hi` along dimension `d` whose tap `k` lands inside the output.
fn valid_range(g: &TGeom, d: usize, k: usize) -> (usize, usize) {
    let (s, off) = (
        g.strides[d] as i64,
        (k * g.dilations[d]) as i64 - g.pad_begin[d],
    );
    // o = i·s + off must satisfy 0 ≤ o < output.
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = (g.output[d] as i64 - off + s - 1).div_euclid(s);
    let hi = hi.clamp(0, g.input[d] as i64) as usize;
    (lo.min(hi as i64) as usize, hi)
}

/// `y[n, g·Mg + m] = Σ_c x[n, g·Cg + c] · w[g·Cg + c, m, taps] + b` for a non-overlapping
/// geometry ([`non_overlapping`]); `out` holds `n · m` output planes. Parallel over tiles
/// when `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (n, c, m, group): (usize, usize, usize, usize),
    g: &TGeom,
    out: &mut [f32],
    parallel: bool,
) -> Result<()> {
    debug_assert!(non_overlapping(g));
    let (cg, mg) = (c / group, m / group);
    let pin: usize = g.input.iter().product();
    let pout: usize = g.output.iter().product();
    let ksz: usize = g.kernel.iter().product();
    let rows = mg * ksz;
    let [_, ih_n, iw_n] = g.input;
    let in_rows = g.input[0] * ih_n;
    if out.len() != n * m * pout {
        return Err(kiln_core::KilnError::kernel(
            "ConvTranspose",
            format!("output has {} values, expected {}", out.len(), n * m * pout),
        ));
    }
    if !covers_output(g) {
        let fill = |(plane, o): (usize, &mut [f32])| o.fill(b.map_or(0.0, |b| b[plane % m]));
        if parallel {
            out.par_chunks_mut(pout).enumerate().for_each(fill);
        } else {
            out.chunks_mut(pout).enumerate().for_each(fill);
        }
    }
    let per_tile = rows_per_tile(rows, iw_n);
    let tiles = in_rows.div_ceil(per_tile);
    let jobs = n * group * tiles;
    let dst = OutPtr(out.as_mut_ptr());
    // Per tap: its kernel coordinates and the input ranges it maps inside the output
    // (computed per use, not collected: steady-state inference allocates nothing).
    let tap_of = |tap: usize| -> ([usize; 3], [(usize, usize); 3]) {
        let k = [
            tap / (g.kernel[1] * g.kernel[2]),
            tap / g.kernel[2] % g.kernel[1],
            tap % g.kernel[2],
        ];
        (k, [0, 1, 2].map(|d| valid_range(g, d, k[d])))
    };
    let job = |j: usize| -> Result<()> {
        let (chunk, tile) = (j / tiles, j % tiles);
        let (bn, gi) = (chunk / group, chunk % group);
        let r0 = tile * per_tile;
        let r1 = (r0 + per_tile).min(in_rows);
        let cols = (r1 - r0) * iw_n;
        let xg = &x[(bn * c + gi * cg) * pin..(bn * c + (gi + 1) * cg) * pin];
        let wg = &w[gi * cg * rows..(gi + 1) * cg * rows];
        with_scratch::<f32, _>(rows * cols, |col| {
            blas::gemm(
                rows,
                cols,
                cg,
                col,
                cols,
                false,
                MatRef::transposed(wg, rows),
                MatRef {
                    data: &xg[r0 * iw_n..],
                    rs: pin,
                    cs: 1,
                },
                1.0,
                false,
            )?;
            for mi in 0..mg {
                let om = gi * mg + mi;
                let bias = b.map_or(0.0, |b| b[om]);
                let plane = (bn * m + om) * pout;
                for tap in 0..ksz {
                    let (k, range) = tap_of(tap);
                    let crow = &col[(mi * ksz + tap) * cols..(mi * ksz + tap + 1) * cols];
                    let (w_lo, w_hi) = range[2];
                    let ow0 = (w_lo * g.strides[2] + k[2] * g.dilations[2]) as i64 - g.pad_begin[2];
                    for r in r0..r1 {
                        let (id, ih) = (r / ih_n, r % ih_n);
                        let inside = |d: usize, i: usize| i >= range[d].0 && i < range[d].1;
                        if !inside(0, id) || !inside(1, ih) || w_lo >= w_hi {
                            continue;
                        }
                        let od =
                            (id * g.strides[0] + k[0] * g.dilations[0]) as i64 - g.pad_begin[0];
                        let oh =
                            (ih * g.strides[1] + k[1] * g.dilations[1]) as i64 - g.pad_begin[1];
                        let row_start =
                            plane + (od as usize * g.output[1] + oh as usize) * g.output[2];
                        // SAFETY: the row lies inside `out` (od, oh in range by `valid_range`),
                        // and with non-overlapping taps output row (od, oh) of this plane comes
                        // from input row (id, ih) and tap (kd, kh) alone, which only this tile
                        // and this loop iteration handle: no other live slice overlaps it.
                        let orow = unsafe { dst.slice(row_start, g.output[2]) };
                        let src = &crow[(r - r0) * iw_n + w_lo..(r - r0) * iw_n + w_hi];
                        let s = g.strides[2];
                        for (i, &v) in src.iter().enumerate() {
                            orow[ow0 as usize + i * s] = v + bias;
                        }
                    }
                }
            }
            Ok(())
        })
    };
    if parallel && jobs > 1 {
        (0..jobs).into_par_iter().try_for_each(job)
    } else {
        (0..jobs).try_for_each(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(
        input: [usize; 3],
        kernel: [usize; 3],
        s: [usize; 3],
        d: [usize; 3],
        pb: [i64; 3],
        output: [usize; 3],
    ) -> TGeom {
        TGeom {
            input,
            kernel,
            strides: s,
            dilations: d,
            pad_begin: pb,
            output,
        }
    }

    #[test]
    fn overlap_and_cover_rules() {
        let g = geom(
            [1, 4, 5],
            [1, 2, 2],
            [1, 2, 2],
            [1, 1, 1],
            [0; 3],
            [1, 8, 10],
        );
        assert!(non_overlapping(&g) && covers_output(&g));
        let g = geom(
            [1, 4, 5],
            [1, 3, 3],
            [1, 2, 2],
            [1, 1, 1],
            [0; 3],
            [1, 9, 11],
        );
        assert!(!non_overlapping(&g));
        let g = geom(
            [1, 4, 5],
            [1, 2, 2],
            [1, 4, 4],
            [1, 2, 3],
            [0; 3],
            [1, 16, 20],
        );
        assert!(non_overlapping(&g) && !covers_output(&g));
        let g = geom(
            [1, 4, 5],
            [1, 2, 2],
            [1, 2, 2],
            [1, 1, 1],
            [0, 1, 0],
            [1, 6, 10],
        );
        assert!(non_overlapping(&g) && !covers_output(&g));
    }

    #[test]
    fn valid_range_keeps_outputs_in_bounds() {
        for s in 1..4usize {
            for k in 0..3usize {
                for pb in -2..3i64 {
                    for out in 0..12usize {
                        let g = geom(
                            [1, 1, 5],
                            [1, 1, 3],
                            [1, 1, s],
                            [1, 1, 2],
                            [0, 0, pb],
                            [1, 1, out],
                        );
                        let (lo, hi) = valid_range(&g, 2, k);
                        for i in 0..5 {
                            let o = (i * s + k * 2) as i64 - pb;
                            let inside = o >= 0 && o < out as i64;
                            assert_eq!(inside, i >= lo && i < hi, "s{s} k{k} pb{pb} out{out} i{i}");
                        }
                    }
                }
            }
        }
    }
}
