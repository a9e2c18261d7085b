//! Helpers shared by the data-movement ops: axis normalisation, fact access, a dtype-generic
//! "mover" abstraction (one kernel body for every pod dtype and for strings) and a strided
//! copy engine that does block copies over the innermost contiguous run.

use kiln_core::{AlignedBuf, DType, Dim, Fact, KilnError, Result, Tensor, TensorMut, Value};
use rayon::prelude::*;

/// Dimension lists, inline up to rank 8 (kernels plan without allocating).
pub(crate) type Dims = smallvec::SmallVec<[usize; 8]>;
/// Signed strides, inline up to rank 8.
pub(crate) type IStrides = smallvec::SmallVec<[isize; 8]>;
/// Integer lists read from small inputs (axes, pads, starts), inline up to 8.
pub(crate) type Ints = smallvec::SmallVec<[i64; 8]>;

/// Largest output (in bytes) a data-movement op will allocate; guards against absurd
/// sizes coming from untrusted shape tensors.
pub(crate) const MAX_OUTPUT_BYTES: usize = 1 << 38;

/// Outputs with at least this many elements are filled in parallel.
pub(crate) const PAR_THRESHOLD: usize = 1 << 18;

/// A kernel error for `op`.
pub(crate) fn kerr(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::kernel(op, msg)
}

/// A shape-inference error for `op` (the graph adds the node name).
pub(crate) fn ierr(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::Inference {
        node: String::new(),
        op: op.to_string(),
        msg: msg.into(),
    }
}

/// Normalises a possibly negative axis into `0..rank`.
pub(crate) fn norm_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(kerr(
            op,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

/// Normalises a list of axes, rejecting duplicates.
pub(crate) fn norm_axes(op: &str, axes: &[i64], rank: usize) -> Result<Dims> {
    let mut out = Dims::new();
    for &a in axes {
        let n = norm_axis(op, a, rank)?;
        if out.contains(&n) {
            return Err(kerr(op, format!("axis {a} is repeated in {axes:?}")));
        }
        out.push(n);
    }
    Ok(out)
}

/// Element count of a shape with overflow and size checks.
pub(crate) fn checked_numel(op: &str, shape: &[usize], elem_size: usize) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .ok_or_else(|| kerr(op, format!("output shape {shape:?} is too large")))?;
    }
    let bytes = n.checked_mul(elem_size.max(1));
    match bytes {
        Some(b) if b <= MAX_OUTPUT_BYTES => Ok(n),
        _ => Err(kerr(op, format!("output shape {shape:?} is too large"))),
    }
}

/// Converts i64 dims from a shape tensor into usize, rejecting negatives.
pub(crate) fn to_dims(op: &str, v: &[i64]) -> Result<Dims> {
    v.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| kerr(op, format!("invalid dimension {d} in {v:?}")))
        })
        .collect()
}

/// The `i`-th input fact, if present.
pub(crate) fn fact_at<'a>(inputs: &[Option<&'a Fact>], i: usize) -> Option<&'a Fact> {
    inputs.get(i).copied().flatten()
}

/// The constant integer values of an input fact, when known.
pub(crate) fn konst_ints(f: Option<&Fact>) -> Option<Vec<i64>> {
    f?.konst.as_ref()?.to_i64_vec().ok()
}

/// A tensor fact with the given dtype (possibly unknown) and shape (possibly unknown).
pub(crate) fn tensor_fact(dtype: Option<DType>, shape: Option<Vec<Dim>>) -> Fact {
    Fact {
        dtype,
        shape,
        ..Fact::default()
    }
}

/// An integer input as a list of i64 (for shapes, axes, pads); `None` when absent.
pub(crate) fn opt_ints_input(
    inputs: &[Option<&Value>],
    i: usize,
    op: &str,
) -> Result<Option<Ints>> {
    match kiln_core::optional_tensor(inputs, i, op)? {
        Some(t) => tensor_ints(t)
            .map(Some)
            .map_err(|e| kerr(op, format!("input {i}: {e}"))),
        None => Ok(None),
    }
}

/// The elements of an integer tensor as i64, inline up to 8 (no allocation for the small
/// shape, axis and pad lists these inputs hold).
pub(crate) fn tensor_ints(t: &Tensor) -> Result<Ints> {
    Ok(match t.dtype() {
        DType::I64 => t.as_slice::<i64>()?.iter().copied().collect(),
        DType::I32 => t.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
        _ => t.to_i64_vec()?.into_iter().collect(),
    })
}

/// An integer input as a list of i64; error when absent.
pub(crate) fn ints_input(inputs: &[Option<&Value>], i: usize, op: &str) -> Result<Ints> {
    opt_ints_input(inputs, i, op)?.ok_or_else(|| kerr(op, format!("required input {i} is missing")))
}

/// A kernel written once for every element type: `srcs` are the input elements (all of
/// the output's dtype), `dst` the output, pre-filled with zeros / empty strings.
pub(crate) trait Mover: Sync {
    /// Fills `dst` from `srcs`.
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()>;
}

fn check_dtypes(op: &str, srcs: &[&Tensor], dtype: DType) -> Result<()> {
    for (i, s) in srcs.iter().enumerate() {
        if s.dtype() != dtype {
            return Err(kerr(
                op,
                format!("input {i} has dtype {}, expected {dtype}", s.dtype()),
            ));
        }
    }
    Ok(())
}

/// Runs a mover into a freshly allocated tensor of `dtype` and `shape`.
pub(crate) fn move_data<M: Mover>(
    m: &M,
    op: &str,
    srcs: &[&Tensor],
    dtype: DType,
    shape: &[usize],
) -> Result<Tensor> {
    check_dtypes(op, srcs, dtype)?;
    let n = checked_numel(op, shape, dtype.size())?;
    if dtype == DType::String {
        let views: Vec<&[String]> = srcs.iter().map(|t| t.as_strings()).collect::<Result<_>>()?;
        let mut out = vec![String::new(); n];
        m.run(&views, &mut out)?;
        return Tensor::from_strings(shape, out);
    }
    crate::dispatch_pod!(dtype, T => {
        let views: Vec<&[T]> = srcs.iter().map(|t| t.as_raw::<T>()).collect::<Result<_>>()?;
        let mut buf = AlignedBuf::zeroed(n * dtype.size());
        {
            let dst: &mut [T] = bytemuck::try_cast_slice_mut(buf.as_mut_slice())
                .map_err(|e| kerr(op, format!("misaligned output buffer: {e}")))?;
            m.run(&views, dst)?;
        }
        Tensor::from_aligned(dtype, shape, buf)
    }, _ => Err(kerr(op, format!("unsupported dtype {dtype}"))))
}

/// Runs a mover into a pre-planned output slot (must have the expected shape).
pub(crate) fn move_into<M: Mover>(
    m: &M,
    op: &str,
    srcs: &[&Tensor],
    out: &mut TensorMut<'_>,
    shape: &[usize],
) -> Result<()> {
    let dtype = out.dtype();
    check_dtypes(op, srcs, dtype)?;
    if out.shape() != shape {
        return Err(kerr(
            op,
            format!(
                "output slot has shape {:?}, the kernel produces {shape:?}",
                out.shape()
            ),
        ));
    }
    crate::dispatch_pod!(dtype, T => {
        let views: smallvec::SmallVec<[&[T]; 4]> =
            srcs.iter().map(|t| t.as_raw::<T>()).collect::<Result<_>>()?;
        let dst = out.as_raw_mut::<T>()?;
        m.run(&views, dst)
    }, _ => Err(kerr(op, format!("unsupported output dtype {dtype}"))))
}

/// A strided view of a source buffer: element `(i0, .., ik)` of the view (row-major over
/// `shape`) is `src[offset + sum(i_j * strides[j])]`. Strides may be zero (broadcast) or
/// negative (reversed slices).
#[derive(Debug, Clone)]
pub(crate) struct StridedView {
    /// The view's shape (the output shape).
    pub shape: Dims,
    /// Source stride of each view dim, in elements.
    pub strides: IStrides,
    /// Source offset of the first element.
    pub offset: usize,
}

impl StridedView {
    /// Drops size-1 dims and merges adjacent dims that are contiguous with each other.
    pub fn simplified(&self) -> StridedView {
        let mut shape = Dims::new();
        let mut strides = IStrides::new();
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            if d == 1 {
                continue;
            }
            if let (Some(&ld), Some(&ls)) = (shape.last(), strides.last()) {
                if ls == s * d as isize {
                    let k = shape.len() - 1;
                    shape[k] = ld * d;
                    strides[k] = s;
                    continue;
                }
            }
            shape.push(d);
            strides.push(s);
        }
        if shape.is_empty() {
            shape.push(1);
            strides.push(1);
        }
        StridedView {
            shape,
            strides,
            offset: self.offset,
        }
    }

    /// Copies the view into `dst` (which has `numel(shape)` elements).
    pub fn copy_to<T: Clone + Send + Sync>(&self, src: &[T], dst: &mut [T]) {
        let v = self.simplified();
        if dst.is_empty() || v.shape.contains(&0) {
            return;
        }
        let rank = v.shape.len();
        let inner = v.shape[rank - 1];
        // Classic 2-D transpose pattern: use a tiled copy for cache friendliness.
        if rank >= 2
            && v.strides[rank - 1] != 1
            && v.strides[rank - 2] == 1
            && inner >= 8
            && v.shape[rank - 2] >= 8
        {
            let block = v.shape[rank - 2] * inner;
            let total = dst.len() / block;
            let run = |chunk: &mut [T], first: usize| {
                for (k, b) in chunk.chunks_mut(block).enumerate() {
                    let base = v.outer_offset(first + k, 2);
                    tile_transpose(src, b, base, v.shape[rank - 2], inner, v.strides[rank - 1]);
                }
            };
            par_blocks(dst, block, total, run);
            return;
        }
        let rows = dst.len() / inner;
        let s = v.strides[rank - 1];
        let run = |chunk: &mut [T], first_row: usize| {
            let mut idx: Dims = smallvec::smallvec![0usize; rank - 1];
            let mut rem = first_row;
            for d in (0..rank - 1).rev() {
                idx[d] = rem % v.shape[d];
                rem /= v.shape[d];
            }
            let mut base = v.offset as isize
                + idx
                    .iter()
                    .zip(&v.strides)
                    .map(|(&i, &st)| i as isize * st)
                    .sum::<isize>();
            for row in chunk.chunks_mut(inner) {
                copy_row(src, row, base, s);
                // advance the odometer over the outer dims
                for d in (0..rank - 1).rev() {
                    idx[d] += 1;
                    base += v.strides[d];
                    if idx[d] < v.shape[d] {
                        break;
                    }
                    base -= v.strides[d] * v.shape[d] as isize;
                    idx[d] = 0;
                }
            }
        };
        par_blocks(dst, inner, rows, run);
    }

    /// Source offset of outer block `k`, where the last `skip` dims form the block.
    fn outer_offset(&self, k: usize, skip: usize) -> isize {
        let rank = self.shape.len();
        let mut rem = k;
        let mut off = self.offset as isize;
        for d in (0..rank - skip).rev() {
            off += (rem % self.shape[d]) as isize * self.strides[d];
            rem /= self.shape[d];
        }
        off
    }
}

/// Splits `dst` (made of `n_blocks` blocks of `block` elements) into chunks, in parallel
/// when large, calling `f(chunk, index_of_first_block)`.
pub(crate) fn par_blocks<T: Send, F>(dst: &mut [T], block: usize, n_blocks: usize, f: F)
where
    F: Fn(&mut [T], usize) + Sync,
{
    let total = dst.len();
    let threads = crate::parallel::threads();
    if total < PAR_THRESHOLD || threads < 2 || n_blocks < 2 {
        f(dst, 0);
        return;
    }
    let per_task = n_blocks.div_ceil(threads * 4).max(1);
    dst.par_chunks_mut(per_task * block)
        .enumerate()
        .for_each(|(i, c)| f(c, i * per_task));
}

#[inline]
fn copy_row<T: Clone>(src: &[T], row: &mut [T], base: isize, stride: isize) {
    let b = base as usize;
    match stride {
        1 => row.clone_from_slice(&src[b..b + row.len()]),
        0 => row.fill(src[b].clone()),
        _ => {
            let mut p = base;
            for x in row.iter_mut() {
                *x = src[p as usize].clone();
                p += stride;
            }
        }
    }
}

/// dst is `rows x cols` row-major; dst[r][c] = src[base + r + c * col_stride].
fn tile_transpose<T: Clone>(
    src: &[T],
    dst: &mut [T],
    base: isize,
    rows: usize,
    cols: usize,
    col_stride: isize,
) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            for r in r0..r1 {
                let drow = &mut dst[r * cols + c0..r * cols + c1];
                let mut p = base + r as isize + c0 as isize * col_stride;
                for x in drow.iter_mut() {
                    *x = src[p as usize].clone();
                    p += col_stride;
                }
            }
        }
    }
}

/// A mover that copies one strided view of its single source.
pub(crate) struct ViewMover(pub StridedView);

impl Mover for ViewMover {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        self.0.copy_to(srcs[0], dst);
        Ok(())
    }
}

/// A mover that copies `block`-element runs: output block k is
/// `src[offsets[k]..offsets[k] + block]` (`None` leaves the pre-filled default, zero).
pub(crate) struct BlockGather {
    /// Source offset of each output block.
    pub offsets: Vec<Option<usize>>,
    /// Elements per block.
    pub block: usize,
}

impl Mover for BlockGather {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        let src = srcs[0];
        let b = self.block;
        if b == 0 || dst.is_empty() {
            return Ok(());
        }
        if self.offsets.len() * b != dst.len() {
            return Err(kerr(
                "gather",
                "internal error: block count does not match output size",
            ));
        }
        for o in self.offsets.iter().flatten() {
            if o + b > src.len() {
                return Err(kerr("gather", "internal error: block out of range"));
            }
        }
        if b == 1 {
            for (d, o) in dst.iter_mut().zip(&self.offsets) {
                if let Some(o) = o {
                    *d = src[*o].clone();
                }
            }
            return Ok(());
        }
        par_blocks(dst, b, self.offsets.len(), |chunk, first| {
            for (k, out) in chunk.chunks_mut(b).enumerate() {
                if let Some(o) = self.offsets[first + k] {
                    out.clone_from_slice(&src[o..o + b]);
                }
            }
        });
        Ok(())
    }
}

/// Index values of an integer tensor normalised against `dim` (negative counts from the
/// end); errors name the op and the bad index.
pub(crate) fn norm_indices(op: &str, t: &Tensor, dim: usize) -> Result<Dims> {
    let v = tensor_ints(t).map_err(|e| kerr(op, format!("indices: {e}")))?;
    let d = dim as i64;
    v.iter()
        .map(|&i| {
            let j = if i < 0 { i + d } else { i };
            if j < 0 || j >= d {
                Err(kerr(
                    op,
                    format!("index {i} is out of range for a dim of size {dim}"),
                ))
            } else {
                Ok(j as usize)
            }
        })
        .collect()
}

/// Row-major strides as isize.
pub(crate) fn istrides(shape: &[usize]) -> IStrides {
    kiln_core::strides(shape)
        .iter()
        .map(|&s| s as isize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_view_transpose_and_broadcast() {
        let src: Vec<u32> = (0..6).collect();
        // transpose 2x3 -> 3x2
        let v = StridedView {
            shape: smallvec::smallvec![3, 2],
            strides: smallvec::smallvec![1, 3],
            offset: 0,
        };
        let mut dst = vec![0u32; 6];
        v.copy_to(&src, &mut dst);
        assert_eq!(dst, vec![0, 3, 1, 4, 2, 5]);
        // broadcast a row
        let v = StridedView {
            shape: smallvec::smallvec![2, 3],
            strides: smallvec::smallvec![0, 1],
            offset: 0,
        };
        v.copy_to(&src, &mut dst);
        assert_eq!(dst, vec![0, 1, 2, 0, 1, 2]);
        // reversed
        let v = StridedView {
            shape: smallvec::smallvec![6],
            strides: smallvec::smallvec![-1],
            offset: 5,
        };
        v.copy_to(&src, &mut dst);
        assert_eq!(dst, vec![5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn tiled_transpose_large() {
        let (m, n) = (67usize, 45usize);
        let src: Vec<u64> = (0..(m * n) as u64).collect();
        let v = StridedView {
            shape: smallvec::smallvec![2, n, m],
            strides: smallvec::smallvec![0, 1, n as isize],
            offset: 0,
        };
        let mut dst = vec![0u64; 2 * m * n];
        v.copy_to(&src, &mut dst);
        for b in 0..2 {
            for i in 0..n {
                for j in 0..m {
                    assert_eq!(dst[b * m * n + i * m + j], src[j * n + i]);
                }
            }
        }
    }

    #[test]
    fn parallel_path_matches() {
        let (a, b, c) = (64usize, 128usize, 40usize);
        let src: Vec<u32> = (0..(a * b * c) as u32).collect();
        let v = StridedView {
            shape: smallvec::smallvec![b, a, c],
            strides: smallvec::smallvec![c as isize, (b * c) as isize, 1],
            offset: 0,
        };
        let mut dst = vec![0u32; a * b * c];
        v.copy_to(&src, &mut dst);
        for i in 0..b {
            for j in 0..a {
                for k in 0..c {
                    assert_eq!(dst[(i * a + j) * c + k], src[(j * b + i) * c + k]);
                }
            }
        }
    }
}
