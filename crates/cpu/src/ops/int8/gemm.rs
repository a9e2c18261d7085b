//! The INT8 matrix product behind INT8 Conv and MatMul: `acc[m][p] = Σ_k w[m][k]·col[k][p]`
//! with i8 operands and i32 sums, in three implementations chosen at run time:
//!
//! - [`Isa::Vnni`]: AVX-512 VNNI `vpdpbusd` (64 multiply-adds per instruction). It
//!   multiplies unsigned by signed bytes, so activations are flipped to `a + 128` on load
//!   and `128·Σ_k w[m][k]` is subtracted at the end (exact: no saturation anywhere).
//! - [`Isa::Avx2`]: `vpmaddubsw` on `|w|` and `sign(a, w)` (products stay `w·a`; the pair
//!   sums are at most 2·127·127, so nothing saturates), then `vpmaddwd` into i32.
//! - [`Isa::Scalar`]: plain loops, the reference the others are tested against.
//!
//! Every operand must lie in `[-127, 127]` (symmetric quantization never makes -128).
//!
//! Layouts: weights are packed row-major `[m][kp]` with `kp = k` rounded up to 4 (zero
//! padded, [`PackedWeights`]); the column tile is `[kp/4][pp][4]` — four consecutive `k` of
//! one column side by side — with `pp` a multiple of [`COL_ALIGN`] (zero padded).

/// Columns of a tile are padded to a multiple of this.
pub const COL_ALIGN: usize = 16;

/// The instruction set an INT8 kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable loops.
    Scalar,
    /// AVX2 (`vpmaddubsw` + `vpmaddwd`).
    Avx2,
    /// AVX-512 VNNI (`vpdpbusd`; needs AVX-512 F and BW too).
    Vnni,
}

impl Isa {
    /// All implementations, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Vnni, Isa::Avx2, Isa::Scalar];

    /// Name used in tactic ids.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Vnni => "vnni",
        }
    }

    /// Parses [`Isa::name`].
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU can run it (runtime detection).
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest implementation this CPU has.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }
}

/// Weights packed for [`gemm`]: `[m][kp]`, zero padded, with each row's sum.
#[derive(Debug, Clone, Default)]
pub struct PackedWeights {
    /// Rows.
    pub m: usize,
    /// Reduction length rounded up to a multiple of 4.
    pub kp: usize,
    /// `m × kp` values.
    pub data: Vec<i8>,
    /// `Σ_k w[r][k]` per row.
    pub sums: Vec<i32>,
}

impl PackedWeights {
    /// Packs `w` (`m × k` row-major).
    pub fn pack(w: &[i8], m: usize, k: usize) -> PackedWeights {
        let kp = k.div_ceil(4) * 4;
        let mut data = vec![0i8; m * kp];
        let mut sums = vec![0i32; m];
        for r in 0..m {
            let src = &w[r * k..(r + 1) * k];
            data[r * kp..r * kp + k].copy_from_slice(src);
            sums[r] = src.iter().map(|&v| v as i32).sum();
        }
        PackedWeights { m, kp, data, sums }
    }
}

/// Index of `(k, p)` in a column tile of `pp` columns.
#[inline(always)]
pub fn col_index(k: usize, p: usize, pp: usize) -> usize {
    ((k >> 2) * pp + p) * 4 + (k & 3)
}

/// `acc[r][p] = Σ_k w[r][k]·col[k][p]` for all `w.m` rows and `pp` columns.
///
/// `col` holds `kp/4 × pp × 4` values, `acc` at least `w.m × pp`; `pp` must be a multiple
/// of [`COL_ALIGN`]. An `isa` this CPU lacks runs the scalar loops.
pub fn gemm(isa: Isa, w: &PackedWeights, col: &[i8], pp: usize, acc: &mut [i32]) {
    assert!(
        pp.is_multiple_of(COL_ALIGN),
        "column tile width {pp} is not padded"
    );
    assert!(col.len() >= w.kp * pp && acc.len() >= w.m * pp);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni if isa.available() => {
            // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked just above) and the slice
            // lengths were checked against m, kp and pp.
            unsafe { x86::gemm_vnni(w, col, pp, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => {
            // SAFETY: the CPU has AVX2 (checked just above); lengths checked as for VNNI.
            unsafe { x86::gemm_avx2(w, col, pp, acc) }
        }
        _ => gemm_scalar(w, col, pp, acc),
    }
}

fn gemm_scalar(w: &PackedWeights, col: &[i8], pp: usize, acc: &mut [i32]) {
    let kp = w.kp;
    for r in 0..w.m {
        let wr = &w.data[r * kp..(r + 1) * kp];
        let out = &mut acc[r * pp..(r + 1) * pp];
        out.fill(0);
        for k4 in 0..kp / 4 {
            let ws = &wr[k4 * 4..k4 * 4 + 4];
            let cs = &col[k4 * pp * 4..(k4 + 1) * pp * 4];
            for (p, o) in out.iter_mut().enumerate() {
                let c = &cs[p * 4..p * 4 + 4];
                *o += (0..4).map(|j| ws[j] as i32 * c[j] as i32).sum::<i32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::PackedWeights;

    #[inline(always)]
    unsafe fn w4(w: &PackedWeights, r: usize, k4: usize) -> i32 {
        // SAFETY (caller): r < m and k4 < kp/4, so the 4 bytes are inside `data`.
        unsafe {
            w.data
                .as_ptr()
                .add(r * w.kp + k4 * 4)
                .cast::<i32>()
                .read_unaligned()
        }
    }

    /// One MR rows × NV·16 columns block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block_vnni<const MR: usize, const NV: usize>(
        w: &PackedWeights,
        r0: usize,
        col: &[i8],
        pp: usize,
        p0: usize,
        acc: &mut [i32],
    ) {
        let flip = _mm512_set1_epi8(-128);
        let mut s = [[_mm512_setzero_si512(); NV]; MR];
        let cp = col.as_ptr();
        for k4 in 0..w.kp / 4 {
            let mut a = [_mm512_setzero_si512(); NV];
            for (v, av) in a.iter_mut().enumerate() {
                // SAFETY: (k4·pp + p0 + 16v + 16)·4 ≤ kp·pp ≤ col.len().
                let x = unsafe { _mm512_loadu_si512(cp.add((k4 * pp + p0 + v * 16) * 4).cast()) };
                *av = _mm512_xor_si512(x, flip);
            }
            for (r, sr) in s.iter_mut().enumerate() {
                // SAFETY: r0 + r < m, k4 < kp/4.
                let b = _mm512_set1_epi32(unsafe { w4(w, r0 + r, k4) });
                for v in 0..NV {
                    sr[v] = _mm512_dpbusd_epi32(sr[v], a[v], b);
                }
            }
        }
        for (r, sr) in s.iter().enumerate() {
            let fix = _mm512_set1_epi32(128 * w.sums[r0 + r]);
            for (v, &sv) in sr.iter().enumerate() {
                let o = _mm512_sub_epi32(sv, fix);
                // SAFETY: (r0 + r)·pp + p0 + 16v + 16 ≤ m·pp ≤ acc.len().
                unsafe {
                    _mm512_storeu_si512(acc.as_mut_ptr().add((r0 + r) * pp + p0 + v * 16).cast(), o)
                };
            }
        }
    }

    /// SAFETY: the CPU must have AVX-512 F/BW/VNNI; `col.len() ≥ kp·pp`,
    /// `acc.len() ≥ m·pp`, `pp % 16 == 0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn gemm_vnni(w: &PackedWeights, col: &[i8], pp: usize, acc: &mut [i32]) {
        let mut r = 0;
        while r < w.m {
            let four = w.m - r >= 4;
            let mut p = 0;
            while p < pp {
                let wide = pp - p >= 64;
                // SAFETY: blocks stay inside m rows and pp columns (guarded above).
                unsafe {
                    match (four, wide) {
                        (true, true) => block_vnni::<4, 4>(w, r, col, pp, p, acc),
                        (true, false) => block_vnni::<4, 1>(w, r, col, pp, p, acc),
                        (false, true) => block_vnni::<1, 4>(w, r, col, pp, p, acc),
                        (false, false) => block_vnni::<1, 1>(w, r, col, pp, p, acc),
                    }
                }
                p += if wide { 64 } else { 16 };
            }
            r += if four { 4 } else { 1 };
        }
    }

    /// One MR rows × NV·8 columns block.
    #[target_feature(enable = "avx2")]
    unsafe fn block_avx2<const MR: usize, const NV: usize>(
        w: &PackedWeights,
        r0: usize,
        col: &[i8],
        pp: usize,
        p0: usize,
        acc: &mut [i32],
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut s = [[_mm256_setzero_si256(); NV]; MR];
        let cp = col.as_ptr();
        for k4 in 0..w.kp / 4 {
            let mut a = [_mm256_setzero_si256(); NV];
            for (v, av) in a.iter_mut().enumerate() {
                // SAFETY: (k4·pp + p0 + 8v + 8)·4 ≤ kp·pp ≤ col.len().
                *av = unsafe { _mm256_loadu_si256(cp.add((k4 * pp + p0 + v * 8) * 4).cast()) };
            }
            for (r, sr) in s.iter_mut().enumerate() {
                // SAFETY: r0 + r < m, k4 < kp/4.
                let b = _mm256_set1_epi32(unsafe { w4(w, r0 + r, k4) });
                let ub = _mm256_abs_epi8(b);
                for v in 0..NV {
                    let sa = _mm256_sign_epi8(a[v], b);
                    let p16 = _mm256_maddubs_epi16(ub, sa);
                    sr[v] = _mm256_add_epi32(sr[v], _mm256_madd_epi16(p16, ones));
                }
            }
        }
        for (r, sr) in s.iter().enumerate() {
            for (v, &sv) in sr.iter().enumerate() {
                // SAFETY: (r0 + r)·pp + p0 + 8v + 8 ≤ m·pp ≤ acc.len().
                unsafe {
                    _mm256_storeu_si256(acc.as_mut_ptr().add((r0 + r) * pp + p0 + v * 8).cast(), sv)
                };
            }
        }
    }

    /// SAFETY: the CPU must have AVX2; `col.len() ≥ kp·pp`, `acc.len() ≥ m·pp`,
    /// `pp % 16 == 0`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm_avx2(w: &PackedWeights, col: &[i8], pp: usize, acc: &mut [i32]) {
        let mut r = 0;
        while r < w.m {
            let four = w.m - r >= 4;
            let mut p = 0;
            while p < pp {
                // SAFETY: blocks stay inside m rows and pp columns (pp % 16 == 0).
                unsafe {
                    if four {
                        block_avx2::<4, 2>(w, r, col, pp, p, acc)
                    } else {
                        block_avx2::<1, 2>(w, r, col, pp, p, acc)
                    }
                }
                p += 16;
            }
            r += if four { 4 } else { 1 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn i8(&mut self) -> i8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (((self.0 >> 33) % 255) as i32 - 127) as i8
        }
    }

    /// Plain triple loop on unpacked operands.
    fn reference(w: &[i8], col: &[i8], m: usize, k: usize, p: usize) -> Vec<i32> {
        let mut out = vec![0; m * p];
        for r in 0..m {
            for c in 0..p {
                out[r * p + c] = (0..k)
                    .map(|j| w[r * k + j] as i32 * col[j * p + c] as i32)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn every_isa_matches_the_reference() {
        let mut rng = Rng(0x1234_5678);
        for &(m, k, p) in &[
            (1, 1, 1),
            (3, 5, 7),
            (4, 4, 16),
            (5, 37, 70),
            (9, 130, 33),
            (16, 288, 100),
            (7, 9, 130),
        ] {
            let w: Vec<i8> = (0..m * k).map(|_| rng.i8()).collect();
            let mut col_plain: Vec<i8> = (0..k * p).map(|_| rng.i8()).collect();
            // Extremes on purpose: ±127 everywhere in one column (saturation check).
            for j in 0..k {
                col_plain[j * p] = if j % 2 == 0 { 127 } else { -127 };
            }
            let want = reference(&w, &col_plain, m, k, p);
            let packed = PackedWeights::pack(&w, m, k);
            let pp = p.div_ceil(COL_ALIGN) * COL_ALIGN;
            let mut col = vec![0i8; packed.kp * pp];
            for j in 0..k {
                for c in 0..p {
                    col[col_index(j, c, pp)] = col_plain[j * p + c];
                }
            }
            assert!(want.iter().any(|&v| v != 0));
            for isa in Isa::ALL {
                if !isa.available() {
                    eprintln!("skipping {isa:?}: not on this CPU");
                    continue;
                }
                let mut acc = vec![-1i32; m * pp];
                gemm(isa, &packed, &col, pp, &mut acc);
                for r in 0..m {
                    assert_eq!(
                        &acc[r * pp..r * pp + p],
                        &want[r * p..(r + 1) * p],
                        "{isa:?} m={m} k={k} p={p} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        // All ±127: the AVX2 pair sums reach 2·127·127 and VNNI's flip reaches 255.
        let (m, k, p) = (4, 64, 16);
        for (wv, cv) in [(127i8, 127i8), (-127, 127), (-127, -127), (127, -127)] {
            let w = vec![wv; m * k];
            let packed = PackedWeights::pack(&w, m, k);
            let col = vec![cv; packed.kp * p];
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let mut acc = vec![0; m * p];
                gemm(isa, &packed, &col, p, &mut acc);
                let want = k as i32 * wv as i32 * cv as i32;
                assert!(
                    acc.iter().all(|&v| v == want),
                    "{isa:?} {wv}×{cv}: {} vs {want}",
                    acc[0]
                );
            }
        }
    }

    #[test]
    fn names_parse_back() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("neon"), None);
        assert!(Isa::best().available());
    }
}
