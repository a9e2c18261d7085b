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

pub mod conv;
pub mod gemm;
pub mod matmul;
pub mod qdq;

use kiln_core::{Fact, KilnError, OpDesc, OpRegistry, Precision, Result, Tactic};

use crate::fused::KILN_DOMAIN;
use gemm::Isa;

/// Attribute: the input activation's scale.
pub const X_SCALE: &str = "x_scale";
/// Attribute: the output activation's scale.
pub const Y_SCALE: &str = "y_scale";
/// Attribute: per-output-channel weight scales.
pub const W_SCALES: &str = "w_scales";

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

/// Requantizes one row of accumulators: `out[t] = q(act(acc[t]·mul + bias))`.
pub(crate) fn requant_row(
    acc: &[i32],
    q: Requant,
    act: crate::fused::Activation,
    tmp: &mut [f32],
    out: &mut [i8],
) {
    let n = acc.len();
    for (v, &a) in tmp[..n].iter_mut().zip(acc) {
        *v = a as f32 * q.mul;
    }
    crate::ops::conv::kernel::epilogue(&mut tmp[..n], q.bias, act);
    for (d, &v) in out[..n].iter_mut().zip(&tmp[..n]) {
        *d = quantize_one(v, q.inv_y);
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
}

impl Requant {
    /// The same arithmetic as [`requant_row`], for one value.
    #[inline(always)]
    pub fn apply(self, acc: i32, act: crate::fused::Activation) -> i8 {
        let mut v = [acc as f32 * self.mul];
        crate::ops::conv::kernel::epilogue(&mut v, self.bias, act);
        quantize_one(v[0], self.inv_y)
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

/// The i8 output slot of an INT8 layer, checked against the shape it computes.
fn i8_output_slot<'a>(
    op: &str,
    outputs: &'a mut [kiln_core::TensorMut<'_>],
    shape: &[usize],
) -> Result<&'a mut [i8]> {
    let slot = outputs
        .first_mut()
        .ok_or_else(|| KilnError::kernel(op, "no output slot"))?;
    if slot.shape() != shape || slot.dtype() != kiln_core::DType::I8 {
        return Err(KilnError::kernel(
            op,
            format!(
                "output slot is {} {:?}, expected i8 {shape:?}",
                slot.dtype(),
                slot.shape()
            ),
        ));
    }
    slot.as_mut_slice::<i8>()
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
}
