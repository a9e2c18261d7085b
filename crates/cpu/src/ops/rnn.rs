//! Recurrent layers: `LSTM`, `GRU` and `RNN` (every opset: 1, 3, 7, 14, 22).
//!
//! One shared driver handles directions, layouts, sequence lengths and initial states;
//! the cells differ only in their per-step update. The input projection of every
//! timestep is one product (transposed for short sequences, so the weights are read
//! as contiguous rows); the recurrent product uses GEMM for batches larger than one and
//! the GEMM's dot-product path otherwise (the common streaming case,
//! e.g. silero VAD with hidden size 128).
//!
//! Floats are computed in f32 (f16/bf16 are widened) or f64 for f64 inputs.

use std::borrow::Cow;

use super::activation::{exp_f32_fast, tanh_f32_fast};
use super::linalg::blas::{self, GemmFloat, MatRef};
use super::linalg::sgemm::{narrow_max_cols, Isa};
use crate::scratch::with_scratch;
use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, TensorMut, Value,
};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("LSTM", build_lstm);
    reg.register("GRU", build_gru);
    reg.register("RNN", build_rnn);
}

// ---------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------

/// An activation function of a recurrent cell, with its alpha/beta parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RnnAct {
    /// max(0, x).
    Relu,
    /// tanh(x).
    Tanh,
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// alpha·x + beta.
    Affine(f32, f32),
    /// x if x ≥ 0 else alpha·x.
    LeakyRelu(f32),
    /// x if x ≥ alpha else 0.
    ThresholdedRelu(f32),
    /// alpha·tanh(beta·x).
    ScaledTanh(f32, f32),
    /// clamp(alpha·x + beta, 0, 1).
    HardSigmoid(f32, f32),
    /// x if x ≥ 0 else alpha·(e^x − 1).
    Elu(f32),
    /// x / (1 + |x|).
    Softsign,
    /// ln(1 + e^x).
    Softplus,
}

impl RnnAct {
    /// Parses an activation name (case-insensitive), consuming alpha/beta values from the
    /// iterators for the functions that take them (ONNX Runtime's convention).
    fn parse(
        name: &str,
        alphas: &mut impl Iterator<Item = f32>,
        betas: &mut impl Iterator<Item = f32>,
    ) -> Option<RnnAct> {
        let lower = name.to_ascii_lowercase();
        let mut a = |d: f32| alphas.next().unwrap_or(d);
        Some(match lower.as_str() {
            "relu" => RnnAct::Relu,
            "tanh" => RnnAct::Tanh,
            "sigmoid" => RnnAct::Sigmoid,
            "affine" => {
                let al = a(1.0);
                RnnAct::Affine(al, betas.next().unwrap_or(0.0))
            }
            "leakyrelu" => RnnAct::LeakyRelu(a(0.01)),
            "thresholdedrelu" => RnnAct::ThresholdedRelu(a(1.0)),
            "scaledtanh" => {
                let al = a(1.0);
                RnnAct::ScaledTanh(al, betas.next().unwrap_or(1.0))
            }
            "hardsigmoid" => {
                let al = a(0.2);
                RnnAct::HardSigmoid(al, betas.next().unwrap_or(0.5))
            }
            "elu" => RnnAct::Elu(a(1.0)),
            "softsign" => RnnAct::Softsign,
            "softplus" => RnnAct::Softplus,
            _ => return None,
        })
    }

    /// Applies the activation in place.
    #[inline]
    fn apply<T: RnnFloat>(self, xs: &mut [T]) {
        let c = |v: f32| T::from_f32(v);
        match self {
            RnnAct::Relu => xs.iter_mut().for_each(|x| *x = x.max(T::zero())),
            RnnAct::Tanh => T::tanh_all(xs),
            RnnAct::Sigmoid => T::sigmoid_all(xs),
            RnnAct::Affine(a, b) => xs.iter_mut().for_each(|x| *x = c(a) * *x + c(b)),
            RnnAct::LeakyRelu(a) => xs.iter_mut().for_each(|x| {
                if *x < T::zero() {
                    *x = c(a) * *x
                }
            }),
            RnnAct::ThresholdedRelu(a) => xs.iter_mut().for_each(|x| {
                if *x < c(a) {
                    *x = T::zero()
                }
            }),
            RnnAct::ScaledTanh(a, b) => xs.iter_mut().for_each(|x| *x = c(a) * (c(b) * *x).tanh()),
            RnnAct::HardSigmoid(a, b) => xs
                .iter_mut()
                .for_each(|x| *x = (c(a) * *x + c(b)).max(T::zero()).min(T::one())),
            RnnAct::Elu(a) => xs.iter_mut().for_each(|x| {
                if *x < T::zero() {
                    *x = c(a) * (x.exp() - T::one())
                }
            }),
            RnnAct::Softsign => xs.iter_mut().for_each(|x| *x = *x / (T::one() + x.abs())),
            RnnAct::Softplus => xs.iter_mut().for_each(|x| {
                // ln(1 + e^x) computed without overflow.
                *x = x.max(T::zero()) + (-x.abs()).exp().ln_1p()
            }),
        }
    }
}

#[inline]
fn sigmoid<T: RnnFloat>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

// ---------------------------------------------------------------------------------------
// Numeric helpers
// ---------------------------------------------------------------------------------------

/// The float types the recurrent kernels compute in.
pub trait RnnFloat: GemmFloat + bytemuck::Pod + std::fmt::Debug {
    /// The tensor dtype of this type.
    const DTYPE: DType;
    /// Converts an attribute value.
    fn from_f32(v: f32) -> Self;
    /// The logistic sigmoid of every value, in place.
    fn sigmoid_all(xs: &mut [Self]) {
        xs.iter_mut().for_each(|x| *x = sigmoid(*x));
    }
    /// tanh of every value, in place.
    fn tanh_all(xs: &mut [Self]) {
        xs.iter_mut().for_each(|x| *x = x.tanh());
    }
}

impl RnnFloat for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    /// With [`exp_f32_fast`] (a polynomial the loop vectorises; relative error ~2e-7)
    /// instead of libm's scalar `exp`: the gates of every recurrent step.
    fn sigmoid_all(xs: &mut [f32]) {
        xs.iter_mut()
            .for_each(|x| *x = 1.0 / (1.0 + exp_f32_fast(-*x)));
    }
    /// [`tanh_f32_fast`]: `1 − 2 / (1 + e^{2x})` with [`exp_f32_fast`], the Taylor series
    /// near zero.
    fn tanh_all(xs: &mut [f32]) {
        xs.iter_mut().for_each(|x| *x = tanh_f32_fast(*x));
    }
}

impl RnnFloat for f64 {
    const DTYPE: DType = DType::F64;
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

/// `c[m×n] = a[m×k] · b[n×k]ᵀ` (all row-major, contiguous). Overwrites `c`.
fn matmul_bt<T: RnnFloat>(m: usize, n: usize, k: usize, a: &[T], b: &[T], c: &mut [T]) {
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v = T::zero());
        return;
    }
    let a = &a[..m * k];
    let b = &b[..n * k];
    if m == 1 {
        // One row (batch 1, every recurrent step): cᵀ = b · aᵀ, an n × k by k × 1 product,
        // which the GEMM's narrow path runs as SIMD dot products over b's contiguous rows.
        if blas::gemm(
            n,
            1,
            k,
            c,
            1,
            false,
            MatRef::row_major(b, k),
            MatRef::row_major(a, 1),
            T::one(),
            false,
        )
        .is_err()
        {
            for (j, out) in c.iter_mut().enumerate() {
                *out = dot(a, &b[j * k..(j + 1) * k]);
            }
        }
        return;
    }
    let parallel = m * n * k >= blas::PARALLEL_THRESHOLD;
    if T::DTYPE == DType::F32 && m <= narrow_max_cols(Isa::detect()) {
        // A few rows (the input projection of a short sequence): cᵀ = b · aᵀ runs as SIMD
        // dot products over b's contiguous rows (the GEMM's narrow path), where c = a · bᵀ
        // would pack b read transposed, one strided load per weight. Then cᵀ → c.
        let done = with_scratch::<T, _>(n * m, |ct| {
            let ok = blas::gemm(
                n,
                m,
                k,
                ct,
                m,
                false,
                MatRef::row_major(b, k),
                MatRef::transposed(a, k),
                T::one(),
                parallel,
            )
            .is_ok();
            if ok {
                for (j, row) in ct.chunks_exact(m).enumerate() {
                    for (i, v) in row.iter().enumerate() {
                        c[i * n + j] = *v;
                    }
                }
            }
            ok
        });
        if done {
            return;
        }
    }
    // c = a · bᵀ: b (n×k row-major) read transposed. The shapes were checked above, so the
    // wrapper cannot fail; fall back to dot products if it ever does.
    if blas::gemm(
        m,
        n,
        k,
        c,
        n,
        false,
        MatRef::row_major(a, k),
        MatRef::transposed(b, k),
        T::one(),
        parallel,
    )
    .is_err()
    {
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = dot(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
            }
        }
    }
}

/// Dot product with several accumulators (vectorizes well).
#[inline]
fn dot<T: RnnFloat>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let chunks = n / 8;
    for i in 0..chunks {
        let (ac, bc) = (&a[i * 8..i * 8 + 8], &b[i * 8..i * 8 + 8]);
        for l in 0..8 {
            acc[l] = acc[l] + ac[l] * bc[l];
        }
    }
    let mut tail = T::zero();
    for i in chunks * 8..n {
        tail = tail + a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline]
fn clip_slice<T: RnnFloat>(xs: &mut [T], clip: Option<T>) {
    if let Some(c) = clip {
        for x in xs {
            *x = x.max(-c).min(c);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Op description
// ---------------------------------------------------------------------------------------

/// Which cell a recurrent op runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CellKind {
    /// Long short-term memory (gates i, o, f, c).
    Lstm {
        /// Couples the forget gate to the input gate: f = 1 − i.
        input_forget: bool,
    },
    /// Gated recurrent unit (gates z, r, h).
    Gru {
        /// Applies the recurrent linear transform before the reset gate.
        linear_before_reset: bool,
    },
    /// Simple recurrent network (one gate).
    Rnn,
}

impl CellKind {
    fn name(self) -> &'static str {
        match self {
            CellKind::Lstm { .. } => "LSTM",
            CellKind::Gru { .. } => "GRU",
            CellKind::Rnn => "RNN",
        }
    }
    fn gates(self) -> usize {
        match self {
            CellKind::Lstm { .. } => 4,
            CellKind::Gru { .. } => 3,
            CellKind::Rnn => 1,
        }
    }
    fn n_acts(self) -> usize {
        match self {
            CellKind::Lstm { .. } => 3,
            CellKind::Gru { .. } => 2,
            CellKind::Rnn => 1,
        }
    }
    fn default_acts(self) -> Vec<RnnAct> {
        match self {
            CellKind::Lstm { .. } => vec![RnnAct::Sigmoid, RnnAct::Tanh, RnnAct::Tanh],
            CellKind::Gru { .. } => vec![RnnAct::Sigmoid, RnnAct::Tanh],
            CellKind::Rnn => vec![RnnAct::Tanh],
        }
    }
}

/// Processing direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Direction {
    /// Forward only.
    Forward,
    /// Reverse only.
    Reverse,
    /// Both; outputs stack forward then reverse.
    Bidirectional,
}

impl Direction {
    fn count(self) -> usize {
        if self == Direction::Bidirectional {
            2
        } else {
            1
        }
    }
    /// True when direction index `d` runs backwards in time.
    fn reversed(self, d: usize) -> bool {
        self == Direction::Reverse || (self == Direction::Bidirectional && d == 1)
    }
}

/// A recurrent layer (`LSTM`, `GRU` or `RNN`).
#[derive(Debug, Clone)]
pub struct Recurrent {
    /// The cell.
    pub cell: CellKind,
    /// Direction.
    pub direction: Direction,
    /// `hidden_size` attribute, checked against `R` when present.
    pub hidden_size: Option<usize>,
    /// Activations, `cell.n_acts()` per direction.
    pub acts: Vec<RnnAct>,
    /// Cell clip threshold.
    pub clip: Option<f32>,
    /// 0: `[seq, batch, ...]`; 1: `[batch, seq, ...]`.
    pub layout: usize,
}

fn build_common(ctx: &BuildCtx, cell: CellKind) -> Result<Recurrent> {
    let a = ctx.attrs();
    let direction = match a.string("direction", "forward")?.as_str() {
        "forward" | "foward" => Direction::Forward,
        "reverse" => Direction::Reverse,
        "bidirectional" => Direction::Bidirectional,
        other => {
            return Err(a.invalid(format!(
                "direction must be forward, reverse or bidirectional, got {other:?}"
            )))
        }
    };
    let hidden_size = match a.opt_int("hidden_size")? {
        Some(h) if h <= 0 => {
            return Err(a.invalid(format!("hidden_size must be positive, got {h}")))
        }
        Some(h) => Some(h as usize),
        None => None,
    };
    let layout = a.int("layout", 0)?;
    if layout != 0 && layout != 1 {
        return Err(a.invalid(format!("layout must be 0 or 1, got {layout}")));
    }
    let clip = match a.opt_float("clip")? {
        Some(c) if c.is_nan() || c < 0.0 => {
            return Err(a.invalid(format!("clip must be non-negative, got {c}")))
        }
        other => other,
    };
    let nd = direction.count();
    let n_acts = cell.n_acts();
    let acts = match a.opt_strings("activations")? {
        None => {
            let d = cell.default_acts();
            (0..nd).flat_map(|_| d.clone()).collect()
        }
        Some(names) => {
            let alphas = a.opt_floats("activation_alpha")?.unwrap_or_default();
            let betas = a.opt_floats("activation_beta")?.unwrap_or_default();
            let (mut ai, mut bi) = (alphas.into_iter(), betas.into_iter());
            let mut parsed = Vec::with_capacity(names.len());
            for n in &names {
                parsed.push(
                    RnnAct::parse(n, &mut ai, &mut bi)
                        .ok_or_else(|| a.unsupported(format!("activation function {n:?}")))?,
                );
            }
            if parsed.len() == n_acts * nd {
                parsed
            } else if parsed.len() == n_acts {
                (0..nd).flat_map(|_| parsed.clone()).collect()
            } else {
                return Err(a.invalid(format!(
                    "activations must list {} functions ({} per direction), got {}",
                    n_acts * nd,
                    n_acts,
                    parsed.len()
                )));
            }
        }
    };
    Ok(Recurrent {
        cell,
        direction,
        hidden_size,
        acts,
        clip,
        layout: layout as usize,
    })
}

fn build_lstm(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let input_forget = ctx.attrs().int("input_forget", 0)? != 0;
    Ok(Box::new(build_common(
        ctx,
        CellKind::Lstm { input_forget },
    )?))
}

fn build_gru(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let linear_before_reset = ctx.attrs().int("linear_before_reset", 0)? != 0;
    Ok(Box::new(build_common(
        ctx,
        CellKind::Gru {
            linear_before_reset,
        },
    )?))
}

fn build_rnn(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(build_common(ctx, CellKind::Rnn)?))
}

// ---------------------------------------------------------------------------------------
// Shape inference
// ---------------------------------------------------------------------------------------

impl Recurrent {
    fn infer_facts(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let op = self.cell.name();
        let ierr = |msg: String| KilnError::Inference {
            node: String::new(),
            op: op.into(),
            msg,
        };
        let x = inputs.first().copied().flatten();
        let dtype = x.and_then(|f| f.dtype);
        if let Some(d) = dtype {
            if !d.is_float() {
                return Err(ierr(format!("X must be a float tensor, found {d}")));
            }
        }
        let xs = x.and_then(|f| f.shape.clone());
        if let Some(s) = &xs {
            if s.len() != 3 {
                return Err(ierr(format!("X must have rank 3, found rank {}", s.len())));
            }
        }
        let (seq, batch) = match &xs {
            Some(s) if self.layout == 0 => (s[0].clone(), s[1].clone()),
            Some(s) => (s[1].clone(), s[0].clone()),
            None => (Dim::Unknown, Dim::Unknown),
        };
        let g = self.cell.gates();
        let hidden = match self.hidden_size {
            Some(h) => Dim::Known(h),
            None => {
                let from_r = inputs
                    .get(2)
                    .copied()
                    .flatten()
                    .and_then(|f| f.shape.as_ref())
                    .and_then(|s| s.get(2).cloned());
                let from_w = inputs
                    .get(1)
                    .copied()
                    .flatten()
                    .and_then(|f| f.shape.as_ref())
                    .and_then(|s| s.get(1).and_then(|d| d.known()))
                    .map(|n| Dim::Known(n / g));
                from_r.or(from_w).unwrap_or(Dim::Unknown)
            }
        };
        let nd = Dim::Known(self.direction.count());
        let mk = |shape: Vec<Dim>| match (dtype, xs.is_some()) {
            (Some(d), _) => Fact::tensor(d, shape),
            _ => Fact::unknown(),
        };
        let y = if self.layout == 0 {
            vec![seq, nd.clone(), batch.clone(), hidden.clone()]
        } else {
            vec![batch.clone(), seq, nd.clone(), hidden.clone()]
        };
        let yh = if self.layout == 0 {
            vec![nd, batch, hidden]
        } else {
            vec![batch, nd, hidden]
        };
        let mut out = Vec::with_capacity(n_outputs);
        for i in 0..n_outputs {
            out.push(if i == 0 {
                mk(y.clone())
            } else {
                mk(yh.clone())
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

/// Validated dimensions of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    seq: usize,
    batch: usize,
    input: usize,
    hidden: usize,
    nd: usize,
}

impl Dims {
    /// Elements of Y (`seq × nd × batch × hidden`).
    fn y_len(&self) -> usize {
        self.seq * self.nd * self.batch * self.hidden
    }

    /// Elements of Y_h or Y_c (`nd × batch × hidden`).
    fn state_len(&self) -> usize {
        self.nd * self.batch * self.hidden
    }
}

/// The per-row sequence lengths: all `seq`, or read from the `sequence_lens` tensor
/// (already validated to lie in `[0, seq]`).
#[derive(Clone, Copy)]
enum SeqLens<'a> {
    All(usize),
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl SeqLens<'_> {
    fn get(&self, b: usize) -> usize {
        match self {
            SeqLens::All(s) => *s,
            SeqLens::I32(v) => v[b] as usize,
            SeqLens::I64(v) => v[b] as usize,
        }
    }
}

/// The (optional) inputs of one call in the compute type: borrowed from the tensors when
/// they already hold it, converted otherwise.
struct Inputs<'a, T: Clone> {
    x: Cow<'a, [T]>,
    w: Cow<'a, [T]>,
    r: Cow<'a, [T]>,
    b: Option<Cow<'a, [T]>>,
    lens: SeqLens<'a>,
    h0: Option<Cow<'a, [T]>>,
    c0: Option<Cow<'a, [T]>>,
    p: Option<Cow<'a, [T]>>,
}

/// `t`'s elements as `T`: borrowed when `t` holds `T`, converted otherwise.
fn get_slice<T: RnnFloat>(t: &Tensor) -> Result<Cow<'_, [T]>> {
    if t.dtype() == T::DTYPE {
        return Ok(Cow::Borrowed(t.as_raw::<T>()?));
    }
    if T::DTYPE == DType::F64 {
        let v = t.to_f64_vec()?;
        Ok(Cow::Owned(
            v.into_iter()
                .map(|x| T::from(x).unwrap_or_else(T::nan))
                .collect(),
        ))
    } else {
        let v = t.to_f32_vec()?;
        Ok(Cow::Owned(v.into_iter().map(T::from_f32).collect()))
    }
}

fn to_tensor<T: RnnFloat>(dtype: DType, shape: &[usize], v: Vec<T>) -> Result<Tensor> {
    Tensor::from_raw(T::DTYPE, shape, &v)?.cast(dtype)
}

impl Recurrent {
    fn err(&self, msg: impl Into<String>) -> KilnError {
        KilnError::kernel(self.cell.name(), msg)
    }

    fn check_shape(&self, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
        if t.shape() != want {
            return Err(self.err(format!(
                "{name} must have shape {want:?}, found {:?}",
                t.shape()
            )));
        }
        Ok(())
    }

    /// Validates shapes and returns the dimensions of the call.
    fn dims(&self, x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Dims> {
        if x.rank() != 3 {
            return Err(self.err(format!("X must have rank 3, found shape {:?}", x.shape())));
        }
        let (seq, batch) = if self.layout == 0 {
            (x.shape()[0], x.shape()[1])
        } else {
            (x.shape()[1], x.shape()[0])
        };
        let input = x.shape()[2];
        let nd = self.direction.count();
        let g = self.cell.gates();
        if r.rank() != 3 {
            return Err(self.err(format!("R must have rank 3, found shape {:?}", r.shape())));
        }
        let hidden = r.shape()[2];
        if let Some(h) = self.hidden_size {
            if h != hidden {
                return Err(self.err(format!(
                    "hidden_size is {h} but R has shape {:?}",
                    r.shape()
                )));
            }
        }
        let gh = hidden
            .checked_mul(g)
            .ok_or_else(|| self.err("hidden size overflows"))?;
        self.check_shape("W", w, &[nd, gh, input])?;
        self.check_shape("R", r, &[nd, gh, hidden])?;
        Ok(Dims {
            seq,
            batch,
            input,
            hidden,
            nd,
        })
    }

    fn state_shape(&self, d: &Dims) -> [usize; 3] {
        if self.layout == 0 {
            [d.nd, d.batch, d.hidden]
        } else {
            [d.batch, d.nd, d.hidden]
        }
    }

    /// Output shapes of Y, Y_h and Y_c in this op's layout.
    fn output_shapes(&self, d: &Dims) -> [[usize; 4]; 3] {
        let s = self.state_shape(d);
        let y = if self.layout == 0 {
            [d.seq, d.nd, d.batch, d.hidden]
        } else {
            [d.batch, d.seq, d.nd, d.hidden]
        };
        [y, [s[0], s[1], s[2], 0], [s[0], s[1], s[2], 0]]
    }

    fn sequence_lens<'a>(&self, t: Option<&'a Tensor>, d: &Dims) -> Result<SeqLens<'a>> {
        let Some(t) = t else {
            return Ok(SeqLens::All(d.seq));
        };
        if t.len() != d.batch || t.rank() != 1 {
            return Err(self.err(format!(
                "sequence_lens must have shape [{}], found {:?}",
                d.batch,
                t.shape()
            )));
        }
        let lens = match t.dtype() {
            DType::I32 => SeqLens::I32(t.as_slice::<i32>()?),
            DType::I64 => SeqLens::I64(t.as_slice::<i64>()?),
            other => {
                return Err(self.err(format!("sequence_lens must be int32, found {other}")));
            }
        };
        for b in 0..d.batch {
            let l = match lens {
                SeqLens::I32(v) => v[b] as i64,
                SeqLens::I64(v) => v[b],
                SeqLens::All(s) => s as i64,
            };
            if l < 0 || l as u64 > d.seq as u64 {
                return Err(self.err(format!("sequence_lens value {l} is outside [0, {}]", d.seq)));
            }
        }
        Ok(lens)
    }

    fn gather<'a, T: RnnFloat>(
        &self,
        inputs: &[Option<&'a Value>],
        d: &Dims,
    ) -> Result<Inputs<'a, T>> {
        let op = self.cell.name();
        let x = get_slice(input_tensor(inputs, 0, op)?)?;
        let w = get_slice(input_tensor(inputs, 1, op)?)?;
        let r = get_slice(input_tensor(inputs, 2, op)?)?;
        let g = self.cell.gates();
        let b = match optional_tensor(inputs, 3, op)? {
            Some(t) => {
                self.check_shape("B", t, &[d.nd, 2 * g * d.hidden])?;
                Some(get_slice(t)?)
            }
            None => None,
        };
        let lens = self.sequence_lens(optional_tensor(inputs, 4, op)?, d)?;
        let ss = self.state_shape(d);
        let h0 = match optional_tensor(inputs, 5, op)? {
            Some(t) => {
                self.check_shape("initial_h", t, &ss)?;
                Some(get_slice(t)?)
            }
            None => None,
        };
        let (c0, p) = if matches!(self.cell, CellKind::Lstm { .. }) {
            let c0 = match optional_tensor(inputs, 6, op)? {
                Some(t) => {
                    self.check_shape("initial_c", t, &ss)?;
                    Some(get_slice(t)?)
                }
                None => None,
            };
            let p = match optional_tensor(inputs, 7, op)? {
                Some(t) => {
                    self.check_shape("P", t, &[d.nd, 3 * d.hidden])?;
                    Some(get_slice(t)?)
                }
                None => None,
            };
            (c0, p)
        } else {
            (None, None)
        };
        Ok(Inputs {
            x,
            w,
            r,
            b,
            lens,
            h0,
            c0,
            p,
        })
    }

    /// Writes the initial state of direction `dir` (layout-aware) into `out`
    /// (`[batch, hidden]`), zeros when absent.
    fn initial_state<T: RnnFloat>(&self, src: Option<&[T]>, dir: usize, d: &Dims, out: &mut [T]) {
        let Some(src) = src else {
            out.fill(T::zero());
            return;
        };
        for b in 0..d.batch {
            let off = if self.layout == 0 {
                (dir * d.batch + b) * d.hidden
            } else {
                (b * d.nd + dir) * d.hidden
            };
            out[b * d.hidden..(b + 1) * d.hidden].copy_from_slice(&src[off..off + d.hidden]);
        }
    }

    /// Runs every direction into `y` (`[seq, nd, batch, hidden]`), `yh` and `yc`
    /// (`[nd, batch, hidden]`): the outputs in layout 0.
    fn compute<T: RnnFloat>(
        &self,
        inp: &Inputs<'_, T>,
        d: &Dims,
        y: &mut [T],
        yh: &mut [T],
        yc: &mut [T],
    ) {
        let (h, bt) = (d.hidden, d.batch);
        let dir_len = d.seq * bt * h;
        let state = bt * h;
        with_scratch::<T, _>(d.nd * dir_len, |ydirs| {
            let parallel =
                d.nd == 2 && d.seq * bt * h * d.input >= 1 << 16 && crate::parallel::enabled();
            if parallel {
                let (y0, y1) = ydirs.split_at_mut(dir_len);
                let (h0, h1) = yh.split_at_mut(state);
                let (c0, c1) = yc.split_at_mut(state);
                rayon::join(
                    || self.run_direction(inp, d, 0, y0, h0, c0),
                    || self.run_direction(inp, d, 1, y1, h1, c1),
                );
            } else {
                for dir in 0..d.nd {
                    self.run_direction(
                        inp,
                        d,
                        dir,
                        &mut ydirs[dir * dir_len..(dir + 1) * dir_len],
                        &mut yh[dir * state..(dir + 1) * state],
                        &mut yc[dir * state..(dir + 1) * state],
                    );
                }
            }
            for dir in 0..d.nd {
                let yd = &ydirs[dir * dir_len..(dir + 1) * dir_len];
                for t in 0..d.seq {
                    let dst = ((t * d.nd + dir) * bt) * h;
                    y[dst..dst + state].copy_from_slice(&yd[t * state..(t + 1) * state]);
                }
            }
        });
    }

    /// Runs one direction: `y` is `[seq, batch, hidden]`, `hs` and `cs` (`[batch, hidden]`)
    /// end as the final hidden and cell states.
    fn run_direction<T: RnnFloat>(
        &self,
        inp: &Inputs<'_, T>,
        d: &Dims,
        dir: usize,
        y: &mut [T],
        hs: &mut [T],
        cs: &mut [T],
    ) {
        let (h, bt, g) = (d.hidden, d.batch, self.cell.gates());
        let gh = g * h;
        let w = &inp.w[dir * gh * d.input..(dir + 1) * gh * d.input];
        let r = &inp.r[dir * gh * h..(dir + 1) * gh * h];
        let rows = d.seq * bt;
        // Every temporary in one scratch block: proj, bias, rec, gates, z, rh, cand.
        let sizes = [rows * gh, gh, bt * gh, gh, bt * h, bt * h, bt * h];
        with_scratch::<T, _>(sizes.iter().sum(), |block| {
            let (proj, rest) = block.split_at_mut(sizes[0]);
            let (bias, rest) = rest.split_at_mut(sizes[1]);
            let (rec, rest) = rest.split_at_mut(sizes[2]);
            let (gates, rest) = rest.split_at_mut(sizes[3]);
            let (zs, rest) = rest.split_at_mut(sizes[4]);
            let (rh, cand) = rest.split_at_mut(sizes[5]);
            // Input projection of every timestep at once: rows in X's own order.
            matmul_bt(rows, gh, d.input, &inp.x, w, proj);
            // Bias: Wb + Rb, except the GRU candidate's Rb under linear_before_reset.
            let lbr = matches!(
                self.cell,
                CellKind::Gru {
                    linear_before_reset: true
                }
            );
            let mut rb_h: Option<&[T]> = None;
            if let Some(b) = &inp.b {
                let b = &b[dir * 2 * gh..(dir + 1) * 2 * gh];
                let (wb, rbias) = b.split_at(gh);
                for ((o, a), c) in bias.iter_mut().zip(wb).zip(rbias) {
                    *o = *a + *c;
                }
                if lbr {
                    bias[2 * h..3 * h].copy_from_slice(&wb[2 * h..3 * h]);
                    rb_h = Some(&rbias[2 * h..3 * h]);
                }
                for row in proj.chunks_exact_mut(gh) {
                    row.iter_mut().zip(&*bias).for_each(|(v, b)| *v = *v + *b);
                }
            }
            let acts = &self.acts[dir * self.cell.n_acts()..(dir + 1) * self.cell.n_acts()];
            let clip = self.clip.map(T::from_f32);
            self.initial_state(inp.h0.as_deref(), dir, d, hs);
            self.initial_state(inp.c0.as_deref(), dir, d, cs);
            let peep = inp.p.as_ref().map(|p| &p[dir * 3 * h..(dir + 1) * 3 * h]);
            // Rows past their sequence length keep zeros in Y.
            y.fill(T::zero());
            let max_len = (0..bt).map(|b| inp.lens.get(b)).max().unwrap_or(0);
            let reversed = self.direction.reversed(dir);
            let gru_two_pass = matches!(
                self.cell,
                CellKind::Gru {
                    linear_before_reset: false
                }
            );
            // (timestep, row of the projection) of batch row `b` at `step`, when active.
            let position = |b: usize, step: usize| {
                let len = inp.lens.get(b);
                if step >= len {
                    return None;
                }
                let t = if reversed { len - 1 - step } else { step };
                let row = if self.layout == 0 {
                    t * bt + b
                } else {
                    b * d.seq + t
                };
                Some((t, row))
            };
            for step in 0..max_len {
                // Recurrent product for the whole batch (finished rows are ignored below).
                if gru_two_pass {
                    matmul_bt(bt, 2 * h, h, hs, &r[..2 * h * h], &mut rec[..bt * 2 * h]);
                } else {
                    matmul_bt(bt, gh, h, hs, r, rec);
                }
                for b in 0..bt {
                    let Some((t, row)) = position(b, step) else {
                        continue;
                    };
                    let xp = &proj[row * gh..(row + 1) * gh];
                    let hb = &mut hs[b * h..(b + 1) * h];
                    match self.cell {
                        CellKind::Lstm { input_forget } => {
                            let rc = &rec[b * gh..(b + 1) * gh];
                            gates
                                .iter_mut()
                                .zip(xp.iter().zip(rc))
                                .for_each(|(gv, (a, c))| *gv = *a + *c);
                            let cb = &mut cs[b * h..(b + 1) * h];
                            lstm_step(gates, hb, cb, peep, acts, clip, input_forget);
                        }
                        CellKind::Rnn => {
                            let rc = &rec[b * gh..(b + 1) * gh];
                            for j in 0..h {
                                hb[j] = xp[j] + rc[j];
                            }
                            clip_slice(hb, clip);
                            acts[0].apply(hb);
                        }
                        CellKind::Gru {
                            linear_before_reset: true,
                        } => {
                            let rc = &rec[b * gh..(b + 1) * gh];
                            gru_step_lbr(gates, xp, rc, rb_h, hb, acts, clip);
                        }
                        CellKind::Gru {
                            linear_before_reset: false,
                        } => {
                            // z and r now; the candidate needs (r ⊙ h)·Rhᵀ for all rows first.
                            let rc = &rec[b * 2 * h..(b + 1) * 2 * h];
                            let zr = &mut gates[..2 * h];
                            zr.iter_mut()
                                .zip(xp[..2 * h].iter().zip(rc))
                                .for_each(|(gv, (a, c))| *gv = *a + *c);
                            clip_slice(zr, clip);
                            acts[0].apply(zr);
                            zs[b * h..(b + 1) * h].copy_from_slice(&zr[..h]);
                            for j in 0..h {
                                rh[b * h + j] = zr[h + j] * hb[j];
                            }
                        }
                    }
                    if !gru_two_pass {
                        y[(t * bt + b) * h..(t * bt + b + 1) * h].copy_from_slice(hb);
                    }
                }
                if gru_two_pass {
                    matmul_bt(bt, h, h, rh, &r[2 * h * h..3 * h * h], cand);
                    for b in 0..bt {
                        let Some((t, row)) = position(b, step) else {
                            continue;
                        };
                        let xp = &proj[row * gh + 2 * h..(row + 1) * gh];
                        let c = &mut cand[b * h..(b + 1) * h];
                        for j in 0..h {
                            c[j] = c[j] + xp[j];
                        }
                        clip_slice(c, clip);
                        acts[1].apply(c);
                        let hb = &mut hs[b * h..(b + 1) * h];
                        let z = &zs[b * h..(b + 1) * h];
                        for j in 0..h {
                            hb[j] = (T::one() - z[j]) * c[j] + z[j] * hb[j];
                        }
                        y[(t * bt + b) * h..(t * bt + b + 1) * h].copy_from_slice(hb);
                    }
                }
            }
        });
    }
}

/// One LSTM step for one batch row. `gates` holds the pre-activations (x·Wᵀ + h·Rᵀ + b) in
/// order i, o, f, c; `hb` and `cb` are updated in place.
fn lstm_step<T: RnnFloat>(
    gates: &mut [T],
    hb: &mut [T],
    cb: &mut [T],
    peep: Option<&[T]>,
    acts: &[RnnAct],
    clip: Option<T>,
    input_forget: bool,
) {
    let h = hb.len();
    let (gi, rest) = gates.split_at_mut(h);
    let (go, rest) = rest.split_at_mut(h);
    let (gf, gc) = rest.split_at_mut(h);
    if let Some(p) = peep {
        let (pi, pf) = (&p[..h], &p[2 * h..3 * h]);
        for j in 0..h {
            gi[j] = gi[j] + pi[j] * cb[j];
            gf[j] = gf[j] + pf[j] * cb[j];
        }
    }
    clip_slice(gi, clip);
    acts[0].apply(gi);
    if input_forget {
        for j in 0..h {
            gf[j] = T::one() - gi[j];
        }
    } else {
        clip_slice(gf, clip);
        acts[0].apply(gf);
    }
    clip_slice(gc, clip);
    acts[1].apply(gc);
    for j in 0..h {
        cb[j] = gf[j] * cb[j] + gi[j] * gc[j];
    }
    if let Some(p) = peep {
        let po = &p[h..2 * h];
        for j in 0..h {
            go[j] = go[j] + po[j] * cb[j];
        }
    }
    clip_slice(go, clip);
    acts[0].apply(go);
    // Reuse the cell-gate buffer for h(C).
    gc.copy_from_slice(cb);
    acts[2].apply(gc);
    for j in 0..h {
        hb[j] = go[j] * gc[j];
    }
}

/// One GRU step with `linear_before_reset`: `rc` is h·Rᵀ for all three gates, `rb_h` the
/// candidate's recurrent bias (applied inside the reset product).
fn gru_step_lbr<T: RnnFloat>(
    gates: &mut [T],
    xp: &[T],
    rc: &[T],
    rb_h: Option<&[T]>,
    hb: &mut [T],
    acts: &[RnnAct],
    clip: Option<T>,
) {
    let h = hb.len();
    let (zr, cand) = gates.split_at_mut(2 * h);
    zr.iter_mut()
        .zip(xp[..2 * h].iter().zip(&rc[..2 * h]))
        .for_each(|(g, (a, c))| *g = *a + *c);
    clip_slice(zr, clip);
    acts[0].apply(zr);
    let (z, r) = zr.split_at(h);
    for j in 0..h {
        let rbj = rb_h.map_or(T::zero(), |v| v[j]);
        cand[j] = xp[2 * h + j] + r[j] * (rc[2 * h + j] + rbj);
    }
    clip_slice(cand, clip);
    acts[1].apply(cand);
    for j in 0..h {
        hb[j] = (T::one() - z[j]) * cand[j] + z[j] * hb[j];
    }
}

/// Copies a layout-0 result (`Y` when `is_y`, else `Y_h`/`Y_c`) into `dst` in the op's
/// layout: layout 1 puts the batch first.
fn relayout<T: Copy>(layout: usize, d: &Dims, src: &[T], is_y: bool, dst: &mut [T]) {
    let (seq, nd, bt, h) = (d.seq, d.nd, d.batch, d.hidden);
    if layout == 0 {
        dst.copy_from_slice(src);
        return;
    }
    if is_y {
        // [seq, nd, batch, h] → [batch, seq, nd, h].
        for t in 0..seq {
            for dir in 0..nd {
                for b in 0..bt {
                    let s = ((t * nd + dir) * bt + b) * h;
                    let o = ((b * seq + t) * nd + dir) * h;
                    dst[o..o + h].copy_from_slice(&src[s..s + h]);
                }
            }
        }
    } else {
        // [nd, batch, h] → [batch, nd, h].
        for dir in 0..nd {
            for b in 0..bt {
                let s = (dir * bt + b) * h;
                let o = (b * nd + dir) * h;
                dst[o..o + h].copy_from_slice(&src[s..s + h]);
            }
        }
    }
}

impl Recurrent {
    /// The reference path: outputs as new tensors of X's dtype.
    fn eval_typed<T: RnnFloat>(
        &self,
        inputs: &[Option<&Value>],
        n_outputs: usize,
    ) -> Result<Vec<Value>> {
        let op = self.cell.name();
        let x = input_tensor(inputs, 0, op)?;
        let w = input_tensor(inputs, 1, op)?;
        let r = input_tensor(inputs, 2, op)?;
        let d = self.dims(x, w, r)?;
        if n_outputs > self.n_outputs() {
            return Err(self.err(format!("has at most {} outputs", self.n_outputs())));
        }
        let inp = self.gather::<T>(inputs, &d)?;
        let mut y0 = vec![T::zero(); d.y_len()];
        let mut yh0 = vec![T::zero(); d.state_len()];
        let mut yc0 = vec![T::zero(); d.state_len()];
        self.compute(&inp, &d, &mut y0, &mut yh0, &mut yc0);
        let shapes = self.output_shapes(&d);
        let sources = [&y0, &yh0, &yc0];
        (0..n_outputs)
            .map(|i| {
                let rank = if i == 0 { 4 } else { 3 };
                let mut v = vec![T::zero(); sources[i].len()];
                relayout(self.layout, &d, sources[i], i == 0, &mut v);
                Ok(Value::Tensor(to_tensor(x.dtype(), &shapes[i][..rank], v)?))
            })
            .collect()
    }

    /// The in-place path for f32 / f64: computes in scratch and writes every output slot.
    /// Returns false (nothing written) when a slot's dtype or shape does not fit.
    fn eval_into_typed<T: RnnFloat>(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [TensorMut<'_>],
    ) -> Result<bool> {
        let op = self.cell.name();
        let x = input_tensor(inputs, 0, op)?;
        let w = input_tensor(inputs, 1, op)?;
        let r = input_tensor(inputs, 2, op)?;
        let d = self.dims(x, w, r)?;
        let shapes = self.output_shapes(&d);
        if outputs.len() > self.n_outputs() {
            return Ok(false);
        }
        let fits = outputs.iter().enumerate().all(|(i, o)| {
            let rank = if i == 0 { 4 } else { 3 };
            o.dtype() == T::DTYPE && o.shape() == &shapes[i][..rank]
        });
        if !fits {
            return Ok(false);
        }
        let inp = self.gather::<T>(inputs, &d)?;
        let (yl, sl) = (d.y_len(), d.state_len());
        with_scratch::<T, _>(yl + 2 * sl, |block| -> Result<()> {
            let (y0, rest) = block.split_at_mut(yl);
            let (yh0, yc0) = rest.split_at_mut(sl);
            self.compute(&inp, &d, y0, yh0, yc0);
            let sources: [&[T]; 3] = [y0, yh0, yc0];
            for (i, o) in outputs.iter_mut().enumerate() {
                relayout(self.layout, &d, sources[i], i == 0, o.as_raw_mut::<T>()?);
            }
            Ok(())
        })?;
        Ok(true)
    }

    fn n_outputs(&self) -> usize {
        if matches!(self.cell, CellKind::Lstm { .. }) {
            3
        } else {
            2
        }
    }

    /// Checks that W and R have X's dtype.
    fn check_dtypes(&self, inputs: &[Option<&Value>]) -> Result<DType> {
        let op = self.cell.name();
        let x = input_tensor(inputs, 0, op)?;
        for (i, name) in [(1, "W"), (2, "R")] {
            let t = input_tensor(inputs, i, op)?;
            if t.dtype() != x.dtype() {
                return Err(self.err(format!("{name} is {} but X is {}", t.dtype(), x.dtype())));
            }
        }
        Ok(x.dtype())
    }
}

impl Op for Recurrent {
    fn op_type(&self) -> &str {
        self.cell.name()
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        self.infer_facts(inputs, n_outputs)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        match self.check_dtypes(inputs)? {
            DType::F64 => self.eval_typed::<f64>(inputs, self.n_outputs()),
            DType::F32 | DType::F16 | DType::BF16 => {
                self.eval_typed::<f32>(inputs, self.n_outputs())
            }
            other => Err(self.err(format!("X must be a float tensor, found {other}"))),
        }
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let done = match self.check_dtypes(inputs)? {
            DType::F32 => self.eval_into_typed::<f32>(inputs, outputs)?,
            DType::F64 => self.eval_into_typed::<f64>(inputs, outputs)?,
            _ => false,
        };
        if !done {
            let produced = self.eval(inputs)?;
            for (slot, value) in outputs.iter_mut().zip(&produced) {
                slot.copy_from(value.as_tensor()?)?;
            }
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Attr, OpDesc};

    /// Deterministic pseudo-random values in [-1, 1).
    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn build(op: &str, attrs: Vec<(&str, Attr)>) -> Result<Box<dyn Op>> {
        let mut desc = OpDesc::new("", op, 14);
        for (k, v) in attrs {
            desc.attrs.insert(k.to_string(), v);
        }
        let ctx = BuildCtx {
            node: "n",
            desc: &desc,
            n_inputs: 8,
            n_outputs: 3,
        };
        match op {
            "LSTM" => build_lstm(&ctx),
            "GRU" => build_gru(&ctx),
            _ => build_rnn(&ctx),
        }
    }

    /// Runs the reference `eval` and checks that `eval_into` (the in-place path, into
    /// slots of the same shapes, pre-filled with garbage) writes the same bits.
    fn run(op: &dyn Op, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        let vals: Vec<Option<Value>> = inputs.into_iter().map(|t| t.map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        let outs: Vec<Tensor> = op
            .eval(&refs)?
            .into_iter()
            .map(|v| v.into_tensor())
            .collect::<Result<_>>()?;
        let mut bufs: Vec<Vec<u8>> = outs.iter().map(|t| vec![0xA5; t.bytes().len()]).collect();
        let mut slots: Vec<TensorMut<'_>> = bufs
            .iter_mut()
            .zip(&outs)
            .map(|(b, t)| TensorMut::new(t.dtype(), t.shape(), b).unwrap())
            .collect();
        op.eval_into(&refs, &mut slots)?;
        for (b, t) in bufs.iter().zip(&outs) {
            assert_eq!(b.as_slice(), t.bytes(), "eval_into differs from eval");
        }
        Ok(outs)
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Naive single-direction LSTM in f64: x [seq, batch, input].
    #[allow(clippy::too_many_arguments)]
    fn naive_lstm(
        x: &[f32],
        seq: usize,
        batch: usize,
        inp: usize,
        hid: usize,
        w: &[f32],
        r: &[f32],
        b: &[f32],
        p: &[f32],
        h0: &[f32],
        c0: &[f32],
        reverse: bool,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut h: Vec<f64> = h0.iter().map(|&v| v as f64).collect();
        let mut c: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
        let mut y = vec![0.0; seq * batch * hid];
        for s in 0..seq {
            let t = if reverse { seq - 1 - s } else { s };
            let mut nh = h.clone();
            for bb in 0..batch {
                let mut g = vec![0.0f64; 4 * hid];
                for (j, gj) in g.iter_mut().enumerate() {
                    let mut acc = (b[j] + b[4 * hid + j]) as f64;
                    for k in 0..inp {
                        acc += x[(t * batch + bb) * inp + k] as f64 * w[j * inp + k] as f64;
                    }
                    for k in 0..hid {
                        acc += h[bb * hid + k] * r[j * hid + k] as f64;
                    }
                    *gj = acc;
                }
                for j in 0..hid {
                    let cp = c[bb * hid + j];
                    let i = sig(g[j] + p[j] as f64 * cp);
                    let f = sig(g[2 * hid + j] + p[2 * hid + j] as f64 * cp);
                    let cc = g[3 * hid + j].tanh();
                    let cn = f * cp + i * cc;
                    let o = sig(g[hid + j] + p[hid + j] as f64 * cn);
                    c[bb * hid + j] = cn;
                    nh[bb * hid + j] = o * cn.tanh();
                    y[(t * batch + bb) * hid + j] = nh[bb * hid + j];
                }
            }
            h = nh;
        }
        (y, h, c)
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    /// The f32 gate activations (vectorisable polynomials) against f64 libm, including the
    /// tanh branch switch at 1/16, tiny and huge inputs, and NaN.
    #[test]
    fn fast_f32_gates_match_libm() {
        let xs: Vec<f32> = (-2000..=2000)
            .map(|i| i as f32 * 0.01)
            .chain([1e-6, -3e-5, 0.0624, 0.0626, -0.0625, 90.0, -90.0, 1e-30])
            .collect();
        let mut s = xs.clone();
        f32::sigmoid_all(&mut s);
        let mut t = xs.clone();
        f32::tanh_all(&mut t);
        for ((&x, &sv), &tv) in xs.iter().zip(&s).zip(&t) {
            let (ws, wt) = (1.0 / (1.0 + (-(x as f64)).exp()), (x as f64).tanh());
            let tol = 1e-6 * ws + 1e-30;
            assert!(
                (sv as f64 - ws).abs() <= tol.max(1e-38),
                "sigmoid({x}) = {sv}, want {ws}"
            );
            // Taylor branch: relative precision; exp branch: ~1e-7 absolute.
            let tol = if x.abs() < 0.0625 {
                1e-6 * wt.abs()
            } else {
                3e-7
            };
            assert!((tv as f64 - wt).abs() <= tol, "tanh({x}) = {tv}, want {wt}");
        }
        let mut n = [f32::NAN];
        f32::tanh_all(&mut n);
        assert!(n[0].is_nan());
        f32::sigmoid_all(&mut n);
        assert!(n[0].is_nan());
    }

    #[test]
    fn lstm_matches_naive_with_everything() {
        let (seq, batch, inp, hid) = (5, 3, 7, 6);
        let x = rand_vec(seq * batch * inp, 1);
        let w = rand_vec(2 * 4 * hid * inp, 2);
        let r = rand_vec(2 * 4 * hid * hid, 3);
        let b = rand_vec(2 * 8 * hid, 4);
        let p = rand_vec(2 * 3 * hid, 5);
        let h0 = rand_vec(2 * batch * hid, 6);
        let c0 = rand_vec(2 * batch * hid, 7);
        let op = build(
            "LSTM",
            vec![
                ("direction", Attr::String("bidirectional".into())),
                ("hidden_size", Attr::Int(hid as i64)),
            ],
        )
        .unwrap();
        let out = run(
            op.as_ref(),
            vec![
                Some(Tensor::from_vec(&[seq, batch, inp], x.clone()).unwrap()),
                Some(Tensor::from_vec(&[2, 4 * hid, inp], w.clone()).unwrap()),
                Some(Tensor::from_vec(&[2, 4 * hid, hid], r.clone()).unwrap()),
                Some(Tensor::from_vec(&[2, 8 * hid], b.clone()).unwrap()),
                None,
                Some(Tensor::from_vec(&[2, batch, hid], h0.clone()).unwrap()),
                Some(Tensor::from_vec(&[2, batch, hid], c0.clone()).unwrap()),
                Some(Tensor::from_vec(&[2, 3 * hid], p.clone()).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[seq, 2, batch, hid]);
        let y = out[0].to_f32_vec().unwrap();
        let yh = out[1].to_f32_vec().unwrap();
        let yc = out[2].to_f32_vec().unwrap();
        for dir in 0..2 {
            let (ny, nh, nc) = naive_lstm(
                &x,
                seq,
                batch,
                inp,
                hid,
                &w[dir * 4 * hid * inp..(dir + 1) * 4 * hid * inp],
                &r[dir * 4 * hid * hid..(dir + 1) * 4 * hid * hid],
                &b[dir * 8 * hid..(dir + 1) * 8 * hid],
                &p[dir * 3 * hid..(dir + 1) * 3 * hid],
                &h0[dir * batch * hid..(dir + 1) * batch * hid],
                &c0[dir * batch * hid..(dir + 1) * batch * hid],
                dir == 1,
            );
            let mut ydir = Vec::new();
            for t in 0..seq {
                let o = (t * 2 + dir) * batch * hid;
                ydir.extend_from_slice(&y[o..o + batch * hid]);
            }
            assert!(max_diff(&ydir, &ny) < 1e-5);
            assert!(max_diff(&yh[dir * batch * hid..(dir + 1) * batch * hid], &nh) < 1e-5);
            assert!(max_diff(&yc[dir * batch * hid..(dir + 1) * batch * hid], &nc) < 1e-5);
        }
    }

    #[test]
    fn lstm_layout1_and_seq_lens() {
        let (seq, batch, inp, hid) = (4, 2, 3, 5);
        let x0 = rand_vec(seq * batch * inp, 11); // layout 0
        let w = rand_vec(4 * hid * inp, 12);
        let r = rand_vec(4 * hid * hid, 13);
        // layout 1 copy of x.
        let mut x1 = vec![0.0; x0.len()];
        for t in 0..seq {
            for b in 0..batch {
                for k in 0..inp {
                    x1[(b * seq + t) * inp + k] = x0[(t * batch + b) * inp + k];
                }
            }
        }
        let op0 = build(
            "LSTM",
            vec![
                ("hidden_size", Attr::Int(hid as i64)),
                ("direction", Attr::String("reverse".into())),
            ],
        )
        .unwrap();
        let op1 = build(
            "LSTM",
            vec![
                ("layout", Attr::Int(1)),
                ("direction", Attr::String("reverse".into())),
            ],
        )
        .unwrap();
        let lens = Tensor::from_vec(&[2], vec![4i32, 2]).unwrap();
        let wt = Tensor::from_vec(&[1, 4 * hid, inp], w).unwrap();
        let rt = Tensor::from_vec(&[1, 4 * hid, hid], r).unwrap();
        let o0 = run(
            op0.as_ref(),
            vec![
                Some(Tensor::from_vec(&[seq, batch, inp], x0.clone()).unwrap()),
                Some(wt.clone()),
                Some(rt.clone()),
                None,
                Some(lens.clone()),
            ],
        )
        .unwrap();
        let o1 = run(
            op1.as_ref(),
            vec![
                Some(Tensor::from_vec(&[batch, seq, inp], x1).unwrap()),
                Some(wt),
                Some(rt),
                None,
                Some(lens),
            ],
        )
        .unwrap();
        assert_eq!(o1[0].shape(), &[batch, seq, 1, hid]);
        assert_eq!(o1[1].shape(), &[batch, 1, hid]);
        let y0 = o0[0].to_f32_vec().unwrap();
        let y1 = o1[0].to_f32_vec().unwrap();
        for t in 0..seq {
            for b in 0..batch {
                for j in 0..hid {
                    assert_eq!(y0[(t * batch + b) * hid + j], y1[(b * seq + t) * hid + j]);
                }
            }
        }
        // Batch 1 has length 2: Y is zero past it.
        for t in 2..seq {
            assert!(y0[(t * batch + 1) * hid..(t * batch + 2) * hid]
                .iter()
                .all(|&v| v == 0.0));
        }
        assert_eq!(o0[1].to_f32_vec().unwrap(), o1[1].to_f32_vec().unwrap());
        // Reverse with length 2 for batch 1 equals a reverse run over the first 2 steps.
        let xs: Vec<f32> = (0..2)
            .flat_map(|t| x0[(t * batch + 1) * inp..(t * batch + 2) * inp].to_vec())
            .collect();
        let short = run(
            op0.as_ref(),
            vec![
                Some(Tensor::from_vec(&[2, 1, inp], xs).unwrap()),
                Some(Tensor::from_vec(&[1, 4 * hid, inp], rand_vec(4 * hid * inp, 12)).unwrap()),
                Some(Tensor::from_vec(&[1, 4 * hid, hid], rand_vec(4 * hid * hid, 13)).unwrap()),
            ],
        )
        .unwrap();
        let yh0 = o0[1].to_f32_vec().unwrap();
        let sh = short[1].to_f32_vec().unwrap();
        for j in 0..hid {
            assert!((yh0[hid + j] - sh[j]).abs() < 1e-6);
        }
    }

    #[test]
    fn gru_both_modes_match_naive() {
        let (seq, batch, inp, hid) = (3, 2, 4, 5);
        let x = rand_vec(seq * batch * inp, 21);
        let w = rand_vec(3 * hid * inp, 22);
        let r = rand_vec(3 * hid * hid, 23);
        let b = rand_vec(6 * hid, 24);
        for lbr in [0, 1] {
            let op = build(
                "GRU",
                vec![
                    ("hidden_size", Attr::Int(hid as i64)),
                    ("linear_before_reset", Attr::Int(lbr)),
                ],
            )
            .unwrap();
            let out = run(
                op.as_ref(),
                vec![
                    Some(Tensor::from_vec(&[seq, batch, inp], x.clone()).unwrap()),
                    Some(Tensor::from_vec(&[1, 3 * hid, inp], w.clone()).unwrap()),
                    Some(Tensor::from_vec(&[1, 3 * hid, hid], r.clone()).unwrap()),
                    Some(Tensor::from_vec(&[1, 6 * hid], b.clone()).unwrap()),
                ],
            )
            .unwrap();
            let y = out[0].to_f32_vec().unwrap();
            let mut h = vec![0.0f64; batch * hid];
            for t in 0..seq {
                let mut nh = h.clone();
                for bb in 0..batch {
                    let xw = |j: usize| -> f64 {
                        (0..inp)
                            .map(|k| x[(t * batch + bb) * inp + k] as f64 * w[j * inp + k] as f64)
                            .sum::<f64>()
                            + b[j] as f64
                    };
                    let hr = |j: usize, hv: &[f64]| -> f64 {
                        (0..hid).map(|k| hv[k] * r[j * hid + k] as f64).sum::<f64>()
                            + b[3 * hid + j] as f64
                    };
                    let hb = &h[bb * hid..(bb + 1) * hid];
                    let z: Vec<f64> = (0..hid).map(|j| sig(xw(j) + hr(j, hb))).collect();
                    let rg: Vec<f64> = (0..hid)
                        .map(|j| sig(xw(hid + j) + hr(hid + j, hb)))
                        .collect();
                    let rh: Vec<f64> = (0..hid).map(|j| rg[j] * hb[j]).collect();
                    for j in 0..hid {
                        let cand = if lbr == 1 {
                            xw(2 * hid + j) + rg[j] * hr(2 * hid + j, hb)
                        } else {
                            xw(2 * hid + j) + hr(2 * hid + j, &rh)
                        };
                        let cand = cand.tanh();
                        nh[bb * hid + j] = (1.0 - z[j]) * cand + z[j] * hb[j];
                    }
                }
                h = nh;
                let yt = &y[t * batch * hid..(t + 1) * batch * hid];
                assert!(max_diff(yt, &h) < 1e-5, "lbr={lbr} t={t}");
            }
        }
    }

    #[test]
    fn rnn_with_activation_params_and_clip() {
        let (seq, batch, inp, hid) = (3, 1, 2, 3);
        let x = rand_vec(seq * batch * inp, 31);
        let w = rand_vec(hid * inp, 32);
        let r = rand_vec(hid * hid, 33);
        let op = build(
            "RNN",
            vec![
                ("hidden_size", Attr::Int(hid as i64)),
                ("activations", Attr::Strings(vec!["ScaledTanh".into()])),
                ("activation_alpha", Attr::Floats(vec![2.0])),
                ("activation_beta", Attr::Floats(vec![0.5])),
                ("clip", Attr::Float(0.3)),
            ],
        )
        .unwrap();
        let out = run(
            op.as_ref(),
            vec![
                Some(Tensor::from_vec(&[seq, batch, inp], x.clone()).unwrap()),
                Some(Tensor::from_vec(&[1, hid, inp], w.clone()).unwrap()),
                Some(Tensor::from_vec(&[1, hid, hid], r.clone()).unwrap()),
            ],
        )
        .unwrap();
        let mut h = vec![0.0f64; hid];
        for t in 0..seq {
            let nh: Vec<f64> = (0..hid)
                .map(|j| {
                    let a: f64 = (0..inp)
                        .map(|k| x[t * inp + k] as f64 * w[j * inp + k] as f64)
                        .sum::<f64>()
                        + (0..hid).map(|k| h[k] * r[j * hid + k] as f64).sum::<f64>();
                    2.0 * (0.5 * a.clamp(-0.3f32 as f64, 0.3f32 as f64)).tanh()
                })
                .collect();
            h = nh;
        }
        assert!(max_diff(&out[1].to_f32_vec().unwrap(), &h) < 1e-5);
    }

    #[test]
    fn lstm_f64_and_input_forget() {
        let (seq, batch, inp, hid) = (2, 1, 2, 2);
        let x: Vec<f64> = rand_vec(seq * batch * inp, 41)
            .into_iter()
            .map(|v| v as f64)
            .collect();
        let w: Vec<f64> = rand_vec(4 * hid * inp, 42)
            .into_iter()
            .map(|v| v as f64)
            .collect();
        let r: Vec<f64> = rand_vec(4 * hid * hid, 43)
            .into_iter()
            .map(|v| v as f64)
            .collect();
        let op = build("LSTM", vec![("input_forget", Attr::Int(1))]).unwrap();
        let out = run(
            op.as_ref(),
            vec![
                Some(Tensor::from_vec(&[seq, batch, inp], x.clone()).unwrap()),
                Some(Tensor::from_vec(&[1, 4 * hid, inp], w.clone()).unwrap()),
                Some(Tensor::from_vec(&[1, 4 * hid, hid], r.clone()).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(out[0].dtype(), DType::F64);
        let (mut h, mut c) = (vec![0.0; hid], vec![0.0; hid]);
        for t in 0..seq {
            let g: Vec<f64> = (0..4 * hid)
                .map(|j| {
                    (0..inp)
                        .map(|k| x[t * inp + k] * w[j * inp + k])
                        .sum::<f64>()
                        + (0..hid).map(|k| h[k] * r[j * hid + k]).sum::<f64>()
                })
                .collect();
            for j in 0..hid {
                let i = sig(g[j]);
                let f = 1.0 - i;
                c[j] = f * c[j] + i * g[3 * hid + j].tanh();
                h[j] = sig(g[hid + j]) * c[j].tanh();
            }
        }
        let yc = out[2].to_f64_vec().unwrap();
        for j in 0..hid {
            assert!((yc[j] - c[j]).abs() < 1e-12);
        }
    }

    #[test]
    fn errors_do_not_panic() {
        let op = build("LSTM", vec![("hidden_size", Attr::Int(3))]).unwrap();
        let x = Tensor::from_vec(&[2, 1, 2], vec![0.5f32; 4]).unwrap();
        // Wrong W shape.
        let bad = run(
            op.as_ref(),
            vec![
                Some(x.clone()),
                Some(Tensor::zeros(DType::F32, &[1, 5, 2])),
                Some(Tensor::zeros(DType::F32, &[1, 12, 3])),
            ],
        );
        assert!(bad.is_err());
        // Sequence length out of range.
        let bad = run(
            op.as_ref(),
            vec![
                Some(x.clone()),
                Some(Tensor::zeros(DType::F32, &[1, 12, 2])),
                Some(Tensor::zeros(DType::F32, &[1, 12, 3])),
                None,
                Some(Tensor::from_vec(&[1], vec![7i32]).unwrap()),
            ],
        );
        assert!(bad.is_err());
        // Missing input.
        assert!(run(op.as_ref(), vec![Some(x)]).is_err());
        assert!(build("LSTM", vec![("direction", Attr::String("sideways".into()))]).is_err());
        assert!(build(
            "GRU",
            vec![(
                "activations",
                Attr::Strings(vec!["Nope".into(), "Tanh".into()])
            )]
        )
        .is_err());
    }

    #[test]
    fn infer_shapes() {
        let op = build(
            "LSTM",
            vec![
                ("hidden_size", Attr::Int(4)),
                ("direction", Attr::String("bidirectional".into())),
                ("layout", Attr::Int(1)),
            ],
        )
        .unwrap();
        let x = Fact::tensor(
            DType::F32,
            vec![Dim::Sym("b".into()), Dim::Known(7), Dim::Known(3)],
        );
        let f = op.infer(&[Some(&x)], 3).unwrap();
        assert_eq!(
            f[0].shape.as_ref().unwrap(),
            &vec![
                Dim::Sym("b".into()),
                Dim::Known(7),
                Dim::Known(2),
                Dim::Known(4)
            ]
        );
        assert_eq!(
            f[2].shape.as_ref().unwrap(),
            &vec![Dim::Sym("b".into()), Dim::Known(2), Dim::Known(4)]
        );
    }
}
