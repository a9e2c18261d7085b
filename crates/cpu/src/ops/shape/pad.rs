//! Pad (constant, reflect, edge, wrap; negative pads crop) and CenterCropPad.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Dim, Fact, Op, Result, Tensor, TensorMut, Value};

use super::common::*;

/// Padding mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

/// `Pad`: attributes `pads`/`value` (opset 1-10) or inputs pads, constant_value, axes.
#[derive(Debug)]
pub struct Pad {
    mode: PadMode,
    pads_attr: Option<Vec<i64>>,
    value_attr: f32,
    /// The plan of the last call, reused while shapes and pads repeat (steady-state
    /// inference then allocates nothing).
    cache: std::sync::Mutex<Option<PadCache>>,
}

/// A planned padding and what it was planned for.
#[derive(Debug)]
struct PadCache {
    shape: Dims,
    pads: smallvec::SmallVec<[(i64, i64); 8]>,
    dtype: DType,
    attr_value: Tensor,
    plan: std::sync::Arc<PadPlan>,
}

/// Builds `Pad`.
pub fn build_pad(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let mode = match a.string("mode", "constant")?.as_str() {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        m => return Err(a.invalid(format!("unknown pad mode {m}"))),
    };
    let pads_attr = if ctx.opset() < 11 {
        let p = if ctx.opset() < 2 {
            a.opt_ints("paddings")?
        } else {
            a.opt_ints("pads")?
        };
        Some(p.ok_or_else(|| a.invalid("Pad needs a pads attribute"))?)
    } else {
        None
    };
    Ok(Box::new(Pad {
        mode,
        pads_attr,
        value_attr: a.float("value", 0.0)?,
        cache: Default::default(),
    }))
}

/// A run of output positions along the padded axis: `len` positions reading source
/// positions `src..src+len` (or the pad value when `src` is None).
#[derive(Debug, Clone, Copy)]
struct Run {
    src: Option<usize>,
    len: usize,
}

/// Per-axis map from output position to source position (None = pad value).
fn axis_map(mode: PadMode, d: usize, begin: i64, end: i64) -> Result<Vec<Option<usize>>> {
    let out = (d as i64)
        .checked_add(begin)
        .and_then(|v| v.checked_add(end))
        .unwrap_or(-1);
    if out < 0 {
        return Err(kerr(
            "Pad",
            format!("pads ({begin}, {end}) remove more than the dim {d}"),
        ));
    }
    let mut m = Vec::with_capacity(out as usize);
    for o in 0..out {
        let i = o - begin;
        let v = if (0..d as i64).contains(&i) {
            Some(i as usize)
        } else if d == 0 {
            if mode != PadMode::Constant {
                return Err(kerr(
                    "Pad",
                    "cannot pad an empty dim in a non-constant mode",
                ));
            }
            None
        } else {
            let dd = d as i64;
            match mode {
                PadMode::Constant => None,
                PadMode::Edge => Some(i.clamp(0, dd - 1) as usize),
                PadMode::Wrap => Some(i.rem_euclid(dd) as usize),
                PadMode::Reflect => {
                    if dd == 1 {
                        Some(0)
                    } else {
                        let p = 2 * (dd - 1);
                        let r = i.rem_euclid(p);
                        Some(if r < dd { r } else { p - r } as usize)
                    }
                }
            }
        };
        m.push(v);
    }
    Ok(m)
}

fn runs_of(map: &[Option<usize>]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &v in map {
        if let Some(last) = runs.last_mut() {
            let extends = match (last.src, v) {
                (None, None) => true,
                (Some(s), Some(x)) => x == s + last.len,
                _ => false,
            };
            if extends {
                last.len += 1;
                continue;
            }
        }
        runs.push(Run { src: v, len: 1 });
    }
    runs
}

/// Everything needed to fill a padded output.
#[derive(Debug)]
pub(crate) struct PadPlan {
    out_shape: Vec<usize>,
    /// Maps of the axes before the last padded axis `k`.
    outer_maps: Vec<Vec<Option<usize>>>,
    outer_strides: Vec<usize>,
    runs: Vec<Run>,
    /// Elements below axis k (contiguous in both input and output).
    inner: usize,
}

impl PadPlan {
    /// Plans padding `shape` by (begin, end) per axis.
    pub(crate) fn new(mode: PadMode, shape: &[usize], pads: &[(i64, i64)]) -> Result<PadPlan> {
        let rank = shape.len();
        let mut dims = Vec::with_capacity(rank);
        for a in 0..rank {
            let v = (shape[a] as i64)
                .checked_add(pads[a].0)
                .and_then(|v| v.checked_add(pads[a].1));
            match v {
                Some(v) if v >= 0 => dims.push(v as usize),
                _ => {
                    return Err(kerr(
                        "Pad",
                        format!(
                            "pads {:?} do not fit dim {} of {shape:?}",
                            pads[a], shape[a]
                        ),
                    ))
                }
            }
        }
        checked_numel("Pad", &dims, 1)?;
        let maps: Vec<Vec<Option<usize>>> = (0..rank)
            .map(|a| axis_map(mode, shape[a], pads[a].0, pads[a].1))
            .collect::<Result<_>>()?;
        let out_shape: Vec<usize> = maps.iter().map(|m| m.len()).collect();
        checked_numel("Pad", &out_shape, 1)?;
        let k = (0..rank).rev().find(|&a| pads[a] != (0, 0)).unwrap_or(0);
        let st = kiln_core::strides(shape);
        let inner: usize = shape[k.min(rank.saturating_sub(1))..]
            .iter()
            .skip(1)
            .product();
        let (outer_maps, outer_strides, runs) = if rank == 0 {
            (
                vec![],
                vec![],
                vec![Run {
                    src: Some(0),
                    len: 1,
                }],
            )
        } else {
            (maps[..k].to_vec(), st[..k].to_vec(), runs_of(&maps[k]))
        };
        Ok(PadPlan {
            out_shape,
            outer_maps,
            outer_strides,
            runs,
            inner,
        })
    }
}

impl Mover for PadPlan {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        let (src, value) = (srcs[0], srcs[1][0].clone());
        let row: usize = self.runs.iter().map(|r| r.len).sum::<usize>() * self.inner;
        if row == 0 || dst.is_empty() {
            return Ok(());
        }
        let n_rows = dst.len() / row;
        let outer_dims: Dims = self.outer_maps.iter().map(|m| m.len()).collect();
        par_blocks(dst, row, n_rows, |chunk, first| {
            for (k, out_row) in chunk.chunks_mut(row).enumerate() {
                let mut rem = first + k;
                let mut base = Some(0usize);
                for a in (0..outer_dims.len()).rev() {
                    let o = rem % outer_dims[a];
                    rem /= outer_dims[a];
                    base = match (base, self.outer_maps[a][o]) {
                        (Some(b), Some(i)) => Some(b + i * self.outer_strides[a]),
                        _ => None,
                    };
                }
                let Some(base) = base else {
                    out_row.fill(value.clone());
                    continue;
                };
                let mut pos = 0;
                for r in &self.runs {
                    let n = r.len * self.inner;
                    match r.src {
                        Some(s) => {
                            let b = base + s * self.inner;
                            out_row[pos..pos + n].clone_from_slice(&src[b..b + n]);
                        }
                        None => out_row[pos..pos + n].fill(value.clone()),
                    }
                    pos += n;
                }
            }
        });
        Ok(())
    }
}

impl Pad {
    /// (data, value as a one-element tensor of data's dtype, per-axis pads).
    fn plan<'a>(
        &self,
        inputs: &[Option<&'a Value>],
    ) -> Result<(&'a Tensor, Tensor, std::sync::Arc<PadPlan>)> {
        let x = kiln_core::input_tensor(inputs, 0, "Pad")?;
        let rank = x.rank();
        let (raw, axes) = match &self.pads_attr {
            Some(p) => (p.iter().copied().collect::<Ints>(), None),
            None => (
                ints_input(inputs, 1, "Pad")?,
                opt_ints_input(inputs, 3, "Pad")?,
            ),
        };
        let axes: Dims = match axes {
            Some(a) => norm_axes("Pad", &a, rank)?,
            None => (0..rank).collect(),
        };
        if raw.len() != 2 * axes.len() {
            return Err(kerr(
                "Pad",
                format!(
                    "pads {raw:?} must have 2 values per axis ({} axes)",
                    axes.len()
                ),
            ));
        }
        let mut pads: smallvec::SmallVec<[(i64, i64); 8]> = smallvec::smallvec![(0i64, 0i64); rank];
        for (i, &a) in axes.iter().enumerate() {
            pads[a] = (raw[i], raw[axes.len() + i]);
        }
        let given = match (
            &self.pads_attr,
            kiln_core::optional_tensor(inputs, 2, "Pad")?,
        ) {
            (None, Some(v)) if !v.is_empty() => Some(v),
            _ => None,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache
            .as_ref()
            .filter(|c| c.shape.as_slice() == x.shape() && c.pads == pads && c.dtype == x.dtype());
        let (attr_value, plan) = match hit {
            Some(c) => (c.attr_value.clone(), c.plan.clone()),
            None => {
                let attr_value = if x.dtype() == DType::String {
                    Tensor::from_strings(&[1], vec![String::new()])?
                } else {
                    Tensor::from_vec(&[1], vec![self.value_attr])?.cast(x.dtype())?
                };
                let plan = std::sync::Arc::new(PadPlan::new(self.mode, x.shape(), &pads)?);
                *cache = Some(PadCache {
                    shape: x.shape().into(),
                    pads,
                    dtype: x.dtype(),
                    attr_value: attr_value.clone(),
                    plan: plan.clone(),
                });
                (attr_value, plan)
            }
        };
        drop(cache);
        let value = match given {
            Some(v) if v.dtype() == x.dtype() => v.clone(),
            Some(v) => v.reshape(&[v.len()])?.cast(x.dtype())?,
            None => attr_value,
        };
        Ok((x, value, plan))
    }
}

impl Op for Pad {
    fn op_type(&self) -> &str {
        "Pad"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let Some(shape) = x.and_then(|f| f.shape.as_ref()) else {
            return Ok(vec![tensor_fact(dtype, None)]);
        };
        let rank = shape.len();
        let raw = match &self.pads_attr {
            Some(p) => Some(p.clone()),
            None => konst_ints(fact_at(inputs, 1)),
        };
        let axes = match (&self.pads_attr, fact_at(inputs, 3)) {
            (None, Some(f)) => konst_ints(Some(f)).and_then(|a| norm_axes("Pad", &a, rank).ok()),
            _ => Some((0..rank).collect()),
        };
        let (Some(raw), Some(axes)) = (raw, axes) else {
            return Ok(vec![tensor_fact(dtype, Some(vec![Dim::Unknown; rank]))]);
        };
        if raw.len() != 2 * axes.len() {
            return Err(ierr(
                "Pad",
                format!("pads {raw:?} do not match {} axes", axes.len()),
            ));
        }
        let mut out = shape.clone();
        for (i, &a) in axes.iter().enumerate() {
            let (b, e) = (raw[i], raw[axes.len() + i]);
            out[a] = match shape[a].known() {
                Some(d) => {
                    let v = (d as i64)
                        .checked_add(b)
                        .and_then(|v| v.checked_add(e))
                        .unwrap_or(-1);
                    if v < 0 {
                        return Err(ierr(
                            "Pad",
                            format!("pads ({b}, {e}) remove more than dim {d}"),
                        ));
                    }
                    Dim::Known(v as usize)
                }
                None if b == 0 && e == 0 => shape[a].clone(),
                None => Dim::Unknown,
            };
        }
        Ok(vec![tensor_fact(dtype, Some(out))])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, value, plan) = self.plan(inputs)?;
        let shape = plan.out_shape.clone();
        Ok(vec![move_data(
            &*plan,
            "Pad",
            &[x, &value],
            x.dtype(),
            &shape,
        )?
        .into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let (x, value, plan) = self.plan(inputs)?;
        match outputs.first_mut() {
            Some(out) if x.dtype() != DType::String => {
                move_into(&*plan, "Pad", &[x, &value], out, &plan.out_shape)
            }
            _ => Err(kerr("Pad", "no output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `CenterCropPad`: crops or zero-pads the given axes to `shape`, centred.
#[derive(Debug)]
pub struct CenterCropPad {
    axes: Option<Vec<i64>>,
}

/// Builds `CenterCropPad`.
pub fn build_center_crop_pad(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(CenterCropPad {
        axes: ctx.attrs().opt_ints("axes")?,
    }))
}

impl CenterCropPad {
    fn pads(&self, shape: &[usize], target: &[i64]) -> Result<Vec<(i64, i64)>> {
        let rank = shape.len();
        let axes = match &self.axes {
            Some(a) => norm_axes("CenterCropPad", a, rank)?,
            None => (0..rank).collect(),
        };
        if target.len() != axes.len() {
            return Err(kerr(
                "CenterCropPad",
                format!("shape {target:?} does not match axes {axes:?}"),
            ));
        }
        let mut pads = vec![(0, 0); rank];
        for (i, &a) in axes.iter().enumerate() {
            let (d, t) = (shape[a] as i64, target[i]);
            if t < 0 {
                return Err(kerr("CenterCropPad", format!("negative target size {t}")));
            }
            let diff = t - d;
            let half = diff.abs() / 2;
            pads[a] = if diff >= 0 {
                (half, diff - half)
            } else {
                (-half, diff + half)
            };
        }
        Ok(pads)
    }
}

impl Op for CenterCropPad {
    fn op_type(&self) -> &str {
        "CenterCropPad"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let Some(shape) = x.and_then(|f| f.shape.as_ref()) else {
            return Ok(vec![tensor_fact(dtype, None)]);
        };
        let rank = shape.len();
        let axes = match &self.axes {
            Some(a) => norm_axes("CenterCropPad", a, rank)
                .map_err(|e| ierr("CenterCropPad", e.to_string()))?,
            None => (0..rank).collect(),
        };
        let mut out = shape.clone();
        let target = konst_ints(fact_at(inputs, 1));
        for (i, &a) in axes.iter().enumerate() {
            out[a] = match target.as_ref().and_then(|t| t.get(i)) {
                Some(&t) if t >= 0 => Dim::Known(t as usize),
                _ => Dim::Unknown,
            };
        }
        Ok(vec![tensor_fact(dtype, Some(out))])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "CenterCropPad")?;
        let target = ints_input(inputs, 1, "CenterCropPad")?;
        let pads = self.pads(x.shape(), &target)?;
        let plan = PadPlan::new(PadMode::Constant, x.shape(), &pads)?;
        let value = if x.dtype() == DType::String {
            Tensor::from_strings(&[1], vec![String::new()])?
        } else {
            Tensor::zeros(x.dtype(), &[1])
        };
        let shape = plan.out_shape.clone();
        Ok(vec![move_data(
            &plan,
            "CenterCropPad",
            &[x, &value],
            x.dtype(),
            &shape,
        )?
        .into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i64s(v: &[i64]) -> Value {
        Tensor::from_vec(&[v.len()], v.to_vec()).unwrap().into()
    }

    /// Naive pad of a 2-D tensor with numpy semantics.
    fn naive(x: &[f32], h: usize, w: usize, p: [i64; 4], mode: PadMode, val: f32) -> Vec<f32> {
        let maps = [
            axis_map(mode, h, p[0], p[2]).unwrap(),
            axis_map(mode, w, p[1], p[3]).unwrap(),
        ];
        let mut out = vec![];
        for i in &maps[0] {
            for j in &maps[1] {
                out.push(match (i, j) {
                    (Some(i), Some(j)) => x[i * w + j],
                    _ => val,
                });
            }
        }
        out
    }

    #[test]
    fn reflect_matches_numpy() {
        // np.pad([0,1,2], (4, 5), 'reflect') = [2 1 0 1 | 0 1 2 | 1 0 1 2 1]
        let m: Vec<usize> = axis_map(PadMode::Reflect, 3, 4, 5)
            .unwrap()
            .into_iter()
            .map(|v| v.unwrap())
            .collect();
        assert_eq!(m, vec![0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]);
        let m: Vec<usize> = axis_map(PadMode::Wrap, 3, 2, 2)
            .unwrap()
            .into_iter()
            .map(|v| v.unwrap())
            .collect();
        assert_eq!(m, vec![1, 2, 0, 1, 2, 0, 1]);
        let m: Vec<usize> = axis_map(PadMode::Edge, 3, 2, 1)
            .unwrap()
            .into_iter()
            .map(|v| v.unwrap())
            .collect();
        assert_eq!(m, vec![0, 0, 0, 1, 2, 2]);
    }

    #[test]
    fn cached_plan_follows_changing_pads_and_shapes() {
        // One op instance called with alternating shapes and pads must give what a fresh
        // op gives each time (the plan cache is keyed on both).
        let shared = Pad {
            mode: PadMode::Reflect,
            pads_attr: None,
            value_attr: 0.0,
            cache: Default::default(),
        };
        let calls: [(usize, usize, [i64; 4]); 4] = [
            (3, 5, [1, 2, 0, 3]),
            (3, 5, [2, 1, 1, 0]),
            (4, 3, [1, 2, 0, 1]),
            (3, 5, [1, 2, 0, 3]),
        ];
        for (h, w, pads) in calls {
            let data: Vec<f32> = (0..h * w).map(|v| v as f32 * 0.7 - 2.0).collect();
            let x: Value = Tensor::from_vec(&[h, w], data.clone()).unwrap().into();
            let y = shared.eval(&[Some(&x), Some(&i64s(&pads))]).unwrap();
            assert_eq!(
                y[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
                naive(&data, h, w, pads, PadMode::Reflect, 0.0).as_slice(),
                "{h}x{w} {pads:?}"
            );
        }
    }

    #[test]
    fn pad_modes_2d() {
        let (h, w) = (3, 4);
        let data: Vec<f32> = (0..12).map(|v| v as f32 * 1.5 + 1.0).collect();
        let x: Value = Tensor::from_vec(&[h, w], data.clone()).unwrap().into();
        for (mode, pads) in [
            (PadMode::Constant, [1, 2, 0, 3]),
            (PadMode::Constant, [-1, 1, 2, -2]),
            (PadMode::Reflect, [2, 1, 1, 3]),
            (PadMode::Edge, [0, 3, 2, 0]),
            (PadMode::Wrap, [1, 1, 2, 2]),
        ] {
            let op = Pad {
                mode,
                pads_attr: None,
                value_attr: 0.0,
                cache: Default::default(),
            };
            let cv: Value = Tensor::scalar(2.5f32).into();
            let y = op.eval(&[Some(&x), Some(&i64s(&pads)), Some(&cv)]).unwrap();
            let y = y[0].as_tensor().unwrap();
            assert_eq!(
                y.as_slice::<f32>().unwrap(),
                naive(&data, h, w, pads, mode, 2.5).as_slice(),
                "{mode:?} {pads:?}"
            );
        }
        // axes input (opset 18), negative axis
        let op = Pad {
            mode: PadMode::Constant,
            pads_attr: None,
            value_attr: 0.0,
            cache: Default::default(),
        };
        let y = op
            .eval(&[Some(&x), Some(&i64s(&[1, 1])), None, Some(&i64s(&[-1]))])
            .unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[3, 6]);
        assert!(op.eval(&[Some(&x), Some(&i64s(&[1, 1, 1]))]).is_err());
        assert!(op.eval(&[Some(&x), Some(&i64s(&[-5, 0, 0, 0]))]).is_err());
    }

    #[test]
    fn pad_channels_large_and_strings() {
        let x = Tensor::from_vec(
            &[2, 3, 64, 64],
            (0..2 * 3 * 64 * 64).map(|v| v as f32).collect(),
        )
        .unwrap();
        let op = Pad {
            mode: PadMode::Constant,
            pads_attr: Some(vec![0, 1, 0, 0, 0, 2, 0, 0]),
            value_attr: -1.0,
            cache: Default::default(),
        };
        let y = op.eval(&[Some(&x.clone().into())]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 6, 64, 64]);
        let ys = y.as_slice::<f32>().unwrap();
        assert_eq!(ys[0], -1.0);
        assert_eq!(ys[64 * 64], 0.0);
        assert_eq!(
            ys[6 * 64 * 64 + 2 * 64 * 64 + 5],
            x.as_slice::<f32>().unwrap()[3 * 64 * 64 + 64 * 64 + 5]
        );
        let s = Tensor::from_strings(&[2], vec!["a".into(), "b".into()]).unwrap();
        let op = Pad {
            mode: PadMode::Edge,
            pads_attr: None,
            value_attr: 0.0,
            cache: Default::default(),
        };
        let y = op.eval(&[Some(&s.into()), Some(&i64s(&[1, 2]))]).unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_strings().unwrap(),
            &["a", "a", "b", "b", "b"]
        );
    }

    #[test]
    fn center_crop_pad() {
        let x: Value = Tensor::from_vec(&[5, 2], (0..10).map(|v| v as f32).collect::<Vec<_>>())
            .unwrap()
            .into();
        let op = CenterCropPad { axes: None };
        let y = op.eval(&[Some(&x), Some(&i64s(&[2, 5]))]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 5]);
        // crop rows 5 -> 2: start 1; pad cols 2 -> 5: 1 before, 2 after
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[0., 2., 3., 0., 0., 0., 4., 5., 0., 0.]
        );
    }
}
