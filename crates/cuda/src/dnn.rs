//! cuDNN convolution (the descriptor API of cuDNN 8 and 9, loaded at run time).
//!
//! A [`DnnConv`] is the geometry of one Conv layer (1-D/2-D as 4-D NCHW descriptors, 3-D as
//! 5-D), in F32 (FMA math, or TF32 when allowed) or F16 (tensor-core math, FP32
//! accumulation). Its algorithm is fixed when the engine is built ([`DnnConv::prepare`]):
//! either the one the tuner chose, or cuDNN's first heuristic recommendation that fits the
//! workspace limit. cuDNN's handles are per execution context ([`DnnHandle`], bound to the
//! context's stream); the descriptors are created once per layer and only read afterwards.

use std::sync::OnceLock;

use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;
use kiln_core::{DType, KilnError, Result};

use crate::library::ConvParams;

/// Largest workspace a cuDNN algorithm may ask for (bytes).
pub const WORKSPACE_LIMIT: usize = 1 << 30;

/// True when libcudnn can be loaded (probed once).
pub fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only probes whether the shared library can be opened.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn dnn_err(what: &str, e: impl std::fmt::Debug) -> KilnError {
    KilnError::kernel("cudnn", format!("{what}: {e:?}"))
}

/// A cuDNN handle bound to one stream.
#[derive(Debug)]
pub struct DnnHandle(sys::cudnnHandle_t);

// SAFETY: a cuDNN handle may be used from any thread as long as it is not used by two
// threads at once; its owner (one execution context) uses it from one thread at a time.
unsafe impl Send for DnnHandle {}

impl DnnHandle {
    /// Creates a handle whose work goes to `stream`.
    pub fn new(stream: &CudaStream) -> Result<DnnHandle> {
        let h = result::create_handle().map_err(|e| dnn_err("create handle", e))?;
        // SAFETY: `h` was just created; the stream outlives the handle (both owned by one
        // execution context, the handle dropped first).
        unsafe { result::set_stream(h, stream.cu_stream() as *mut _) }
            .map_err(|e| dnn_err("set stream", e))?;
        Ok(DnnHandle(h))
    }

    /// The raw handle.
    pub fn raw(&self) -> sys::cudnnHandle_t {
        self.0
    }
}

impl Drop for DnnHandle {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// cuDNN's forward algorithm of index `i` (`cudnnConvolutionFwdAlgo_t`).
pub fn algo_of(i: u32) -> Option<sys::cudnnConvolutionFwdAlgo_t> {
    use sys::cudnnConvolutionFwdAlgo_t::*;
    Some(match i {
        0 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        1 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        2 => CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        3 => CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        4 => CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        5 => CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        6 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        7 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        _ => return None,
    })
}

/// Short name of algorithm `i` (for tactic ids and logs).
pub fn algo_name(i: u32) -> &'static str {
    [
        "implicit_gemm",
        "implicit_precomp_gemm",
        "gemm",
        "direct",
        "fft",
        "fft_tiling",
        "winograd",
        "winograd_nonfused",
    ]
    .get(i as usize)
    .copied()
    .unwrap_or("unknown")
}

/// True when cuDNN computes exactly ONNX's output for this geometry: cuDNN pads both ends
/// by the leading pads, so the output sizes must agree (ONNX's trailing pads may differ).
pub fn fits(p: &ConvParams, spatial: usize) -> bool {
    if !(1..=3).contains(&spatial) {
        return false;
    }
    let i32ok = |v: i64| v > 0 && v < i32::MAX as i64;
    if ![p.n, p.c, p.m, p.cg, p.mg].into_iter().all(i32ok) {
        return false;
    }
    (0..3).all(|d| {
        let span = p.dl[d] * (p.ks[d] - 1) + 1;
        let full = p.is[d] + 2 * p.pb[d] - span;
        full >= 0 && full / p.st[d] + 1 == p.os[d]
    })
}

/// Descriptors of one convolution, created once.
#[derive(Debug)]
struct Descs {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
}

// SAFETY: descriptors are plain host structures, written once in `prepare` and only read
// afterwards (cuDNN calls take them as const inputs).
unsafe impl Send for Descs {}
// SAFETY: as above: read-only after creation.
unsafe impl Sync for Descs {}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created once in `Descs::new` and is destroyed once.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_convolution_descriptor(self.conv);
            let _ = result::destroy_tensor_descriptor(self.y);
        }
    }
}

fn dims(n: i64, c: i64, sp: &[i64; 3], spatial: usize) -> Vec<i32> {
    let keep = spatial.max(2);
    let mut d = vec![n as i32, c as i32];
    d.extend(sp[3 - keep..].iter().map(|&v| v as i32));
    d
}

fn packed_strides(d: &[i32]) -> Vec<i32> {
    let mut s = vec![1i32; d.len()];
    for i in (0..d.len() - 1).rev() {
        s[i] = s[i + 1] * d[i + 1];
    }
    s
}

impl Descs {
    fn new(p: &ConvParams, spatial: usize, dtype: DType, tf32: bool) -> Result<Descs> {
        let dt = match dtype {
            DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
            other => return Err(dnn_err("dtype", other)),
        };
        let math = match (dtype, tf32) {
            (DType::F16, _) => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            (_, true) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        };
        let xd = dims(p.n, p.c, &p.is, spatial);
        let yd = dims(p.n, p.m, &p.os, spatial);
        let wd = dims(p.m, p.cg, &p.ks, spatial);
        let keep = spatial.max(2);
        let tail = |a: &[i64; 3]| -> Vec<i32> { a[3 - keep..].iter().map(|&v| v as i32).collect() };
        let (pads, strides, dil) = (tail(&p.pb), tail(&p.st), tail(&p.dl));
        let d = Descs {
            x: result::create_tensor_descriptor().map_err(|e| dnn_err("tensor descriptor", e))?,
            w: result::create_filter_descriptor().map_err(|e| dnn_err("filter descriptor", e))?,
            conv: result::create_convolution_descriptor()
                .map_err(|e| dnn_err("convolution descriptor", e))?,
            y: result::create_tensor_descriptor().map_err(|e| dnn_err("tensor descriptor", e))?,
        };
        let xs = packed_strides(&xd);
        let ys = packed_strides(&yd);
        // SAFETY: the descriptors were just created; every array has `len` elements.
        unsafe {
            result::set_tensornd_descriptor(d.x, dt, xd.len() as i32, xd.as_ptr(), xs.as_ptr())
                .map_err(|e| dnn_err("set input descriptor", e))?;
            result::set_tensornd_descriptor(d.y, dt, yd.len() as i32, yd.as_ptr(), ys.as_ptr())
                .map_err(|e| dnn_err("set output descriptor", e))?;
            result::set_filternd_descriptor(
                d.w,
                dt,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                wd.len() as i32,
                wd.as_ptr(),
            )
            .map_err(|e| dnn_err("set filter descriptor", e))?;
            result::set_convolutionnd_descriptor(
                d.conv,
                keep as i32,
                pads.as_ptr(),
                strides.as_ptr(),
                dil.as_ptr(),
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| dnn_err("set convolution descriptor", e))?;
            result::set_convolution_math_type(d.conv, math)
                .map_err(|e| dnn_err("set math type", e))?;
            result::set_convolution_group_count(d.conv, (p.c / p.cg) as i32)
                .map_err(|e| dnn_err("set group count", e))?;
        }
        Ok(d)
    }
}

/// What [`DnnConv::prepare`] fixed.
#[derive(Debug)]
struct Ready {
    descs: Descs,
    algo: u32,
    workspace: usize,
}

/// One algorithm cuDNN offers for a convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct AlgoChoice {
    /// Algorithm index (`cudnnConvolutionFwdAlgo_t`).
    pub algo: u32,
    /// Workspace bytes it needs.
    pub workspace: usize,
}

/// A convolution run by cuDNN.
#[derive(Debug)]
pub struct DnnConv {
    /// Geometry.
    pub p: ConvParams,
    /// Spatial dims (1-3).
    pub spatial: usize,
    /// Element type (F32 or F16).
    pub dtype: DType,
    /// Algorithm the tuner chose (None: cuDNN's heuristic).
    pub forced: Option<u32>,
    ready: OnceLock<Ready>,
}

impl DnnConv {
    /// A convolution to be prepared on the device.
    pub fn new(p: ConvParams, spatial: usize, dtype: DType, forced: Option<u32>) -> DnnConv {
        DnnConv {
            p,
            spatial,
            dtype,
            forced,
            ready: OnceLock::new(),
        }
    }

    /// The algorithms cuDNN's heuristics recommend for this convolution, best first, that
    /// succeed and fit [`WORKSPACE_LIMIT`]; the others are logged with the reason.
    pub fn candidates(&self, h: &DnnHandle, tf32: bool) -> Result<Vec<AlgoChoice>> {
        let d = Descs::new(&self.p, self.spatial, self.dtype, tf32)?;
        Self::heuristics(h, &d)
    }

    fn heuristics(h: &DnnHandle, d: &Descs) -> Result<Vec<AlgoChoice>> {
        let n = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
        // SAFETY: zeroed plain-data structs, filled by cuDNN below.
        let mut perf: Vec<sys::cudnnConvolutionFwdAlgoPerf_t> =
            (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut got = 0i32;
        // SAFETY: descriptors are live; `perf` has room for `n` results.
        unsafe {
            result::get_convolution_forward_algorithm(
                h.raw(),
                d.x,
                d.w,
                d.conv,
                d.y,
                n as i32,
                &mut got,
                perf.as_mut_ptr(),
            )
        }
        .map_err(|e| dnn_err("algorithm heuristics", e))?;
        let mut out = Vec::new();
        for r in perf.iter().take(got.max(0) as usize) {
            let algo = r.algo as u32;
            if r.status != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                tracing::debug!(algo = algo_name(algo), status = ?r.status, "cuDNN algorithm dropped: not supported");
            } else if r.memory > WORKSPACE_LIMIT {
                tracing::debug!(
                    algo = algo_name(algo),
                    bytes = r.memory,
                    "cuDNN algorithm dropped: workspace over the limit"
                );
            } else if !out.iter().any(|c: &AlgoChoice| c.algo == algo) {
                out.push(AlgoChoice {
                    algo,
                    workspace: r.memory,
                });
            }
        }
        Ok(out)
    }

    /// Creates the descriptors and fixes the algorithm (the forced one, else the first
    /// heuristic candidate). Idempotent.
    pub fn prepare(&self, h: &DnnHandle, tf32: bool) -> Result<()> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        let descs = Descs::new(&self.p, self.spatial, self.dtype, tf32)?;
        let (algo, workspace) = match self.forced {
            Some(a) => {
                let alg = algo_of(a).ok_or_else(|| dnn_err("unknown algorithm", a))?;
                // SAFETY: descriptors are live.
                let ws = unsafe {
                    result::get_convolution_forward_workspace_size(
                        h.raw(),
                        descs.x,
                        descs.w,
                        descs.conv,
                        descs.y,
                        alg,
                    )
                }
                .map_err(|e| dnn_err(&format!("algorithm {} unsupported", algo_name(a)), e))?;
                (a, ws)
            }
            None => {
                let c = Self::heuristics(h, &descs)?;
                let first = c
                    .first()
                    .ok_or_else(|| dnn_err("no algorithm", "cuDNN recommends none that fits"))?;
                (first.algo, first.workspace)
            }
        };
        let _ = self.ready.set(Ready {
            descs,
            algo,
            workspace,
        });
        Ok(())
    }

    /// The algorithm fixed by [`prepare`](Self::prepare).
    pub fn algo(&self) -> Option<u32> {
        self.ready.get().map(|r| r.algo)
    }

    /// Workspace bytes (0 before [`prepare`](Self::prepare)).
    pub fn workspace(&self) -> usize {
        self.ready.get().map_or(0, |r| r.workspace)
    }

    /// Enqueues `y = conv(x, w)` on the handle's stream.
    pub fn enqueue(
        &self,
        h: &DnnHandle,
        x: u64,
        w: u64,
        y: u64,
        work: u64,
        work_bytes: usize,
    ) -> Result<()> {
        let r = self
            .ready
            .get()
            .ok_or_else(|| dnn_err("enqueue", "layer not prepared"))?;
        if work_bytes < r.workspace {
            return Err(dnn_err(
                "workspace",
                format!("{work_bytes} bytes, {} needed", r.workspace),
            ));
        }
        let alg = algo_of(r.algo).ok_or_else(|| dnn_err("unknown algorithm", r.algo))?;
        let (one, zero) = (1.0f32, 0.0f32);
        // SAFETY: x, w and y hold the tensors the descriptors describe (checked by the
        // layer's size check); the workspace holds at least `r.workspace` bytes; alpha/beta
        // are f32 for both F32 and F16 data.
        unsafe {
            result::convolution_forward(
                h.raw(),
                &one as *const f32 as *const _,
                r.descs.x,
                x as *const _,
                r.descs.w,
                w as *const _,
                r.descs.conv,
                alg,
                work as *mut _,
                r.workspace,
                &zero as *const f32 as *const _,
                r.descs.y,
                y as *mut _,
            )
        }
        .map_err(|e| dnn_err("convolution forward", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(is: [i64; 3], ks: [i64; 3], st: [i64; 3], pb: [i64; 3], os: [i64; 3]) -> ConvParams {
        ConvParams {
            n: 2,
            c: 4,
            m: 8,
            cg: 4,
            mg: 8,
            kpos: ks.iter().product(),
            opos: os.iter().product(),
            ipos: is.iter().product(),
            is,
            os,
            ks,
            st,
            dl: [1; 3],
            pb,
        }
    }

    #[test]
    fn symmetric_pads_only() {
        // 3x3, pad 1, stride 1: same size.
        assert!(fits(
            &geom([1, 8, 8], [1, 3, 3], [1; 3], [0, 1, 1], [1, 8, 8]),
            2
        ));
        // SAME_UPPER on an even input with stride 2: ONNX pads (0 front, 1 back), output 4;
        // cuDNN with pad 0 gives (8-3)/2+1 = 3: refused.
        assert!(!fits(
            &geom([1, 8, 8], [1, 3, 3], [1, 2, 2], [0; 3], [1, 4, 4]),
            2
        ));
        // Trailing pad smaller than leading, output still the same: accepted.
        assert!(fits(
            &geom([1, 7, 7], [1, 3, 3], [1, 2, 2], [0, 1, 1], [1, 4, 4]),
            2
        ));
        assert!(!fits(
            &geom([1, 8, 8], [1, 3, 3], [1; 3], [0, 1, 1], [1, 8, 8]),
            4
        ));
    }

    #[test]
    fn descriptor_dims() {
        assert_eq!(dims(2, 3, &[1, 1, 9], 1), vec![2, 3, 1, 9]);
        assert_eq!(dims(2, 3, &[1, 5, 9], 2), vec![2, 3, 5, 9]);
        assert_eq!(dims(2, 3, &[4, 5, 9], 3), vec![2, 3, 4, 5, 9]);
        assert_eq!(packed_strides(&[2, 3, 5, 9]), vec![135, 45, 9, 1]);
        assert_eq!(algo_of(1).map(|a| a as u32), Some(1));
        assert!(algo_of(8).is_none());
        assert_eq!(algo_name(6), "winograd");
    }
}
