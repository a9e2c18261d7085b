//! Expand (bidirectional broadcast) and Tile: strided views with zero strides.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Dim, Fact, Op, Result, Tensor, TensorMut, Value};

use super::common::*;

/// The view broadcasting `shape` to `out` (numpy rules, `out` already the broadcast shape).
pub(crate) fn broadcast_view(shape: &[usize], out: &[usize]) -> StridedView {
    let st = istrides(shape);
    let lead = out.len() - shape.len();
    let strides = (0..out.len())
        .map(|i| {
            if i < lead || shape[i - lead] == 1 {
                0
            } else {
                st[i - lead]
            }
        })
        .collect();
    StridedView {
        shape: out.into(),
        strides,
        offset: 0,
    }
}

/// Broadcasts `x` to `out` (which must be a broadcast of its shape).
pub(crate) fn broadcast_to(op: &str, x: &Tensor, out: &[usize]) -> Result<Tensor> {
    if x.shape() == out {
        return Ok(x.clone());
    }
    move_data(
        &ViewMover(broadcast_view(x.shape(), out)),
        op,
        &[x],
        x.dtype(),
        out,
    )
}

/// `Expand`: broadcasts the input against a shape (bidirectionally).
#[derive(Debug)]
pub struct Expand;

/// Builds `Expand`.
pub fn build_expand(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Expand))
}

impl Expand {
    fn plan<'a>(inputs: &[Option<&'a Value>]) -> Result<(&'a Tensor, Vec<usize>)> {
        let x = kiln_core::input_tensor(inputs, 0, "Expand")?;
        let shape = to_dims("Expand", &ints_input(inputs, 1, "Expand")?)?;
        let out = kiln_core::fact::broadcast_shapes(x.shape(), &shape).ok_or_else(|| {
            kerr(
                "Expand",
                format!("cannot broadcast {:?} to {shape:?}", x.shape()),
            )
        })?;
        checked_numel("Expand", &out, x.dtype().size())?;
        Ok((x, out))
    }
}

impl Op for Expand {
    fn op_type(&self) -> &str {
        "Expand"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let s = fact_at(inputs, 1);
        let target: Option<Vec<Dim>> = match konst_ints(s) {
            Some(v) => Some(
                v.iter()
                    .map(|&d| {
                        if d >= 0 {
                            Dim::Known(d as usize)
                        } else {
                            Dim::Unknown
                        }
                    })
                    .collect(),
            ),
            None => s
                .and_then(|f| f.concrete_shape())
                .filter(|r| r.len() == 1)
                .map(|r| vec![Dim::Unknown; r[0]]),
        };
        let shape = match (x.and_then(|f| f.shape.as_ref()), target) {
            (Some(xs), Some(t)) => {
                // An unknown target dim may be 1 (keeps the input dim) or anything: only keep
                // what is certain.
                let rank = xs.len().max(t.len());
                let mut out = Vec::with_capacity(rank);
                for i in 0..rank {
                    let a = if i + xs.len() >= rank {
                        xs[i + xs.len() - rank].clone()
                    } else {
                        Dim::Known(1)
                    };
                    let b = if i + t.len() >= rank {
                        t[i + t.len() - rank].clone()
                    } else {
                        Dim::Known(1)
                    };
                    out.push(match (&a, &b) {
                        (_, Dim::Known(1)) => a.clone(),
                        (Dim::Known(1), _) => b.clone(),
                        (Dim::Known(x), Dim::Known(y)) if x == y => a.clone(),
                        (Dim::Known(x), Dim::Known(y)) => {
                            return Err(ierr("Expand", format!("cannot broadcast dim {x} to {y}")))
                        }
                        (Dim::Known(k), Dim::Unknown) if *k != 1 => a.clone(),
                        (Dim::Sym(_), Dim::Known(_)) => b.clone(),
                        _ => Dim::Unknown,
                    });
                }
                Some(out)
            }
            (None, Some(t)) => Some(vec![Dim::Unknown; t.len()]),
            _ => None,
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, out) = Self::plan(inputs)?;
        Ok(vec![broadcast_to("Expand", x, &out)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let (x, out) = Self::plan(inputs)?;
        match outputs.first_mut() {
            Some(slot) if x.dtype() != DType::String => move_into(
                &ViewMover(broadcast_view(x.shape(), &out)),
                "Expand",
                &[x],
                slot,
                &out,
            ),
            _ => Err(kerr("Expand", "no output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `Tile`: repeats the input along each axis.
#[derive(Debug)]
pub struct Tile {
    opset: i64,
}

/// Builds `Tile`.
pub fn build_tile(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Tile { opset: ctx.opset() }))
}

/// The view of `x` tiled by `reps`: output `[r0*d0, ..]` seen as `[r0, d0, r1, d1, ..]`.
fn tile_view(shape: &[usize], reps: &[usize]) -> (StridedView, Vec<usize>) {
    let st = istrides(shape);
    let mut vshape = Vec::with_capacity(2 * shape.len());
    let mut vstrides = Vec::with_capacity(2 * shape.len());
    for i in 0..shape.len() {
        vshape.extend([reps[i], shape[i]]);
        vstrides.extend([0, st[i]]);
    }
    let out = shape.iter().zip(reps).map(|(d, r)| d * r).collect();
    (
        StridedView {
            shape: vshape.into(),
            strides: vstrides.into(),
            offset: 0,
        },
        out,
    )
}

impl Tile {
    fn reps(&self, inputs: &[Option<&Value>], rank: usize) -> Result<Dims> {
        if self.opset < 6 {
            // Tile-1: `tiles` (a scalar count) and `axis` inputs.
            let tiles = ints_input(inputs, 1, "Tile")?;
            let axis = ints_input(inputs, 2, "Tile")?;
            let (Some(&t), Some(&a)) = (tiles.first(), axis.first()) else {
                return Err(kerr("Tile", "tiles and axis must hold one value"));
            };
            let a = norm_axis("Tile", a, rank)?;
            let mut r: Dims = smallvec::smallvec![1usize; rank];
            r[a] = usize::try_from(t).map_err(|_| kerr("Tile", format!("invalid tiles {t}")))?;
            return Ok(r);
        }
        let r = to_dims("Tile", &ints_input(inputs, 1, "Tile")?)?;
        if r.len() != rank {
            return Err(kerr(
                "Tile",
                format!("repeats {r:?} do not match rank {rank}"),
            ));
        }
        Ok(r)
    }
}

impl Op for Tile {
    fn op_type(&self) -> &str {
        "Tile"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let Some(shape) = x.and_then(|f| f.shape.as_ref()) else {
            return Ok(vec![tensor_fact(dtype, None)]);
        };
        let reps = if self.opset >= 6 {
            konst_ints(fact_at(inputs, 1))
        } else {
            None
        };
        let out = match reps {
            Some(r) if r.len() == shape.len() => shape
                .iter()
                .zip(&r)
                .map(|(d, &r)| match (d, r) {
                    (_, 1) => d.clone(),
                    (Dim::Known(k), r) if r >= 0 => {
                        k.checked_mul(r as usize).map_or(Dim::Unknown, Dim::Known)
                    }
                    _ => Dim::Unknown,
                })
                .collect(),
            _ => vec![Dim::Unknown; shape.len()],
        };
        Ok(vec![tensor_fact(dtype, Some(out))])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Tile")?;
        let reps = self.reps(inputs, x.rank())?;
        let mut out = Vec::with_capacity(reps.len());
        for (d, r) in x.shape().iter().zip(&reps) {
            out.push(
                d.checked_mul(*r)
                    .ok_or_else(|| kerr("Tile", "output is too large"))?,
            );
        }
        checked_numel("Tile", &out, x.dtype().size())?;
        let (view, out) = tile_view(x.shape(), &reps);
        let vshape = view.shape.clone();
        let y = move_data(&ViewMover(view), "Tile", &[x], x.dtype(), &vshape)?;
        Ok(vec![y.reshape(&out)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i64s(v: &[i64]) -> Value {
        Tensor::from_vec(&[v.len()], v.to_vec()).unwrap().into()
    }

    #[test]
    fn expand_bidirectional() {
        let x: Value = Tensor::from_vec(&[3, 1], vec![1f32, 2., 3.])
            .unwrap()
            .into();
        let y = Expand.eval(&[Some(&x), Some(&i64s(&[2, 1, 2]))]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 3, 2]);
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[1., 1., 2., 2., 3., 3., 1., 1., 2., 2., 3., 3.]
        );
        let y = Expand.eval(&[Some(&x), Some(&i64s(&[1]))]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[3, 1]);
        assert!(Expand.eval(&[Some(&x), Some(&i64s(&[2, 2]))]).is_err());
        assert!(Expand.eval(&[Some(&x), Some(&i64s(&[-1]))]).is_err());
    }

    #[test]
    fn tile_matches_numpy() {
        let x: Value = Tensor::from_vec(&[2, 2], vec![1i32, 2, 3, 4])
            .unwrap()
            .into();
        let op = Tile { opset: 13 };
        let y = op.eval(&[Some(&x), Some(&i64s(&[2, 3]))]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[4, 6]);
        assert_eq!(
            y.as_slice::<i32>().unwrap(),
            &[1, 2, 1, 2, 1, 2, 3, 4, 3, 4, 3, 4, 1, 2, 1, 2, 1, 2, 3, 4, 3, 4, 3, 4]
        );
        assert!(op.eval(&[Some(&x), Some(&i64s(&[2]))]).is_err());
        let y = op.eval(&[Some(&x), Some(&i64s(&[0, 1]))]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[0, 2]);
    }
}
