//! ONNX ConvTranspose on the GPU: per group one strided-batched cuBLAS GEMM over the images
//! (`col[n, g] = W[g]ᵀ · X[n, g]`, columns `[N, M, kernel positions, input positions]` in
//! the workspace), then one NVRTC col2im kernel that *gathers* (one thread per output
//! element, no atomics, deterministic) the column entries landing on each output position
//! and adds the bias (and kiln's fused activation, when present).
//!
//! The geometry follows the CPU reference op (`kiln_cpu` `ConvTranspose`): strides,
//! dilations, groups, explicit pads, `output_padding`, `output_shape` (with `auto_pad`
//! deciding where the padding goes) and `auto_pad` SAME_UPPER / SAME_LOWER; 1-3 spatial
//! dims; F32 and F16 (GEMM accumulates in FP32, col2im sums in `float`).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use kiln_core::{AttrReader, DType, Fact, Node, Result};

use crate::kernels::common::{ctype, grid_for, load, prelude, source, store, BLOCK};
use crate::layer::{cuda_err, DevTensor, GpuLayer, KernelSource, LaunchCx};
use crate::library::{fused_activation, ConvParams, GemmCall};

/// The geometry of a transposed convolution uses [`ConvParams`]' fields with their
/// convolution meaning seen from the ConvTranspose side: `is` / `ipos` its input, `os` /
/// `opos` its output, `pb` its leading pads (negative when `output_shape` asks for more than
/// the natural size).
pub type ConvTParams = ConvParams;

/// The CUDA mirror of [`ConvParams`] (same field order).
const CT_STRUCT: &str = "struct CtP { long long n, c, m, cg, mg, kpos, opos, ipos; long long is[3], os[3], ks[3], st[3], dl[3], pb[3]; };\n";

/// Output spatial sizes and leading pads, as the CPU reference op resolves them.
fn resolve(a: &AttrReader<'_>, input: &[usize], kernel: &[usize]) -> Option<(Vec<i64>, Vec<i64>)> {
    let n = input.len();
    let list = |name: &str, default: i64, min: i64| -> Option<Vec<i64>> {
        match a.opt_ints(name).ok()? {
            None => Some(vec![default; n]),
            Some(v) if v.len() == n && v.iter().all(|&x| x >= min) => Some(v),
            Some(_) => None,
        }
    };
    let s = list("strides", 1, 1)?;
    let d = list("dilations", 1, 1)?;
    let op = list("output_padding", 0, 0)?;
    let out_attr = match a.opt_ints("output_shape").ok()? {
        Some(v) if v.iter().any(|&x| x < 0) => return None,
        Some(v) if v.len() == n + 2 => Some(v[2..].to_vec()),
        Some(v) if v.len() == n => Some(v),
        Some(_) => return None,
        None => None,
    };
    let auto = a.string("auto_pad", "NOTSET").ok()?;
    let (same, upper) = match auto.as_str() {
        "NOTSET" | "" | "VALID" => (false, false),
        "SAME_UPPER" => (true, true),
        "SAME_LOWER" => (true, false),
        _ => return None,
    };
    let pads = match a.opt_ints("pads").ok()? {
        None => vec![0; 2 * n],
        Some(p) if p.len() == 2 * n => p,
        Some(_) => return None,
    };
    let mut outs = vec![0; n];
    let mut begins = vec![0; n];
    for i in 0..n {
        let natural = s[i] * (input[i] as i64 - 1) + op[i] + ((kernel[i] as i64 - 1) * d[i] + 1);
        if out_attr.is_some() || same {
            let out = match &out_attr {
                Some(o) => o[i],
                None => input[i] as i64 * s[i],
            };
            let total = natural - out;
            let half = total.div_euclid(2);
            begins[i] = if upper { half } else { total - half };
            outs[i] = out;
        } else {
            begins[i] = pads[i];
            outs[i] = natural - pads[i] - pads[i + n];
        }
    }
    Some((outs, begins))
}

/// Geometry of a ConvTranspose node with X `sx`, W `sw` and output `so`; `None` when the
/// attributes do not resolve to exactly `so`.
pub fn conv_t_geometry(
    node: &Node,
    sx: &[usize],
    sw: &[usize],
    so: &[usize],
) -> Option<ConvTParams> {
    let a = AttrReader {
        node: &node.name,
        desc: &node.desc,
    };
    let r = sx.len();
    if !(3..=5).contains(&r) || sw.len() != r || so.len() != r {
        return None;
    }
    let sp = r - 2;
    let g = a.int("group", 1).ok()?;
    if g < 1 {
        return None;
    }
    let g = g as usize;
    let (n, c) = (sx[0], sx[1]);
    let m = sw[1] * g;
    if sw[0] != c || c % g != 0 || so[0] != n || so[1] != m {
        return None;
    }
    if let Ok(Some(k)) = a.opt_ints("kernel_shape") {
        if k.len() != sp || k.iter().zip(&sw[2..]).any(|(&a, &b)| a != b as i64) {
            return None;
        }
    }
    let (outs, begins) = resolve(&a, &sx[2..], &sw[2..])?;
    if outs.iter().zip(&so[2..]).any(|(&o, &w)| o != w as i64) {
        return None;
    }
    let pad3 = |v: &[i64], fill: i64| -> [i64; 3] {
        let mut out = [fill; 3];
        out[3 - v.len()..].copy_from_slice(v);
        out
    };
    let to_i = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let get = |name: &str| -> Vec<i64> {
        a.opt_ints(name)
            .ok()
            .flatten()
            .unwrap_or_else(|| vec![1; sp])
    };
    let is = pad3(&to_i(&sx[2..]), 1);
    let os = pad3(&to_i(&so[2..]), 1);
    let ks = pad3(&to_i(&sw[2..]), 1);
    Some(ConvTParams {
        n: n as i64,
        c: c as i64,
        m: m as i64,
        cg: (c / g) as i64,
        mg: sw[1] as i64,
        kpos: ks.iter().product(),
        ipos: is.iter().product(),
        opos: os.iter().product(),
        is,
        os,
        ks,
        st: pad3(&get("strides"), 1),
        dl: pad3(&get("dilations"), 1),
        pb: pad3(&begins, 0),
    })
}

/// A ConvTranspose node on cuBLAS + NVRTC col2im.
#[derive(Debug, Clone)]
pub struct ConvTLayer {
    /// Tactic id.
    pub tactic: String,
    /// Geometry.
    pub p: ConvTParams,
    /// One GEMM per group (pointers offset per group at enqueue).
    pub gemm: GemmCall,
    /// The col2im module.
    pub src: KernelSource,
    /// A bias input is present.
    pub has_bias: bool,
    /// Element type.
    pub dtype: DType,
    /// Expected element counts of X, W and Y.
    pub sizes: [usize; 3],
}

impl ConvTLayer {
    fn groups(&self) -> i64 {
        self.p.c / self.p.cg
    }
}

impl GpuLayer for ConvTLayer {
    fn tactic(&self) -> String {
        self.tactic.clone()
    }
    fn sources(&self) -> Vec<KernelSource> {
        vec![self.src.clone()]
    }
    fn workspace_bytes(&self, _inputs: &[DevTensor]) -> usize {
        (self.p.n * self.p.m * self.p.kpos * self.p.ipos) as usize * self.dtype.size()
    }
    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        let (x, w, y) = crate::layer::product_io(&self.tactic, inputs, outputs, self.sizes)?;
        if [x.dtype, w.dtype, y.dtype] != [self.dtype; 3] {
            return Err(cuda_err(
                &self.tactic,
                format!(
                    "dtypes {} {} {} differ from the lowered {}",
                    x.dtype, w.dtype, y.dtype, self.dtype
                ),
            ));
        }
        let bias = if self.has_bias {
            match inputs.get(2) {
                Some(b) if b.ptr != 0 && b.len() == self.p.m as usize => b.ptr,
                _ => return Err(cuda_err(&self.tactic, "bias input missing or mis-sized")),
            }
        } else {
            0
        };
        let need = self.workspace_bytes(inputs);
        if cx.workspace_bytes < need {
            return Err(cuda_err(
                &self.tactic,
                format!("workspace of {} bytes, {need} needed", cx.workspace_bytes),
            ));
        }
        let es = self.dtype.size() as u64;
        let p = &self.p;
        for g in 0..self.groups() {
            let a = w.ptr + (g * p.cg * p.mg * p.kpos) as u64 * es;
            let b = x.ptr + (g * p.cg * p.ipos) as u64 * es;
            let c = cx.workspace + (g * p.mg * p.kpos * p.ipos) as u64 * es;
            self.gemm.enqueue(cx, &self.tactic, a, b, c, 1.0, 0.0)?;
        }
        let f = cx.modules.function(&self.src.module, "kiln_col2im_t")?;
        let total = p.n * p.m * p.opos;
        let col = cx.workspace;
        let mut lb = cx.stream.launch_builder(&f);
        lb.arg(&col).arg(&bias).arg(&y.ptr).arg(&total).arg(p);
        let cfg = LaunchConfig {
            grid_dim: (grid_for(total as usize), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: writes `total` = numel(Y) elements; reads the workspace columns (size
        // checked above) only at in-range input positions, and the bias (M elements, checked)
        // only when present.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(&self.tactic, e))?;
        Ok(())
    }
}

fn concrete(f: &Fact) -> Option<(DType, Vec<usize>)> {
    if f.kind != kiln_core::ValueKind::Tensor {
        return None;
    }
    Some((f.dtype?, f.concrete_shape()?))
}

/// Lowers a ConvTranspose node (F32/F16, 1-3 spatial dims); `None` leaves it to the CPU.
pub fn lower_conv_t(node: &Node, ins: &[Fact], outs: &[Fact]) -> Option<Result<ConvTLayer>> {
    if node.desc.op_type != "ConvTranspose" {
        return None;
    }
    let (dx, sx) = concrete(ins.first()?)?;
    let (dw, sw) = concrete(ins.get(1)?)?;
    let (dout, so) = concrete(outs.first()?)?;
    if !matches!(dx, DType::F32 | DType::F16) || dx != dw || dx != dout {
        return None;
    }
    if sx.contains(&0) || sw.contains(&0) || so.contains(&0) {
        return None;
    }
    let has_bias = matches!(node.inputs.get(2), Some(Some(_))) && ins.len() > 2;
    let p = conv_t_geometry(node, &sx, &sw, &so)?;
    let mut bias_dtype = dx;
    if has_bias {
        let (db, sb) = concrete(&ins[2])?;
        if !crate::library::bias_dtype_ok(dx, db) || sb != [p.m as usize] {
            return None;
        }
        bias_dtype = db;
    }
    let act = match fused_activation(node) {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let e = match &act {
        None => "acc".to_string(),
        Some((n, prm)) => crate::kernels::elementwise::activation_expr(n, prm, "acc")?,
    };
    let gemm = GemmCall {
        m: (p.mg * p.kpos) as usize,
        n: p.ipos as usize,
        k: p.cg as usize,
        batch: p.n as usize,
        trans_a: true,
        trans_b: false,
        stride_a: 0,
        stride_b: p.c * p.ipos,
        stride_c: p.m * p.kpos * p.ipos,
        dtype: dx,
    };
    let lim = i32::MAX as i64;
    if [p.mg * p.kpos, p.ipos, p.cg, p.n].iter().any(|&v| v > lim) {
        return None;
    }
    let largest = (p.n * p.m * p.kpos * p.ipos).max(p.n * p.m * p.opos);
    let idx = if largest < (1i64 << 31) {
        "typedef int I;\n"
    } else {
        "typedef long long I;\n"
    };
    let t = ctype(dx)?;
    let code = format!(
        "{pre}{idx}{CT_STRUCT}extern \"C\" __global__ void kiln_col2im_t(const {t}* col, const {tb}* bias, {t}* y, long long total, const CtP p) {{\n\
         I opos = (I)p.opos, m_ = (I)p.m;\n\
         I os1 = (I)p.os[1], os2 = (I)p.os[2], is0 = (I)p.is[0], is1 = (I)p.is[1], is2 = (I)p.is[2];\n\
         I ks0 = (I)p.ks[0], ks1 = (I)p.ks[1], ks2 = (I)p.ks[2];\n\
         for (long long j = KILN_TID; j < total; j += KILN_STRIDE) {{\n\
           I i = (I)j; I o = i % opos; I m = (i / opos) % m_; I n = i / (opos * m_);\n\
           I o2 = o % os2, o1 = (o / os2) % os1, o0 = o / (os2 * os1);\n\
           float acc = bias ? {lb} : 0.0f;\n\
           const {t}* cb = col + ((long long)n * p.m + m) * p.kpos * p.ipos;\n\
           for (I k0 = 0; k0 < ks0; ++k0) {{\n\
             I t0 = o0 + (I)p.pb[0] - k0 * (I)p.dl[0]; if (t0 < 0 || t0 % (I)p.st[0] != 0) continue; I i0 = t0 / (I)p.st[0]; if (i0 >= is0) continue;\n\
             for (I k1 = 0; k1 < ks1; ++k1) {{\n\
               I t1 = o1 + (I)p.pb[1] - k1 * (I)p.dl[1]; if (t1 < 0 || t1 % (I)p.st[1] != 0) continue; I i1 = t1 / (I)p.st[1]; if (i1 >= is1) continue;\n\
               for (I k2 = 0; k2 < ks2; ++k2) {{\n\
                 I t2 = o2 + (I)p.pb[2] - k2 * (I)p.dl[2]; if (t2 < 0 || t2 % (I)p.st[2] != 0) continue; I i2 = t2 / (I)p.st[2]; if (i2 >= is2) continue;\n\
                 acc += {lc};\n\
               }}\n\
             }}\n\
           }}\n\
           y[j] = {st};\n\
         }}\n}}\n",
        pre = prelude(&[dx, bias_dtype]),
        tb = ctype(bias_dtype)?,
        lb = load(bias_dtype, "bias[m]"),
        lc = load(dx, "cb[(long long)((k0 * ks1 + k1) * ks2 + k2) * p.ipos + (i0 * is1 + i1) * is2 + i2]"),
        st = store(dx, &e),
    );
    let dts = if dx == DType::F16 { "f16" } else { "f32" };
    Some(Ok(ConvTLayer {
        tactic: format!("cublas.gemm+nvrtc.col2im.{dts}"),
        p,
        gemm,
        src: source("col2im_t", code),
        has_bias,
        dtype: dx,
        sizes: [
            sx.iter().product(),
            sw.iter().product(),
            so.iter().product(),
        ],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{f, node};
    use kiln_core::Attr;

    fn geom(
        attrs: Vec<(&str, Attr)>,
        sx: &[usize],
        sw: &[usize],
        so: &[usize],
    ) -> Option<ConvTParams> {
        conv_t_geometry(&node("ConvTranspose", 11, attrs, 2, 1), sx, sw, so)
    }

    #[test]
    fn conv_transpose_geometry() {
        // 2x2 stride 2 (ppocr's upsampling): 5x7 -> 10x14.
        let p = geom(
            vec![("strides", Attr::Ints(vec![2, 2]))],
            &[1, 4, 5, 7],
            &[4, 3, 2, 2],
            &[1, 3, 10, 14],
        )
        .unwrap();
        assert_eq!((p.m, p.kpos, p.ipos, p.opos), (3, 4, 35, 140));
        assert_eq!(p.pb, [0, 0, 0]);
        // Pads, output_padding: (5-1)*2 + 1 + 3 - 1 - 1 = 10.
        let p = geom(
            vec![
                ("strides", Attr::Ints(vec![2])),
                ("pads", Attr::Ints(vec![1, 1])),
                ("output_padding", Attr::Ints(vec![1])),
            ],
            &[2, 4, 5],
            &[4, 2, 3],
            &[2, 2, 10],
        )
        .unwrap();
        assert_eq!(p.pb, [0, 0, 1]);
        // Groups: W [C, M/g, k]: M = 2 * 3.
        let p = geom(
            vec![("group", Attr::Int(2))],
            &[1, 4, 5],
            &[4, 3, 3],
            &[1, 6, 7],
        )
        .unwrap();
        assert_eq!((p.cg, p.mg, p.m), (2, 3, 6));
        // output_shape bigger than natural: 5 + 2 = 7 natural, ask 8 -> total -1,
        // NOTSET puts total - floor(total/2) = -1 - (-1) = 0 in front.
        let p = geom(
            vec![("output_shape", Attr::Ints(vec![8]))],
            &[1, 4, 5],
            &[4, 2, 3],
            &[1, 2, 8],
        )
        .unwrap();
        assert_eq!(p.pb, [0, 0, 0]);
        // SAME_UPPER: out = in * stride = 10; natural (5-1)*2+3 = 11, total 1, front 0.
        let p = geom(
            vec![
                ("auto_pad", Attr::String("SAME_UPPER".into())),
                ("strides", Attr::Ints(vec![2])),
            ],
            &[1, 4, 5],
            &[4, 2, 3],
            &[1, 2, 10],
        )
        .unwrap();
        assert_eq!(p.pb, [0, 0, 0]);
        // Wrong output size is refused.
        assert!(geom(vec![], &[1, 4, 5], &[4, 2, 3], &[1, 2, 8]).is_none());
    }

    #[test]
    fn conv_transpose_layer() {
        let n = node(
            "ConvTranspose",
            11,
            vec![("strides", Attr::Ints(vec![2, 2]))],
            3,
            1,
        );
        let l = lower_conv_t(
            &n,
            &[
                f(DType::F16, &[2, 4, 5, 7]),
                f(DType::F16, &[4, 3, 2, 2]),
                f(DType::F16, &[3]),
            ],
            &[f(DType::F16, &[2, 3, 10, 14])],
        )
        .unwrap()
        .unwrap();
        assert_eq!(l.tactic(), "cublas.gemm+nvrtc.col2im.f16");
        assert_eq!(l.workspace_bytes(&[]), 2 * 3 * 4 * 35 * 2);
        assert_eq!((l.gemm.m, l.gemm.n, l.gemm.k, l.gemm.batch), (12, 35, 4, 2));
        assert!(l.src.code.contains("__half2float(bias[m])"));
        assert!(l.has_bias);
        // An F32 bias under F16 data (how FP16 layers read it) is read as float; an F16
        // bias under F32 data is refused.
        let lower = |dx: DType, db: DType| {
            lower_conv_t(
                &n,
                &[f(dx, &[2, 4, 5, 7]), f(dx, &[4, 3, 2, 2]), f(db, &[3])],
                &[f(dx, &[2, 3, 10, 14])],
            )
        };
        let l = lower(DType::F16, DType::F32).unwrap().unwrap();
        assert!(l.src.code.contains("const float* bias"));
        assert!(!l.src.code.contains("__half2float(bias[m])"));
        assert!(lower(DType::F32, DType::F16).is_none());
    }
}
