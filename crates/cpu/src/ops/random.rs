//! Random generators: `RandomNormal`, `RandomUniform`, `RandomNormalLike`,
//! `RandomUniformLike`, `Bernoulli`, `Multinomial`.
//!
//! None of them is deterministic (so they are never constant-folded). With the `seed`
//! attribute, every run of a node draws the same numbers; without it, each run is seeded
//! from a process-wide counter mixed with the clock. The generator is xoshiro256**
//! seeded through splitmix64; normal samples use the Box–Muller transform.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_core::{BuildCtx, DType, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("RandomNormal", |c| build_random(c, Dist::Normal, false));
    reg.register("RandomUniform", |c| build_random(c, Dist::Uniform, false));
    reg.register("RandomNormalLike", |c| build_random(c, Dist::Normal, true));
    reg.register("RandomUniformLike", |c| {
        build_random(c, Dist::Uniform, true)
    });
    reg.register("Bernoulli", build_bernoulli);
    reg.register("Multinomial", build_multinomial);
}

/// A small, fast PRNG (xoshiro256**).
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator from a 64-bit seed.
    pub(crate) fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    /// A generator for an op run: from the `seed` attribute when given, else fresh.
    pub(crate) fn for_run(seed: Option<f32>) -> Rng {
        static COUNTER: AtomicU64 = AtomicU64::new(0x5EED);
        match seed {
            Some(s) => Rng::new(u64::from(s.to_bits())),
            None => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                Rng::new(t ^ n.rotate_left(32))
            }
        }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal.
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A dtype attribute (ONNX code) or `default`.
fn dtype_attr(ctx: &BuildCtx, name: &str) -> Result<Option<DType>> {
    let a = ctx.attrs();
    match a.opt_int(name)? {
        None => Ok(None),
        Some(code) => i32::try_from(code)
            .ok()
            .and_then(DType::from_onnx_code)
            .map(Some)
            .ok_or_else(|| a.unsupported(format!("{name} {code}"))),
    }
}

/// f64 samples as a tensor of `dtype` (a float type, or any numeric type for Bernoulli).
fn to_tensor(op: &str, shape: &[usize], data: Vec<f64>, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(shape, data)?;
    t.cast(dtype)
        .map_err(|e| KilnError::kernel(op, e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dist {
    Normal,
    Uniform,
}

/// `RandomNormal`, `RandomUniform` and their `*Like` variants.
#[derive(Debug)]
pub struct RandomTensor {
    dist: Dist,
    like: bool,
    /// Mean (normal) or low (uniform).
    a: f64,
    /// Scale (normal) or high (uniform).
    b: f64,
    seed: Option<f32>,
    dtype: Option<DType>,
    shape: Vec<usize>,
}

fn build_random(ctx: &BuildCtx, dist: Dist, like: bool) -> Result<Box<dyn Op>> {
    let at = ctx.attrs();
    let (a, b) = match dist {
        Dist::Normal => (at.float("mean", 0.0)?, at.float("scale", 1.0)?),
        Dist::Uniform => (at.float("low", 0.0)?, at.float("high", 1.0)?),
    };
    let mut dtype = dtype_attr(ctx, "dtype")?;
    if !like && dtype.is_none() {
        dtype = Some(DType::F32);
    }
    if let Some(d) = dtype {
        if !d.is_float() {
            return Err(at.invalid(format!("dtype must be a float type, found {d}")));
        }
    }
    let shape = if like {
        Vec::new()
    } else {
        let s = at
            .opt_ints("shape")?
            .ok_or_else(|| at.invalid("required attribute shape is missing"))?;
        s.iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| at.invalid(format!("shape has a negative dim {d}")))
            })
            .collect::<Result<_>>()?
    };
    Ok(Box::new(RandomTensor {
        dist,
        like,
        a: f64::from(a),
        b: f64::from(b),
        seed: at.opt_float("seed")?,
        dtype,
        shape,
    }))
}

impl Op for RandomTensor {
    fn op_type(&self) -> &str {
        match (self.dist, self.like) {
            (Dist::Normal, false) => "RandomNormal",
            (Dist::Uniform, false) => "RandomUniform",
            (Dist::Normal, true) => "RandomNormalLike",
            (Dist::Uniform, true) => "RandomUniformLike",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        if !self.like {
            return Ok(vec![Fact::concrete(
                self.dtype.unwrap_or(DType::F32),
                &self.shape,
            )]);
        }
        let input = inputs.first().copied().flatten();
        let dtype = self.dtype.or(input.and_then(|f| f.dtype));
        let shape = input.and_then(|f| f.shape.clone());
        Ok(vec![Fact {
            dtype,
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = self.op_type();
        let (shape, dtype) = if self.like {
            let x = kiln_core::input_tensor(inputs, 0, op)?;
            (x.shape().to_vec(), self.dtype.unwrap_or(x.dtype()))
        } else {
            (self.shape.clone(), self.dtype.unwrap_or(DType::F32))
        };
        if !dtype.is_float() {
            return Err(KilnError::kernel(
                op,
                format!("output dtype must be a float type, found {dtype}"),
            ));
        }
        let n = kiln_core::numel(&shape);
        let mut rng = Rng::for_run(self.seed);
        let data: Vec<f64> = match self.dist {
            Dist::Normal => (0..n).map(|_| self.a + self.b * rng.normal()).collect(),
            Dist::Uniform => (0..n)
                .map(|_| self.a + (self.b - self.a) * rng.uniform())
                .collect(),
        };
        Ok(vec![Value::Tensor(to_tensor(op, &shape, data, dtype)?)])
    }

    fn is_deterministic(&self) -> bool {
        false
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `Bernoulli`: 1 with the input probability, else 0.
#[derive(Debug)]
pub struct Bernoulli {
    dtype: Option<DType>,
    seed: Option<f32>,
}

fn build_bernoulli(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let dtype = dtype_attr(ctx, "dtype")?;
    if dtype == Some(DType::String) {
        return Err(ctx.attrs().invalid("dtype cannot be string"));
    }
    Ok(Box::new(Bernoulli {
        dtype,
        seed: ctx.attrs().opt_float("seed")?,
    }))
}

impl Op for Bernoulli {
    fn op_type(&self) -> &str {
        "Bernoulli"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let input = inputs.first().copied().flatten();
        let dtype = self.dtype.or(input.and_then(|f| f.dtype));
        Ok(vec![Fact {
            dtype,
            shape: input.and_then(|f| f.shape.clone()),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Bernoulli")?;
        if !x.dtype().is_float() {
            return Err(KilnError::kernel(
                "Bernoulli",
                format!("input must be a float tensor, found {}", x.dtype()),
            ));
        }
        let mut rng = Rng::for_run(self.seed);
        let data: Vec<f64> = x
            .to_f64_vec()?
            .iter()
            .map(|&p| if rng.uniform() < p { 1.0 } else { 0.0 })
            .collect();
        Ok(vec![Value::Tensor(to_tensor(
            "Bernoulli",
            x.shape(),
            data,
            self.dtype.unwrap_or(x.dtype()),
        )?)])
    }

    fn is_deterministic(&self) -> bool {
        false
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `Multinomial`: samples class indices from unnormalised log-probabilities `[batch, classes]`.
#[derive(Debug)]
pub struct Multinomial {
    dtype: DType,
    sample_size: usize,
    seed: Option<f32>,
}

fn build_multinomial(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let dtype = dtype_attr(ctx, "dtype")?.unwrap_or(DType::I32);
    if dtype != DType::I32 && dtype != DType::I64 {
        return Err(a.invalid(format!("dtype must be int32 or int64, found {dtype}")));
    }
    let s = a.int("sample_size", 1)?;
    let sample_size =
        usize::try_from(s).map_err(|_| a.invalid(format!("sample_size {s} is negative")))?;
    Ok(Box::new(Multinomial {
        dtype,
        sample_size,
        seed: a.opt_float("seed")?,
    }))
}

impl Op for Multinomial {
    fn op_type(&self) -> &str {
        "Multinomial"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let batch = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.shape.as_ref().and_then(|s| s.first().cloned()))
            .unwrap_or(kiln_core::Dim::Unknown);
        Ok(vec![Fact::tensor(
            self.dtype,
            vec![batch, kiln_core::Dim::Known(self.sample_size)],
        )])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "Multinomial";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let [batch, classes] = *x.shape() else {
            return Err(KilnError::kernel(
                OP,
                format!("input must be [batch, classes], found {:?}", x.shape()),
            ));
        };
        if !x.dtype().is_float() {
            return Err(KilnError::kernel(
                OP,
                format!("input must be a float tensor, found {}", x.dtype()),
            ));
        }
        if classes == 0 && self.sample_size > 0 && batch > 0 {
            return Err(KilnError::kernel(OP, "cannot sample from zero classes"));
        }
        let logits = x.to_f64_vec()?;
        let mut rng = Rng::for_run(self.seed);
        let mut out = Vec::with_capacity(batch * self.sample_size);
        for row in logits.chunks(classes.max(1)).take(batch) {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let cdf: Vec<f64> = row
                .iter()
                .scan(0.0, |acc, &l| {
                    *acc += (l - max).exp();
                    Some(*acc)
                })
                .collect();
            let total = cdf.last().copied().unwrap_or(0.0);
            for _ in 0..self.sample_size {
                let u = rng.uniform() * total;
                let k = cdf.iter().position(|&c| u < c).unwrap_or(classes - 1);
                out.push(k as f64);
            }
        }
        Ok(vec![Value::Tensor(to_tensor(
            OP,
            &[batch, self.sample_size],
            out,
            self.dtype,
        )?)])
    }

    fn is_deterministic(&self) -> bool {
        false
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::control_flow::testutil::*;
    use kiln_core::Attr;

    fn mk(op_type: &str, attrs: Vec<(&str, Attr)>) -> std::sync::Arc<dyn Op> {
        let mut reg = OpRegistry::new();
        register(&mut reg);
        let desc = kiln_core::OpDesc {
            domain: String::new(),
            op_type: op_type.into(),
            opset: 22,
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        let ctx = BuildCtx {
            node: "t",
            desc: &desc,
            n_inputs: 1,
            n_outputs: 1,
        };
        let op = reg.build(&ctx).unwrap();
        assert!(!op.is_deterministic());
        op
    }

    #[test]
    fn normal_statistics_and_seed() {
        let attrs = || {
            vec![
                ("shape", Attr::Ints(vec![100, 100])),
                ("mean", Attr::Float(2.0)),
                ("scale", Attr::Float(3.0)),
                ("seed", Attr::Float(1.0)),
            ]
        };
        let op = mk("RandomNormal", attrs());
        let a = run(op.as_ref(), &[])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(a.shape(), &[100, 100]);
        assert_eq!(a.dtype(), DType::F32);
        let v = a.to_f64_vec().unwrap();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 2.0).abs() < 0.1, "{mean}");
        assert!((var.sqrt() - 3.0).abs() < 0.1, "{var}");
        let b = run(op.as_ref(), &[])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert!(a.same_as(&b));
    }

    #[test]
    fn uniform_like_range_and_dtype() {
        let op = mk(
            "RandomUniformLike",
            vec![("low", Attr::Float(-1.0)), ("high", Attr::Float(-0.5))],
        );
        let x = Tensor::zeros(DType::F64, &[3, 7]);
        let a = run(op.as_ref(), &[tv(x)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(a.dtype(), DType::F64);
        assert_eq!(a.shape(), &[3, 7]);
        assert!(a
            .to_f64_vec()
            .unwrap()
            .iter()
            .all(|v| (-1.0..-0.5).contains(v)));
        let op = mk("RandomNormalLike", vec![("dtype", Attr::Int(10))]);
        let a = run(op.as_ref(), &[tv(Tensor::zeros(DType::F32, &[2]))])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(a.dtype(), DType::F16);
        let op = mk("RandomUniformLike", vec![]);
        assert!(run(op.as_ref(), &[tv(Tensor::zeros(DType::I32, &[2]))]).is_err());
        assert!(run(op.as_ref(), &[]).is_err());
    }

    #[test]
    fn bernoulli_extremes_and_dtype() {
        let op = mk("Bernoulli", vec![("dtype", Attr::Int(9))]);
        let p = f32t(&[4], &[0.0, 1.0, 0.0, 1.0]);
        let a = run(op.as_ref(), &[tv(p)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(a.as_bools().unwrap(), &[false, true, false, true]);
        let op = mk("Bernoulli", vec![("seed", Attr::Float(0.0))]);
        let p = Tensor::from_vec(&[1000], vec![0.3f64; 1000]).unwrap();
        let a = run(op.as_ref(), &[tv(p)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(a.dtype(), DType::F64);
        let ones = a.to_f64_vec().unwrap().iter().sum::<f64>();
        assert!((200.0..400.0).contains(&ones), "{ones}");
        assert!(run(op.as_ref(), &[tv(Tensor::scalar(1i64))]).is_err());
    }

    #[test]
    fn multinomial_samples_likely_classes() {
        let op = mk(
            "Multinomial",
            vec![("sample_size", Attr::Int(50)), ("dtype", Attr::Int(7))],
        );
        let logits = f32t(&[2, 3], &[0.0, -100.0, -100.0, -100.0, -100.0, 0.0]);
        let a = run(op.as_ref(), &[tv(logits)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(a.shape(), &[2, 50]);
        let v = a.to_i64_vec().unwrap();
        assert!(v[..50].iter().all(|&k| k == 0));
        assert!(v[50..].iter().all(|&k| k == 2));
        assert!(run(op.as_ref(), &[tv(f32t(&[3], &[0., 0., 0.]))]).is_err());
        let f = op
            .infer(&[Some(&Fact::concrete(DType::F32, &[2, 3]))], 1)
            .unwrap();
        assert_eq!(f[0].concrete_shape(), Some(vec![2, 50]));
    }
}
