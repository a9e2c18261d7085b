//! kiln's own f32 matrix product: packed panels in the thread-local scratch pool (so a warm
//! call allocates nothing) and register-blocked micro-kernels chosen at run time — AVX-512F
//! (8×32), AVX2+FMA (6×16), or portable scalar code (4×4) on any other CPU.
//!
//! The loop structure is the classic one of Goto/BLIS: columns in blocks of `NC`, depth in
//! blocks of `KC` (B packed once per block), rows in blocks of `MC` (A packed per block),
//! then `MR × NR` tiles computed by the micro-kernel. With `parallel`, column ranges are
//! split over rayon's pool; each task packs its own panels.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::fused::Activation;
use crate::ops::activation::{exp_f32_fast, tanh_f32_fast};
use crate::scratch::with_scratch;

/// Depth of one packed block.
const KC: usize = 256;
/// Rows of one packed A block (a multiple of every MR).
const MC: usize = 96;
/// Columns of one packed B block (a multiple of every NR).
const NC: usize = 2048;

/// Which micro-kernel family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (4×4 tiles).
    Scalar,
    /// AVX2 with FMA (6×16 tiles).
    Avx2,
    /// AVX-512F (8×32 tiles).
    Avx512,
}

impl Isa {
    /// The best kernel family this CPU supports (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }

    /// Rows of the family's micro-kernel tile (the strip height of packed A).
    pub fn mr(self) -> usize {
        match self {
            Isa::Scalar => 4,
            Isa::Avx2 => 6,
            Isa::Avx512 => 8,
        }
    }

    /// Stable name (`scalar`, `avx2`, `avx512`), as stored in plans.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The family a [`Isa::name`] names.
    pub fn from_name(name: &str) -> Option<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|i| i.name() == name)
    }

    /// True when this CPU can run the family.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => Isa::detect() == Isa::Avx512,
        }
    }
}

/// A raw strided operand: element `(i, j)` at `ptr + i*rs + j*cs`. Bounds were checked by
/// the caller (`blas::gemm`).
#[derive(Clone, Copy)]
pub struct Operand {
    /// First element.
    pub ptr: *const f32,
    /// Row stride in elements.
    pub rs: usize,
    /// Column stride in elements.
    pub cs: usize,
}

// SAFETY: an Operand is a read-only view whose lifetime the caller ties to a borrowed slice
// for the duration of one `sgemm` call; sharing it between the call's rayon tasks is sound.
unsafe impl Send for Operand {}
// SAFETY: as above (read-only).
unsafe impl Sync for Operand {}

/// What the final store of a product applies to each value of C, after the product (and
/// the old value when accumulating): `C[i,j] = act(C[i,j] + row_bias[i] + col_bias[j] +
/// residual[i,j])`, each term only when its pointer is non-null. Raw view: the bounds were
/// checked by the caller (`blas::gemm_epi`). The kernels apply it while the tile is still
/// in registers (or, for the activations without a vector form, right after storing the
/// tile, while it is in L1), and only once the whole depth has been summed.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue {
    /// One value per row of C (`row_bias.add(i)`), or null.
    pub row_bias: *const f32,
    /// One value per column of C (`col_bias.add(j)`), or null.
    pub col_bias: *const f32,
    /// A matrix of C's shape (`residual.add(i * res_rs + j)`), added before the
    /// activation; or null.
    pub residual: *const f32,
    /// Row stride of `residual`, in elements.
    pub res_rs: usize,
    /// The activation, applied last.
    pub act: Activation,
}

// SAFETY: a read-only view tied by the caller to borrowed slices for one `sgemm` call, as
// for Operand.
unsafe impl Send for Epilogue {}
// SAFETY: as above (read-only).
unsafe impl Sync for Epilogue {}

impl Epilogue {
    /// No epilogue: the plain product.
    pub const NONE: Epilogue = Epilogue {
        row_bias: std::ptr::null(),
        col_bias: std::ptr::null(),
        residual: std::ptr::null(),
        res_rs: 0,
        act: Activation::None,
    };

    /// True when the epilogue changes nothing.
    pub fn is_none(&self) -> bool {
        self.row_bias.is_null()
            && self.col_bias.is_null()
            && self.residual.is_null()
            && self.act == Activation::None
    }

    /// The epilogue of the sub-matrix of C whose top-left element is `(i, j)`.
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> Epilogue {
        Epilogue {
            row_bias: if self.row_bias.is_null() {
                self.row_bias
            } else {
                self.row_bias.wrapping_add(i)
            },
            col_bias: if self.col_bias.is_null() {
                self.col_bias
            } else {
                self.col_bias.wrapping_add(j)
            },
            residual: if self.residual.is_null() {
                self.residual
            } else {
                self.residual.wrapping_add(i * self.res_rs + j)
            },
            ..*self
        }
    }

    /// The finished value of element `(r, j)` (relative to this view) whose sum is `v`.
    ///
    /// # Safety
    /// `(r, j)` is inside the region the view's pointers cover.
    #[inline(always)]
    unsafe fn apply(&self, r: usize, j: usize, v: f32) -> f32 {
        let mut x = v;
        // SAFETY: (r, j) is inside the covered region (caller's contract).
        unsafe {
            if !self.row_bias.is_null() {
                x += *self.row_bias.add(r);
            }
            if !self.col_bias.is_null() {
                x += *self.col_bias.add(j);
            }
            if !self.residual.is_null() {
                x += *self.residual.add(r * self.res_rs + j);
            }
        }
        act_value(self.act, x)
    }

    /// Applies the epilogue in place to the `m × n` region at `dst` (row stride `dst_rs`).
    ///
    /// # Safety
    /// The region and the matching parts of the epilogue's operands are valid.
    unsafe fn apply_region(&self, m: usize, n: usize, dst: *mut f32, dst_rs: usize) {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: inside the region (caller's contract).
                unsafe {
                    let p = dst.add(i * dst_rs + j);
                    *p = self.apply(i, j, *p);
                }
            }
        }
    }
}

/// `act(x)` with the arithmetic of the SIMD store paths and of the conv epilogue pass:
/// `x · (x·⅙ + ½)` for HardSwish, mul-then-add for HardSigmoid, and `exp`/`tanh` as the
/// vectorisable polynomials [`exp_f32_fast`] / [`tanh_f32_fast`] (the standalone Sigmoid
/// op's arithmetic; relative error ~2e-7 against libm) for Sigmoid, Swish and Tanh.
#[inline(always)]
pub fn act_value(act: Activation, x: f32) -> f32 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::Clip { min, max } => x.max(min).min(max),
        Activation::HardSwish => x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
        Activation::Sigmoid => 1.0 / (1.0 + exp_f32_fast(-x)),
        Activation::Swish => x / (1.0 + exp_f32_fast(-x)),
        Activation::Tanh => tanh_f32_fast(x),
        other => other.apply(x),
    }
}

#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: tasks of one call write disjoint column ranges of the destination.
unsafe impl Send for DstPtr {}
// SAFETY: as above.
unsafe impl Sync for DstPtr {}

/// Where the packed loop takes A from.
#[derive(Clone, Copy)]
enum ASrc {
    /// A strided operand, packed block by block on every call.
    Strided(Operand),
    /// A already in [`pack_a_whole`] layout for the running family: the whole matrix of
    /// `m_total` rows, of which this product uses rows `row0..` (`row0` a multiple of MR).
    Packed {
        /// Start of the packed matrix.
        ptr: *const f32,
        /// Rows of the whole packed matrix.
        m_total: usize,
        /// First row this product uses.
        row0: usize,
    },
}
// SAFETY: read-only view, as for Operand.
unsafe impl Send for ASrc {}
// SAFETY: as above.
unsafe impl Sync for ASrc {}

/// Number of f32 values of an `m × k` A in packed layout (the same as unpacked: tail
/// strips are stored without padding).
pub fn packed_a_len(m: usize, k: usize) -> usize {
    m * k
}

/// Packs a row-major `m × k` matrix `a` into the layout the packed loop reads for kernel
/// family `isa`, so a constant A (conv or Gemm weights) can be packed once at build time:
/// depth blocks of `KC`, in each row blocks of `MC`, in each strips of `MR` rows stored
/// depth-major (`[p][r]`); a block's last strip keeps only its real rows. The output has
/// exactly `m·k` values.
pub fn pack_a_whole(isa: Isa, m: usize, k: usize, a: &[f32], out: &mut [f32]) {
    let mr = isa.mr();
    let mut o = 0;
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        for i0 in (0..m).step_by(MC) {
            let mc = MC.min(m - i0);
            for ir in (0..mc).step_by(mr) {
                let rows = mr.min(mc - ir);
                for p in 0..kc {
                    for r in 0..rows {
                        out[o] = a[(i0 + ir + r) * k + p0 + p];
                        o += 1;
                    }
                }
            }
        }
    }
}

/// The inverse of [`pack_a_whole`]: back to a row-major `m × k` matrix.
pub fn unpack_a_whole(isa: Isa, m: usize, k: usize, packed: &[f32], out: &mut [f32]) {
    let mr = isa.mr();
    let mut o = 0;
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        for i0 in (0..m).step_by(MC) {
            let mc = MC.min(m - i0);
            for ir in (0..mc).step_by(mr) {
                let rows = mr.min(mc - ir);
                for p in 0..kc {
                    for r in 0..rows {
                        out[(i0 + ir + r) * k + p0 + p] = packed[o];
                        o += 1;
                    }
                }
            }
        }
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + scale · A·B` with A already packed by
/// [`pack_a_whole`] for `isa`: no A packing per call (B is still packed per block).
///
/// # Safety
/// `pa` holds `m·k` values packed for `isa`; B and dst as for [`sgemm`]; `isa.supported()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_packed_a(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    pa: *const f32,
    b: Operand,
    scale: f32,
    parallel: bool,
) {
    // SAFETY: forwarded.
    unsafe {
        sgemm_packed_a_epi(
            isa,
            m,
            n,
            k,
            dst,
            dst_rs,
            accumulate,
            pa,
            b,
            scale,
            parallel,
            &Epilogue::NONE,
        )
    }
}

/// [`sgemm_packed_a`] followed by `epi`, applied in the final store of each tile.
///
/// # Safety
/// As [`sgemm_packed_a`]; every element `epi` addresses for `i < m, j < n` is valid.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_packed_a_epi(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    pa: *const f32,
    b: Operand,
    scale: f32,
    parallel: bool,
    epi: &Epilogue,
) {
    // SAFETY: forwarded.
    unsafe {
        packed_loop(
            isa,
            m,
            n,
            k,
            dst,
            dst_rs,
            accumulate,
            ASrc::Packed {
                ptr: pa,
                m_total: m,
                row0: 0,
            },
            b,
            scale,
            parallel,
            epi,
        )
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + scale · A[m×k] · B[k×n]` with the given kernel
/// family.
///
/// # Safety
/// Every element `(i, l)` of `a` for `i < m, l < k`, `(l, j)` of `b` for `l < k, j < n`
/// and `dst + i*dst_rs + j` for `i < m, j < n` must be valid; `dst` must not overlap the
/// operands; `dst_rs ≥ n`; `isa.supported()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
    parallel: bool,
) {
    // SAFETY: forwarded.
    unsafe {
        sgemm_epi(
            isa,
            m,
            n,
            k,
            dst,
            dst_rs,
            accumulate,
            a,
            b,
            scale,
            parallel,
            &Epilogue::NONE,
        )
    }
}

/// [`sgemm`] followed by `epi`: `dst = act((accumulate ? dst : 0) + scale·A·B +
/// row_bias + col_bias + residual)`, the epilogue applied in the final store of each tile
/// (after the last depth block).
///
/// # Safety
/// As [`sgemm`]; every element `epi` addresses for `i < m, j < n` is valid and does not
/// overlap `dst`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_epi(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
    parallel: bool,
    epi: &Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    let nr = match isa {
        Isa::Scalar => 4,
        Isa::Avx2 => 16,
        Isa::Avx512 => 32,
    };
    if n * 4 <= nr && k > 0 {
        // Few columns (conv with a handful of output positions): packing would cost as
        // much as the product and most of each tile would be padding.
        // SAFETY: forwarded from the caller.
        unsafe {
            narrow_dispatch(
                isa, m, n, k, dst, dst_rs, accumulate, a, b, scale, parallel, epi,
            )
        };
        return;
    }
    if m <= 4 && b.cs == 1 && k > 0 {
        // Few rows (recurrent steps, matrix-vector products): stream B's rows once.
        // SAFETY: forwarded from the caller.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => {
                    x86::short_avx512(m, n, k, dst, dst_rs, accumulate, a, b, scale, epi)
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::short_avx2(m, n, k, dst, dst_rs, accumulate, a, b, scale, epi),
                _ => short(m, n, k, dst, dst_rs, accumulate, a, b, scale, epi),
            }
        };
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        packed_loop(
            isa,
            m,
            n,
            k,
            dst,
            dst_rs,
            accumulate,
            ASrc::Strided(a),
            b,
            scale,
            parallel,
            epi,
        )
    }
}

/// The packed (Goto/BLIS) loop of [`sgemm`], columns split over threads.
#[allow(clippy::too_many_arguments)]
unsafe fn packed_loop(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: ASrc,
    b: Operand,
    scale: f32,
    parallel: bool,
    epi: &Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    let epi = *epi;
    let nr = match isa {
        Isa::Scalar => 4,
        Isa::Avx2 => 16,
        Isa::Avx512 => 32,
    };
    let threads = if parallel {
        crate::parallel::threads()
    } else {
        1
    };
    let a_per_call = matches!(a, ASrc::Strided(_));
    let (row_tasks, col_tasks) = split_grid(m, n, k, (isa.mr(), nr), threads, a_per_call);
    let (row_blocks, strips) = (m.div_ceil(isa.mr()), n.div_ceil(nr));
    let tasks = row_tasks * col_tasks;
    let dst = DstPtr(dst);
    let run = |t: usize| {
        let (tr, tc) = (t / col_tasks, t % col_tasks);
        let j0 = strips * tc / col_tasks * nr;
        let j1 = (strips * (tc + 1) / col_tasks * nr).min(n);
        let i0 = row_blocks * tr / row_tasks * isa.mr();
        let i1 = (row_blocks * (tr + 1) / row_tasks * isa.mr()).min(m);
        if j0 >= j1 || i0 >= i1 {
            return;
        }
        let (d, b, a) = (dst, b, a);
        let m = i1 - i0;
        let a = match a {
            ASrc::Strided(op) => ASrc::Strided(Operand {
                ptr: op.ptr.wrapping_add(i0 * op.rs),
                ..op
            }),
            ASrc::Packed { ptr, m_total, row0 } => ASrc::Packed {
                ptr,
                m_total,
                row0: row0 + i0,
            },
        };
        let bj = Operand {
            ptr: b.ptr.wrapping_add(j0 * b.cs),
            ..b
        };
        let e = epi.at(i0, j0);
        // SAFETY: rows i0..i1 and columns j0..j1 of dst (and the matching parts of a and
        // b) lie inside the caller's bounds; tasks get disjoint blocks of the grid.
        unsafe {
            match isa {
                Isa::Scalar => serial::<4, 4>(
                    m,
                    j1 - j0,
                    k,
                    d.0.add(i0 * dst_rs + j0),
                    dst_rs,
                    accumulate,
                    a,
                    bj,
                    scale,
                    micro_scalar::<4, 4>,
                    &e,
                ),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => serial::<6, 16>(
                    m,
                    j1 - j0,
                    k,
                    d.0.add(i0 * dst_rs + j0),
                    dst_rs,
                    accumulate,
                    a,
                    bj,
                    scale,
                    x86::micro_avx2,
                    &e,
                ),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => serial::<8, 32>(
                    m,
                    j1 - j0,
                    k,
                    d.0.add(i0 * dst_rs + j0),
                    dst_rs,
                    accumulate,
                    a,
                    bj,
                    scale,
                    x86::micro_avx512,
                    &e,
                ),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("x86 kernels selected on another architecture"),
            }
        }
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// Minimum multiply-adds per task of the packed loop.
const PACKED_TASK_WORK: usize = 1 << 16;

/// How [`packed_loop`] splits an `m × n × k` product over `threads` threads: a grid of
/// `rows × cols` tasks (row blocks of whole `mr` strips, column blocks of whole `nr`
/// strips) with at most `threads` tasks, each of at least [`PACKED_TASK_WORK`]
/// multiply-adds, chosen to make the largest task smallest. Ties go to the grid that packs
/// less: every task packs all of B for its rows and, when A is packed per call
/// (`a_per_call`), all of A for its columns, so with more rows of A than columns of B the
/// rows are split; otherwise the columns (fewer row blocks).
pub fn split_grid(
    m: usize,
    n: usize,
    k: usize,
    (mr, nr): (usize, usize),
    threads: usize,
    a_per_call: bool,
) -> (usize, usize) {
    let (rb, cb) = (m.div_ceil(mr.max(1)), n.div_ceil(nr.max(1)));
    let work = m.saturating_mul(n).saturating_mul(k.max(1));
    let max_tasks = threads.min(work / PACKED_TASK_WORK).max(1);
    let prefer_rows = a_per_call && m > n;
    let mut best = (1, 1);
    let mut best_cost = usize::MAX;
    for rows in 1..=max_tasks.min(rb) {
        let cols = (max_tasks / rows).min(cb);
        let cost = (rb.div_ceil(rows) * mr).min(m) * (cb.div_ceil(cols) * nr).min(n);
        if cost < best_cost || (cost == best_cost && prefer_rows) {
            best_cost = cost;
            best = (rows, cols);
        }
    }
    best
}

/// Columns up to which [`sgemm`] runs the narrow path with `isa` (dot products over the
/// depth, no packing): a quarter of the family's tile width.
pub fn narrow_max_cols(isa: Isa) -> usize {
    nr_of(isa) / 4
}

/// Tile width (columns) of the family's micro-kernel.
fn nr_of(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 4,
        Isa::Avx2 => 16,
        Isa::Avx512 => 32,
    }
}

/// Rows per task below which the narrow path does not split over threads.
const NARROW_ROWS_PER_TASK: usize = 16;

/// The narrow product (`n` ≤ 8 columns): with SIMD and A's rows contiguous, B's columns
/// are copied into contiguous rows (scratch, `n·k` values) and every output is a dot
/// product vectorised over the depth; otherwise the scalar register-sum loop.
#[allow(clippy::too_many_arguments)]
unsafe fn narrow_dispatch(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
    parallel: bool,
    epi: &Epilogue,
) {
    let epi = *epi;
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && a.cs == 1 {
        with_scratch::<f32, _>(n * k, |bt| {
            for l in 0..k {
                for j in 0..n {
                    // SAFETY: (l, j) is inside B (caller's bounds).
                    bt[j * k + l] = unsafe { *b.ptr.add(l * b.rs + j * b.cs) };
                }
            }
            let bt = Operand {
                ptr: bt.as_ptr(),
                rs: k,
                cs: 1,
            };
            let d = DstPtr(dst);
            #[allow(clippy::redundant_locals)]
            let rows = |i0: usize, i1: usize| {
                // Moves the whole `DstPtr` (Send + Sync) into the closure rather than
                // its raw-pointer field, which edition 2021 would capture alone.
                let d = d;
                // SAFETY: rows i0..i1 of A and dst are inside the caller's bounds; `bt`
                // holds n rows of k values; tasks write disjoint rows; `isa` is supported.
                unsafe {
                    x86::narrow_dot(
                        isa, i0, i1, n, k, d.0, dst_rs, accumulate, a, bt, scale, &epi,
                    )
                }
            };
            let tasks = if parallel {
                crate::parallel::threads()
                    .min(m / NARROW_ROWS_PER_TASK)
                    .max(1)
            } else {
                1
            };
            if tasks > 1 {
                (0..tasks)
                    .into_par_iter()
                    .for_each(|t| rows(m * t / tasks, m * (t + 1) / tasks));
            } else {
                rows(0, m);
            }
        });
        return;
    }
    let _ = (isa, parallel);
    // SAFETY: forwarded from the caller.
    unsafe {
        match n {
            1 => narrow::<1>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            2 => narrow::<2>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            3 => narrow::<3>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            4 => narrow::<4>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            5 => narrow::<5>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            6 => narrow::<6>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            7 => narrow::<7>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
            _ => narrow::<8>(m, k, dst, dst_rs, accumulate, a, b, scale, &epi),
        }
    }
}

/// `dst = (accumulate ? dst : 0) + scale · A·B` for `N` ≤ 8 columns: each output row
/// keeps its `N` sums in registers over the depth.
#[allow(clippy::too_many_arguments)]
unsafe fn narrow<const N: usize>(
    m: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
    epi: &Epilogue,
) {
    let with_epi = !epi.is_none();
    for i in 0..m {
        let mut acc = [0.0f32; N];
        for l in 0..k {
            // SAFETY: (i, l) is inside A and row l of B has N columns (caller's bounds).
            let av = unsafe { *a.ptr.add(i * a.rs + l * a.cs) };
            let row = b.ptr.wrapping_add(l * b.rs);
            for (j, c) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                *c += av * unsafe { *row.add(j * b.cs) };
            }
        }
        for (j, c) in acc.iter().enumerate() {
            // SAFETY: (i, j) is inside dst.
            unsafe {
                let p = dst.add(i * dst_rs + j);
                *p = if accumulate {
                    *p + scale * c
                } else {
                    scale * c
                };
                if with_epi {
                    *p = epi.apply(i, j, *p);
                }
            }
        }
    }
}

/// `dst = (accumulate ? dst : 0) + scale · A·B` for a few rows and B with contiguous rows:
/// each output row accumulates `a[i,l] · B[l,:]` over the depth (vectorised over columns).
#[allow(clippy::too_many_arguments)]
unsafe fn short(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
    epi: &Epilogue,
) {
    // SAFETY: forwarded.
    unsafe {
        short_body(
            m,
            n,
            k,
            dst,
            dst_rs,
            accumulate,
            a,
            b,
            scale,
            epi,
            |v, x, y| *v += x * y,
        )
    }
}

/// The loop of [`short`], inlined into each instruction-set wrapper with its
/// multiply-add `fma(acc, a, b)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn short_body(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
    epi: &Epilogue,
    fma: impl Fn(&mut f32, f32, f32),
) {
    for i in 0..m {
        // SAFETY: row i of dst has n elements and does not overlap the operands.
        let c = unsafe { std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n) };
        if !accumulate {
            c.fill(0.0);
        }
        for l in 0..k {
            // SAFETY: (i, l) is inside A; row l of B has n contiguous columns.
            let av = scale * unsafe { *a.ptr.add(i * a.rs + l * a.cs) };
            let row = unsafe { std::slice::from_raw_parts(b.ptr.add(l * b.rs), n) };
            c.iter_mut().zip(row).for_each(|(v, &bv)| fma(v, av, bv));
        }
        if !epi.is_none() {
            // The row is finished and still in L1.
            let e = epi.at(i, 0);
            // SAFETY: row i, columns 0..n are inside the epilogue's region.
            c.iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = unsafe { e.apply(0, j, *v) });
        }
    }
}

/// A micro-kernel: `C[mr×nr] = (load ? C : 0) + scale · Apanel · Bpanel` over `kc` steps,
/// then the epilogue when given (the last depth block; the view starts at the tile);
/// only the top-left `mr_eff × nr_eff` of the tile is written.
type Micro = unsafe fn(
    kc: usize,
    pa: *const f32,
    pb: *const f32,
    c: *mut f32,
    ldc: usize,
    load: bool,
    scale: f32,
    mr_eff: usize,
    nr_eff: usize,
    epi: Option<&Epilogue>,
);

#[allow(clippy::too_many_arguments)]
unsafe fn serial<const MR: usize, const NR: usize>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: ASrc,
    b: Operand,
    scale: f32,
    micro: Micro,
    epi: &Epilogue,
) {
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: inside the caller's bounds.
                    unsafe { *dst.add(i * dst_rs + j) = 0.0 };
                }
            }
        }
        // SAFETY: inside the caller's bounds.
        unsafe { epi.apply_region(m, n, dst, dst_rs) };
        return;
    }
    let with_epi = !epi.is_none();
    let kc_max = KC.min(k);
    let nc_max = NC.min(n).div_ceil(NR) * NR;
    let mc_max = MC.min(m).div_ceil(MR) * MR;
    with_scratch::<f32, _>(kc_max * nc_max, |pb| {
        with_scratch::<f32, _>(kc_max * mc_max, |pa| {
            let mut jc = 0;
            while jc < n {
                let nc = NC.min(n - jc);
                let mut pc = 0;
                while pc < k {
                    let kc = KC.min(k - pc);
                    // SAFETY: the block lies inside B's bounds.
                    unsafe { pack_b::<NR>(b, pc, jc, kc, nc, pb) };
                    let load = accumulate || pc > 0;
                    let last = pc + kc == k && with_epi;
                    let mut ic = 0;
                    while ic < m {
                        let mc = MC.min(m - ic);
                        let block: *const f32 = match a {
                            ASrc::Strided(a) => {
                                // SAFETY: the block lies inside A's bounds.
                                unsafe { pack_a::<MR>(a, ic, pc, mc, kc, pa) };
                                pa.as_ptr()
                            }
                            ASrc::Packed { ptr, m_total, row0 } => {
                                // Prepacked: the block starts after pc·m values of earlier
                                // depth blocks and ic·kc of earlier row blocks; its
                                // short last strip is padded into `pa`.
                                let block = ptr.wrapping_add(pc * m_total + (row0 + ic) * kc);
                                let (full, rows) = (mc / MR * MR, mc % MR);
                                if rows > 0 {
                                    for q in 0..kc {
                                        for r in 0..MR {
                                            pa[q * MR + r] = if r < rows {
                                                // SAFETY: inside the block's last strip
                                                // (kc·rows values at full·kc).
                                                unsafe { *block.add(full * kc + q * rows + r) }
                                            } else {
                                                0.0
                                            };
                                        }
                                    }
                                }
                                block
                            }
                        };
                        let full_strips = match a {
                            ASrc::Strided(_) => mc,
                            ASrc::Packed { .. } => mc / MR * MR,
                        };
                        let mut jr = 0;
                        while jr < nc {
                            let nr_eff = NR.min(nc - jr);
                            let mut ir = 0;
                            while ir < mc {
                                let mr_eff = MR.min(mc - ir);
                                let strip = if ir < full_strips {
                                    block.wrapping_add(ir * kc)
                                } else {
                                    pa.as_ptr()
                                };
                                let e = epi.at(ic + ir, jc + jr);
                                // SAFETY: panels hold kc·MR / kc·NR packed values; the
                                // tile lies inside dst's bounds (mr_eff, nr_eff clip it),
                                // and so inside the epilogue's.
                                unsafe {
                                    micro(
                                        kc,
                                        strip,
                                        pb.as_ptr().add(jr * kc),
                                        dst.add((ic + ir) * dst_rs + jc + jr),
                                        dst_rs,
                                        load,
                                        scale,
                                        mr_eff,
                                        nr_eff,
                                        last.then_some(&e),
                                    )
                                };
                                ir += MR;
                            }
                            jr += NR;
                        }
                        ic += mc;
                    }
                    pc += kc;
                }
                jc += nc;
            }
        })
    });
}

/// Packs rows `i0..i0+mc`, depth `p0..p0+kc` of A into MR-row strips (zero padded).
unsafe fn pack_a<const MR: usize>(
    a: Operand,
    i0: usize,
    p0: usize,
    mc: usize,
    kc: usize,
    out: &mut [f32],
) {
    let mut o = 0;
    let mut ir = 0;
    while ir < mc {
        let rows = MR.min(mc - ir);
        if rows == MR && a.cs == 1 {
            // Row-major A (e.g. channels-last activations): each row is read once, in order,
            // into every MR-th slot of the strip.
            let strip = &mut out[o..o + kc * MR];
            for r in 0..MR {
                // SAFETY: row i0+ir+r (< m), columns p0..p0+kc (≤ k) are inside A.
                let row =
                    unsafe { std::slice::from_raw_parts(a.ptr.add((i0 + ir + r) * a.rs + p0), kc) };
                for (dst, &v) in strip.chunks_exact_mut(MR).zip(row) {
                    dst[r] = v;
                }
            }
            o += kc * MR;
            ir += MR;
            continue;
        }
        for p in 0..kc {
            for r in 0..MR {
                out[o + r] = if r < rows {
                    // SAFETY: (i0+ir+r, p0+p) is inside A (r < rows ≤ m, p < kc ≤ k).
                    unsafe { *a.ptr.add((i0 + ir + r) * a.rs + (p0 + p) * a.cs) }
                } else {
                    0.0
                };
            }
            o += MR;
        }
        ir += MR;
    }
}

/// Packs depth `p0..p0+kc`, columns `j0..j0+nc` of B into NR-column strips (zero padded).
unsafe fn pack_b<const NR: usize>(
    b: Operand,
    p0: usize,
    j0: usize,
    kc: usize,
    nc: usize,
    out: &mut [f32],
) {
    let mut o = 0;
    let mut jr = 0;
    while jr < nc {
        let cols = NR.min(nc - jr);
        for p in 0..kc {
            let row = (p0 + p) * b.rs;
            let dst = &mut out[o..o + NR];
            if b.cs == 1 {
                // SAFETY: columns j0+jr..j0+jr+cols of row p0+p are inside B.
                let src = unsafe { std::slice::from_raw_parts(b.ptr.add(row + j0 + jr), cols) };
                dst[..cols].copy_from_slice(src);
            } else {
                for (c, d) in dst[..cols].iter_mut().enumerate() {
                    // SAFETY: as above, strided.
                    *d = unsafe { *b.ptr.add(row + (j0 + jr + c) * b.cs) };
                }
            }
            dst[cols..].fill(0.0);
            o += NR;
        }
        jr += NR;
    }
}

/// Stores an accumulator tile into C (clipped to `mr_eff × nr_eff`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_tile<const MR: usize, const NR: usize>(
    acc: &[[f32; NR]; MR],
    c: *mut f32,
    ldc: usize,
    load: bool,
    scale: f32,
    mr_eff: usize,
    nr_eff: usize,
    epi: Option<&Epilogue>,
) {
    for (r, row) in acc.iter().enumerate().take(mr_eff) {
        for (j, v) in row.iter().enumerate().take(nr_eff) {
            // SAFETY: the caller guarantees the clipped tile is inside C (and inside the
            // epilogue's region).
            unsafe {
                let p = c.add(r * ldc + j);
                let x = if load { *p + scale * v } else { scale * v };
                *p = match epi {
                    Some(e) => e.apply(r, j, x),
                    None => x,
                };
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn micro_scalar<const MR: usize, const NR: usize>(
    kc: usize,
    pa: *const f32,
    pb: *const f32,
    c: *mut f32,
    ldc: usize,
    load: bool,
    scale: f32,
    mr_eff: usize,
    nr_eff: usize,
    epi: Option<&Epilogue>,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: panels hold kc·MR and kc·NR values.
            let av = unsafe { *pa.add(p * MR + r) };
            for (j, v) in row.iter_mut().enumerate() {
                // SAFETY: as above.
                *v += av * unsafe { *pb.add(p * NR + j) };
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile::<MR, NR>(&acc, c, ldc, load, scale, mr_eff, nr_eff, epi) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD micro-kernels (only called after run-time feature detection).

    use std::arch::x86_64::*;

    use super::store_tile;
    use super::{short_body, Epilogue, Isa, Operand};
    use crate::fused::Activation;

    /// Writes `scale · sum` (plus the old value when `acc`) to `*p`, element `(i, j)` of
    /// C, finished by `epi` when given.
    ///
    /// # Safety
    /// `p` is valid for reads and writes; `(i, j)` is inside the epilogue's region.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn put(
        p: *mut f32,
        acc: bool,
        scale: f32,
        sum: f32,
        epi: Option<&Epilogue>,
        i: usize,
        j: usize,
    ) {
        // SAFETY: forwarded.
        unsafe {
            let x = if acc { *p + scale * sum } else { scale * sum };
            *p = match epi {
                Some(e) => e.apply(i, j, x),
                None => x,
            };
        }
    }

    /// The Taylor series of [`super::tanh_f32_fast`] near zero, with the given vector
    /// multiply, add and splat (same operation order as the scalar code).
    macro_rules! tanh_taylor {
        ($v:expr, $mul:ident, $add:ident, $set1:ident) => {{
            let v = $v;
            let v2 = $mul(v, v);
            let t = $add($set1(2.0 / 15.0), $mul(v2, $set1(-17.0 / 315.0)));
            let t = $add($set1(-1.0 / 3.0), $mul(v2, t));
            let t = $add($set1(1.0), $mul(v2, t));
            $mul(v, t)
        }};
    }

    /// [`super::exp_f32_fast`] on vectors, operation for operation (separate multiplies
    /// and adds, no FMA contraction), so the lanes equal the scalar results bit for bit.
    macro_rules! exp_fast {
        ($x:expr, $t:ident, $mul:ident, $add:ident, $sub:ident, $min:ident, $max:ident,
         $set1:ident, $cast_i:ident, $cast_f:ident, $sub_i:ident, $add_i:ident, $set1_i:ident,
         $sll:ident) => {{
            // min(c, x) / max(c, x) return x when x is NaN, as the scalar comparisons do.
            let x = $min($set1(88.0), $x);
            let x = $max($set1(-87.0), x);
            let magic = $set1(12_582_912.0);
            let t = $add($mul(x, $set1(std::f32::consts::LOG2_E)), magic);
            let n = $sub(t, magic);
            let ni = $sub_i($cast_i(t), $set1_i(12_582_912.0f32.to_bits() as i32));
            let r = $sub(
                $sub(x, $mul(n, $set1(0.693_359_4))),
                $mul(n, $set1(-2.121_944_4e-4)),
            );
            let mut p = $set1(1.987_569_1e-4);
            p = $add($mul(p, r), $set1(1.398_199_9e-3));
            p = $add($mul(p, r), $set1(8.333_452e-3));
            p = $add($mul(p, r), $set1(4.166_579_6e-2));
            p = $add($mul(p, r), $set1(1.666_666_5e-1));
            p = $add($mul(p, r), $set1(0.5));
            let e = $add($add($mul($mul(p, r), r), r), $set1(1.0));
            let scale: $t = $cast_f($sll::<23>($add_i(ni, $set1_i(127))));
            $mul(e, scale)
        }};
    }

    /// e^x on 16 lanes ([`super::exp_f32_fast`]'s arithmetic).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp512(x: __m512) -> __m512 {
        exp_fast!(
            x,
            __m512,
            _mm512_mul_ps,
            _mm512_add_ps,
            _mm512_sub_ps,
            _mm512_min_ps,
            _mm512_max_ps,
            _mm512_set1_ps,
            _mm512_castps_si512,
            _mm512_castsi512_ps,
            _mm512_sub_epi32,
            _mm512_add_epi32,
            _mm512_set1_epi32,
            _mm512_slli_epi32
        )
    }

    /// e^x on 8 lanes ([`super::exp_f32_fast`]'s arithmetic).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp256(x: __m256) -> __m256 {
        exp_fast!(
            x,
            __m256,
            _mm256_mul_ps,
            _mm256_add_ps,
            _mm256_sub_ps,
            _mm256_min_ps,
            _mm256_max_ps,
            _mm256_set1_ps,
            _mm256_castps_si256,
            _mm256_castsi256_ps,
            _mm256_sub_epi32,
            _mm256_add_epi32,
            _mm256_set1_epi32,
            _mm256_slli_epi32
        )
    }

    /// `act` on 16 lanes, the same arithmetic as [`act_value`] (bit for bit).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn act512(act: Activation, v: __m512) -> __m512 {
        {
            let zero = _mm512_setzero_ps();
            let one = _mm512_set1_ps(1.0);
            match act {
                Activation::Relu => _mm512_max_ps(v, zero),
                Activation::Clip { min, max } => {
                    _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(min)), _mm512_set1_ps(max))
                }
                Activation::LeakyRelu { alpha } => {
                    let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, zero);
                    _mm512_mask_blend_ps(ge, _mm512_mul_ps(v, _mm512_set1_ps(alpha)), v)
                }
                Activation::HardSigmoid { alpha, beta } => {
                    let t = _mm512_add_ps(
                        _mm512_mul_ps(_mm512_set1_ps(alpha), v),
                        _mm512_set1_ps(beta),
                    );
                    _mm512_min_ps(one, _mm512_max_ps(zero, t))
                }
                Activation::HardSwish => {
                    let t = _mm512_add_ps(
                        _mm512_mul_ps(v, _mm512_set1_ps(1.0 / 6.0)),
                        _mm512_set1_ps(0.5),
                    );
                    _mm512_mul_ps(v, _mm512_min_ps(one, _mm512_max_ps(zero, t)))
                }
                Activation::Sigmoid => {
                    _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, v))))
                }
                Activation::Swish => {
                    _mm512_div_ps(v, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, v))))
                }
                Activation::Tanh => {
                    let two = _mm512_set1_ps(2.0);
                    let e = exp512(_mm512_mul_ps(two, v));
                    let big = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(one, e)));
                    let small = tanh_taylor!(v, _mm512_mul_ps, _mm512_add_ps, _mm512_set1_ps);
                    let abs = _mm512_abs_ps(v);
                    let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs, _mm512_set1_ps(0.0625));
                    _mm512_mask_blend_ps(tiny, big, small)
                }
                Activation::None => v,
            }
        }
    }

    /// `act` on 8 lanes, the same arithmetic as [`act_value`] (bit for bit).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn act256(act: Activation, v: __m256) -> __m256 {
        {
            let zero = _mm256_setzero_ps();
            let one = _mm256_set1_ps(1.0);
            match act {
                Activation::Relu => _mm256_max_ps(v, zero),
                Activation::Clip { min, max } => {
                    _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(min)), _mm256_set1_ps(max))
                }
                Activation::LeakyRelu { alpha } => {
                    let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(v, zero);
                    _mm256_blendv_ps(_mm256_mul_ps(v, _mm256_set1_ps(alpha)), v, ge)
                }
                Activation::HardSigmoid { alpha, beta } => {
                    let t = _mm256_add_ps(
                        _mm256_mul_ps(_mm256_set1_ps(alpha), v),
                        _mm256_set1_ps(beta),
                    );
                    _mm256_min_ps(one, _mm256_max_ps(zero, t))
                }
                Activation::HardSwish => {
                    let t = _mm256_add_ps(
                        _mm256_mul_ps(v, _mm256_set1_ps(1.0 / 6.0)),
                        _mm256_set1_ps(0.5),
                    );
                    _mm256_mul_ps(v, _mm256_min_ps(one, _mm256_max_ps(zero, t)))
                }
                Activation::Sigmoid => {
                    _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, v))))
                }
                Activation::Swish => {
                    _mm256_div_ps(v, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, v))))
                }
                Activation::Tanh => {
                    let two = _mm256_set1_ps(2.0);
                    let e = exp256(_mm256_mul_ps(two, v));
                    let big = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(one, e)));
                    let small = tanh_taylor!(v, _mm256_mul_ps, _mm256_add_ps, _mm256_set1_ps);
                    let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
                    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(abs, _mm256_set1_ps(0.0625));
                    _mm256_blendv_ps(big, small, tiny)
                }
                Activation::None => v,
            }
        }
    }

    /// Rows `i0..i1` of the narrow product as dot products over the depth: A's rows are
    /// contiguous (`a.cs == 1`), `bt` holds B's `n` columns as contiguous rows.
    ///
    /// # Safety
    /// Rows `i0..i1` of A (k values each) and of dst (n values each) are valid; `bt` holds
    /// `n` rows of `k` values at stride `bt.rs`; `isa` is AVX2 or AVX-512 and supported.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn narrow_dot(
        isa: Isa,
        i0: usize,
        i1: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        acc: bool,
        a: Operand,
        bt: Operand,
        scale: f32,
        epi: &Epilogue,
    ) {
        let epi = (!epi.is_none()).then_some(epi);
        macro_rules! go {
            ($f:ident, $w:expr) => {
                // SAFETY: forwarded (feature support checked by the dispatcher).
                unsafe {
                    match n {
                        1 => $f::<1, { dot_rows(1, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        2 => $f::<2, { dot_rows(2, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        3 => $f::<3, { dot_rows(3, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        4 => $f::<4, { dot_rows(4, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        5 => $f::<5, { dot_rows(5, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        6 => $f::<6, { dot_rows(6, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        7 => $f::<7, { dot_rows(7, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                        _ => $f::<8, { dot_rows(8, $w) }>(
                            i0, i1, k, dst, dst_rs, acc, a, bt, scale, epi,
                        ),
                    }
                }
            };
        }
        match isa {
            Isa::Avx512 => go!(dot_avx512, true),
            _ => go!(dot_avx2, false),
        }
    }

    /// Rows per pass of the dot-product kernels for `n` columns (`wide`: AVX-512's 32
    /// registers): enough independent accumulators (rows × columns ≥ 8) that the
    /// multiply-adds are not waiting on each other's latency.
    const fn dot_rows(n: usize, wide: bool) -> usize {
        match (n, wide) {
            (1, true) => 8,
            (1, false) | (2..=4, true) | (2, false) => 4,
            _ => 2,
        }
    }

    /// AVX-512 dot products, `R` rows at a time (R·N accumulators; a short last block
    /// recomputes its last row in the spare slots and stores only its own), masked depth
    /// tail.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn dot_avx512<const N: usize, const R: usize>(
        i0: usize,
        i1: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        acc: bool,
        a: Operand,
        bt: Operand,
        scale: f32,
        epi: Option<&Epilogue>,
    ) {
        let mut i = i0;
        while i < i1 {
            let rows = R.min(i1 - i);
            let mut ar = [a.ptr; R];
            for (r, p) in ar.iter_mut().enumerate() {
                *p = a.ptr.wrapping_add((i + r.min(rows - 1)) * a.rs);
            }
            let mut s = [[_mm512_setzero_ps(); N]; R];
            let mut l = 0;
            while l < k {
                let mask: __mmask16 = if k - l >= 16 {
                    0xffff
                } else {
                    (1u16 << (k - l)) - 1
                };
                // SAFETY: masked loads touch only depth indices < k of valid rows.
                unsafe {
                    let mut va = [_mm512_setzero_ps(); R];
                    for r in 0..R {
                        va[r] = _mm512_maskz_loadu_ps(mask, ar[r].add(l));
                    }
                    for j in 0..N {
                        let vb = _mm512_maskz_loadu_ps(mask, bt.ptr.add(j * bt.rs + l));
                        for r in 0..R {
                            s[r][j] = _mm512_fmadd_ps(va[r], vb, s[r][j]);
                        }
                    }
                }
                l += 16;
            }
            for (r, sr) in s.iter().enumerate().take(rows) {
                for (j, v) in sr.iter().enumerate() {
                    // SAFETY: (i + r, j) is inside dst for r < rows.
                    unsafe {
                        put(
                            dst.add((i + r) * dst_rs + j),
                            acc,
                            scale,
                            _mm512_reduce_add_ps(*v),
                            epi,
                            i + r,
                            j,
                        )
                    };
                }
            }
            i += rows;
        }
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)))
    }

    /// AVX2 dot products, `R` rows at a time (R·N accumulators, a short last block as in
    /// `dot_avx512`), scalar depth tail.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn dot_avx2<const N: usize, const R: usize>(
        i0: usize,
        i1: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        acc: bool,
        a: Operand,
        bt: Operand,
        scale: f32,
        epi: Option<&Epilogue>,
    ) {
        let kv = k / 8 * 8;
        let mut i = i0;
        while i < i1 {
            let rows = R.min(i1 - i);
            let mut ar = [a.ptr; R];
            for (r, p) in ar.iter_mut().enumerate() {
                *p = a.ptr.wrapping_add((i + r.min(rows - 1)) * a.rs);
            }
            let mut s = [[_mm256_setzero_ps(); N]; R];
            let mut l = 0;
            while l < kv {
                // SAFETY: l + 8 ≤ k: full vectors inside valid rows.
                unsafe {
                    let mut va = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        va[r] = _mm256_loadu_ps(ar[r].add(l));
                    }
                    for j in 0..N {
                        let vb = _mm256_loadu_ps(bt.ptr.add(j * bt.rs + l));
                        for r in 0..R {
                            s[r][j] = _mm256_fmadd_ps(va[r], vb, s[r][j]);
                        }
                    }
                }
                l += 8;
            }
            for (r, sr) in s.iter().enumerate().take(rows) {
                for (j, v) in sr.iter().enumerate() {
                    let mut t = hsum256(*v);
                    for l in kv..k {
                        // SAFETY: l < k inside valid rows.
                        unsafe { t += *ar[r].add(l) * *bt.ptr.add(j * bt.rs + l) };
                    }
                    // SAFETY: (i + r, j) is inside dst for r < rows.
                    unsafe { put(dst.add((i + r) * dst_rs + j), acc, scale, t, epi, i + r, j) };
                }
            }
            i += rows;
        }
    }

    /// The few-rows product compiled for AVX-512 (the loop is vectorised by the compiler).
    ///
    /// # Safety
    /// As `super::short`; the CPU supports AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn short_avx512(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        a: Operand,
        b: Operand,
        scale: f32,
        epi: &Epilogue,
    ) {
        // SAFETY: forwarded.
        unsafe {
            short_body(
                m,
                n,
                k,
                dst,
                dst_rs,
                accumulate,
                a,
                b,
                scale,
                epi,
                |v, x, y| *v = x.mul_add(y, *v),
            )
        }
    }

    /// The few-rows product compiled for AVX2 + FMA.
    ///
    /// # Safety
    /// As `super::short`; the CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn short_avx2(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        a: Operand,
        b: Operand,
        scale: f32,
        epi: &Epilogue,
    ) {
        // SAFETY: forwarded.
        unsafe {
            short_body(
                m,
                n,
                k,
                dst,
                dst_rs,
                accumulate,
                a,
                b,
                scale,
                epi,
                |v, x, y| *v = x.mul_add(y, *v),
            )
        }
    }

    /// AVX2 + FMA, 6 rows × 16 columns (12 ymm accumulators).
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; panels hold `kc·6` and `kc·16` values; the clipped
    /// tile is inside C.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn micro_avx2(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        load: bool,
        scale: f32,
        mr_eff: usize,
        nr_eff: usize,
        epi: Option<&Epilogue>,
    ) {
        // SAFETY: forwarded (feature support checked by the dispatcher).
        unsafe { avx2_impl(kc, pa, pb, c, ldc, load, scale, mr_eff, nr_eff, epi) }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2_impl(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        load: bool,
        scale: f32,
        mr_eff: usize,
        nr_eff: usize,
        epi: Option<&Epilogue>,
    ) {
        const MR: usize = 6;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..kc {
            // SAFETY: panel bounds as documented.
            unsafe {
                let b0 = _mm256_loadu_ps(pb.add(p * 16));
                let b1 = _mm256_loadu_ps(pb.add(p * 16 + 8));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*pa.add(p * MR + r));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
            }
        }
        let vs = _mm256_set1_ps(scale);
        if nr_eff == 16 {
            if let Some(e) = epi {
                // SAFETY: the tile's mr_eff full rows are inside C and the epilogue's region.
                unsafe { avx2_store_epi(&acc, mr_eff, c, ldc, load, scale, e) };
                return;
            }
        }
        if mr_eff == MR && nr_eff == 16 {
            for (r, row) in acc.iter().enumerate() {
                // SAFETY: the full tile is inside C.
                unsafe {
                    let p = c.add(r * ldc);
                    let (mut v0, mut v1) = (_mm256_mul_ps(row[0], vs), _mm256_mul_ps(row[1], vs));
                    if load {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
                    }
                    _mm256_storeu_ps(p, v0);
                    _mm256_storeu_ps(p.add(8), v1);
                }
            }
            return;
        }
        let mut tile = [[0.0f32; 16]; MR];
        for (t, row) in tile.iter_mut().zip(&acc) {
            // SAFETY: 16 floats per row.
            unsafe {
                _mm256_storeu_ps(t.as_mut_ptr(), row[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), row[1]);
            }
        }
        // SAFETY: forwarded.
        unsafe { store_tile::<MR, 16>(&tile, c, ldc, load, scale, mr_eff, nr_eff, epi) };
    }

    /// AVX-512F, 8 rows × 32 columns (16 zmm accumulators).
    ///
    /// # Safety
    /// The CPU supports AVX-512F; panels hold `kc·8` and `kc·32` values; the clipped tile is
    /// inside C.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn micro_avx512(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        load: bool,
        scale: f32,
        mr_eff: usize,
        nr_eff: usize,
        epi: Option<&Epilogue>,
    ) {
        // SAFETY: forwarded (feature support checked by the dispatcher).
        unsafe { avx512_impl(kc, pa, pb, c, ldc, load, scale, mr_eff, nr_eff, epi) }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512_impl(
        kc: usize,
        pa: *const f32,
        pb: *const f32,
        c: *mut f32,
        ldc: usize,
        load: bool,
        scale: f32,
        mr_eff: usize,
        nr_eff: usize,
        epi: Option<&Epilogue>,
    ) {
        const MR: usize = 8;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc {
            // SAFETY: panel bounds as documented.
            unsafe {
                let b0 = _mm512_loadu_ps(pb.add(p * 32));
                let b1 = _mm512_loadu_ps(pb.add(p * 32 + 16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*pa.add(p * MR + r));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
            }
        }
        let vs = _mm512_set1_ps(scale);
        if nr_eff == 32 {
            if let Some(e) = epi {
                // SAFETY: the tile's mr_eff full rows are inside C and the epilogue's region.
                unsafe { avx512_store_epi(&acc, mr_eff, c, ldc, load, scale, e) };
                return;
            }
            for (r, row) in acc.iter().enumerate().take(mr_eff) {
                // SAFETY: the row's 32 columns are inside C.
                unsafe {
                    let p = c.add(r * ldc);
                    let (mut v0, mut v1) = (_mm512_mul_ps(row[0], vs), _mm512_mul_ps(row[1], vs));
                    if load {
                        v0 = _mm512_add_ps(v0, _mm512_loadu_ps(p));
                        v1 = _mm512_add_ps(v1, _mm512_loadu_ps(p.add(16)));
                    }
                    _mm512_storeu_ps(p, v0);
                    _mm512_storeu_ps(p.add(16), v1);
                }
            }
            return;
        }
        let mut tile = [[0.0f32; 32]; MR];
        for (t, row) in tile.iter_mut().zip(&acc) {
            // SAFETY: 32 floats per row.
            unsafe {
                _mm512_storeu_ps(t.as_mut_ptr(), row[0]);
                _mm512_storeu_ps(t.as_mut_ptr().add(16), row[1]);
            }
        }
        // SAFETY: forwarded.
        unsafe { store_tile::<MR, 32>(&tile, c, ldc, load, scale, mr_eff, nr_eff, epi) };
    }

    /// Defines the final store of the first `rows` rows of an `MR × 2·LANES` tile (all
    /// columns) with its epilogue applied in registers: scale, the old value when `load`,
    /// row bias, column bias, residual, then the activation, one store per vector. One body
    /// for both vector widths (the intrinsics passed in).
    macro_rules! store_epi {
        ($(#[$doc:meta])* $name:ident, $feat:literal, $v:ty, $mr:literal, $lanes:literal,
         $act:ident, $mul:ident, $add:ident, $load:ident, $store:ident, $set1:ident,
         $zero:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn $name(
                acc: &[[$v; 2]; $mr],
                rows: usize,
                c: *mut f32,
                ldc: usize,
                load: bool,
                scale: f32,
                e: &Epilogue,
            ) {
                let vs = $set1(scale);
                // SAFETY: the rows and the epilogue's region are valid (caller's contract).
                unsafe {
                    let (cb0, cb1) = if e.col_bias.is_null() {
                        ($zero(), $zero())
                    } else {
                        ($load(e.col_bias), $load(e.col_bias.add($lanes)))
                    };
                    for (r, row) in acc.iter().enumerate().take(rows) {
                        let p = c.add(r * ldc);
                        let (mut v0, mut v1) = ($mul(row[0], vs), $mul(row[1], vs));
                        if load {
                            v0 = $add(v0, $load(p));
                            v1 = $add(v1, $load(p.add($lanes)));
                        }
                        if !e.row_bias.is_null() {
                            let b = $set1(*e.row_bias.add(r));
                            v0 = $add(v0, b);
                            v1 = $add(v1, b);
                        }
                        if !e.col_bias.is_null() {
                            v0 = $add(v0, cb0);
                            v1 = $add(v1, cb1);
                        }
                        if !e.residual.is_null() {
                            let q = e.residual.add(r * e.res_rs);
                            v0 = $add(v0, $load(q));
                            v1 = $add(v1, $load(q.add($lanes)));
                        }
                        $store(p, $act(e.act, v0));
                        $store(p.add($lanes), $act(e.act, v1));
                    }
                }
            }
        };
    }

    /// The vector activations against [`super::act_value`], bit for bit, on random values
    /// and the edges (±0, tiny, the exp clamps, ±inf, NaN).
    #[cfg(test)]
    #[test]
    fn vector_activations_equal_act_value() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1e-30,
            -1e-7,
            0.0624,
            0.0625,
            -0.0626,
            44.0,
            -43.6,
            87.5,
            -90.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut seed = 7u64;
        while !vals.len().is_multiple_of(16) || vals.len() < 4096 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
            vals.push(
                (u - 0.5)
                    * 40.0
                    * if vals.len().is_multiple_of(3) {
                        0.01
                    } else {
                        1.0
                    },
            );
        }
        let acts = [
            Activation::Relu,
            Activation::Clip {
                min: -1.5,
                max: 2.0,
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
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for act in acts {
            let want: Vec<f32> = vals.iter().map(|&v| super::act_value(act, v)).collect();
            if Isa::Avx512.supported() {
                for (x, w) in vals.chunks_exact(16).zip(want.chunks_exact(16)) {
                    let mut got = [0.0f32; 16];
                    // SAFETY: AVX-512F is present (checked above); 16 values each.
                    unsafe {
                        _mm512_storeu_ps(got.as_mut_ptr(), act512(act, _mm512_loadu_ps(x.as_ptr())))
                    };
                    for ((g, w), x) in got.iter().zip(w).zip(x) {
                        assert!(same(*g, *w), "avx512 {act:?}({x}) = {g}, scalar {w}");
                    }
                }
            }
            if Isa::Avx2.supported() {
                for (x, w) in vals.chunks_exact(8).zip(want.chunks_exact(8)) {
                    let mut got = [0.0f32; 8];
                    // SAFETY: AVX2 and FMA are present (checked above); 8 values each.
                    unsafe {
                        _mm256_storeu_ps(got.as_mut_ptr(), act256(act, _mm256_loadu_ps(x.as_ptr())))
                    };
                    for ((g, w), x) in got.iter().zip(w).zip(x) {
                        assert!(same(*g, *w), "avx2 {act:?}({x}) = {g}, scalar {w}");
                    }
                }
            }
        }
    }

    store_epi!(
        /// The epilogue store of an AVX2 6 × 16 tile's first `rows` rows.
        ///
        /// # Safety
        /// The CPU supports AVX2 and FMA; `rows` full rows at `c` and the epilogue's
        /// matching region are valid.
        avx2_store_epi,
        "avx2,fma",
        __m256,
        6,
        8,
        act256,
        _mm256_mul_ps,
        _mm256_add_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_setzero_ps
    );

    store_epi!(
        /// The epilogue store of an AVX-512 8 × 32 tile's first `rows` rows.
        ///
        /// # Safety
        /// The CPU supports AVX-512F; `rows` full rows at `c` and the epilogue's matching
        /// region are valid.
        avx512_store_epi,
        "avx512f",
        __m512,
        8,
        16,
        act512,
        _mm512_mul_ps,
        _mm512_add_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_setzero_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop the packed kernels are checked against.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        ldd: usize,
        acc: bool,
        a: &[f32],
        (ars, acs): (usize, usize),
        b: &[f32],
        (brs, bcs): (usize, usize),
        scale: f32,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for l in 0..k {
                    s += a[i * ars + l * acs] as f64 * b[l * brs + j * bcs] as f64;
                }
                let d = &mut dst[i * ldd + j];
                *d = if acc { *d } else { 0.0 } + scale * s as f32;
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_kernel_matches_the_reference_on_odd_shapes() {
        let shapes = [
            (1, 1, 1),
            (1, 37, 5),
            (7, 1, 3),
            (5, 17, 300),
            (9, 33, 1),
            (13, 70, 257),
            (97, 45, 19),
            (258, 3, 256),
            (5, 8, 40),
            (7, 2, 9),
            (1, 512, 128),
            (3, 40, 33),
            (6, 16, 8),
            (8, 32, 8),
            (200, 2100, 3),
            (3, 5, 600),
            (33, 5, 17),
            (64, 7, 300),
            (258, 4, 256),
            (3, 6, 15),
            (41, 8, 1000),
            (2, 100, 7),
        ];
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            if !isa.supported() {
                eprintln!("skipping {isa:?}: not supported on this CPU");
                continue;
            }
            for (si, &(m, n, k)) in shapes.iter().enumerate() {
                for (transpose_a, transpose_b, acc, par) in [
                    (false, false, false, false),
                    (true, false, true, true),
                    (false, true, false, true),
                    (true, true, true, false),
                ] {
                    let a = values(m * k, si as u64 * 7 + 1);
                    let b = values(k * n, si as u64 * 7 + 2);
                    let (ars, acs) = if transpose_a { (1, m) } else { (k, 1) };
                    let (brs, bcs) = if transpose_b { (1, k) } else { (n, 1) };
                    let ldd = n + 3;
                    let init = values(m * ldd, si as u64 * 7 + 3);
                    let mut want = init.clone();
                    let mut got = init.clone();
                    reference(
                        m,
                        n,
                        k,
                        &mut want,
                        ldd,
                        acc,
                        &a,
                        (ars, acs),
                        &b,
                        (brs, bcs),
                        0.75,
                    );
                    // SAFETY: the operands and destination have the sizes described.
                    unsafe {
                        sgemm(
                            isa,
                            m,
                            n,
                            k,
                            got.as_mut_ptr(),
                            ldd,
                            acc,
                            Operand {
                                ptr: a.as_ptr(),
                                rs: ars,
                                cs: acs,
                            },
                            Operand {
                                ptr: b.as_ptr(),
                                rs: brs,
                                cs: bcs,
                            },
                            0.75,
                            par,
                        )
                    };
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                            "{isa:?} {m}x{n}x{k} ta={transpose_a} tb={transpose_b} acc={acc}: \
                             element {idx}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prepacked_a_matches_the_reference_and_unpacks_back() {
        let shapes = [
            (1, 1, 1),
            (7, 9, 3),
            (13, 70, 257),
            (97, 45, 19),
            (200, 33, 600),
            (101, 40, 513),
            (5, 2, 40),
            (3, 100, 7),
        ];
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            if !isa.supported() {
                continue;
            }
            for (si, &(m, n, k)) in shapes.iter().enumerate() {
                let a = values(m * k, si as u64 * 5 + 11);
                let b = values(k * n, si as u64 * 5 + 12);
                let mut packed = vec![f32::NAN; packed_a_len(m, k)];
                pack_a_whole(isa, m, k, &a, &mut packed);
                let mut back = vec![f32::NAN; m * k];
                unpack_a_whole(isa, m, k, &packed, &mut back);
                assert_eq!(back, a, "{isa:?} {m}x{k}: unpack(pack(a)) != a");
                for (acc, par) in [(false, false), (true, true)] {
                    let ldd = n + 1;
                    let init = values(m * ldd, si as u64 * 5 + 13);
                    let mut want = init.clone();
                    let mut got = init.clone();
                    reference(m, n, k, &mut want, ldd, acc, &a, (k, 1), &b, (n, 1), 1.5);
                    // SAFETY: packed holds m·k values packed for isa; b and got are sized.
                    unsafe {
                        sgemm_packed_a(
                            isa,
                            m,
                            n,
                            k,
                            got.as_mut_ptr(),
                            ldd,
                            acc,
                            packed.as_ptr(),
                            Operand {
                                ptr: b.as_ptr(),
                                rs: n,
                                cs: 1,
                            },
                            1.5,
                            par,
                        )
                    };
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                            "{isa:?} {m}x{n}x{k} acc={acc}: element {idx}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// The packed loop's task grid (row blocks × column strips) at 1, 2 and 3 threads,
    /// strided and prepacked A, on shapes where the split goes along rows, columns or both.
    #[test]
    fn task_grid_matches_the_reference_at_1_2_3_threads() {
        let shapes = [
            (256, 49, 64),
            (101, 40, 513),
            (97, 196, 40),
            (1000, 17, 33),
            (13, 2100, 30),
            (577, 150, 71),
        ];
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                if !isa.supported() {
                    continue;
                }
                for (si, &(m, n, k)) in shapes.iter().enumerate() {
                    let a = values(m * k, si as u64 * 3 + 21);
                    let b = values(k * n, si as u64 * 3 + 22);
                    let mut packed = vec![f32::NAN; packed_a_len(m, k)];
                    pack_a_whole(isa, m, k, &a, &mut packed);
                    let ldd = n + 5;
                    let init = values(m * ldd, si as u64 * 3 + 23);
                    let mut want = init.clone();
                    reference(m, n, k, &mut want, ldd, true, &a, (k, 1), &b, (n, 1), 0.5);
                    for prepacked in [false, true] {
                        let mut got = init.clone();
                        let bop = Operand {
                            ptr: b.as_ptr(),
                            rs: n,
                            cs: 1,
                        };
                        let dst = DstPtr(got.as_mut_ptr());
                        pool.install(|| {
                            let d = dst;
                            // SAFETY: a / packed hold m·k values (packed for isa), b k·n,
                            // got m·ldd; isa is supported.
                            unsafe {
                                if prepacked {
                                    sgemm_packed_a(
                                        isa,
                                        m,
                                        n,
                                        k,
                                        d.0,
                                        ldd,
                                        true,
                                        packed.as_ptr(),
                                        bop,
                                        0.5,
                                        true,
                                    )
                                } else {
                                    let aop = Operand {
                                        ptr: a.as_ptr(),
                                        rs: k,
                                        cs: 1,
                                    };
                                    sgemm(isa, m, n, k, d.0, ldd, true, aop, bop, 0.5, true)
                                }
                            }
                        });
                        for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                                "{isa:?} {m}x{n}x{k} prepacked={prepacked} at {threads} \
                                 threads: element {idx}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every kernel path (narrow, short, packed with strided and prepacked A; each
    /// supported family; full and clipped tiles; depth split into several blocks;
    /// accumulating or not; 1–3 threads) with each epilogue kind against the reference
    /// product followed by a separate epilogue pass.
    #[test]
    fn epilogue_matches_reference_then_separate_pass() {
        let acts = [
            Activation::None,
            Activation::Relu,
            Activation::Clip {
                min: -0.25,
                max: 0.5,
            },
            Activation::LeakyRelu { alpha: 0.1 },
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Activation::HardSwish,
            Activation::Sigmoid,
            Activation::Swish,
            Activation::Tanh,
        ];
        // (m, n, k): narrow (n ≤ 8 with SIMD), short (m ≤ 4), packed with clipped and full
        // tiles, depth of 1, of one block, and of 2–4 blocks of KC.
        let shapes = [
            (7, 3, 9),
            (33, 5, 600),
            (3, 40, 33),
            (2, 100, 300),
            (13, 70, 257),
            (16, 64, 40),
            (25, 97, 1),
            (97, 45, 530),
            (41, 130, 1000),
            (200, 37, 19),
        ];
        // (row bias, column bias, residual)
        let parts = [
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (true, true, true),
            (false, false, false),
        ];
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                if !isa.supported() {
                    continue;
                }
                for (si, &(m, n, k)) in shapes.iter().enumerate() {
                    let seed = si as u64 * 13 + threads as u64;
                    let a = values(m * k, seed + 1);
                    let b = values(k * n, seed + 2);
                    let rb = values(m, seed + 3);
                    let cb = values(n, seed + 4);
                    let res_rs = n + 2;
                    let res = values(m * res_rs, seed + 5);
                    let mut packed = vec![f32::NAN; packed_a_len(m, k)];
                    pack_a_whole(isa, m, k, &a, &mut packed);
                    let ldd = n + 1;
                    let init = values(m * ldd, seed + 6);
                    for (ai, &act) in acts.iter().enumerate() {
                        let (use_rb, use_cb, use_res) = parts[(ai + si) % parts.len()];
                        let acc = (ai + si + threads) % 2 == 0;
                        let prepacked = (ai + si) % 3 == 0 && n * 4 > 32;
                        let mut want = init.clone();
                        reference(m, n, k, &mut want, ldd, acc, &a, (k, 1), &b, (n, 1), 0.5);
                        for i in 0..m {
                            for j in 0..n {
                                let mut x = want[i * ldd + j];
                                if use_rb {
                                    x += rb[i];
                                }
                                if use_cb {
                                    x += cb[j];
                                }
                                if use_res {
                                    x += res[i * res_rs + j];
                                }
                                want[i * ldd + j] = act.apply(x);
                            }
                        }
                        let epi = Epilogue {
                            row_bias: if use_rb {
                                rb.as_ptr()
                            } else {
                                std::ptr::null()
                            },
                            col_bias: if use_cb {
                                cb.as_ptr()
                            } else {
                                std::ptr::null()
                            },
                            residual: if use_res {
                                res.as_ptr()
                            } else {
                                std::ptr::null()
                            },
                            res_rs,
                            act,
                        };
                        let mut got = init.clone();
                        let dst = DstPtr(got.as_mut_ptr());
                        let bop = Operand {
                            ptr: b.as_ptr(),
                            rs: n,
                            cs: 1,
                        };
                        let aop = Operand {
                            ptr: a.as_ptr(),
                            rs: k,
                            cs: 1,
                        };
                        pool.install(|| {
                            let d = dst;
                            // SAFETY: a / packed hold m·k values, b k·n, got m·ldd, the
                            // epilogue's parts m, n and m·res_rs; isa is supported.
                            unsafe {
                                if prepacked {
                                    sgemm_packed_a_epi(
                                        isa,
                                        m,
                                        n,
                                        k,
                                        d.0,
                                        ldd,
                                        acc,
                                        packed.as_ptr(),
                                        bop,
                                        0.5,
                                        true,
                                        &epi,
                                    )
                                } else {
                                    sgemm_epi(
                                        isa, m, n, k, d.0, ldd, acc, aop, bop, 0.5, true, &epi,
                                    )
                                }
                            }
                        });
                        for i in 0..m {
                            for j in 0..ldd {
                                let (g, w) = (got[i * ldd + j], want[i * ldd + j]);
                                assert!(
                                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                                    "{isa:?} {m}x{n}x{k} {act:?} rb={use_rb} cb={use_cb} \
                                     res={use_res} acc={acc} prepacked={prepacked} at \
                                     {threads} threads: ({i}, {j}): {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Timing, not a check (`--ignored --nocapture`): conv-like products (bias per row +
    /// activation) with the epilogue in the tile store against the product followed by
    /// the conv's separate bias + activation pass; best of interleaved repetitions.
    #[test]
    #[ignore]
    fn epilogue_in_store_speed() {
        use std::time::Instant;
        let isa = Isa::detect();
        // (m, n, k): pointwise convs of the det / orientation models.
        for &(m, n, k) in &[
            (64, 25600, 32),
            (128, 6400, 64),
            (256, 1600, 128),
            (96, 6400, 96),
            (512, 196, 256),
        ] {
            for act in [
                Activation::Relu,
                Activation::HardSwish,
                Activation::Sigmoid,
                Activation::Swish,
                Activation::Tanh,
            ] {
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                let bias = values(m, 3);
                let mut packed = vec![0.0; packed_a_len(m, k)];
                pack_a_whole(isa, m, k, &a, &mut packed);
                let mut out = vec![0.0f32; m * n];
                let bop = Operand {
                    ptr: b.as_ptr(),
                    rs: n,
                    cs: 1,
                };
                let epi = Epilogue {
                    row_bias: bias.as_ptr(),
                    act,
                    ..Epilogue::NONE
                };
                let (mut sep, mut fused) = (f64::MAX, f64::MAX);
                for _ in 0..15 {
                    let t = Instant::now();
                    // SAFETY: sizes as allocated above; isa detected.
                    unsafe {
                        sgemm_packed_a(
                            isa,
                            m,
                            n,
                            k,
                            out.as_mut_ptr(),
                            n,
                            false,
                            packed.as_ptr(),
                            bop,
                            1.0,
                            false,
                        )
                    };
                    for (r, row) in out.chunks_exact_mut(n).enumerate() {
                        crate::ops::conv::kernel::epilogue(row, bias[r], act);
                    }
                    sep = sep.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    // SAFETY: as above; the epilogue covers m rows.
                    unsafe {
                        sgemm_packed_a_epi(
                            isa,
                            m,
                            n,
                            k,
                            out.as_mut_ptr(),
                            n,
                            false,
                            packed.as_ptr(),
                            bop,
                            1.0,
                            false,
                            &epi,
                        )
                    };
                    fused = fused.min(t.elapsed().as_secs_f64());
                }
                eprintln!(
                    "{isa:?} {m}x{n}x{k} {act:?}: separate {:.3} ms, in store {:.3} ms ({:+.1} %)",
                    sep * 1e3,
                    fused * 1e3,
                    (fused / sep - 1.0) * 100.0
                );
            }
        }
    }

    /// The grid never has more tasks than threads, keeps small products in one task and
    /// splits rows when there are fewer column strips than threads.
    #[test]
    fn split_grid_picks_the_dimension_with_the_most_work() {
        for a_per_call in [false, true] {
            let grid = |m, n, k, t| split_grid(m, n, k, (8, 32), t, a_per_call);
            assert_eq!(grid(256, 196, 256, 1), (1, 1));
            assert_eq!(grid(8, 32, 8, 2), (1, 1));
            assert_eq!(grid(256, 49, 256, 2), (2, 1));
            assert_eq!(grid(16, 4096, 27, 2), (1, 2));
            for (m, n, k, t) in [(577, 150, 71, 3), (1000, 17, 33, 4), (5, 5000, 300, 3)] {
                let (r, c) = grid(m, n, k, t);
                assert!(r * c <= t && r >= 1 && c >= 1, "{m}x{n}x{k}/{t}: {r}x{c}");
            }
        }
        // A tie (784 rows, 256 columns, 2 threads): split the operand packed on every call
        // that is larger — A's rows when A is packed per call (channels-last activations),
        // B's columns when A was packed at build time.
        assert_eq!(split_grid(784, 256, 256, (8, 32), 2, true), (2, 1));
        assert_eq!(split_grid(784, 256, 256, (8, 32), 2, false), (1, 2));
    }
}
