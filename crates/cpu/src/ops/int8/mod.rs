//! INT8 layers: what `kiln build --int8` lowers Conv, MatMul and Gemm to, and the
//! quantize/dequantize reformat layers between the INT8 and FP32 pools.
//!
//! All ops here live in the `kiln` domain and use symmetric quantization: a tensor with
//! scale `s` holds `q = clamp(round(x / s), -127, 127)` and means `q·s` (zero point 0, -128
//! never used). Activations have one scale per tensor, weights one per output channel.
//!
//! - `Int8Conv` (X i8, W i8 `[M, C/group, k...]`, optional B f32 `[M]`) → Y i8: attributes
//!   of Conv plus `x_scale`, `y_scale`, `w_scales` (M floats) and the fused activation.
//! - `Int8MatMul` (A i8 `[..., R, K]`, W i8 `[N, K]` — B transposed —, optional B f32
//!   `[N]`) → Y i8 `[..., R, N]`: same scale attributes.
//! - `Int8Quantize` (`scale`) f32 → i8, `Int8Dequantize` (`scale`) i8 → f32.
//!
//! Both products run the i8 GEMM of [`gemm`] (AVX-512 VNNI, AVX2 or scalar, chosen by the
//! tactic `cpu.int8.<conv|matmul>.<isa>`), accumulate in i32, and requantize in f32:
//! `y = act(acc·x_scale·w_scale[m] + b[m])`, `q = round(y / y_scale)`.
//!
//! **Explicit quantization** (QuantizeLinear/DequantizeLinear models, [`QdqIo`]): with the
//! attributes `x_zero_point`, `y_zero_point` and `y_dtype`, the products also take the
//! ONNX form — X u8 or i8 with a zero point (`x = (q − zp)·x_scale`), Y u8, i8 (saturated
//! to the type's full range, zero point added after rounding half to even, as
//! QuantizeLinear does) or f32 (no requantization). An input zero point is compensated in
//! the i32 sums (`Σ w·(a − z) = Σ w·a − z·Σ w`; convolution padding is filled with `z`, the
//! value meaning 0), which is exact. u8 inputs are read as `q − 128` (i8, exact), so
//! activations reach −128: only the VNNI and scalar GEMMs take that (the AVX2 one needs
//! ±127), so this form refuses AVX2 tactics.

pub mod conv;
pub mod gemm;
pub mod im2col;
pub mod linear;
pub mod matmul;
pub mod qdq;

use kiln_core::{DType, Fact, KilnError, OpDesc, OpRegistry, Precision, Result, Tactic};

use crate::fused::KILN_DOMAIN;
use gemm::Isa;

/// Attribute: the input activation's scale.
pub const X_SCALE: &str = "x_scale";
/// Attribute: the output activation's scale.
pub const Y_SCALE: &str = "y_scale";
/// Attribute: per-output-channel weight scales.
pub const W_SCALES: &str = "w_scales";
/// Attribute (explicit quantization): the input's zero point, in the input's own type.
pub const X_ZERO_POINT: &str = "x_zero_point";
/// Attribute (explicit quantization): the output's zero point, in the output's type.
pub const Y_ZERO_POINT: &str = "y_zero_point";
/// Attribute (explicit quantization): the output's ONNX type code (1 f32, 2 u8, 3 i8).
pub const Y_DTYPE: &str = "y_dtype";

/// The output of an INT8 product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// Symmetric i8, ±127, no zero point (the calibrated form).
    Sym,
    /// i8 or u8 (`u8`) with a zero point, saturated to the full range.
    Zp {
        /// The output is u8.
        u8: bool,
        /// The zero point, in the output's type.
        zp: i32,
    },
    /// f32: `act(acc·x_scale·w_scale + b)` without requantization.
    F32,
}

/// The input/output form of an INT8 product: symmetric (calibrated) or ONNX Q/DQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QdqIo {
    /// True when any explicit-quantization attribute is present (the input may then be u8
    /// and hold −128 after the shift, so AVX2 is refused).
    pub explicit: bool,
    /// The input zero point, in the input's type (checked against it at run time).
    pub x_zp: i32,
    /// The output form.
    pub out: OutKind,
}

impl QdqIo {
    /// Reads the explicit-quantization attributes (none: the symmetric form).
    pub fn from_attrs(a: &kiln_core::AttrReader) -> Result<QdqIo> {
        let x_zp = a.opt_int(X_ZERO_POINT)?;
        let y_zp = a.opt_int(Y_ZERO_POINT)?;
        let y_dt = a.opt_int(Y_DTYPE)?;
        let explicit = x_zp.is_some() || y_zp.is_some() || y_dt.is_some();
        let x_zp = x_zp.unwrap_or(0);
        if !(-128..=255).contains(&x_zp) {
            return Err(a.invalid(format!("{X_ZERO_POINT} {x_zp} is not an 8-bit value")));
        }
        let y_zp = y_zp.unwrap_or(0);
        let out = match y_dt {
            None if !explicit => OutKind::Sym,
            None | Some(3) => OutKind::Zp {
                u8: false,
                zp: y_zp as i32,
            },
            Some(2) => OutKind::Zp {
                u8: true,
                zp: y_zp as i32,
            },
            Some(1) => OutKind::F32,
            Some(other) => {
                return Err(a.invalid(format!(
                    "{Y_DTYPE} {other}: expected 1 (float), 2 (uint8) or 3 (int8)"
                )))
            }
        };
        if let OutKind::Zp { u8, zp } = out {
            let ok = if u8 {
                (0..=255).contains(&zp)
            } else {
                (-128..=127).contains(&zp)
            };
            if !ok {
                return Err(a.invalid(format!(
                    "{Y_ZERO_POINT} {zp} is out of range for {}",
                    if u8 { "uint8" } else { "int8" }
                )));
            }
        }
        Ok(QdqIo {
            explicit,
            x_zp: x_zp as i32,
            out,
        })
    }

    /// The output dtype.
    pub fn out_dtype(self) -> DType {
        match self.out {
            OutKind::Sym | OutKind::Zp { u8: false, .. } => DType::I8,
            OutKind::Zp { u8: true, .. } => DType::U8,
            OutKind::F32 => DType::F32,
        }
    }

    /// For an input of `dtype`: the xor mask that maps its bytes to i8 (`0x80` for u8:
    /// `q − 128`) and the zero point in that i8 domain. Errors name `op`.
    pub fn input_domain(self, op: &str, dtype: DType) -> Result<(i8, i32)> {
        match dtype {
            DType::I8 if (-128..=127).contains(&self.x_zp) => Ok((0, self.x_zp)),
            DType::U8 if self.explicit && (0..=255).contains(&self.x_zp) => {
                Ok((i8::MIN, self.x_zp - 128))
            }
            DType::U8 if !self.explicit => Err(KilnError::kernel(
                op,
                "a uint8 input needs the explicit-quantization attributes (x_zero_point)",
            )),
            other => Err(KilnError::kernel(
                op,
                format!(
                    "X must be int8 or uint8 holding its zero point {}, found {other}",
                    self.x_zp
                ),
            )),
        }
    }

    /// The requantization constants of this form (`mul`, `bias` filled by the caller).
    pub(crate) fn requant(self, mul: f32, bias: f32, y_scale: f32) -> Requant {
        let (zp, lo, hi, flip) = match self.out {
            OutKind::Sym | OutKind::F32 => return Requant::sym(mul, bias, 1.0 / y_scale),
            OutKind::Zp { u8: false, zp } => (zp as f32, -128.0, 127.0, 0),
            OutKind::Zp { u8: true, zp } => ((zp - 128) as f32, -128.0, 127.0, i8::MIN),
        };
        Requant {
            mul,
            bias,
            inv_y: 1.0 / y_scale,
            zp,
            lo,
            hi,
            flip,
        }
    }
}

/// Σ over each row of a `rows × k` i8 matrix (for zero-point compensation).
pub fn row_sums(w: &[i8], rows: usize, k: usize) -> Vec<i32> {
    (0..rows)
        .map(|r| w[r * k..(r + 1) * k].iter().map(|&v| v as i32).sum())
        .collect()
}

/// Refuses the AVX2 GEMM for the explicit form (its `sign` trick needs operands in ±127,
/// the explicit form's inputs reach −128).
fn check_isa(a: &kiln_core::AttrReader, io: QdqIo, isa: Isa) -> Result<()> {
    if io.explicit && isa == Isa::Avx2 {
        return Err(a.invalid(
            "the AVX2 INT8 GEMM needs activations in ±127; layers with zero points (explicit quantization) take the vnni or scalar tactic",
        ));
    }
    Ok(())
}

/// The ISA an explicit-quantization layer runs on this CPU: VNNI when present, else the
/// scalar loops (AVX2 cannot take −128, see [`QdqIo`]).
pub fn explicit_isa() -> Isa {
    if Isa::Vnni.available() {
        Isa::Vnni
    } else {
        Isa::Scalar
    }
}

/// Registers the INT8 ops in the `kiln` domain.
pub fn register(reg: &mut OpRegistry) {
    reg.register_in(KILN_DOMAIN, "Int8Conv", conv::build);
    reg.register_in(KILN_DOMAIN, "Int8MatMul", matmul::build);
    reg.register_in(KILN_DOMAIN, "Int8Quantize", qdq::build_quantize);
    reg.register_in(KILN_DOMAIN, "Int8Dequantize", qdq::build_dequantize);
}

/// An INT8 tactic: `cpu.int8.<family>.<isa>`.
fn tactic(family: &str, isa: Isa) -> Tactic {
    Tactic {
        id: format!("cpu.int8.{family}.{}", isa.name()),
        format: kiln_core::Format {
            precision: Precision::Int8,
            layout: kiln_core::Layout::Linear,
        },
        // The scalar loops only ever win on CPUs without SIMD: timed from level 4.
        min_level: if isa == Isa::Scalar { 4 } else { 1 },
    }
}

/// The ISA a tactic id names (`cpu.int8.<family>.<isa>`), refusing one this CPU lacks; a
/// GPU tactic id (`cuda.…`) gets the best ISA available.
pub fn parse_tactic(family: &str, id: &str) -> Result<Isa> {
    if id.starts_with("cuda.") {
        // A GPU layer (`cuda.int8.<family>`): this op only runs as the GPU engine's CPU
        // fallback, with the best kernel this CPU has.
        return Ok(Isa::best());
    }
    let isa = id
        .strip_prefix("cpu.int8.")
        .and_then(|r| r.strip_prefix(family))
        .and_then(|r| r.strip_prefix('.'))
        .and_then(Isa::parse)
        .ok_or_else(|| {
            KilnError::Other(format!(
                "unknown INT8 tactic `{id}` (this kiln knows cpu.int8.{family}.<vnni|avx2|scalar>); rebuild the plan with this kiln"
            ))
        })?;
    if !isa.available() {
        return Err(KilnError::Other(format!(
            "INT8 tactic `{id}` needs {} instructions, which this CPU does not have; rebuild the plan on this machine",
            isa.name()
        )));
    }
    Ok(isa)
}

/// The INT8 tactics an FP32 Conv/MatMul/Gemm node could be lowered to, for these input
/// facts (weights must be constants; the caller checks that scales exist). Depthwise and
/// narrow convolutions (fewer than 4 output channels per group) get none: their
/// reduction is too short for the i8 GEMM.
pub fn tactics_for(desc: &OpDesc, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
    let family = match desc.op_type.as_str() {
        "Conv" if conv::lowerable(desc, inputs) => "conv",
        "MatMul" | "Gemm" if matmul::lowerable(desc, inputs) => "matmul",
        _ => return Vec::new(),
    };
    Isa::ALL
        .into_iter()
        .filter(|i| i.available())
        .map(|i| tactic(family, i))
        .collect()
}

/// Quantizes one value: `clamp(round(x / scale), -127, 127)` given `inv = 1 / scale`,
/// rounding half to even as QuantizeLinear does. (Adding and subtracting 1.5·2^23 rounds a
/// clamped value to an integer in the FPU's default mode without a libm call, so loops
/// over it vectorize; NaN becomes 0.)
#[inline(always)]
pub fn quantize_one(x: f32, inv: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let c = (x * inv).clamp(-127.0, 127.0);
    ((c + MAGIC) - MAGIC) as i8
}

/// Quantizes one value with a zero point: `clamp(round(x / scale) + zp, lo, hi)` (all in
/// the i8 domain; rounding half to even before the zero point is added, as
/// QuantizeLinear does), then `^ flip` (`0x80` turns the i8 domain into u8 bytes).
#[inline(always)]
pub fn quantize_zp(x: f32, inv: f32, zp: f32, lo: f32, hi: f32, flip: i8) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let c = (x * inv).clamp(-4_194_304.0, 4_194_304.0);
    (((c + MAGIC) - MAGIC) + zp).clamp(lo, hi) as i8 ^ flip
}

/// Requantizes one row of accumulators: `out[t] = q(act(acc[t]·mul + bias))`, with the
/// best SIMD build of the loops this CPU has.
pub(crate) fn requant_row(
    acc: &[i32],
    q: Requant,
    act: crate::fused::Activation,
    tmp: &mut [f32],
    out: &mut [i8],
) {
    act_row(acc, q, act, tmp);
    let (tmp, out) = (&tmp[..acc.len()], &mut out[..acc.len()]);
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::linalg::sgemm::Isa as F32Isa;
        match F32Isa::detect() {
            // SAFETY: the CPU has these features (run-time detection).
            F32Isa::Avx512 => return unsafe { quantize_row_avx512(tmp, q, out) },
            // SAFETY: as above.
            F32Isa::Avx2 => return unsafe { quantize_row_avx2(tmp, q, out) },
            _ => {}
        }
    }
    quantize_row_body(tmp, q, out)
}

/// [`quantize_row_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn quantize_row_avx512(v: &[f32], q: Requant, out: &mut [i8]) {
    quantize_row_body(v, q, out)
}

/// [`quantize_row_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(v: &[f32], q: Requant, out: &mut [i8]) {
    quantize_row_body(v, q, out)
}

/// `out[t] = quantize(v[t])` in `q`'s form: the arithmetic of [`quantize_one`] /
/// [`quantize_zp`] (NaN → 0), written so that the compiler vectorises it per build (the
/// saturating `f32 as i8` of those helpers turns the loop scalar).
#[inline(always)]
fn quantize_row_body(v: &[f32], q: Requant, out: &mut [i8]) {
    const MAGIC: f32 = 12_582_912.0;
    let (lo, hi, zp, flip) = if q.is_sym() {
        (-127.0f32, 127.0f32, 0.0f32, 0i8)
    } else {
        (q.lo, q.hi, q.zp, q.flip)
    };
    for (d, &x) in out.iter_mut().zip(v) {
        let c = (x * q.inv_y).clamp(-4_194_304.0, 4_194_304.0);
        let r = (((c + MAGIC) - MAGIC) + zp).clamp(lo, hi);
        let r = if r.is_nan() { 0.0 } else { r };
        // SAFETY: `r` is finite and within [lo, hi] ⊂ [-128, 127] (NaN was replaced).
        let i = unsafe { r.to_int_unchecked::<i32>() };
        *d = i as i8 ^ flip;
    }
}

/// `tmp[t] = act(acc[t]·mul + bias)` (the f32 result before requantization).
pub(crate) fn act_row(acc: &[i32], q: Requant, act: crate::fused::Activation, tmp: &mut [f32]) {
    let n = acc.len();
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::linalg::sgemm::Isa as F32Isa;
        match F32Isa::detect() {
            // SAFETY: the CPU has these features (run-time detection).
            F32Isa::Avx512 => unsafe { scale_row_avx512(acc, q.mul, &mut tmp[..n]) },
            // SAFETY: as above.
            F32Isa::Avx2 => unsafe { scale_row_avx2(acc, q.mul, &mut tmp[..n]) },
            _ => scale_row_body(acc, q.mul, &mut tmp[..n]),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    scale_row_body(acc, q.mul, &mut tmp[..n]);
    crate::ops::conv::kernel::epilogue(&mut tmp[..n], q.bias, act);
}

/// [`scale_row_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scale_row_avx512(acc: &[i32], mul: f32, out: &mut [f32]) {
    scale_row_body(acc, mul, out)
}

/// [`scale_row_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_row_avx2(acc: &[i32], mul: f32, out: &mut [f32]) {
    scale_row_body(acc, mul, out)
}

/// `out[t] = acc[t] as f32 · mul`.
#[inline(always)]
fn scale_row_body(acc: &[i32], mul: f32, out: &mut [f32]) {
    for (v, &a) in out.iter_mut().zip(acc) {
        *v = a as f32 * mul;
    }
}

/// Symmetric per-row quantization of a weight matrix (`rows × cols` f32): returns the i8
/// values and one scale per row (`amax / 127`; rows of zeros get scale 1).
pub fn quantize_rows(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; rows * cols];
    let mut scales = vec![1.0f32; rows];
    for r in 0..rows {
        let src = &w[r * cols..(r + 1) * cols];
        let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 && amax.is_finite() {
            scales[r] = amax / 127.0;
        }
        let inv = 1.0 / scales[r];
        for (d, &v) in q[r * cols..(r + 1) * cols].iter_mut().zip(src) {
            *d = quantize_one(v, inv);
        }
    }
    (q, scales)
}

/// Shared by the INT8 products: requantizes one accumulator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Requant {
    /// `x_scale · w_scale[m]`.
    pub mul: f32,
    /// Bias of the channel (f32).
    pub bias: f32,
    /// `1 / y_scale`.
    pub inv_y: f32,
    /// Output zero point in the i8 domain (0 for the symmetric form).
    pub zp: f32,
    /// Smallest output value in the i8 domain (−127 symmetric, −128 explicit).
    pub lo: f32,
    /// Largest output value in the i8 domain.
    pub hi: f32,
    /// Xor applied to the stored byte (`i8::MIN`: u8 output).
    pub flip: i8,
}

impl Requant {
    /// The symmetric form's constants.
    pub fn sym(mul: f32, bias: f32, inv_y: f32) -> Requant {
        Requant {
            mul,
            bias,
            inv_y,
            zp: 0.0,
            lo: -127.0,
            hi: 127.0,
            flip: 0,
        }
    }

    /// True for the symmetric form (the fast `quantize_one` path).
    #[inline(always)]
    pub fn is_sym(self) -> bool {
        self.zp == 0.0 && self.lo == -127.0 && self.flip == 0
    }

    /// The same arithmetic as [`requant_row`], for one value.
    #[inline(always)]
    pub fn apply(self, acc: i32, act: crate::fused::Activation) -> i8 {
        let v = self.apply_f32(acc, act);
        if self.is_sym() {
            quantize_one(v, self.inv_y)
        } else {
            quantize_zp(v, self.inv_y, self.zp, self.lo, self.hi, self.flip)
        }
    }

    /// `act(acc·mul + bias)` before requantization.
    #[inline(always)]
    pub fn apply_f32(self, acc: i32, act: crate::fused::Activation) -> f32 {
        let mut v = [acc as f32 * self.mul];
        crate::ops::conv::kernel::epilogue(&mut v, self.bias, act);
        v[0]
    }
}

/// A raw output pointer shared by parallel tiles that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut i8);
impl OutPtr {
    /// The pointer `i` elements further (a method, so closures capture the whole wrapper).
    pub fn at(self, i: usize) -> *mut i8 {
        self.0.wrapping_add(i)
    }
}

// SAFETY: tiles write disjoint indices (each caller documents why), so sharing the pointer
// between rayon tasks cannot race.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// [`OutPtr`] for f32 outputs (explicit quantization without a trailing QuantizeLinear).
#[derive(Clone, Copy)]
pub(crate) struct OutPtrF(pub *mut f32);
impl OutPtrF {
    /// The pointer `i` elements further.
    pub fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

// SAFETY: as for OutPtr: tiles write disjoint indices.
unsafe impl Send for OutPtrF {}
// SAFETY: as above.
unsafe impl Sync for OutPtrF {}

/// Where an INT8 product writes: i8/u8 bytes (u8 stored as their bit pattern, the
/// requantization already flipped them) or f32.
pub(crate) enum OutBuf<'a> {
    /// i8 or u8 output bytes.
    Bytes(&'a mut [i8]),
    /// f32 output.
    F32(&'a mut [f32]),
}

impl OutBuf<'_> {
    /// Number of elements.
    pub fn count(&self) -> usize {
        match self {
            OutBuf::Bytes(b) => b.len(),
            OutBuf::F32(f) => f.len(),
        }
    }
}

/// The output slot of an explicit or symmetric INT8 layer, checked against the shape and
/// dtype it computes.
fn output_slot<'a>(
    op: &str,
    outputs: &'a mut [kiln_core::TensorMut<'_>],
    shape: &[usize],
    dtype: DType,
) -> Result<OutBuf<'a>> {
    let slot = crate::ops::linalg::slot_of(outputs, op, dtype, shape)?;
    Ok(match dtype {
        DType::F32 => OutBuf::F32(slot.as_mut_slice::<f32>()?),
        _ => OutBuf::Bytes(bytemuck::cast_slice_mut(slot.bytes_mut())),
    })
}

/// A fresh output tensor's storage for `eval` and the tensor made from it afterwards.
fn new_output(dtype: DType, len: usize) -> (Vec<i8>, Vec<f32>) {
    if dtype == DType::F32 {
        (Vec::new(), vec![0.0; len])
    } else {
        (vec![0; len], Vec::new())
    }
}

/// The tensor `eval` returns from [`new_output`]'s storage.
fn output_tensor(
    dtype: DType,
    shape: &[usize],
    b: Vec<i8>,
    f: Vec<f32>,
) -> Result<kiln_core::Tensor> {
    match dtype {
        DType::F32 => kiln_core::Tensor::from_vec(shape, f),
        DType::U8 => kiln_core::Tensor::from_vec(shape, b.into_iter().map(|v| v as u8).collect()),
        _ => kiln_core::Tensor::from_vec(shape, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tactic_ids_parse_back() {
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let t = tactic("conv", isa);
            assert_eq!(parse_tactic("conv", &t.id).unwrap(), isa);
            assert!(parse_tactic("matmul", &t.id).is_err());
        }
        // GPU INT8 layers (`cuda.int8.<family>`) run on the CPU only as fallbacks: best ISA.
        assert_eq!(parse_tactic("conv", "cuda.int8.conv").unwrap(), Isa::best());
        let e = parse_tactic("conv", "cpu.int8.conv.neon").unwrap_err();
        assert!(e.to_string().contains("unknown INT8 tactic"), "{e}");
    }

    #[test]
    fn row_quantization() {
        let w = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -0.01];
        let (q, s) = quantize_rows(&w, 3, 3);
        assert_eq!(s[0], 1.0 / 127.0);
        assert_eq!(&q[0..3], &[64, -127, 32]);
        assert_eq!(s[1], 1.0);
        assert_eq!(&q[3..6], &[0, 0, 0]);
        assert_eq!(&q[6..9], &[127, 64, -1]);
        assert_eq!(quantize_one(1e9, 1.0), 127);
        assert_eq!(quantize_one(-1e9, 1.0), -127);
    }

    /// Every build of the row requantization gives `Requant::apply`'s bytes: random values
    /// over 3× the range, exact ties, NaN and infinities, symmetric and zero-point forms.
    #[test]
    fn requant_rows_match_the_scalar_form() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let io_forms = [
            OutKind::Sym,
            OutKind::Zp { u8: true, zp: 37 },
            OutKind::Zp { u8: false, zp: -9 },
            OutKind::Zp { u8: true, zp: 255 },
        ];
        for (fi, out) in io_forms.into_iter().enumerate() {
            let io = QdqIo {
                explicit: fi > 0,
                x_zp: 0,
                out,
            };
            let q = io.requant(0.01 + fi as f32 * 0.003, -0.3, 0.05);
            for n in [1usize, 7, 16, 33, 128] {
                let acc: Vec<i32> = (0..n)
                    .map(|i| match i % 5 {
                        // ties of the requantized value: (k + ½)·y_scale
                        0 => ((((next() % 200) as f32 - 100.0 + 0.5) * 0.05 + 0.3) / q.mul) as i32,
                        _ => (next() % 40_001) as i32 - 20_000,
                    })
                    .collect();
                let act = crate::fused::Activation::None;
                let want: Vec<i8> = acc.iter().map(|&a| q.apply(a, act)).collect();
                let mut tmp = vec![0f32; n];
                let mut got = vec![0i8; n];
                requant_row(&acc, q, act, &mut tmp, &mut got);
                assert_eq!(got, want, "form {fi} n {n}");
                let mut vals = tmp.clone();
                vals[0] = f32::NAN;
                if n > 2 {
                    vals[1] = f32::INFINITY;
                    vals[2] = f32::NEG_INFINITY;
                }
                let scalar: Vec<i8> = vals
                    .iter()
                    .map(|&v| {
                        if q.is_sym() {
                            quantize_one(v, q.inv_y)
                        } else {
                            quantize_zp(v, q.inv_y, q.zp, q.lo, q.hi, q.flip)
                        }
                    })
                    .collect();
                let mut body = vec![0i8; n];
                quantize_row_body(&vals, q, &mut body);
                assert_eq!(body, scalar, "portable build, form {fi} n {n}");
            }
        }
    }
}
