//! Losses: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.

use std::any::Any;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor,
    Value, ValueKind,
};

use super::activation::{softmax_into, SoftKind};
use super::elementwise::bad_dtype;

/// The `reduction` attribute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reduction {
    /// Per-element losses.
    None,
    /// Sum of losses.
    Sum,
    /// Weighted mean of losses.
    Mean,
}

/// NegativeLogLikelihoodLoss, or SoftmaxCrossEntropyLoss when `softmax` is set.
#[derive(Debug, Clone)]
pub struct Loss {
    name: &'static str,
    softmax: bool,
    reduction: Reduction,
    ignore_index: Option<i64>,
}

impl Op for Loss {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let dt = x.and_then(|f| f.dtype);
        let loss_shape = match self.reduction {
            Reduction::None => inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|t| t.shape.clone()),
            _ => Some(Vec::<Dim>::new()),
        };
        let mut out = vec![Fact {
            kind: ValueKind::Tensor,
            dtype: dt,
            shape: loss_shape,
            konst: None,
        }];
        if n > 1 {
            out.push(Fact {
                kind: ValueKind::Tensor,
                dtype: dt,
                shape: x.and_then(|f| f.shape.clone()),
                konst: None,
            });
        }
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        let target = input_tensor(inputs, 1, self.name)?;
        let weight = optional_tensor(inputs, 2, self.name)?;
        let xdt = x.dtype();
        if !xdt.is_float() {
            return Err(bad_dtype(self.name, xdt));
        }
        if x.rank() < 2 {
            return Err(KilnError::kernel(
                self.name,
                format!("input must have rank >= 2, found {:?}", x.shape()),
            ));
        }
        let (n, c) = (x.shape()[0], x.shape()[1]);
        let d: usize = x.shape()[2..].iter().product();
        let mut want_t = vec![n];
        want_t.extend_from_slice(&x.shape()[2..]);
        if target.shape() != want_t.as_slice() {
            return Err(KilnError::kernel(
                self.name,
                format!(
                    "target shape {:?} does not match input {:?} (expected {want_t:?})",
                    target.shape(),
                    x.shape()
                ),
            ));
        }
        let t = target
            .to_i64_vec()
            .map_err(|e| KilnError::kernel(self.name, format!("target: {e}")))?;
        let w = match weight {
            Some(w) if w.len() != c => {
                return Err(KilnError::kernel(
                    self.name,
                    format!("weight has {} elements, expected {c}", w.len()),
                ))
            }
            Some(w) => Some(w.to_f64_vec()?),
            None => None,
        };
        let xv = x.to_f64_vec()?;
        let logp = if self.softmax {
            let mut o = vec![0f64; xv.len()];
            softmax_into(&xv, &mut o, SoftKind::LogSoftmax, n, c, d);
            o
        } else {
            xv
        };
        let mut losses = vec![0f64; n * d];
        let mut weights = vec![0f64; n * d];
        for i in 0..n {
            for j in 0..d {
                let k = i * d + j;
                let tk = t[k];
                if Some(tk) == self.ignore_index {
                    continue;
                }
                if tk < 0 || tk as usize >= c {
                    return Err(KilnError::kernel(
                        self.name,
                        format!("target {tk} is out of range [0, {c})"),
                    ));
                }
                let cls = tk as usize;
                let wk = w.as_ref().map_or(1.0, |w| w[cls]);
                losses[k] = -logp[(i * c + cls) * d + j] * wk;
                weights[k] = wk;
            }
        }
        let loss = match self.reduction {
            Reduction::None => Tensor::from_vec(target.shape(), losses)?,
            Reduction::Sum => Tensor::scalar(losses.iter().sum::<f64>()),
            Reduction::Mean => {
                let s: f64 = losses.iter().sum();
                if w.is_none() && self.ignore_index.is_none() {
                    Tensor::scalar(s / losses.len() as f64)
                } else {
                    Tensor::scalar(s / weights.iter().sum::<f64>())
                }
            }
        };
        let mut out = vec![Value::Tensor(loss.cast(xdt)?)];
        if self.softmax {
            out.push(Value::Tensor(Tensor::from_vec(x.shape(), logp)?.cast(xdt)?));
        }
        Ok(out)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn build_loss(ctx: &BuildCtx, name: &'static str, softmax: bool) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let reduction = match a.string("reduction", "mean")?.as_str() {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => {
            return Err(a.invalid(format!(
                "reduction must be none, sum or mean, found {other:?}"
            )))
        }
    };
    Ok(Box::new(Loss {
        name,
        softmax,
        reduction,
        ignore_index: a.opt_int("ignore_index")?,
    }))
}

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("NegativeLogLikelihoodLoss", |c: &BuildCtx| {
        build_loss(c, "NegativeLogLikelihoodLoss", false)
    });
    reg.register("SoftmaxCrossEntropyLoss", |c: &BuildCtx| {
        build_loss(c, "SoftmaxCrossEntropyLoss", true)
    });
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testutil::*;
    use kiln_core::{Attr, Tensor};

    #[test]
    fn nll() {
        let x = f32t(&[2, 3], vec![-1.0, -2.0, -3.0, -0.5, -1.5, -2.5]);
        let t = Tensor::from_vec(&[2], vec![2i64, 0]).unwrap();
        let y = run1(
            "NegativeLogLikelihoodLoss",
            13,
            vec![],
            &[Some(x.clone()), Some(t.clone())],
        )
        .unwrap();
        close(y.as_slice::<f32>().unwrap(), &[1.75], 1e-6);
        let y = run1(
            "NegativeLogLikelihoodLoss",
            13,
            vec![("reduction", Attr::String("none".into()))],
            &[Some(x.clone()), Some(t.clone())],
        )
        .unwrap();
        close(y.as_slice::<f32>().unwrap(), &[3.0, 0.5], 1e-6);
        let w = f32t(&[3], vec![1.0, 2.0, 3.0]);
        let y = run1(
            "NegativeLogLikelihoodLoss",
            13,
            vec![],
            &[Some(x.clone()), Some(t.clone()), Some(w)],
        )
        .unwrap();
        close(y.as_slice::<f32>().unwrap(), &[(9.0 + 0.5) / 4.0], 1e-6);
        let y = run1(
            "NegativeLogLikelihoodLoss",
            13,
            vec![("ignore_index", Attr::Int(0))],
            &[Some(x.clone()), Some(t)],
        )
        .unwrap();
        close(y.as_slice::<f32>().unwrap(), &[3.0], 1e-6);
        let bad = Tensor::from_vec(&[2], vec![5i64, 0]).unwrap();
        assert!(run1(
            "NegativeLogLikelihoodLoss",
            13,
            vec![],
            &[Some(x), Some(bad)]
        )
        .is_err());
    }

    #[test]
    fn sce() {
        let x = f32t(&[1, 2], vec![1.0, 2.0]);
        let t = Tensor::from_vec(&[1], vec![1i64]).unwrap();
        let op = build("SoftmaxCrossEntropyLoss", 13, vec![], 2, 2).unwrap();
        let o = run(op.as_ref(), &[Some(x), Some(t)]).unwrap();
        let lse = (1f32.exp() + 2f32.exp()).ln();
        close(o[0].as_slice::<f32>().unwrap(), &[lse - 2.0], 1e-6);
        close(
            o[1].as_slice::<f32>().unwrap(),
            &[1.0 - lse, 2.0 - lse],
            1e-6,
        );
    }
}
