//! `kiln.Int8MatMul`: `Y[..., r, n] = Σ_k A[..., r, k]·W[n, k]` on i8 operands (the INT8
//! form of MatMul and Gemm with constant weights), i32 accumulation, bias and fused
//! activation in f32, i8 output.

use rayon::prelude::*;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, OpDesc, Result, Tensor,
    TensorMut, Value,
};

use super::conv::scale_attr;
use super::gemm::{gemm, Isa, PackedWeights, COL_ALIGN};
use super::{parse_tactic, OutPtr, Requant, W_SCALES, X_SCALE, Y_SCALE};
use crate::fused::Activation;

/// Rows of A per parallel tile.
const TILE: usize = 64;

/// The INT8 matrix product.
#[derive(Debug, Clone)]
pub struct Int8MatMul {
    act: Activation,
    x_scale: f32,
    y_scale: f32,
    w_scales: Vec<f32>,
    isa: Isa,
}

/// Builds `kiln.Int8MatMul` from its description.
pub fn build(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let id = a
        .opt_string(kiln_core::tactic::TACTIC_ATTR)?
        .unwrap_or_else(|| format!("cpu.int8.matmul.{}", Isa::best().name()));
    Ok(Box::new(Int8MatMul {
        act: Activation::from_attrs(&a)?,
        x_scale: scale_attr(&a, X_SCALE)?,
        y_scale: scale_attr(&a, Y_SCALE)?,
        w_scales: a
            .opt_floats(W_SCALES)?
            .ok_or_else(|| a.invalid("missing w_scales"))?,
        isa: parse_tactic("matmul", &id).map_err(|e| a.invalid(e.to_string()))?,
    }))
}

/// Whether an FP32 MatMul/Gemm with these facts can run as `Int8MatMul`: A of rank ≥ 2
/// (rank 2 for Gemm, not transposed), B 2-D; for Gemm, C absent or of N values.
pub fn lowerable(desc: &OpDesc, inputs: &[Option<&Fact>]) -> bool {
    let shape = |i: usize| inputs.get(i).copied().flatten()?.concrete_shape();
    let (Some(a), Some(b)) = (shape(0), shape(1)) else {
        return false;
    };
    if a.len() < 2 || b.len() != 2 {
        return false;
    }
    if desc.op_type == "Gemm" {
        let int = |n: &str| match desc.attrs.get(n) {
            Some(kiln_core::Attr::Int(v)) => *v,
            _ => 0,
        };
        let n = if int("transB") != 0 { b[0] } else { b[1] };
        let c_ok = match shape(2) {
            None => inputs.get(2).copied().flatten().is_none(),
            Some(c) => {
                c.iter().product::<usize>() == n && c.last() == Some(&n)
                    || c.iter().product::<usize>() == 1
            }
        };
        return a.len() == 2 && int("transA") == 0 && c_ok;
    }
    true
}

impl Int8MatMul {
    fn out_shape(a: &Tensor, w: &Tensor) -> Result<Vec<usize>> {
        let (ash, wsh) = (a.shape(), w.shape());
        if ash.len() < 2 || wsh.len() != 2 || ash[ash.len() - 1] != wsh[1] {
            return Err(KilnError::kernel(
                "Int8MatMul",
                format!("A {ash:?} and W {wsh:?} (N × K) do not multiply: need A of rank ≥ 2 with last dim K"),
            ));
        }
        let mut s = ash.to_vec();
        *s.last_mut().expect("rank ≥ 2") = wsh[0];
        Ok(s)
    }

    fn run(&self, a: &Tensor, w: &Tensor, b: Option<&Tensor>, out: &mut [i8]) -> Result<()> {
        if a.dtype() != DType::I8 || w.dtype() != DType::I8 {
            return Err(KilnError::kernel(
                "Int8MatMul",
                format!(
                    "A and W must be int8, found {} and {}",
                    a.dtype(),
                    w.dtype()
                ),
            ));
        }
        Self::out_shape(a, w)?;
        let (n, k) = (w.shape()[0], w.shape()[1]);
        let rows = a.len() / k.max(1);
        if self.w_scales.len() != n {
            return Err(KilnError::kernel(
                "Int8MatMul",
                format!(
                    "w_scales has {} values for {n} output columns",
                    self.w_scales.len()
                ),
            ));
        }
        let bias = match b {
            Some(b) if b.dtype() != DType::F32 || b.len() != n => {
                return Err(KilnError::kernel(
                    "Int8MatMul",
                    format!(
                        "B must be f32 with {n} values, found {} {:?}",
                        b.dtype(),
                        b.shape()
                    ),
                ))
            }
            Some(b) => b.as_slice::<f32>()?.to_vec(),
            None => vec![0.0; n],
        };
        let packed = PackedWeights::pack(w.as_slice::<i8>()?, n, k);
        let rq: Vec<Requant> = (0..n)
            .map(|o| Requant {
                mul: self.x_scale * self.w_scales[o],
                bias: bias[o],
                inv_y: 1.0 / self.y_scale,
            })
            .collect();
        let av = a.as_slice::<i8>()?;
        let optr = OutPtr(out.as_mut_ptr());
        (0..rows.div_ceil(TILE)).into_par_iter().for_each(|tile| {
            let r0 = tile * TILE;
            let tw = TILE.min(rows - r0);
            let pp = tw.div_ceil(COL_ALIGN) * COL_ALIGN;
            crate::scratch::with_scratch::<i8, _>(packed.kp * pp, |col| {
                col[..packed.kp * pp].fill(0);
                for t in 0..tw {
                    let row = &av[(r0 + t) * k..(r0 + t + 1) * k];
                    for (k4, chunk) in row.chunks(4).enumerate() {
                        let at = (k4 * pp + t) * 4;
                        col[at..at + chunk.len()].copy_from_slice(chunk);
                    }
                }
                crate::scratch::with_scratch::<i32, _>(n * pp, |acc| {
                    gemm(self.isa, &packed, col, pp, acc);
                    for t in 0..tw {
                        for (o, q) in rq.iter().enumerate() {
                            // SAFETY: (r0 + t)·n + o < rows·n = out.len(); tiles own
                            // disjoint rows.
                            unsafe {
                                *optr.at((r0 + t) * n + o) = q.apply(acc[o * pp + t], self.act)
                            };
                        }
                    }
                });
            });
        });
        Ok(())
    }
}

impl Op for Int8MatMul {
    fn op_type(&self) -> &str {
        "Int8MatMul"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let a = inputs.first().copied().flatten();
        let w = inputs.get(1).copied().flatten();
        let shape = match (
            a.and_then(|f| f.shape.clone()),
            w.and_then(|f| f.shape.clone()),
        ) {
            (Some(mut s), Some(ws)) if s.len() >= 2 && ws.len() == 2 => {
                *s.last_mut().expect("rank ≥ 2") = ws[0].clone();
                Some(s)
            }
            _ => None,
        };
        Ok(vec![match shape {
            Some(s) => Fact::tensor(DType::I8, s),
            None => Fact {
                dtype: Some(DType::I8),
                ..Fact::unknown()
            },
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = input_tensor(inputs, 0, "Int8MatMul")?;
        let w = input_tensor(inputs, 1, "Int8MatMul")?;
        let b = optional_tensor(inputs, 2, "Int8MatMul")?;
        let shape = Self::out_shape(a, w)?;
        let mut out = vec![0i8; shape.iter().product()];
        self.run(a, w, b, &mut out)?;
        Ok(vec![Tensor::from_vec(&shape, out)?.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let a = input_tensor(inputs, 0, "Int8MatMul")?;
        let w = input_tensor(inputs, 1, "Int8MatMul")?;
        let b = optional_tensor(inputs, 2, "Int8MatMul")?;
        let shape = Self::out_shape(a, w)?;
        self.run(
            a,
            w,
            b,
            super::i8_output_slot("Int8MatMul", outputs, &shape)?,
        )
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Attr, OpRegistry};

    #[test]
    fn matches_a_plain_product() {
        let mut reg = OpRegistry::new();
        super::super::register(&mut reg);
        let mut s = 7u64;
        let mut i8r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 20) % 255) as i32 - 127) as i8
        };
        for &(batch, r, k, n) in &[
            (1, 1, 1, 1),
            (2, 3, 5, 7),
            (1, 70, 37, 9),
            (3, 65, 64, 16),
            (1, 130, 200, 3),
        ] {
            let a: Vec<i8> = (0..batch * r * k).map(|_| i8r()).collect();
            let w: Vec<i8> = (0..n * k).map(|_| i8r()).collect();
            let bias: Vec<f32> = (0..n).map(|i| 0.5 - i as f32 * 0.25).collect();
            let ws: Vec<f32> = (0..n).map(|i| 0.003 + 0.0005 * i as f32).collect();
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let mut d = OpDesc::new("kiln", "Int8MatMul", 1);
                d.attrs.insert(X_SCALE.into(), Attr::Float(0.05));
                d.attrs.insert(Y_SCALE.into(), Attr::Float(0.2));
                d.attrs.insert(W_SCALES.into(), Attr::Floats(ws.clone()));
                d.attrs
                    .insert("kiln_activation".into(), Attr::String("HardSwish".into()));
                d.attrs.insert(
                    kiln_core::tactic::TACTIC_ATTR.into(),
                    Attr::String(format!("cpu.int8.matmul.{}", isa.name())),
                );
                let op = reg
                    .build(&BuildCtx {
                        node: "t",
                        desc: &d,
                        n_inputs: 3,
                        n_outputs: 1,
                    })
                    .unwrap();
                let at = Tensor::from_vec(&[batch, r, k], a.clone()).unwrap();
                let wt = Tensor::from_vec(&[n, k], w.clone()).unwrap();
                let bt = Tensor::from_vec(&[n], bias.clone()).unwrap();
                let out = op
                    .eval(&[Some(&at.into()), Some(&wt.into()), Some(&bt.into())])
                    .unwrap()
                    .remove(0);
                let out = out.as_tensor().unwrap();
                assert_eq!(out.shape(), &[batch, r, n]);
                let got = out.as_slice::<i8>().unwrap();
                for row in 0..batch * r {
                    for o in 0..n {
                        let acc: i32 = (0..k)
                            .map(|j| a[row * k + j] as i32 * w[o * k + j] as i32)
                            .sum();
                        let want = Requant {
                            mul: 0.05 * ws[o],
                            bias: bias[o],
                            inv_y: 5.0,
                        }
                        .apply(acc, Activation::HardSwish);
                        assert_eq!(
                            got[row * n + o],
                            want,
                            "{isa:?} {:?} row {row} col {o}",
                            (batch, r, k, n)
                        );
                    }
                }
            }
        }
    }
}
