//! Linear algebra: Gemm, MatMul (with fused activations in the `kiln` domain),
//! MatMulInteger, QLinearMatMul, Einsum, Det.

pub mod blas;
pub mod det;
pub mod einsum;
pub mod quant;
pub mod sgemm;

use std::borrow::Cow;

use num_traits::{AsPrimitive, WrappingAdd, WrappingMul, Zero};
use rayon::prelude::*;

use kiln_core::{
    fact, input_tensor, optional_tensor, BuildCtx, DType, Dim, Element, Fact, KilnError, Op,
    OpRegistry, Result, Tensor, TensorMut, Value,
};

use self::blas::{GemmEpilogue, GemmFloat, MatRef};
use crate::fused::{Activation, KILN_DOMAIN};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("MatMul", build_matmul);
    reg.register_in(KILN_DOMAIN, "MatMul", build_matmul);
    reg.register("Gemm", build_gemm);
    reg.register_in(KILN_DOMAIN, "Gemm", build_gemm);
    reg.register("MatMulInteger", quant::build_matmul_integer);
    reg.register("QLinearMatMul", quant::build_qlinear_matmul);
    reg.register("Einsum", einsum::build_einsum);
    reg.register("Det", det::build_det);
}

/// The elements of a float tensor as f32, borrowed when it already is f32.
pub fn as_f32(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    if t.dtype() == DType::F32 {
        Ok(Cow::Borrowed(t.as_slice::<f32>()?))
    } else {
        Ok(Cow::Owned(t.to_f32_vec()?))
    }
}

/// A tensor of `dtype` from f32 values (cast when `dtype` is not f32).
pub fn from_f32(dtype: DType, shape: &[usize], v: Vec<f32>) -> Result<Tensor> {
    let t = Tensor::from_vec(shape, v)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.cast(dtype)
    }
}

fn infer_err(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::Inference {
        node: String::new(),
        op: op.into(),
        msg: msg.into(),
    }
}

/// Writes a kernel's result into an output slot, checking its dtype and shape.
pub(crate) fn slot_of<'s, 'a>(
    outputs: &'s mut [TensorMut<'a>],
    op: &str,
    dtype: DType,
    shape: &[usize],
) -> Result<&'s mut TensorMut<'a>> {
    let slot = outputs
        .first_mut()
        .ok_or_else(|| KilnError::kernel(op, "no output slot"))?;
    if slot.dtype() != dtype || slot.shape() != shape {
        return Err(KilnError::kernel(
            op,
            format!(
                "output slot is {} {:?}, expected {dtype} {shape:?}",
                slot.dtype(),
                slot.shape()
            ),
        ));
    }
    Ok(slot)
}

// ---------------------------------------------------------------------------------------
// Integer arithmetic (exact, wrapping).

/// Integer element types with wrapping arithmetic.
pub trait IntElem: Element + Copy + Zero + WrappingAdd + WrappingMul + AsPrimitive<f64> {}
impl<T: Element + Copy + Zero + WrappingAdd + WrappingMul + AsPrimitive<f64>> IntElem for T {}

/// Dispatches on the integer dtypes MatMul and Gemm accept.
macro_rules! dispatch_int {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            DType::I8 => {
                type $T = i8;
                $body
            }
            DType::I16 => {
                type $T = i16;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::U16 => {
                type $T = u16;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::U64 => {
                type $T = u64;
                $body
            }
            _ => $other,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use dispatch_int;

// ---------------------------------------------------------------------------------------
// MatMul

/// Shapes of a numpy-style batched matrix product.
#[derive(Debug, Clone)]
pub struct MatMulPlan {
    /// Rows of each product.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of each product.
    pub n: usize,
    /// Element offset of A's and B's matrix for each output batch.
    pub offsets: smallvec::SmallVec<[(usize, usize); 8]>,
    /// The output shape.
    pub out_shape: kiln_core::Shape,
    /// True when B is one matrix shared by every batch and A's batches are contiguous, so
    /// all batches fold into one product of (batches·m) rows.
    pub fold: bool,
}

/// Plans `a @ b` for numpy shapes (1-D operands promoted then squeezed).
pub fn matmul_plan(op: &str, a: &[usize], b: &[usize]) -> Result<MatMulPlan> {
    if a.is_empty() || b.is_empty() {
        return Err(KilnError::kernel(op, "operands must have rank ≥ 1"));
    }
    let a2: kiln_core::Shape = if a.len() == 1 {
        smallvec::smallvec![1, a[0]]
    } else {
        a.into()
    };
    let b2: kiln_core::Shape = if b.len() == 1 {
        smallvec::smallvec![b[0], 1]
    } else {
        b.into()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(KilnError::kernel(
            op,
            format!("inner dimensions differ: A {a:?}, B {b:?}"),
        ));
    }
    let (ab, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let batch = broadcast_batch(ab, bb).ok_or_else(|| {
        KilnError::kernel(
            op,
            format!("batch dims of A {a:?} and B {b:?} do not broadcast"),
        )
    })?;
    let nb: usize = batch.iter().product();
    let (sa, sb) = (
        bcast_strides(ab, &batch, m * k),
        bcast_strides(bb, &batch, k * n),
    );
    let mut offsets: smallvec::SmallVec<[(usize, usize); 8]> =
        smallvec::SmallVec::with_capacity(nb);
    let mut idx: kiln_core::Shape = smallvec::smallvec![0usize; batch.len()];
    for _ in 0..nb {
        let oa: usize = idx.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ob: usize = idx.iter().zip(&sb).map(|(i, s)| i * s).sum();
        offsets.push((oa, ob));
        for d in (0..batch.len()).rev() {
            idx[d] += 1;
            if idx[d] < batch[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let mut out_shape = batch.clone();
    if a.len() > 1 {
        out_shape.push(m);
    }
    if b.len() > 1 {
        out_shape.push(n);
    }
    let fold = nb > 1
        && sb.iter().all(|&s| s == 0)
        && offsets.iter().enumerate().all(|(i, o)| o.0 == i * m * k);
    Ok(MatMulPlan {
        m,
        k,
        n,
        offsets,
        out_shape,
        fold,
    })
}

/// Strides (in elements) of a broadcast operand's batch dims over the output batch.
fn bcast_strides(dims: &[usize], batch: &[usize], mat: usize) -> kiln_core::Shape {
    let mut s: kiln_core::Shape = smallvec::smallvec![0; batch.len()];
    let off = batch.len() - dims.len();
    let mut acc = mat;
    for i in (0..dims.len()).rev() {
        s[off + i] = if dims[i] == 1 { 0 } else { acc };
        acc *= dims[i];
    }
    s
}

/// Numpy broadcast of two batch shapes (inline, no allocation up to rank 6).
fn broadcast_batch(a: &[usize], b: &[usize]) -> Option<kiln_core::Shape> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        if i + s.len() >= rank {
            s[i + s.len() - rank]
        } else {
            1
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// Symbolic output shape of MatMul.
pub fn matmul_dims(op: &str, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        return Err(infer_err(op, "operands must have rank ≥ 1"));
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![Dim::Known(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), Dim::Known(1)]
    } else {
        b.to_vec()
    };
    if let (Dim::Known(x), Dim::Known(y)) = (&a2[a2.len() - 1], &b2[b2.len() - 2]) {
        if x != y {
            return Err(infer_err(
                op,
                format!("inner dimensions differ: {x} vs {y}"),
            ));
        }
    }
    let mut out = fact::broadcast_dims(&a2[..a2.len() - 2], &b2[..b2.len() - 2])
        .ok_or_else(|| infer_err(op, "batch dims do not broadcast"))?;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Ok(out)
}

/// Runs the planned product for a float type gemm supports; `out` is overwritten.
pub fn matmul_float<T: GemmFloat>(
    plan: &MatMulPlan,
    a: &[T],
    b: &[T],
    out: &mut [T],
) -> Result<()> {
    matmul_with(plan, a, b, out, |m, n, k, o, a, b, par| {
        blas::gemm(m, n, k, o, n, false, a, b, T::one(), par)
    })
}

/// [`matmul_float`] for f32 with `act` applied in the kernels' epilogue (no separate pass
/// over the output).
pub fn matmul_f32_act(
    plan: &MatMulPlan,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    act: Activation,
) -> Result<()> {
    let epi = GemmEpilogue {
        act,
        ..GemmEpilogue::default()
    };
    matmul_with(plan, a, b, out, |m, n, k, o, a, b, par| {
        blas::gemm_epi(m, n, k, o, n, false, a, b, 1.0, par, &epi)
    })
}

/// The batch loop of [`matmul_float`], each `m × n` product (row-major, `out` row stride
/// `n`) computed by `product(m, n, k, out, a, b, parallel)`.
fn matmul_with<T: GemmFloat>(
    plan: &MatMulPlan,
    a: &[T],
    b: &[T],
    out: &mut [T],
    product: impl Fn(usize, usize, usize, &mut [T], MatRef<'_, T>, MatRef<'_, T>, bool) -> Result<()>
        + Sync,
) -> Result<()> {
    let MatMulPlan { m, k, n, .. } = *plan;
    if plan.fold {
        let rows = m * plan.offsets.len();
        let par = rows * n * k >= blas::PARALLEL_THRESHOLD;
        return product(
            rows,
            n,
            k,
            out,
            MatRef::row_major(a, k),
            MatRef::row_major(&b[plan.offsets[0].1..], n),
            par,
        );
    }
    let per = m * n;
    if per == 0 {
        return Ok(());
    }
    let nb = plan.offsets.len();
    let one = |(i, o): (usize, &mut [T])| {
        let (oa, ob) = plan.offsets[i];
        let big = m * n * k >= blas::PARALLEL_THRESHOLD;
        product(
            m,
            n,
            k,
            o,
            MatRef::row_major(&a[oa..], k),
            MatRef::row_major(&b[ob..], n),
            big && nb < 2,
        )
    };
    if nb > 1 && crate::parallel::threads() > 1 && nb * m * n * k >= blas::PARALLEL_THRESHOLD {
        out.par_chunks_mut(per).enumerate().try_for_each(one)
    } else {
        out.chunks_mut(per).enumerate().try_for_each(one)
    }
}

/// The planned product for integers, exact with wrapping.
pub fn matmul_int<T: IntElem>(plan: &MatMulPlan, a: &[T], b: &[T], out: &mut [T]) {
    let MatMulPlan { m, k, n, .. } = *plan;
    for (bi, &(oa, ob)) in plan.offsets.iter().enumerate() {
        let o = &mut out[bi * m * n..(bi + 1) * m * n];
        o.fill(T::zero());
        for i in 0..m {
            let orow = &mut o[i * n..(i + 1) * n];
            for l in 0..k {
                let av = a[oa + i * k + l];
                let brow = &b[ob + l * n..ob + (l + 1) * n];
                for (ov, &bv) in orow.iter_mut().zip(brow) {
                    *ov = ov.wrapping_add(&av.wrapping_mul(&bv));
                }
            }
        }
    }
}

/// ONNX MatMul (and its fused form in the `kiln` domain).
#[derive(Debug, Clone)]
pub struct MatMul {
    /// Activation applied to the output.
    pub act: Activation,
}

fn build_matmul(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(MatMul {
        act: Activation::from_attrs(&ctx.attrs())?,
    }))
}

impl MatMul {
    fn run(
        &self,
        a: &Tensor,
        b: &Tensor,
        plan: &MatMulPlan,
        slot: Option<&mut TensorMut>,
    ) -> Result<Option<Tensor>> {
        let dtype = a.dtype();
        let shape = &plan.out_shape;
        let len: usize = shape.iter().product();
        match (dtype, slot) {
            (DType::F32, Some(slot)) => {
                let out = slot.as_mut_slice::<f32>()?;
                matmul_f32_act(
                    plan,
                    a.as_slice::<f32>()?,
                    b.as_slice::<f32>()?,
                    out,
                    self.act,
                )?;
                Ok(None)
            }
            (DType::F64, _) => {
                let mut out = vec![0.0f64; len];
                matmul_float(plan, a.as_slice::<f64>()?, b.as_slice::<f64>()?, &mut out)?;
                if self.act != Activation::None {
                    out.iter_mut()
                        .for_each(|v| *v = self.act.apply(*v as f32) as f64);
                }
                Tensor::from_vec(shape, out).map(Some)
            }
            (d, _) if d.is_float() => {
                let mut out = vec![0.0f32; len];
                matmul_f32_act(plan, &as_f32(a)?, &as_f32(b)?, &mut out, self.act)?;
                from_f32(d, shape, out).map(Some)
            }
            (d, _) => dispatch_int!(d, T => {
                let mut out = vec![T::zero(); len];
                matmul_int(plan, a.as_slice::<T>()?, b.as_slice::<T>()?, &mut out);
                Tensor::from_vec(shape, out).map(Some)
            }, _ => Err(KilnError::kernel("MatMul", format!("unsupported dtype {d}")))),
        }
    }

    fn prepare<'a>(inputs: &[Option<&'a Value>]) -> Result<(&'a Tensor, &'a Tensor, MatMulPlan)> {
        let a = input_tensor(inputs, 0, "MatMul")?;
        let b = input_tensor(inputs, 1, "MatMul")?;
        if a.dtype() != b.dtype() {
            return Err(KilnError::kernel(
                "MatMul",
                format!("A is {} but B is {}", a.dtype(), b.dtype()),
            ));
        }
        let plan = matmul_plan("MatMul", a.shape(), b.shape())?;
        Ok((a, b, plan))
    }
}

impl Op for MatMul {
    fn op_type(&self) -> &str {
        "MatMul"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let a = inputs.first().copied().flatten();
        let b = inputs.get(1).copied().flatten();
        let dtype = a.and_then(|f| f.dtype).or(b.and_then(|f| f.dtype));
        if let Some(d) = dtype {
            if !(d.is_float() || d.is_int()) {
                return Err(infer_err("MatMul", format!("unsupported dtype {d}")));
            }
        }
        let shape = match (
            a.and_then(|f| f.shape.as_ref()),
            b.and_then(|f| f.shape.as_ref()),
        ) {
            (Some(sa), Some(sb)) => Some(matmul_dims("MatMul", sa, sb)?),
            _ => None,
        };
        Ok(vec![Fact {
            dtype,
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (a, b, plan) = Self::prepare(inputs)?;
        if a.dtype() == DType::F32 {
            let mut out = vec![0.0f32; plan.out_shape.iter().product()];
            matmul_f32_act(
                &plan,
                a.as_slice::<f32>()?,
                b.as_slice::<f32>()?,
                &mut out,
                self.act,
            )?;
            return Ok(vec![Tensor::from_vec(&plan.out_shape, out)?.into()]);
        }
        let t = self.run(a, b, &plan, None)?;
        Ok(vec![t
            .ok_or_else(|| KilnError::kernel("MatMul", "no output produced"))?
            .into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let (a, b, plan) = Self::prepare(inputs)?;
        let slot = slot_of(outputs, "MatMul", a.dtype(), &plan.out_shape)?;
        if a.dtype() == DType::F32 {
            self.run(a, b, &plan, Some(slot))?;
            return Ok(());
        }
        match self.run(a, b, &plan, None)? {
            Some(t) => slot.copy_from(&t),
            None => Err(KilnError::kernel("MatMul", "no output produced")),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Gemm

/// ONNX Gemm (and its fused form in the `kiln` domain): `alpha·A'·B' + beta·C`.
#[derive(Debug, Clone)]
pub struct Gemm {
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C.
    pub beta: f32,
    /// Transpose A.
    pub trans_a: bool,
    /// Transpose B.
    pub trans_b: bool,
    /// Opset < 7 with `broadcast = 0`: C must have the output shape.
    pub no_broadcast: bool,
    /// Activation applied to the output.
    pub act: Activation,
}

fn build_gemm(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let no_broadcast =
        ctx.opset() < 7 && ctx.desc.domain != KILN_DOMAIN && a.int("broadcast", 0)? == 0;
    Ok(Box::new(Gemm {
        alpha: a.float("alpha", 1.0)?,
        beta: a.float("beta", 1.0)?,
        trans_a: a.int("transA", 0)? != 0,
        trans_b: a.int("transB", 0)? != 0,
        no_broadcast,
        act: Activation::from_attrs(&a)?,
    }))
}

/// Resolved shapes of one Gemm call.
struct GemmCall<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    c: Option<&'a Tensor>,
    m: usize,
    k: usize,
    n: usize,
}

impl Gemm {
    fn prepare<'a>(&self, inputs: &[Option<&'a Value>]) -> Result<GemmCall<'a>> {
        let a = input_tensor(inputs, 0, "Gemm")?;
        let b = input_tensor(inputs, 1, "Gemm")?;
        let c = optional_tensor(inputs, 2, "Gemm")?;
        if a.rank() != 2 || b.rank() != 2 {
            return Err(KilnError::kernel(
                "Gemm",
                format!(
                    "A and B must be matrices, found {:?} and {:?}",
                    a.shape(),
                    b.shape()
                ),
            ));
        }
        if a.dtype() != b.dtype() || c.is_some_and(|c| c.dtype() != a.dtype()) {
            return Err(KilnError::kernel("Gemm", "A, B and C must share one dtype"));
        }
        let (m, k) = if self.trans_a {
            (a.shape()[1], a.shape()[0])
        } else {
            (a.shape()[0], a.shape()[1])
        };
        let (k2, n) = if self.trans_b {
            (b.shape()[1], b.shape()[0])
        } else {
            (b.shape()[0], b.shape()[1])
        };
        if k != k2 {
            return Err(KilnError::kernel(
                "Gemm",
                format!("inner dimensions differ: A' is {m}×{k}, B' is {k2}×{n}"),
            ));
        }
        if let Some(c) = c {
            let ok = if self.no_broadcast {
                c.shape() == [m, n]
            } else {
                c.rank() <= 2
                    && c.shape()
                        .iter()
                        .rev()
                        .zip([n, m])
                        .all(|(&d, want)| d == 1 || d == want)
            };
            if !ok {
                return Err(KilnError::kernel(
                    "Gemm",
                    format!(
                        "C of shape {:?} does not broadcast to [{m}, {n}]",
                        c.shape()
                    ),
                ));
            }
        }
        Ok(GemmCall { a, b, c, m, k, n })
    }

    /// Writes C broadcast to m×n through `f` into `out`.
    fn c_init<T: Copy>(&self, call: &GemmCall, c: &[T], out: &mut [T], f: impl Fn(T) -> T) {
        let cs = call.c.map(|c| c.shape().to_vec()).unwrap_or_default();
        let (cr, cc) = match cs.len() {
            0 => (1, 1),
            1 => (1, cs[0]),
            _ => (cs[0], cs[1]),
        };
        for i in 0..call.m {
            for j in 0..call.n {
                let v = c[(if cr == 1 { 0 } else { i }) * cc + if cc == 1 { 0 } else { j }];
                out[i * call.n + j] = f(v);
            }
        }
    }

    fn run_float<T: GemmFloat>(
        &self,
        call: &GemmCall,
        a: &[T],
        b: &[T],
        c: Option<&[T]>,
        out: &mut [T],
    ) -> Result<()> {
        let (m, k, n) = (call.m, call.k, call.n);
        let alpha = T::from(self.alpha).unwrap_or_else(T::one);
        let beta = T::from(self.beta).unwrap_or_else(T::one);
        let use_c = c.is_some() && self.beta != 0.0;
        if let (Some(c), true) = (c, use_c) {
            self.c_init(call, c, out, |v| v * beta);
        }
        let am = if self.trans_a {
            MatRef::transposed(a, m)
        } else {
            MatRef::row_major(a, k)
        };
        let bm = if self.trans_b {
            MatRef::transposed(b, k)
        } else {
            MatRef::row_major(b, n)
        };
        blas::gemm(
            m,
            n,
            k,
            out,
            n,
            use_c,
            am,
            bm,
            alpha,
            m * n * k >= blas::PARALLEL_THRESHOLD,
        )
    }

    /// The f32 product with the fused activation, C broadcast along rows (`[n]`, `[1, n]`)
    /// or columns (`[m, 1]`) and the activation applied in the kernels' epilogue; any
    /// other C is written first and accumulated onto.
    fn run_f32(
        &self,
        call: &GemmCall,
        a: &[f32],
        b: &[f32],
        c: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        let (m, k, n) = (call.m, call.k, call.n);
        let am = if self.trans_a {
            MatRef::transposed(a, m)
        } else {
            MatRef::row_major(a, k)
        };
        let bm = if self.trans_b {
            MatRef::transposed(b, k)
        } else {
            MatRef::row_major(b, n)
        };
        let par = m * n * k >= blas::PARALLEL_THRESHOLD;
        let run = |out: &mut [f32], accumulate: bool, epi: &GemmEpilogue| {
            blas::gemm_epi(m, n, k, out, n, accumulate, am, bm, self.alpha, par, epi)
        };
        let plain = GemmEpilogue {
            act: self.act,
            ..GemmEpilogue::default()
        };
        let c = match c {
            Some(c) if self.beta != 0.0 => c,
            _ => return run(out, false, &plain),
        };
        let cs = call.c.map(|t| t.shape()).unwrap_or(&[]);
        let per_col = matches!(cs, [x] | [1, x] if *x == n);
        let per_row = !per_col && matches!(cs, [x, 1] if *x == m);
        if !per_col && !per_row {
            self.c_init(call, c, out, |v| v * self.beta);
            return run(out, true, &plain);
        }
        let mut with_bias = |bias: &[f32]| {
            let epi = GemmEpilogue {
                row_bias: per_row.then_some(bias),
                col_bias: per_col.then_some(bias),
                ..plain
            };
            run(out, false, &epi)
        };
        if self.beta == 1.0 {
            with_bias(c)
        } else {
            crate::scratch::with_scratch::<f32, _>(c.len(), |scaled| {
                scaled
                    .iter_mut()
                    .zip(c)
                    .for_each(|(s, &v)| *s = v * self.beta);
                with_bias(scaled)
            })
        }
    }

    fn run_int<T: IntElem>(&self, call: &GemmCall, a: &[T], b: &[T], c: Option<&[T]>) -> Vec<T>
    where
        f64: AsPrimitive<T>,
    {
        let (m, k, n) = (call.m, call.k, call.n);
        let mut acc = vec![T::zero(); m * n];
        for i in 0..m {
            for l in 0..k {
                let av = if self.trans_a {
                    a[l * m + i]
                } else {
                    a[i * k + l]
                };
                for j in 0..n {
                    let bv = if self.trans_b {
                        b[j * k + l]
                    } else {
                        b[l * n + j]
                    };
                    acc[i * n + j] = acc[i * n + j].wrapping_add(&av.wrapping_mul(&bv));
                }
            }
        }
        let mut cb = vec![T::zero(); m * n];
        if let Some(c) = c {
            self.c_init(call, c, &mut cb, |v| v);
        }
        let exact = self.alpha == 1.0 && (self.beta == 1.0 || c.is_none());
        acc.iter()
            .zip(&cb)
            .map(|(&p, &cv)| {
                if exact {
                    p.wrapping_add(&cv)
                } else {
                    let cv = if c.is_some() && self.beta != 0.0 {
                        self.beta as f64 * cv.as_()
                    } else {
                        0.0
                    };
                    (self.alpha as f64 * p.as_() + cv).as_()
                }
            })
            .collect()
    }

    fn compute(&self, call: &GemmCall, slot: Option<&mut TensorMut>) -> Result<Option<Tensor>> {
        let shape = [call.m, call.n];
        let len = call.m * call.n;
        let dtype = call.a.dtype();
        match dtype {
            DType::F32 => {
                let c = call.c.map(|c| c.as_slice::<f32>()).transpose()?;
                let (a, b) = (call.a.as_slice::<f32>()?, call.b.as_slice::<f32>()?);
                match slot {
                    Some(slot) => {
                        let out = slot.as_mut_slice::<f32>()?;
                        self.run_f32(call, a, b, c, out)?;
                        Ok(None)
                    }
                    None => {
                        let mut out = vec![0.0f32; len];
                        self.run_f32(call, a, b, c, &mut out)?;
                        Ok(Some(Tensor::from_vec(&shape, out)?))
                    }
                }
            }
            DType::F64 => {
                let c = call.c.map(|c| c.as_slice::<f64>()).transpose()?;
                let mut out = vec![0.0f64; len];
                self.run_float(
                    call,
                    call.a.as_slice::<f64>()?,
                    call.b.as_slice::<f64>()?,
                    c,
                    &mut out,
                )?;
                if self.act != Activation::None {
                    out.iter_mut()
                        .for_each(|v| *v = self.act.apply(*v as f32) as f64);
                }
                Ok(Some(Tensor::from_vec(&shape, out)?))
            }
            d if d.is_float() => {
                let c = call.c.map(as_f32).transpose()?;
                let mut out = vec![0.0f32; len];
                self.run_f32(
                    call,
                    &as_f32(call.a)?,
                    &as_f32(call.b)?,
                    c.as_deref(),
                    &mut out,
                )?;
                Ok(Some(from_f32(d, &shape, out)?))
            }
            d => dispatch_int!(d, T => {
                let c = call.c.map(|c| c.as_slice::<T>()).transpose()?;
                let out = self.run_int::<T>(call, call.a.as_slice::<T>()?, call.b.as_slice::<T>()?, c);
                Ok(Some(Tensor::from_vec(&shape, out)?))
            }, _ => Err(KilnError::kernel("Gemm", format!("unsupported dtype {d}")))),
        }
    }
}

impl Op for Gemm {
    fn op_type(&self) -> &str {
        "Gemm"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let a = inputs.first().copied().flatten();
        let b = inputs.get(1).copied().flatten();
        let dtype = a.and_then(|f| f.dtype).or(b.and_then(|f| f.dtype));
        let dim = |f: Option<&Fact>, i: usize| -> Result<Dim> {
            match f.and_then(|f| f.shape.as_ref()) {
                None => Ok(Dim::Unknown),
                Some(s) if s.len() == 2 => Ok(s[i].clone()),
                Some(s) => Err(infer_err(
                    "Gemm",
                    format!("A and B must be matrices, found rank {}", s.len()),
                )),
            }
        };
        let m = dim(a, if self.trans_a { 1 } else { 0 })?;
        let n = dim(b, if self.trans_b { 0 } else { 1 })?;
        Ok(vec![Fact {
            dtype,
            shape: Some(vec![m, n]),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let call = self.prepare(inputs)?;
        let t = self
            .compute(&call, None)?
            .ok_or_else(|| KilnError::kernel("Gemm", "no output"))?;
        Ok(vec![t.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let call = self.prepare(inputs)?;
        let slot = slot_of(outputs, "Gemm", call.a.dtype(), &[call.m, call.n])?;
        if call.a.dtype() == DType::F32 {
            self.compute(&call, Some(slot))?;
            return Ok(());
        }
        let t = self
            .compute(&call, None)?
            .ok_or_else(|| KilnError::kernel("Gemm", "no output"))?;
        slot.copy_from(&t)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests;
