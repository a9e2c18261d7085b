//! Attention ops of opset 23+: `Attention` and `RotaryEmbedding`.
//!
//! Semantics follow ONNX's reference (`op_attention.py`, `op_rotary_embedding.py`).
//! Computation is f32 (f64 for f64 inputs); (batch, head) pairs run in parallel.

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, Value,
};
use rayon::prelude::*;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Attention", build_attention);
    reg.register("RotaryEmbedding", build_rotary);
}

/// The float types the kernels compute in.
trait AFloat: num_traits::Float + Send + Sync + std::fmt::Debug + 'static {
    fn from_f64(v: f64) -> Self;
    fn to_tensor(shape: &[usize], v: Vec<Self>, dtype: DType) -> Result<Tensor>;
    fn read(t: &Tensor) -> Result<Vec<Self>>;
}

impl AFloat for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_tensor(shape: &[usize], v: Vec<Self>, dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(shape, v)?.cast(dtype)
    }
    fn read(t: &Tensor) -> Result<Vec<Self>> {
        t.to_f32_vec()
    }
}

impl AFloat for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_tensor(shape: &[usize], v: Vec<Self>, dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(shape, v)?.cast(dtype)
    }
    fn read(t: &Tensor) -> Result<Vec<Self>> {
        t.to_f64_vec()
    }
}

fn kerr(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::kernel(op, msg)
}

// ---------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------

/// `Attention` (opset 23/24).
#[derive(Debug, Clone)]
pub struct Attention {
    /// Causal masking (upper-left aligned after the past).
    pub is_causal: bool,
    /// Query heads (3-D inputs).
    pub q_num_heads: Option<usize>,
    /// Key/value heads (3-D inputs).
    pub kv_num_heads: Option<usize>,
    /// Scale of Q·Kᵀ (default 1/√head_size).
    pub scale: Option<f64>,
    /// Soft cap of the logits (0: none).
    pub softcap: f64,
    /// Which intermediate the 4th output holds (0..=3).
    pub qk_mode: i64,
}

fn build_attention(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let heads = |name: &str| -> Result<Option<usize>> {
        match a.opt_int(name)? {
            Some(v) if v <= 0 => Err(a.invalid(format!("{name} must be positive, got {v}"))),
            Some(v) => Ok(Some(v as usize)),
            None => Ok(None),
        }
    };
    let qk_mode = a.int("qk_matmul_output_mode", 0)?;
    if !(0..=3).contains(&qk_mode) {
        return Err(a.invalid(format!(
            "qk_matmul_output_mode must be in 0..=3, got {qk_mode}"
        )));
    }
    Ok(Box::new(Attention {
        is_causal: a.int("is_causal", 0)? != 0,
        q_num_heads: heads("q_num_heads")?,
        kv_num_heads: heads("kv_num_heads")?,
        scale: a.opt_float("scale")?.map(|v| v as f64),
        softcap: a.float("softcap", 0.0)? as f64,
        qk_mode,
    }))
}

/// A 4-D `[batch, heads, seq, head_size]` view of Q/K/V.
struct Heads<T> {
    data: Vec<T>,
    b: usize,
    h: usize,
    s: usize,
    d: usize,
}

impl<T: AFloat> Heads<T> {
    /// Converts a 3-D `[batch, seq, heads·d]` or 4-D tensor.
    fn from(t: &Tensor, heads: Option<usize>, name: &str) -> Result<Heads<T>> {
        let v = T::read(t)?;
        let s = t.shape();
        match s.len() {
            4 => Ok(Heads {
                data: v,
                b: s[0],
                h: s[1],
                s: s[2],
                d: s[3],
            }),
            3 => {
                let h = heads.ok_or_else(|| {
                    kerr(
                        "Attention",
                        format!("3-D {name} needs the num_heads attributes"),
                    )
                })?;
                if !s[2].is_multiple_of(h) {
                    return Err(kerr(
                        "Attention",
                        format!("{name} hidden size {} is not a multiple of {h} heads", s[2]),
                    ));
                }
                let d = s[2] / h;
                let (b, sq) = (s[0], s[1]);
                let mut out = vec![T::zero(); v.len()];
                for bi in 0..b {
                    for si in 0..sq {
                        for hi in 0..h {
                            let src = ((bi * sq + si) * h + hi) * d;
                            let dst = ((bi * h + hi) * sq + si) * d;
                            out[dst..dst + d].copy_from_slice(&v[src..src + d]);
                        }
                    }
                }
                Ok(Heads {
                    data: out,
                    b,
                    h,
                    s: sq,
                    d,
                })
            }
            _ => Err(kerr(
                "Attention",
                format!("{name} must be 3-D or 4-D, found {s:?}"),
            )),
        }
    }

    fn row(&self, b: usize, h: usize, s: usize) -> &[T] {
        let o = ((b * self.h + h) * self.s + s) * self.d;
        &self.data[o..o + self.d]
    }

    /// Concatenates a past `[b, h, s_past, d]` tensor in front along the sequence axis.
    fn with_past(self, past: Option<&Tensor>, name: &str) -> Result<Heads<T>> {
        let p = match past {
            None => return Ok(self),
            Some(p) => p,
        };
        let ps = p.shape();
        if ps.len() != 4 || ps[0] != self.b || ps[1] != self.h || ps[3] != self.d {
            return Err(kerr(
                "Attention",
                format!(
                    "{name} must have shape [{}, {}, past, {}], found {ps:?}",
                    self.b, self.h, self.d
                ),
            ));
        }
        let pv = T::read(p)?;
        let sp = ps[2];
        let s = sp + self.s;
        let mut out = Vec::with_capacity(self.b * self.h * s * self.d);
        for bh in 0..self.b * self.h {
            out.extend_from_slice(&pv[bh * sp * self.d..(bh + 1) * sp * self.d]);
            out.extend_from_slice(&self.data[bh * self.s * self.d..(bh + 1) * self.s * self.d]);
        }
        Ok(Heads {
            data: out,
            b: self.b,
            h: self.h,
            s,
            d: self.d,
        })
    }
}

/// The attention mask as an additive bias broadcast to `[b, h, sq, skv]`.
struct Mask<T> {
    bias: Vec<T>,
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<T: AFloat> Mask<T> {
    fn from(t: &Tensor, b: usize, h: usize, sq: usize, skv: usize) -> Result<Mask<T>> {
        let s = t.shape();
        if s.is_empty() || s.len() > 4 {
            return Err(kerr(
                "Attention",
                format!("attn_mask must have rank 1 to 4, found {s:?}"),
            ));
        }
        let mut shape = [1usize; 4];
        shape[4 - s.len()..].copy_from_slice(s);
        let want = [b, h, sq, skv];
        for i in 0..3 {
            if shape[i] != 1 && shape[i] != want[i] {
                return Err(kerr(
                    "Attention",
                    format!("attn_mask {s:?} does not broadcast to {want:?}"),
                ));
            }
        }
        if shape[3] > skv {
            return Err(kerr(
                "Attention",
                format!(
                    "attn_mask last dim {} exceeds the total sequence length {skv}",
                    shape[3]
                ),
            ));
        }
        let bias: Vec<T> = if t.dtype() == DType::Bool {
            t.as_bools()?
                .iter()
                .map(|&m| if m { T::zero() } else { T::neg_infinity() })
                .collect()
        } else {
            T::read(t)?
        };
        let st = kiln_core::strides(&shape);
        let strides = [
            if shape[0] == 1 { 0 } else { st[0] },
            if shape[1] == 1 { 0 } else { st[1] },
            if shape[2] == 1 { 0 } else { st[2] },
            1,
        ];
        Ok(Mask {
            bias,
            shape,
            strides,
        })
    }

    /// Bias at (b, h, i, j); positions past the mask's last dim are masked out.
    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> T {
        if j >= self.shape[3] {
            return T::neg_infinity();
        }
        self.bias[b * self.strides[0] + h * self.strides[1] + i * self.strides[2] + j]
    }
}

impl Attention {
    fn run<T: AFloat>(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "Attention";
        let qt = input_tensor(inputs, 0, op)?;
        let kt = input_tensor(inputs, 1, op)?;
        let vt = input_tensor(inputs, 2, op)?;
        let ranks = (qt.rank(), kt.rank(), vt.rank());
        if ranks.0 != ranks.1 || ranks.1 != ranks.2 {
            return Err(kerr(
                op,
                format!("Q, K and V must have the same rank, found {ranks:?}"),
            ));
        }
        let q = Heads::<T>::from(qt, self.q_num_heads, "Q")?;
        let k = Heads::<T>::from(kt, self.kv_num_heads, "K")?
            .with_past(optional_tensor(inputs, 4, op)?, "past_key")?;
        let v = Heads::<T>::from(vt, self.kv_num_heads, "V")?
            .with_past(optional_tensor(inputs, 5, op)?, "past_value")?;
        let past_len = optional_tensor(inputs, 4, op)?.map_or(0, |p| p.shape()[2]);
        if k.b != q.b || v.b != q.b || k.h != v.h || k.s != v.s || k.d != q.d {
            return Err(kerr(
                op,
                "Q, K and V have inconsistent batch, head or sequence sizes",
            ));
        }
        if k.h == 0 || q.h % k.h != 0 {
            return Err(kerr(
                op,
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    q.h, k.h
                ),
            ));
        }
        let (b, hq, sq, skv, dv) = (q.b, q.h, q.s, k.s, v.d);
        let reps = hq / k.h;
        let mask = match optional_tensor(inputs, 3, op)? {
            Some(m) => Some(Mask::<T>::from(m, b, hq, sq, skv)?),
            None => None,
        };
        let nonpad = match optional_tensor(inputs, 6, op)? {
            Some(t) => {
                let v = t.to_i64_vec()?;
                if v.len() != b {
                    return Err(kerr(
                        op,
                        format!("nonpad_kv_seqlen must have {b} values, got {}", v.len()),
                    ));
                }
                Some(v)
            }
            None => None,
        };
        let scale = self.scale.unwrap_or_else(|| 1.0 / (q.d as f64).sqrt());
        let sqrt_scale = T::from_f64(scale.sqrt());
        let softcap = T::from_f64(self.softcap);
        let mut y = vec![T::zero(); b * hq * sq * dv];
        let mut qk_out = vec![T::zero(); b * hq * sq * skv];
        let head = |(bh, (yb, qkb)): (usize, (&mut [T], &mut [T]))| {
            let (bi, hi) = (bh / hq, bh % hq);
            let kh = hi / reps;
            let mut logits = vec![T::zero(); skv];
            for i in 0..sq {
                let qr: Vec<T> = q.row(bi, hi, i).iter().map(|&x| x * sqrt_scale).collect();
                for (j, l) in logits.iter_mut().enumerate() {
                    let kr = k.row(bi, kh, j);
                    *l = qr
                        .iter()
                        .zip(kr)
                        .fold(T::zero(), |acc, (&a, &c)| acc + a * (c * sqrt_scale));
                }
                let qk_row = &mut qkb[i * skv..(i + 1) * skv];
                if self.qk_mode == 0 {
                    qk_row.copy_from_slice(&logits);
                }
                for (j, l) in logits.iter_mut().enumerate() {
                    let mut bias = T::zero();
                    if let Some(m) = &mask {
                        bias = bias + m.at(bi, hi, i, j);
                    }
                    if self.is_causal && j > past_len + i {
                        bias = bias + T::neg_infinity();
                    }
                    if let Some(np) = &nonpad {
                        if (j as i64) >= np[bi] {
                            bias = bias + T::neg_infinity();
                        }
                    }
                    *l = *l + bias;
                }
                if self.qk_mode == 1 {
                    qk_row.copy_from_slice(&logits);
                }
                if self.softcap > 0.0 {
                    logits
                        .iter_mut()
                        .for_each(|l| *l = (*l / softcap).tanh() * softcap);
                }
                if self.qk_mode == 2 {
                    qk_row.copy_from_slice(&logits);
                }
                let mx = logits.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                logits.iter_mut().for_each(|l| *l = (*l - mx).exp());
                let sum = logits.iter().fold(T::zero(), |a, &b| a + b);
                logits.iter_mut().for_each(|l| *l = *l / sum);
                if self.qk_mode == 3 {
                    qk_row.copy_from_slice(&logits);
                }
                let yr = &mut yb[i * dv..(i + 1) * dv];
                for (j, &p) in logits.iter().enumerate() {
                    let vr = v.row(bi, kh, j);
                    yr.iter_mut().zip(vr).for_each(|(o, &x)| *o = *o + p * x);
                }
            }
        };
        let (y_rows, qk_rows) = (sq * dv.max(1), sq * skv.max(1));
        if crate::parallel::enabled() {
            y.par_chunks_mut(y_rows)
                .zip(qk_out.par_chunks_mut(qk_rows))
                .enumerate()
                .for_each(head);
        } else {
            y.chunks_mut(y_rows)
                .zip(qk_out.chunks_mut(qk_rows))
                .enumerate()
                .for_each(head);
        }
        // Y back to the input form.
        let dtype = qt.dtype();
        let y_t = if qt.rank() == 3 {
            let mut y3 = vec![T::zero(); y.len()];
            for bi in 0..b {
                for hi in 0..hq {
                    for i in 0..sq {
                        let src = ((bi * hq + hi) * sq + i) * dv;
                        let dst = ((bi * sq + i) * hq + hi) * dv;
                        y3[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                    }
                }
            }
            T::to_tensor(&[b, sq, hq * dv], y3, dtype)?
        } else {
            T::to_tensor(&[b, hq, sq, dv], y, dtype)?
        };
        let pk = T::to_tensor(&[b, k.h, skv, k.d], k.data, kt.dtype())?;
        let pv = T::to_tensor(&[b, v.h, skv, dv], v.data, vt.dtype())?;
        let qk = T::to_tensor(&[b, hq, sq, skv], qk_out, dtype)?;
        Ok(vec![
            Value::Tensor(y_t),
            Value::Tensor(pk),
            Value::Tensor(pv),
            Value::Tensor(qk),
        ])
    }
}

fn dim_add(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Known(x), Dim::Known(y)) => Dim::Known(x + y),
        (Dim::Known(0), o) | (o, Dim::Known(0)) => o.clone(),
        _ => Dim::Unknown,
    }
}

impl Op for Attention {
    fn op_type(&self) -> &str {
        "Attention"
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let f = |i: usize| inputs.get(i).copied().flatten();
        let shape = |i: usize| f(i).and_then(|x| x.shape.clone());
        let dtype = match f(0).and_then(|x| x.dtype) {
            Some(d) => d,
            None => return Ok(vec![Fact::unknown(); n_outputs]),
        };
        let kd = f(1).and_then(|x| x.dtype).unwrap_or(dtype);
        let vd = f(2).and_then(|x| x.dtype).unwrap_or(dtype);
        let (qs, ks, vs) = (shape(0), shape(1), shape(2));
        let known = |d: &Dim| d.known();
        // 4-D views (batch, heads, seq, d) of q, k, v.
        let view = |s: &Option<Vec<Dim>>, heads: Option<usize>| -> Option<[Dim; 4]> {
            let s = s.as_ref()?;
            match s.len() {
                4 => Some([s[0].clone(), s[1].clone(), s[2].clone(), s[3].clone()]),
                3 => {
                    let h = heads?;
                    let d = known(&s[2]).map_or(Dim::Unknown, |v| Dim::Known(v / h));
                    Some([s[0].clone(), Dim::Known(h), s[1].clone(), d])
                }
                _ => None,
            }
        };
        let q4 = view(&qs, self.q_num_heads);
        let k4 = view(&ks, self.kv_num_heads);
        let v4 = view(&vs, self.kv_num_heads);
        let past = shape(4).and_then(|s| s.get(2).cloned());
        let total = match (&k4, &past) {
            (Some(k), Some(p)) => dim_add(&k[2], p),
            (Some(k), None) => k[2].clone(),
            _ => Dim::Unknown,
        };
        let y = match (&qs, &q4, &v4) {
            (Some(s), Some(q), Some(v)) if s.len() == 4 => Fact::tensor(
                dtype,
                vec![q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()],
            ),
            (Some(s), Some(q), Some(v)) if s.len() == 3 => {
                let hid = match (&q[1], &v[3]) {
                    (Dim::Known(h), Dim::Known(d)) => Dim::Known(h * d),
                    _ => Dim::Unknown,
                };
                Fact::tensor(dtype, vec![q[0].clone(), q[2].clone(), hid])
            }
            _ => Fact::of_dtype(dtype),
        };
        let pk = match &k4 {
            Some(k) => Fact::tensor(
                kd,
                vec![k[0].clone(), k[1].clone(), total.clone(), k[3].clone()],
            ),
            None => Fact::of_dtype(kd),
        };
        let pv = match &v4 {
            Some(v) => Fact::tensor(
                vd,
                vec![v[0].clone(), v[1].clone(), total.clone(), v[3].clone()],
            ),
            None => Fact::of_dtype(vd),
        };
        let qk = match &q4 {
            Some(q) => Fact::tensor(dtype, vec![q[0].clone(), q[1].clone(), q[2].clone(), total]),
            None => Fact::of_dtype(dtype),
        };
        Ok([y, pk, pv, qk].into_iter().take(n_outputs).collect())
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let q = input_tensor(inputs, 0, "Attention")?;
        match q.dtype() {
            DType::F64 => self.run::<f64>(inputs),
            DType::F32 | DType::F16 | DType::BF16 => self.run::<f32>(inputs),
            d => Err(kerr(
                "Attention",
                format!("Q must be a float tensor, found {d}"),
            )),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// RotaryEmbedding
// ---------------------------------------------------------------------------------------

/// `RotaryEmbedding` (opset 23).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// Rotate (even, odd) pairs instead of (first half, second half).
    pub interleaved: bool,
    /// Rotated prefix of each head (0: whole head).
    pub rotary_dim: usize,
    /// Heads of a 3-D input.
    pub num_heads: Option<usize>,
}

fn build_rotary(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let rd = a.int("rotary_embedding_dim", 0)?;
    if rd < 0 {
        return Err(a.invalid(format!("rotary_embedding_dim must be ≥ 0, got {rd}")));
    }
    let nh = match a.opt_int("num_heads")? {
        Some(v) if v < 0 => return Err(a.invalid(format!("num_heads must be positive, got {v}"))),
        Some(0) | None => None,
        Some(v) => Some(v as usize),
    };
    Ok(Box::new(RotaryEmbedding {
        interleaved: a.int("interleaved", 0)? != 0,
        rotary_dim: rd as usize,
        num_heads: nh,
    }))
}

impl RotaryEmbedding {
    fn run<T: AFloat>(&self, inputs: &[Option<&Value>]) -> Result<Tensor> {
        let op = "RotaryEmbedding";
        let x = input_tensor(inputs, 0, op)?;
        let cos_t = input_tensor(inputs, 1, op)?;
        let sin_t = input_tensor(inputs, 2, op)?;
        let pos = optional_tensor(inputs, 3, op)?;
        let s = x.shape();
        // Element (b, s, h, d) of the input lives at offset(b, s, h) + d.
        let (b, seq, heads, hd, four_d) = match s.len() {
            4 => (s[0], s[2], s[1], s[3], true),
            3 => {
                let h = self
                    .num_heads
                    .ok_or_else(|| kerr(op, "3-D input needs the num_heads attribute"))?;
                if s[2] % h != 0 {
                    return Err(kerr(
                        op,
                        format!("hidden size {} is not a multiple of num_heads {h}", s[2]),
                    ));
                }
                (s[0], s[1], h, s[2] / h, false)
            }
            _ => return Err(kerr(op, format!("input must be 3-D or 4-D, found {s:?}"))),
        };
        let rd = if self.rotary_dim == 0 {
            hd
        } else {
            self.rotary_dim
        };
        if rd > hd || rd % 2 != 0 {
            return Err(kerr(
                op,
                format!("rotary_embedding_dim {rd} must be even and ≤ head size {hd}"),
            ));
        }
        let half = rd / 2;
        let cos = T::read(cos_t)?;
        let sin = T::read(sin_t)?;
        if cos_t.shape() != sin_t.shape() || cos_t.shape().last().copied() != Some(half) {
            return Err(kerr(
                op,
                format!(
                    "cos/sin caches must match with last dim {half}, found {:?} and {:?}",
                    cos_t.shape(),
                    sin_t.shape()
                ),
            ));
        }
        // Row of the caches for (b, s).
        let cache_row: Box<dyn Fn(usize, usize) -> Result<usize>> = match pos {
            Some(p) => {
                let pv = p.to_i64_vec()?;
                let (ps, cs) = (p.shape().to_vec(), cos_t.shape().to_vec());
                if cs.len() != 2 || pv.len() != b * seq {
                    return Err(kerr(
                        op,
                        format!("position_ids {ps:?} / caches {cs:?} do not fit input {s:?}"),
                    ));
                }
                let max = cs[0];
                Box::new(move |bi, si| {
                    let v = pv[bi * seq + si];
                    if v < 0 || v as usize >= max {
                        return Err(kerr(
                            op,
                            format!("position id {v} is out of range [0, {max})"),
                        ));
                    }
                    Ok(v as usize)
                })
            }
            None => {
                if cos_t.shape() != [b, seq, half] {
                    return Err(kerr(op, format!("without position_ids the caches must be [{b}, {seq}, {half}], found {:?}", cos_t.shape())));
                }
                Box::new(move |bi, si| Ok(bi * seq + si))
            }
        };
        let mut data = T::read(x)?;
        for bi in 0..b {
            for si in 0..seq {
                let r = cache_row(bi, si)?;
                let (c, sn) = (
                    &cos[r * half..(r + 1) * half],
                    &sin[r * half..(r + 1) * half],
                );
                for hi in 0..heads {
                    let off = if four_d {
                        ((bi * heads + hi) * seq + si) * hd
                    } else {
                        ((bi * seq + si) * heads + hi) * hd
                    };
                    let v = &mut data[off..off + rd];
                    for i in 0..half {
                        let (i1, i2) = if self.interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        let (x1, x2) = (v[i1], v[i2]);
                        v[i1] = c[i] * x1 - sn[i] * x2;
                        v[i2] = sn[i] * x1 + c[i] * x2;
                    }
                }
            }
        }
        T::to_tensor(s, data, x.dtype())
    }
}

impl Op for RotaryEmbedding {
    fn op_type(&self) -> &str {
        "RotaryEmbedding"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        Ok(vec![match inputs.first().copied().flatten() {
            Some(f) => Fact {
                konst: None,
                ..f.clone()
            },
            None => Fact::unknown(),
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "RotaryEmbedding")?;
        let t = match x.dtype() {
            DType::F64 => self.run::<f64>(inputs)?,
            DType::F32 | DType::F16 | DType::BF16 => self.run::<f32>(inputs)?,
            d => {
                return Err(kerr(
                    "RotaryEmbedding",
                    format!("input must be float, found {d}"),
                ))
            }
        };
        Ok(vec![Value::Tensor(t)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn run(op: &dyn Op, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        let vals: Vec<Option<Value>> = inputs.into_iter().map(|t| t.map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        op.eval(&refs)?
            .into_iter()
            .map(|v| v.into_tensor())
            .collect()
    }

    fn attn(is_causal: bool, qk_mode: i64) -> Attention {
        Attention {
            is_causal,
            q_num_heads: Some(4),
            kv_num_heads: Some(2),
            scale: None,
            softcap: 0.0,
            qk_mode,
        }
    }

    /// Naive attention for one (b, h): q [sq, d], k [skv, d], v [skv, dv].
    #[allow(clippy::too_many_arguments)] // the oracle mirrors the spec's parameters one to one
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sq: usize,
        skv: usize,
        d: usize,
        dv: usize,
        causal_past: Option<usize>,
    ) -> Vec<f32> {
        let mut out = vec![0.0; sq * dv];
        for i in 0..sq {
            let mut l: Vec<f64> = (0..skv)
                .map(|j| {
                    (0..d)
                        .map(|t| q[i * d + t] as f64 * k[j * d + t] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            if let Some(p) = causal_past {
                for (j, x) in l.iter_mut().enumerate() {
                    if j > p + i {
                        *x = f64::NEG_INFINITY;
                    }
                }
            }
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for j in 0..skv {
                for t in 0..dv {
                    out[i * dv + t] += (e[j] / s * v[j * dv + t] as f64) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn gqa_3d_causal_with_past() {
        let (b, sq, hq, hkv, d, past) = (2, 3, 4, 2, 5, 2);
        let q = rand_vec(b * sq * hq * d, 1);
        let k = rand_vec(b * sq * hkv * d, 2);
        let v = rand_vec(b * sq * hkv * d, 3);
        let pk = rand_vec(b * hkv * past * d, 4);
        let pv = rand_vec(b * hkv * past * d, 5);
        let out = run(
            &attn(true, 0),
            vec![
                Some(Tensor::from_vec(&[b, sq, hq * d], q.clone()).unwrap()),
                Some(Tensor::from_vec(&[b, sq, hkv * d], k.clone()).unwrap()),
                Some(Tensor::from_vec(&[b, sq, hkv * d], v.clone()).unwrap()),
                None,
                Some(Tensor::from_vec(&[b, hkv, past, d], pk.clone()).unwrap()),
                Some(Tensor::from_vec(&[b, hkv, past, d], pv.clone()).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[b, sq, hq * d]);
        assert_eq!(out[1].shape(), &[b, hkv, past + sq, d]);
        let y = out[0].to_f32_vec().unwrap();
        let present_k = out[1].to_f32_vec().unwrap();
        let present_v = out[2].to_f32_vec().unwrap();
        let skv = past + sq;
        for bi in 0..b {
            for hi in 0..hq {
                let kh = hi / 2;
                let qh: Vec<f32> = (0..sq)
                    .flat_map(|i| {
                        q[((bi * sq + i) * hq + hi) * d..((bi * sq + i) * hq + hi + 1) * d].to_vec()
                    })
                    .collect();
                let kk = &present_k[(bi * hkv + kh) * skv * d..(bi * hkv + kh + 1) * skv * d];
                let vv = &present_v[(bi * hkv + kh) * skv * d..(bi * hkv + kh + 1) * skv * d];
                let want = naive(&qh, kk, vv, sq, skv, d, d, Some(past));
                for i in 0..sq {
                    for t in 0..d {
                        let got = y[((bi * sq + i) * hq + hi) * d + t];
                        assert!((got - want[i * d + t]).abs() < 1e-5);
                    }
                }
            }
        }
        // present_key starts with past_key.
        assert_eq!(&present_k[..past * d], &pk[..past * d]);
    }

    #[test]
    fn bool_mask_and_qk_output_modes() {
        let (b, h, s, d) = (1, 1, 2, 2);
        let q = Tensor::from_vec(&[b, h, s, d], vec![1.0f32, 0.0, 0.0, 1.0]).unwrap();
        let k = q.clone();
        let v = Tensor::from_vec(&[b, h, s, d], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let mask = Tensor::from_bools(&[2, 2], &[true, false, true, true]).unwrap();
        let op = Attention {
            is_causal: false,
            q_num_heads: None,
            kv_num_heads: None,
            scale: Some(1.0),
            softcap: 0.0,
            qk_mode: 1,
        };
        let out = run(
            &op,
            vec![
                Some(q.clone()),
                Some(k.clone()),
                Some(v.clone()),
                Some(mask),
            ],
        )
        .unwrap();
        let y = out[0].to_f32_vec().unwrap();
        assert_eq!(&y[..2], &[1.0, 2.0]);
        let qk = out[3].to_f32_vec().unwrap();
        assert_eq!(qk[1], f32::NEG_INFINITY);
        assert_eq!(qk[0], 1.0);
        let op3 = Attention { qk_mode: 3, ..op };
        let out = run(&op3, vec![Some(q), Some(k), Some(v)]).unwrap();
        let p = out[3].to_f32_vec().unwrap();
        assert!((p[0] + p[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn attention_errors() {
        let q = Tensor::from_vec(&[1, 2, 6], vec![0.0f32; 12]).unwrap();
        let op = Attention {
            is_causal: false,
            q_num_heads: None,
            kv_num_heads: None,
            scale: None,
            softcap: 0.0,
            qk_mode: 0,
        };
        assert!(run(&op, vec![Some(q.clone()), Some(q.clone()), Some(q.clone())]).is_err());
        let op = Attention {
            q_num_heads: Some(3),
            kv_num_heads: Some(2),
            ..op
        };
        assert!(run(&op, vec![Some(q.clone()), Some(q.clone()), Some(q)]).is_err());
    }

    #[test]
    fn rotary_matches_formula() {
        let (b, h, s, d) = (1, 2, 3, 4);
        let x = rand_vec(b * h * s * d, 7);
        let cos = rand_vec(8 * 2, 8);
        let sin = rand_vec(8 * 2, 9);
        let pos = Tensor::from_vec(&[1, 3], vec![5i64, 0, 7]).unwrap();
        for interleaved in [false, true] {
            let op = RotaryEmbedding {
                interleaved,
                rotary_dim: 0,
                num_heads: None,
            };
            let out = run(
                &op,
                vec![
                    Some(Tensor::from_vec(&[b, h, s, d], x.clone()).unwrap()),
                    Some(Tensor::from_vec(&[8, 2], cos.clone()).unwrap()),
                    Some(Tensor::from_vec(&[8, 2], sin.clone()).unwrap()),
                    Some(pos.clone()),
                ],
            )
            .unwrap();
            let y = out[0].to_f32_vec().unwrap();
            let p = [5, 0, 7];
            for hi in 0..h {
                for si in 0..s {
                    let o = (hi * s + si) * d;
                    for i in 0..2 {
                        let (i1, i2) = if interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + 2)
                        };
                        let (c, sn) = (cos[p[si] * 2 + i], sin[p[si] * 2 + i]);
                        assert!((y[o + i1] - (c * x[o + i1] - sn * x[o + i2])).abs() < 1e-6);
                        assert!((y[o + i2] - (sn * x[o + i1] + c * x[o + i2])).abs() < 1e-6);
                    }
                }
            }
        }
        // Bad position id.
        let op = RotaryEmbedding {
            interleaved: false,
            rotary_dim: 0,
            num_heads: None,
        };
        let bad = Tensor::from_vec(&[1, 3], vec![5i64, 0, 9]).unwrap();
        assert!(run(
            &op,
            vec![
                Some(Tensor::from_vec(&[b, h, s, d], x).unwrap()),
                Some(Tensor::from_vec(&[8, 2], cos).unwrap()),
                Some(Tensor::from_vec(&[8, 2], sin).unwrap()),
                Some(bad),
            ],
        )
        .is_err());
    }
}
