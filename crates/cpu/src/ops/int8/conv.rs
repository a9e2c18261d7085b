//! `kiln.Int8Conv`: convolution on i8 activations and weights (im2col + the i8 GEMM),
//! i32 accumulation, bias and fused activation in f32, i8 output.

use std::sync::{Arc, RwLock};

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, OpDesc, Result, Tensor,
    TensorMut, Value,
};

use super::gemm::{gemm, Isa, PackedWeights, COL_ALIGN};
use super::im2col::im2col;
use super::{
    act_row, check_isa, output_slot, output_tensor, parse_tactic, requant_row, row_sums, OutBuf,
    OutPtr, OutPtrF, QdqIo, Requant, W_SCALES, X_SCALE, Y_SCALE,
};
use crate::fused::Activation;
use crate::ops::conv::geom::WindowAttrs;
use crate::ops::conv::reference::ConvDims;
use crate::ops::conv::{conv_geometry, infer_conv_like};

/// Output columns (pixels) per parallel tile.
const TILE: usize = 128;

/// The INT8 convolution.
#[derive(Debug, Clone)]
pub struct Int8Conv {
    win: WindowAttrs,
    group: usize,
    act: Activation,
    x_scale: f32,
    y_scale: f32,
    w_scales: Vec<f32>,
    isa: Isa,
    io: QdqIo,
    /// Weights packed for the GEMM, zero-point compensation and requantization constants,
    /// made on the first call and reused while the same weight and bias tensors come back
    /// (a plan's constants do not move), so inference neither packs nor allocates.
    prepared: Arc<RwLock<Option<Arc<Prepared>>>>,
}

/// What [`Int8Conv`] derives from its constant inputs, with the tensors it came from.
#[derive(Debug)]
struct Prepared {
    /// Address and length of W's data, and B's address (0 when absent).
    key: (usize, usize, usize),
    /// Input zero point the compensation was made for.
    zx: i32,
    packed: Vec<PackedWeights>,
    comp: Vec<i32>,
    rq: Vec<Requant>,
}

fn group_of(a: &kiln_core::AttrReader) -> Result<usize> {
    usize::try_from(a.int("group", 1)?)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| a.invalid("group must be positive"))
}

/// Reads a positive finite scale attribute.
pub(crate) fn scale_attr(a: &kiln_core::AttrReader, name: &str) -> Result<f32> {
    let s = a
        .opt_float(name)?
        .ok_or_else(|| a.invalid(format!("missing float attribute {name}")))?;
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(a.invalid(format!("{name} must be a positive finite scale, found {s}")))
    }
}

/// Builds `kiln.Int8Conv` from its description.
pub fn build(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let mut win = WindowAttrs::parse(&a)?;
    win.ceil_mode = false;
    let io = QdqIo::from_attrs(&a)?;
    let best = if io.explicit {
        super::explicit_isa()
    } else {
        Isa::best()
    };
    let id = a
        .opt_string(kiln_core::tactic::TACTIC_ATTR)?
        .unwrap_or_else(|| format!("cpu.int8.conv.{}", best.name()));
    let isa = parse_tactic("conv", &id).map_err(|e| a.invalid(e.to_string()))?;
    check_isa(&a, io, isa)?;
    Ok(Box::new(Int8Conv {
        win,
        group: group_of(&a)?,
        act: Activation::from_attrs(&a)?,
        x_scale: scale_attr(&a, X_SCALE)?,
        // An f32 output is not requantized: no output scale.
        y_scale: if io.out == super::OutKind::F32 {
            1.0
        } else {
            scale_attr(&a, Y_SCALE)?
        },
        w_scales: a
            .opt_floats(W_SCALES)?
            .ok_or_else(|| a.invalid("missing w_scales"))?,
        isa,
        io,
        prepared: Arc::default(),
    }))
}

/// Whether an FP32 Conv with these facts can run as `Int8Conv` (known shapes, at least
/// 4 output channels and 4 input channels per group; weights are checked when lowering).
pub fn lowerable(desc: &OpDesc, inputs: &[Option<&Fact>]) -> bool {
    let shape = |i: usize| inputs.get(i).copied().flatten()?.concrete_shape();
    let group = match desc.attrs.get("group") {
        Some(kiln_core::Attr::Int(g)) if *g > 0 => *g as usize,
        None => 1,
        _ => return false,
    };
    let (Some(x), Some(w)) = (shape(0), shape(1)) else {
        return false;
    };
    x.len() >= 3
        && x.len() <= 5
        && w.len() == x.len()
        && w[0] % group == 0
        && w[0] / group >= 4
        && w[1] >= 4
}

impl Int8Conv {
    fn run(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, mut out: OutBuf<'_>) -> Result<()> {
        let bad = |msg: String| Err(KilnError::kernel("Int8Conv", msg));
        if w.dtype() != DType::I8 {
            return bad(format!("W must be int8, found {}", w.dtype()));
        }
        let (flip, zx) = self.io.input_domain("Int8Conv", x.dtype())?;
        let (dims, sp) = conv_geometry("Int8Conv", &self.win, self.group, x.shape(), w.shape())?;
        let sp = sp.to3("Int8Conv")?;
        let ConvDims { n, c, m, group } = dims;
        if self.w_scales.len() != m {
            return bad(format!(
                "w_scales has {} values for {m} output channels",
                self.w_scales.len()
            ));
        }
        let key = (
            w.bytes().as_ptr() as usize,
            w.bytes().len(),
            b.map_or(0, |b| b.bytes().as_ptr() as usize),
        );
        let cached = self
            .prepared
            .read()
            .ok()
            .and_then(|g| g.as_ref().filter(|p| p.key == key && p.zx == zx).cloned());
        let prep = match cached {
            Some(p) => p,
            None => {
                let p = Arc::new(self.prepare(key, zx, w, b, dims, sp.kernel_size())?);
                if let Ok(mut g) = self.prepared.write() {
                    *g = Some(p.clone());
                }
                p
            }
        };
        let (cg, mg) = (c / group, m / group);
        let k = cg * sp.kernel_size();
        let p_n = sp.out_size();
        if out.count() != n * m * p_n {
            return bad(format!(
                "output has {} values, expected {}",
                out.count(),
                n * m * p_n
            ));
        }
        let xs: &[i8] = bytemuck::cast_slice(x.bytes());
        let (packed, comp, rq) = (&prep.packed, &prep.comp, &prep.rq);
        let pad = zx as i8;
        debug_assert!(packed.iter().all(|p| p.kp == k.div_ceil(4) * 4));
        let tiles = p_n.div_ceil(TILE);
        let isz = sp.in_size();
        let (optr, fptr) = match &mut out {
            OutBuf::Bytes(o) => (Some(OutPtr(o.as_mut_ptr())), None),
            OutBuf::F32(o) => (None, Some(OutPtrF(o.as_mut_ptr()))),
        };
        crate::parallel::for_each_index(n * group * tiles, |task| {
            let (img_g, tile) = (task / tiles, task % tiles);
            let (img, g) = (img_g / group, img_g % group);
            let p0 = tile * TILE;
            let tw = TILE.min(p_n - p0);
            let pp = tw.div_ceil(COL_ALIGN) * COL_ALIGN;
            let pw = &packed[g];
            let xg = &xs[(img * c + g * cg) * isz..(img * c + (g + 1) * cg) * isz];
            crate::scratch::with_scratch::<i8, _>(pw.kp * pp, |col| {
                im2col(xg, cg, &sp, p0, tw, pp, pw.kp, col, (flip, pad));
                crate::scratch::with_scratch::<i32, _>(mg * pp, |acc| {
                    gemm(self.isa, pw, col, pp, acc);
                    let mut tmp = [0f32; TILE];
                    for r in 0..mg {
                        let o = g * mg + r;
                        let base = (img * m + o) * p_n + p0;
                        let row = &mut acc[r * pp..r * pp + tw];
                        if comp[o] != 0 {
                            row.iter_mut().for_each(|v| *v -= comp[o]);
                        }
                        if let Some(optr) = optr {
                            // SAFETY: base + tw ≤ n·m·p_n = out.len(); tasks cover disjoint
                            // (image, group, tile) triples, so no two write one element.
                            let dst = unsafe { std::slice::from_raw_parts_mut(optr.at(base), tw) };
                            requant_row(row, rq[o], self.act, &mut tmp, dst);
                        } else if let Some(fptr) = fptr {
                            // SAFETY: as above, for the f32 output.
                            let dst = unsafe { std::slice::from_raw_parts_mut(fptr.at(base), tw) };
                            act_row(row, rq[o], self.act, dst);
                        }
                    }
                });
            });
        });
        Ok(())
    }

    /// Packs W per group and computes the per-channel constants (see [`Prepared`]).
    fn prepare(
        &self,
        key: (usize, usize, usize),
        zx: i32,
        w: &Tensor,
        b: Option<&Tensor>,
        dims: ConvDims,
        ksz: usize,
    ) -> Result<Prepared> {
        let ConvDims { c, m, group, .. } = dims;
        let bias = match b {
            Some(b) if b.dtype() != DType::F32 || b.shape() != [m] => {
                return Err(KilnError::kernel(
                    "Int8Conv",
                    format!("B must be f32 [{m}], found {} {:?}", b.dtype(), b.shape()),
                ))
            }
            Some(b) => b.as_slice::<f32>()?.to_vec(),
            None => vec![0.0; m],
        };
        let (cg, mg) = (c / group, m / group);
        let k = cg * ksz;
        let ws = w.as_slice::<i8>()?;
        // Zero-point compensation: Σ w·(a − z) = Σ w·a − z·Σ w (exact in i32).
        let comp: Vec<i32> = row_sums(ws, m, k).into_iter().map(|s| s * zx).collect();
        let packed: Vec<PackedWeights> = (0..group)
            .map(|g| PackedWeights::pack(&ws[g * mg * k..(g + 1) * mg * k], mg, k))
            .collect();
        let rq: Vec<Requant> = (0..m)
            .map(|o| {
                self.io
                    .requant(self.x_scale * self.w_scales[o], bias[o], self.y_scale)
            })
            .collect();
        Ok(Prepared {
            key,
            zx,
            packed,
            comp,
            rq,
        })
    }

    fn out_shape(&self, x: &Tensor, w: &Tensor) -> Result<Vec<usize>> {
        let (dims, sp) = conv_geometry("Int8Conv", &self.win, self.group, x.shape(), w.shape())?;
        Ok(crate::ops::conv::out_shape(&dims, &sp).to_vec())
    }
}

impl Op for Int8Conv {
    fn op_type(&self) -> &str {
        "Int8Conv"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        Ok(vec![infer_conv_like(
            "Int8Conv",
            &self.win,
            inputs.first().copied().flatten(),
            inputs.get(1).copied().flatten(),
            Some(self.io.out_dtype()),
        )?])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "Int8Conv")?;
        let w = input_tensor(inputs, 1, "Int8Conv")?;
        let b = optional_tensor(inputs, 2, "Int8Conv")?;
        let shape = self.out_shape(x, w)?;
        let dt = self.io.out_dtype();
        let (mut bytes, mut floats) = super::new_output(dt, shape.iter().product());
        let buf = if dt == DType::F32 {
            OutBuf::F32(&mut floats)
        } else {
            OutBuf::Bytes(&mut bytes)
        };
        self.run(x, w, b, buf)?;
        Ok(vec![output_tensor(dt, &shape, bytes, floats)?.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, "Int8Conv")?;
        let w = input_tensor(inputs, 1, "Int8Conv")?;
        let b = optional_tensor(inputs, 2, "Int8Conv")?;
        let shape = self.out_shape(x, w)?;
        let slot = output_slot("Int8Conv", outputs, &shape, self.io.out_dtype())?;
        self.run(x, w, b, slot)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::reference::conv_reference;
    use kiln_core::{Attr, OpRegistry};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 >> 16
        }
        fn i8(&mut self) -> i8 {
            ((self.next() % 255) as i32 - 127) as i8
        }
    }

    fn desc(attrs: &[(&str, Attr)], isa: Isa, m: usize) -> OpDesc {
        let mut d = OpDesc::new("kiln", "Int8Conv", 1);
        for (k, v) in attrs {
            d.attrs.insert(k.to_string(), v.clone());
        }
        d.attrs.insert(X_SCALE.into(), Attr::Float(0.02));
        d.attrs.insert(Y_SCALE.into(), Attr::Float(0.5));
        d.attrs.insert(
            W_SCALES.into(),
            Attr::Floats((0..m).map(|i| 0.01 + 0.001 * i as f32).collect()),
        );
        d.attrs.insert(
            kiln_core::tactic::TACTIC_ATTR.into(),
            Attr::String(format!("cpu.int8.conv.{}", isa.name())),
        );
        d.attrs
            .insert("kiln_activation".into(), Attr::String("Relu".into()));
        d
    }

    #[test]
    fn matches_the_reference_convolution() {
        let mut reg = OpRegistry::new();
        super::super::register(&mut reg);
        let mut rng = Rng(99);
        // (n, c, m, group, h, w, k, stride, pad, dilation)
        let cases = [
            (1, 4, 4, 1, 5, 5, 1, 1, 0, 1),
            (2, 5, 8, 1, 9, 7, 3, 1, 1, 1),
            (1, 8, 12, 2, 11, 10, 3, 2, 1, 1),
            (1, 6, 7, 1, 13, 17, 3, 1, 2, 2),
            (1, 16, 20, 1, 15, 15, 5, 2, 2, 1),
            (3, 12, 16, 4, 6, 6, 1, 1, 0, 1),
        ];
        for &(n, c, m, group, h, wd, k, s, p, d) in &cases {
            let xs: Vec<i8> = (0..n * c * h * wd).map(|_| rng.i8()).collect();
            let ws: Vec<i8> = (0..m * (c / group) * k * k).map(|_| rng.i8()).collect();
            let bs: Vec<f32> = (0..m).map(|i| i as f32 * 0.37 - 1.0).collect();
            let x = Tensor::from_vec(&[n, c, h, wd], xs.clone()).unwrap();
            let w = Tensor::from_vec(&[m, c / group, k, k], ws.clone()).unwrap();
            let b = Tensor::from_vec(&[m], bs.clone()).unwrap();
            let attrs = [
                ("group", Attr::Int(group as i64)),
                ("strides", Attr::Ints(vec![s as i64; 2])),
                ("pads", Attr::Ints(vec![p as i64; 4])),
                ("dilations", Attr::Ints(vec![d as i64; 2])),
            ];
            let mut want = None;
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let dsc = desc(&attrs, isa, m);
                let op = reg
                    .build(&BuildCtx {
                        node: "t",
                        desc: &dsc,
                        n_inputs: 3,
                        n_outputs: 1,
                    })
                    .unwrap();
                let ic = op.as_any().downcast_ref::<Int8Conv>().unwrap().clone();
                let args = [
                    Some(&Value::Tensor(x.clone())),
                    Some(&Value::Tensor(w.clone())),
                    Some(&Value::Tensor(b.clone())),
                ];
                let got = op.eval(&args).unwrap().remove(0);
                let got = got.as_tensor().unwrap().clone();
                if want.is_none() {
                    let (dims, sp) =
                        conv_geometry("t", &ic.win, group, x.shape(), w.shape()).unwrap();
                    let sp = sp.to3("t").unwrap();
                    let xf: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
                    let wf: Vec<f64> = ws.iter().map(|&v| v as f64).collect();
                    let acc = conv_reference(&xf, &wf, None, dims, &sp);
                    let per = sp.out_size();
                    let q: Vec<i8> = acc
                        .iter()
                        .enumerate()
                        .map(|(i, &a)| {
                            let o = (i / per) % m;
                            Requant::sym(ic.x_scale * ic.w_scales[o], bs[o], 1.0 / ic.y_scale)
                                .apply(a as i32, Activation::Relu)
                        })
                        .collect();
                    assert!(q.iter().any(|&v| v != 0));
                    want = Some(q);
                }
                assert_eq!(got.shape()[1], m);
                assert_eq!(
                    got.as_slice::<i8>().unwrap(),
                    want.as_deref().unwrap(),
                    "{isa:?} case {:?}",
                    (n, c, m, group, h, wd, k, s, p, d)
                );
            }
        }
    }

    /// Explicit quantization (u8 input with a zero point, u8 output with one, and f32
    /// output) on every ISA that takes it, against the f64 reference convolution of
    /// `q − zp` (padding = real zero); AVX2 is refused.
    /// The prepared (packed) weights are reused only for the tensor they came from: one op
    /// run on W, then W2, then W again gives what fresh ops give for each.
    #[test]
    fn prepared_weights_follow_the_weight_tensor() {
        let mut reg = OpRegistry::new();
        super::super::register(&mut reg);
        let mut rng = Rng(7);
        let (c, m, h, wd) = (8, 8, 6, 7);
        let x =
            Tensor::from_vec(&[1, c, h, wd], (0..c * h * wd).map(|_| rng.i8()).collect()).unwrap();
        let w1 =
            Tensor::from_vec(&[m, c, 3, 3], (0..m * c * 9).map(|_| rng.i8()).collect()).unwrap();
        let w2 =
            Tensor::from_vec(&[m, c, 3, 3], (0..m * c * 9).map(|_| rng.i8()).collect()).unwrap();
        let attrs = [("pads", Attr::Ints(vec![1; 4]))];
        let dsc = desc(&attrs, Isa::best(), m);
        let ctx = BuildCtx {
            node: "t",
            desc: &dsc,
            n_inputs: 2,
            n_outputs: 1,
        };
        let run = |op: &dyn Op, w: &Tensor| {
            let args = [
                Some(&Value::Tensor(x.clone())),
                Some(&Value::Tensor(w.clone())),
            ];
            op.eval(&args)
                .unwrap()
                .remove(0)
                .as_tensor()
                .unwrap()
                .clone()
        };
        let fresh1 = run(&*reg.build(&ctx).unwrap(), &w1);
        let fresh2 = run(&*reg.build(&ctx).unwrap(), &w2);
        assert_ne!(
            fresh1.as_slice::<i8>().unwrap(),
            fresh2.as_slice::<i8>().unwrap()
        );
        let op = reg.build(&ctx).unwrap();
        for (w, want) in [
            (&w1, &fresh1),
            (&w2, &fresh2),
            (&w1, &fresh1),
            (&w1, &fresh1),
        ] {
            assert_eq!(
                run(&*op, w).as_slice::<i8>().unwrap(),
                want.as_slice::<i8>().unwrap()
            );
        }
    }

    #[test]
    fn explicit_zero_points_match_the_reference() {
        let mut reg = OpRegistry::new();
        super::super::register(&mut reg);
        let mut rng = Rng(1234);
        // (n, c, m, h, w, k, stride, pad, x_zp)
        let cases = [
            (1, 5, 6, 7, 9, 3, 1, 1, 37),
            (2, 8, 5, 10, 6, 3, 2, 2, 200),
            (1, 4, 9, 5, 5, 1, 1, 0, 0),
        ];
        for &(n, c, m, h, wd, k, s, p, zx) in &cases {
            let xs: Vec<u8> = (0..n * c * h * wd)
                .map(|_| (rng.next() % 256) as u8)
                .collect();
            let ws: Vec<i8> = (0..m * c * k * k).map(|_| rng.i8()).collect();
            let x = Tensor::from_vec(&[n, c, h, wd], xs.clone()).unwrap();
            let w = Tensor::from_vec(&[m, c, k, k], ws.clone()).unwrap();
            for y_dtype in [2i64, 1] {
                for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                    let mut d = desc(
                        &[
                            ("strides", Attr::Ints(vec![s as i64; 2])),
                            ("pads", Attr::Ints(vec![p as i64; 4])),
                        ],
                        isa,
                        m,
                    );
                    d.attrs.remove("kiln_activation");
                    d.attrs
                        .insert(super::super::X_ZERO_POINT.into(), Attr::Int(zx as i64));
                    d.attrs
                        .insert(super::super::Y_ZERO_POINT.into(), Attr::Int(131));
                    d.attrs
                        .insert(super::super::Y_DTYPE.into(), Attr::Int(y_dtype));
                    let built = reg.build(&BuildCtx {
                        node: "t",
                        desc: &d,
                        n_inputs: 2,
                        n_outputs: 1,
                    });
                    if isa == Isa::Avx2 {
                        let Err(e) = built else {
                            panic!("AVX2 accepted zero points")
                        };
                        let e = e.to_string();
                        assert!(e.contains("AVX2"), "{e}");
                        continue;
                    }
                    let op = built.unwrap();
                    let ic = op.as_any().downcast_ref::<Int8Conv>().unwrap().clone();
                    let got = op
                        .eval(&[Some(&x.clone().into()), Some(&w.clone().into())])
                        .unwrap()
                        .remove(0);
                    let got = got.as_tensor().unwrap().clone();
                    let (dims, sp) = conv_geometry("t", &ic.win, 1, x.shape(), w.shape()).unwrap();
                    let sp = sp.to3("t").unwrap();
                    let xf: Vec<f64> = xs.iter().map(|&v| v as f64 - zx as f64).collect();
                    let wf: Vec<f64> = ws.iter().map(|&v| v as f64).collect();
                    let acc = conv_reference(&xf, &wf, None, dims, &sp);
                    let per = sp.out_size();
                    let rq = |i: usize| {
                        let o = (i / per) % m;
                        ic.io.requant(ic.x_scale * ic.w_scales[o], 0.0, ic.y_scale)
                    };
                    if y_dtype == 2 {
                        let want: Vec<u8> = acc
                            .iter()
                            .enumerate()
                            .map(|(i, &a)| rq(i).apply(a as i32, Activation::None) as u8)
                            .collect();
                        assert!(want.iter().any(|&v| v != 131) && want.iter().any(|&v| v != 0));
                        assert_eq!(got.as_slice::<u8>().unwrap(), &want[..], "{isa:?}");
                    } else {
                        let want: Vec<f32> = acc
                            .iter()
                            .enumerate()
                            .map(|(i, &a)| rq(i).apply_f32(a as i32, Activation::None))
                            .collect();
                        assert_eq!(got.as_slice::<f32>().unwrap(), &want[..], "{isa:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut reg = OpRegistry::new();
        super::super::register(&mut reg);
        let dsc = desc(&[], Isa::Scalar, 4);
        let op = reg
            .build(&BuildCtx {
                node: "t",
                desc: &dsc,
                n_inputs: 2,
                n_outputs: 1,
            })
            .unwrap();
        let x = Tensor::from_vec(&[1, 4, 3, 3], vec![1.0f32; 36]).unwrap();
        let w = Tensor::from_vec(&[4, 4, 1, 1], vec![1i8; 16]).unwrap();
        let e = op
            .eval(&[Some(&x.clone().into()), Some(&w.clone().into())])
            .unwrap_err();
        assert!(e.to_string().contains("int8"), "{e}");
        let e = op
            .eval(&[
                Some(
                    &Tensor::from_vec(&[1, 4, 3, 3], vec![1u8; 36])
                        .unwrap()
                        .into(),
                ),
                Some(&w.clone().into()),
            ])
            .unwrap_err();
        assert!(e.to_string().contains("x_zero_point"), "{e}");
        let w5 = Tensor::from_vec(&[5, 4, 1, 1], vec![1i8; 20]).unwrap();
        let x8 = Tensor::from_vec(&[1, 4, 3, 3], vec![1i8; 36]).unwrap();
        let e = op.eval(&[Some(&x8.into()), Some(&w5.into())]).unwrap_err();
        assert!(e.to_string().contains("w_scales"), "{e}");
        let mut no_scale = dsc.clone();
        no_scale.attrs.remove(X_SCALE);
        assert!(reg
            .build(&BuildCtx {
                node: "t",
                desc: &no_scale,
                n_inputs: 2,
                n_outputs: 1
            })
            .is_err());
        let mut bad = dsc.clone();
        bad.attrs.insert(
            kiln_core::tactic::TACTIC_ATTR.into(),
            Attr::String("cpu.int8.conv.sse9".into()),
        );
        assert!(reg
            .build(&BuildCtx {
                node: "t",
                desc: &bad,
                n_inputs: 2,
                n_outputs: 1
            })
            .is_err());
    }
}
