//! A safe, bounds-checked front to the strided matrix product shared by MatMul, Gemm, Conv
//! and ConvTranspose: kiln's own packed kernels ([`super::sgemm`], allocation-free) for
//! f32, the `gemm` crate for f64.

use kiln_core::{KilnError, Result};

use crate::fused::Activation;

/// Float types the `gemm` crate multiplies natively.
pub trait GemmFloat: Copy + Send + Sync + 'static + num_traits::Float {
    /// The elements as f32 when `Self` is f32 (kiln's own kernels take those).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The elements as f32 when `Self` is f32, mutably.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// `v` as f32 when `Self` is f32.
    fn scalar_f32(v: Self) -> Option<f32>;
}
impl GemmFloat for f32 {
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
    fn scalar_f32(v: Self) -> Option<f32> {
        Some(v)
    }
}
impl GemmFloat for f64 {
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn scalar_f32(_: Self) -> Option<f32> {
        None
    }
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    /// The backing elements.
    pub data: &'a [T],
    /// Row stride, in elements.
    pub rs: usize,
    /// Column stride, in elements.
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [T], cols: usize) -> Self {
        MatRef {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// A view that is the transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1).checked_mul(self.rs).and_then(|a| {
            (cols - 1)
                .checked_mul(self.cs)
                .and_then(|b| a.checked_add(b))
        });
        matches!(last, Some(l) if l < self.data.len())
    }
}

/// What [`gemm_epi`] applies to each value of the product before it leaves the kernel:
/// `dst[i,j] = act(sum + row_bias[i] + col_bias[j] + residual[i,j])`, each term only when
/// given. The kernels apply it in the final store of each tile, so no separate pass reads
/// the output again.
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmEpilogue<'a> {
    /// One value per row of the output (`m` values): a conv's bias per output channel.
    pub row_bias: Option<&'a [f32]>,
    /// One value per column of the output (`n` values): a Gemm's C broadcast along rows.
    pub col_bias: Option<&'a [f32]>,
    /// A matrix of the output's shape added before the activation (its column stride must
    /// be 1); it must not be the destination.
    pub residual: Option<MatRef<'a, f32>>,
    /// The activation, applied last.
    pub act: Activation,
}

impl GemmEpilogue<'_> {
    /// True when the epilogue changes nothing.
    pub fn is_none(&self) -> bool {
        self.row_bias.is_none()
            && self.col_bias.is_none()
            && self.residual.is_none()
            && self.act == Activation::None
    }

    /// Errors when a part is too small for an `m × n` output.
    fn check(&self, m: usize, n: usize) -> Result<()> {
        let bad = |what: &str| {
            Err(KilnError::Other(format!(
                "gemm: epilogue {what} too small for {m}×{n}"
            )))
        };
        if self.row_bias.is_some_and(|b| b.len() < m) {
            return bad("row bias");
        }
        if self.col_bias.is_some_and(|b| b.len() < n) {
            return bad("column bias");
        }
        if let Some(r) = self.residual {
            if (r.cs != 1 && n > 1) || !r.fits(m, n) {
                return bad("residual");
            }
        }
        Ok(())
    }

    /// The raw form the kernels read (valid while the borrowed slices are).
    fn raw(&self) -> super::sgemm::Epilogue {
        super::sgemm::Epilogue {
            row_bias: self.row_bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            col_bias: self.col_bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            residual: self.residual.map_or(std::ptr::null(), |r| r.data.as_ptr()),
            res_rs: self.residual.map_or(0, |r| r.rs),
            act: self.act,
        }
    }

    /// Applies the epilogue to an `m × n` region of `dst` in a plain pass (the `k = 0`
    /// product).
    fn apply_plain(&self, m: usize, n: usize, dst: &mut [f32], dst_rs: usize) {
        for i in 0..m {
            for j in 0..n {
                let mut x = dst[i * dst_rs + j];
                if let Some(b) = self.row_bias {
                    x += b[i];
                }
                if let Some(b) = self.col_bias {
                    x += b[j];
                }
                if let Some(r) = self.residual {
                    x += r.data[i * r.rs + j * r.cs];
                }
                dst[i * dst_rs + j] = super::sgemm::act_value(self.act, x);
            }
        }
    }
}

/// [`gemm`] for f32 with an epilogue: `dst = act((accumulate ? dst : 0) + scale·a·b +
/// row_bias + col_bias + residual)`, the epilogue applied in the kernels' final store.
/// Errors (never panics) when a view or an epilogue part is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_epi(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    scale: f32,
    parallel: bool,
    epi: &GemmEpilogue<'_>,
) -> Result<()> {
    if epi.is_none() {
        return gemm(m, n, k, dst, dst_rs, accumulate, a, b, scale, parallel);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    epi.check(m, n)?;
    let dst_view = MatRef {
        data: &*dst,
        rs: dst_rs,
        cs: 1,
    };
    if dst_rs < n || !dst_view.fits(m, n) {
        return Err(KilnError::Other(format!(
            "gemm: destination too small for {m}×{n}"
        )));
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        epi.apply_plain(m, n, dst, dst_rs);
        return Ok(());
    }
    if !a.fits(m, k) || !b.fits(k, n) {
        return Err(KilnError::Other(format!(
            "gemm: operand too small for {m}×{k}·{k}×{n}"
        )));
    }
    let isa = super::sgemm::Isa::detect();
    // SAFETY: `fits` / `check` verified that every addressed element of the operands, of
    // dst and of the epilogue's parts lies inside its slice; dst is borrowed mutably so it
    // aliases neither the operands nor the epilogue; dst_rs ≥ n; `detect` only returns a
    // supported kernel family.
    #[allow(unsafe_code)]
    unsafe {
        super::sgemm::sgemm_epi(
            isa,
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            super::sgemm::Operand {
                ptr: a.data.as_ptr(),
                rs: a.rs,
                cs: a.cs,
            },
            super::sgemm::Operand {
                ptr: b.data.as_ptr(),
                rs: b.rs,
                cs: b.cs,
            },
            scale,
            parallel && crate::parallel::threads() > 1,
            &epi.raw(),
        );
    }
    Ok(())
}

/// Products at least this large (m·n·k) use gemm's rayon parallelism.
pub const PARALLEL_THRESHOLD: usize = 1 << 18;

/// `dst[m×n] = (accumulate ? dst : 0) + scale · a[m×k] · b[k×n]`.
///
/// `dst` is row-major with row stride `dst_rs ≥ n` (columns contiguous). `parallel` lets
/// gemm split the product over rayon's pool. Errors (never panics) when a view is too
/// small for the requested shape.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: GemmFloat>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    scale: T,
    parallel: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_view = MatRef {
        data: &*dst,
        rs: dst_rs,
        cs: 1,
    };
    if dst_rs < n || !dst_view.fits(m, n) {
        return Err(KilnError::Other(format!(
            "gemm: destination too small for {m}×{n}"
        )));
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return Ok(());
    }
    if !a.fits(m, k) || !b.fits(k, n) {
        return Err(KilnError::Other(format!(
            "gemm: operand too small for {m}×{k}·{k}×{n}"
        )));
    }
    let to_isize =
        |v: usize| isize::try_from(v).map_err(|_| KilnError::Other("gemm: stride overflow".into()));
    let (dst_rs, a_rs, a_cs, b_rs, b_cs) = (
        to_isize(dst_rs)?,
        to_isize(a.rs)?,
        to_isize(a.cs)?,
        to_isize(b.rs)?,
        to_isize(b.cs)?,
    );
    if let (Some(d), Some(ad), Some(bd), Some(sc)) = (
        T::as_f32_mut(dst),
        T::as_f32(a.data),
        T::as_f32(b.data),
        T::scalar_f32(scale),
    ) {
        let isa = super::sgemm::Isa::detect();
        // SAFETY: `fits` checked above that every addressed element of the operands and
        // of dst lies inside its slice; dst is borrowed mutably so it aliases neither
        // operand; dst_rs ≥ n; `detect` only returns a supported kernel family.
        #[allow(unsafe_code)]
        unsafe {
            super::sgemm::sgemm(
                isa,
                m,
                n,
                k,
                d.as_mut_ptr(),
                dst_rs as usize,
                accumulate,
                super::sgemm::Operand {
                    ptr: ad.as_ptr(),
                    rs: a_rs as usize,
                    cs: a_cs as usize,
                },
                super::sgemm::Operand {
                    ptr: bd.as_ptr(),
                    rs: b_rs as usize,
                    cs: b_cs as usize,
                },
                sc,
                parallel && crate::parallel::threads() > 1,
            );
        }
        return Ok(());
    }
    let par = if parallel && crate::parallel::threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `fits` checked above that every element addressed by the (non-negative)
    // strides for the requested shapes lies inside the corresponding slice; dst rows do
    // not overlap (dst_rs ≥ n, column stride 1); `dst` is borrowed mutably so it aliases
    // neither operand; T is f32 or f64 (the only GemmFloat impls), which gemm supports.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            scale,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `dst[m×n] = (accumulate ? dst : 0) + scale · A·b[k×n]` with A (`m × k`) given in the
/// packed layout of [`super::sgemm::pack_a_whole`] for kernel family `isa`. On a CPU that
/// cannot run `isa`, A is unpacked into scratch and the ordinary product runs. Errors
/// (never panics) when a view is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed_a(
    isa: super::sgemm::Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    packed_a: &[f32],
    b: MatRef<'_, f32>,
    scale: f32,
    parallel: bool,
) -> Result<()> {
    gemm_packed_a_epi(
        isa,
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        packed_a,
        b,
        scale,
        parallel,
        &GemmEpilogue::default(),
    )
}

/// [`gemm_packed_a`] with an epilogue (see [`gemm_epi`]), applied in the kernels' final
/// store. Errors (never panics) when a view or an epilogue part is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed_a_epi(
    isa: super::sgemm::Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    packed_a: &[f32],
    b: MatRef<'_, f32>,
    scale: f32,
    parallel: bool,
    epi: &GemmEpilogue<'_>,
) -> Result<()> {
    use super::sgemm;
    if packed_a.len() < sgemm::packed_a_len(m, k) {
        return Err(KilnError::Other(format!(
            "gemm: packed A holds {} values, {m}×{k} needs {}",
            packed_a.len(),
            sgemm::packed_a_len(m, k)
        )));
    }
    if !isa.supported() || m == 0 || n == 0 || k == 0 {
        return crate::scratch::with_scratch::<f32, _>(m * k, |a| {
            sgemm::unpack_a_whole(isa, m, k, packed_a, a);
            gemm_epi(
                m,
                n,
                k,
                dst,
                dst_rs,
                accumulate,
                MatRef::row_major(a, k),
                b,
                scale,
                parallel,
                epi,
            )
        });
    }
    let dst_view = MatRef {
        data: &*dst,
        rs: dst_rs,
        cs: 1,
    };
    if dst_rs < n || !dst_view.fits(m, n) || !b.fits(k, n) {
        return Err(KilnError::Other(format!(
            "gemm: operand or destination too small for {m}×{k}·{k}×{n}"
        )));
    }
    epi.check(m, n)?;
    // SAFETY: `fits` / `check` verified every addressed element of b, dst and the
    // epilogue's parts; packed_a holds m·k values; dst is borrowed mutably so it aliases
    // neither the operands nor the epilogue; isa is supported.
    #[allow(unsafe_code)]
    unsafe {
        sgemm::sgemm_packed_a_epi(
            isa,
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            packed_a.as_ptr(),
            sgemm::Operand {
                ptr: b.data.as_ptr(),
                rs: b.rs,
                cs: b.cs,
            },
            scale,
            parallel && crate::parallel::threads() > 1,
            &epi.raw(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_matches_loop() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 1.5).collect(); // n×k, used transposed
        let mut dst = vec![1.0f32; m * (n + 2)];
        gemm(
            m,
            n,
            k,
            &mut dst,
            n + 2,
            true,
            MatRef::row_major(&a, k),
            MatRef::transposed(&bt, k),
            2.0,
            false,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    s += a[i * k + l] * bt[j * k + l];
                }
                assert!((dst[i * (n + 2) + j] - (1.0 + 2.0 * s)).abs() < 1e-4);
            }
            assert_eq!(dst[i * (n + 2) + n], 1.0);
        }
    }

    #[test]
    fn too_small_is_an_error() {
        let a = [1.0f32; 4];
        let mut d = [0.0f32; 4];
        assert!(gemm(
            2,
            2,
            3,
            &mut d,
            2,
            false,
            MatRef::row_major(&a, 3),
            MatRef::row_major(&a, 2),
            1.0,
            false
        )
        .is_err());
    }
}
