//! GPU monitoring through NVML (nvml-wrapper): one-shot samples for `kiln monitor` and a
//! background sampler that `kiln bench` runs during the timed phase.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_core::{KilnError, Result};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::Nvml;
use serde::Serialize;

/// One NVML reading of one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// GPU index.
    pub index: u32,
    /// Device name.
    pub name: String,
    /// GPU utilization over the driver's last sample period, percent.
    pub gpu_util_pct: u32,
    /// Memory-controller utilization, percent.
    pub mem_util_pct: u32,
    /// Memory used, bytes.
    pub mem_used_bytes: u64,
    /// Memory total, bytes.
    pub mem_total_bytes: u64,
    /// SM clock, MHz.
    pub sm_clock_mhz: u32,
    /// Memory clock, MHz.
    pub mem_clock_mhz: u32,
    /// Power draw, watts.
    pub power_w: f64,
    /// Temperature, °C.
    pub temperature_c: u32,
    /// Active throttle (clock event) reasons, `|`-separated (`none` when clocks are free).
    pub throttle: String,
}

fn nvml_err(e: impl std::fmt::Display) -> KilnError {
    KilnError::Other(format!(
        "no GPU to monitor: NVML (libnvidia-ml) is not usable on this machine ({e})"
    ))
}

/// An open NVML session.
pub struct Monitor {
    nvml: Nvml,
}

impl Monitor {
    /// Opens NVML; a clear error on machines without an NVIDIA driver.
    pub fn open() -> Result<Monitor> {
        let nvml = std::panic::catch_unwind(Nvml::init)
            .map_err(|_| nvml_err("initialisation panicked"))?
            .map_err(nvml_err)?;
        Ok(Monitor { nvml })
    }

    /// Number of GPUs.
    pub fn count(&self) -> Result<u32> {
        self.nvml.device_count().map_err(nvml_err)
    }

    /// Reads GPU `index`.
    pub fn sample(&self, index: u32) -> Result<Sample> {
        let d = self.nvml.device_by_index(index).map_err(nvml_err)?;
        let util = d.utilization_rates().ok();
        let mem = d.memory_info().ok();
        let throttle = d
            .current_throttle_reasons()
            .map(|r| {
                if r.is_empty() {
                    "none".to_string()
                } else {
                    format!("{r:?}")
                        .trim_start_matches("ThrottleReasons(")
                        .trim_end_matches(')')
                        .replace(" | ", "|")
                }
            })
            .unwrap_or_else(|_| "n/a".into());
        Ok(Sample {
            index,
            name: d.name().unwrap_or_default(),
            gpu_util_pct: util.as_ref().map_or(0, |u| u.gpu),
            mem_util_pct: util.as_ref().map_or(0, |u| u.memory),
            mem_used_bytes: mem.as_ref().map_or(0, |m| m.used),
            mem_total_bytes: mem.as_ref().map_or(0, |m| m.total),
            sm_clock_mhz: d.clock_info(Clock::SM).unwrap_or(0),
            mem_clock_mhz: d.clock_info(Clock::Memory).unwrap_or(0),
            power_w: d.power_usage().map_or(0.0, |mw| mw as f64 / 1e3),
            temperature_c: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            throttle,
        })
    }
}

/// Averages of samples taken during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub samples: usize,
    /// Mean GPU utilization, percent.
    pub avg_gpu_util_pct: f64,
    /// Mean SM clock, MHz.
    pub avg_sm_clock_mhz: f64,
    /// Largest memory used, bytes.
    pub max_mem_used_bytes: u64,
    /// Mean power, watts.
    pub avg_power_w: f64,
}

/// Samples GPU `index` every `interval` on a background thread until [`Sampler::stop`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    /// Starts sampling (errors when NVML is not usable).
    pub fn start(index: u32, interval: Duration) -> Result<Sampler> {
        let mon = Monitor::open()?;
        mon.sample(index)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(s) = mon.sample(index) {
                    v.push(s);
                }
                std::thread::sleep(interval);
            }
            v
        });
        Ok(Sampler {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops and summarises.
    pub fn stop(mut self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        let v = self
            .handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        summarize(&v)
    }
}

/// Averages of `v`.
pub fn summarize(v: &[Sample]) -> Summary {
    let n = v.len().max(1) as f64;
    Summary {
        samples: v.len(),
        avg_gpu_util_pct: v.iter().map(|s| s.gpu_util_pct as f64).sum::<f64>() / n,
        avg_sm_clock_mhz: v.iter().map(|s| s.sm_clock_mhz as f64).sum::<f64>() / n,
        max_mem_used_bytes: v.iter().map(|s| s.mem_used_bytes).max().unwrap_or(0),
        avg_power_w: v.iter().map(|s| s.power_w).sum::<f64>() / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_averages() {
        let s = |u, c, m| Sample {
            gpu_util_pct: u,
            sm_clock_mhz: c,
            mem_used_bytes: m,
            ..Default::default()
        };
        let sum = summarize(&[s(50, 1000, 10), s(100, 2000, 30)]);
        assert_eq!(sum.samples, 2);
        assert_eq!(sum.avg_gpu_util_pct, 75.0);
        assert_eq!(sum.avg_sm_clock_mhz, 1500.0);
        assert_eq!(sum.max_mem_used_bytes, 30);
        assert_eq!(summarize(&[]).samples, 0);
    }
}
