//! Fast kernels for ONNX QuantizeLinear / DequantizeLinear between f32 and u8/i8, with
//! one scale and zero point per tensor or per index of an axis (the forms Q/DQ models such
//! as ONNX Runtime's `quantize_static` output use):
//!
//! - quantize: `q = clamp(round_half_even(x / scale) + zp, lo, hi)` (`x / scale` divided
//!   in f32, as the reference op does; NaN → 0 as the reference op's cast gives);
//! - dequantize: `x = (q − zp) as f32 · scale`.
//!
//! Both are bit-identical to the reference ops of [`crate::ops::quantize`] (which compute
//! through f64): the division and the product are single IEEE f32 operations either way,
//! and clamping `x / scale` to `[lo − zp, hi − zp]` (integers) before rounding gives the
//! same integer as rounding first. Three implementations, chosen at run time
//! ([`Isa::detect`]): AVX-512F (16 values a step), AVX2 (32 a step for quantize, 8 for
//! dequantize) and scalar (also every SIMD loop's tail). Large tensors are split over the
//! thread pool in chunks of [`CHUNK`] values.

use crate::ops::linalg::sgemm::Isa;

/// Values per parallel chunk.
pub const CHUNK: usize = 1 << 15;

/// The integer types the fast kernels produce and read.
pub trait Code: Copy + Send + Sync + 'static {
    /// Smallest value of the type.
    const LO: i32;
    /// Largest value of the type.
    const HI: i32;
    /// Sign-extends (i8) or zero-extends (u8).
    fn widen(self) -> i32;
    /// The value's byte.
    fn to_byte(self) -> u8;
    /// The value with this byte.
    fn of_byte(b: u8) -> Self;
}

impl Code for u8 {
    const LO: i32 = 0;
    const HI: i32 = 255;
    fn widen(self) -> i32 {
        self as i32
    }
    fn to_byte(self) -> u8 {
        self
    }
    fn of_byte(b: u8) -> Self {
        b
    }
}

impl Code for i8 {
    const LO: i32 = -128;
    const HI: i32 = 127;
    fn widen(self) -> i32 {
        self as i32
    }
    fn to_byte(self) -> u8 {
        self as u8
    }
    fn of_byte(b: u8) -> Self {
        b as i8
    }
}

/// One value: `clamp(round_half_even(x / scale) + zp, lo, hi)`, NaN → 0.
#[inline(always)]
fn quantize_one(x: f32, scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    let d = x / scale;
    if d.is_nan() {
        return 0;
    }
    d.clamp((lo - zp) as f32, (hi - zp) as f32)
        .round_ties_even() as i32
        + zp
}

/// Quantizes `src` into `dst` (same length) with one scale and zero point per run of
/// `inner` values: run `r` uses `scales[r % c]` and `zps[r % c]` (`c = scales.len()`;
/// `zps` empty for zero points 0). Per tensor: one scale, `inner` = the length. `inner`
/// divides the length; `zps` is empty or as long as `scales` (a missing zero point is 0);
/// with no scales nothing is written.
pub fn quantize<T: Code>(src: &[f32], scales: &[f32], zps: &[T], inner: usize, dst: &mut [T]) {
    let isa = Isa::detect();
    for_each_run(dst, src, inner, scales.len(), |k, d, s| {
        let zp = zps.get(k).copied().unwrap_or(T::of_byte(0));
        quantize_run(isa, s, scales[k], zp, d)
    });
}

/// Dequantizes `src` into `dst` (the layout of [`quantize`]).
pub fn dequantize<T: Code>(src: &[T], scales: &[f32], zps: &[T], inner: usize, dst: &mut [f32]) {
    let isa = Isa::detect();
    for_each_run(dst, src, inner, scales.len(), |k, d, s| {
        let zp = zps.get(k).copied().unwrap_or(T::of_byte(0));
        dequantize_run(isa, s, scales[k], zp, d)
    });
}

/// Calls `f(channel, dst part, src part)` over runs of `inner` values (channel = run
/// index mod `c`), split over the pool in tasks of about [`CHUNK`] values: whole runs
/// grouped, or with one channel any chunks of the tensor.
fn for_each_run<D: Send, S: Sync>(
    dst: &mut [D],
    src: &[S],
    inner: usize,
    c: usize,
    f: impl Fn(usize, &mut [D], &[S]) + Sync + Send,
) {
    if c == 0 {
        // No scales: nothing to quantize with (callers pass at least one).
        return;
    }
    if c == 1 {
        return crate::parallel::for_each_chunk_pair(dst, src, CHUNK, |d, s| f(0, d, s));
    }
    let inner = inner.max(1);
    let per_task = (CHUNK / inner).max(1);
    crate::parallel::for_each_chunk_pair_indexed(dst, src, per_task * inner, |t, d, s| {
        for (j, (d, s)) in d.chunks_mut(inner).zip(s.chunks(inner)).enumerate() {
            f((t * per_task + j) % c, d, s);
        }
    });
}

/// One contiguous run with one scale and zero point, with the given implementation
/// (`isa` must be supported by this CPU; [`Isa::supported`]).
pub fn quantize_run<T: Code>(isa: Isa, src: &[f32], scale: f32, zp: T, dst: &mut [T]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    let zp = zp.widen();
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => {
            // SAFETY: AVX-512F is present (checked); `dst` holds `src.len()` one-byte codes
            // (`T` is u8 or i8, so its pointer is a byte pointer).
            unsafe {
                x86::quantize_avx512(src, scale, zp, T::LO, T::HI, dst.as_mut_ptr() as *mut u8)
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => {
            // SAFETY: AVX2 is present (checked); `dst` as above.
            unsafe { x86::quantize_avx2(src, scale, zp, T::LO, T::HI, dst.as_mut_ptr() as *mut u8) }
        }
        _ => 0,
    };
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = T::of_byte(quantize_one(x, scale, zp, T::LO, T::HI) as u8);
    }
}

/// One contiguous run of dequantization (see [`quantize_run`]).
pub fn dequantize_run<T: Code>(isa: Isa, src: &[T], scale: f32, zp: T, dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    let zp = zp.widen();
    let signed = T::LO < 0;
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => {
            // SAFETY: AVX-512F is present (checked); `src` holds `dst.len()` one-byte codes.
            unsafe { x86::dequantize_avx512(src.as_ptr() as *const u8, signed, scale, zp, dst) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => {
            // SAFETY: AVX2 is present (checked); `src` as above.
            unsafe { x86::dequantize_avx2(src.as_ptr() as *const u8, signed, scale, zp, dst) }
        }
        _ => 0,
    };
    for (d, &q) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = (q.widen() - zp) as f32 * scale;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512F quantization of the first `16·⌊n/16⌋` values; returns how many it did.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `dst` is valid for `src.len()` bytes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_avx512(
        src: &[f32],
        scale: f32,
        zp: i32,
        lo: i32,
        hi: i32,
        dst: *mut u8,
    ) -> usize {
        let n = src.len() / 16 * 16;
        let vs = _mm512_set1_ps(scale);
        let vlo = _mm512_set1_ps((lo - zp) as f32);
        let vhi = _mm512_set1_ps((hi - zp) as f32);
        let vzp = _mm512_set1_epi32(zp);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 16 ≤ n ≤ src.len(), and dst holds src.len() bytes.
            unsafe {
                let d = _mm512_div_ps(_mm512_loadu_ps(src.as_ptr().add(i)), vs);
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(d, d);
                let c = _mm512_min_ps(_mm512_max_ps(d, vlo), vhi);
                let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    c,
                );
                // NaN lanes → 0; the others are in [lo, hi], so their low byte is the code.
                let r = _mm512_maskz_add_epi32(ordered, r, vzp);
                _mm_storeu_si128(dst.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(r));
            }
            i += 16;
        }
        n
    }

    /// AVX2 quantization of the first `32·⌊n/32⌋` values; returns how many it did.
    ///
    /// # Safety
    /// The CPU supports AVX2; `dst` is valid for `src.len()` bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_avx2(
        src: &[f32],
        scale: f32,
        zp: i32,
        lo: i32,
        hi: i32,
        dst: *mut u8,
    ) -> usize {
        let n = src.len() / 32 * 32;
        let vs = _mm256_set1_ps(scale);
        let vlo = _mm256_set1_ps((lo - zp) as f32);
        let vhi = _mm256_set1_ps((hi - zp) as f32);
        let vzp = _mm256_set1_epi32(zp);
        let low_byte = _mm256_set1_epi16(0xff);
        // packs/packus work per 128-bit lane: this puts the four 8-value groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 32 ≤ n ≤ src.len(), and dst holds src.len() bytes.
            unsafe {
                let p = src.as_ptr().add(i);
                let r0 = quantize8_avx2(p, vs, vlo, vhi, vzp);
                let r1 = quantize8_avx2(p.add(8), vs, vlo, vhi, vzp);
                let r2 = quantize8_avx2(p.add(16), vs, vlo, vhi, vzp);
                let r3 = quantize8_avx2(p.add(24), vs, vlo, vhi, vzp);
                // i32 → i16 saturates nothing (values in [-128, 255]); keeping the low byte
                // of each i16 makes the unsigned pack exact for u8 and i8 codes alike.
                let p01 = _mm256_and_si256(_mm256_packs_epi32(r0, r1), low_byte);
                let p23 = _mm256_and_si256(_mm256_packs_epi32(r2, r3), low_byte);
                let b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, b);
            }
            i += 32;
        }
        n
    }

    /// Eight values at `p` quantized to i32 codes (NaN → 0, the others in `[lo, hi]`).
    ///
    /// # Safety
    /// The CPU supports AVX2; `p` is valid for 8 reads.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn quantize8_avx2(
        p: *const f32,
        vs: __m256,
        vlo: __m256,
        vhi: __m256,
        vzp: __m256i,
    ) -> __m256i {
        // SAFETY: the caller guarantees 8 readable values.
        let d = _mm256_div_ps(unsafe { _mm256_loadu_ps(p) }, vs);
        let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(d, d));
        let c = _mm256_min_ps(_mm256_max_ps(d, vlo), vhi);
        let c = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(c);
        _mm256_and_si256(_mm256_add_epi32(_mm256_cvttps_epi32(c), vzp), ordered)
    }

    /// AVX-512F dequantization of the first `16·⌊n/16⌋` values; returns how many it did.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `src` is valid for `dst.len()` bytes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dequantize_avx512(
        src: *const u8,
        signed: bool,
        scale: f32,
        zp: i32,
        dst: &mut [f32],
    ) -> usize {
        let n = dst.len() / 16 * 16;
        let vs = _mm512_set1_ps(scale);
        let vzp = _mm512_set1_epi32(zp);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 16 ≤ n ≤ dst.len(), and src holds dst.len() bytes.
            unsafe {
                let b = _mm_loadu_si128(src.add(i) as *const __m128i);
                let w = if signed {
                    _mm512_cvtepi8_epi32(b)
                } else {
                    _mm512_cvtepu8_epi32(b)
                };
                let x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(w, vzp)), vs);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), x);
            }
            i += 16;
        }
        n
    }

    /// AVX2 dequantization of the first `8·⌊n/8⌋` values; returns how many it did.
    ///
    /// # Safety
    /// The CPU supports AVX2; `src` is valid for `dst.len()` bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_avx2(
        src: *const u8,
        signed: bool,
        scale: f32,
        zp: i32,
        dst: &mut [f32],
    ) -> usize {
        let n = dst.len() / 8 * 8;
        let vs = _mm256_set1_ps(scale);
        let vzp = _mm256_set1_epi32(zp);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 ≤ n ≤ dst.len(), and src holds dst.len() bytes.
            unsafe {
                let b = _mm_loadl_epi64(src.add(i) as *const __m128i);
                let w = if signed {
                    _mm256_cvtepi8_epi32(b)
                } else {
                    _mm256_cvtepu8_epi32(b)
                };
                let x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(w, vzp)), vs);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), x);
            }
            i += 8;
        }
        n
    }
}
