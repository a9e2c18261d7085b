//! Opening the GPU and describing it: name, compute capability and the versions of the
//! driver and libraries kiln's GPU engines depend on (recorded in plan fingerprints).

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::CudaContext;
use kiln_core::{KilnError, Result};
use serde::{Deserialize, Serialize};

use crate::driver_present;

/// What a GPU engine was built for: compared field by field when a plan is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Device name as the driver reports it, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability `major.minor`, e.g. `9.0`.
    pub compute_capability: String,
    /// CUDA driver API version, e.g. `13.0`.
    pub driver_version: String,
    /// NVRTC version (`none` when NVRTC cannot be loaded).
    pub nvrtc_version: String,
    /// cuBLAS version (`none` when cuBLAS cannot be loaded).
    pub cublas_version: String,
    /// cuDNN version (`none` when cuDNN cannot be loaded; kiln does not need it yet).
    pub cudnn_version: String,
}

impl GpuInfo {
    /// The first field that differs from `here`, as `(field, plan value, this machine)`.
    pub fn mismatch(&self, here: &GpuInfo) -> Option<(&'static str, String, String)> {
        let fields: [(&'static str, &String, &String); 6] = [
            ("GPU name", &self.name, &here.name),
            (
                "compute capability",
                &self.compute_capability,
                &here.compute_capability,
            ),
            (
                "CUDA driver version",
                &self.driver_version,
                &here.driver_version,
            ),
            ("NVRTC version", &self.nvrtc_version, &here.nvrtc_version),
            ("cuBLAS version", &self.cublas_version, &here.cublas_version),
            ("cuDNN version", &self.cudnn_version, &here.cudnn_version),
        ];
        fields
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(f, a, b)| (f, a.clone(), b.clone()))
    }

    /// The NVRTC target for this device's compute capability (`sm_90` for 9.0).
    pub fn arch(&self) -> String {
        format!("sm_{}", self.compute_capability.replace('.', ""))
    }
}

/// The error for a machine where libcuda cannot be loaded.
pub fn no_driver_error() -> KilnError {
    KilnError::Other(
        "no CUDA driver found: libcuda could not be loaded on this machine (build with --device cpu, or --device auto to pick the CPU when there is no GPU)"
            .into(),
    )
}

fn driver_err(what: &str, e: impl std::fmt::Display) -> KilnError {
    KilnError::Other(format!("CUDA: {what}: {e}"))
}

static CONTEXT: OnceLock<Mutex<Option<Arc<CudaContext>>>> = OnceLock::new();

/// The process-wide context of GPU 0 (created on first use). Errors, never panics, on a
/// machine without a driver or without a GPU.
pub fn context() -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(no_driver_error());
    }
    let cell = CONTEXT.get_or_init(|| Mutex::new(None));
    let mut guard = cell
        .lock()
        .map_err(|_| KilnError::Other("CUDA context lock poisoned".into()))?;
    if let Some(c) = guard.as_ref() {
        c.bind_to_thread()
            .map_err(|e| driver_err("cannot bind the context", e))?;
        return Ok(c.clone());
    }
    let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
        .map_err(|_| KilnError::Other("CUDA: opening device 0 failed (driver panic)".into()))?
        .map_err(|e| driver_err("cannot open GPU 0 (is there a GPU?)", e))?;
    *guard = Some(ctx.clone());
    Ok(ctx)
}

/// True when a driver is present and GPU 0 can be opened.
pub fn gpu_usable() -> bool {
    driver_present() && context().is_ok()
}

fn version_string(v: i64) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Describes GPU 0 and the loaded libraries.
pub fn info(ctx: &Arc<CudaContext>) -> Result<GpuInfo> {
    let name = ctx.name().map_err(|e| driver_err("device name", e))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_err("compute capability", e))?;
    let mut drv: std::ffi::c_int = 0;
    // SAFETY: writes one int; the driver library is loaded (a context exists).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut drv) }
        .result()
        .map_err(|e| driver_err("driver version", e))?;
    // SAFETY: probes whether the library can be opened.
    let nvrtc_version = if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let (mut a, mut b) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) }
            .result()
            .map_err(|e| KilnError::Other(format!("NVRTC version: {e:?}")))?;
        format!("{a}.{b}")
    } else {
        "none".into()
    };
    // SAFETY: probes whether the library can be opened.
    let cublas_version = if unsafe { cudarc::cublas::sys::is_culib_present() } {
        let blas = cudarc::cublas::CudaBlas::new(ctx.default_stream())
            .map_err(|e| driver_err("cuBLAS handle", e))?;
        let mut v: std::ffi::c_int = 0;
        // SAFETY: valid handle, writes one int.
        let st = unsafe { cudarc::cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut v) };
        if st != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(KilnError::Other(format!("cuBLAS version: {st:?}")));
        }
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        "none".into()
    };
    // SAFETY: probes whether the library can be opened.
    let cudnn_version = if unsafe { cudarc::cudnn::sys::is_culib_present() } {
        // SAFETY: no arguments; returns the library's version number.
        let v = unsafe { cudarc::cudnn::sys::cudnnGetVersion() };
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        "none".into()
    };
    Ok(GpuInfo {
        name,
        compute_capability: format!("{major}.{minor}"),
        driver_version: version_string(drv as i64),
        nvrtc_version,
        cublas_version,
        cudnn_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GpuInfo {
        GpuInfo {
            name: "NVIDIA H200".into(),
            compute_capability: "9.0".into(),
            driver_version: "13.0".into(),
            nvrtc_version: "13.0".into(),
            cublas_version: "13.0.0".into(),
            cudnn_version: "9.10.2".into(),
        }
    }

    #[test]
    fn mismatch_names_the_field() {
        let a = sample();
        assert!(a.mismatch(&a).is_none());
        let mut b = sample();
        b.compute_capability = "8.0".into();
        let (f, plan, here) = a.mismatch(&b).unwrap();
        assert_eq!(
            (f, plan.as_str(), here.as_str()),
            ("compute capability", "9.0", "8.0")
        );
        let mut c = sample();
        c.cublas_version = "12.9.0".into();
        assert_eq!(a.mismatch(&c).unwrap().0, "cuBLAS version");
        assert_eq!(a.arch(), "sm_90");
        assert_eq!(version_string(13000), "13.0");
        assert_eq!(version_string(12090), "12.9");
    }

    #[test]
    fn no_driver_path_is_an_error() {
        if driver_present() {
            eprintln!("driver present: the no-driver path is not exercised here");
            return;
        }
        let e = match context() {
            Ok(_) => panic!("no driver, yet a context opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("no CUDA driver found"), "{e}");
        assert!(!gpu_usable());
    }
}
