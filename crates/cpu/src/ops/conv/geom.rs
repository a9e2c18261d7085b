//! Window geometry shared by Conv, ConvTranspose and the pooling ops: attribute parsing
//! (`auto_pad`, `pads`, `strides`, `dilations`, `kernel_shape`) and output sizes.

use kiln_core::{AttrReader, Dim, KilnError, Result, Shape};

/// The `auto_pad` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoPad {
    /// Explicit `pads` (default).
    #[default]
    NotSet,
    /// Output = ceil(in / stride); extra padding at the end.
    SameUpper,
    /// Output = ceil(in / stride); extra padding at the beginning.
    SameLower,
    /// No padding.
    Valid,
}

impl AutoPad {
    /// Reads `auto_pad` from a node's attributes.
    pub fn parse(attrs: &AttrReader) -> Result<AutoPad> {
        match attrs.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" | "" => Ok(AutoPad::NotSet),
            "SAME_UPPER" => Ok(AutoPad::SameUpper),
            "SAME_LOWER" => Ok(AutoPad::SameLower),
            "VALID" => Ok(AutoPad::Valid),
            other => Err(attrs.invalid(format!("unknown auto_pad {other:?}"))),
        }
    }
}

/// Window attributes as written on the node (resolved against an input shape later).
#[derive(Debug, Clone, Default)]
pub struct WindowAttrs {
    /// `auto_pad`.
    pub auto_pad: AutoPad,
    /// `kernel_shape`, when given.
    pub kernel_shape: Option<Vec<usize>>,
    /// `strides`, when given.
    pub strides: Option<Vec<usize>>,
    /// `dilations`, when given.
    pub dilations: Option<Vec<usize>>,
    /// `pads` (begin values then end values), when given.
    pub pads: Option<Vec<usize>>,
    /// `ceil_mode` (pooling only).
    pub ceil_mode: bool,
}

fn positive_list(attrs: &AttrReader, name: &str) -> Result<Option<Vec<usize>>> {
    match attrs.opt_ints(name)? {
        None => Ok(None),
        Some(v) => {
            v.iter()
                .map(|&x| {
                    usize::try_from(x).ok().filter(|&u| u > 0).ok_or_else(|| {
                        attrs.invalid(format!("{name} must be positive, found {v:?}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }
    }
}

impl WindowAttrs {
    /// Parses the window attributes of a node.
    pub fn parse(attrs: &AttrReader) -> Result<WindowAttrs> {
        let pads = match attrs.opt_ints("pads")? {
            None => None,
            Some(v) => Some(
                v.iter()
                    .map(|&x| {
                        usize::try_from(x).map_err(|_| {
                            attrs.invalid(format!("pads must be non-negative, found {v:?}"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        if let Some(p) = &pads {
            if p.len() % 2 != 0 {
                return Err(attrs.invalid(format!("pads must have an even length, found {p:?}")));
            }
        }
        Ok(WindowAttrs {
            auto_pad: AutoPad::parse(attrs)?,
            kernel_shape: positive_list(attrs, "kernel_shape")?,
            strides: positive_list(attrs, "strides")?,
            dilations: positive_list(attrs, "dilations")?,
            pads,
            ceil_mode: attrs.int("ceil_mode", 0)? != 0,
        })
    }

    fn list(
        &self,
        op: &str,
        name: &str,
        v: &Option<Vec<usize>>,
        n: usize,
        default: usize,
    ) -> Result<Shape> {
        match v {
            None => Ok(smallvec::smallvec![default; n]),
            Some(v) if v.len() == n => Ok(v.as_slice().into()),
            Some(v) => Err(KilnError::kernel(
                op,
                format!("{name} {v:?} should have {n} values (one per spatial dim)"),
            )),
        }
    }

    /// Resolves strides, dilations, pads and the output size for a spatial input shape and
    /// kernel shape.
    pub fn resolve(&self, op: &str, input: &[usize], kernel: &[usize]) -> Result<Spatial> {
        let n = input.len();
        if kernel.len() != n {
            return Err(KilnError::kernel(
                op,
                format!("kernel shape {kernel:?} does not match {n} spatial dims"),
            ));
        }
        let strides = self.list(op, "strides", &self.strides, n, 1)?;
        let dilations = self.list(op, "dilations", &self.dilations, n, 1)?;
        let pads: Shape = match &self.pads {
            None => smallvec::smallvec![0; 2 * n],
            Some(p) if p.len() == 2 * n => p.as_slice().into(),
            Some(p) => {
                return Err(KilnError::kernel(
                    op,
                    format!("pads {p:?} should have {} values", 2 * n),
                ))
            }
        };
        let mut sp = Spatial {
            input: input.into(),
            kernel: kernel.into(),
            strides,
            dilations,
            pad_begin: smallvec::smallvec![0; n],
            pad_end: smallvec::smallvec![0; n],
            output: smallvec::smallvec![0; n],
        };
        for i in 0..n {
            let (inp, k, s, d) = (
                input[i] as i128,
                kernel[i] as i128,
                sp.strides[i] as i128,
                sp.dilations[i] as i128,
            );
            let eff = (k - 1) * d + 1;
            let (pb, pe, out) = match self.auto_pad {
                AutoPad::SameUpper | AutoPad::SameLower => {
                    let out = (inp + s - 1) / s;
                    let total = ((out - 1) * s + eff - inp).max(0);
                    let small = total / 2;
                    if self.auto_pad == AutoPad::SameUpper {
                        (small, total - small, out)
                    } else {
                        (total - small, small, out)
                    }
                }
                AutoPad::Valid => {
                    if inp < eff {
                        return Err(KilnError::kernel(op, format!("input size {inp} is smaller than the dilated kernel {eff} in spatial dim {i}")));
                    }
                    (0, 0, (inp - eff) / s + 1)
                }
                AutoPad::NotSet => {
                    let (pb, pe) = (pads[i] as i128, pads[i + n] as i128);
                    let span = inp + pb + pe - eff;
                    if span < 0 {
                        return Err(KilnError::kernel(
                            op,
                            format!("padded input size {} is smaller than the dilated kernel {eff} in spatial dim {i}", inp + pb + pe),
                        ));
                    }
                    let mut out = if self.ceil_mode {
                        (span + s - 1) / s + 1
                    } else {
                        span / s + 1
                    };
                    if self.ceil_mode && (out - 1) * s >= inp + pb {
                        out -= 1;
                    }
                    (pb, pe, out)
                }
            };
            let conv = |v: i128| {
                usize::try_from(v)
                    .map_err(|_| KilnError::kernel(op, format!("window size overflow in dim {i}")))
            };
            sp.pad_begin[i] = conv(pb)?;
            sp.pad_end[i] = conv(pe)?;
            sp.output[i] = conv(out)?;
        }
        Ok(sp)
    }

    /// Output spatial dims for symbolic input dims (unknown where an input dim is unknown).
    pub fn resolve_dims(&self, op: &str, input: &[Dim], kernel: &[usize]) -> Result<Vec<Dim>> {
        if let Some(concrete) = input.iter().map(|d| d.known()).collect::<Option<Vec<_>>>() {
            return Ok(self
                .resolve(op, &concrete, kernel)?
                .output
                .into_iter()
                .map(Dim::Known)
                .collect());
        }
        // Each dim only depends on its own input size: probe unknown dims with a size large
        // enough for any kernel, then forget them.
        let probe: Vec<usize> = input.iter().map(|d| d.known().unwrap_or(1 << 30)).collect();
        let sp = self.resolve(op, &probe, kernel)?;
        Ok(input
            .iter()
            .zip(sp.output)
            .map(|(d, o)| {
                if d.known().is_some() {
                    Dim::Known(o)
                } else {
                    Dim::Unknown
                }
            })
            .collect())
    }
}

/// Window parameters resolved for one input shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spatial {
    /// Input spatial sizes.
    pub input: Shape,
    /// Kernel sizes.
    pub kernel: Shape,
    /// Strides.
    pub strides: Shape,
    /// Dilations.
    pub dilations: Shape,
    /// Padding before each dim.
    pub pad_begin: Shape,
    /// Padding after each dim.
    pub pad_end: Shape,
    /// Output spatial sizes.
    pub output: Shape,
}

/// Spatial parameters padded in front to exactly 3 dims (D, H, W), so kernels are written
/// once for 1-D, 2-D and 3-D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spatial3 {
    /// Input sizes.
    pub input: [usize; 3],
    /// Kernel sizes.
    pub kernel: [usize; 3],
    /// Strides.
    pub strides: [usize; 3],
    /// Dilations.
    pub dilations: [usize; 3],
    /// Padding before.
    pub pad_begin: [usize; 3],
    /// Output sizes.
    pub output: [usize; 3],
}

fn to3(v: &[usize], fill: usize) -> [usize; 3] {
    let mut a = [fill; 3];
    let off = 3 - v.len();
    a[off..].copy_from_slice(v);
    a
}

impl Spatial {
    /// The 3-D form; errors for more than 3 spatial dims.
    pub fn to3(&self, op: &str) -> Result<Spatial3> {
        if self.input.len() > 3 {
            return Err(KilnError::kernel(
                op,
                format!(
                    "{} spatial dims are not supported (at most 3)",
                    self.input.len()
                ),
            ));
        }
        Ok(Spatial3 {
            input: to3(&self.input, 1),
            kernel: to3(&self.kernel, 1),
            strides: to3(&self.strides, 1),
            dilations: to3(&self.dilations, 1),
            pad_begin: to3(&self.pad_begin, 0),
            output: to3(&self.output, 1),
        })
    }
}

impl Spatial3 {
    /// 1×1 kernel, unit strides, no padding: the im2col matrix is the input itself.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1, 1]
            && self.strides == [1, 1, 1]
            && self.pad_begin == [0, 0, 0]
            && self.input == self.output
    }

    /// Number of input elements of one plane.
    pub fn in_size(&self) -> usize {
        self.input.iter().product()
    }

    /// Number of output elements of one plane.
    pub fn out_size(&self) -> usize {
        self.output.iter().product()
    }

    /// Number of kernel taps.
    pub fn kernel_size(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Input coordinate of output position `o`, tap `k` in dim `d` (None when in padding).
    #[inline(always)]
    pub fn in_coord(&self, d: usize, o: usize, k: usize) -> Option<usize> {
        let p = (o * self.strides[d] + k * self.dilations[d]).checked_sub(self.pad_begin[d])?;
        (p < self.input[d]).then_some(p)
    }

    /// The range of output positions `o` in dim `d` whose tap `k` lands inside the input.
    #[inline]
    pub fn valid_range(&self, d: usize, k: usize) -> (usize, usize) {
        let (s, off, pb, inp, out) = (
            self.strides[d],
            k * self.dilations[d],
            self.pad_begin[d],
            self.input[d],
            self.output[d],
        );
        // o*s + off - pb in [0, inp)  <=>  o*s >= pb - off  and  o*s < inp + pb - off
        let lo = if pb > off { (pb - off).div_ceil(s) } else { 0 };
        let hi = if inp + pb > off {
            (inp + pb - off).div_ceil(s)
        } else {
            0
        };
        (lo.min(out), hi.min(out).max(lo.min(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(
        auto_pad: AutoPad,
        pads: Option<Vec<usize>>,
        strides: Option<Vec<usize>>,
        ceil: bool,
    ) -> WindowAttrs {
        WindowAttrs {
            auto_pad,
            pads,
            strides,
            ceil_mode: ceil,
            ..Default::default()
        }
    }

    #[test]
    fn output_sizes() {
        let sp = attrs(
            AutoPad::NotSet,
            Some(vec![1, 0, 1, 2]),
            Some(vec![2, 1]),
            false,
        )
        .resolve("T", &[7, 13], &[3, 3])
        .unwrap();
        assert_eq!(sp.output.as_slice(), &[4, 13]);
        let sp = attrs(AutoPad::SameUpper, None, Some(vec![2, 2]), false)
            .resolve("T", &[7, 8], &[3, 3])
            .unwrap();
        assert_eq!(sp.output.as_slice(), &[4, 4]);
        assert_eq!(
            (sp.pad_begin.to_vec(), sp.pad_end.to_vec()),
            (vec![1, 0], vec![1, 1])
        );
        let sp = attrs(AutoPad::SameLower, None, Some(vec![2, 2]), false)
            .resolve("T", &[7, 8], &[3, 3])
            .unwrap();
        assert_eq!(
            (sp.pad_begin.to_vec(), sp.pad_end.to_vec()),
            (vec![1, 1], vec![1, 0])
        );
        let sp = attrs(AutoPad::Valid, None, Some(vec![2, 2]), false)
            .resolve("T", &[7, 8], &[3, 3])
            .unwrap();
        assert_eq!(sp.output.as_slice(), &[3, 3]);
        // ceil mode: 5 wide, k=2, s=2 -> 3 windows (last one half outside)
        let sp = attrs(AutoPad::NotSet, None, Some(vec![2]), true)
            .resolve("T", &[5], &[2])
            .unwrap();
        assert_eq!(sp.output.as_slice(), &[3]);
        assert!(attrs(AutoPad::NotSet, None, None, false)
            .resolve("T", &[2], &[3])
            .is_err());
    }

    #[test]
    fn valid_ranges() {
        let sp = attrs(AutoPad::NotSet, Some(vec![2, 1]), Some(vec![2]), false)
            .resolve("T", &[7], &[3])
            .unwrap();
        let s3 = sp.to3("T").unwrap();
        for k in 0..3 {
            let (lo, hi) = s3.valid_range(2, k);
            for o in 0..s3.output[2] {
                assert_eq!(
                    s3.in_coord(2, o, k).is_some(),
                    o >= lo && o < hi,
                    "k={k} o={o}"
                );
            }
        }
    }
}
