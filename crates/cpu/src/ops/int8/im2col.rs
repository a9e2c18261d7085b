//! im2col for the INT8 convolution: columns `p0..p0 + tw` of one image × group written
//! into the i8 GEMM's interleaved tile layout (`[kp/4][pp][4]`, four consecutive `k` of a
//! column side by side, see [`super::gemm`]).
//!
//! Each reduction row `k` = (channel, kernel offset) is first gathered into a contiguous
//! row of `tw` bytes (whole runs of valid input copied at once, padding filled around
//! them), then four such rows are interleaved into the tile (SSE2 byte and word unpacks,
//! 16 columns a step). Everything that depends only on the tile, not on the row, is worked
//! out once per tile: the output rows the columns cover ([`Segments`]) and, per kernel
//! column offset, the output columns whose tap lands inside the input. The per-row work is
//! then copies and fills; with divisions per row and a byte-by-byte interleave this took
//! ~3× the GEMM it feeds on convolutions of few output channels (PP-OCR det's 96 → 24).

use crate::ops::conv::geom::Spatial3;

/// Largest tile width (columns) [`im2col`] accepts.
pub const MAX_TW: usize = 256;

/// Kernel column offsets whose valid output range is cached per tile; wider kernels
/// compute it per row.
const CACHED_KW: usize = 16;

/// One run of tile columns inside one output row: columns `t..t + len` are output
/// positions `(od, oh, ow0..ow0 + len)`.
#[derive(Clone, Copy)]
struct Segment {
    t: usize,
    len: usize,
    ow0: usize,
    oh: usize,
    od: usize,
}

/// The output rows that columns `p0..p0 + tw` cover: the first position is divided out
/// once per tile, the runs are then stepped through without divisions.
struct Segments {
    first: Segment,
    tw: usize,
    oh_n: usize,
    ow_n: usize,
}

impl Segments {
    fn new(sp: &Spatial3, p0: usize, tw: usize) -> Segments {
        let [_, oh_n, ow_n] = sp.output;
        let ow0 = p0 % ow_n;
        let r = p0 / ow_n;
        let first = Segment {
            t: 0,
            len: (ow_n - ow0).min(tw),
            ow0,
            oh: r % oh_n,
            od: r / oh_n,
        };
        Segments {
            first,
            tw,
            oh_n,
            ow_n,
        }
    }

    /// The runs in column order.
    fn iter(&self) -> impl Iterator<Item = Segment> + '_ {
        std::iter::successors(Some(self.first), move |s| {
            let t = s.t + s.len;
            (t < self.tw).then(|| {
                let (oh, od) = if s.oh + 1 == self.oh_n {
                    (0, s.od + 1)
                } else {
                    (s.oh + 1, s.od)
                };
                Segment {
                    t,
                    len: self.ow_n.min(self.tw - t),
                    ow0: 0,
                    oh,
                    od,
                }
            })
        })
    }
}

/// Fills `row[..tw]` with reduction row (channel plane `xc`, kernel offset `kd, kh, kw`)
/// for the tile's columns `segs`: input values `^ flip`, `pad` where the tap lands in the
/// padding. `(ow_lo, ow_hi)`: the output columns whose tap `kw` lands inside the input.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fill_row(
    xc: &[i8],
    sp: &Spatial3,
    (kd, kh, kw): (usize, usize, usize),
    (ow_lo, ow_hi): (usize, usize),
    segs: &Segments,
    flip: i8,
    pad: i8,
    row: &mut [i8],
) {
    let [_, ih_n, iw_n] = sp.input;
    let (sw, dw, pw) = (sp.strides[2], sp.dilations[2], sp.pad_begin[2]);
    for seg in segs.iter() {
        let dst = &mut row[seg.t..seg.t + seg.len];
        match (sp.in_coord(0, seg.od, kd), sp.in_coord(1, seg.oh, kh)) {
            (Some(id), Some(ih)) if ow_lo < ow_hi => {
                let xrow = &xc[(id * ih_n + ih) * iw_n..(id * ih_n + ih + 1) * iw_n];
                // Positions ow0..ow0 + len, of which ow_lo..ow_hi are inside.
                let ow0 = seg.ow0;
                let a = ow_lo.clamp(ow0, ow0 + seg.len) - ow0;
                let b = ow_hi.clamp(ow0, ow0 + seg.len) - ow0;
                dst[..a].fill(pad);
                dst[b..].fill(pad);
                if a < b {
                    let start = (ow0 + a) * sw + kw * dw - pw;
                    let inner = &mut dst[a..b];
                    if sw == 1 {
                        let src = &xrow[start..start + inner.len()];
                        for (d, &s) in inner.iter_mut().zip(src) {
                            *d = s ^ flip;
                        }
                    } else {
                        for (j, d) in inner.iter_mut().enumerate() {
                            *d = xrow[start + j * sw] ^ flip;
                        }
                    }
                }
            }
            _ => dst.fill(pad),
        }
    }
}

/// Interleaves four rows of `tw` bytes into `dst[t·4 + j] = rows[j][t]`, and pads columns
/// `tw..pp` with `pad`.
#[inline(always)]
fn interleave4(rows: &[[i8; MAX_TW]; 4], tw: usize, pp: usize, pad: i8, dst: &mut [i8]) {
    let dst = &mut dst[..pp * 4];
    let (head, tail) = dst.split_at_mut(tw * 4);
    let done = interleave4_simd(rows, head);
    for (t, d) in head.chunks_exact_mut(4).enumerate().skip(done) {
        for (j, v) in d.iter_mut().enumerate() {
            *v = rows[j][t];
        }
    }
    tail.fill(pad);
}

/// The first `16·⌊cols/16⌋` columns of [`interleave4`] (`cols = head.len() / 4`) with SSE2
/// unpacks: bytes of rows 0|1 and 2|3 paired, then the pairs paired. Returns the columns
/// written.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn interleave4_simd(rows: &[[i8; MAX_TW]; 4], head: &mut [i8]) -> usize {
    use std::arch::x86_64::*;
    let blocks = head.len() / 64;
    for b in 0..blocks {
        // SAFETY: SSE2 is part of x86-64. Reads rows[j][16b..16b + 16], inside the rows
        // since 16(b + 1) ≤ cols ≤ MAX_TW; writes head[64b..64b + 64], inside `head`
        // (64(b + 1) ≤ head.len()). Unaligned loads and stores.
        unsafe {
            let ld = |j: usize| _mm_loadu_si128(rows[j].as_ptr().add(16 * b) as *const __m128i);
            let (r0, r1, r2, r3) = (ld(0), ld(1), ld(2), ld(3));
            let (lo01, hi01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (lo23, hi23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let out = head.as_mut_ptr().add(64 * b) as *mut __m128i;
            _mm_storeu_si128(out, _mm_unpacklo_epi16(lo01, lo23));
            _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(lo01, lo23));
            _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(hi01, hi23));
            _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(hi01, hi23));
        }
    }
    blocks * 16
}

/// Other targets: no columns here, [`interleave4`]'s loop does them all.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn interleave4_simd(_rows: &[[i8; MAX_TW]; 4], _head: &mut [i8]) -> usize {
    0
}

/// The whole tile (see the module docs): `col[..kp·pp]` for columns `p0..p0 + tw` (`tw ≤
/// pp`, `tw ≤` [`MAX_TW`]) of the `cg` channel planes in `xg`; rows `k ≥ cg·kernel`
/// (up to `kp`) and columns `tw..pp` hold `pad`.
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    xg: &[i8],
    cg: usize,
    sp: &Spatial3,
    p0: usize,
    tw: usize,
    pp: usize,
    kp: usize,
    col: &mut [i8],
    (flip, pad): (i8, i8),
) {
    assert!(tw <= MAX_TW && tw <= pp && col.len() >= kp * pp);
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::linalg::sgemm::Isa;
        match Isa::detect() {
            // SAFETY: the CPU has these features (run-time detection).
            Isa::Avx512 => {
                return unsafe { im2col_avx512(xg, cg, sp, p0, tw, pp, kp, col, (flip, pad)) }
            }
            // SAFETY: as above.
            Isa::Avx2 => {
                return unsafe { im2col_avx2(xg, cg, sp, p0, tw, pp, kp, col, (flip, pad)) }
            }
            _ => {}
        }
    }
    im2col_body(xg, cg, sp, p0, tw, pp, kp, col, (flip, pad))
}

/// [`im2col_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_avx512(
    xg: &[i8],
    cg: usize,
    sp: &Spatial3,
    p0: usize,
    tw: usize,
    pp: usize,
    kp: usize,
    col: &mut [i8],
    fp: (i8, i8),
) {
    im2col_body(xg, cg, sp, p0, tw, pp, kp, col, fp)
}

/// [`im2col_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_avx2(
    xg: &[i8],
    cg: usize,
    sp: &Spatial3,
    p0: usize,
    tw: usize,
    pp: usize,
    kp: usize,
    col: &mut [i8],
    fp: (i8, i8),
) {
    im2col_body(xg, cg, sp, p0, tw, pp, kp, col, fp)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn im2col_body(
    xg: &[i8],
    cg: usize,
    sp: &Spatial3,
    p0: usize,
    tw: usize,
    pp: usize,
    kp: usize,
    col: &mut [i8],
    (flip, pad): (i8, i8),
) {
    let [kd_n, kh_n, kw_n] = sp.kernel;
    let k_real = cg * kd_n * kh_n * kw_n;
    let isz = sp.in_size();
    let segs = Segments::new(sp, p0, tw);
    let mut kw_ranges = [(0usize, 0usize); CACHED_KW];
    for (kw, r) in kw_ranges.iter_mut().enumerate().take(kw_n) {
        *r = sp.valid_range(2, kw);
    }
    let mut rows = [[pad; MAX_TW]; 4];
    // Row k's (channel, kd, kh, kw), advanced one step per row (no divisions per row).
    let (mut c, mut kd, mut kh, mut kw) = (0, 0, 0, 0);
    for q in 0..kp / 4 {
        for (j, row) in rows.iter_mut().enumerate() {
            if q * 4 + j >= k_real {
                // Past the reduction: the packed weights are 0 there; any value works.
                row[..tw].fill(pad);
                continue;
            }
            let range = if kw < CACHED_KW {
                kw_ranges[kw]
            } else {
                sp.valid_range(2, kw)
            };
            let xc = &xg[c * isz..(c + 1) * isz];
            fill_row(xc, sp, (kd, kh, kw), range, &segs, flip, pad, &mut row[..]);
            kw += 1;
            if kw == kw_n {
                kw = 0;
                kh += 1;
                if kh == kh_n {
                    kh = 0;
                    kd += 1;
                    if kd == kd_n {
                        kd = 0;
                        c += 1;
                    }
                }
            }
        }
        interleave4(&rows, tw, pp, pad, &mut col[q * pp * 4..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::geom::{AutoPad, Spatial, WindowAttrs};
    use crate::ops::int8::gemm::col_index;

    /// The plain definition: every (k, column) by its coordinates.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        xg: &[i8],
        cg: usize,
        sp: &Spatial3,
        p0: usize,
        tw: usize,
        pp: usize,
        kp: usize,
        (flip, pad): (i8, i8),
    ) -> Vec<i8> {
        let mut col = vec![pad; kp * pp];
        let [kd_n, kh_n, kw_n] = sp.kernel;
        let [_, ih_n, iw_n] = sp.input;
        let [_, oh_n, ow_n] = sp.output;
        let isz = sp.in_size();
        let mut k = 0;
        for c in 0..cg {
            for kd in 0..kd_n {
                for kh in 0..kh_n {
                    for kw in 0..kw_n {
                        for t in 0..tw {
                            let p = p0 + t;
                            let (ow, r) = (p % ow_n, p / ow_n);
                            let (oh, od) = (r % oh_n, r / oh_n);
                            if let (Some(id), Some(ih), Some(iw)) = (
                                sp.in_coord(0, od, kd),
                                sp.in_coord(1, oh, kh),
                                sp.in_coord(2, ow, kw),
                            ) {
                                col[col_index(k, t, pp)] =
                                    xg[c * isz + (id * ih_n + ih) * iw_n + iw] ^ flip;
                            }
                        }
                        k += 1;
                    }
                }
            }
        }
        col
    }

    fn geometry(
        input: &[usize],
        kernel: &[usize],
        strides: &[usize],
        dil: &[usize],
        pads: &[usize],
    ) -> Spatial3 {
        let win = WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: Some(kernel.to_vec()),
            strides: Some(strides.to_vec()),
            dilations: Some(dil.to_vec()),
            pads: Some(pads.to_vec()),
            ceil_mode: false,
        };
        let s: Spatial = win.resolve("test", input, kernel).unwrap();
        s.to3("test").unwrap()
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn matches_the_naive_layout() {
        let mut seed = 0x1234_5678_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as i8
        };
        // (input, kernel, strides, dilations, pads (begin..., end...), channels)
        let cases: &[(&[usize], &[usize], &[usize], &[usize], &[usize], usize)] = &[
            (&[13, 17], &[3, 3], &[1, 1], &[1, 1], &[1, 1, 1, 1], 5),
            (&[13, 17], &[3, 3], &[2, 2], &[1, 1], &[1, 0, 0, 1], 3),
            (&[9, 31], &[1, 1], &[1, 1], &[1, 1], &[0, 0, 0, 0], 7),
            (&[9, 31], &[3, 5], &[1, 3], &[2, 1], &[2, 2, 1, 3], 2),
            (&[40], &[3], &[1], &[1], &[1, 1], 6),
            (
                &[5, 6, 7],
                &[3, 3, 3],
                &[1, 2, 1],
                &[1, 1, 1],
                &[1, 1, 1, 1, 1, 1],
                2,
            ),
            (&[2, 2], &[3, 3], &[1, 1], &[1, 1], &[2, 2, 2, 2], 3),
        ];
        for &(input, kernel, strides, dil, pads, cg) in cases {
            let sp = geometry(input, kernel, strides, dil, pads);
            let isz = sp.in_size();
            let xg: Vec<i8> = (0..cg * isz).map(|_| next()).collect();
            let k = cg * kernel.iter().product::<usize>();
            let kp = k.div_ceil(4) * 4;
            let p_n = sp.out_size();
            for tile in [1usize, 16, 128, 256] {
                let mut p0 = 0;
                while p0 < p_n {
                    let tw = tile.min(p_n - p0);
                    let pp = tw.div_ceil(16) * 16;
                    for fp in [(0i8, 0i8), (i8::MIN, 37)] {
                        let want = naive(&xg, cg, &sp, p0, tw, pp, kp, fp);
                        let mut got = vec![99i8; kp * pp + 8];
                        im2col(&xg, cg, &sp, p0, tw, pp, kp, &mut got, fp);
                        assert_eq!(
                            &got[..kp * pp],
                            &want[..],
                            "{input:?} {kernel:?} s{strides:?} tile {tile} p0 {p0}"
                        );
                        assert!(
                            got[kp * pp..].iter().all(|&v| v == 99),
                            "wrote past the tile"
                        );
                        im2col_body(&xg, cg, &sp, p0, tw, pp, kp, &mut got, fp);
                        assert_eq!(&got[..kp * pp], &want[..], "portable build");
                    }
                    p0 += tw;
                }
            }
        }
    }
}
