//! GlobalAveragePool and GlobalMaxPool on channels-last (N × H × W × C) f32 activations:
//! the `cpu.globalpool.nhwc` tactic (format `fp32/nhwc`), which lets a run of channels-last
//! layers pass through a squeeze-and-excitation block's pooling without a transpose. The
//! output is N × 1 × 1 × C (the same values, in the same order, as the linear N × C × 1 × 1).

use kiln_core::{input_tensor, DType, Dim, Fact, KilnError, Op, Result, TensorMut, Value};

/// Id of the channels-last tactic of the global pools.
pub const NHWC_TACTIC: &str = "cpu.globalpool.nhwc";

/// A global average or max pool over the positions of NHWC data.
#[derive(Debug, Clone)]
pub struct GlobalPoolNhwc {
    /// Maximum (GlobalMaxPool) instead of the mean (GlobalAveragePool).
    pub max: bool,
}

impl GlobalPoolNhwc {
    fn name(&self) -> &'static str {
        if self.max {
            "GlobalMaxPool"
        } else {
            "GlobalAveragePool"
        }
    }

    /// `out[n·C + c]` = mean (or max, NaN-propagating) of `x[n][·][c]` over the positions.
    fn reduce(&self, x: &[f32], n: usize, c: usize, out: &mut [f32]) {
        let positions = x.len().checked_div(n * c).unwrap_or(0);
        for (image, acc) in x
            .chunks_exact((positions * c).max(1))
            .zip(out.chunks_exact_mut(c.max(1)))
            .take(n)
        {
            acc.fill(if self.max { f32::NEG_INFINITY } else { 0.0 });
            for row in image.chunks_exact(c.max(1)) {
                if self.max {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a = if v > *a || v.is_nan() { v } else { *a };
                    }
                } else {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
            }
            if !self.max && positions > 0 {
                let inv = 1.0 / positions as f32;
                acc.iter_mut().for_each(|a| *a *= inv);
            }
        }
    }

    fn check(&self, xs: &[usize], dtype: DType) -> Result<[usize; 4]> {
        match (xs, dtype) {
            (&[n, h, w, c], DType::F32) => Ok([n, h, w, c]),
            _ => Err(KilnError::kernel(
                self.name(),
                format!("the channels-last tactic takes f32 N × H × W × C, found {dtype} {xs:?}"),
            )),
        }
    }
}

impl Op for GlobalPoolNhwc {
    fn op_type(&self) -> &str {
        self.name()
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let shape = match x.and_then(|f| f.shape.as_ref()) {
            None => None,
            Some(s) if s.len() == 4 => Some(vec![
                s[0].clone(),
                Dim::Known(1),
                Dim::Known(1),
                s[3].clone(),
            ]),
            Some(s) => {
                return Err(KilnError::Inference {
                    node: String::new(),
                    op: self.name().into(),
                    msg: format!(
                        "the channels-last tactic takes rank-4 inputs, found rank {}",
                        s.len()
                    ),
                })
            }
        };
        Ok(vec![Fact {
            dtype: x.and_then(|f| f.dtype),
            shape: shape.map(|s| s.into_iter().collect()),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name())?;
        let [n, _, _, c] = self.check(x.shape(), x.dtype())?;
        let mut out = vec![0.0f32; n * c];
        self.reduce(x.as_slice::<f32>()?, n, c, &mut out);
        Ok(vec![kiln_core::Tensor::from_vec(&[n, 1, 1, c], out)?.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name())?;
        let [n, _, _, c] = self.check(x.shape(), x.dtype())?;
        let Some(out) = outputs.first_mut() else {
            return Err(KilnError::kernel(self.name(), "no output slot"));
        };
        if out.shape() != [n, 1, 1, c] || out.dtype() != DType::F32 {
            return Err(KilnError::kernel(
                self.name(),
                format!(
                    "output slot is {} {:?}, expected f32 {:?}",
                    out.dtype(),
                    out.shape(),
                    [n, 1, 1, c]
                ),
            ));
        }
        self.reduce(x.as_slice::<f32>()?, n, c, out.as_mut_slice::<f32>()?);
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Tensor;

    #[test]
    fn matches_the_linear_pool_on_transposed_data() {
        let (n, c, h, w) = (2usize, 19usize, 5usize, 3usize);
        let mut state = 7u32;
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let xt = crate::ops::conv::nhwc::permute_data(&x, [n, c, h, w], true);
        for max in [false, true] {
            let planes = x.chunks_exact(h * w);
            let want: Vec<f32> = if max {
                planes
                    .map(|p| p.iter().fold(f32::MIN, |a, &v| a.max(v)))
                    .collect()
            } else {
                planes
                    .map(|p| p.iter().sum::<f32>() / (h * w) as f32)
                    .collect()
            };
            let op = GlobalPoolNhwc { max };
            let xv = Value::from(Tensor::from_vec(&[n, h, w, c], xt.clone()).unwrap());
            let got = op
                .eval(&[Some(&xv)])
                .unwrap()
                .remove(0)
                .into_tensor()
                .unwrap();
            assert_eq!(got.shape(), [n, 1, 1, c]);
            for (g, w) in got.as_slice::<f32>().unwrap().iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "max={max}: {g} vs {w}");
            }
            let f = op
                .infer(&[Some(&Fact::concrete(DType::F32, &[n, h, w, c]))], 1)
                .unwrap();
            assert_eq!(f[0].concrete_shape().unwrap(), vec![n, 1, 1, c]);
            // wrong ranks and dtypes are errors, not panics
            let bad = Value::from(Tensor::from_vec(&[n, c * h * w], x.clone()).unwrap());
            assert!(op.eval(&[Some(&bad)]).is_err());
        }
        // A NaN reaches the max.
        let mut xn = xt.clone();
        xn[c + 3] = f32::NAN;
        let xv = Value::from(Tensor::from_vec(&[n, h, w, c], xn).unwrap());
        let got = GlobalPoolNhwc { max: true }
            .eval(&[Some(&xv)])
            .unwrap()
            .remove(0);
        assert!(got.as_tensor().unwrap().as_slice::<f32>().unwrap()[3].is_nan());
    }
}
