//! The GPU side of kernel auto-tuning: which implementations a layer can run with on this
//! GPU (tactic ids), and timing one layer with one of them on the device with CUDA events.
//!
//! Tactic ids are `cuda.conv.cudnn.<algo>` (a `cudnnConvolutionFwdAlgo_t` that cuDNN's
//! heuristics offer for the layer's shapes and that fits [`crate::dnn::WORKSPACE_LIMIT`])
//! and `cuda.conv.kiln` (kiln's own 1×1 GEMM / im2col + cuBLAS / direct paths) for Conv;
//! `cuda.gemm.cublas` (cuBLAS + NVRTC epilogue) and `cuda.gemm.cublaslt` (cuBLASLt with its
//! bias / ReLU / GELU epilogue, [`crate::lt`]) for MatMul and Gemm. The chosen one is
//! recorded as [`GPU_TACTIC_ATTR`] (`cudnn.<algo>`, `kiln`, `cublas` or `cublaslt`), which
//! lowering reads back, so a plan loads without timing. Precision is not a tactic dimension on the GPU:
//! each layer's precision comes from the FP16 policy ([`crate::precision`]).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nvrtc::Ptx;
use kiln_core::{Attr, DType, Fact, KilnError, Node, Result, Tensor};

use crate::dnn::DnnHandle;
use crate::layer::{DevTensor, GpuLayer, LaunchCx, ModuleSet, PrepareCx};
use crate::library::GPU_TACTIC_ATTR;
use crate::mem::{htod, sync, DevBuf};

/// Prefix of GPU convolution tactic ids.
pub const PREFIX: &str = "cuda.conv.";
/// Prefix of GPU MatMul/Gemm tactic ids (`cuda.gemm.cublas`, `cuda.gemm.cublaslt`).
pub const GEMM_PREFIX: &str = "cuda.gemm.";
/// The float tactic of a layer whose only alternative is INT8: the backend's own choice
/// (lowering without [`GPU_TACTIC_ATTR`]); nothing is recorded when it wins.
pub const DEFAULT_TACTIC: &str = "cuda.default";

/// The attribute value recorded for tactic `id` (`cuda.conv.cudnn.1` → `cudnn.1`,
/// `cuda.gemm.cublaslt` → `cublaslt`).
pub fn attr_value(id: &str) -> Option<&str> {
    id.strip_prefix(PREFIX)
        .or_else(|| id.strip_prefix(GEMM_PREFIX))
}

fn with_tactic(node: &Node, value: &str) -> Node {
    let mut n = node.clone();
    n.desc
        .attrs
        .insert(GPU_TACTIC_ATTR.into(), Attr::String(value.into()));
    n
}

/// Times layers on the GPU.
pub struct GpuTuner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    dnn: Option<DnnHandle>,
    arch: String,
    modules: ModuleSet,
    tf32: bool,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (median reported).
    pub reps: usize,
    /// The last node's device-typed random inputs (every tactic of a node reads the same).
    inputs: Option<(String, Vec<Option<Tensor>>)>,
}

impl std::fmt::Debug for GpuTuner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTuner")
            .field("arch", &self.arch)
            .finish()
    }
}

fn cu(what: &str, e: impl std::fmt::Display) -> KilnError {
    KilnError::Other(format!("CUDA: {what}: {e}"))
}

impl GpuTuner {
    /// A tuner on GPU 0 for an optimisation level (higher levels repeat more).
    pub fn new(tf32: bool, level: u8) -> Result<GpuTuner> {
        let ctx = crate::device::context()?;
        let info = crate::device::info(&ctx)?;
        let stream = ctx.new_stream().map_err(|e| cu("create stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cu("create cuBLAS handle", e))?;
        let dnn = if crate::dnn::available() {
            Some(DnnHandle::new(&stream)?)
        } else {
            None
        };
        Ok(GpuTuner {
            ctx,
            stream,
            blas,
            dnn,
            arch: info.arch(),
            modules: ModuleSet::default(),
            tf32,
            warmup: if level >= 4 { 5 } else { 2 },
            reps: if level >= 3 { 20 } else { 10 },
            inputs: None,
        })
    }

    /// Tactics of a node with device facts `fin`/`fout`, `(id, min_level)`: for Conv (when
    /// cuDNN takes the geometry) cuDNN's heuristic candidates (the first from level 1, the
    /// rest from level 2) and kiln's own path (level 1); for MatMul/Gemm cuBLAS and cuBLASLt
    /// (level 1, when cuBLASLt loads and takes the product); empty for other nodes.
    pub fn tactics(&self, node: &Node, fin: &[Fact], fout: &[Fact]) -> Vec<(String, u8)> {
        if matches!(node.desc.op_type.as_str(), "MatMul" | "Gemm") {
            return gemm_tactics(node, fin, fout);
        }
        if node.desc.op_type != "Conv" {
            return Vec::new();
        }
        let Some(h) = &self.dnn else {
            return Vec::new();
        };
        let algos = match crate::library::conv_dnn_candidates(node, fin, fout, h, self.tf32) {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                tracing::info!(layer = %node.name, error = %e, "cuDNN offers no algorithm");
                Vec::new()
            }
            None => return Vec::new(),
        };
        let mut out: Vec<(String, u8)> = algos
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    format!("{PREFIX}cudnn.{}", a.algo),
                    if i == 0 { 1 } else { 2 },
                )
            })
            .collect();
        out.push((format!("{PREFIX}kiln"), 1));
        out
    }

    fn load(&mut self, layer: &dyn GpuLayer) -> Result<()> {
        for s in layer.sources() {
            if self.modules.contains(&s.module) {
                continue;
            }
            let img = crate::compile::compile_cubin(&s.module, &s.code, &self.arch)?;
            let m = self
                .ctx
                .load_module(Ptx::from_binary(img))
                .map_err(|e| cu("load module", e))?;
            self.modules.insert(s.module.clone(), m);
        }
        Ok(())
    }

    /// Median milliseconds of `node` run with tactic `id` on device inputs of `fin`
    /// (`consts[i]`: the real weight of input i), outputs of `fout`.
    pub fn time(
        &mut self,
        node: &Node,
        fin: &[Fact],
        fout: &[Fact],
        consts: &[Option<&Tensor>],
        id: &str,
    ) -> Result<f64> {
        let node = if id == DEFAULT_TACTIC {
            node.clone()
        } else {
            let value = attr_value(id)
                .ok_or_else(|| KilnError::Other(format!("`{id}` is not a GPU tactic")))?;
            with_tactic(node, value)
        };
        self.time_node(&node, fin, fout, consts)
            .map_err(|e| KilnError::Other(format!("{id}: {e}")))
    }

    /// Median milliseconds of `node` as the backend lowers it (its own attributes decide the
    /// implementation: kiln's INT8 layers, the quantize/dequantize reformats, a GPU tactic
    /// already recorded), on device inputs of `fin` (`consts[i]`: the real value of input
    /// i when it is a weight), outputs of `fout`.
    pub fn time_node(
        &mut self,
        node: &Node,
        fin: &[Fact],
        fout: &[Fact],
        consts: &[Option<&Tensor>],
    ) -> Result<f64> {
        let layer = match crate::library::lower_any(node, fin, fout) {
            Some(Ok(l)) => l,
            Some(Err(e)) => return Err(e),
            None => {
                return Err(KilnError::Other(format!(
                    "{} ({}) does not lower to a GPU layer",
                    node.name, node.desc.op_type
                )))
            }
        };
        self.ctx
            .bind_to_thread()
            .map_err(|e| cu("bind context", e))?;
        self.load(layer.as_ref())?;
        layer.prepare(&PrepareCx {
            dnn: self.dnn.as_ref(),
            tf32: self.tf32,
        })?;
        if self.inputs.as_ref().is_none_or(|(n, _)| *n != node.name) {
            self.inputs = Some((node.name.clone(), vec![None; fin.len()]));
        }
        let mut bufs = Vec::new();
        let mut ins = Vec::new();
        for (i, f) in fin.iter().enumerate() {
            let (Some(dt), Some(shape)) = (f.dtype, f.concrete_shape()) else {
                ins.push(DevTensor {
                    ptr: 0,
                    dtype: DType::F32,
                    shape: Default::default(),
                });
                continue;
            };
            let n: usize = shape.iter().product();
            let cached = self
                .inputs
                .as_ref()
                .and_then(|(_, v)| v.get(i).cloned().flatten())
                .filter(|t| t.dtype() == dt && t.shape() == shape.as_slice());
            let host: Tensor = match cached {
                Some(t) => t,
                None => match consts.get(i).copied().flatten() {
                    Some(t) => t.clone(),
                    None => {
                        // Seeded non-zero values in ±[0.1, 1.1).
                        let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64);
                        let v: Vec<f32> = (0..n)
                            .map(|_| {
                                s ^= s << 13;
                                s ^= s >> 7;
                                s ^= s << 17;
                                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                                if s & 1 == 0 {
                                    0.1 + u
                                } else {
                                    -0.1 - u
                                }
                            })
                            .collect();
                        Tensor::from_vec(&shape, v)?
                    }
                },
            };
            let host = if host.dtype() == dt {
                host
            } else if dt == DType::F16 {
                crate::exec::to_f16_saturating(&host.cast(DType::F32)?)?
            } else {
                host.cast(dt)?
            };
            if let Some((_, v)) = &mut self.inputs {
                if let Some(slot) = v.get_mut(i) {
                    *slot = Some(host.clone());
                }
            }
            let b = DevBuf::new(&self.ctx, host.bytes().len().max(1))?;
            htod(&self.stream, b.ptr(), host.bytes())?;
            ins.push(DevTensor {
                ptr: b.ptr(),
                dtype: dt,
                shape: shape.iter().copied().collect(),
            });
            bufs.push(b);
        }
        let mut outs = Vec::new();
        for f in fout {
            let dt = f.dtype.unwrap_or(DType::F32);
            let shape = f.concrete_shape().unwrap_or_default();
            let b = DevBuf::new(
                &self.ctx,
                (shape.iter().product::<usize>() * dt.size()).max(1),
            )?;
            outs.push(DevTensor {
                ptr: b.ptr(),
                dtype: dt,
                shape: shape.iter().copied().collect(),
            });
            bufs.push(b);
        }
        let wbytes = layer.workspace_bytes(&ins);
        let work = DevBuf::new(&self.ctx, wbytes.max(1))?;
        let cx = LaunchCx {
            stream: &self.stream,
            modules: &self.modules,
            workspace: work.ptr(),
            workspace_bytes: wbytes,
            blas: Some(&self.blas),
            tf32: self.tf32,
            dnn: self.dnn.as_ref(),
        };
        for _ in 0..self.warmup {
            layer.enqueue(&cx, &ins, &outs)?;
        }
        let ev = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cu("create event", e))
        };
        let (a, b) = (ev()?, ev()?);
        let mut times = Vec::with_capacity(self.reps);
        for _ in 0..self.reps.max(1) {
            a.record(&self.stream).map_err(|e| cu("record event", e))?;
            layer.enqueue(&cx, &ins, &outs)?;
            b.record(&self.stream).map_err(|e| cu("record event", e))?;
            sync(&self.stream)?;
            times.push(a.elapsed_ms(&b).map_err(|e| cu("event timing", e))? as f64);
        }
        sync(&self.stream)?;
        drop(work);
        drop(bufs);
        times.sort_by(|x, y| x.total_cmp(y));
        Ok(times[times.len() / 2])
    }
}

/// Tactics of a MatMul/Gemm node: cuBLAS + NVRTC epilogue and cuBLASLt (with its bias /
/// activation epilogue), both from level 1, when cuBLASLt loads and takes the product.
fn gemm_tactics(node: &Node, fin: &[Fact], fout: &[Fact]) -> Vec<(String, u8)> {
    if !crate::lt::available() {
        return Vec::new();
    }
    let lt = with_tactic(node, "cublaslt");
    match crate::library::lower(&lt, fin, fout) {
        Some(Ok(l)) if l.tactic().starts_with("cublaslt") => vec![
            (format!("{GEMM_PREFIX}cublas"), 1),
            (format!("{GEMM_PREFIX}cublaslt"), 1),
        ],
        _ => Vec::new(),
    }
}

/// Per node name, whether it runs in FP16 in an engine built with `fp16` (the policy).
pub fn node_precisions(
    graph: &kiln_core::Graph,
    facts: &[Fact],
    fp16: bool,
) -> HashMap<String, bool> {
    let keep = crate::precision::fp32_layers(graph, facts, &crate::precision::Policy::default());
    graph
        .nodes
        .iter()
        .zip(keep)
        .map(|(n, k)| (n.name.clone(), fp16 && !k))
        .collect()
}

/// Device facts of a node's outputs in precision `lo` (F32 → F16 when true).
pub fn device_node_facts(node_facts: &[Option<&Fact>], lo: bool) -> Vec<Fact> {
    node_facts
        .iter()
        .map(|f| match f {
            Some(f) => {
                let mut f = (*f).clone();
                if lo && f.dtype == Some(DType::F32) {
                    f.dtype = Some(DType::F16);
                }
                f
            }
            None => Fact::unknown(),
        })
        .collect()
}

/// Device facts of `node`'s inputs in precision `lo`, as the engine reads them
/// ([`crate::precision::read_dtype`]: F32 → F16 when true, biases excepted).
pub fn device_input_facts(node: &Node, inputs: &[Option<&Fact>], lo: bool) -> Vec<Fact> {
    inputs
        .iter()
        .enumerate()
        .map(|(j, f)| match f {
            Some(f) => {
                let mut f = (*f).clone();
                if let Some(dt) = f.dtype {
                    f.dtype = Some(crate::precision::read_dtype(node, j, dt, lo));
                }
                f
            }
            None => Fact::unknown(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_attribute_values() {
        assert_eq!(attr_value("cuda.conv.cudnn.1"), Some("cudnn.1"));
        assert_eq!(attr_value("cuda.conv.kiln"), Some("kiln"));
        assert_eq!(attr_value("cpu.conv.direct"), None);
        assert_eq!(attr_value("cuda.gemm.cublaslt"), Some("cublaslt"));
        let f = Fact::concrete(DType::F32, &[1, 2]);
        let i = Fact::concrete(DType::I64, &[2]);
        let d = device_node_facts(&[Some(&f), Some(&i), None], true);
        assert_eq!(d[0].dtype, Some(DType::F16));
        assert_eq!(d[1].dtype, Some(DType::I64));
        assert_eq!(
            device_node_facts(&[Some(&f)], false)[0].dtype,
            Some(DType::F32)
        );
        let conv = crate::kernels::testutil::node("Conv", 17, vec![], 3, 1);
        let d = device_input_facts(&conv, &[Some(&f), Some(&f), Some(&f)], true);
        let dts: Vec<_> = d.iter().map(|f| f.dtype).collect();
        assert_eq!(
            dts,
            vec![Some(DType::F16), Some(DType::F16), Some(DType::F32)]
        );
    }
}
