//! What an engine was built for: backend, device and the features its kernels rely on.
//! Plans record it; loading compares it with the machine and says what differs.

use serde::{Deserialize, Serialize};

/// A build fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Backend name: `cpu` or `cuda`.
    pub backend: String,
    /// Device description, e.g. `x86_64 CPU` or `NVIDIA H100 80GB HBM3 (sm_90)`.
    pub device: String,
    /// Instruction-set architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// CPU features detected at build time (informational).
    pub cpu_features: Vec<String>,
    /// Features the plan's kernels need; loading fails when one is missing.
    pub required_features: Vec<String>,
    /// GPU engines: the GPU and the CUDA library versions the plan was built with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<kiln_cuda::GpuInfo>,
}

impl Fingerprint {
    /// The fingerprint of this machine's CPU backend.
    pub fn cpu() -> Fingerprint {
        Fingerprint {
            backend: "cpu".into(),
            device: format!("{} CPU", std::env::consts::ARCH),
            arch: std::env::consts::ARCH.into(),
            cpu_features: cpu_features(),
            required_features: Vec::new(),
            gpu: None,
        }
    }

    /// The fingerprint of a CUDA engine built for `gpu` on this machine.
    pub fn cuda(gpu: kiln_cuda::GpuInfo) -> Fingerprint {
        Fingerprint {
            backend: "cuda".into(),
            device: format!(
                "{} (sm_{})",
                gpu.name,
                gpu.compute_capability.replace('.', "")
            ),
            gpu: Some(gpu),
            ..Fingerprint::cpu()
        }
    }

    /// The identity of the device for timing purposes (timing caches are valid only for
    /// the same key): backend, device, and the CPU features the kernels may use.
    pub fn device_key(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.backend,
            self.device,
            self.arch,
            self.cpu_features.join(",")
        )
    }

    /// Why a plan with fingerprint `self` cannot run here (`here`), if it cannot.
    pub fn incompatibility(&self, here: &Fingerprint) -> Option<String> {
        if self.backend != here.backend {
            return Some(format!(
                "plan was built for the {} backend ({}), this runtime uses {} ({})",
                self.backend, self.device, here.backend, here.device
            ));
        }
        if self.arch != here.arch {
            return Some(format!(
                "plan was built for {} but this machine is {}",
                self.arch, here.arch
            ));
        }
        if let (Some(plan), Some(now)) = (&self.gpu, &here.gpu) {
            if let Some((field, a, b)) = plan.mismatch(now) {
                return Some(format!(
                    "{field} differs: the plan was built with {a}, this machine has {b}; rebuild the plan here"
                ));
            }
        }
        if self.backend != "cpu" && self.device != here.device {
            return Some(format!(
                "plan was built for device {}, this device is {}",
                self.device, here.device
            ));
        }
        let missing: Vec<&str> = self
            .required_features
            .iter()
            .filter(|f| !here.cpu_features.contains(f))
            .map(|s| s.as_str())
            .collect();
        if !missing.is_empty() {
            return Some(format!(
                "plan needs CPU features this machine lacks: {}",
                missing.join(", ")
            ));
        }
        None
    }
}

/// The SIMD features of this CPU that kiln's kernels care about.
pub fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut v: Vec<String> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::is_x86_feature_detected!($f) { v.push($f.to_string()); } )* };
        }
        probe!(
            "sse4.1",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        v.push("neon".to_string());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> kiln_cuda::GpuInfo {
        kiln_cuda::GpuInfo {
            name: "NVIDIA H200".into(),
            compute_capability: "9.0".into(),
            driver_version: "13.0".into(),
            nvrtc_version: "13.0".into(),
            cublas_version: "13.0.0".into(),
            cudnn_version: "9.10.2".into(),
        }
    }

    #[test]
    fn gpu_plans_are_refused_on_another_gpu_or_library() {
        let plan = Fingerprint::cuda(gpu());
        assert!(plan.incompatibility(&Fingerprint::cuda(gpu())).is_none());
        let mut other = gpu();
        other.name = "NVIDIA A100".into();
        let why = plan.incompatibility(&Fingerprint::cuda(other)).unwrap();
        assert!(
            why.contains("GPU name") && why.contains("NVIDIA A100"),
            "{why}"
        );
        let mut other = gpu();
        other.cublas_version = "12.9.1".into();
        let why = plan.incompatibility(&Fingerprint::cuda(other)).unwrap();
        assert!(
            why.contains("cuBLAS version") && why.contains("12.9.1"),
            "{why}"
        );
        let why = plan.incompatibility(&Fingerprint::cpu()).unwrap();
        assert!(why.contains("cuda backend"), "{why}");
        // A CPU plan's JSON has no `gpu` field and still decodes.
        let json = serde_json::to_string(&Fingerprint::cpu()).unwrap();
        assert!(!json.contains("gpu"));
        let back: Fingerprint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Fingerprint::cpu());
    }
}
