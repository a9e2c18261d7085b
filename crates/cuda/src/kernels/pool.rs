//! MaxPool and AveragePool over 1 to 3 spatial dims (NCHW-style layout): one thread per
//! output element walks its window; `auto_pad`, pads, strides, dilations, `ceil_mode` (via
//! the inferred output shape) and `count_include_pad` follow the CPU reference's geometry.

use kiln_core::DType;

use super::common::{
    ctype, grid_for, is_kernel_float, load, prelude, source, store, KernelLayer, Params, Ptr, Step,
    BLOCK,
};
use super::LowerCx;

/// Source of the pooling kernel.
pub fn pool_code(dt: DType) -> Option<String> {
    let t = ctype(dt)?;
    Some(format!(
        "{pre}struct P {{ long long n; long long is_max; long long include_pad; long long id[3]; long long od[3]; long long k[3]; long long s[3]; long long dl[3]; long long pb[3]; long long pe[3]; }};\n\
__device__ __forceinline__ long long kiln_padded(const P& p, int d, long long o) {{\n\
  long long start = o * p.s[d];\n\
  long long lim = p.id[d] + p.pb[d] + p.pe[d] - start;\n\
  if (lim <= 0) return 0;\n\
  long long c = (lim + p.dl[d] - 1) / p.dl[d];\n\
  return c < p.k[d] ? c : p.k[d];\n\
}}\n\
extern \"C\" __global__ void kiln_pool(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  const long long plane = p.id[0] * p.id[1] * p.id[2];\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long rem = i;\n\
    long long o2 = rem % p.od[2]; rem /= p.od[2];\n\
    long long o1 = rem % p.od[1]; rem /= p.od[1];\n\
    long long o0 = rem % p.od[0]; rem /= p.od[0];\n\
    const {t}* xp = x + rem * plane;\n\
    float acc = p.is_max ? -KILN_INF : 0.0f; long long cnt = 0;\n\
    for (long long a = 0; a < p.k[0]; ++a) {{\n\
      long long c0 = o0 * p.s[0] + a * p.dl[0] - p.pb[0];\n\
      if (c0 < 0 || c0 >= p.id[0]) continue;\n\
      for (long long b = 0; b < p.k[1]; ++b) {{\n\
        long long c1 = o1 * p.s[1] + b * p.dl[1] - p.pb[1];\n\
        if (c1 < 0 || c1 >= p.id[1]) continue;\n\
        for (long long c = 0; c < p.k[2]; ++c) {{\n\
          long long c2 = o2 * p.s[2] + c * p.dl[2] - p.pb[2];\n\
          if (c2 < 0 || c2 >= p.id[2]) continue;\n\
          float v = {lv};\n\
          if (p.is_max) {{ if (cnt == 0 || v > acc) acc = v; }} else acc += v;\n\
          ++cnt;\n\
        }}\n\
      }}\n\
    }}\n\
    float r;\n\
    if (p.is_max) r = cnt ? acc : 0.0f;\n\
    else {{\n\
      long long div = p.include_pad ? kiln_padded(p, 0, o0) * kiln_padded(p, 1, o1) * kiln_padded(p, 2, o2) : cnt;\n\
      r = div ? acc / (float)div : 0.0f;\n\
    }}\n\
    y[i] = {st};\n\
  }}\n\
}}\n",
        pre = prelude(&[dt]),
        lv = load(dt, "xp[(c0 * p.id[1] + c1) * p.id[2] + c2]"),
        st = store(dt, "r"),
    ))
}

/// Lowers MaxPool / AveragePool.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let op = cx.op();
    if op != "MaxPool" && op != "AveragePool" {
        return None;
    }
    // MaxPool's Indices output is not produced here.
    if !cx.single_output() {
        return None;
    }
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    if !is_kernel_float(dt) || odt != dt || !(3..=5).contains(&r) || oshape.len() != r {
        return None;
    }
    if oshape[..2] != ishape[..2] {
        return None;
    }
    let nsp = r - 2;
    let a = cx.attrs();
    let list = |name: &str, default: i64| -> Option<Vec<i64>> {
        match a.opt_ints(name).ok()? {
            None => Some(vec![default; nsp]),
            Some(v) if v.len() == nsp && v.iter().all(|&x| x >= 1) => Some(v),
            Some(_) => None,
        }
    };
    let k = a.opt_ints("kernel_shape").ok()??;
    if k.len() != nsp || k.iter().any(|&x| x < 1) {
        return None;
    }
    let s = list("strides", 1)?;
    let dl = list("dilations", 1)?;
    if op == "AveragePool" && cx.opset() < 19 && a.has("dilations") {
        // Dilated average pooling only exists from opset 19.
        return None;
    }
    let input = &ishape[2..];
    let output = &oshape[2..];
    let (mut pb, mut pe) = (vec![0i64; nsp], vec![0i64; nsp]);
    match a.string("auto_pad", "NOTSET").ok()?.as_str() {
        "NOTSET" | "" => {
            if let Some(p) = a.opt_ints("pads").ok()? {
                if p.len() != 2 * nsp || p.iter().any(|&x| x < 0) {
                    return None;
                }
                pb.copy_from_slice(&p[..nsp]);
                pe.copy_from_slice(&p[nsp..]);
            }
        }
        "VALID" => {}
        m @ ("SAME_UPPER" | "SAME_LOWER") => {
            for d in 0..nsp {
                let (inp, kk, ss, dd) = (input[d] as i64, k[d], s[d], dl[d]);
                let eff = (kk - 1) * dd + 1;
                let out = (inp + ss - 1) / ss;
                let total = ((out - 1) * ss + eff - inp).max(0);
                let small = total / 2;
                if m == "SAME_UPPER" {
                    pb[d] = small;
                    pe[d] = total - small;
                } else {
                    pb[d] = total - small;
                    pe[d] = small;
                }
            }
        }
        _ => return None,
    }
    // Every window must start inside the padded input (ceil_mode's rule), or the output
    // shape was inferred differently from what this geometry gives.
    for d in 0..nsp {
        if output[d] == 0 || (output[d] as i64 - 1) * s[d] >= input[d] as i64 + pb[d] + pe[d] {
            return None;
        }
    }
    let pad3 = |v: &[i64], fill: i64| -> Vec<i64> {
        let mut o = vec![fill; 3 - nsp];
        o.extend_from_slice(v);
        o
    };
    let n: usize = oshape.iter().product();
    let include_pad = op == "AveragePool" && a.int("count_include_pad", 0).ok()? != 0;
    let mut p = Params::new();
    p.i(n as i64)
        .i((op == "MaxPool") as i64)
        .i(include_pad as i64)
        .arr(
            &pad3(&input.iter().map(|&x| x as i64).collect::<Vec<_>>(), 1),
            3,
            1,
        )
        .arr(
            &pad3(&output.iter().map(|&x| x as i64).collect::<Vec<_>>(), 1),
            3,
            1,
        )
        .arr(&pad3(&k, 1), 3, 1)
        .arr(&pad3(&s, 1), 3, 1)
        .arr(&pad3(&dl, 1), 3, 1)
        .arr(&pad3(&pb, 0), 3, 0)
        .arr(&pad3(&pe, 0), 3, 0);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    Some(KernelLayer {
        tactic: format!("nvrtc.pool.{op}.{}", dt.name()),
        src: Some(source("pool", pool_code(dt)?)),
        steps: vec![Step::Launch {
            func: "kiln_pool",
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        out_facts: vec![Some((odt, oshape))],
        work: 0,
    })
}

#[cfg(test)]
mod tests {
    use kiln_core::{Attr, DType};

    use super::*;
    use crate::kernels::testutil::{f, node};
    use crate::kernels::{lower_layer, LowerCx};

    #[test]
    fn pool_params() {
        let n = node(
            "MaxPool",
            12,
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
            1,
            1,
        );
        let fi = vec![f(DType::F32, &[1, 2, 7, 9])];
        let fo = vec![f(DType::F32, &[1, 2, 4, 5])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, .. } => {
                assert_eq!(&params.0[..3], &[40, 1, 0]);
                assert_eq!(&params.0[3..6], &[1, 7, 9]);
                assert_eq!(&params.0[6..9], &[1, 4, 5]);
            }
            _ => panic!(),
        }
        // Indices output requested: refused.
        let n2 = node(
            "MaxPool",
            12,
            vec![("kernel_shape", Attr::Ints(vec![3, 3]))],
            1,
            2,
        );
        let fo2 = vec![f(DType::F32, &[1, 2, 5, 7]), f(DType::I64, &[1, 2, 5, 7])];
        assert!(lower_layer(&LowerCx {
            node: &n2,
            inputs: &fi,
            outputs: &fo2
        })
        .is_none());
    }
}
