//! ScatterElements (and the deprecated Scatter), ScatterND, TensorScatter.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Fact, Op, Result, Tensor, Value};

use super::gather::{elementwise_offsets, nd_offsets};
use crate::ops::shape::common::*;

/// How an update combines with the existing element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn parse_reduction(ctx: &BuildCtx) -> Result<Reduction> {
    let a = ctx.attrs();
    match a.string("reduction", "none")?.as_str() {
        "none" => Ok(Reduction::None),
        "add" => Ok(Reduction::Add),
        "mul" => Ok(Reduction::Mul),
        "max" => Ok(Reduction::Max),
        "min" => Ok(Reduction::Min),
        r => Err(a.invalid(format!("unknown reduction {r}"))),
    }
}

/// Copies the data into the output, then writes update blocks: block k of the updates
/// (`block` elements from `src_offs[k]`) goes to `dst_offs[k]`.
struct WriteBlocks {
    dst_offs: Vec<usize>,
    src_offs: Vec<usize>,
    block: usize,
}

impl Mover for WriteBlocks {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        let (data, upd) = (srcs[0], srcs[1]);
        dst.clone_from_slice(data);
        let b = self.block;
        for (&d, &s) in self.dst_offs.iter().zip(&self.src_offs) {
            if d + b > dst.len() || s + b > upd.len() {
                return Err(kerr("scatter", "internal error: block out of range"));
            }
            dst[d..d + b].clone_from_slice(&upd[s..s + b]);
        }
        Ok(())
    }
}

/// Applies blocks with a reduction, for numeric dtypes.
fn reduce_blocks(
    op: &str,
    data: &Tensor,
    upd: &Tensor,
    dst_offs: &[usize],
    block: usize,
    red: Reduction,
) -> Result<Tensor> {
    fn go<T>(
        data: &Tensor,
        upd: &Tensor,
        dst_offs: &[usize],
        block: usize,
        red: Reduction,
    ) -> Result<Tensor>
    where
        T: kiln_core::Element
            + Copy
            + PartialOrd
            + std::ops::Add<Output = T>
            + std::ops::Mul<Output = T>,
    {
        let mut out = data.as_slice::<T>()?.to_vec();
        let u = upd.as_slice::<T>()?;
        for (k, &d) in dst_offs.iter().enumerate() {
            for j in 0..block {
                let (o, v) = (&mut out[d + j], u[k * block + j]);
                *o = match red {
                    Reduction::None => v,
                    Reduction::Add => *o + v,
                    Reduction::Mul => *o * v,
                    Reduction::Max => {
                        if v > *o {
                            v
                        } else {
                            *o
                        }
                    }
                    Reduction::Min => {
                        if v < *o {
                            v
                        } else {
                            *o
                        }
                    }
                };
            }
        }
        Tensor::from_vec(data.shape(), out)
    }
    if upd.dtype() != data.dtype() {
        return Err(kerr(
            op,
            format!(
                "updates dtype {} differs from data dtype {}",
                upd.dtype(),
                data.dtype()
            ),
        ));
    }
    if dst_offs.iter().any(|&d| d + block > data.len()) || dst_offs.len() * block > upd.len() {
        return Err(kerr(op, "internal error: block out of range"));
    }
    if data.dtype() == DType::Bool {
        // or / and semantics for add / mul, max / min.
        let b = Tensor::from_vec(
            data.shape(),
            data.as_bools()?.iter().map(|&v| v as u8).collect(),
        )?;
        let ub = Tensor::from_vec(
            upd.shape(),
            upd.as_bools()?.iter().map(|&v| v as u8).collect(),
        )?;
        let r = go::<u8>(&b, &ub, dst_offs, block, red)?;
        let bools: Vec<bool> = r.as_slice::<u8>()?.iter().map(|&v| v != 0).collect();
        return Tensor::from_bools(data.shape(), &bools);
    }
    crate::dispatch_numeric!(data.dtype(), T => go::<T>(data, upd, dst_offs, block, red),
        _ => Err(kerr(op, format!("reduction is not supported for dtype {}", data.dtype()))))
}

fn scatter(
    op: &str,
    data: &Tensor,
    upd: &Tensor,
    dst_offs: Vec<usize>,
    block: usize,
    red: Reduction,
) -> Result<Tensor> {
    if red == Reduction::None {
        let src_offs = (0..dst_offs.len()).map(|k| k * block).collect();
        let m = WriteBlocks {
            dst_offs,
            src_offs,
            block,
        };
        if upd.len() < m.dst_offs.len() * block {
            return Err(kerr(op, "updates are smaller than the indices"));
        }
        return move_data(&m, op, &[data, upd], data.dtype(), data.shape());
    }
    reduce_blocks(op, data, upd, &dst_offs, block, red)
}

fn same_as_data(inputs: &[Option<&Fact>]) -> Vec<Fact> {
    let mut f = fact_at(inputs, 0).cloned().unwrap_or_default();
    f.konst = None;
    vec![f]
}

// ---------------------------------------------------------------------------------------

/// `ScatterElements` / `Scatter`: writes updates at per-element indices along an axis.
#[derive(Debug)]
pub struct ScatterElements {
    axis: i64,
    reduction: Reduction,
    name: &'static str,
}

/// Builds `ScatterElements`.
pub fn build_scatter_elements(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(ScatterElements {
        axis: ctx.attrs().int("axis", 0)?,
        reduction: parse_reduction(ctx)?,
        name: "ScatterElements",
    }))
}

/// Builds the deprecated `Scatter` (same as ScatterElements without reduction).
pub fn build_scatter(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(ScatterElements {
        axis: ctx.attrs().int("axis", 0)?,
        reduction: Reduction::None,
        name: "Scatter",
    }))
}

impl Op for ScatterElements {
    fn op_type(&self) -> &str {
        self.name
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(same_as_data(inputs))
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = self.name;
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let it = kiln_core::input_tensor(inputs, 1, op)?;
        let upd = kiln_core::input_tensor(inputs, 2, op)?;
        if it.shape() != upd.shape() {
            return Err(kerr(
                op,
                format!(
                    "indices {:?} and updates {:?} differ in shape",
                    it.shape(),
                    upd.shape()
                ),
            ));
        }
        let axis = norm_axis(op, self.axis, x.rank())?;
        let idx = norm_indices(op, it, x.shape()[axis])?;
        let offs = elementwise_offsets(op, x.shape(), it.shape(), axis, &idx)?;
        Ok(vec![scatter(op, x, upd, offs, 1, self.reduction)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `ScatterND`: writes update slices at index tuples.
#[derive(Debug)]
pub struct ScatterND {
    reduction: Reduction,
}

/// Builds `ScatterND`.
pub fn build_scatter_nd(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(ScatterND {
        reduction: parse_reduction(ctx)?,
    }))
}

impl Op for ScatterND {
    fn op_type(&self) -> &str {
        "ScatterND"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(same_as_data(inputs))
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "ScatterND";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let it = kiln_core::input_tensor(inputs, 1, op)?;
        let upd = kiln_core::input_tensor(inputs, 2, op)?;
        let (offs, block, ushape) = nd_offsets(op, x.shape(), it, 0)?;
        if upd.shape() != ushape.as_slice() {
            return Err(kerr(
                op,
                format!("updates shape {:?}, expected {ushape:?}", upd.shape()),
            ));
        }
        Ok(vec![
            scatter(op, x, upd, offs, block, self.reduction)?.into()
        ])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `TensorScatter` (opset 24): writes `update` into a KV cache along `axis` at per-batch
/// positions `write_indices` (linear, or circular modulo the cache length).
#[derive(Debug)]
pub struct TensorScatter {
    axis: i64,
    circular: bool,
}

/// Builds `TensorScatter`.
pub fn build_tensor_scatter(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let circular = match a.string("mode", "linear")?.as_str() {
        "linear" => false,
        "circular" => true,
        m => return Err(a.invalid(format!("unknown mode {m}"))),
    };
    Ok(Box::new(TensorScatter {
        axis: a.int("axis", -2)?,
        circular,
    }))
}

impl Op for TensorScatter {
    fn op_type(&self) -> &str {
        "TensorScatter"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(same_as_data(inputs))
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "TensorScatter";
        let cache = kiln_core::input_tensor(inputs, 0, op)?;
        let upd = kiln_core::input_tensor(inputs, 1, op)?;
        let (cs, us) = (cache.shape(), upd.shape());
        let rank = cs.len();
        let axis = norm_axis(op, self.axis, rank)?;
        if axis == 0 || us.len() != rank {
            return Err(kerr(
                op,
                format!(
                    "invalid axis {} or update rank for cache {cs:?}, update {us:?}",
                    self.axis
                ),
            ));
        }
        for d in 0..rank {
            if (d != axis && cs[d] != us[d]) || (d == axis && us[d] > cs[d]) {
                return Err(kerr(
                    op,
                    format!("update {us:?} does not fit cache {cs:?} on axis {axis}"),
                ));
            }
        }
        let batch = cs[0];
        let wi = match opt_ints_input(inputs, 2, op)? {
            Some(v) => v,
            None => smallvec::smallvec![0; batch],
        };
        if wi.len() != batch {
            return Err(kerr(
                op,
                format!("write_indices has {} values for batch {batch}", wi.len()),
            ));
        }
        let (max_len, seq) = (cs[axis], us[axis]);
        let post: usize = cs[axis + 1..].iter().product();
        let prefix: usize = cs[..axis].iter().product();
        let per_batch = prefix / batch.max(1);
        let mut dst_offs = Vec::with_capacity(prefix * seq);
        let mut src_offs = Vec::with_capacity(prefix * seq);
        for p in 0..prefix {
            let b = p / per_batch.max(1);
            for s in 0..seq {
                let mut pos = wi[b].saturating_add(s as i64);
                if self.circular && max_len > 0 {
                    pos = pos.rem_euclid(max_len as i64);
                }
                if pos < 0 || pos >= max_len as i64 {
                    return Err(kerr(
                        op,
                        format!("write position {pos} is outside the cache length {max_len}"),
                    ));
                }
                dst_offs.push((p * max_len + pos as usize) * post);
                src_offs.push((p * seq + s) * post);
            }
        }
        let m = WriteBlocks {
            dst_offs,
            src_offs,
            block: post,
        };
        Ok(vec![
            move_data(&m, op, &[cache, upd], cache.dtype(), cs)?.into()
        ])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32v(shape: &[usize], v: &[f32]) -> Value {
        Tensor::from_vec(shape, v.to_vec()).unwrap().into()
    }
    fn i64v(shape: &[usize], v: &[i64]) -> Value {
        Tensor::from_vec(shape, v.to_vec()).unwrap().into()
    }

    #[test]
    fn scatter_elements_reductions() {
        let x = f32v(&[1, 5], &[1., 2., 3., 4., 5.]);
        let i = i64v(&[1, 2], &[1, 1]);
        let u = f32v(&[1, 2], &[1.1, 2.1]);
        let mk = |reduction| ScatterElements {
            axis: 1,
            reduction,
            name: "ScatterElements",
        };
        let run = |op: ScatterElements| {
            op.eval(&[Some(&x), Some(&i), Some(&u)]).unwrap()[0]
                .as_tensor()
                .unwrap()
                .to_f32_vec()
                .unwrap()
        };
        assert_eq!(run(mk(Reduction::Add)), vec![1., 5.2, 3., 4., 5.]);
        assert_eq!(run(mk(Reduction::None)), vec![1., 2.1, 3., 4., 5.]);
        assert_eq!(run(mk(Reduction::Max)), vec![1., 2.1, 3., 4., 5.]);
        assert_eq!(run(mk(Reduction::Min)), vec![1., 1.1, 3., 4., 5.]);
        assert!((run(mk(Reduction::Mul))[1] - 2.0 * 1.1 * 2.1).abs() < 1e-5);
        let bad = i64v(&[1, 2], &[1, 7]);
        assert!(mk(Reduction::None)
            .eval(&[Some(&x), Some(&bad), Some(&u)])
            .is_err());
        let neg = i64v(&[1, 2], &[-1, 0]);
        let y = mk(Reduction::None)
            .eval(&[Some(&x), Some(&neg), Some(&u)])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![2.1, 2., 3., 4., 1.1]
        );
    }

    #[test]
    fn scatter_nd_spec_example() {
        let x = f32v(&[8], &[1., 2., 3., 4., 5., 6., 7., 8.]);
        let i = i64v(&[4, 1], &[4, 3, 1, 7]);
        let u = f32v(&[4], &[9., 10., 11., 12.]);
        let y = ScatterND {
            reduction: Reduction::None,
        }
        .eval(&[Some(&x), Some(&i), Some(&u)])
        .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 11., 3., 10., 9., 6., 7., 12.]
        );
        let y = ScatterND {
            reduction: Reduction::Add,
        }
        .eval(&[Some(&x), Some(&i), Some(&u)])
        .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 13., 3., 14., 14., 6., 7., 20.]
        );
        let x = f32v(&[2, 2], &[1., 2., 3., 4.]);
        let i = i64v(&[1, 1], &[1]);
        let u = f32v(&[1, 2], &[7., 8.]);
        let y = ScatterND {
            reduction: Reduction::None,
        }
        .eval(&[Some(&x), Some(&i), Some(&u)])
        .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 2., 7., 8.]
        );
        let bad = f32v(&[2], &[7., 8.]);
        assert!(ScatterND {
            reduction: Reduction::None
        }
        .eval(&[Some(&x), Some(&i), Some(&bad)])
        .is_err());
    }

    #[test]
    fn tensor_scatter_linear_circular() {
        // cache [2, 4, 1], update [2, 2, 1], axis -2
        let cache = f32v(&[2, 4, 1], &[0.; 8]);
        let upd = f32v(&[2, 2, 1], &[1., 2., 3., 4.]);
        let wi = i64v(&[2], &[1, 3]);
        let op = TensorScatter {
            axis: -2,
            circular: true,
        };
        let y = op.eval(&[Some(&cache), Some(&upd), Some(&wi)]).unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![0., 1., 2., 0., 4., 0., 0., 3.]
        );
        let op = TensorScatter {
            axis: -2,
            circular: false,
        };
        assert!(op.eval(&[Some(&cache), Some(&upd), Some(&wi)]).is_err());
        let y = op.eval(&[Some(&cache), Some(&upd)]).unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 2., 0., 0., 3., 4., 0., 0.]
        );
    }
}
