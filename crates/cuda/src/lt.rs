//! The cuBLASLt matmul tactic for MatMul / Gemm: one `cublasLtMatmul` (FP32 accumulation,
//! TF32 only when the engine allows it) with the bias and the ReLU / GELU activation in
//! cuBLASLt's epilogue where they fit; whatever does not fit (a bias that is not one value
//! per output column or scaled by `beta ≠ 1`, other activations) runs in kiln's NVRTC
//! epilogue after it. Lowering builds it only when the node's [`crate::library::GPU_TACTIC_ATTR`]
//! is `cublaslt` (the GPU tuner times it against the cuBLAS + epilogue path, which stays
//! the default).
//!
//! cuBLASLt's GELU epilogue is the tanh approximation, so only kiln's `GeluTanh` activation
//! maps to it; `GeluErf` stays in the NVRTC epilogue.

use std::sync::{Mutex, OnceLock};

use cudarc::cublaslt::{result as lt, sys as lts};
use kiln_core::{DType, KilnError, Result};

use crate::layer::{cuda_err, DevTensor, GpuLayer, KernelSource, LaunchCx, PrepareCx};
use crate::library::{Epilogue, GemmCall};

/// Workspace a cuBLASLt matmul may use (NVIDIA's recommendation for Hopper).
pub const LT_WORKSPACE: usize = 32 << 20;

/// True when libcublasLt can be loaded (probed once).
pub fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only probes whether the shared library can be opened.
    *PRESENT.get_or_init(|| unsafe { lts::is_culib_present() })
}

/// The activation done by cuBLASLt's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LtAct {
    /// None.
    None,
    /// `max(x, 0)`.
    Relu,
    /// GELU, tanh approximation.
    Gelu,
}

impl LtAct {
    /// The cuBLASLt epilogue for this activation, with or without a bias.
    pub fn epilogue(self, bias: bool) -> lts::cublasLtEpilogue_t {
        use lts::cublasLtEpilogue_t::*;
        match (self, bias) {
            (LtAct::None, false) => CUBLASLT_EPILOGUE_DEFAULT,
            (LtAct::None, true) => CUBLASLT_EPILOGUE_BIAS,
            (LtAct::Relu, false) => CUBLASLT_EPILOGUE_RELU,
            (LtAct::Relu, true) => CUBLASLT_EPILOGUE_RELU_BIAS,
            (LtAct::Gelu, false) => CUBLASLT_EPILOGUE_GELU,
            (LtAct::Gelu, true) => CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }

    /// The cuBLASLt activation for kiln's fused activation `name`, when there is one.
    pub fn of(name: &str) -> Option<LtAct> {
        match name {
            "None" => Some(LtAct::None),
            "Relu" => Some(LtAct::Relu),
            "GeluTanh" => Some(LtAct::Gelu),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LtAct::None => "",
            LtAct::Relu => "+relu",
            LtAct::Gelu => "+gelu",
        }
    }
}

fn lt_err(what: &str, e: impl std::fmt::Display) -> KilnError {
    KilnError::kernel("cublaslt", format!("{what}: {e}"))
}

/// Handle, descriptors and algorithm of one matmul, created by `prepare`.
#[derive(Debug)]
struct Ready {
    handle: lts::cublasLtHandle_t,
    desc: lts::cublasLtMatmulDesc_t,
    /// Layouts of cuBLASLt's A (kiln's B), B (kiln's A) and C = D.
    la: lts::cublasLtMatrixLayout_t,
    lb: lts::cublasLtMatrixLayout_t,
    lc: lts::cublasLtMatrixLayout_t,
    algo: lts::cublasLtMatmulAlgo_t,
    workspace: usize,
}

// SAFETY: the handle and descriptors are host objects used only while the layer's mutex is
// held (one thread at a time); the bias pointer attribute is the only thing written after
// creation, under that mutex.
unsafe impl Send for Ready {}

impl Drop for Ready {
    fn drop(&mut self) {
        // SAFETY: each object was created once in `prepare` and is destroyed once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.la);
            let _ = lt::destroy_matrix_layout(self.lb);
            let _ = lt::destroy_matrix_layout(self.lc);
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// A MatMul or Gemm node on cuBLASLt.
#[derive(Debug)]
pub struct LtLayer {
    /// Tactic id.
    pub tactic: String,
    /// The product (sizes, transposes, batch strides, dtype).
    pub gemm: GemmCall,
    /// `alpha` of Gemm (1 for MatMul).
    pub alpha: f32,
    /// Activation in cuBLASLt's epilogue.
    pub act: LtAct,
    /// Index of the bias input added by cuBLASLt's epilogue (one value per output column).
    pub lt_bias: Option<usize>,
    /// Index of the bias input the NVRTC epilogue adds (when cuBLASLt cannot).
    pub post_bias: Option<usize>,
    /// Bias and/or activation cuBLASLt cannot do, after the matmul.
    pub post: Option<Epilogue>,
    /// Expected element counts of A, B and the output.
    pub sizes: [usize; 3],
    ready: OnceLock<Mutex<Ready>>,
}

impl LtLayer {
    /// A cuBLASLt layer (prepared on the device by [`GpuLayer::prepare`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gemm: GemmCall,
        alpha: f32,
        act: LtAct,
        lt_bias: Option<usize>,
        post_bias: Option<usize>,
        post: Option<Epilogue>,
        sizes: [usize; 3],
    ) -> LtLayer {
        let dt = if gemm.dtype == DType::F16 {
            "f16"
        } else {
            "f32"
        };
        LtLayer {
            tactic: format!(
                "cublaslt.matmul.{dt}{}{}{}",
                if lt_bias.is_some() { "+bias" } else { "" },
                act.name(),
                if post.is_some() { "+epilogue" } else { "" }
            ),
            gemm,
            alpha,
            act,
            lt_bias,
            post_bias,
            post,
            sizes,
            ready: OnceLock::new(),
        }
    }

    /// True when cuBLASLt can run `g` (32-bit sizes; batched operands with a real stride,
    /// no broadcast batch).
    pub fn fits(g: &GemmCall) -> bool {
        let lim = i32::MAX as usize;
        let sizes = g.m <= lim && g.n <= lim && g.k <= lim && g.batch <= lim && g.m * g.n > 0;
        let strides = g.batch == 1 || (g.stride_a > 0 && g.stride_b > 0 && g.stride_c > 0);
        sizes && strides && matches!(g.dtype, DType::F32 | DType::F16) && g.k > 0
    }

    fn create(&self, tf32: bool) -> Result<Ready> {
        let g = &self.gemm;
        let (dt, compute) = match g.dtype {
            DType::F32 => (
                lts::cudaDataType::CUDA_R_32F,
                if tf32 {
                    lts::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
                } else {
                    lts::cublasComputeType_t::CUBLAS_COMPUTE_32F
                },
            ),
            DType::F16 => (
                lts::cudaDataType::CUDA_R_16F,
                lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            other => return Err(lt_err("dtype", other)),
        };
        // Row-major C[m, n] = op(A) · op(B) is column-major Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ:
        // cuBLASLt's A is kiln's B (stored column-major as [n, k], or [k, n] when
        // transposed), its B is kiln's A.
        let (a_rows, a_cols) = if g.trans_b { (g.k, g.n) } else { (g.n, g.k) };
        let (b_rows, b_cols) = if g.trans_a { (g.m, g.k) } else { (g.k, g.m) };
        let mut r = Ready::new(
            compute,
            lts::cudaDataType::CUDA_R_32F,
            [(dt, a_rows, a_cols), (dt, b_rows, b_cols), (dt, g.n, g.m)],
        )?;
        let op = |t: bool| -> i32 { t as i32 }; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
        r.transposes(op(g.trans_b), op(g.trans_a))?;
        let epi = self.act.epilogue(self.lt_bias.is_some());
        r.set_desc(
            lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const lts::cublasLtEpilogue_t as *const _,
            std::mem::size_of::<lts::cublasLtEpilogue_t>(),
        )?;
        if g.batch > 1 {
            let count = g.batch as i32;
            for (l, stride) in [(r.la, g.stride_b), (r.lb, g.stride_a), (r.lc, g.stride_c)] {
                use lts::cublasLtMatrixLayoutAttribute_t as L;
                // SAFETY: the layouts are live; the values are an i32 and an i64.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        l,
                        L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const _,
                        4,
                    )
                    .map_err(|e| lt_err("set batch count", e))?;
                    lt::set_matrix_layout_attribute(
                        l,
                        L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const _,
                        8,
                    )
                    .map_err(|e| lt_err("set batch stride", e))?;
                }
            }
        }
        r.choose_algo()?;
        Ok(r)
    }
}

impl Ready {
    /// A handle, a matmul descriptor (`compute` type, `scale` type of alpha/beta) and the
    /// column-major layouts `(dtype, rows, cols)` of cuBLASLt's A, B and C = D (leading
    /// dimension = rows); whatever was created is destroyed again on failure.
    fn new(
        compute: lts::cublasComputeType_t,
        scale: lts::cudaDataType,
        layouts: [(lts::cudaDataType, usize, usize); 3],
    ) -> Result<Ready> {
        let handle = lt::create_handle().map_err(|e| lt_err("create handle", e))?;
        let desc = match lt::create_matmul_desc(compute, scale) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: created just above, destroyed once.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(lt_err("create matmul descriptor", e));
            }
        };
        let mk = |(dt, r, c): (lts::cudaDataType, usize, usize)| {
            lt::create_matrix_layout(dt, r as u64, c as u64, r as i64)
        };
        let [a, b, c] = layouts;
        match (mk(a), mk(b), mk(c)) {
            (Ok(la), Ok(lb), Ok(lc)) => Ok(Ready {
                handle,
                desc,
                la,
                lb,
                lc,
                algo: lts::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspace: 0,
            }),
            (a, b, c) => {
                // SAFETY: only the layouts that were created are destroyed, once each.
                unsafe {
                    for l in [a, b, c].into_iter().flatten() {
                        let _ = lt::destroy_matrix_layout(l);
                    }
                    let _ = lt::destroy_matmul_desc(desc);
                    let _ = lt::destroy_handle(handle);
                }
                Err(lt_err("create matrix layouts", "failed"))
            }
        }
    }

    /// Sets a descriptor attribute from `n` bytes at `p`.
    fn set_desc(
        &self,
        attr: lts::cublasLtMatmulDescAttributes_t,
        p: *const std::ffi::c_void,
        n: usize,
    ) -> Result<()> {
        // SAFETY: the descriptor is live; callers pass `p` pointing at `n` readable bytes.
        unsafe { lt::set_matmul_desc_attribute(self.desc, attr, p, n) }
            .map_err(|e| lt_err(&format!("set {attr:?}"), e))
    }

    /// Sets cuBLASLt's TRANSA and TRANSB (`CUBLAS_OP_N` = 0, `CUBLAS_OP_T` = 1).
    fn transposes(&self, ta: i32, tb: i32) -> Result<()> {
        use lts::cublasLtMatmulDescAttributes_t as A;
        self.set_desc(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &ta as *const i32 as *const _,
            4,
        )?;
        self.set_desc(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &tb as *const i32 as *const _,
            4,
        )
    }

    /// Runs `D = alpha · op(A) · op(B) + beta · C` with C = D, on `cx`'s stream with its
    /// workspace. `ptrs`: device addresses of cuBLASLt's A, B and C.
    ///
    /// # Safety
    /// The pointers must address device buffers of the layouts' sizes and dtypes, `alpha`
    /// and `beta` host values of the descriptor's scale type, and `cx.workspace` at least
    /// `self.workspace` bytes.
    unsafe fn matmul(
        &self,
        cx: &LaunchCx<'_>,
        ptrs: [u64; 3],
        alpha: *const std::ffi::c_void,
        beta: *const std::ffi::c_void,
    ) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
        let [a, b, c] = ptrs;
        // SAFETY: the caller's contract; handle, descriptor, layouts and algorithm are live.
        unsafe {
            lt::matmul(
                self.handle,
                self.desc,
                alpha,
                beta,
                a as *const _,
                self.la,
                b as *const _,
                self.lb,
                c as *const _,
                self.lc,
                c as *mut _,
                self.lc,
                &self.algo,
                cx.workspace as *mut _,
                self.workspace,
                cx.stream.cu_stream() as *mut _,
            )
        }
    }

    /// cuBLASLt's first heuristic algorithm within [`LT_WORKSPACE`].
    fn choose_algo(&mut self) -> Result<()> {
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("create preference", e))?;
        let max_ws = LT_WORKSPACE as u64;
        // SAFETY: `pref` is live and destroyed once below; descriptors and layouts are live.
        let heur = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &max_ws as *const u64 as *const _,
                8,
            );
            let h = set.and_then(|_| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    self.desc,
                    self.la,
                    self.lb,
                    self.lc,
                    self.lc,
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            h
        }
        .map_err(|e| lt_err("no cuBLASLt algorithm for this product", e))?;
        self.algo = heur.algo;
        self.workspace = heur.workspaceSize;
        if self.workspace > LT_WORKSPACE {
            return Err(lt_err(
                "algorithm workspace",
                format!("{} bytes over the limit", self.workspace),
            ));
        }
        Ok(())
    }
}

impl GpuLayer for LtLayer {
    fn tactic(&self) -> String {
        self.tactic.clone()
    }
    fn sources(&self) -> Vec<KernelSource> {
        self.post.iter().map(|e| e.src.clone()).collect()
    }
    fn prepare(&self, cx: &PrepareCx<'_>) -> Result<()> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        if !available() {
            return Err(lt_err("load", "libcublasLt cannot be loaded"));
        }
        let r = self.create(cx.tf32)?;
        let _ = self.ready.set(Mutex::new(r));
        Ok(())
    }
    fn workspace_bytes(&self, _inputs: &[DevTensor]) -> usize {
        LT_WORKSPACE
    }
    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        let (a, b, o) = crate::layer::product_io(&self.tactic, inputs, outputs, self.sizes)?;
        let bias_of = |i: Option<usize>| -> Result<u64> {
            match i {
                None => Ok(0),
                Some(i) => match inputs.get(i) {
                    Some(t) if t.ptr != 0 => Ok(t.ptr),
                    _ => Err(cuda_err(&self.tactic, "bias input missing")),
                },
            }
        };
        let lt_bias = bias_of(self.lt_bias)?;
        let post_bias = bias_of(self.post_bias)?;
        let ready = self
            .ready
            .get()
            .ok_or_else(|| cuda_err(&self.tactic, "cuBLASLt layer not prepared"))?;
        {
            let r = ready
                .lock()
                .map_err(|_| cuda_err(&self.tactic, "cuBLASLt state poisoned"))?;
            if cx.workspace_bytes < r.workspace {
                return Err(cuda_err(
                    &self.tactic,
                    format!(
                        "workspace of {} bytes, {} needed",
                        cx.workspace_bytes, r.workspace
                    ),
                ));
            }
            if self.lt_bias.is_some() {
                // SAFETY: the descriptor is live and only touched under this lock; the value
                // is the bias tensor's device address (8 bytes).
                unsafe {
                    lt::set_matmul_desc_attribute(
                        r.desc,
                        lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &lt_bias as *const u64 as *const _,
                        8,
                    )
                }
                .map_err(|e| cuda_err(&self.tactic, format!("set bias pointer: {e}")))?;
            }
            let (alpha, beta) = (self.alpha, 0.0f32);
            // SAFETY: prepared for these sizes (checked by product_io); b, a and o address
            // tensors of them; alpha/beta are f32, the FP32 scale type.
            unsafe {
                r.matmul(
                    cx,
                    [b.ptr, a.ptr, o.ptr],
                    &alpha as *const f32 as *const _,
                    &beta as *const f32 as *const _,
                )
            }
            .map_err(|e| cuda_err(&self.tactic, format!("cublasLtMatmul: {e}")))?;
        }
        if let Some(e) = &self.post {
            e.enqueue(cx, &self.tactic, o.ptr, post_bias)?;
        }
        Ok(())
    }
}

/// kiln's INT8 products on the tensor cores (IMMA): `kiln.Int8MatMul` and 1×1
/// `kiln.Int8Conv`. One `cublasLtMatmul` with i8 inputs and i32 sums
/// (`CUBLAS_COMPUTE_32I`) into the workspace, then kiln's NVRTC requantization
/// ([`crate::kernels::int8::requant_layer`]: per-channel scale, bias, activation,
/// requantization to i8, rounding as the `nvrtc.int8.*` kernels do).
///
/// cuBLASLt computes column-major `C[m, n] = Wᵀ-stored-A · B`: its A is the weights,
/// row-major `[m, k]` = column-major `[k, m]`, transposed; its B is the activations as a
/// row-major `[n, k]` matrix = column-major `[k, n]`, not transposed — the "TN" form IMMA
/// requires; C is the sums, row-major `[n, m]`. For MatMul the activations `[rows, k]`
/// already are that matrix (`n` = rows); a 1×1 convolution's NCHW input is first copied to
/// NHWC in the workspace ([`crate::kernels::int8::nhwc_layer`], `n` = batch · pixels) and
/// the requantization writes NCHW back. IMMA's alignment rules (`m` and `k` multiples of
/// 4, so every leading dimension is a multiple of 4 bytes; buffers 16-byte aligned) are
/// checked at lowering and at enqueue.
#[derive(Debug)]
pub struct Int8LtLayer {
    tactic: String,
    /// cuBLASLt's m (output channels), n (output rows / pixels) and k (reduction).
    m: usize,
    n: usize,
    k: usize,
    /// Element counts of the node's activations, weights and output.
    sizes: [usize; 3],
    /// The NHWC copy of the activations (convolutions), into the workspace.
    pre: Option<crate::kernels::common::KernelLayer>,
    requant: crate::kernels::common::KernelLayer,
    ready: OnceLock<Mutex<Ready>>,
}

impl Int8LtLayer {
    /// True when IMMA can take the product: sizes in i32, `m` and `k` multiples of 4.
    pub fn fits(m: usize, n: usize, k: usize) -> bool {
        let lim = i32::MAX as usize;
        [m, n, k].iter().all(|&d| d > 0 && d <= lim) && m.is_multiple_of(4) && k.is_multiple_of(4)
    }

    /// The layer for cuBLASLt sizes `m`, `n`, `k`, the node's element counts `sizes`
    /// (activations, weights, output), an optional NHWC copy in front and the
    /// requantization after.
    pub fn new(
        [m, n, k]: [usize; 3],
        sizes: [usize; 3],
        pre: Option<crate::kernels::common::KernelLayer>,
        requant: crate::kernels::common::KernelLayer,
    ) -> Int8LtLayer {
        Int8LtLayer {
            tactic: format!(
                "cublaslt.int8.imma{}",
                if pre.is_some() { ".nhwc" } else { "" }
            ),
            m,
            n,
            k,
            sizes,
            pre,
            requant,
            ready: OnceLock::new(),
        }
    }

    /// Bytes of the i32 sums (after cuBLASLt's workspace), rounded up to 256.
    fn acc_span(&self) -> usize {
        (self.m * self.n * 4).next_multiple_of(256)
    }

    fn pre_bytes(&self) -> usize {
        self.pre.as_ref().map_or(0, |p| p.work)
    }
}

impl GpuLayer for Int8LtLayer {
    fn tactic(&self) -> String {
        self.tactic.clone()
    }
    fn sources(&self) -> Vec<KernelSource> {
        let mut v = self.requant.sources();
        if let Some(p) = &self.pre {
            v.extend(p.sources());
        }
        v
    }
    fn prepare(&self, _cx: &PrepareCx<'_>) -> Result<()> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        if !available() {
            return Err(lt_err("load", "libcublasLt cannot be loaded"));
        }
        use lts::cudaDataType::{CUDA_R_32I, CUDA_R_8I};
        let mut r = Ready::new(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32I,
            CUDA_R_32I,
            [
                (CUDA_R_8I, self.k, self.m),
                (CUDA_R_8I, self.k, self.n),
                (CUDA_R_32I, self.m, self.n),
            ],
        )?;
        r.transposes(1, 0)?;
        r.choose_algo()?;
        let _ = self.ready.set(Mutex::new(r));
        Ok(())
    }
    fn workspace_bytes(&self, _inputs: &[DevTensor]) -> usize {
        LT_WORKSPACE + self.acc_span() + self.pre_bytes()
    }
    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        let (a, w, _) = crate::layer::product_io(&self.tactic, inputs, outputs, self.sizes)?;
        if [a.ptr, w.ptr, cx.workspace].iter().any(|p| p % 16 != 0) {
            return Err(cuda_err(&self.tactic, "IMMA needs 16-byte aligned buffers"));
        }
        if cx.workspace_bytes < self.workspace_bytes(inputs) {
            return Err(cuda_err(&self.tactic, "workspace too small"));
        }
        let ready = self
            .ready
            .get()
            .ok_or_else(|| cuda_err(&self.tactic, "cuBLASLt layer not prepared"))?;
        let acc = cx.workspace + LT_WORKSPACE as u64;
        let b = match &self.pre {
            None => a.ptr,
            Some(pre) => {
                let xt = acc + self.acc_span() as u64;
                let pre_cx = LaunchCx {
                    workspace: xt,
                    workspace_bytes: pre.work,
                    ..*cx
                };
                pre.enqueue(&pre_cx, inputs, outputs)?;
                xt
            }
        };
        {
            let r = ready
                .lock()
                .map_err(|_| cuda_err(&self.tactic, "cuBLASLt state poisoned"))?;
            let (alpha, beta) = (1i32, 0i32);
            // SAFETY: prepared for these sizes (product_io checked the node's element
            // counts): w is m×k i8, b is n×k i8 (the activations or their NHWC copy, which
            // the workspace holds after the sums), acc holds m×n i32 after cuBLASLt's
            // LT_WORKSPACE bytes (workspace size checked above); alpha/beta are i32, the
            // descriptor's scale type.
            unsafe {
                r.matmul(
                    cx,
                    [w.ptr, b, acc],
                    &alpha as *const i32 as *const _,
                    &beta as *const i32 as *const _,
                )
            }
            .map_err(|e| cuda_err(&self.tactic, format!("cublasLtMatmul (IMMA): {e}")))?;
        }
        let requant_cx = LaunchCx {
            workspace: acc,
            workspace_bytes: self.m * self.n * 4,
            ..*cx
        };
        self.requant.enqueue(&requant_cx, inputs, outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imma_alignment_rules() {
        // (m output channels, n rows or pixels, k reduction)
        assert!(Int8LtLayer::fits(384, 1, 384));
        assert!(Int8LtLayer::fits(4, 7, 8));
        // m and k must be multiples of 4 (leading dimensions in 4-byte units); n is free.
        assert!(!Int8LtLayer::fits(4, 7, 6));
        assert!(!Int8LtLayer::fits(10, 7, 8));
        assert!(!Int8LtLayer::fits(4, 0, 8));
        assert!(!Int8LtLayer::fits(4, 1 << 31, 8));
    }
}
