//! `kiln.Int8MatMul`: `Y[..., r, n] = Σ_k A[..., r, k]·W[n, k]` on i8 operands (the INT8
//! form of MatMul and Gemm with constant weights), i32 accumulation, bias and fused
//! activation in f32, i8 output.

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, OpDesc, Result, Tensor,
    TensorMut, Value,
};

use super::conv::scale_attr;
use super::gemm::{gemm, Isa, PackedWeights, COL_ALIGN};
use super::{
    check_isa, output_slot, output_tensor, parse_tactic, row_sums, OutBuf, OutPtr, OutPtrF, QdqIo,
    Requant, W_SCALES, X_SCALE, Y_SCALE,
};
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
    io: QdqIo,
}

/// Builds `kiln.Int8MatMul` from its description.
pub fn build(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let io = QdqIo::from_attrs(&a)?;
    let best = if io.explicit {
        super::explicit_isa()
    } else {
        Isa::best()
    };
    let id = a
        .opt_string(kiln_core::tactic::TACTIC_ATTR)?
        .unwrap_or_else(|| format!("cpu.int8.matmul.{}", best.name()));
    let isa = parse_tactic("matmul", &id).map_err(|e| a.invalid(e.to_string()))?;
    check_isa(&a, io, isa)?;
    Ok(Box::new(Int8MatMul {
        act: Activation::from_attrs(&a)?,
        x_scale: scale_attr(&a, X_SCALE)?,
        y_scale: if io.out == super::OutKind::F32 {
            1.0
        } else {
            scale_attr(&a, Y_SCALE)?
        },
        w_scales: a
            .opt_floats(W_SCALES)?
            .ok_or_else(|| a.invalid("missing w_scales"))?,
        isa,
        io,
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

    fn run(&self, a: &Tensor, w: &Tensor, b: Option<&Tensor>, mut out: OutBuf<'_>) -> Result<()> {
        if w.dtype() != DType::I8 {
            return Err(KilnError::kernel(
                "Int8MatMul",
                format!("W must be int8, found {}", w.dtype()),
            ));
        }
        let (flip, za) = self.io.input_domain("Int8MatMul", a.dtype())?;
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
        if out.count() != rows * n {
            return Err(KilnError::kernel(
                "Int8MatMul",
                format!("output has {} values, expected {}", out.count(), rows * n),
            ));
        }
        let packed = PackedWeights::pack(w.as_slice::<i8>()?, n, k);
        // Zero-point compensation: Σ w·(a − z) = Σ w·a − z·Σ w (exact in i32).
        let comp: Vec<i32> = row_sums(w.as_slice::<i8>()?, n, k)
            .into_iter()
            .map(|s| s * za)
            .collect();
        let rq: Vec<Requant> = (0..n)
            .map(|o| {
                self.io
                    .requant(self.x_scale * self.w_scales[o], bias[o], self.y_scale)
            })
            .collect();
        let av: &[i8] = bytemuck::cast_slice(a.bytes());
        let (optr, fptr) = match &mut out {
            OutBuf::Bytes(o) => (Some(OutPtr(o.as_mut_ptr())), None),
            OutBuf::F32(o) => (None, Some(OutPtrF(o.as_mut_ptr()))),
        };
        crate::parallel::for_each_index(rows.div_ceil(TILE), |tile| {
            let r0 = tile * TILE;
            let tw = TILE.min(rows - r0);
            let pp = tw.div_ceil(COL_ALIGN) * COL_ALIGN;
            crate::scratch::with_scratch::<i8, _>(packed.kp * pp, |col| {
                col[..packed.kp * pp].fill(0);
                for t in 0..tw {
                    let row = &av[(r0 + t) * k..(r0 + t + 1) * k];
                    for (k4, chunk) in row.chunks(4).enumerate() {
                        let at = (k4 * pp + t) * 4;
                        for (d, &v) in col[at..at + chunk.len()].iter_mut().zip(chunk) {
                            *d = v ^ flip;
                        }
                    }
                }
                crate::scratch::with_scratch::<i32, _>(n * pp, |acc| {
                    gemm(self.isa, &packed, col, pp, acc);
                    for t in 0..tw {
                        for (o, q) in rq.iter().enumerate() {
                            let v = acc[o * pp + t] - comp[o];
                            let at = (r0 + t) * n + o;
                            if let Some(optr) = optr {
                                // SAFETY: at < rows·n = out.len() (checked above); tiles
                                // own disjoint rows.
                                unsafe { *optr.at(at) = q.apply(v, self.act) };
                            } else if let Some(fptr) = fptr {
                                // SAFETY: as above, for the f32 output.
                                unsafe { *fptr.at(at) = q.apply_f32(v, self.act) };
                            }
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
        let dt = self.io.out_dtype();
        Ok(vec![match shape {
            Some(s) => Fact::tensor(dt, s),
            None => Fact {
                dtype: Some(dt),
                ..Fact::unknown()
            },
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = input_tensor(inputs, 0, "Int8MatMul")?;
        let w = input_tensor(inputs, 1, "Int8MatMul")?;
        let b = optional_tensor(inputs, 2, "Int8MatMul")?;
        let shape = Self::out_shape(a, w)?;
        let dt = self.io.out_dtype();
        let (mut bytes, mut floats) = super::new_output(dt, shape.iter().product());
        let buf = if dt == DType::F32 {
            OutBuf::F32(&mut floats)
        } else {
            OutBuf::Bytes(&mut bytes)
        };
        self.run(a, w, b, buf)?;
        Ok(vec![output_tensor(dt, &shape, bytes, floats)?.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let a = input_tensor(inputs, 0, "Int8MatMul")?;
        let w = input_tensor(inputs, 1, "Int8MatMul")?;
        let b = optional_tensor(inputs, 2, "Int8MatMul")?;
        let shape = Self::out_shape(a, w)?;
        let slot = output_slot("Int8MatMul", outputs, &shape, self.io.out_dtype())?;
        self.run(a, w, b, slot)
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
                        let want = Requant::sym(0.05 * ws[o], bias[o], 5.0)
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
