//! Optimizer ops of the `ai.onnx.preview.training` domain: `Adagrad`, `Adam`, `Momentum`.
//!
//! Inputs are `[R, T, X_1..X_n, G_1..G_n, <state groups>]` (R the learning rate, T the
//! update count); outputs are the new `X`s followed by the new states, group by group.
//! Arithmetic is done in f64 and each output takes the dtype of the input it updates.

use std::any::Any;

use kiln_core::{BuildCtx, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

/// The training-preview domain name.
const TRAINING: &str = "ai.onnx.preview.training";

/// Registers the optimizers.
pub fn register(reg: &mut OpRegistry) {
    reg.register_in(TRAINING, "Adagrad", build_adagrad);
    reg.register_in(TRAINING, "Adam", build_adam);
    reg.register_in(TRAINING, "Momentum", build_momentum);
}

/// Which optimizer, with its attributes.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Adagrad {
        decay_factor: f64,
        epsilon: f64,
        norm: f64,
    },
    Adam {
        alpha: f64,
        beta: f64,
        epsilon: f64,
        norm: f64,
        norm_post: f64,
    },
    Momentum {
        alpha: f64,
        beta: f64,
        norm: f64,
        nesterov: bool,
    },
}

/// `Adagrad`, `Adam` or `Momentum`.
#[derive(Debug)]
pub struct Optimizer {
    rule: Rule,
}

fn build_adagrad(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(Optimizer {
        rule: Rule::Adagrad {
            decay_factor: f64::from(a.float("decay_factor", 0.0)?),
            epsilon: f64::from(a.float("epsilon", 1e-6)?),
            norm: f64::from(a.float("norm_coefficient", 0.0)?),
        },
    }))
}

fn build_adam(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(Optimizer {
        rule: Rule::Adam {
            alpha: f64::from(a.float("alpha", 0.9)?),
            beta: f64::from(a.float("beta", 0.999)?),
            epsilon: f64::from(a.float("epsilon", 1e-6)?),
            norm: f64::from(a.float("norm_coefficient", 0.0)?),
            norm_post: f64::from(a.float("norm_coefficient_post", 0.0)?),
        },
    }))
}

fn build_momentum(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let req = |n: &str| {
        a.opt_float(n)?
            .ok_or_else(|| a.invalid(format!("required attribute {n} is missing")))
    };
    let nesterov = match a.string("mode", "standard")?.as_str() {
        "standard" => false,
        "nesterov" => true,
        m => return Err(a.invalid(format!("mode must be standard or nesterov, found {m:?}"))),
    };
    Ok(Box::new(Optimizer {
        rule: Rule::Momentum {
            alpha: f64::from(req("alpha")?),
            beta: f64::from(req("beta")?),
            norm: f64::from(req("norm_coefficient")?),
            nesterov,
        },
    }))
}

impl Optimizer {
    /// Tensors per optimized variable: X, G and the states.
    fn group(&self) -> usize {
        match self.rule {
            Rule::Adagrad { .. } | Rule::Momentum { .. } => 3,
            Rule::Adam { .. } => 4,
        }
    }

    /// Updates one variable; `xs[0]` is X, `xs[1]` G, the rest the states. Returns the
    /// new X followed by the new states.
    fn update(&self, r: f64, t: i64, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let (x, g) = (&xs[0], &xs[1]);
        let n = x.len();
        match self.rule {
            Rule::Adagrad {
                decay_factor,
                epsilon,
                norm,
            } => {
                let h = &xs[2];
                let r_ = r / (1.0 + t as f64 * decay_factor);
                let mut xn = Vec::with_capacity(n);
                let mut hn = Vec::with_capacity(n);
                for i in 0..n {
                    let gr = norm * x[i] + g[i];
                    let h2 = h[i] + gr * gr;
                    xn.push(x[i] - r_ * gr / (h2.sqrt() + epsilon));
                    hn.push(h2);
                }
                vec![xn, hn]
            }
            Rule::Adam {
                alpha,
                beta,
                epsilon,
                norm,
                norm_post,
            } => {
                let (v, h) = (&xs[2], &xs[3]);
                let r_ = if t > 0 {
                    let t = t as f64;
                    r * (1.0 - beta.powf(t)).sqrt() / (1.0 - alpha.powf(t))
                } else {
                    r
                };
                let (mut xn, mut vn, mut hn) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for i in 0..n {
                    let gr = norm * x[i] + g[i];
                    let v2 = alpha * v[i] + (1.0 - alpha) * gr;
                    let h2 = beta * h[i] + (1.0 - beta) * gr * gr;
                    let x2 = x[i] - r_ * v2 / (h2.sqrt() + epsilon);
                    xn.push((1.0 - norm_post) * x2);
                    vn.push(v2);
                    hn.push(h2);
                }
                vec![xn, vn, hn]
            }
            Rule::Momentum {
                alpha,
                beta,
                norm,
                nesterov,
            } => {
                let v = &xs[2];
                let b = if t > 0 { beta } else { 1.0 };
                let (mut xn, mut vn) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for i in 0..n {
                    let gr = norm * x[i] + g[i];
                    let v2 = alpha * v[i] + b * gr;
                    let step = if nesterov { gr + alpha * v2 } else { v2 };
                    xn.push(x[i] - r * step);
                    vn.push(v2);
                }
                vec![xn, vn]
            }
        }
    }
}

impl Op for Optimizer {
    fn op_type(&self) -> &str {
        match self.rule {
            Rule::Adagrad { .. } => "Adagrad",
            Rule::Adam { .. } => "Adam",
            Rule::Momentum { .. } => "Momentum",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let k = self.group();
        let n = inputs.len().saturating_sub(2) / k;
        // Output j of group s describes input 2 + s' * n + i, where X maps to X and each
        // state to its own input group.
        let mut out = Vec::with_capacity(n_outputs);
        for j in 0..n_outputs {
            let (s, i) = (j / n.max(1), j % n.max(1));
            let src = if s == 0 { 2 + i } else { 2 + (s + 1) * n + i };
            let f = inputs
                .get(src)
                .copied()
                .flatten()
                .cloned()
                .unwrap_or_default();
            out.push(Fact { konst: None, ..f });
        }
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = self.op_type();
        let k = self.group();
        if inputs.len() < 2 + k || !(inputs.len() - 2).is_multiple_of(k) {
            return Err(KilnError::kernel(
                op,
                format!("expected 2 + {k}·n inputs, got {}", inputs.len()),
            ));
        }
        let n = (inputs.len() - 2) / k;
        let r = scalar_f64(inputs, 0, op, "R")?;
        let t = kiln_core::input_tensor(inputs, 1, op)?;
        let t = match t
            .to_i64_vec()
            .map_err(|e| KilnError::kernel(op, format!("T: {e}")))?
            .as_slice()
        {
            [t] => *t,
            _ => return Err(KilnError::kernel(op, "T must be a scalar")),
        };
        let mut outs: Vec<Vec<Value>> = vec![Vec::with_capacity(n); k - 1];
        for i in 0..n {
            let tensors: Vec<&Tensor> = (0..k)
                .map(|g| kiln_core::input_tensor(inputs, 2 + g * n + i, op))
                .collect::<Result<_>>()?;
            let x = tensors[0];
            if let Some(bad) = tensors.iter().find(|t| t.shape() != x.shape()) {
                return Err(KilnError::kernel(
                    op,
                    format!(
                        "tensors of variable {i} differ in shape: {:?} vs {:?}",
                        x.shape(),
                        bad.shape()
                    ),
                ));
            }
            if !x.dtype().is_float() {
                return Err(KilnError::kernel(
                    op,
                    format!("X must be a float tensor, found {}", x.dtype()),
                ));
            }
            let data: Vec<Vec<f64>> = tensors
                .iter()
                .map(|t| t.to_f64_vec())
                .collect::<Result<_>>()?;
            let updated = self.update(r, t, &data);
            // Output group 0 is X (input group 0); group s > 0 is state input group s + 1.
            for (s, v) in updated.into_iter().enumerate() {
                let like = if s == 0 { tensors[0] } else { tensors[s + 1] };
                outs[s].push(Value::Tensor(
                    Tensor::from_vec(like.shape(), v)?.cast(like.dtype())?,
                ));
            }
        }
        Ok(outs.into_iter().flatten().collect())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A one-element float input.
fn scalar_f64(inputs: &[Option<&Value>], i: usize, op: &str, what: &str) -> Result<f64> {
    let t = kiln_core::input_tensor(inputs, i, op)?;
    match t
        .to_f64_vec()
        .map_err(|e| KilnError::kernel(op, format!("{what}: {e}")))?
        .as_slice()
    {
        [v] => Ok(*v),
        _ => Err(KilnError::kernel(
            op,
            format!("{what} must be a scalar, found shape {:?}", t.shape()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::control_flow::testutil::*;
    use kiln_core::Attr;

    fn mk(op_type: &str, attrs: Vec<(&str, Attr)>) -> Result<std::sync::Arc<dyn Op>> {
        let mut reg = OpRegistry::new();
        register(&mut reg);
        let desc = kiln_core::OpDesc {
            domain: TRAINING.into(),
            op_type: op_type.into(),
            opset: 1,
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        reg.build(&BuildCtx {
            node: "t",
            desc: &desc,
            n_inputs: 5,
            n_outputs: 2,
        })
    }

    fn vals(v: &[Value]) -> Vec<Vec<f32>> {
        v.iter()
            .map(|x| x.as_tensor().unwrap().to_f32_vec().unwrap())
            .collect()
    }

    #[test]
    fn adagrad_matches_hand_computation() {
        let op = mk(
            "Adagrad",
            vec![
                ("decay_factor", Attr::Float(0.1)),
                ("epsilon", Attr::Float(1e-5)),
                ("norm_coefficient", Attr::Float(0.001)),
            ],
        )
        .unwrap();
        let r = Tensor::scalar(0.1f32);
        let t = Tensor::scalar(0i64);
        let x = f32t(&[2], &[1.0, 2.0]);
        let g = f32t(&[2], &[-1.0, -3.0]);
        let h = f32t(&[2], &[2.0, 1.0]);
        let out = run(op.as_ref(), &[tv(r), tv(t), tv(x), tv(g), tv(h)]).unwrap();
        let gr = [0.001 * 1.0 - 1.0, 0.001 * 2.0 - 3.0];
        let h2 = [2.0 + gr[0] * gr[0], 1.0 + gr[1] * gr[1]];
        let xe: Vec<f32> = (0..2)
            .map(|i| ([1.0, 2.0][i] - 0.1 * gr[i] / (f64::sqrt(h2[i]) + 1e-5)) as f32)
            .collect();
        let got = vals(&out);
        for i in 0..2 {
            assert!((got[0][i] - xe[i]).abs() < 1e-6);
            assert!((got[1][i] - h2[i] as f32).abs() < 1e-5);
        }
    }

    #[test]
    fn adam_and_momentum_two_variables() {
        let op = mk(
            "Adam",
            vec![("alpha", Attr::Float(0.95)), ("beta", Attr::Float(0.1))],
        )
        .unwrap();
        let r = Tensor::scalar(0.1f32);
        let t = Tensor::scalar(1i64);
        let z = f32t(&[1], &[0.0]);
        let x1 = f32t(&[1], &[1.0]);
        let g1 = f32t(&[1], &[2.0]);
        let out = run(
            op.as_ref(),
            &[
                tv(r.clone()),
                tv(t.clone()),
                tv(x1.clone()),
                tv(x1.clone()),
                tv(g1.clone()),
                tv(g1.clone()),
                tv(z.clone()),
                tv(z.clone()),
                tv(z.clone()),
                tv(z.clone()),
            ],
        )
        .unwrap();
        assert_eq!(out.len(), 6);
        // v = 0.05 * 2 = 0.1; h = 0.9 * 4 = 3.6; r' = 0.1 * sqrt(0.9) / 0.05
        let rr = 0.1 * 0.9f64.sqrt() / 0.05;
        let xe = 1.0 - rr * 0.1 / (3.6f64.sqrt() + 1e-6);
        let got = vals(&out);
        assert!((f64::from(got[0][0]) - xe).abs() < 1e-5);
        assert!((got[2][0] - 0.1).abs() < 1e-6);
        assert!((got[4][0] - 3.6).abs() < 1e-5);

        let op = mk(
            "Momentum",
            vec![
                ("alpha", Attr::Float(0.9)),
                ("beta", Attr::Float(0.5)),
                ("norm_coefficient", Attr::Float(0.0)),
                ("mode", Attr::String("nesterov".into())),
            ],
        )
        .unwrap();
        let v = f32t(&[1], &[1.0]);
        let out = run(
            op.as_ref(),
            &[
                tv(r.clone()),
                tv(t.clone()),
                tv(x1.clone()),
                tv(g1.clone()),
                tv(v),
            ],
        )
        .unwrap();
        // v' = 0.9 + 0.5 * 2 = 1.9; x' = 1 - 0.1 * (2 + 0.9 * 1.9)
        let got = vals(&out);
        assert!((got[1][0] - 1.9).abs() < 1e-6);
        assert!((got[0][0] - (1.0 - 0.1 * (2.0 + 0.9 * 1.9))).abs() < 1e-6);
        assert!(mk("Momentum", vec![("alpha", Attr::Float(0.9))]).is_err());
        // Wrong input count and mismatched shapes.
        assert!(run(op.as_ref(), &[tv(r.clone()), tv(t.clone()), tv(x1.clone())]).is_err());
        assert!(run(
            op.as_ref(),
            &[tv(r), tv(t), tv(x1), tv(f32t(&[2], &[1., 2.])), tv(z)]
        )
        .is_err());
    }
}
