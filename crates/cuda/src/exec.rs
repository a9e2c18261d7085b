//! kiln's GPU executor.
//!
//! [`GpuEngine::build`] lowers every node of a graph whose shapes are all known (the facts of
//! the engine's static memory plan): MatMul/Gemm/Conv to cuBLAS layers ([`crate::library`]),
//! the rest to NVRTC kernels ([`crate::kernels`]); a node with no GPU layer (or whose values
//! cannot live on the device: sequences, strings, unknown shapes, subgraphs) runs its CPU
//! reference op, with device-to-host and host-to-device copies around it. Weights are
//! uploaded once per engine (FP16 engines convert float weights while uploading, saturating
//! at ±65504); modules are compiled to CUBIN once and the images kept for the plan file.
//!
//! A [`GpuContext`] (one per execution context) owns one stream, a cuBLAS handle, the
//! activation arena (offsets from `kiln_core::planner` over the step lifetimes), the shared
//! workspace, staging for FP16 I/O conversion and pinned host buffers for inputs and
//! outputs, and times each run with CUDA events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::f16;
use kiln_core::planner::{self, Request};
use kiln_core::{DType, Fact, Graph, KilnError, Node, Result, Tensor, Value, ValueKind};

use crate::device::{self, GpuInfo};
use crate::kernels::common::{grid_for, source, BLOCK};
use crate::layer::{DevTensor, GpuLayer, KernelSource, LaunchCx, ModuleSet};
use crate::mem::{dtoh, htod, sync, DevBuf, PinnedBuf};

/// Precision switches of a GPU engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GpuOptions {
    /// Float tensors (weights and activations) in FP16; GEMMs accumulate in FP32.
    pub fp16: bool,
    /// Allow TF32 tensor-core math in FP32 GEMMs.
    pub tf32: bool,
}

/// Compiled modules, by name: what a plan stores.
pub type ModuleImages = BTreeMap<String, Vec<u8>>;

/// Where a value lives on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Offset in the context's arena.
    Arena(usize),
    /// Offset in the engine's weight buffer.
    Weight(usize),
}

/// A value the device can hold: static tensor of a kernel type.
#[derive(Debug, Clone)]
struct Slot {
    place: Place,
    /// Element type in the graph (what the CPU and the caller see).
    host_dtype: DType,
    /// Element type on the device (F16 for graph F32 in an FP16 engine).
    dev_dtype: DType,
    shape: Vec<usize>,
}

impl Slot {
    fn dev_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dev_dtype.size()
    }
    fn host_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.host_dtype.size()
    }
}

/// How one node runs.
#[derive(Debug)]
enum Runner {
    Gpu(Box<dyn GpuLayer>),
    Cpu(String),
}

/// One layer of a GPU engine, for `kiln inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerPlacement {
    /// Node index in the graph.
    pub node: usize,
    /// `gpu` or `cpu` (fallback).
    pub device: &'static str,
    /// Tactic id (`cpu.fallback` plus the reason for fallbacks).
    pub tactic: String,
    /// `fp16`, `fp32` or the output dtype for non-float layers.
    pub precision: String,
}

/// An engine's device side: layers, compiled modules and uploaded weights. Immutable and
/// shared by all contexts (`Send + Sync`).
pub struct GpuEngine {
    ctx: Arc<CudaContext>,
    info: GpuInfo,
    opts: GpuOptions,
    runners: Vec<Runner>,
    /// Some layer runs on cuDNN (contexts create a handle).
    uses_dnn: bool,
    /// Per node: runs in FP16.
    lo: Vec<bool>,
    slots: Vec<Option<Slot>>,
    /// Copies of values in another precision than stored (weights per precision, converted
    /// activations).
    extra: Vec<Slot>,
    /// Per node, per input: the `extra` slot it reads instead of the value's own.
    inmap: Vec<Vec<Option<usize>>>,
    /// Per node: conversions (value → `extra` slot) enqueued before it.
    convs: Vec<Vec<(usize, usize)>>,
    modules: ModuleSet,
    images: ModuleImages,
    convert: KernelSource,
    weights: DevBuf,
    arena_bytes: usize,
    arena_lower_bound: usize,
    workspace_bytes: usize,
    staging_bytes: usize,
}

impl std::fmt::Debug for GpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEngine")
            .field("device", &self.info.name)
            .field("layers", &self.runners.len())
            .field("fallbacks", &self.fallbacks())
            .finish()
    }
}

/// The device dtype of a graph dtype under `opts`.
pub fn device_dtype(dt: DType, opts: GpuOptions) -> DType {
    if opts.fp16 && dt == DType::F32 {
        DType::F16
    } else {
        dt
    }
}

/// True when values of `dt` can live on the device.
fn device_type(dt: DType) -> bool {
    crate::kernels::common::ctype(dt).is_some()
}

/// Converts an F32 tensor to F16, saturating at ±65504 (so huge masks stay finite).
pub fn to_f16_saturating(t: &Tensor) -> Result<Tensor> {
    let v = t.as_slice::<f32>()?;
    let h: Vec<f16> = v
        .iter()
        .map(|&x| {
            f16::from_f32(if x.is_nan() {
                x
            } else {
                x.clamp(-65504.0, 65504.0)
            })
        })
        .collect();
    Tensor::from_vec(t.shape(), h)
}

fn convert_source() -> KernelSource {
    source(
        "convert",
        format!(
            "{}extern \"C\" __global__ void kiln_f32_to_f16(const float* x, __half* y, long long n) {{\n\
             for (long long i = KILN_TID; i < n; i += KILN_STRIDE) {{ float v = x[i]; v = (v != v) ? v : fminf(fmaxf(v, -65504.0f), 65504.0f); y[i] = __float2half_rn(v); }}\n}}\n\
             extern \"C\" __global__ void kiln_f16_to_f32(const __half* x, float* y, long long n) {{\n\
             for (long long i = KILN_TID; i < n; i += KILN_STRIDE) y[i] = __half2float(x[i]);\n}}\n",
            crate::kernels::common::prelude(&[DType::F16])
        ),
    )
}

/// The device facts of every value (dtype mapped by `opts`). Constant values keep their
/// graph dtype and full precision (lowerings read them as parameters: Resize scales, Pad
/// values, ...); weights are converted when they are uploaded.
fn device_facts(graph: &Graph, facts: &[Fact], opts: GpuOptions) -> Result<Vec<Option<Fact>>> {
    let mut out = Vec::with_capacity(facts.len());
    for (id, f) in facts.iter().enumerate() {
        let ok = f.kind == ValueKind::Tensor
            && f.dtype.is_some_and(device_type)
            && f.concrete_shape().is_some();
        if !ok {
            out.push(None);
            continue;
        }
        let dt = f.dtype.expect("checked");
        let shape = f.concrete_shape().expect("checked");
        let ddt = device_dtype(dt, opts);
        let mut df = Fact::concrete(ddt, &shape);
        let konst = graph.constants.get(&id).or(f.konst.as_ref());
        df.konst = konst.cloned();
        out.push(Some(df));
    }
    Ok(out)
}

/// One compiled module: name and CUBIN.
type Image = (String, Vec<u8>);

fn compile_all(sources: &[KernelSource], arch: &str) -> Result<ModuleImages> {
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .clamp(1, 16);
    let chunks: Vec<&[KernelSource]> = sources
        .chunks(sources.len().div_ceil(threads).max(1))
        .collect();
    let results: Vec<Result<Vec<Image>>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|k| {
                            Ok((
                                k.module.clone(),
                                crate::compile::compile_cubin(&k.module, &k.code, arch)?,
                            ))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(KilnError::Other("NVRTC compile thread panicked".into()))
                })
            })
            .collect()
    });
    let mut images = ModuleImages::new();
    for r in results {
        images.extend(r?);
    }
    Ok(images)
}

/// Per-node and per-value precision of an engine: FP16 engines run every layer in FP16
/// except those the FP16 policy ([`crate::precision`]) keeps in FP32.
#[derive(Debug, Clone)]
struct Precisions {
    /// Node runs in FP16 (reads and writes its graph-F32 values as F16).
    lo: Vec<bool>,
    /// A graph-F32 value is stored as F16 on the device (outputs of FP16 layers; graph
    /// inputs that no FP32 layer reads). Constants are stored once per precision read.
    value16: Vec<bool>,
    /// Graph dtype of each value (None: not a tensor with a known dtype).
    dtypes: Vec<Option<DType>>,
}

impl Precisions {
    fn new(graph: &Graph, facts: &[Fact], opts: GpuOptions) -> Precisions {
        let n = graph.nodes.len();
        let dtypes: Vec<Option<DType>> = facts.iter().map(|f| f.dtype).collect();
        if !opts.fp16 {
            return Precisions {
                lo: vec![false; n],
                value16: vec![false; graph.values.len()],
                dtypes,
            };
        }
        let keep =
            crate::precision::fp32_layers(graph, facts, &crate::precision::Policy::default());
        let lo: Vec<bool> = keep.iter().map(|k| !k).collect();
        let mut value16 = vec![false; graph.values.len()];
        for (i, node) in graph.nodes.iter().enumerate() {
            for o in node.outputs.iter().flatten() {
                value16[*o] = lo[i];
            }
        }
        for &x in &graph.inputs {
            value16[x] = !graph
                .nodes
                .iter()
                .enumerate()
                .any(|(k, nd)| !lo[k] && nd.inputs.contains(&Some(x)));
        }
        Precisions {
            lo,
            value16,
            dtypes,
        }
    }

    /// Device dtype in which node `i` (`node`) reads value `v` as its input `input`.
    fn read(&self, node: &Node, i: usize, input: usize, v: usize) -> Option<DType> {
        let dt = self.dtypes.get(v).copied().flatten()?;
        Some(crate::precision::read_dtype(node, input, dt, self.lo[i]))
    }

    /// Device dtype in which (non-constant) value `v` is stored.
    fn stored(&self, v: usize) -> Option<DType> {
        let dt = self.dtypes.get(v).copied().flatten()?;
        Some(if dt == DType::F32 && self.value16[v] {
            DType::F16
        } else {
            dt
        })
    }
}

fn with_dtype(f: &Fact, dt: DType) -> Fact {
    Fact {
        dtype: Some(dt),
        ..f.clone()
    }
}

/// Decides how each node runs (no GPU needed): a library or NVRTC layer, or the CPU with the
/// reason. `facts` are the engine's concrete facts, one per value.
fn lower_nodes(
    graph: &Graph,
    facts: &[Fact],
    opts: GpuOptions,
) -> Result<(Vec<Runner>, Precisions)> {
    let dfacts = device_facts(graph, facts, opts)?;
    let prec = Precisions::new(graph, facts, opts);
    let unknown = Fact::unknown();
    let mut runners = Vec::with_capacity(graph.nodes.len());
    for (ni, node) in graph.nodes.iter().enumerate() {
        let ids = node.inputs.iter().chain(&node.outputs).flatten();
        let mut why = None;
        if !node.op.subgraphs().is_empty() {
            why = Some("has subgraphs".to_string());
        } else if let Some(&v) = ids.clone().find(|&&v| dfacts[v].is_none()) {
            why = Some(format!(
                "value {} is not a static tensor of a GPU type",
                graph.values[v].name
            ));
        }
        if let Some(w) = why {
            runners.push(Runner::Cpu(w));
            continue;
        }
        let fin: Vec<Fact> = node
            .inputs
            .iter()
            .enumerate()
            .map(|(j, i)| {
                i.map_or_else(
                    || unknown.clone(),
                    |v| {
                        let f = dfacts[v].as_ref().expect("checked");
                        let dt = prec.read(node, ni, j, v);
                        with_dtype(f, dt.expect("device facts have a dtype"))
                    },
                )
            })
            .collect();
        let fout: Vec<Fact> = node
            .outputs
            .iter()
            .map(|o| {
                o.map_or_else(
                    || unknown.clone(),
                    |v| {
                        let f = dfacts[v].as_ref().expect("checked");
                        with_dtype(f, prec.stored(v).expect("device facts have a dtype"))
                    },
                )
            })
            .collect();
        let lowered = crate::library::lower_any(node, &fin, &fout);
        runners.push(match lowered {
            Some(Ok(l)) => Runner::Gpu(l),
            Some(Err(e)) => Runner::Cpu(format!("lowering failed: {e}")),
            None => Runner::Cpu("no GPU kernel".into()),
        });
    }
    Ok((runners, prec))
}

/// How each node of `graph` would run on the GPU under `opts` (no GPU needed): what
/// `kiln inspect` shows for a GPU engine. Used by tests of lowering decisions and fallbacks.
pub fn plan_layers(graph: &Graph, facts: &[Fact], opts: GpuOptions) -> Result<Vec<LayerPlacement>> {
    let (runners, prec) = lower_nodes(graph, facts, opts)?;
    Ok(placements_of(&runners, &prec.lo))
}

fn placements_of(runners: &[Runner], lo: &[bool]) -> Vec<LayerPlacement> {
    runners
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            Runner::Gpu(l) => LayerPlacement {
                node: i,
                device: "gpu",
                tactic: l.tactic(),
                precision: if l.tactic().starts_with("nvrtc.int8.")
                    || l.tactic().starts_with("cublaslt.int8.")
                {
                    // INT8 products (NVRTC or IMMA) and the quantize/dequantize reformats.
                    "int8".into()
                } else if lo[i] {
                    "fp16".into()
                } else {
                    "fp32".into()
                },
            },
            Runner::Cpu(why) => LayerPlacement {
                node: i,
                device: "cpu",
                tactic: format!("cpu.fallback ({why})"),
                precision: if lo[i] {
                    "fp32 (stores fp16)".into()
                } else {
                    "fp32".into()
                },
            },
        })
        .collect()
}

impl GpuEngine {
    /// Lowers `graph` (with `facts`, one per value, all shapes known where the GPU runs),
    /// compiles its modules (or takes them from `images`, as stored in a plan: then NVRTC
    /// never runs) and uploads its weights.
    pub fn build(
        graph: &Graph,
        facts: &[Fact],
        opts: GpuOptions,
        images: Option<&ModuleImages>,
    ) -> Result<GpuEngine> {
        let ctx = device::context()?;
        let info = device::info(&ctx)?;
        let (runners, prec) = lower_nodes(graph, facts, opts)?;
        let dfacts = device_facts(graph, facts, opts)?;

        // Modules.
        let convert = convert_source();
        let mut sources: BTreeMap<String, KernelSource> = BTreeMap::new();
        sources.insert(convert.module.clone(), convert.clone());
        for r in &runners {
            if let Runner::Gpu(l) = r {
                for s in l.sources() {
                    sources.entry(s.module.clone()).or_insert(s);
                }
            }
        }
        let images = match images {
            Some(im) => {
                let mut out = ModuleImages::new();
                for name in sources.keys() {
                    let img = im.get(name).ok_or_else(|| {
                        KilnError::InvalidPlan(format!(
                            "GPU module {name} is missing from the plan (built by another kiln version?); rebuild the plan"
                        ))
                    })?;
                    out.insert(name.clone(), img.clone());
                }
                out
            }
            None => {
                let list: Vec<KernelSource> = sources.values().cloned().collect();
                let t = Instant::now();
                let im = compile_all(&list, &info.arch())?;
                tracing::info!(
                    modules = list.len(),
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "compiled GPU modules with NVRTC"
                );
                im
            }
        };
        let mut modules = ModuleSet::default();
        for (name, img) in &images {
            let m = ctx
                .load_module(Ptx::from_binary(img.clone()))
                .map_err(|e| KilnError::Other(format!("CUDA: cannot load module {name}: {e}")))?;
            modules.insert(name.clone(), m);
        }
        // Device-dependent choices (cuDNN algorithms and workspaces), on this device.
        let mut runners = runners;
        let uses_dnn = runners
            .iter()
            .any(|r| matches!(r, Runner::Gpu(l) if l.uses_dnn()));
        {
            // Every layer is prepared (cuDNN algorithms, cuBLASLt descriptors and algorithms).
            let h = if uses_dnn {
                Some(crate::dnn::DnnHandle::new(&ctx.default_stream())?)
            } else {
                None
            };
            let pcx = crate::layer::PrepareCx {
                dnn: h.as_ref(),
                tf32: opts.tf32,
            };
            for (node, r) in graph.nodes.iter().zip(runners.iter_mut()) {
                if let Runner::Gpu(l) = r {
                    if let Err(e) = l.prepare(&pcx) {
                        tracing::warn!(node = %node.name, error = %e, "GPU layer cannot be prepared; it runs on the CPU");
                        *r = Runner::Cpu(format!("prepare failed: {e}"));
                    }
                }
            }
        }
        let uses_dnn = runners
            .iter()
            .any(|r| matches!(r, Runner::Gpu(l) if l.uses_dnn()));
        let n_steps = graph.nodes.len();
        let mut slots: Vec<Option<Slot>> = vec![None; graph.values.len()];
        // Inputs of GPU layers read in another precision than stored: `extra` slots (weights
        // uploaded once per precision; activations converted at the first reading step).
        let mut extra: Vec<Slot> = Vec::new();
        let mut inmap: Vec<Vec<Option<usize>>> = vec![Vec::new(); n_steps];
        let mut convs: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n_steps];
        let mut extra_of: HashMap<(usize, DType), usize> = HashMap::new();
        let mut extra_life: Vec<(usize, usize)> = Vec::new();
        let mut wbytes: Vec<u8> = Vec::new();
        for (i, (node, r)) in graph.nodes.iter().zip(&runners).enumerate() {
            if !matches!(r, Runner::Gpu(_)) {
                inmap[i] = vec![None; node.inputs.len()];
                continue;
            }
            for (j, inp) in node.inputs.iter().enumerate() {
                let Some(v) = *inp else {
                    inmap[i].push(None);
                    continue;
                };
                let (Some(df), Some(want)) = (&dfacts[v], prec.read(node, i, j, v)) else {
                    inmap[i].push(None);
                    continue;
                };
                let shape = df.concrete_shape().expect("device facts are concrete");
                let host_dtype = facts[v].dtype.expect("device facts have a dtype");
                if let Some(t) = graph.constants.get(&v) {
                    let k = *extra_of.entry((v, want)).or_insert_with(|| {
                        extra.push(Slot {
                            place: Place::Weight(usize::MAX),
                            host_dtype,
                            dev_dtype: want,
                            shape: shape.clone(),
                        });
                        extra_life.push((usize::MAX, 0));
                        extra.len() - 1
                    });
                    if extra[k].place == Place::Weight(usize::MAX) {
                        let dev = if want != t.dtype() {
                            to_f16_saturating(t)?
                        } else {
                            t.clone()
                        };
                        let off = wbytes.len();
                        wbytes.extend_from_slice(dev.bytes());
                        wbytes.resize(wbytes.len().div_ceil(256) * 256, 0);
                        extra[k].place = Place::Weight(off);
                    }
                    inmap[i].push(Some(k));
                } else if prec.stored(v) != Some(want) {
                    let k = match extra_of.get(&(v, want)) {
                        Some(&k) => k,
                        None => {
                            extra.push(Slot {
                                place: Place::Arena(0),
                                host_dtype,
                                dev_dtype: want,
                                shape,
                            });
                            extra_life.push((i, i));
                            convs[i].push((v, extra.len() - 1));
                            extra_of.insert((v, want), extra.len() - 1);
                            extra.len() - 1
                        }
                    };
                    extra_life[k].1 = i;
                    inmap[i].push(Some(k));
                } else {
                    inmap[i].push(None);
                }
            }
        }
        // Activations: every other device value, with lifetimes in steps.
        let mut first = vec![usize::MAX; graph.values.len()];
        let mut last = vec![0usize; graph.values.len()];
        for &i in &graph.inputs {
            first[i] = 0;
        }
        for (s, node) in graph.nodes.iter().enumerate() {
            for v in node.inputs.iter().flatten() {
                last[*v] = last[*v].max(s);
            }
            for o in node.outputs.iter().flatten() {
                first[*o] = first[*o].min(s);
                last[*o] = last[*o].max(s);
            }
        }
        for &o in &graph.outputs {
            last[o] = n_steps;
        }
        let mut requests = Vec::new();
        let mut req_ids = Vec::new();
        for id in 0..graph.values.len() {
            if graph.constants.contains_key(&id) || first[id] == usize::MAX {
                continue;
            }
            let Some(df) = &dfacts[id] else { continue };
            let shape = df.concrete_shape().expect("device facts are concrete");
            let slot = Slot {
                place: Place::Arena(0),
                host_dtype: facts[id].dtype.expect("device facts have a dtype"),
                dev_dtype: prec.stored(id).expect("device facts have a dtype"),
                shape,
            };
            requests.push(Request {
                size: slot.dev_bytes().div_ceil(256) * 256,
                first: first[id],
                last: last[id].max(first[id]),
            });
            req_ids.push(Ok(id));
            slots[id] = Some(slot);
        }
        for (k, s) in extra.iter().enumerate() {
            if matches!(s.place, Place::Arena(_)) {
                requests.push(Request {
                    size: s.dev_bytes().div_ceil(256) * 256,
                    first: extra_life[k].0,
                    last: extra_life[k].1,
                });
                req_ids.push(Err(k));
            }
        }
        let plan = planner::plan(&requests);
        for (id, off) in req_ids.iter().zip(&plan.offsets) {
            match id {
                Ok(id) => {
                    if let Some(s) = &mut slots[*id] {
                        s.place = Place::Arena(*off);
                    }
                }
                Err(k) => extra[*k].place = Place::Arena(*off),
            }
        }
        // Workspace and staging.
        let mut workspace_bytes = 0;
        for (i, (node, r)) in graph.nodes.iter().zip(&runners).enumerate() {
            if let Runner::Gpu(l) = r {
                let ins: Vec<DevTensor> = node
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(j, inp)| {
                        match inmap[i][j]
                            .map(|k| &extra[k])
                            .or_else(|| inp.and_then(|v| slots[v].as_ref()))
                        {
                            Some(s) => DevTensor {
                                ptr: 0,
                                dtype: s.dev_dtype,
                                shape: s.shape.iter().copied().collect(),
                            },
                            None => DevTensor {
                                ptr: 0,
                                dtype: DType::F32,
                                shape: Default::default(),
                            },
                        }
                    })
                    .collect();
                workspace_bytes = workspace_bytes.max(l.workspace_bytes(&ins));
            }
        }
        let mut staging_bytes = 0;
        for &v in graph.inputs.iter().chain(&graph.outputs) {
            if let Some(s) = &slots[v] {
                if s.dev_dtype != s.host_dtype {
                    staging_bytes = staging_bytes.max(s.host_bytes());
                }
            }
        }
        let weights = DevBuf::new(&ctx, wbytes.len())?;
        let stream = ctx.default_stream();
        htod(&stream, weights.ptr(), &wbytes)?;
        sync(&stream)?;
        let engine = GpuEngine {
            ctx,
            info,
            opts,
            runners,
            uses_dnn,
            lo: prec.lo,
            slots,
            extra,
            inmap,
            convs,
            modules,
            images,
            convert,
            weights,
            arena_bytes: plan.arena_size,
            arena_lower_bound: plan.lower_bound,
            workspace_bytes,
            staging_bytes,
        };
        let fb = engine.fallbacks();
        if fb > 0 {
            let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
            for (node, r) in graph.nodes.iter().zip(&engine.runners) {
                if matches!(r, Runner::Cpu(_)) {
                    *ops.entry(node.desc.op_type.as_str()).or_default() += 1;
                }
            }
            tracing::warn!(fallbacks = fb, ops = ?ops, "GPU engine: layers without a GPU kernel run on the CPU with copies around them");
        }
        Ok(engine)
    }

    /// The GPU this engine runs on.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Precision switches.
    pub fn options(&self) -> GpuOptions {
        self.opts
    }

    /// Compiled modules (CUBIN), by name: stored in plans.
    pub fn images(&self) -> &ModuleImages {
        &self.images
    }

    /// Number of layers that run on the CPU.
    pub fn fallbacks(&self) -> usize {
        self.runners
            .iter()
            .filter(|r| matches!(r, Runner::Cpu(_)))
            .count()
    }

    /// Device bytes of the activation arena, and the liveness lower bound.
    pub fn arena_bytes(&self) -> (usize, usize) {
        (self.arena_bytes, self.arena_lower_bound)
    }

    /// Device bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        self.weights.len()
    }

    /// Per-node device and tactic.
    pub fn placements(&self) -> Vec<LayerPlacement> {
        placements_of(&self.runners, &self.lo)
    }
}

/// Timings of one run from CUDA events (milliseconds) and the host clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GpuTiming {
    /// Host-to-device copies of the inputs (and FP16 conversion).
    pub h2d_ms: f64,
    /// All layers (CPU fallbacks included).
    pub compute_ms: f64,
    /// Device-to-host copies of the outputs.
    pub d2h_ms: f64,
    /// Host time spent enqueuing the layers.
    pub enqueue_ms: f64,
    /// H2D + compute + D2H from events.
    pub latency_ms: f64,
}

/// Per-context device state: stream, cuBLAS handle, arena, workspace, pinned I/O buffers.
pub struct GpuContext {
    /// Dropped first: the handle is bound to `stream`.
    dnn: Option<crate::dnn::DnnHandle>,
    engine: Arc<GpuEngine>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    arena: DevBuf,
    work: DevBuf,
    staging: DevBuf,
    pinned_in: HashMap<usize, PinnedBuf>,
    pinned_out: HashMap<usize, PinnedBuf>,
    events: [CudaEvent; 4],
    last: Option<GpuTiming>,
    profile: Option<Profile>,
    /// `--cuda-graph`: the layers are captured once into a CUDA graph and replayed.
    graph_mode: bool,
    /// One uncaptured run happened since graph mode was set (libraries allocate lazily on
    /// their first call, which capture forbids).
    graph_warm: bool,
    graph: Option<CapturedGraph>,
    /// Outputs of an [`enqueue`](GpuContext::enqueue)d run, read by
    /// [`wait`](GpuContext::wait).
    pending: Option<(Vec<Pending>, f64)>,
}

/// A captured CUDA graph, owned by one context.
struct CapturedGraph(cudarc::driver::CudaGraph);

// SAFETY: CUDA graph objects must not be used from two threads at once; this one is owned by
// one GpuContext and only used through `&mut GpuContext` (one thread at a time).
unsafe impl Send for CapturedGraph {}

/// An output of an enqueued run.
enum Pending {
    Ready(Value),
    Pinned(usize, DType, Vec<usize>),
}

/// Per-layer CUDA-event timing (`kiln bench --profile`).
struct Profile {
    events: Vec<(CudaEvent, CudaEvent)>,
    total_ms: Vec<f64>,
    runs: usize,
}

fn cu(what: &str, e: impl std::fmt::Display) -> KilnError {
    KilnError::Other(format!("CUDA: {what}: {e}"))
}

impl GpuContext {
    /// Allocates a context's device memory and stream.
    pub fn new(engine: Arc<GpuEngine>) -> Result<GpuContext> {
        let ctx = engine.ctx.clone();
        ctx.bind_to_thread().map_err(|e| cu("bind context", e))?;
        let stream = ctx.new_stream().map_err(|e| cu("create stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cu("create cuBLAS handle", e))?;
        let ev = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cu("create event", e))
        };
        let events = [ev()?, ev()?, ev()?, ev()?];
        let dnn = if engine.uses_dnn {
            Some(crate::dnn::DnnHandle::new(&stream)?)
        } else {
            None
        };
        Ok(GpuContext {
            dnn,
            arena: DevBuf::new(&ctx, engine.arena_bytes)?,
            work: DevBuf::new(&ctx, engine.workspace_bytes)?,
            staging: DevBuf::new(&ctx, engine.staging_bytes)?,
            engine,
            stream,
            blas,
            pinned_in: HashMap::new(),
            pinned_out: HashMap::new(),
            events,
            last: None,
            profile: None,
            graph_mode: false,
            graph_warm: false,
            graph: None,
            pending: None,
        })
    }

    /// `--cuda-graph`: from the next run on, the layers are captured once into a CUDA graph
    /// and each run replays it (one launch instead of one per kernel). Needs every layer on
    /// the GPU (a CPU fallback synchronises mid-run); profiling runs are not captured.
    pub fn set_cuda_graph(&mut self, on: bool) -> Result<()> {
        if on && self.engine.fallbacks() > 0 {
            return Err(KilnError::Other(format!(
                "--cuda-graph needs every layer on the GPU; {} layer(s) of this engine run on the CPU",
                self.engine.fallbacks()
            )));
        }
        self.graph_mode = on;
        self.graph_warm = false;
        self.graph = None;
        Ok(())
    }

    /// True when runs replay a captured CUDA graph.
    pub fn cuda_graph(&self) -> bool {
        self.graph_mode
    }

    /// Times every layer with a pair of CUDA events from the next run on (adds a little
    /// overhead per layer); `false` stops and forgets the profile.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        if !on {
            self.profile = None;
            return Ok(());
        }
        let n = self.engine.runners.len();
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let ev = || {
                self.engine
                    .ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| cu("create event", e))
            };
            events.push((ev()?, ev()?));
        }
        self.profile = Some(Profile {
            events,
            total_ms: vec![0.0; n],
            runs: 0,
        });
        Ok(())
    }

    /// Mean milliseconds per layer (node index order) over the profiled runs.
    pub fn layer_times(&self) -> Option<Vec<f64>> {
        let p = self.profile.as_ref()?;
        let runs = p.runs.max(1) as f64;
        Some(p.total_ms.iter().map(|t| t / runs).collect())
    }

    /// Timings of the last run.
    pub fn last_timing(&self) -> Option<GpuTiming> {
        self.last
    }

    /// Device bytes this context allocated (arena + workspace + staging).
    pub fn device_bytes(&self) -> usize {
        self.arena.len() + self.work.len() + self.staging.len()
    }

    fn addr(&self, s: &Slot) -> u64 {
        match s.place {
            Place::Arena(o) => self.arena.ptr() + o as u64,
            Place::Weight(o) => self.engine.weights.ptr() + o as u64,
        }
    }

    fn convert(&self, f32_to_f16: bool, src: u64, dst: u64, n: usize) -> Result<()> {
        let name = if f32_to_f16 {
            "kiln_f32_to_f16"
        } else {
            "kiln_f16_to_f32"
        };
        let f = self
            .engine
            .modules
            .function(&self.engine.convert.module, name)?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&n64);
        let cfg = LaunchConfig {
            grid_dim: (grid_for(n), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: src and dst hold n elements of float / half (staging sized for the
        // largest converted input or output; arena slots sized by their shapes).
        unsafe { b.launch(cfg) }.map_err(|e| cu("conversion kernel", e))?;
        Ok(())
    }

    /// Copies a device value to a host tensor of its graph dtype (synchronizes).
    fn fetch(&self, s: &Slot) -> Result<Tensor> {
        let mut buf = vec![0u8; s.dev_bytes()];
        sync(&self.stream)?;
        dtoh(&self.stream, &mut buf, self.addr(s))?;
        sync(&self.stream)?;
        let t = Tensor::from_bytes(s.dev_dtype, &s.shape, &buf)?;
        if s.dev_dtype != s.host_dtype {
            t.cast(s.host_dtype)
        } else {
            Ok(t)
        }
    }

    /// Runs the engine on `inputs` (one per graph input, in order) for `graph` (the graph the
    /// engine was built from). Returns the graph outputs on the host.
    pub fn run(&mut self, graph: &Graph, inputs: &[&Value]) -> Result<Vec<Value>> {
        self.enqueue(graph, inputs)?;
        self.wait()
    }

    /// Starts a run on this context's stream and returns once its work is enqueued: inputs
    /// are copied to pinned buffers and sent, the layers (or the captured CUDA graph) and
    /// the output copies are queued. CPU-fallback layers still run (and synchronise) here.
    /// [`wait`](Self::wait) blocks until the run is done and returns its outputs; the host may
    /// do other work in between. One run per context at a time: a second `enqueue` before
    /// `wait` is an error.
    pub fn enqueue(&mut self, graph: &Graph, inputs: &[&Value]) -> Result<()> {
        if self.pending.is_some() {
            return Err(KilnError::Other(
                "enqueue: the previous run was not waited for".into(),
            ));
        }
        let engine = self.engine.clone();
        engine
            .ctx
            .bind_to_thread()
            .map_err(|e| cu("bind context", e))?;
        if inputs.len() != graph.inputs.len() {
            return Err(KilnError::Other(format!(
                "expected {} inputs, got {}",
                graph.inputs.len(),
                inputs.len()
            )));
        }
        let mut host: HashMap<usize, Value> = HashMap::new();
        self.events[0]
            .record(&self.stream)
            .map_err(|e| cu("record event", e))?;
        for (k, (&id, v)) in graph.inputs.iter().zip(inputs).enumerate() {
            host.insert(id, (*v).clone());
            let Some(s) = &engine.slots[id] else { continue };
            let t = v.as_tensor()?;
            if t.shape() != s.shape.as_slice() || t.dtype() != s.host_dtype {
                return Err(KilnError::BadInput {
                    name: graph.values[id].name.clone(),
                    msg: format!(
                        "this GPU engine was built for {}{:?}, got {}{:?}",
                        s.host_dtype,
                        s.shape,
                        t.dtype(),
                        t.shape()
                    ),
                });
            }
            let bytes = t.bytes();
            let addr = self.addr(s);
            let staging = self.staging.ptr();
            let pin = match self.pinned_in.entry(k) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(PinnedBuf::new(&engine.ctx, bytes.len())?)
                }
            };
            pin.as_mut_slice().copy_from_slice(bytes);
            if s.dev_dtype == s.host_dtype {
                htod(&self.stream, addr, pin.as_slice())?;
            } else {
                htod(&self.stream, staging, pin.as_slice())?;
                self.convert(true, staging, addr, t.len())?;
            }
        }
        self.events[1]
            .record(&self.stream)
            .map_err(|e| cu("record event", e))?;
        let t_enqueue = Instant::now();
        let mut cpu_time = 0.0;
        let replay = self.graph_mode && self.graph_warm && self.profile.is_none();
        self.graph_warm |= self.graph_mode;
        if replay && self.graph.is_none() {
            self.stream
                .begin_capture(
                    cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .map_err(|e| cu("begin graph capture", e))?;
        }
        let layers: &[Runner] = if replay && self.graph.is_some() {
            &[]
        } else {
            &engine.runners
        };
        for (i, (node, r)) in graph.nodes.iter().zip(layers).enumerate() {
            if let Some(p) = &self.profile {
                p.events[i]
                    .0
                    .record(&self.stream)
                    .map_err(|e| cu("record event", e))?;
            }
            match r {
                Runner::Gpu(layer) => {
                    for &(v, k) in &engine.convs[i] {
                        let (src, dst) = match &engine.slots[v] {
                            Some(s) => (s, &engine.extra[k]),
                            None => {
                                return Err(cu(
                                    "precision conversion",
                                    format!("{} has no device slot", graph.values[v].name),
                                ))
                            }
                        };
                        let n = src.shape.iter().product();
                        self.convert(
                            src.dev_dtype == DType::F32,
                            self.addr(src),
                            self.addr(dst),
                            n,
                        )?;
                    }
                    let slot_of = |j: Option<usize>, v: &Option<usize>| {
                        j.map(|k| &engine.extra[k])
                            .or_else(|| v.and_then(|v| engine.slots[v].as_ref()))
                    };
                    let dev = |s: Option<&Slot>| -> DevTensor {
                        match s {
                            Some(s) => DevTensor {
                                ptr: self.addr(s),
                                dtype: s.dev_dtype,
                                shape: s.shape.iter().copied().collect(),
                            },
                            None => DevTensor {
                                ptr: 0,
                                dtype: DType::F32,
                                shape: Default::default(),
                            },
                        }
                    };
                    let ins: Vec<DevTensor> = node
                        .inputs
                        .iter()
                        .enumerate()
                        .map(|(j, v)| dev(slot_of(engine.inmap[i][j], v)))
                        .collect();
                    let outs: Vec<DevTensor> =
                        node.outputs.iter().map(|v| dev(slot_of(None, v))).collect();
                    let cx = LaunchCx {
                        stream: &self.stream,
                        modules: &engine.modules,
                        workspace: self.work.ptr(),
                        workspace_bytes: self.work.len(),
                        blas: Some(&self.blas),
                        tf32: engine.opts.tf32,
                        dnn: self.dnn.as_ref(),
                    };
                    layer
                        .enqueue(&cx, &ins, &outs)
                        .map_err(|e| e.at_node(&node.name))?;
                }
                Runner::Cpu(_) => {
                    let t0 = Instant::now();
                    let mut args: Vec<Option<Value>> = Vec::with_capacity(node.inputs.len());
                    for inp in &node.inputs {
                        let Some(v) = inp else {
                            args.push(None);
                            continue;
                        };
                        if let Some(c) = graph.constants.get(v) {
                            args.push(Some(Value::Tensor(c.clone())));
                        } else if let Some(h) = host.get(v) {
                            args.push(Some(h.clone()));
                        } else if let Some(s) = &engine.slots[*v] {
                            let t = Value::Tensor(self.fetch(s)?);
                            host.insert(*v, t.clone());
                            args.push(Some(t));
                        } else {
                            return Err(KilnError::Kernel {
                                node: node.name.clone(),
                                op: node.desc.op_type.clone(),
                                msg: format!("input {} has no value", graph.values[*v].name),
                            });
                        }
                    }
                    let refs: Vec<Option<&Value>> = args.iter().map(|a| a.as_ref()).collect();
                    let outs = node.op.eval(&refs).map_err(|e| e.at_node(&node.name))?;
                    for (o, v) in node.outputs.iter().zip(outs) {
                        let Some(o) = o else { continue };
                        if let Some(s) = &engine.slots[*o] {
                            let t = v.as_tensor()?;
                            if t.shape() != s.shape.as_slice() || t.dtype() != s.host_dtype {
                                return Err(KilnError::Kernel {
                                    node: node.name.clone(),
                                    op: node.desc.op_type.clone(),
                                    msg: format!(
                                        "CPU fallback produced {}{:?} for {}, the GPU plan expected {}{:?}",
                                        t.dtype(),
                                        t.shape(),
                                        graph.values[*o].name,
                                        s.host_dtype,
                                        s.shape
                                    ),
                                });
                            }
                            let dev = if s.dev_dtype != s.host_dtype {
                                to_f16_saturating(t)?
                            } else {
                                t.clone()
                            };
                            htod(&self.stream, self.addr(s), dev.bytes())?;
                            sync(&self.stream)?;
                        }
                        host.insert(*o, v);
                    }
                    cpu_time += t0.elapsed().as_secs_f64();
                    tracing::trace!(node = %node.name, step = i, "CPU fallback");
                }
            }
            if let Some(p) = &self.profile {
                p.events[i]
                    .1
                    .record(&self.stream)
                    .map_err(|e| cu("record event", e))?;
            }
        }
        if replay {
            if self.graph.is_none() {
                let g = self
                    .stream
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .map_err(|e| cu("end graph capture", e))?
                    .ok_or_else(|| cu("graph capture", "captured nothing"))?;
                self.graph = Some(CapturedGraph(g));
            }
            self.graph
                .as_ref()
                .expect("captured above")
                .0
                .launch()
                .map_err(|e| cu("launch CUDA graph", e))?;
        }
        let enqueue_ms = (t_enqueue.elapsed().as_secs_f64() - cpu_time) * 1e3;
        self.events[2]
            .record(&self.stream)
            .map_err(|e| cu("record event", e))?;
        // Outputs.
        let mut pending = Vec::with_capacity(graph.outputs.len());
        for (k, &o) in graph.outputs.iter().enumerate() {
            if let Some(c) = graph.constants.get(&o) {
                pending.push(Pending::Ready(Value::Tensor(c.clone())));
                continue;
            }
            if let Some(h) = host.get(&o) {
                pending.push(Pending::Ready(h.clone()));
                continue;
            }
            let s = engine.slots[o].as_ref().ok_or_else(|| {
                KilnError::Other(format!("output {} was not computed", graph.values[o].name))
            })?;
            let bytes = s.host_bytes();
            let mut src = self.addr(s);
            if s.dev_dtype != s.host_dtype {
                let n = s.shape.iter().product();
                self.convert(false, src, self.staging.ptr(), n)?;
                src = self.staging.ptr();
            }
            let pin = match self.pinned_out.entry(k) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(PinnedBuf::new(&engine.ctx, bytes)?)
                }
            };
            dtoh(&self.stream, pin.as_mut_slice(), src)?;
            pending.push(Pending::Pinned(k, s.host_dtype, s.shape.clone()));
        }
        self.events[3]
            .record(&self.stream)
            .map_err(|e| cu("record event", e))?;
        self.pending = Some((pending, enqueue_ms));
        Ok(())
    }

    /// Waits for the run [`enqueue`](Self::enqueue) started and returns its outputs (graph
    /// output order); records its timing ([`last_timing`](Self::last_timing)).
    pub fn wait(&mut self) -> Result<Vec<Value>> {
        let (pending, enqueue_ms) = self
            .pending
            .take()
            .ok_or_else(|| KilnError::Other("wait: no run was enqueued".into()))?;
        sync(&self.stream)?;
        let el = |a: usize, b: usize| -> Result<f64> {
            Ok(self.events[a]
                .elapsed_ms(&self.events[b])
                .map_err(|e| cu("event timing", e))? as f64)
        };
        self.last = Some(GpuTiming {
            h2d_ms: el(0, 1)?,
            compute_ms: el(1, 2)?,
            d2h_ms: el(2, 3)?,
            enqueue_ms,
            latency_ms: el(0, 3)?,
        });
        if let Some(p) = &mut self.profile {
            for (i, (a, b)) in p.events.iter().enumerate() {
                p.total_ms[i] += a.elapsed_ms(b).map_err(|e| cu("event timing", e))? as f64;
            }
            p.runs += 1;
        }
        pending
            .into_iter()
            .map(|p| match p {
                Pending::Ready(v) => Ok(v),
                Pending::Pinned(k, dt, shape) => {
                    let pin = &self.pinned_out[&k];
                    Ok(Value::Tensor(Tensor::from_bytes(
                        dt,
                        &shape,
                        pin.as_slice(),
                    )?))
                }
            })
            .collect()
    }
}

impl Drop for GpuContext {
    fn drop(&mut self) {
        // Nothing may still use the arena when it is freed.
        let _ = self.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_device_facts_keep_parameters_exact() {
        let mut g = Graph::default();
        let t = Tensor::from_vec(&[2], vec![1.0f32, 1.0 / 3.0]).unwrap();
        let s = g.add_value("scales", Fact::concrete(DType::F32, &[2]));
        g.constants.insert(s, t.clone());
        let x = g.add_value("x", Fact::concrete(DType::F32, &[1, 3]));
        let q = g.add_value("seq", Fact::unknown());
        let facts = vec![
            Fact::constant(t),
            Fact::concrete(DType::F32, &[1, 3]),
            Fact::unknown(),
        ];
        let o = GpuOptions {
            fp16: true,
            tf32: false,
        };
        let d = device_facts(&g, &facts, o).unwrap();
        let ds = d[s].as_ref().unwrap();
        assert_eq!(ds.dtype, Some(DType::F16));
        assert_eq!(
            ds.konst.as_ref().unwrap().to_f32_vec().unwrap()[1],
            1.0 / 3.0
        );
        assert_eq!(d[x].as_ref().unwrap().dtype, Some(DType::F16));
        assert!(d[q].is_none(), "unknown values stay on the host");
    }

    #[test]
    fn fp16_saturates_and_maps_dtypes() {
        let t = Tensor::from_vec(&[3], vec![-3.4e38f32, 1.5, 1e6]).unwrap();
        let h = to_f16_saturating(&t).unwrap();
        let v = h.to_f32_vec().unwrap();
        assert_eq!(v, vec![-65504.0, 1.5, 65504.0]);
        let o = GpuOptions {
            fp16: true,
            tf32: false,
        };
        assert_eq!(device_dtype(DType::F32, o), DType::F16);
        assert_eq!(device_dtype(DType::I64, o), DType::I64);
        assert_eq!(device_dtype(DType::F32, GpuOptions::default()), DType::F32);
        assert!(device_type(DType::Bool) && !device_type(DType::String));
    }
}
