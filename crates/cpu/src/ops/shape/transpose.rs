//! Transpose, DepthToSpace, SpaceToDepth: permutations done by the strided copy engine
//! (block copies when the innermost dim stays innermost, tiled 2-D transposes otherwise).

use std::any::Any;

use kiln_core::{BuildCtx, Dim, Fact, Op, Result, Tensor, TensorMut, Value};

use super::common::*;

/// The view that reads `shape` permuted by `perm` (output dim i = input dim perm[i]).
pub(crate) fn permuted_view(shape: &[usize], perm: &[usize]) -> StridedView {
    let st = istrides(shape);
    StridedView {
        shape: perm.iter().map(|&p| shape[p]).collect(),
        strides: perm.iter().map(|&p| st[p]).collect(),
        offset: 0,
    }
}

/// Transposes `x` by `perm` into a new tensor.
pub(crate) fn transpose_tensor(op: &str, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let view = permuted_view(x.shape(), perm);
    let shape = view.shape.clone();
    move_data(&ViewMover(view), op, &[x], x.dtype(), &shape)
}

// ---------------------------------------------------------------------------------------

/// `Transpose`: permutes dims (`perm` defaults to reversing them).
#[derive(Debug)]
pub struct Transpose {
    perm: Option<Vec<i64>>,
}

/// Builds `Transpose`.
pub fn build_transpose(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Transpose {
        perm: ctx.attrs().opt_ints("perm")?,
    }))
}

impl Transpose {
    fn perm(&self, rank: usize) -> Result<Dims> {
        match &self.perm {
            None => Ok((0..rank).rev().collect()),
            Some(p) => {
                if p.len() != rank {
                    return Err(kerr(
                        "Transpose",
                        format!("perm {p:?} does not match rank {rank}"),
                    ));
                }
                norm_axes("Transpose", p, rank)
            }
        }
    }
}

impl Op for Transpose {
    fn op_type(&self) -> &str {
        "Transpose"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let shape = match x.and_then(|f| f.shape.as_ref()) {
            Some(s) => {
                let perm = self
                    .perm(s.len())
                    .map_err(|e| ierr("Transpose", e.to_string()))?;
                Some(perm.iter().map(|&p| s[p].clone()).collect())
            }
            None => self.perm.as_ref().map(|p| vec![Dim::Unknown; p.len()]),
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Transpose")?;
        let perm = self.perm(x.rank())?;
        Ok(vec![transpose_tensor("Transpose", x, &perm)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Transpose")?;
        let perm = self.perm(x.rank())?;
        let view = permuted_view(x.shape(), &perm);
        let shape = view.shape.clone();
        match outputs.first_mut() {
            Some(out) if x.dtype() != kiln_core::DType::String => {
                move_into(&ViewMover(view), "Transpose", &[x], out, &shape)
            }
            _ => Err(kerr("Transpose", "no output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `DepthToSpace` (modes DCR and CRD) and `SpaceToDepth`.
#[derive(Debug)]
pub struct DepthSpace {
    to_space: bool,
    block: usize,
    crd: bool,
}

/// Builds `DepthToSpace`.
pub fn build_depth_to_space(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    build_ds(ctx, true)
}

/// Builds `SpaceToDepth`.
pub fn build_space_to_depth(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    build_ds(ctx, false)
}

fn build_ds(ctx: &BuildCtx, to_space: bool) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let block = a.req_int("blocksize")?;
    if block <= 0 {
        return Err(a.invalid(format!("blocksize must be positive, got {block}")));
    }
    let mode = a.string("mode", "DCR")?;
    let crd = match mode.as_str() {
        "DCR" => false,
        "CRD" => true,
        m => return Err(a.invalid(format!("unknown mode {m}"))),
    };
    Ok(Box::new(DepthSpace {
        to_space,
        block: block as usize,
        crd,
    }))
}

impl DepthSpace {
    fn name(&self) -> &'static str {
        if self.to_space {
            "DepthToSpace"
        } else {
            "SpaceToDepth"
        }
    }

    /// (6-d input view shape, permutation, 4-d output shape).
    fn plan(&self, s: &[usize]) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        let op = self.name();
        if s.len() != 4 {
            return Err(kerr(op, format!("input must be 4-D, got {s:?}")));
        }
        let (n, c, h, w, b) = (s[0], s[1], s[2], s[3], self.block);
        let too_big = || kerr(op, "blocksize is too large");
        let bb = b.checked_mul(b).ok_or_else(too_big)?;
        if self.to_space {
            h.checked_mul(b).ok_or_else(too_big)?;
            w.checked_mul(b).ok_or_else(too_big)?;
        } else {
            c.checked_mul(bb).ok_or_else(too_big)?;
        }
        if self.to_space {
            if !c.is_multiple_of(b * b) {
                return Err(kerr(
                    op,
                    format!("channels {c} not divisible by blocksize² {}", b * b),
                ));
            }
            let c2 = c / (b * b);
            let out = vec![n, c2, h * b, w * b];
            if self.crd {
                Ok((vec![n, c2, b, b, h, w], vec![0, 1, 4, 2, 5, 3], out))
            } else {
                Ok((vec![n, b, b, c2, h, w], vec![0, 3, 4, 1, 5, 2], out))
            }
        } else {
            if !h.is_multiple_of(b) || !w.is_multiple_of(b) {
                return Err(kerr(
                    op,
                    format!("spatial dims {h}x{w} not divisible by blocksize {b}"),
                ));
            }
            Ok((
                vec![n, c, h / b, b, w / b, b],
                vec![0, 3, 5, 1, 2, 4],
                vec![n, c * b * b, h / b, w / b],
            ))
        }
    }
}

impl Op for DepthSpace {
    fn op_type(&self) -> &str {
        self.name()
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let b = self.block;
        let shape = x.and_then(|f| f.shape.as_ref()).map(|s| {
            let scale = |d: &Dim, up: bool| match d.known() {
                Some(k) if up => k.checked_mul(b).map_or(Dim::Unknown, Dim::Known),
                Some(k) if k.is_multiple_of(b) => Dim::Known(k / b),
                _ => Dim::Unknown,
            };
            if s.len() != 4 {
                return vec![Dim::Unknown; 4];
            }
            let c = match s[1].known() {
                Some(k) if self.to_space => b
                    .checked_mul(b)
                    .and_then(|bb| k.checked_div(bb))
                    .map_or(Dim::Unknown, Dim::Known),
                Some(k) => k
                    .checked_mul(b)
                    .and_then(|v| v.checked_mul(b))
                    .map_or(Dim::Unknown, Dim::Known),
                None => Dim::Unknown,
            };
            vec![
                s[0].clone(),
                c,
                scale(&s[2], self.to_space),
                scale(&s[3], self.to_space),
            ]
        });
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, self.name())?;
        let (view6, perm, out) = self.plan(x.shape())?;
        let y = transpose_tensor(self.name(), &x.reshape(&view6)?, &perm)?;
        Ok(vec![y.reshape(&out)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::DType;

    fn naive_transpose(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
        let rank = shape.len();
        let st = kiln_core::strides(shape);
        let oshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let n: usize = shape.iter().product();
        let mut out = Vec::with_capacity(n);
        for flat in 0..n {
            let mut rem = flat;
            let mut idx = vec![0; rank];
            for d in (0..rank).rev() {
                idx[d] = rem % oshape[d];
                rem /= oshape[d];
            }
            let off: usize = (0..rank).map(|d| idx[d] * st[perm[d]]).sum();
            out.push(x[off]);
        }
        out
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0 + 0.001
            })
            .collect()
    }

    #[test]
    fn transpose_all_perms_match_naive() {
        let shape = [3usize, 1, 5, 4];
        let n: usize = shape.iter().product();
        let data = rand_vec(n, 3);
        let x = Tensor::from_vec(&shape, data.clone()).unwrap();
        let perms: Vec<Vec<usize>> = vec![
            vec![0, 1, 2, 3],
            vec![3, 2, 1, 0],
            vec![0, 2, 1, 3],
            vec![2, 0, 3, 1],
            vec![1, 3, 0, 2],
        ];
        for p in perms {
            let op = Transpose {
                perm: Some(p.iter().map(|&v| v as i64).collect()),
            };
            let out = op.eval(&[Some(&x.clone().into())]).unwrap();
            let y = out[0].as_tensor().unwrap();
            assert_eq!(
                y.as_slice::<f32>().unwrap(),
                naive_transpose(&data, &shape, &p).as_slice(),
                "perm {p:?}"
            );
        }
        // big, exercises tiling + parallel
        let shape = [4usize, 96, 130];
        let data = rand_vec(4 * 96 * 130, 9);
        let x = Tensor::from_vec(&shape, data.clone()).unwrap();
        let op = Transpose {
            perm: Some(vec![0, 2, 1]),
        };
        let y = op.eval(&[Some(&x.into())]).unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
            naive_transpose(&data, &shape, &[0, 2, 1]).as_slice()
        );
    }

    #[test]
    fn transpose_default_strings_and_errors() {
        let x = Tensor::from_strings(&[2, 3], (0..6).map(|i| i.to_string()).collect()).unwrap();
        let y = Transpose { perm: None }.eval(&[Some(&x.into())]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(y.as_strings().unwrap(), &["0", "3", "1", "4", "2", "5"]);
        let x: Value = Tensor::zeros(DType::F32, &[2, 3]).into();
        assert!(Transpose {
            perm: Some(vec![0, 0])
        }
        .eval(&[Some(&x)])
        .is_err());
        assert!(Transpose {
            perm: Some(vec![0])
        }
        .eval(&[Some(&x)])
        .is_err());
        let b = Tensor::from_bools(&[2, 2], &[true, false, false, true]).unwrap();
        let y = Transpose { perm: None }.eval(&[Some(&b.into())]).unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_bools().unwrap(),
            &[true, false, false, true]
        );
    }

    #[test]
    fn depth_space_roundtrip() {
        let x = Tensor::from_vec(&[1, 8, 2, 3], (0..48).map(|v| v as f32).collect()).unwrap();
        for crd in [false, true] {
            let d2s = DepthSpace {
                to_space: true,
                block: 2,
                crd,
            };
            let y = d2s.eval(&[Some(&x.clone().into())]).unwrap();
            let y = y[0].as_tensor().unwrap().clone();
            assert_eq!(y.shape(), &[1, 2, 4, 6]);
            if !crd {
                let s2d = DepthSpace {
                    to_space: false,
                    block: 2,
                    crd: false,
                };
                let z = s2d.eval(&[Some(&y.into())]).unwrap();
                assert!(z[0].as_tensor().unwrap().same_as(&x));
            }
        }
        // DCR example from the spec: out[0,0,0,:] = [0, 18, 1, 19, 2, 20]
        let d2s = DepthSpace {
            to_space: true,
            block: 2,
            crd: false,
        };
        let x = Tensor::from_vec(&[1, 8, 2, 3], (0..48).map(|v| v as f32).collect()).unwrap();
        let y = d2s.eval(&[Some(&x.into())]).unwrap();
        assert_eq!(
            &y[0].as_tensor().unwrap().as_slice::<f32>().unwrap()[..6],
            &[0., 12., 1., 13., 2., 14.]
        );
        assert!(d2s
            .eval(&[Some(&Tensor::zeros(DType::F32, &[1, 3, 2, 2]).into())])
            .is_err());
    }
}
