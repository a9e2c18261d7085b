//! The reformat layers between the FP32 and INT8 pools: `kiln.Int8Quantize` (f32 → i8,
//! `clamp(round(x / scale), -127, 127)`) and `kiln.Int8Dequantize` (i8 → f32, `q·scale`).

use kiln_core::{
    input_tensor, BuildCtx, DType, Fact, KilnError, Op, Result, Tensor, TensorMut, Value,
};

use super::conv::scale_attr;
use super::quantize_one;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// f32 → i8 with one scale.
pub fn quantize(src: &[f32], scale: f32, dst: &mut [i8]) {
    let inv = 1.0 / scale;
    crate::parallel::for_each_chunk_pair(dst, src, CHUNK, |d, s| {
        d.iter_mut()
            .zip(s)
            .for_each(|(d, &x)| *d = quantize_one(x, inv))
    });
}

/// i8 → f32 with one scale.
pub fn dequantize(src: &[i8], scale: f32, dst: &mut [f32]) {
    crate::parallel::for_each_chunk_pair(dst, src, CHUNK, |d, s| {
        d.iter_mut()
            .zip(s)
            .for_each(|(d, &q)| *d = q as f32 * scale)
    });
}

/// Quantize (`to_int8`) or dequantize.
#[derive(Debug, Clone)]
pub struct Int8Reformat {
    scale: f32,
    to_int8: bool,
}

/// Builds `kiln.Int8Quantize`.
pub fn build_quantize(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Int8Reformat {
        scale: scale_attr(&ctx.attrs(), "scale")?,
        to_int8: true,
    }))
}

/// Builds `kiln.Int8Dequantize`.
pub fn build_dequantize(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Int8Reformat {
        scale: scale_attr(&ctx.attrs(), "scale")?,
        to_int8: false,
    }))
}

impl Int8Reformat {
    fn name(&self) -> &'static str {
        if self.to_int8 {
            "Int8Quantize"
        } else {
            "Int8Dequantize"
        }
    }

    fn types(&self) -> (DType, DType) {
        if self.to_int8 {
            (DType::F32, DType::I8)
        } else {
            (DType::I8, DType::F32)
        }
    }
}

impl Op for Int8Reformat {
    fn op_type(&self) -> &str {
        self.name()
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        Ok(vec![Fact {
            dtype: Some(self.types().1),
            shape: x.and_then(|f| f.shape.clone()),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name())?;
        let (from, _) = self.types();
        if x.dtype() != from {
            return Err(KilnError::kernel(
                self.name(),
                format!("expected a {from} input, found {}", x.dtype()),
            ));
        }
        let out = if self.to_int8 {
            let mut q = vec![0i8; x.len()];
            quantize(x.as_slice::<f32>()?, self.scale, &mut q);
            Tensor::from_vec(x.shape(), q)?
        } else {
            let mut f = vec![0f32; x.len()];
            dequantize(x.as_slice::<i8>()?, self.scale, &mut f);
            Tensor::from_vec(x.shape(), f)?
        };
        Ok(vec![out.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name())?;
        let (from, to) = self.types();
        let slot = outputs
            .first_mut()
            .ok_or_else(|| KilnError::kernel(self.name(), "no output slot"))?;
        if x.dtype() != from || slot.dtype() != to || slot.shape() != x.shape() {
            return Err(KilnError::kernel(
                self.name(),
                format!(
                    "expected {from} in and {to} out of one shape, found {} {:?} → {} {:?}",
                    x.dtype(),
                    x.shape(),
                    slot.dtype(),
                    slot.shape()
                ),
            ));
        }
        if self.to_int8 {
            quantize(x.as_slice::<f32>()?, self.scale, slot.as_mut_slice::<i8>()?);
        } else {
            dequantize(x.as_slice::<i8>()?, self.scale, slot.as_mut_slice::<f32>()?);
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

    #[test]
    fn round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..100_001)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .collect();
        let mut q = vec![0i8; x.len()];
        quantize(&x, 0.02, &mut q);
        let mut back = vec![0f32; x.len()];
        dequantize(&q, 0.02, &mut back);
        for (a, b) in x.iter().zip(&back) {
            let clipped = a.clamp(-127.0 * 0.02, 127.0 * 0.02);
            assert!((clipped - b).abs() <= 0.01 + 1e-6, "{a} → {b}");
        }
        assert!(q.iter().all(|&v| v >= -127));
        assert!(q.contains(&127) && q.contains(&-127));
    }
}
