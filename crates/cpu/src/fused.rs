//! Activations that optimisation passes fuse into the epilogue of Conv, Gemm and MatMul.
//!
//! A fused node keeps its op type but moves to the `kiln` domain and carries two extra
//! attributes: `kiln_activation` (the name below) and `kiln_activation_params` (floats).

use kiln_core::{Attr, AttrReader, KilnError, OpDesc, Result};

/// Attribute holding the fused activation's name.
pub const ACTIVATION_ATTR: &str = "kiln_activation";
/// Attribute holding the fused activation's parameters.
pub const ACTIVATION_PARAMS_ATTR: &str = "kiln_activation_params";
/// Domain of kiln's fused ops.
pub const KILN_DOMAIN: &str = "kiln";

/// An activation applied elementwise to a layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// max(x, 0).
    Relu,
    /// min(max(x, lo), hi).
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// max(0, min(1, alpha·x + beta)).
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// x · max(0, min(1, x/6 + 1/2)).
    HardSwish,
    /// x · sigmoid(x) (SiLU).
    Swish,
    /// x if x ≥ 0 else alpha·x.
    LeakyRelu {
        /// Negative slope.
        alpha: f32,
    },
    /// tanh(x).
    Tanh,
}

impl Activation {
    /// Applies the activation to one value.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Relu => x.max(0.0),
            Activation::Clip { min, max } => x.max(min).min(max),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Activation::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Activation::Swish => x / (1.0 + (-x).exp()),
            Activation::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
            Activation::Tanh => x.tanh(),
        }
    }

    /// Applies the activation in place.
    pub fn apply_slice(self, xs: &mut [f32]) {
        if self == Activation::None {
            return;
        }
        for x in xs {
            *x = self.apply(*x);
        }
    }

    /// Name and parameters, as stored in the fused node's attributes.
    pub fn to_parts(self) -> (&'static str, Vec<f32>) {
        match self {
            Activation::None => ("None", vec![]),
            Activation::Relu => ("Relu", vec![]),
            Activation::Clip { min, max } => ("Clip", vec![min, max]),
            Activation::Sigmoid => ("Sigmoid", vec![]),
            Activation::HardSigmoid { alpha, beta } => ("HardSigmoid", vec![alpha, beta]),
            Activation::HardSwish => ("HardSwish", vec![]),
            Activation::Swish => ("Swish", vec![]),
            Activation::LeakyRelu { alpha } => ("LeakyRelu", vec![alpha]),
            Activation::Tanh => ("Tanh", vec![]),
        }
    }

    /// Parses name and parameters.
    pub fn from_parts(name: &str, p: &[f32]) -> Result<Activation> {
        let need = |n: usize| -> Result<()> {
            if p.len() == n {
                Ok(())
            } else {
                Err(KilnError::Other(format!(
                    "fused activation {name} takes {n} parameters, got {}",
                    p.len()
                )))
            }
        };
        Ok(match name {
            "None" => Activation::None,
            "Relu" => Activation::Relu,
            "Clip" => {
                need(2)?;
                Activation::Clip {
                    min: p[0],
                    max: p[1],
                }
            }
            "Sigmoid" => Activation::Sigmoid,
            "HardSigmoid" => {
                need(2)?;
                Activation::HardSigmoid {
                    alpha: p[0],
                    beta: p[1],
                }
            }
            "HardSwish" => Activation::HardSwish,
            "Swish" => Activation::Swish,
            "LeakyRelu" => {
                need(1)?;
                Activation::LeakyRelu { alpha: p[0] }
            }
            "Tanh" => Activation::Tanh,
            other => {
                return Err(KilnError::Other(format!(
                    "unknown fused activation {other}"
                )))
            }
        })
    }

    /// Reads the fused activation from a node's attributes (None when absent).
    pub fn from_attrs(attrs: &AttrReader) -> Result<Activation> {
        match attrs.opt_string(ACTIVATION_ATTR)? {
            None => Ok(Activation::None),
            Some(name) => {
                let params = attrs
                    .opt_floats(ACTIVATION_PARAMS_ATTR)?
                    .unwrap_or_default();
                Activation::from_parts(&name, &params).map_err(|e| attrs.invalid(e.to_string()))
            }
        }
    }

    /// Writes the activation into an op description and moves it to the kiln domain.
    pub fn write_to(self, desc: &mut OpDesc) {
        let (name, params) = self.to_parts();
        desc.domain = KILN_DOMAIN.to_string();
        desc.attrs
            .insert(ACTIVATION_ATTR.into(), Attr::String(name.into()));
        desc.attrs
            .insert(ACTIVATION_PARAMS_ATTR.into(), Attr::Floats(params));
    }
}
