//! Library layers: MatMul and Gemm through cuBLAS (`cublasGemmStridedBatchedEx`, FP32
//! accumulation, TF32 only when asked), and Conv as an NVRTC im2col kernel plus a cuBLAS
//! GEMM (groups = 1; 1×1 stride-1 unpadded convolutions skip the im2col) or an NVRTC direct
//! convolution (groups > 1). Bias and kiln's fused activation (`kiln_activation`) run in one
//! NVRTC epilogue launch after the GEMM.
//!
//! [`lower`] returns `None` for nodes it does not take (wrong op, dtype, broadcast pattern
//! or sizes beyond cuBLAS's 32-bit arguments); the executor then tries the NVRTC kernels and
//! finally the CPU.

use cudarc::cublas::sys as cb;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use kiln_core::{Attr, AttrReader, DType, Fact, KilnError, Node, Result};

use crate::kernels::common::{
    broadcast_strides, ctype, grid_for, load, prelude, source, store, BLOCK,
};
use crate::kernels::elementwise::activation_expr;
use crate::layer::{cuda_err, DevTensor, GpuLayer, KernelSource, LaunchCx};

/// Attribute naming kiln's fused activation (see `kiln_cpu::fused`).
pub const ACTIVATION_ATTR: &str = "kiln_activation";
/// Attribute holding the fused activation's parameters.
pub const ACTIVATION_PARAMS_ATTR: &str = "kiln_activation_params";

/// One strided-batched row-major GEMM: `C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b]`
/// with `op(A)` of shape `[m, k]` and `op(B)` of shape `[k, n]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmCall {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Number of products.
    pub batch: usize,
    /// A is stored `[k, m]`.
    pub trans_a: bool,
    /// B is stored `[n, k]`.
    pub trans_b: bool,
    /// Elements between consecutive A matrices (0: shared).
    pub stride_a: i64,
    /// Elements between consecutive B matrices (0: shared).
    pub stride_b: i64,
    /// Elements between consecutive C matrices.
    pub stride_c: i64,
    /// Element type of A, B and C (F32 or F16).
    pub dtype: DType,
}

impl GemmCall {
    fn fits(&self) -> bool {
        let lim = i32::MAX as usize;
        self.m <= lim && self.n <= lim && self.k <= lim && self.batch <= lim && self.m * self.n > 0
    }

    /// Enqueues the product on the cuBLAS handle of `cx` (bound to `cx.stream`).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        tactic: &str,
        a: u64,
        b: u64,
        c: u64,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let blas = cx
            .blas
            .ok_or_else(|| cuda_err(tactic, "no cuBLAS handle in this launch"))?;
        let (dt, compute) = match self.dtype {
            DType::F32 => (
                cb::cudaDataType::CUDA_R_32F,
                if cx.tf32 {
                    cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
                } else {
                    cb::cublasComputeType_t::CUBLAS_COMPUTE_32F
                },
            ),
            DType::F16 => (
                cb::cudaDataType::CUDA_R_16F,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            other => {
                return Err(cuda_err(
                    tactic,
                    format!("GEMM on {other} is not supported"),
                ))
            }
        };
        let op = |t: bool| {
            if t {
                cb::cublasOperation_t::CUBLAS_OP_T
            } else {
                cb::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
        let ld_b = if self.trans_b { self.k } else { self.n };
        let ld_a = if self.trans_a { self.m } else { self.k };
        // SAFETY: the handle is live and bound to the inference stream; a, b and c address
        // tensors whose shapes the executor checked against this call's sizes; alpha and
        // beta are host floats (host pointer mode, FP32 compute type).
        let st = unsafe {
            cb::cublasGemmStridedBatchedEx(
                *blas.handle(),
                op(self.trans_b),
                op(self.trans_a),
                self.n as i32,
                self.m as i32,
                self.k as i32,
                &alpha as *const f32 as *const std::ffi::c_void,
                b as *const std::ffi::c_void,
                dt,
                ld_b as i32,
                self.stride_b,
                a as *const std::ffi::c_void,
                dt,
                ld_a as i32,
                self.stride_a,
                &beta as *const f32 as *const std::ffi::c_void,
                c as *mut std::ffi::c_void,
                dt,
                self.n as i32,
                self.stride_c,
                self.batch as i32,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if st != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cuda_err(
                tactic,
                format!("cublasGemmStridedBatchedEx: {st:?}"),
            ));
        }
        Ok(())
    }
}

/// Bias add (broadcast over a coalesced `[d0, d1, d2]` view of the output) and activation,
/// applied in place to a GEMM's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Epilogue {
    /// The module.
    pub src: KernelSource,
    /// Output viewed as `[d0, d1, d2]`.
    pub dims: [i64; 3],
    /// Bias strides over that view (None: no bias).
    pub bias: Option<[i64; 3]>,
    /// Element type of the bias (F32 under an FP16 output: see
    /// [`crate::precision::reads_f32`]).
    pub bias_dtype: DType,
    /// Factor of the bias.
    pub beta: f32,
}

/// The fused activation of a node: `(name, params)`, `None` when absent.
pub fn fused_activation(node: &Node) -> Result<Option<(String, Vec<f32>)>> {
    let a = AttrReader {
        node: &node.name,
        desc: &node.desc,
    };
    let Some(name) = a.opt_string(ACTIVATION_ATTR)? else {
        return Ok(None);
    };
    let p = a.opt_floats(ACTIVATION_PARAMS_ATTR)?.unwrap_or_default();
    Ok(if name == "None" {
        None
    } else {
        Some((name, p))
    })
}

pub(crate) fn act_code(act: &Option<(String, Vec<f32>)>, x: &str) -> Option<String> {
    match act {
        None => Some(x.to_string()),
        Some((n, p)) => activation_expr(n, p, x),
    }
}

impl Epilogue {
    /// An epilogue for output `dtype` with a bias of `bias_dtype`, or `None` when there is
    /// nothing to do or the activation has no CUDA expression.
    pub fn new(
        dtype: DType,
        bias_dtype: DType,
        dims: [i64; 3],
        bias: Option<[i64; 3]>,
        beta: f32,
        act: &Option<(String, Vec<f32>)>,
    ) -> Option<Option<Epilogue>> {
        if bias.is_none() && act.is_none() {
            return Some(None);
        }
        let t = ctype(dtype)?;
        let tb = ctype(bias_dtype)?;
        let e = act_code(act, "v")?;
        let code = format!(
            "{pre}extern \"C\" __global__ void kiln_epilogue({t}* out, const {tb}* bias, long long n, long long d1, long long d2, long long s0, long long s1, long long s2, float beta, int has_bias) {{\n\
             for (long long i = KILN_TID; i < n; i += KILN_STRIDE) {{\n\
               float v = {lo};\n\
               if (has_bias) {{ long long i2 = i % d2; long long i1 = (i / d2) % d1; long long i0 = i / (d1 * d2);\n\
                 v += beta * {lb}; }}\n\
               out[i] = {st};\n\
             }}\n}}\n",
            pre = prelude(&[dtype, bias_dtype]),
            lo = load(dtype, "out[i]"),
            lb = load(bias_dtype, "bias[i0 * s0 + i1 * s1 + i2 * s2]"),
            st = store(dtype, &e),
        );
        Some(Some(Epilogue {
            src: source("epilogue", code),
            dims,
            bias,
            bias_dtype,
            beta,
        }))
    }

    /// Launches the epilogue on `out` in place (`bias`: the bias tensor's address, or 0).
    pub(crate) fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        tactic: &str,
        out: u64,
        bias: u64,
    ) -> Result<()> {
        let f = cx.modules.function(&self.src.module, "kiln_epilogue")?;
        let n = self.dims[0] * self.dims[1] * self.dims[2];
        let s = self.bias.unwrap_or([0; 3]);
        let has = self.bias.is_some() as i32;
        let mut b = cx.stream.launch_builder(&f);
        b.arg(&out)
            .arg(&bias)
            .arg(&n)
            .arg(&self.dims[1])
            .arg(&self.dims[2])
            .arg(&s[0])
            .arg(&s[1])
            .arg(&s[2])
            .arg(&self.beta)
            .arg(&has);
        let cfg = LaunchConfig {
            grid_dim: (grid_for(n as usize), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: signature generated above; `out` holds n elements, `bias` is read only at
        // broadcast offsets inside the bias tensor (checked at lowering).
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(tactic, e))?;
        Ok(())
    }
}

/// A MatMul or Gemm node on cuBLAS.
#[derive(Debug, Clone)]
pub struct MatMulLayer {
    /// Tactic id.
    pub tactic: String,
    /// The product.
    pub gemm: GemmCall,
    /// `alpha` of Gemm (1 for MatMul).
    pub alpha: f32,
    /// Index of the bias input (Gemm's C), if any.
    pub bias_input: Option<usize>,
    /// Bias and activation.
    pub epilogue: Option<Epilogue>,
    /// Expected element counts of A, B and the output.
    pub sizes: [usize; 3],
}

impl GpuLayer for MatMulLayer {
    fn tactic(&self) -> String {
        self.tactic.clone()
    }
    fn sources(&self) -> Vec<KernelSource> {
        self.epilogue.iter().map(|e| e.src.clone()).collect()
    }
    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        let (a, b, o) = crate::layer::product_io(&self.tactic, inputs, outputs, self.sizes)?;
        self.gemm
            .enqueue(cx, &self.tactic, a.ptr, b.ptr, o.ptr, self.alpha, 0.0)?;
        if let Some(e) = &self.epilogue {
            let bias = match self.bias_input {
                Some(i) => inputs.get(i).map(|t| t.ptr).unwrap_or(0),
                None => 0,
            };
            e.enqueue(cx, &self.tactic, o.ptr, bias)?;
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

fn is_gemm_dtype(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16)
}

/// A bias of dtype `bias` can be added to a product of dtype `data`: the same type, or F32
/// under F16 (FP16 layers read their bias in F32, [`crate::precision::reads_f32`]).
pub(crate) fn bias_dtype_ok(data: DType, bias: DType) -> bool {
    bias == data || (data == DType::F16 && bias == DType::F32)
}

fn lower_matmul(node: &Node, ins: &[Fact], outs: &[Fact]) -> Option<Result<MatMulLayer>> {
    let (da, sa) = concrete(ins.first()?)?;
    let (db, sb) = concrete(ins.get(1)?)?;
    let (dout, so) = concrete(outs.first()?)?;
    if !(is_gemm_dtype(da) && da == db && da == dout) || sa.is_empty() || sb.is_empty() {
        return None;
    }
    let a2 = if sa.len() == 1 {
        vec![1, sa[0]]
    } else {
        sa.clone()
    };
    let b2 = if sb.len() == 1 {
        vec![sb[0], 1]
    } else {
        sb.clone()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return None;
    }
    let ba = &a2[..a2.len() - 2];
    let bb = &b2[..b2.len() - 2];
    let pa: usize = ba.iter().product();
    let pb: usize = bb.iter().product();
    let r = ba.len().max(bb.len());
    let pad = |v: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, r - v.len())
            .chain(v.iter().copied())
            .collect()
    };
    let (gm, batch, sa_, sb_) = if pb == 1 {
        (m * pa, 1, 0, 0)
    } else if pad(ba) == pad(bb) {
        (m, pa, (m * k) as i64, (k * n) as i64)
    } else if pa == 1 {
        (m, pb, 0, (k * n) as i64)
    } else {
        return None;
    };
    let numel_out: usize = so.iter().product();
    if numel_out != batch * gm * n || k == 0 {
        return None;
    }
    let gemm = GemmCall {
        m: gm,
        n,
        k,
        batch,
        trans_a: false,
        trans_b: false,
        stride_a: sa_,
        stride_b: sb_,
        stride_c: (gm * n) as i64,
        dtype: da,
    };
    if !gemm.fits() {
        return None;
    }
    let act = match fused_activation(node) {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let epilogue = Epilogue::new(da, da, [1, 1, numel_out as i64], None, 0.0, &act)?;
    let dt = if da == DType::F16 { "f16" } else { "f32" };
    Some(Ok(MatMulLayer {
        tactic: format!(
            "cublas.gemm.{dt}{}",
            if epilogue.is_some() { "+epilogue" } else { "" }
        ),
        gemm,
        alpha: 1.0,
        bias_input: None,
        epilogue,
        sizes: [sa.iter().product(), sb.iter().product(), numel_out],
    }))
}

fn lower_gemm(node: &Node, ins: &[Fact], outs: &[Fact]) -> Option<Result<MatMulLayer>> {
    let a = AttrReader {
        node: &node.name,
        desc: &node.desc,
    };
    let (da, sa) = concrete(ins.first()?)?;
    let (db, sb) = concrete(ins.get(1)?)?;
    let (dout, so) = concrete(outs.first()?)?;
    if !(is_gemm_dtype(da) && da == db && da == dout) || sa.len() != 2 || sb.len() != 2 {
        return None;
    }
    let ta = a.int("transA", 0).ok()? != 0;
    let tb = a.int("transB", 0).ok()? != 0;
    let alpha = a.float("alpha", 1.0).ok()?;
    let beta = a.float("beta", 1.0).ok()?;
    let (m, k) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (k2, n) = if tb { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    if k != k2 || so != [m, n] || k == 0 {
        return None;
    }
    let has_c = matches!(node.inputs.get(2), Some(Some(_))) && ins.len() > 2;
    let mut bias_dtype = da;
    let bias = if has_c && beta != 0.0 {
        let (dc, sc) = concrete(&ins[2])?;
        if !bias_dtype_ok(da, dc) {
            return None;
        }
        bias_dtype = dc;
        let s = broadcast_strides(&sc, &[m, n])?;
        Some([0, s[0], s[1]])
    } else {
        None
    };
    let gemm = GemmCall {
        m,
        n,
        k,
        batch: 1,
        trans_a: ta,
        trans_b: tb,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
        dtype: da,
    };
    if !gemm.fits() {
        return None;
    }
    let act = match fused_activation(node) {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let epilogue = Epilogue::new(da, bias_dtype, [1, m as i64, n as i64], bias, beta, &act)?;
    let dt = if da == DType::F16 { "f16" } else { "f32" };
    Some(Ok(MatMulLayer {
        tactic: format!(
            "cublas.gemm.{dt}{}",
            if epilogue.is_some() { "+epilogue" } else { "" }
        ),
        gemm,
        alpha,
        bias_input: bias.map(|_| 2),
        epilogue,
        sizes: [sa.iter().product(), sb.iter().product(), m * n],
    }))
}

/// Geometry of a convolution, spatial dims padded in front to 3 (`[1, H, W]` for 2-D).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvParams {
    /// Batch.
    pub n: i64,
    /// Input channels.
    pub c: i64,
    /// Output channels.
    pub m: i64,
    /// Input channels per group.
    pub cg: i64,
    /// Output channels per group.
    pub mg: i64,
    /// Kernel positions (product of `ks`).
    pub kpos: i64,
    /// Output positions (product of `os`).
    pub opos: i64,
    /// Input positions (product of `is`).
    pub ipos: i64,
    /// Input spatial dims.
    pub is: [i64; 3],
    /// Output spatial dims.
    pub os: [i64; 3],
    /// Kernel dims.
    pub ks: [i64; 3],
    /// Strides.
    pub st: [i64; 3],
    /// Dilations.
    pub dl: [i64; 3],
    /// Leading pads.
    pub pb: [i64; 3],
}

// SAFETY: repr(C) plain integers, valid for any bit pattern; mirrors the CUDA struct below.
unsafe impl DeviceRepr for ConvParams {}

/// The parameter struct and the input-position helper of the convolution kernels. Index
/// math runs in `I` (`int` when every offset fits in 31 bits: 64-bit division is several
/// times slower on the GPU, and im2col is index-bound).
pub(crate) const CONV_STRUCT: &str = "struct ConvP { long long n, c, m, cg, mg, kpos, opos, ipos; long long is[3], os[3], ks[3], st[3], dl[3], pb[3]; };\n\
__device__ __forceinline__ bool kiln_conv_in(const ConvP& p, I kidx, I o, I* off) {\n\
  I ks2 = (I)p.ks[2], ks1 = (I)p.ks[1], os2 = (I)p.os[2], os1 = (I)p.os[1];\n\
  I k2 = kidx % ks2, k1 = (kidx / ks2) % ks1, k0 = kidx / (ks2 * ks1);\n\
  I o2 = o % os2, o1 = (o / os2) % os1, o0 = o / (os2 * os1);\n\
  I i0 = o0 * (I)p.st[0] - (I)p.pb[0] + k0 * (I)p.dl[0];\n\
  I i1 = o1 * (I)p.st[1] - (I)p.pb[1] + k1 * (I)p.dl[1];\n\
  I i2 = o2 * (I)p.st[2] - (I)p.pb[2] + k2 * (I)p.dl[2];\n\
  if (i0 < 0 || i0 >= (I)p.is[0] || i1 < 0 || i1 >= (I)p.is[1] || i2 < 0 || i2 >= (I)p.is[2]) return false;\n\
  *off = (i0 * (I)p.is[1] + i1) * (I)p.is[2] + i2; return true;\n}\n";

/// `typedef` of the index type for a convolution whose largest tensor has `max_elems`
/// elements.
fn index_typedef(max_elems: i64) -> &'static str {
    if max_elems < (1i64 << 31) {
        "typedef int I;\n"
    } else {
        "typedef long long I;\n"
    }
}

/// How a convolution runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ConvTactic {
    /// 1×1, stride 1, no padding, groups 1: one batched GEMM straight on the input.
    Gemm1x1(GemmCall),
    /// im2col into the workspace, then one batched GEMM.
    Im2col(GemmCall),
    /// One thread per output element (groups > 1).
    Direct,
    /// cuDNN (`cudnnConvolutionForward`, NCHW), any groups.
    Cudnn(std::sync::Arc<crate::dnn::DnnConv>),
}

impl PartialEq for crate::dnn::DnnConv {
    fn eq(&self, o: &Self) -> bool {
        (self.p, self.spatial, self.dtype, self.forced) == (o.p, o.spatial, o.dtype, o.forced)
    }
}

/// Attribute (string) choosing a GPU layer's implementation: for Conv `cudnn` (cuDNN's
/// heuristic algorithm), `cudnn.<algo>` (that `cudnnConvolutionFwdAlgo_t`), or `kiln`
/// (kiln's own GEMM / im2col / direct paths). Set by the GPU tuner; absent = heuristics
/// (cuDNN where it loads and fits, else kiln's paths).
pub const GPU_TACTIC_ATTR: &str = "kiln_gpu_tactic";

/// How a Conv node's GPU tactic attribute asks it to run: `None` = cuDNN, or `Some(algo)`;
/// `Err(())` = kiln's own paths.
fn conv_choice(node: &Node) -> Result<std::result::Result<Option<u32>, ()>> {
    let a = AttrReader {
        node: &node.name,
        desc: &node.desc,
    };
    match a.opt_string(GPU_TACTIC_ATTR)? {
        None if crate::dnn::available() => Ok(Ok(None)),
        None => Ok(Err(())),
        Some(s) if s == "kiln" => Ok(Err(())),
        Some(s) if s == "cudnn" => Ok(Ok(None)),
        Some(s) => match s.strip_prefix("cudnn.").and_then(|n| n.parse::<u32>().ok()) {
            Some(n) if crate::dnn::algo_of(n).is_some() => Ok(Ok(Some(n))),
            _ => Err(a.invalid(format!(
                "{GPU_TACTIC_ATTR} `{s}` is not `kiln`, `cudnn` or `cudnn.<0-7>`"
            ))),
        },
    }
}

/// A Conv node (plain or with kiln's fused activation).
#[derive(Debug, Clone)]
pub struct ConvLayer {
    /// Tactic id.
    pub tactic: String,
    /// Geometry.
    pub p: ConvParams,
    /// Strategy.
    pub how: ConvTactic,
    /// im2col / direct kernels (None for 1×1).
    pub src: Option<KernelSource>,
    /// Bias and activation after a GEMM.
    pub epilogue: Option<Epilogue>,
    /// A bias input is present.
    pub has_bias: bool,
    /// Element type.
    pub dtype: DType,
    /// Expected element counts of X, W and Y.
    pub sizes: [usize; 3],
}

pub(crate) fn conv_geometry(
    node: &Node,
    sx: &[usize],
    sw: &[usize],
    so: &[usize],
) -> Option<ConvParams> {
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
    let (n, c, m) = (sx[0], sx[1], sw[0]);
    let g = g as usize;
    if c % g != 0 || m % g != 0 || sw[1] != c / g || so[0] != n || so[1] != m {
        return None;
    }
    let ks: Vec<usize> = sw[2..].to_vec();
    if let Ok(Some(kshape)) = a.opt_ints("kernel_shape") {
        if kshape.len() != sp || kshape.iter().zip(&ks).any(|(&a, &b)| a != b as i64) {
            return None;
        }
    }
    let get = |name: &str, d: i64| -> Option<Vec<i64>> {
        match a.opt_ints(name).ok()? {
            Some(v) if v.len() == sp && v.iter().all(|&x| x >= 1) => Some(v),
            Some(_) => None,
            None => Some(vec![d; sp]),
        }
    };
    let st = get("strides", 1)?;
    let dl = get("dilations", 1)?;
    let auto = a.string("auto_pad", "NOTSET").ok()?;
    let mut pb = vec![0i64; sp];
    let mut pe = vec![0i64; sp];
    match auto.as_str() {
        "NOTSET" => {
            if let Some(p) = a.opt_ints("pads").ok()? {
                if p.len() != 2 * sp || p.iter().any(|&x| x < 0) {
                    return None;
                }
                pb.copy_from_slice(&p[..sp]);
                pe.copy_from_slice(&p[sp..]);
            }
        }
        "VALID" => {}
        "SAME_UPPER" | "SAME_LOWER" => {
            for d in 0..sp {
                let (i, o, k) = (sx[2 + d] as i64, so[2 + d] as i64, ks[d] as i64);
                let total = ((o - 1) * st[d] + (k - 1) * dl[d] + 1 - i).max(0);
                let small = total / 2;
                if auto == "SAME_UPPER" {
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
    for d in 0..sp {
        let (i, k) = (sx[2 + d] as i64, ks[d] as i64);
        let span = (k - 1) * dl[d] + 1;
        let o = (i + pb[d] + pe[d] - span) / st[d] + 1;
        if i + pb[d] + pe[d] < span || o != so[2 + d] as i64 {
            return None;
        }
    }
    let pad3 = |v: &[i64], fill: i64| -> [i64; 3] {
        let mut out = [fill; 3];
        out[3 - v.len()..].copy_from_slice(v);
        out
    };
    let to_i = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let is = pad3(&to_i(&sx[2..]), 1);
    let os = pad3(&to_i(&so[2..]), 1);
    let ks3 = pad3(&to_i(&ks), 1);
    Some(ConvParams {
        n: n as i64,
        c: c as i64,
        m: m as i64,
        cg: (c / g) as i64,
        mg: (m / g) as i64,
        kpos: ks3.iter().product(),
        opos: os.iter().product(),
        ipos: is.iter().product(),
        is,
        os,
        ks: ks3,
        st: pad3(&st, 1),
        dl: pad3(&dl, 1),
        pb: pad3(&pb, 0),
    })
}

fn lower_conv(node: &Node, ins: &[Fact], outs: &[Fact]) -> Option<Result<ConvLayer>> {
    // kiln's CPU Conv with a fused residual (input 3, `act(conv + R)`): no GPU epilogue
    // takes it, so the layer is left to the CPU.
    if matches!(node.inputs.get(3), Some(Some(_))) {
        return None;
    }
    let (dx, sx) = concrete(ins.first()?)?;
    let (dw, sw) = concrete(ins.get(1)?)?;
    let (dout, so) = concrete(outs.first()?)?;
    if !(is_gemm_dtype(dx) && dx == dw && dx == dout) || so.contains(&0) || sx.contains(&0) {
        return None;
    }
    let has_bias = matches!(node.inputs.get(2), Some(Some(_))) && ins.len() > 2;
    let mut bias_dtype = dx;
    if has_bias {
        let (db, sb) = concrete(&ins[2])?;
        if !bias_dtype_ok(dx, db) || sb != [sw[0]] {
            return None;
        }
        bias_dtype = db;
    }
    let p = conv_geometry(node, &sx, &sw, &so)?;
    let act = match fused_activation(node) {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let t = ctype(dx)?;
    let dts = if dx == DType::F16 { "f16" } else { "f32" };
    let sizes = [
        sx.iter().product(),
        sw.iter().product(),
        so.iter().product(),
    ];
    let choice = match conv_choice(node) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    let spatial = sx.len() - 2;
    if let Ok(algo) = choice {
        if crate::dnn::fits(&p, spatial) {
            if !crate::dnn::available() {
                return Some(Err(KilnError::kernel(
                    "Conv",
                    "the plan asks for cuDNN, which cannot be loaded here",
                )));
            }
            let epilogue = Epilogue::new(
                dx,
                bias_dtype,
                [p.n, p.m, p.opos],
                has_bias.then_some([0, 1, 0]),
                1.0,
                &act,
            )?;
            return Some(Ok(ConvLayer {
                tactic: format!("cudnn.conv.{dts}"),
                p,
                how: ConvTactic::Cudnn(std::sync::Arc::new(crate::dnn::DnnConv::new(
                    p, spatial, dx, algo,
                ))),
                src: None,
                epilogue,
                has_bias,
                dtype: dx,
                sizes,
            }));
        }
    }
    let k = (p.cg * p.kpos) as usize;
    let gemm = |trans_b_src_stride: i64| GemmCall {
        m: p.m as usize,
        n: p.opos as usize,
        k,
        batch: p.n as usize,
        trans_a: false,
        trans_b: false,
        stride_a: 0,
        stride_b: trans_b_src_stride,
        stride_c: p.m * p.opos,
        dtype: dx,
    };
    if p.cg == p.c {
        let one = p.kpos == 1 && p.st == [1; 3] && p.pb == [0; 3] && p.ipos == p.opos;
        let epilogue = Epilogue::new(
            dx,
            bias_dtype,
            [p.n, p.m, p.opos],
            has_bias.then_some([0, 1, 0]),
            1.0,
            &act,
        )?;
        if one {
            let g = gemm(p.c * p.ipos);
            if !g.fits() {
                return None;
            }
            return Some(Ok(ConvLayer {
                tactic: format!("cublas.conv1x1.{dts}"),
                p,
                how: ConvTactic::Gemm1x1(g),
                src: None,
                epilogue,
                has_bias,
                dtype: dx,
                sizes,
            }));
        }
        let g = gemm(k as i64 * p.opos);
        if !g.fits() {
            return None;
        }
        let largest = (p.n * p.c * p.kpos * p.opos).max(p.n * p.c * p.ipos);
        let code = format!(
            "{pre}{idx}{CONV_STRUCT}extern \"C\" __global__ void kiln_im2col(const {t}* x, {t}* col, long long total, const ConvP p) {{\n\
             I opos = (I)p.opos, kpos = (I)p.kpos, ck = (I)(p.c * p.kpos), c_ = (I)p.c, ipos = (I)p.ipos;\n\
             for (long long j = KILN_TID; j < total; j += KILN_STRIDE) {{\n\
               I i = (I)j; I o = i % opos; I kk = (i / opos) % ck; I n = i / (opos * ck);\n\
               I c = kk / kpos; I kidx = kk - c * kpos; I off;\n\
               col[j] = kiln_conv_in(p, kidx, o, &off) ? x[(n * c_ + c) * ipos + off] : ({t})0.0f;\n\
             }}\n}}\n",
            pre = prelude(&[dx]),
            idx = index_typedef(largest),
        );
        return Some(Ok(ConvLayer {
            tactic: format!("nvrtc.im2col+cublas.gemm.{dts}"),
            p,
            how: ConvTactic::Im2col(g),
            src: Some(source("im2col", code)),
            epilogue,
            has_bias,
            dtype: dx,
            sizes,
        }));
    }
    let e = act_code(&act, "acc")?;
    let largest = (p.n * p.m * p.opos).max(p.n * p.c * p.ipos);
    let code = format!(
        "{pre}{idx}{CONV_STRUCT}extern \"C\" __global__ void kiln_conv_direct(const {t}* x, const {t}* w, const {tb}* b, {t}* y, long long total, int has_bias, const ConvP p) {{\n\
         I opos = (I)p.opos, m_ = (I)p.m, cg = (I)p.cg, kpos = (I)p.kpos, ipos = (I)p.ipos;\n\
         for (long long j = KILN_TID; j < total; j += KILN_STRIDE) {{\n\
           I i = (I)j; I o = i % opos; I m = (i / opos) % m_; I n = i / (opos * m_);\n\
           I g = m / (I)p.mg; float acc = 0.0f;\n\
           const {t}* xb = x + ((long long)n * p.c + (long long)g * p.cg) * p.ipos; const {t}* wb = w + (long long)m * p.cg * p.kpos;\n\
           for (I c = 0; c < cg; ++c) {{\n\
             for (I kidx = 0; kidx < kpos; ++kidx) {{ I off;\n\
               if (kiln_conv_in(p, kidx, o, &off)) acc += {lx} * {lw};\n\
             }}\n\
           }}\n\
           if (has_bias) acc += {lb};\n\
           y[j] = {st};\n\
         }}\n}}\n",
        pre = prelude(&[dx, bias_dtype]),
        idx = index_typedef(largest),
        tb = ctype(bias_dtype)?,
        lx = load(dx, "xb[c * ipos + off]"),
        lw = load(dx, "wb[c * kpos + kidx]"),
        lb = load(bias_dtype, "b[m]"),
        st = store(dx, &e),
    );
    Some(Ok(ConvLayer {
        tactic: format!("nvrtc.conv_direct.{dts}"),
        p,
        how: ConvTactic::Direct,
        src: Some(source("conv_direct", code)),
        epilogue: None,
        has_bias,
        dtype: dx,
        sizes,
    }))
}

impl GpuLayer for ConvLayer {
    fn tactic(&self) -> String {
        match &self.how {
            ConvTactic::Cudnn(d) => match d.algo() {
                Some(a) => format!(
                    "cudnn.conv.{}.{}{}",
                    crate::dnn::algo_name(a),
                    if self.dtype == DType::F16 {
                        "f16"
                    } else {
                        "f32"
                    },
                    if self.epilogue.is_some() {
                        "+epilogue"
                    } else {
                        ""
                    }
                ),
                None => self.tactic.clone(),
            },
            _ => self.tactic.clone(),
        }
    }
    fn prepare(&self, cx: &crate::layer::PrepareCx<'_>) -> Result<()> {
        if let ConvTactic::Cudnn(d) = &self.how {
            let h = cx
                .dnn
                .ok_or_else(|| cuda_err(&self.tactic, "no cuDNN handle to prepare with"))?;
            d.prepare(h, cx.tf32)?;
        }
        Ok(())
    }
    fn uses_dnn(&self) -> bool {
        matches!(self.how, ConvTactic::Cudnn(_))
    }
    fn sources(&self) -> Vec<KernelSource> {
        self.src
            .iter()
            .cloned()
            .chain(self.epilogue.iter().map(|e| e.src.clone()))
            .collect()
    }
    fn workspace_bytes(&self, _inputs: &[DevTensor]) -> usize {
        match &self.how {
            ConvTactic::Im2col(_) => {
                (self.p.n * self.p.c * self.p.kpos * self.p.opos) as usize * self.dtype.size()
            }
            ConvTactic::Cudnn(d) => d.workspace(),
            _ => 0,
        }
    }
    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        let (x, w, y) = crate::layer::product_io(&self.tactic, inputs, outputs, self.sizes)?;
        let bias = if self.has_bias {
            inputs.get(2).map(|t| t.ptr).unwrap_or(0)
        } else {
            0
        };
        match &self.how {
            ConvTactic::Cudnn(d) => {
                let h = cx
                    .dnn
                    .ok_or_else(|| cuda_err(&self.tactic, "no cuDNN handle in this context"))?;
                d.enqueue(h, x.ptr, w.ptr, y.ptr, cx.workspace, cx.workspace_bytes)?;
            }
            ConvTactic::Gemm1x1(g) => g.enqueue(cx, &self.tactic, w.ptr, x.ptr, y.ptr, 1.0, 0.0)?,
            ConvTactic::Im2col(g) => {
                let need = self.workspace_bytes(inputs);
                if cx.workspace_bytes < need {
                    return Err(cuda_err(
                        &self.tactic,
                        format!("workspace of {} bytes, {need} needed", cx.workspace_bytes),
                    ));
                }
                let src = self
                    .src
                    .as_ref()
                    .ok_or_else(|| cuda_err(&self.tactic, "no module"))?;
                let f = cx.modules.function(&src.module, "kiln_im2col")?;
                let total = self.p.n * self.p.c * self.p.kpos * self.p.opos;
                let col = cx.workspace;
                let mut b = cx.stream.launch_builder(&f);
                b.arg(&x.ptr).arg(&col).arg(&total).arg(&self.p);
                let cfg = LaunchConfig {
                    grid_dim: (grid_for(total as usize), 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the kernel writes `total` elements into the workspace (size checked
                // above) and reads X only at in-bounds offsets (checked in the kernel).
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&self.tactic, e))?;
                g.enqueue(cx, &self.tactic, w.ptr, col, y.ptr, 1.0, 0.0)?;
            }
            ConvTactic::Direct => {
                let src = self
                    .src
                    .as_ref()
                    .ok_or_else(|| cuda_err(&self.tactic, "no module"))?;
                let f = cx.modules.function(&src.module, "kiln_conv_direct")?;
                let total = self.p.n * self.p.m * self.p.opos;
                let has = self.has_bias as i32;
                let mut b = cx.stream.launch_builder(&f);
                b.arg(&x.ptr)
                    .arg(&w.ptr)
                    .arg(&bias)
                    .arg(&y.ptr)
                    .arg(&total)
                    .arg(&has)
                    .arg(&self.p);
                let cfg = LaunchConfig {
                    grid_dim: (grid_for(total as usize), 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: writes `total` = numel(Y) elements; X and W reads are in bounds by
                // the geometry checked at lowering; the bias is read only when present.
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&self.tactic, e))?;
                return Ok(());
            }
        }
        if let Some(e) = &self.epilogue {
            e.enqueue(cx, &self.tactic, y.ptr, bias)?;
        }
        Ok(())
    }
}

/// Whether a MatMul/Gemm node's GPU tactic attribute asks for cuBLASLt (`cublaslt`) rather
/// than cuBLAS + NVRTC epilogue (`cublas`, or no attribute: the default).
fn gemm_choice(node: &Node) -> Result<bool> {
    let a = AttrReader {
        node: &node.name,
        desc: &node.desc,
    };
    match a.opt_string(GPU_TACTIC_ATTR)?.as_deref() {
        None | Some("cublas") => Ok(false),
        Some("cublaslt") => Ok(true),
        Some(s) => Err(a.invalid(format!(
            "{GPU_TACTIC_ATTR} `{s}` is not `cublas` or `cublaslt`"
        ))),
    }
}

/// The cuBLASLt form of a lowered MatMul/Gemm: the bias goes into cuBLASLt's epilogue when
/// it is one value per output column with `beta = 1`, ReLU / tanh-GELU when the bias (if
/// any) did too; the rest stays in an NVRTC epilogue. `None` when cuBLASLt cannot run the
/// product (the caller keeps the cuBLAS layer).
fn to_lt(node: &Node, l: &MatMulLayer) -> Option<Result<Box<dyn GpuLayer>>> {
    use crate::lt::{LtAct, LtLayer};
    if !LtLayer::fits(&l.gemm) {
        return None;
    }
    let act = match fused_activation(node) {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let g = &l.gemm;
    let (bias, bias_dtype, beta, dims) = match &l.epilogue {
        Some(e) => (e.bias, e.bias_dtype, e.beta, e.dims),
        None => (None, g.dtype, 0.0, [1, 1, (g.batch * g.m * g.n) as i64]),
    };
    // cuBLASLt's bias epilogue reads the bias in the output's type; an F32 bias under an
    // F16 output stays in the NVRTC epilogue.
    let lt_bias = bias == Some([0, 0, 1]) && beta == 1.0 && g.batch == 1 && bias_dtype == g.dtype;
    let lt_act = if lt_bias || bias.is_none() {
        act.as_ref()
            .map_or(Some(LtAct::None), |(name, _)| LtAct::of(name))
    } else {
        None
    };
    let (la, post_act) = match lt_act {
        Some(a) => (a, None),
        None => (LtAct::None, act.clone()),
    };
    let post_bias = if lt_bias { None } else { bias };
    let post = Epilogue::new(g.dtype, bias_dtype, dims, post_bias, beta, &post_act)?;
    Some(Ok(Box::new(LtLayer::new(
        g.clone(),
        l.alpha,
        la,
        if lt_bias { l.bias_input } else { None },
        post_bias.and(l.bias_input),
        post,
        l.sizes,
    ))))
}

/// The cuDNN algorithms offered for a Conv node with device facts `ins`/`outs` (None when
/// it is not a Conv cuDNN can run: other ops, geometries cuDNN does not take, no cuDNN).
pub fn conv_dnn_candidates(
    node: &Node,
    ins: &[Fact],
    outs: &[Fact],
    h: &crate::dnn::DnnHandle,
    tf32: bool,
) -> Option<Result<Vec<crate::dnn::AlgoChoice>>> {
    if node.desc.op_type != "Conv" {
        return None;
    }
    let mut plain = node.clone();
    plain.desc.attrs.insert(
        GPU_TACTIC_ATTR.into(),
        kiln_core::Attr::String("cudnn".into()),
    );
    match lower_conv(&plain, ins, outs)? {
        Ok(ConvLayer {
            how: ConvTactic::Cudnn(d),
            ..
        }) => Some(d.candidates(h, tf32)),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Lowers a node as the executor does: a library layer ([`lower`]) when there is one,
/// otherwise one of kiln's NVRTC kernels ([`crate::kernels::lower`]); `None` when neither
/// has it (the CPU runs it).
pub fn lower_any(
    node: &Node,
    inputs: &[Fact],
    outputs: &[Fact],
) -> Option<Result<Box<dyn GpuLayer>>> {
    if cpu_layout(node) {
        return None;
    }
    lower(node, inputs, outputs).or_else(|| crate::kernels::lower(node, inputs, outputs))
}

/// Whether the CPU tuner put `node` in a layout of its own (the `fp32/nhwc` tactics,
/// `cpu.*.nhwc*`): its tensors are not in the layout the GPU layers read, so it stays on
/// the CPU.
pub fn cpu_layout(node: &Node) -> bool {
    matches!(
        node.desc.attrs.get(kiln_core::tactic::TACTIC_ATTR),
        Some(Attr::String(t)) if t.starts_with("cpu.") && t.contains(".nhwc")
    )
}

/// Lowers MatMul, Gemm and Conv (plain ONNX or kiln's fused forms), ConvTranspose and LSTM
/// ([`crate::rnn`]) to library layers.
pub fn lower(node: &Node, inputs: &[Fact], outputs: &[Fact]) -> Option<Result<Box<dyn GpuLayer>>> {
    let domain = kiln_core::op::normalize_domain(&node.desc.domain);
    if !(domain.is_empty() || domain == "kiln") || cpu_layout(node) {
        return None;
    }
    if node.desc.op_type == "LSTM" {
        return crate::rnn::lower_lstm(node, inputs, outputs)
            .map(|r| r.map(|l| Box::new(l) as Box<dyn GpuLayer>));
    }
    if node.outputs.len() != 1 || node.outputs[0].is_none() {
        return None;
    }
    match node.desc.op_type.as_str() {
        op @ ("MatMul" | "Gemm") => {
            let lowered = if op == "MatMul" {
                lower_matmul(node, inputs, outputs)?
            } else {
                lower_gemm(node, inputs, outputs)?
            };
            let l = match lowered {
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            match gemm_choice(node) {
                Err(e) => Some(Err(e)),
                Ok(true) => to_lt(node, &l).or_else(|| Some(Ok(Box::new(l)))),
                Ok(false) => Some(Ok(Box::new(l))),
            }
        }
        "Conv" => {
            lower_conv(node, inputs, outputs).map(|r| r.map(|l| Box::new(l) as Box<dyn GpuLayer>))
        }
        "ConvTranspose" => crate::convt::lower_conv_t(node, inputs, outputs)
            .map(|r| r.map(|l| Box::new(l) as Box<dyn GpuLayer>)),
        "Int8MatMul" | "Int8Conv" if domain == "kiln" => lower_int8_lt(node, inputs, outputs),
        _ => None,
    }
}

/// `kiln.Int8MatMul` and 1×1 `kiln.Int8Conv` on cuBLASLt's IMMA path
/// ([`crate::lt::Int8LtLayer`]) when the node's [`GPU_TACTIC_ATTR`] is `cublaslt`,
/// cuBLASLt loads and the product meets IMMA's alignment rules; otherwise `None` (the
/// `nvrtc.int8.*` kernels run it).
fn lower_int8_lt(
    node: &Node,
    inputs: &[Fact],
    outputs: &[Fact],
) -> Option<Result<Box<dyn GpuLayer>>> {
    use crate::kernels::int8 as k8;
    use crate::lt::Int8LtLayer;
    match gemm_choice(node) {
        Err(e) => return Some(Err(e)),
        Ok(false) => return None,
        Ok(true) => {}
    }
    if !k8::symmetric(node) || !crate::lt::available() {
        return None;
    }
    let cx = crate::kernels::LowerCx {
        node,
        inputs,
        outputs,
    };
    let layer = if node.desc.op_type == "Int8Conv" {
        let (b, c, m, hw) = k8::pointwise_dims(&cx)?;
        if !Int8LtLayer::fits(m, b * hw, c) {
            return None;
        }
        Int8LtLayer::new(
            [m, b * hw, c],
            [b * c * hw, m * c, b * m * hw],
            Some(k8::nhwc_layer(&cx, b, c, hw)?),
            k8::requant_layer(&cx, b, m, hw)?,
        )
    } else {
        let (rows, n, k) = k8::matmul_dims(&cx)?;
        if !Int8LtLayer::fits(n, rows, k) {
            return None;
        }
        Int8LtLayer::new(
            [n, rows, k],
            [rows * k, n * k, rows * n],
            None,
            k8::requant_layer(&cx, rows, n, 1)?,
        )
    };
    Some(Ok(Box::new(layer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{f, node};
    use kiln_core::Attr;

    fn lower_one(
        op: &str,
        attrs: Vec<(&str, Attr)>,
        ins: &[(DType, &[usize])],
        out: (DType, &[usize]),
    ) -> Option<Box<dyn GpuLayer>> {
        let n = node(op, 13, attrs, ins.len(), 1);
        let fi: Vec<Fact> = ins.iter().map(|(d, s)| f(*d, s)).collect();
        lower(&n, &fi, &[f(out.0, out.1)]).map(|r| r.expect("lowering error"))
    }

    fn matmul(a: &[usize], b: &[usize], o: &[usize]) -> Option<GemmCall> {
        let n = node("MatMul", 13, vec![], 2, 1);
        lower_matmul(
            &n,
            &[f(DType::F32, a), f(DType::F32, b)],
            &[f(DType::F32, o)],
        )
        .map(|r| r.unwrap().gemm)
    }

    #[test]
    fn matmul_batching_and_broadcast() {
        // B shared: A's batch folds into M.
        let g = matmul(&[3, 5, 7], &[7, 4], &[3, 5, 4]).unwrap();
        assert_eq!((g.m, g.n, g.k, g.batch), (15, 4, 7, 1));
        // Equal batches: strided batch.
        let g = matmul(&[2, 3, 5, 7], &[2, 3, 7, 6], &[2, 3, 5, 6]).unwrap();
        assert_eq!(
            (g.batch, g.stride_a, g.stride_b, g.stride_c),
            (6, 35, 42, 30)
        );
        // A shared across B's batch.
        let g = matmul(&[5, 7], &[2, 7, 3], &[2, 5, 3]).unwrap();
        assert_eq!((g.batch, g.stride_a, g.stride_b), (2, 0, 21));
        // Vectors.
        assert_eq!(matmul(&[7], &[7, 3], &[3]).unwrap().m, 1);
        assert_eq!(matmul(&[4, 7], &[7], &[4]).unwrap().n, 1);
        // Mixed broadcast ([2,1] x [1,3] batches) and bad K are left to others.
        assert!(matmul(&[2, 1, 5, 7], &[1, 3, 7, 6], &[2, 3, 5, 6]).is_none());
        assert!(matmul(&[5, 7], &[6, 3], &[5, 3]).is_none());
        // Integer MatMul is not a cuBLAS float GEMM.
        assert!(lower_one(
            "MatMul",
            vec![],
            &[(DType::I32, &[2, 3]), (DType::I32, &[3, 2])],
            (DType::I32, &[2, 2])
        )
        .is_none());
    }

    #[test]
    fn gemm_tactics_and_epilogue() {
        let l = lower_one(
            "Gemm",
            vec![("transB", Attr::Int(1))],
            &[
                (DType::F16, &[6, 9]),
                (DType::F16, &[4, 9]),
                (DType::F16, &[4]),
            ],
            (DType::F16, &[6, 4]),
        )
        .unwrap();
        assert_eq!(l.tactic(), "cublas.gemm.f16+epilogue");
        assert_eq!(l.sources().len(), 1);
        assert!(l.sources()[0].code.contains("kiln_epilogue"));
        let l = lower_one(
            "Gemm",
            vec![],
            &[(DType::F32, &[6, 9]), (DType::F32, &[9, 4])],
            (DType::F32, &[6, 4]),
        )
        .unwrap();
        assert_eq!(l.tactic(), "cublas.gemm.f32");
        assert!(l.sources().is_empty());
        // A bias that does not broadcast to [M, N] is refused.
        assert!(lower_one(
            "Gemm",
            vec![],
            &[
                (DType::F32, &[6, 9]),
                (DType::F32, &[9, 4]),
                (DType::F32, &[5])
            ],
            (DType::F32, &[6, 4])
        )
        .is_none());
    }

    #[test]
    fn cublaslt_tactic_and_its_epilogue_split() {
        let gemm = |attrs: Vec<(&str, Attr)>, bias: &[usize], act: Option<&str>| {
            let mut n = node("Gemm", 13, attrs, 3, 1);
            n.desc
                .attrs
                .insert(GPU_TACTIC_ATTR.into(), Attr::String("cublaslt".into()));
            if let Some(a) = act {
                n.desc.domain = "kiln".into();
                n.desc
                    .attrs
                    .insert(ACTIVATION_ATTR.into(), Attr::String(a.into()));
            }
            let fi = [
                f(DType::F32, &[6, 9]),
                f(DType::F32, &[9, 4]),
                f(DType::F32, bias),
            ];
            lower(&n, &fi, &[f(DType::F32, &[6, 4])])
                .unwrap()
                .unwrap()
                .tactic()
        };
        assert_eq!(
            gemm(vec![], &[4], Some("Relu")),
            "cublaslt.matmul.f32+bias+relu"
        );
        assert_eq!(
            gemm(vec![], &[1, 4], Some("GeluTanh")),
            "cublaslt.matmul.f32+bias+gelu"
        );
        // beta != 1 or a per-row bias: the NVRTC epilogue adds it (and the activation).
        assert_eq!(
            gemm(vec![("beta", Attr::Float(0.5))], &[4], Some("Relu")),
            "cublaslt.matmul.f32+epilogue"
        );
        assert_eq!(gemm(vec![], &[6, 1], None), "cublaslt.matmul.f32+epilogue");
        // Sigmoid has no cuBLASLt epilogue: bias in cuBLASLt, sigmoid after.
        assert_eq!(
            gemm(vec![], &[4], Some("Sigmoid")),
            "cublaslt.matmul.f32+bias+epilogue"
        );
        // A broadcast batch (A shared across B's batch) stays on cuBLAS.
        let mut n = node("MatMul", 13, vec![], 2, 1);
        n.desc
            .attrs
            .insert(GPU_TACTIC_ATTR.into(), Attr::String("cublaslt".into()));
        let fi = [f(DType::F16, &[5, 7]), f(DType::F16, &[2, 7, 3])];
        let l = lower(&n, &fi, &[f(DType::F16, &[2, 5, 3])])
            .unwrap()
            .unwrap();
        assert_eq!(l.tactic(), "cublas.gemm.f16");
        let fi = [f(DType::F16, &[2, 5, 7]), f(DType::F16, &[2, 7, 3])];
        let l = lower(&n, &fi, &[f(DType::F16, &[2, 5, 3])])
            .unwrap()
            .unwrap();
        assert_eq!(l.tactic(), "cublaslt.matmul.f16");
        assert_eq!(l.workspace_bytes(&[]), crate::lt::LT_WORKSPACE);
        // Unknown choices are errors.
        n.desc
            .attrs
            .insert(GPU_TACTIC_ATTR.into(), Attr::String("bogus".into()));
        assert!(lower(&n, &fi, &[f(DType::F16, &[2, 5, 3])])
            .unwrap()
            .is_err());
    }

    #[test]
    fn conv_tactics_and_geometry() {
        let x = (DType::F32, &[2usize, 6, 5, 7][..]);
        let l = lower_one(
            "Conv",
            vec![],
            &[x, (DType::F32, &[8, 6, 1, 1])],
            (DType::F32, &[2, 8, 5, 7]),
        )
        .unwrap();
        assert_eq!(l.tactic(), "cublas.conv1x1.f32");
        let l = lower_one(
            "Conv",
            vec![("pads", Attr::Ints(vec![1, 1, 1, 1]))],
            &[x, (DType::F32, &[8, 6, 3, 3]), (DType::F32, &[8])],
            (DType::F32, &[2, 8, 5, 7]),
        )
        .unwrap();
        assert_eq!(l.tactic(), "nvrtc.im2col+cublas.gemm.f32");
        // im2col workspace: N * C * kh * kw * Ho * Wo floats.
        assert_eq!(l.workspace_bytes(&[]), 2 * 6 * 9 * 35 * 4);
        assert!(l.sources()[0].code.contains("typedef int I;"));
        let l = lower_one(
            "Conv",
            vec![("group", Attr::Int(3))],
            &[x, (DType::F32, &[6, 2, 3, 3])],
            (DType::F32, &[2, 6, 3, 5]),
        )
        .unwrap();
        assert_eq!(l.tactic(), "nvrtc.conv_direct.f32");
        // Wrong output size (pads missing) and unknown auto_pad are refused.
        assert!(lower_one(
            "Conv",
            vec![],
            &[x, (DType::F32, &[8, 6, 3, 3])],
            (DType::F32, &[2, 8, 5, 7])
        )
        .is_none());
        assert!(lower_one(
            "Conv",
            vec![("auto_pad", Attr::String("BOGUS".into()))],
            &[x, (DType::F32, &[8, 6, 3, 3])],
            (DType::F32, &[2, 8, 3, 5])
        )
        .is_none());
    }

    #[test]
    fn f32_bias_under_f16_products() {
        // FP16 layers read their bias in F32: every Conv tactic and the Gemm epilogue load it
        // as float; an F16 bias under F32 data is refused.
        let code = |l: Box<dyn GpuLayer>| -> String {
            l.sources().iter().map(|s| s.code.clone()).collect()
        };
        let x = (DType::F16, &[2usize, 6, 5, 7][..]);
        for (attrs, w, o) in [
            (vec![], &[8usize, 6, 1, 1][..], &[2usize, 8, 5, 7][..]),
            (
                vec![("pads", Attr::Ints(vec![1, 1, 1, 1]))],
                &[8, 6, 3, 3],
                &[2, 8, 5, 7],
            ),
            (vec![("group", Attr::Int(3))], &[6, 2, 3, 3], &[2, 6, 3, 5]),
        ] {
            let ins = [x, (DType::F16, w), (DType::F32, &[w[0]][..])];
            let l = lower_one("Conv", attrs.clone(), &ins, (DType::F16, o)).unwrap();
            assert!(l.tactic().ends_with("f16"), "{}", l.tactic());
            let c = code(l);
            assert!(c.contains("const float* b"), "{c}");
            assert!(!c.contains("__half2float(b"), "{c}");
            let ins32 = [
                (DType::F32, x.1),
                (DType::F32, w),
                (DType::F16, &[w[0]][..]),
            ];
            assert!(lower_one("Conv", attrs, &ins32, (DType::F32, o)).is_none());
        }
        let gemm = |lt: bool| {
            let mut n = node("Gemm", 13, vec![], 3, 1);
            if lt {
                n.desc
                    .attrs
                    .insert(GPU_TACTIC_ATTR.into(), Attr::String("cublaslt".into()));
            }
            let fi = [
                f(DType::F16, &[6, 9]),
                f(DType::F16, &[9, 4]),
                f(DType::F32, &[4]),
            ];
            lower(&n, &fi, &[f(DType::F16, &[6, 4])]).unwrap().unwrap()
        };
        let l = gemm(false);
        assert_eq!(l.tactic(), "cublas.gemm.f16+epilogue");
        assert!(code(l).contains("const float* bias"));
        // cuBLASLt's bias epilogue reads the output's type: the F32 bias stays in NVRTC's.
        let l = gemm(true);
        assert_eq!(l.tactic(), "cublaslt.matmul.f16+epilogue");
        assert!(code(l).contains("const float* bias"));
    }

    #[test]
    fn same_upper_pads() {
        let n = node(
            "Conv",
            11,
            vec![
                ("auto_pad", Attr::String("SAME_UPPER".into())),
                ("strides", Attr::Ints(vec![2, 2])),
            ],
            2,
            1,
        );
        let p = conv_geometry(&n, &[1, 3, 10, 9], &[5, 3, 3, 2], &[1, 5, 5, 5]).unwrap();
        // H: total pad (5-1)*2+3-10 = 1 -> begin 0; W: (5-1)*2+2-9 = 1 -> begin 0.
        assert_eq!(p.pb, [0, 0, 0]);
        assert_eq!((p.kpos, p.opos, p.ipos), (6, 25, 90));
        let n = node(
            "Conv",
            11,
            vec![("auto_pad", Attr::String("SAME_LOWER".into()))],
            2,
            1,
        );
        let p = conv_geometry(&n, &[1, 3, 10], &[5, 3, 4], &[1, 5, 10]).unwrap();
        assert_eq!(p.pb, [0, 0, 2]);
    }

    #[test]
    fn fused_activation_reaches_the_epilogue() {
        let mut n = node("Conv", 11, vec![], 3, 1);
        n.desc.domain = "kiln".into();
        n.desc
            .attrs
            .insert(ACTIVATION_ATTR.into(), Attr::String("LeakyRelu".into()));
        n.desc
            .attrs
            .insert(ACTIVATION_PARAMS_ATTR.into(), Attr::Floats(vec![0.25]));
        let fi = [
            f(DType::F16, &[1, 2, 4, 4]),
            f(DType::F16, &[3, 2, 1, 1]),
            f(DType::F16, &[3]),
        ];
        let l = lower(&n, &fi, &[f(DType::F16, &[1, 3, 4, 4])])
            .unwrap()
            .unwrap();
        let code: String = l.sources().iter().map(|s| s.code.clone()).collect();
        assert!(code.contains("2.5e-1f"), "{code}");
        assert!(code.contains("__half"), "{code}");
        // An activation with no CUDA expression is not lowered.
        n.desc
            .attrs
            .insert(ACTIVATION_ATTR.into(), Attr::String("Nonesuch".into()));
        assert!(lower(&n, &fi, &[f(DType::F16, &[1, 3, 4, 4])]).is_none());
    }
}
