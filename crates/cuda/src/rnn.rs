//! ONNX LSTM on the GPU: one strided-batched cuBLAS GEMM projects the input of every time
//! step of every direction at once (`X · Wᵀ`), then per direction and time step one cuBLAS
//! GEMM forms `H · Rᵀ` and one NVRTC kernel applies biases, peepholes, clip and the
//! activations, updates the cell and hidden state and writes `Y`. `Y_h` / `Y_c` are written
//! from the final state of each direction.
//!
//! Taken: F32 tensors (the FP16 policy keeps recurrent layers in FP32), directions forward /
//! reverse / bidirectional, optional `B`, `sequence_lens` (int32 or int64, read on the device
//! at run time, clamped to `[0, seq]`), `initial_h`, `initial_c`, peepholes `P`, layouts 0
//! and 1, `clip`, `input_forget`, and every activation the CPU op knows (Sigmoid, Tanh, Relu,
//! Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign, Softplus, with
//! `activation_alpha` / `activation_beta` consumed as the CPU op does). Anything else
//! (other dtypes, unknown activations, shapes that do not match) returns `None` and the node
//! runs on the CPU.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use kiln_core::{AttrReader, DType, Fact, Node, Result};

use crate::kernels::common::{grid_for, prelude, source, BLOCK};
use crate::kernels::elementwise::fl;
use crate::layer::{cuda_err, DevTensor, GpuLayer, KernelSource, LaunchCx};
use crate::library::GemmCall;

/// Parameters of the LSTM kernels (mirrors `struct LstmP` in the generated code).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LstmParams {
    /// Time steps.
    pub seq: i64,
    /// Batch rows.
    pub batch: i64,
    /// Hidden size.
    pub hidden: i64,
    /// Directions (1 or 2).
    pub nd: i64,
    /// Direction of this launch.
    pub dir: i64,
    /// 1 when this direction runs backwards in time.
    pub rev: i64,
    /// ONNX layout (0: `[seq, batch, ...]`, 1: `[batch, seq, ...]`).
    pub layout: i64,
    /// 1 when `sequence_lens` is int64 (else int32).
    pub lens64: i64,
    /// Time step of a step launch.
    pub step: i64,
    /// Cell clip threshold (negative: none).
    pub clip: f64,
    /// 1 when the forget gate is `1 - i` (`input_forget`).
    pub input_forget: i64,
}

// SAFETY: repr(C) plain 8-byte integers and one double, valid for any bit pattern; mirrors
// the CUDA struct `LstmP` below field by field.
unsafe impl DeviceRepr for LstmParams {}

const LSTM_STRUCT: &str = "struct LstmP { long long seq, batch, hid, nd, dir, rev, layout, lens64, step; double clip; long long input_forget; };\n";

/// An activation of a recurrent cell as a CUDA expression of `x` (a `float`), consuming
/// alpha/beta values the way the CPU op does (ONNX Runtime's convention).
fn rnn_act(
    name: &str,
    alphas: &mut impl Iterator<Item = f32>,
    betas: &mut impl Iterator<Item = f32>,
) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let mut a = |d: f32| alphas.next().unwrap_or(d);
    Some(match lower.as_str() {
        "relu" => "fmaxf(x, 0.0f)".into(),
        "tanh" => "tanhf(x)".into(),
        "sigmoid" => "(1.0f / (1.0f + expf(-x)))".into(),
        "affine" => {
            let al = a(1.0);
            format!("({} * x + {})", fl(al), fl(betas.next().unwrap_or(0.0)))
        }
        "leakyrelu" => format!("(x < 0.0f ? {} * x : x)", fl(a(0.01))),
        "thresholdedrelu" => format!("(x < {} ? 0.0f : x)", fl(a(1.0))),
        "scaledtanh" => {
            let al = a(1.0);
            format!(
                "({} * tanhf({} * x))",
                fl(al),
                fl(betas.next().unwrap_or(1.0))
            )
        }
        "hardsigmoid" => {
            let al = a(0.2);
            format!(
                "fminf(fmaxf({} * x + {}, 0.0f), 1.0f)",
                fl(al),
                fl(betas.next().unwrap_or(0.5))
            )
        }
        "elu" => format!("(x < 0.0f ? {} * (expf(x) - 1.0f) : x)", fl(a(1.0))),
        "softsign" => "(x / (1.0f + fabsf(x)))".into(),
        "softplus" => "(fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))))".into(),
        _ => return None,
    })
}

/// The `3 · nd` activation expressions (f, g, h per direction), `None` when one is unknown
/// or the list has the wrong length.
fn activations(a: &AttrReader<'_>, nd: usize) -> Option<Vec<String>> {
    let Some(names) = a.opt_strings("activations").ok()? else {
        return Some(
            (0..nd)
                .flat_map(|_| {
                    [
                        "(1.0f / (1.0f + expf(-x)))".to_string(),
                        "tanhf(x)".to_string(),
                        "tanhf(x)".to_string(),
                    ]
                })
                .collect(),
        );
    };
    if names.len() != 3 * nd {
        return None;
    }
    let alphas = a.opt_floats("activation_alpha").ok()?.unwrap_or_default();
    let betas = a.opt_floats("activation_beta").ok()?.unwrap_or_default();
    let (mut al, mut be) = (alphas.into_iter(), betas.into_iter());
    names.iter().map(|n| rnn_act(n, &mut al, &mut be)).collect()
}

/// The CUDA module of an LSTM whose activations are `acts` (3 per direction).
fn lstm_source(acts: &[String]) -> KernelSource {
    let mut sw = String::new();
    for (i, e) in acts.iter().enumerate() {
        sw.push_str(&format!("    case {i}: return {e};\n"));
    }
    let code = format!(
        "{pre}{LSTM_STRUCT}\
__device__ __forceinline__ float kiln_act(int which, float x) {{\n  switch (which) {{\n{sw}    default: return x;\n  }}\n}}\n\
__device__ __forceinline__ float kiln_clip(const LstmP& p, float x) {{\n  if (p.clip >= 0.0) {{ float c = (float)p.clip; x = fminf(fmaxf(x, -c), c); }}\n  return x;\n}}\n\
__device__ __forceinline__ long long kiln_len(const LstmP& p, const void* lens, long long b) {{\n\
  if (!lens) return p.seq;\n\
  long long l = p.lens64 ? ((const long long*)lens)[b] : (long long)((const int*)lens)[b];\n\
  return l < 0 ? 0 : (l > p.seq ? p.seq : l);\n}}\n\
__device__ __forceinline__ long long kiln_sidx(const LstmP& p, long long b, long long j) {{\n\
  return p.layout ? (b * p.nd + p.dir) * p.hid + j : (p.dir * p.batch + b) * p.hid + j;\n}}\n\
extern \"C\" __global__ void kiln_lstm_init(const float* h0, const float* c0, float* h, float* c, float* y, long long ylen, const LstmP p) {{\n\
  long long n = p.batch * p.hid; long long total = ylen > n ? ylen : n;\n\
  for (long long i = KILN_TID; i < total; i += KILN_STRIDE) {{\n\
    if (y && i < ylen) y[i] = 0.0f;\n\
    if (i < n) {{ long long b = i / p.hid, j = i % p.hid; long long s = kiln_sidx(p, b, j);\n\
      h[i] = h0 ? h0[s] : 0.0f; c[i] = c0 ? c0[s] : 0.0f; }}\n\
  }}\n}}\n\
extern \"C\" __global__ void kiln_lstm_step(const float* proj, const float* rec, const float* bias, const float* peep, const void* lens, float* h, float* c, float* y, const LstmP p) {{\n\
  long long H = p.hid; long long n = p.batch * H; int a0 = (int)p.dir * 3;\n\
  for (long long i = KILN_TID; i < n; i += KILN_STRIDE) {{\n\
    long long b = i / H, j = i % H;\n\
    long long len = kiln_len(p, lens, b);\n\
    if (p.step >= len) continue;\n\
    long long t = p.rev ? len - 1 - p.step : p.step;\n\
    long long row = p.layout ? b * p.seq + t : t * p.batch + b;\n\
    const float* xp = proj + row * 4 * H; const float* rc = rec + b * 4 * H;\n\
    float gi = xp[j] + rc[j], go = xp[H + j] + rc[H + j], gf = xp[2 * H + j] + rc[2 * H + j], gc = xp[3 * H + j] + rc[3 * H + j];\n\
    if (bias) {{ gi += bias[j] + bias[4 * H + j]; go += bias[H + j] + bias[5 * H + j]; gf += bias[2 * H + j] + bias[6 * H + j]; gc += bias[3 * H + j] + bias[7 * H + j]; }}\n\
    float cp = c[i];\n\
    if (peep) {{ gi += peep[j] * cp; gf += peep[2 * H + j] * cp; }}\n\
    gi = kiln_act(a0, kiln_clip(p, gi));\n\
    gf = p.input_forget ? 1.0f - gi : kiln_act(a0, kiln_clip(p, gf));\n\
    gc = kiln_act(a0 + 1, kiln_clip(p, gc));\n\
    float cn = gf * cp + gi * gc;\n\
    if (peep) go += peep[H + j] * cn;\n\
    go = kiln_act(a0, kiln_clip(p, go));\n\
    float hn = go * kiln_act(a0 + 2, cn);\n\
    c[i] = cn; h[i] = hn;\n\
    if (y) {{ long long yi = p.layout ? ((b * p.seq + t) * p.nd + p.dir) * H + j : ((t * p.nd + p.dir) * p.batch + b) * H + j; y[yi] = hn; }}\n\
  }}\n}}\n\
extern \"C\" __global__ void kiln_lstm_final(const float* h, const float* c, float* yh, float* yc, const LstmP p) {{\n\
  long long n = p.batch * p.hid;\n\
  for (long long i = KILN_TID; i < n; i += KILN_STRIDE) {{\n\
    long long b = i / p.hid, j = i % p.hid; long long s = kiln_sidx(p, b, j);\n\
    if (yh) yh[s] = h[i];\n\
    if (yc) yc[s] = c[i];\n\
  }}\n}}\n",
        pre = prelude(&[DType::F32]),
    );
    source("lstm", code)
}

/// An LSTM node on cuBLAS and NVRTC (F32).
#[derive(Debug, Clone)]
pub struct LstmLayer {
    /// Tactic id.
    pub tactic: String,
    /// Sizes and switches (per-launch fields `dir`, `rev`, `step` are set at enqueue).
    pub p: LstmParams,
    /// Input size.
    pub input: usize,
    /// Directions that run backwards in time, per direction index.
    pub reversed: Vec<bool>,
    /// The module.
    pub src: KernelSource,
    /// Expected (dtype, shape) of each node input (None: absent).
    pub in_facts: Vec<Option<(DType, Vec<usize>)>>,
    /// Expected shape of each node output (None: absent).
    pub out_shapes: Vec<Option<Vec<usize>>>,
}

/// Rounds an element count up to 64 floats (256 bytes) so every workspace part is aligned.
fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

impl LstmLayer {
    fn rows(&self) -> usize {
        (self.p.seq * self.p.batch) as usize
    }
    fn gh(&self) -> usize {
        4 * self.p.hidden as usize
    }
    /// Workspace parts in floats: projection, recurrent product, h, c.
    fn parts(&self) -> [usize; 4] {
        let b = self.p.batch as usize;
        let h = self.p.hidden as usize;
        [
            align64(self.p.nd as usize * self.rows() * self.gh()),
            align64(b * self.gh()),
            align64(b * h),
            align64(b * h),
        ]
    }

    fn launch(
        &self,
        cx: &LaunchCx<'_>,
        func: &str,
        n: usize,
        ptrs: &[u64],
        extra: Option<i64>,
        p: &LstmParams,
    ) -> Result<()> {
        let f = cx.modules.function(&self.src.module, func)?;
        let mut b = cx.stream.launch_builder(&f);
        for a in ptrs {
            b.arg(a);
        }
        if let Some(e) = &extra {
            b.arg(e);
        }
        b.arg(p);
        let cfg = LaunchConfig {
            grid_dim: (grid_for(n), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the signatures are generated in `lstm_source` (pointers, optionally one
        // long long, then LstmP); every pointer is either 0 (checked in the kernel) or
        // addresses a tensor / workspace part whose size the layer checked against `p`.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&self.tactic, e))?;
        Ok(())
    }
}

impl GpuLayer for LstmLayer {
    fn tactic(&self) -> String {
        self.tactic.clone()
    }
    fn sources(&self) -> Vec<KernelSource> {
        vec![self.src.clone()]
    }
    fn workspace_bytes(&self, _inputs: &[DevTensor]) -> usize {
        self.parts().iter().sum::<usize>() * 4
    }
    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        let err = |m: String| cuda_err(&self.tactic, m);
        let mut inp = [0u64; 8];
        for (i, f) in self.in_facts.iter().enumerate() {
            let Some((dt, shape)) = f else { continue };
            let t = inputs
                .get(i)
                .ok_or_else(|| err(format!("input {i} was not given")))?;
            if t.dtype != *dt || t.shape.as_slice() != shape.as_slice() || t.ptr == 0 {
                return Err(err(format!(
                    "input {i}: expected {dt} {shape:?}, found {} {:?} at {:#x}",
                    t.dtype,
                    t.shape.as_slice(),
                    t.ptr
                )));
            }
            inp[i] = t.ptr;
        }
        let mut out = [0u64; 3];
        for (i, s) in self.out_shapes.iter().enumerate() {
            let Some(shape) = s else { continue };
            let t = outputs
                .get(i)
                .ok_or_else(|| err(format!("output {i} was not given")))?;
            if t.dtype != DType::F32 || t.shape.as_slice() != shape.as_slice() || t.ptr == 0 {
                return Err(err(format!(
                    "output {i}: expected f32 {shape:?}, found {} {:?}",
                    t.dtype,
                    t.shape.as_slice()
                )));
            }
            out[i] = t.ptr;
        }
        let need = self.workspace_bytes(inputs);
        if cx.workspace_bytes < need || cx.workspace == 0 {
            return Err(err(format!(
                "workspace of {} bytes, {need} needed",
                cx.workspace_bytes
            )));
        }
        let parts = self.parts();
        let proj = cx.workspace;
        let rec = proj + parts[0] as u64 * 4;
        let hs = rec + parts[1] as u64 * 4;
        let cs = hs + parts[2] as u64 * 4;
        let (rows, gh) = (self.rows(), self.gh());
        let (hid, input, nd) = (self.p.hidden as usize, self.input, self.p.nd as usize);
        // Input projection of every step of every direction: proj[d] = X · W[d]ᵀ.
        let projection = GemmCall {
            m: rows,
            n: gh,
            k: input,
            batch: nd,
            trans_a: false,
            trans_b: true,
            stride_a: 0,
            stride_b: (gh * input) as i64,
            stride_c: (rows * gh) as i64,
            dtype: DType::F32,
        };
        projection.enqueue(cx, &self.tactic, inp[0], inp[1], proj, 1.0, 0.0)?;
        let recurrent = GemmCall {
            m: self.p.batch as usize,
            n: gh,
            k: hid,
            batch: 1,
            trans_a: false,
            trans_b: true,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            dtype: DType::F32,
        };
        let state = self.p.batch as usize * hid;
        let ylen = self.out_shapes[0]
            .as_ref()
            .map_or(0, |s| s.iter().product::<usize>()) as i64;
        for dir in 0..nd {
            let mut p = self.p;
            p.dir = dir as i64;
            p.rev = self.reversed[dir] as i64;
            let (b_dir, p_dir) = (
                if inp[3] != 0 {
                    inp[3] + (dir * 2 * gh * 4) as u64
                } else {
                    0
                },
                if inp[7] != 0 {
                    inp[7] + (dir * 3 * hid * 4) as u64
                } else {
                    0
                },
            );
            let y0 = if dir == 0 { out[0] } else { 0 };
            self.launch(
                cx,
                "kiln_lstm_init",
                state.max(if dir == 0 { ylen as usize } else { 0 }),
                &[inp[5], inp[6], hs, cs, y0],
                Some(if dir == 0 { ylen } else { 0 }),
                &p,
            )?;
            let r_dir = inp[2] + (dir * gh * hid * 4) as u64;
            let proj_dir = proj + (dir * rows * gh * 4) as u64;
            for step in 0..self.p.seq {
                p.step = step;
                recurrent.enqueue(cx, &self.tactic, hs, r_dir, rec, 1.0, 0.0)?;
                self.launch(
                    cx,
                    "kiln_lstm_step",
                    state,
                    &[proj_dir, rec, b_dir, p_dir, inp[4], hs, cs, out[0]],
                    None,
                    &p,
                )?;
            }
            if out[1] != 0 || out[2] != 0 {
                self.launch(
                    cx,
                    "kiln_lstm_final",
                    state,
                    &[hs, cs, out[1], out[2]],
                    None,
                    &p,
                )?;
            }
        }
        Ok(())
    }
}

fn concrete(f: &Fact) -> Option<(DType, Vec<usize>)> {
    if f.kind != kiln_core::ValueKind::Tensor {
        return None;
    }
    Some((f.dtype?, f.concrete_shape()?))
}

/// Lowers an ONNX LSTM node (see the module doc for what is taken); `None` leaves it to the
/// CPU.
pub fn lower_lstm(node: &Node, ins: &[Fact], outs: &[Fact]) -> Option<Result<LstmLayer>> {
    if node.desc.op_type != "LSTM" || !kiln_core::op::normalize_domain(&node.desc.domain).is_empty()
    {
        return None;
    }
    let a = AttrReader {
        node: &node.name,
        desc: &node.desc,
    };
    let present = |v: &[Option<usize>], i: usize| matches!(v.get(i), Some(Some(_)));
    let nd = match a.string("direction", "forward").ok()?.as_str() {
        "forward" | "foward" | "reverse" => 1usize,
        "bidirectional" => 2,
        _ => return None,
    };
    let dir_name = a.string("direction", "forward").ok()?;
    let layout = a.int("layout", 0).ok()?;
    if layout != 0 && layout != 1 {
        return None;
    }
    let clip = match a.opt_float("clip").ok()? {
        Some(c) if c >= 0.0 => c as f64,
        Some(_) => return None,
        None => -1.0,
    };
    let input_forget = a.int("input_forget", 0).ok()? != 0;
    let acts = activations(&a, nd)?;
    if node.inputs.len() > 8 || node.outputs.len() > 3 || node.outputs.is_empty() {
        return None;
    }
    if !(0..3).all(|i| present(&node.inputs, i)) {
        return None;
    }
    let (dx, sx) = concrete(ins.first()?)?;
    let (dw, sw) = concrete(ins.get(1)?)?;
    let (dr, sr) = concrete(ins.get(2)?)?;
    if dx != DType::F32 || dw != DType::F32 || dr != DType::F32 {
        return None;
    }
    if sx.len() != 3 || sw.len() != 3 || sr.len() != 3 {
        return None;
    }
    let (seq, batch) = if layout == 0 {
        (sx[0], sx[1])
    } else {
        (sx[1], sx[0])
    };
    let input = sx[2];
    let hidden = sr[2];
    if let Ok(Some(h)) = a.opt_int("hidden_size") {
        if h != hidden as i64 {
            return None;
        }
    }
    if seq == 0 || batch == 0 || hidden == 0 || input == 0 {
        return None;
    }
    let gh = 4 * hidden;
    if sw != [nd, gh, input] || sr != [nd, gh, hidden] {
        return None;
    }
    let state = if layout == 0 {
        vec![nd, batch, hidden]
    } else {
        vec![batch, nd, hidden]
    };
    let mut in_facts: Vec<Option<(DType, Vec<usize>)>> = vec![
        Some((DType::F32, sx.clone())),
        Some((DType::F32, sw)),
        Some((DType::F32, sr)),
    ];
    let mut lens64 = 0;
    for i in 3..8 {
        if !present(&node.inputs, i) {
            in_facts.push(None);
            continue;
        }
        let (dt, s) = concrete(ins.get(i)?)?;
        let want: Vec<usize> = match i {
            3 => vec![nd, 8 * hidden],
            4 => vec![batch],
            5 | 6 => state.clone(),
            _ => vec![nd, 3 * hidden],
        };
        if s != want {
            return None;
        }
        if i == 4 {
            match dt {
                DType::I32 => {}
                DType::I64 => lens64 = 1,
                _ => return None,
            }
        } else if dt != DType::F32 {
            return None;
        }
        in_facts.push(Some((dt, s)));
    }
    let y_shape = if layout == 0 {
        vec![seq, nd, batch, hidden]
    } else {
        vec![batch, seq, nd, hidden]
    };
    let mut out_shapes = Vec::new();
    for i in 0..node.outputs.len() {
        if !present(&node.outputs, i) {
            out_shapes.push(None);
            continue;
        }
        let (dt, s) = concrete(outs.get(i)?)?;
        let want = if i == 0 { &y_shape } else { &state };
        if dt != DType::F32 || &s != want {
            return None;
        }
        out_shapes.push(Some(s));
    }
    if out_shapes.iter().all(|s| s.is_none()) {
        return None;
    }
    // cuBLAS takes 32-bit sizes.
    let lim = i32::MAX as usize;
    if seq * batch > lim || gh > lim || input > lim {
        return None;
    }
    let reversed = (0..nd)
        .map(|d| dir_name == "reverse" || (nd == 2 && d == 1))
        .collect();
    Some(Ok(LstmLayer {
        tactic: "cublas+nvrtc.lstm.f32".into(),
        p: LstmParams {
            seq: seq as i64,
            batch: batch as i64,
            hidden: hidden as i64,
            nd: nd as i64,
            dir: 0,
            rev: 0,
            layout,
            lens64,
            step: 0,
            clip,
            input_forget: input_forget as i64,
        },
        input,
        reversed,
        src: lstm_source(&acts),
        in_facts,
        out_shapes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{f, node};
    use kiln_core::Attr;

    fn facts(x: &[usize], nd: usize, h: usize, i: usize) -> Vec<Fact> {
        vec![
            f(DType::F32, x),
            f(DType::F32, &[nd, 4 * h, i]),
            f(DType::F32, &[nd, 4 * h, h]),
        ]
    }

    #[test]
    fn lstm_lowering_decisions() {
        let n = node(
            "LSTM",
            14,
            vec![("direction", Attr::String("bidirectional".into()))],
            3,
            3,
        );
        let fin = facts(&[5, 3, 7], 2, 9, 7);
        let fout = vec![
            f(DType::F32, &[5, 2, 3, 9]),
            f(DType::F32, &[2, 3, 9]),
            f(DType::F32, &[2, 3, 9]),
        ];
        let l = lower_lstm(&n, &fin, &fout).unwrap().unwrap();
        assert_eq!(l.reversed, vec![false, true]);
        assert_eq!(l.tactic(), "cublas+nvrtc.lstm.f32");
        let code = &l.sources()[0].code;
        for k in [
            "kiln_lstm_init",
            "kiln_lstm_step",
            "kiln_lstm_final",
            "case 5:",
        ] {
            assert!(code.contains(k), "{k}");
        }
        // Workspace: projection 2*15*36 (1080 -> 1088), rec 3*36 (108 -> 128), h and c
        // 27 -> 64 each, in floats.
        assert_eq!(l.workspace_bytes(&[]), (1088 + 128 + 64 + 64) * 4);
        // F16 and unknown activations stay on the CPU.
        let f16: Vec<Fact> = fin
            .iter()
            .map(|x| f(DType::F16, &x.concrete_shape().unwrap()))
            .collect();
        assert!(lower_lstm(&n, &f16, &fout).is_none());
        let mut bad = n.clone();
        bad.desc.attrs.insert(
            "activations".into(),
            Attr::Strings(vec!["Sigmoid".into(), "Nonesuch".into(), "Tanh".into()]),
        );
        assert!(lower_lstm(&bad, &fin, &fout).is_none());
        // Wrong output shape (layout 1 expected) is refused.
        let mut l1 = n.clone();
        l1.desc.attrs.insert("layout".into(), Attr::Int(1));
        assert!(lower_lstm(&l1, &fin, &fout).is_none());
    }

    #[test]
    fn activation_parameters_follow_the_cpu_convention() {
        let (mut a, mut b) = (vec![0.5f32, 2.0].into_iter(), vec![3.0f32].into_iter());
        assert_eq!(
            rnn_act("LeakyRelu", &mut a, &mut b).unwrap(),
            "(x < 0.0f ? 5e-1f * x : x)"
        );
        assert_eq!(
            rnn_act("ScaledTanh", &mut a, &mut b).unwrap(),
            "(2e0f * tanhf(3e0f * x))"
        );
        assert!(rnn_act("Gelu", &mut a, &mut b).is_none());
    }
}
