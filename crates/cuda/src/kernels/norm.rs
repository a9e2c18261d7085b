//! Normalizations: LayerNormalization and InstanceNormalization (one block per row: mean,
//! then variance of the centred values, in `float`), and BatchNormalization at inference
//! (an elementwise expression over the per-channel statistics, through
//! [`super::elementwise`]).

use kiln_core::DType;

use super::common::{
    ctype, is_kernel_float, load, prelude, source, store, KernelLayer, Params, Ptr, Step,
};
use super::elementwise::{self, EwSpec};
use super::reduce::{row_threads, BLOCK_REDUCE};
use super::LowerCx;

/// Source of the row-normalization kernel. `p.per_row` selects the parameter index:
/// 0 → scale/bias indexed by position in the row (LayerNorm), 1 → by `row % p.C`
/// (InstanceNorm).
pub fn rownorm_code(dt: DType, sdt: DType, bdt: DType) -> Option<String> {
    let t = ctype(dt)?;
    let ts = ctype(sdt)?;
    let tb = ctype(bdt)?;
    Some(format!(
        "{pre}{br}struct P {{ long long rows; long long R; long long C; long long per_row; long long has_bias; double eps; }};\n\
extern \"C\" __global__ void kiln_rownorm(const {t}* __restrict__ x, const {ts}* __restrict__ sc, const {tb}* __restrict__ bi, {t}* __restrict__ y, const P p) {{\n\
  __shared__ float sh[32];\n\
  for (long long row = blockIdx.x; row < p.rows; row += gridDim.x) {{\n\
    const long long base = row * p.R;\n\
    float s = 0.0f;\n\
    for (long long r = threadIdx.x; r < p.R; r += blockDim.x) s += {lx};\n\
    const float mean = kiln_block_sum(s, sh) / (float)p.R;\n\
    float q = 0.0f;\n\
    for (long long r = threadIdx.x; r < p.R; r += blockDim.x) {{ float d = {lx} - mean; q += d * d; }}\n\
    const float var = kiln_block_sum(q, sh) / (float)p.R;\n\
    const float inv = 1.0f / sqrtf(var + (float)p.eps);\n\
    const long long ch = row % p.C;\n\
    for (long long r = threadIdx.x; r < p.R; r += blockDim.x) {{\n\
      long long pi = p.per_row ? ch : r;\n\
      float v = ({lx} - mean) * inv * {ls};\n\
      if (p.has_bias) v += {lb};\n\
      y[base + r] = {st};\n\
    }}\n\
  }}\n\
}}\n",
        pre = prelude(&[dt, sdt, bdt]),
        br = BLOCK_REDUCE,
        lx = load(dt, "x[base + r]"),
        ls = load(sdt, "sc[pi]"),
        lb = load(bdt, "bi[pi]"),
        st = store(dt, "v"),
    ))
}

/// Lowers a normalization node.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if !cx.single_output() {
        return None;
    }
    match cx.op() {
        "LayerNormalization" | "InstanceNormalization" => rownorm(cx),
        "BatchNormalization" => batchnorm(cx),
        _ => None,
    }
}

fn rownorm(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (sdt, sshape) = cx.input(1)?;
    let out = cx.output(0)?;
    let r = ishape.len();
    if !is_kernel_float(dt) || !is_kernel_float(sdt) || out != (dt, ishape.clone()) || r == 0 {
        return None;
    }
    let a = cx.attrs();
    let eps = a.float("epsilon", 1e-5).ok()? as f64;
    let bias = if cx.present(2) {
        Some(cx.input(2)?)
    } else {
        None
    };
    let (rows, len, c, per_row) = if cx.op() == "LayerNormalization" {
        if a.int("stash_type", 1).ok()? != 1 {
            return None;
        }
        let axis = cx.axis(a.int("axis", -1).ok()?, r)?;
        let norm = &ishape[axis..];
        // Scale and bias must cover exactly the normalized dims (leading ones allowed).
        let len: usize = norm.iter().product();
        let fits = |s: &[usize]| {
            s.iter().product::<usize>() == len
                && super::common::broadcast_strides(s, norm).is_some()
        };
        if !fits(&sshape) || bias.as_ref().is_some_and(|(_, b)| !fits(b)) {
            return None;
        }
        (
            ishape[..axis].iter().product::<usize>(),
            norm.iter().product::<usize>(),
            1usize,
            0i64,
        )
    } else {
        if r < 2 || cx.n_in() != 3 {
            return None;
        }
        let c = ishape[1];
        if sshape != [c] || bias.as_ref().is_some_and(|(_, b)| b != &[c]) {
            return None;
        }
        (
            ishape[0] * c,
            ishape[2..].iter().product::<usize>(),
            c,
            1i64,
        )
    };
    if len == 0 || rows == 0 {
        return None;
    }
    let bdt = bias.as_ref().map(|b| b.0).unwrap_or(sdt);
    if !is_kernel_float(bdt) {
        return None;
    }
    let mut p = Params::new();
    p.i(rows as i64)
        .i(len as i64)
        .i(c as i64)
        .i(per_row)
        .i(bias.is_some() as i64)
        .f(eps);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    in_facts[1] = Some((sdt, sshape));
    if let Some(b) = &bias {
        in_facts[2] = Some(b.clone());
    }
    Some(KernelLayer {
        tactic: format!("nvrtc.norm.{}.{}", cx.op(), dt.name()),
        src: Some(source("norm", rownorm_code(dt, sdt, bdt)?)),
        steps: vec![Step::Launch {
            func: "kiln_rownorm",
            grid: rows.clamp(1, 1 << 20) as u32,
            block: row_threads(len),
            shmem: 0,
            ptrs: vec![
                Ptr::In(0, 0),
                Ptr::In(1, 0),
                if bias.is_some() {
                    Ptr::In(2, 0)
                } else {
                    Ptr::In(1, 0)
                },
                Ptr::Out(0, 0),
            ],
            params: p,
        }],
        in_facts,
        out_facts: vec![Some(out)],
        work: 0,
    })
}

fn batchnorm(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if cx.opset() < 9 || cx.n_in() != 5 {
        return None;
    }
    let a = cx.attrs();
    if a.int("training_mode", 0).ok()? != 0 {
        return None;
    }
    let eps = a.float("epsilon", 1e-5).ok()?;
    let (dt, ishape) = cx.input(0)?;
    let out = cx.output(0)?;
    if !is_kernel_float(dt) || out != (dt, ishape.clone()) || ishape.len() < 2 {
        return None;
    }
    let c = ishape[1];
    // Per-channel inputs are read as [C, 1, ..., 1] so numpy broadcasting lines them up.
    let mut chan = vec![c];
    chan.extend(std::iter::repeat_n(1, ishape.len() - 2));
    let mut ins = vec![(dt, ishape.clone())];
    for i in 1..5 {
        let (d, s) = cx.input(i)?;
        if s != [c] || !is_kernel_float(d) {
            return None;
        }
        ins.push((d, chan.clone()));
    }
    let spec = EwSpec {
        inputs: vec![0, 1, 2, 3, 4],
        expr: format!("((x0 - x3) * (x1 / sqrtf(x4 + {:e}f)) + x2)", eps),
    };
    let mut l = elementwise::build(
        format!("nvrtc.elementwise.BatchNormalization.{}", dt.name()),
        &spec,
        &ins,
        &out,
        5,
    )?;
    for i in 1..5 {
        l.in_facts[i] = cx.input(i);
    }
    Some(l)
}

#[cfg(test)]
mod tests {
    use kiln_core::{Attr, DType};

    use super::*;
    use crate::kernels::testutil::{f, node};
    use crate::kernels::{lower_layer, LowerCx};

    #[test]
    fn layernorm_shapes() {
        let n = node(
            "LayerNormalization",
            17,
            vec![("axis", Attr::Int(-1))],
            3,
            1,
        );
        let fi = vec![
            f(DType::F32, &[2, 5, 7]),
            f(DType::F32, &[7]),
            f(DType::F32, &[7]),
        ];
        let fo = vec![f(DType::F32, &[2, 5, 7])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, grid, .. } => {
                assert_eq!(&params.0[..5], &[10, 7, 1, 0, 1]);
                assert_eq!(*grid, 10);
            }
            _ => panic!(),
        }
        // Scale over the wrong dims is refused; Mean/InvStdDev outputs are refused.
        let bad = vec![
            f(DType::F32, &[2, 5, 7]),
            f(DType::F32, &[5]),
            f(DType::F32, &[7]),
        ];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &bad,
            outputs: &fo
        })
        .is_none());
        let n3 = node("LayerNormalization", 17, vec![], 3, 3);
        let fo3 = vec![
            fo[0].clone(),
            f(DType::F32, &[2, 5, 1]),
            f(DType::F32, &[2, 5, 1]),
        ];
        assert!(lower_layer(&LowerCx {
            node: &n3,
            inputs: &fi,
            outputs: &fo3
        })
        .is_none());
    }

    #[test]
    fn batchnorm_is_elementwise() {
        let n = node(
            "BatchNormalization",
            15,
            vec![("epsilon", Attr::Float(1e-3))],
            5,
            1,
        );
        let mut fi = vec![f(DType::F16, &[2, 3, 4, 4])];
        for _ in 0..4 {
            fi.push(f(DType::F16, &[3]));
        }
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi[..1],
        })
        .unwrap();
        assert!(l.src.unwrap().code.contains("sqrtf(x4 + 1e-3f)"));
        assert_eq!(l.in_facts[1], Some((DType::F16, vec![3])));
    }
}
