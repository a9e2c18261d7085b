//! Numpy-style broadcasting: output shapes and kernels that walk several inputs of
//! broadcast-compatible shapes in one pass.
//!
//! A [`Plan`] coalesces dimensions where every input is either contiguous or broadcast,
//! so the hot loop runs over the last (coalesced) dimension with each input's stride being
//! 1 (contiguous) or 0 (broadcast). Same-shape, scalar and row broadcasting therefore all
//! become plain loops over slices that the compiler vectorizes. Large outputs are split
//! into chunks processed with rayon.

use kiln_core::{KilnError, Result};
use rayon::prelude::*;
use smallvec::SmallVec;

/// Outputs with at least this many elements are computed in parallel.
pub const PAR_MIN: usize = 1 << 16;
/// Elements per parallel chunk.
pub const PAR_CHUNK: usize = 1 << 14;

/// Inline dimension lists (no heap allocation up to rank 6).
pub type Dims = SmallVec<[usize; 6]>;

/// The numpy broadcast of several shapes, or a kernel error naming `op`.
pub fn broadcast_shape(op: &str, shapes: &[&[usize]]) -> Result<Dims> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out: Dims = smallvec::smallvec![1usize; rank];
    for s in shapes {
        for (j, &d) in s.iter().enumerate() {
            let o = &mut out[rank - s.len() + j];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                let all: Vec<_> = shapes.iter().map(|s| format!("{s:?}")).collect();
                return Err(KilnError::kernel(
                    op,
                    format!("shapes {} cannot be broadcast together", all.join(", ")),
                ));
            }
        }
    }
    Ok(out)
}

/// How to walk a broadcast: coalesced outer dims and per-input strides, plus the length
/// and per-input stride (0 or 1) of the innermost run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The broadcast output shape.
    pub out_shape: Dims,
    dims: Dims,
    strides: SmallVec<[Dims; 4]>,
    inner: usize,
    inner_strides: SmallVec<[usize; 4]>,
}

impl Plan {
    /// Plans the broadcast of `shapes` (one per input).
    pub fn new(op: &str, shapes: &[&[usize]]) -> Result<Plan> {
        let out_shape = broadcast_shape(op, shapes)?;
        let rank = out_shape.len();
        let aligned: SmallVec<[Dims; 4]> = shapes
            .iter()
            .map(|s| {
                let own = kiln_core::strides(s);
                (0..rank)
                    .map(|i| {
                        if i + s.len() < rank {
                            0
                        } else {
                            let j = i + s.len() - rank;
                            if s[j] == 1 {
                                0
                            } else {
                                own[j]
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        let mut dims: Dims = SmallVec::new();
        let mut strides: SmallVec<[Dims; 4]> = smallvec::smallvec![SmallVec::new(); shapes.len()];
        for (i, &d) in out_shape.iter().enumerate() {
            if d == 1 {
                continue;
            }
            let mergeable = !dims.is_empty()
                && strides
                    .iter()
                    .zip(&aligned)
                    .all(|(c, s)| c.last().copied() == Some(s[i] * d));
            if mergeable {
                if let Some(last) = dims.last_mut() {
                    *last *= d;
                }
                for (c, s) in strides.iter_mut().zip(&aligned) {
                    if let Some(l) = c.last_mut() {
                        *l = s[i];
                    }
                }
            } else {
                dims.push(d);
                for (c, s) in strides.iter_mut().zip(&aligned) {
                    c.push(s[i]);
                }
            }
        }
        let inner = dims.pop().unwrap_or(1);
        let inner_strides = strides.iter_mut().map(|c| c.pop().unwrap_or(0)).collect();
        Ok(Plan {
            out_shape,
            dims,
            strides,
            inner,
            inner_strides,
        })
    }

    /// Number of output elements.
    pub fn len(&self) -> usize {
        self.out_shape.iter().product()
    }

    /// True when the output is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Input offsets of the first element of output row `row` (rows have `inner` elements).
    fn offsets(&self, mut row: usize) -> (Dims, SmallVec<[usize; 4]>) {
        let mut coords: Dims = smallvec::smallvec![0; self.dims.len()];
        let mut offs: SmallVec<[usize; 4]> = smallvec::smallvec![0; self.strides.len()];
        for i in (0..self.dims.len()).rev() {
            let c = row % self.dims[i];
            row /= self.dims[i];
            coords[i] = c;
            for (o, s) in offs.iter_mut().zip(&self.strides) {
                *o += c * s[i];
            }
        }
        (coords, offs)
    }

    fn advance(&self, coords: &mut Dims, offs: &mut [usize]) {
        for i in (0..self.dims.len()).rev() {
            coords[i] += 1;
            for (o, s) in offs.iter_mut().zip(&self.strides) {
                *o += s[i];
            }
            if coords[i] < self.dims[i] {
                return;
            }
            for (o, s) in offs.iter_mut().zip(&self.strides) {
                *o -= s[i] * self.dims[i];
            }
            coords[i] = 0;
        }
    }

    /// Runs `row(offsets, inner_strides, out_row)` for every output row, in parallel for
    /// large outputs.
    fn run_rows<O: Send>(&self, out: &mut [O], row: &(impl Fn(&[usize], &mut [O]) + Sync)) {
        let n = self.inner;
        if n == 0 || out.is_empty() {
            return;
        }
        let work = |row0: usize, chunk: &mut [O]| {
            let (mut coords, mut offs) = self.offsets(row0);
            for orow in chunk.chunks_mut(n) {
                row(&offs, orow);
                self.advance(&mut coords, &mut offs);
            }
        };
        if out.len() >= PAR_MIN && crate::parallel::enabled() {
            let rows_per_chunk = (PAR_CHUNK / n).max(1);
            out.par_chunks_mut(rows_per_chunk * n)
                .enumerate()
                .for_each(|(ci, ch)| work(ci * rows_per_chunk, ch));
        } else {
            work(0, out);
        }
    }

    /// `out[i] = f(a[..], b[..])` over the broadcast; `out` must hold [`Plan::len`] elements.
    pub fn binary<A: Sync, B: Sync, O: Send>(
        &self,
        a: &[A],
        b: &[B],
        out: &mut [O],
        f: impl Fn(&A, &B) -> O + Sync,
    ) {
        let (sa, sb) = (self.inner_strides[0], self.inner_strides[1]);
        self.run_rows(out, &|offs: &[usize], o: &mut [O]| {
            row2(&a[offs[0]..], sa, &b[offs[1]..], sb, o, &f);
        });
    }

    /// `out[i] = f(a[..], b[..], c[..])` over the broadcast of three inputs.
    pub fn ternary<A: Sync, B: Sync, C: Sync, O: Send>(
        &self,
        a: &[A],
        b: &[B],
        c: &[C],
        out: &mut [O],
        f: impl Fn(&A, &B, &C) -> O + Sync,
    ) {
        let (sa, sb, sc) = (
            self.inner_strides[0],
            self.inner_strides[1],
            self.inner_strides[2],
        );
        self.run_rows(out, &|offs: &[usize], o: &mut [O]| {
            let (a, b, c) = (&a[offs[0]..], &b[offs[1]..], &c[offs[2]..]);
            for (i, v) in o.iter_mut().enumerate() {
                *v = f(&a[i * sa], &b[i * sb], &c[i * sc]);
            }
        });
    }

    /// For each output element, the flat index into every input (for kernels that need
    /// random access, e.g. string ops).
    pub fn indices(&self) -> Vec<SmallVec<[usize; 4]>> {
        let mut out = Vec::with_capacity(self.len());
        if self.is_empty() {
            return out;
        }
        let rows = self.len() / self.inner;
        let (mut coords, mut offs) = self.offsets(0);
        for _ in 0..rows {
            for i in 0..self.inner {
                out.push(
                    offs.iter()
                        .zip(&self.inner_strides)
                        .map(|(o, s)| o + i * s)
                        .collect(),
                );
            }
            self.advance(&mut coords, &mut offs);
        }
        out
    }
}

#[inline(always)]
fn row2<A, B, O>(a: &[A], sa: usize, b: &[B], sb: usize, out: &mut [O], f: &impl Fn(&A, &B) -> O) {
    let n = out.len();
    match (sa, sb) {
        (1, 1) => {
            for ((o, x), y) in out.iter_mut().zip(&a[..n]).zip(&b[..n]) {
                *o = f(x, y);
            }
        }
        (1, _) => {
            let y = &b[0];
            for (o, x) in out.iter_mut().zip(&a[..n]) {
                *o = f(x, y);
            }
        }
        (_, 1) => {
            let x = &a[0];
            for (o, y) in out.iter_mut().zip(&b[..n]) {
                *o = f(x, y);
            }
        }
        _ => {
            for o in out.iter_mut() {
                *o = f(&a[0], &b[0]);
            }
        }
    }
}

/// `out[i] = f(&x[i])`, in parallel for large slices.
pub fn map_into<A: Sync, O: Send>(x: &[A], out: &mut [O], f: impl Fn(&A) -> O + Sync) {
    if out.len() >= PAR_MIN && crate::parallel::enabled() {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK))
            .for_each(|(o, x)| {
                for (o, v) in o.iter_mut().zip(x) {
                    *o = f(v);
                }
            });
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = f(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(shapes: &[&[usize]]) -> Vec<Vec<usize>> {
        let out = broadcast_shape("T", shapes).unwrap();
        let n: usize = out.iter().product();
        let ostr = kiln_core::strides(&out);
        (0..n)
            .map(|i| {
                shapes
                    .iter()
                    .map(|s| {
                        let st = kiln_core::strides(s);
                        let mut idx = 0;
                        for (k, &d) in s.iter().enumerate() {
                            let od = k + out.len() - s.len();
                            let c = (i / ostr[od]) % out[od];
                            if d != 1 {
                                idx += c * st[k];
                            }
                        }
                        idx
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn indices_match_naive() {
        let cases: Vec<Vec<&[usize]>> = vec![
            vec![&[2, 3, 4], &[4]],
            vec![&[2, 1, 4], &[3, 1]],
            vec![&[], &[3, 2]],
            vec![&[5, 1, 1, 3], &[1, 7, 1, 1], &[7, 2, 3]],
            vec![&[1], &[1]],
            vec![&[2, 3], &[2, 3]],
        ];
        for c in cases {
            let p = Plan::new("T", &c).unwrap();
            let got: Vec<Vec<usize>> = p.indices().into_iter().map(|v| v.to_vec()).collect();
            assert_eq!(got, naive(&c), "{c:?}");
        }
    }

    #[test]
    fn bad_broadcast_is_error() {
        assert!(Plan::new("Add", &[&[2, 3], &[4]]).is_err());
    }

    #[test]
    fn binary_large_parallel() {
        let a: Vec<f32> = (0..(300 * 517)).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..517).map(|i| i as f32 * 0.5).collect();
        let p = Plan::new("Add", &[&[300, 517], &[517]]).unwrap();
        let mut out = vec![0f32; p.len()];
        p.binary(&a, &b, &mut out, |x, y| x + y);
        for (i, o) in out.iter().enumerate() {
            assert_eq!(*o, a[i] + b[i % 517]);
        }
        let p = Plan::new("Add", &[&[300, 1], &[1, 517]]).unwrap();
        p.binary(&a[..300], &b, &mut out, |x, y| x * y);
        for (i, o) in out.iter().enumerate() {
            assert_eq!(*o, a[i / 517] * b[i % 517]);
        }
    }
}
