//! Optimization profiles (TensorRT's `IOptimizationProfile`): for each input with dynamic
//! dimensions, the smallest, the typical ("opt") and the largest shape an engine accepts.
//!
//! An engine with profiles is built with its dynamic dimensions left symbolic (memory is
//! planned per input-shape signature at run time). The opt shape is the one tactics are
//! tuned at; contexts refuse a shape outside the active profile with
//! [`KilnError::ShapeOutsideProfile`].

use std::collections::BTreeMap;

use kiln_core::{Dim, KilnError, Result};
use serde::{Deserialize, Serialize};

use crate::context::IoInfo;

/// Shapes by input name.
pub type ShapeMap = BTreeMap<String, Vec<usize>>;

/// One optimization profile: per input, an inclusive range of shapes and the shape to tune at.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OptimizationProfile {
    /// Smallest shape of each input.
    pub min: ShapeMap,
    /// Shape of each input that tactics are tuned at (`min <= opt <= max`).
    pub opt: ShapeMap,
    /// Largest shape of each input.
    pub max: ShapeMap,
}

/// Which of a profile's three shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileBound {
    /// The smallest shape.
    Min,
    /// The shape tactics are tuned at.
    Opt,
    /// The largest shape.
    Max,
}

impl ProfileBound {
    /// `min`, `opt` or `max`.
    pub fn name(self) -> &'static str {
        match self {
            ProfileBound::Min => "min",
            ProfileBound::Opt => "opt",
            ProfileBound::Max => "max",
        }
    }
}

fn dims(shape: &[usize]) -> String {
    if shape.is_empty() {
        return "scalar".into();
    }
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

impl OptimizationProfile {
    /// A profile from its three shape maps, checking that they name the same inputs with
    /// the same ranks and that `min <= opt <= max` in every dimension.
    pub fn new(min: ShapeMap, opt: ShapeMap, max: ShapeMap) -> Result<OptimizationProfile> {
        let names = |m: &ShapeMap| m.keys().cloned().collect::<Vec<_>>();
        if names(&min) != names(&opt) || names(&min) != names(&max) {
            return Err(KilnError::Other(format!(
                "an optimization profile must give min, opt and max shapes for the same inputs; got min for [{}], opt for [{}], max for [{}]",
                names(&min).join(", "),
                names(&opt).join(", "),
                names(&max).join(", ")
            )));
        }
        for (name, lo) in &min {
            let (mid, hi) = (&opt[name], &max[name]);
            if lo.len() != mid.len() || lo.len() != hi.len() {
                return Err(KilnError::BadInput {
                    name: name.clone(),
                    msg: format!(
                        "optimization profile shapes differ in rank: min {}, opt {}, max {}",
                        dims(lo),
                        dims(mid),
                        dims(hi)
                    ),
                });
            }
            for axis in 0..lo.len() {
                if !(lo[axis] <= mid[axis] && mid[axis] <= hi[axis]) {
                    return Err(KilnError::BadInput {
                        name: name.clone(),
                        msg: format!(
                            "optimization profile needs min <= opt <= max in every dimension; dimension {axis} has min {}, opt {}, max {} (min {}, opt {}, max {})",
                            lo[axis], mid[axis], hi[axis], dims(lo), dims(mid), dims(hi)
                        ),
                    });
                }
            }
        }
        Ok(OptimizationProfile { min, opt, max })
    }

    /// The profile of `--shapes`: min = opt = max.
    pub fn fixed(shapes: &ShapeMap) -> OptimizationProfile {
        OptimizationProfile {
            min: shapes.clone(),
            opt: shapes.clone(),
            max: shapes.clone(),
        }
    }

    /// True when the profile covers `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.min.contains_key(name)
    }

    /// One of the three shapes of `name`, when the profile covers it.
    pub fn shape(&self, name: &str, bound: ProfileBound) -> Option<&[usize]> {
        let map = match bound {
            ProfileBound::Min => &self.min,
            ProfileBound::Opt => &self.opt,
            ProfileBound::Max => &self.max,
        };
        map.get(name).map(|v| v.as_slice())
    }

    /// The shapes tactics are tuned at.
    pub fn opt_shapes(&self) -> &ShapeMap {
        &self.opt
    }

    /// `x: 1x3x64x64 .. 1x3x256x256 (opt 1x3x128x128)`, one input per entry.
    pub fn describe(&self) -> Vec<String> {
        self.min
            .keys()
            .map(|n| {
                format!(
                    "{n}: {} .. {} (opt {})",
                    dims(&self.min[n]),
                    dims(&self.max[n]),
                    dims(&self.opt[n])
                )
            })
            .collect()
    }

    /// Checks a shape for input `name` against this profile (number `index`). Inputs the
    /// profile does not cover are accepted (their fixed dims are checked elsewhere).
    pub fn check(&self, index: usize, name: &str, shape: &[usize]) -> Result<()> {
        let (Some(lo), Some(hi)) = (self.min.get(name), self.max.get(name)) else {
            return Ok(());
        };
        if shape.len() != lo.len() {
            return Err(KilnError::BadInput {
                name: name.to_string(),
                msg: format!(
                    "shape {} has rank {}, but optimization profile {index} gives rank {} ({} .. {})",
                    dims(shape),
                    shape.len(),
                    lo.len(),
                    dims(lo),
                    dims(hi)
                ),
            });
        }
        for (axis, &found) in shape.iter().enumerate() {
            if found < lo[axis] || found > hi[axis] {
                return Err(KilnError::ShapeOutsideProfile {
                    name: name.to_string(),
                    profile: index,
                    axis,
                    min: lo[axis],
                    max: hi[axis],
                    found,
                    context: format!(
                        "profile range {} to {}, shape given {}",
                        dims(lo),
                        dims(hi),
                        dims(shape)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks the profile against an engine's inputs: every name is an input, ranks and
    /// fixed dimensions agree, and (when `require_dynamic`) every input with a dimension the
    /// model leaves open is covered.
    pub fn validate(&self, index: usize, inputs: &[IoInfo], require_dynamic: bool) -> Result<()> {
        for (name, lo) in &self.min {
            let Some(info) = inputs.iter().find(|i| i.name == *name) else {
                let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(KilnError::BadInput {
                    name: name.clone(),
                    msg: format!(
                        "optimization profile {index} names an input the model does not have (its inputs are: {})",
                        names.join(", ")
                    ),
                });
            };
            for bound in [ProfileBound::Min, ProfileBound::Opt, ProfileBound::Max] {
                let shape = self.shape(name, bound).unwrap_or(lo);
                info.check_shape(shape).map_err(|e| match e {
                    KilnError::BadInput { name, msg } => KilnError::BadInput {
                        name,
                        msg: format!(
                            "optimization profile {index}, {} shape: {msg}",
                            bound.name()
                        ),
                    },
                    other => other,
                })?;
            }
        }
        if require_dynamic {
            for info in inputs {
                let dynamic = match &info.shape {
                    Some(d) => d.iter().any(|d| !matches!(d, Dim::Known(_))),
                    None => true,
                };
                if dynamic && info.kind == kiln_core::ValueKind::Tensor && !self.covers(&info.name)
                {
                    return Err(KilnError::BadInput {
                        name: info.name.clone(),
                        msg: format!(
                            "optimization profile {index} gives no shapes for this input, whose dimensions are not all fixed ({}); every profile must cover it",
                            info.describe()
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, s: &[usize]) -> ShapeMap {
        [(name.to_string(), s.to_vec())].into_iter().collect()
    }

    #[test]
    fn new_checks_order_and_names() {
        assert!(OptimizationProfile::new(
            m("x", &[1, 3, 8]),
            m("x", &[2, 3, 8]),
            m("x", &[4, 3, 9])
        )
        .is_ok());
        assert!(
            OptimizationProfile::new(m("x", &[2, 3]), m("x", &[1, 3]), m("x", &[4, 3])).is_err()
        );
        assert!(OptimizationProfile::new(m("x", &[1]), m("y", &[1]), m("x", &[1])).is_err());
        assert!(OptimizationProfile::new(m("x", &[1]), m("x", &[1, 1]), m("x", &[1])).is_err());
    }

    #[test]
    fn check_gives_the_range() {
        let p = OptimizationProfile::new(
            m("x", &[1, 3, 64]),
            m("x", &[1, 3, 96]),
            m("x", &[2, 3, 128]),
        )
        .unwrap();
        p.check(0, "x", &[1, 3, 64]).unwrap();
        p.check(0, "x", &[2, 3, 128]).unwrap();
        p.check(0, "other", &[7]).unwrap();
        let e = p.check(3, "x", &[1, 3, 129]).unwrap_err();
        match &e {
            KilnError::ShapeOutsideProfile {
                name,
                profile,
                axis,
                min,
                max,
                found,
                ..
            } => {
                assert_eq!(
                    (name.as_str(), *profile, *axis, *min, *max, *found),
                    ("x", 3, 2, 64, 128, 129)
                );
            }
            other => panic!("wrong error {other:?}"),
        }
        let text = e.to_string();
        assert!(
            text.contains("64..=128") && text.contains("1x3x64 to 2x3x128"),
            "{text}"
        );
        assert!(p.check(0, "x", &[1, 3]).is_err());
        assert!(p.check(0, "x", &[0, 3, 64]).is_err());
    }
}
