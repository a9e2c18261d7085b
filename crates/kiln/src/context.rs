//! Execution contexts: one per thread (or stream), each with its own activation arena.
//!
//! A context is `Send` but not `Sync`: it may move between threads but never be used from
//! two at once, which the type system enforces (TensorRT's rule for `IExecutionContext`,
//! checked at compile time here).

use std::cell::Cell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use kiln_core::{Arena, Bytes, DType, Dim, KilnError, Result, Tensor, TensorMut, Value, ValueKind};
use smallvec::SmallVec;

use crate::engine::Engine;
use crate::memory::{plan_for_inputs, Placement, ShapePlan};

type ShapeKey = crate::memory::InputSignature;

/// Runs an [`Engine`]. Create one per thread with [`Engine::create_context`].
pub struct ExecutionContext {
    engine: Engine,
    plans: HashMap<ShapeKey, Arc<ShapePlan>>,
    arena: Arc<Arena>,
    slots: Vec<Option<Value>>,
    pool: Option<rayon::ThreadPool>,
    /// Set by `set_threads(1)`: layers run on the caller's thread with intra-op parallelism
    /// off (no pool to hand the work to and wait for).
    serial: bool,
    /// With a pool: per shape plan, whether it runs faster in the pool or on the caller's
    /// thread alone (timed over its first runs).
    modes: Vec<(usize, ModeProbe)>,
    key: ShapeKey,
    gpu: Option<kiln_cuda::GpuContext>,
    /// Outputs of an [`ExecutionContext::enqueue`]d CPU run (empty for a GPU run, whose
    /// outputs the device side holds).
    pending: Option<Vec<Value>>,
    profile: usize,
    input_shapes: Vec<Option<Vec<usize>>>,
    current: Option<Arc<ShapePlan>>,
    /// CPU per-layer timing, when on ([`ExecutionContext::set_cpu_profiling`]).
    cpu_profile: Option<CpuLayerProfile>,
    _not_sync: PhantomData<Cell<()>>,
}

/// Wall-clock time per layer summed over the profiled CPU runs.
#[derive(Debug, Default, Clone)]
struct CpuLayerProfile {
    /// (layer name, op type) per node of the graph that ran.
    layers: Vec<(String, String)>,
    /// Summed seconds per node.
    seconds: Vec<f64>,
    /// Profiled runs.
    runs: usize,
}

/// One CPU layer's mean time over the profiled runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuLayerTime {
    /// Layer (node) name.
    pub name: String,
    /// Op type.
    pub op: String,
    /// Mean milliseconds per run.
    pub mean_ms: f64,
}

impl ExecutionContext {
    pub(crate) fn new(engine: Engine) -> Self {
        let graph = engine.graph();
        let mut slots = vec![None; graph.values.len()];
        for (id, t) in &graph.constants {
            slots[*id] = Some(Value::Tensor(t.clone()));
        }
        let mut plans = HashMap::new();
        let mut arena_size = 0;
        if let Some((key, plan)) = engine.static_plan() {
            arena_size = plan.arena_size;
            plans.insert(key.clone(), plan.clone());
        }
        let input_shapes = engine
            .inputs()
            .iter()
            .map(|i| {
                i.shape
                    .as_ref()
                    .and_then(|d| d.iter().map(|d| d.known()).collect())
            })
            .collect();
        ExecutionContext {
            engine,
            plans,
            arena: Arc::new(Arena::new(arena_size)),
            slots,
            pool: None,
            serial: false,
            modes: Vec::new(),
            key: Vec::new(),
            gpu: None,
            pending: None,
            profile: 0,
            input_shapes,
            current: None,
            cpu_profile: None,
            _not_sync: PhantomData,
        }
    }

    /// The engine this context runs.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs intra-op parallel kernels on a private pool of `threads` threads (default: the
    /// global rayon pool, one thread per core). With one thread (or 0) every layer runs on
    /// the thread that calls [`ExecutionContext::execute`], with no pool at all.
    ///
    /// With several, the pool's threads poll for work while an inference runs (no wake-up
    /// latency between layers), and the first [`MODE_PROBE_RUNS`] runs of every input shape
    /// alternate between the pool and the calling thread alone: a model too small to gain
    /// from a second thread then keeps running serially (handing an inference to a pool
    /// and waiting for it costs tens of µs). The mode not chosen is tried again at runs
    /// 26, 52, 104, … (up to run 3,328) and taken over when it beats the chosen mode's best
    /// run by 10 %: the pool's first runs can be slow (its threads' scratch still growing)
    /// and a noisy probe must not fix a context at half speed.
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.modes.clear();
        if threads <= 1 {
            self.pool = None;
            self.serial = true;
            return Ok(());
        }
        self.serial = false;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| {
                KilnError::Other(format!("cannot create a pool of {threads} threads: {e}"))
            })?;
        self.pool = Some(pool);
        Ok(())
    }

    /// Selects the optimization profile that input shapes are checked against (default 0).
    /// Shapes set earlier are checked against the new profile; one outside it is forgotten.
    pub fn set_optimization_profile(&mut self, index: usize) -> Result<()> {
        let n = self.engine.profiles().len();
        if index >= n.max(1) {
            return Err(KilnError::Other(format!(
                "optimization profile {index} does not exist: the engine has {n} (0..{})",
                n.max(1) - 1
            )));
        }
        self.profile = index;
        if let Some(p) = self.engine.profiles().get(index) {
            for (info, shape) in self.engine.inputs().iter().zip(&mut self.input_shapes) {
                if shape
                    .as_ref()
                    .is_some_and(|s| p.check(index, &info.name, s).is_err())
                {
                    *shape = None;
                }
            }
        }
        Ok(())
    }

    /// The active optimization profile.
    pub fn optimization_profile(&self) -> usize {
        self.profile
    }

    /// Sets the shape of input `name` for the next inference (TensorRT's
    /// `setInputShape`). Refuses a rank or a fixed dimension the model does not allow, and a
    /// shape outside the active optimization profile ([`KilnError::ShapeOutsideProfile`],
    /// which gives the profile's range). Plans memory for the new shapes once every input's
    /// shape is known.
    pub fn set_input_shape(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let index = self.input_index(name)?;
        self.check_shape(index, shape)?;
        self.input_shapes[index] = Some(shape.to_vec());
        Ok(())
    }

    /// The shape of input `name`: the one set by [`Self::set_input_shape`] or by the last
    /// inference, or the model's own when it is fully fixed; `None` when not known yet.
    pub fn input_shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let index = self.input_index(name)?;
        Ok(self.input_shapes[index].clone())
    }

    /// The shapes of the outputs (in the engine's order) for the current input shapes,
    /// inferred without running; `None` for an output whose shape depends on input values.
    /// Errors when an input's shape is not known yet.
    pub fn output_shapes(&mut self) -> Result<Vec<Option<Vec<usize>>>> {
        let infos = self.engine.inputs().to_vec();
        let mut key = Vec::with_capacity(infos.len());
        for (info, shape) in infos.iter().zip(&self.input_shapes) {
            if info.kind != ValueKind::Tensor {
                key.push(None);
                continue;
            }
            let (Some(dtype), Some(shape)) = (info.dtype, shape) else {
                return Err(KilnError::BadInput {
                    name: info.name.clone(),
                    msg: format!(
                        "its shape is not known yet ({}): set it with set_input_shape first",
                        info.describe()
                    ),
                });
            };
            key.push(Some((dtype, shape.clone())));
        }
        let plan = self.plan_for_key(key)?;
        Ok(self
            .engine
            .graph()
            .outputs
            .iter()
            .map(|&o| {
                plan.facts[o]
                    .concrete_shape()
                    .map(|s| s.into_iter().collect())
            })
            .collect())
    }

    fn input_index(&self, name: &str) -> Result<usize> {
        let infos = self.engine.inputs();
        infos.iter().position(|i| i.name == name).ok_or_else(|| {
            let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
            KilnError::BadInput {
                name: name.to_string(),
                msg: format!(
                    "the model has no such input (its inputs are: {})",
                    names.join(", ")
                ),
            }
        })
    }

    fn check_shape(&self, index: usize, shape: &[usize]) -> Result<()> {
        let info = &self.engine.inputs()[index];
        info.check_shape(shape)?;
        if let Some(p) = self.engine.profiles().get(self.profile) {
            p.check(self.profile, &info.name, shape)?;
        }
        Ok(())
    }

    /// Bytes of the activation arena currently allocated (host arena; for GPU engines, the
    /// device memory this context allocated once it has run).
    pub fn arena_bytes(&self) -> usize {
        match &self.gpu {
            Some(g) => g.device_bytes(),
            None => self.arena.len(),
        }
    }

    /// For GPU engines: times each layer with CUDA events from the next run on (errors on
    /// CPU engines).
    pub fn set_gpu_profiling(&mut self, on: bool) -> Result<()> {
        let Some(gpu) = self.engine.gpu().cloned() else {
            return Err(KilnError::Other(
                "per-layer GPU profiling needs a GPU engine (built with --device cuda)".into(),
            ));
        };
        if self.gpu.is_none() {
            self.gpu = Some(kiln_cuda::GpuContext::new(gpu)?);
        }
        self.gpu.as_mut().expect("created above").set_profiling(on)
    }

    /// For GPU engines: capture the layers into a CUDA graph once (after one uncaptured
    /// run) and replay it on every later run (`--cuda-graph`). Errors on CPU engines and
    /// on GPU engines with CPU-fallback layers.
    pub fn set_cuda_graph(&mut self, on: bool) -> Result<()> {
        let Some(gpu) = self.engine.gpu().cloned() else {
            return Err(KilnError::Other(
                "--cuda-graph needs a GPU engine (built with --device cuda)".into(),
            ));
        };
        if self.gpu.is_none() {
            self.gpu = Some(kiln_cuda::GpuContext::new(gpu)?);
        }
        self.gpu.as_mut().expect("created above").set_cuda_graph(on)
    }

    /// Starts inference without waiting for it: on a GPU engine the work is queued on this
    /// context's CUDA stream and the call returns; [`ExecutionContext::wait`] blocks until it
    /// is done and returns the outputs (the documented way to wait). On a CPU engine the run
    /// happens here and `wait` returns its outputs. One run in flight per context.
    pub fn enqueue(&mut self, inputs: &[(&str, Value)]) -> Result<()> {
        if self.pending.is_some() {
            return Err(KilnError::Other(
                "enqueue: the previous run was not waited for".into(),
            ));
        }
        if self.engine.gpu().is_none() {
            let outputs = self.execute(inputs)?;
            self.pending = Some(outputs);
            return Ok(());
        }
        let ordered = self.bind_gpu_inputs(inputs)?;
        let engine = self.engine.clone();
        let refs: Vec<&Value> = ordered.iter().collect();
        self.gpu
            .as_mut()
            .expect("created by bind_gpu_inputs")
            .enqueue(engine.graph(), &refs)?;
        self.pending = Some(Vec::new());
        Ok(())
    }

    /// Waits for the run started by [`ExecutionContext::enqueue`] and returns its outputs in
    /// the engine's output order.
    pub fn wait(&mut self) -> Result<Vec<Value>> {
        let done = self
            .pending
            .take()
            .ok_or_else(|| KilnError::Other("wait: no run was enqueued".into()))?;
        match self.gpu.as_mut() {
            Some(g) if self.engine.gpu().is_some() => g.wait(),
            _ => Ok(done),
        }
    }

    /// For CPU engines: time every layer of the following runs with a monotonic clock
    /// (`kiln bench --profile`); turning it off forgets the times. Errors on GPU engines
    /// (see [`ExecutionContext::set_gpu_profiling`]).
    pub fn set_cpu_profiling(&mut self, on: bool) -> Result<()> {
        if self.engine.gpu().is_some() {
            return Err(KilnError::Other(
                "CPU layer profiling on a GPU engine: use set_gpu_profiling".into(),
            ));
        }
        self.cpu_profile = on.then(CpuLayerProfile::default);
        Ok(())
    }

    /// For CPU engines with profiling on: mean time per layer over the profiled runs, in
    /// execution order (the layers of the graph that ran: a dynamic plan may have inlined
    /// `If` branches). None when profiling is off or nothing ran yet.
    pub fn cpu_layer_times(&self) -> Option<Vec<CpuLayerTime>> {
        let p = self.cpu_profile.as_ref().filter(|p| p.runs > 0)?;
        Some(
            p.layers
                .iter()
                .zip(&p.seconds)
                .map(|((name, op), s)| CpuLayerTime {
                    name: name.clone(),
                    op: op.clone(),
                    mean_ms: s * 1e3 / p.runs as f64,
                })
                .collect(),
        )
    }

    /// For GPU engines with profiling on: mean milliseconds per layer, in node order.
    pub fn gpu_layer_times(&self) -> Option<Vec<f64>> {
        self.gpu.as_ref().and_then(|g| g.layer_times())
    }

    /// For GPU engines: CUDA-event timings of the last run (H2D, compute, D2H, enqueue).
    pub fn gpu_timing(&self) -> Option<kiln_cuda::GpuTiming> {
        self.gpu.as_ref().and_then(|g| g.last_timing())
    }

    /// Runs inference. `inputs` names every engine input once; returns the outputs in the
    /// engine's output order (copied to fresh heap buffers: use
    /// [`ExecutionContext::execute_into`] for a call that allocates nothing).
    pub fn execute(&mut self, inputs: &[(&str, Value)]) -> Result<Vec<Value>> {
        if self.engine.gpu().is_some() {
            return self.execute_gpu(inputs);
        }
        let result = self.run(inputs).and_then(|_| self.collect_outputs());
        self.clear_activations();
        result
    }

    /// Runs inference and writes each output into the caller's buffer, in the engine's
    /// output order; each buffer's dtype and shape must match the output's.
    ///
    /// Once warm (the first call for these input shapes plans memory, and kernels size their
    /// scratch buffers), a call performs no heap allocation when every layer has a planned
    /// in-place kernel — true for static-shape graphs made of kiln's in-place ops; layers
    /// whose output shapes are known only at run time still allocate.
    pub fn execute_into(
        &mut self,
        inputs: &[(&str, Value)],
        outputs: &mut [TensorMut<'_>],
    ) -> Result<()> {
        if self.engine.gpu().is_some() {
            let produced = self.execute_gpu(inputs)?;
            if produced.len() != outputs.len() {
                return Err(KilnError::Other(format!(
                    "execute_into got {} output buffers, the engine has {} outputs",
                    outputs.len(),
                    produced.len()
                )));
            }
            for (slot, v) in outputs.iter_mut().zip(&produced) {
                slot.copy_from(v.as_tensor()?)?;
            }
            return Ok(());
        }
        let result = self.run(inputs).and_then(|_| self.copy_outputs(outputs));
        self.clear_activations();
        result
    }

    /// Convenience: tensors in, tensors out (errors if an output is not a tensor).
    pub fn execute_tensors(&mut self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        let values: Vec<(&str, Value)> = inputs
            .iter()
            .map(|(n, t)| (*n, Value::Tensor(t.clone())))
            .collect();
        self.execute(&values)?
            .into_iter()
            .map(|v| v.into_tensor())
            .collect()
    }

    /// Binds the inputs, plans memory for their shapes (once per shape) and runs every layer.
    fn run(&mut self, inputs: &[(&str, Value)]) -> Result<()> {
        self.bind_inputs(inputs)?;
        let plan = self.plan_for_bound()?;
        if self.arena.len() < plan.arena_size {
            self.arena = Arc::new(Arena::new(plan.arena_size));
        }
        match self.pool.take() {
            Some(pool) => {
                let key = Arc::as_ptr(&plan) as usize;
                let at = match self.modes.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        self.modes.push((key, ModeProbe::default()));
                        self.modes.len() - 1
                    }
                };
                let use_pool = self.modes[at].1.next_in_pool();
                let start = std::time::Instant::now();
                let r = if use_pool {
                    kiln_cpu::parallel::install_spinning(&pool, || self.run_nodes(&plan))
                } else {
                    kiln_cpu::parallel::serial(|| self.run_nodes(&plan))
                };
                self.modes[at]
                    .1
                    .record(use_pool, start.elapsed().as_secs_f64());
                self.pool = Some(pool);
                r
            }
            None if self.serial => kiln_cpu::parallel::serial(|| self.run_nodes(&plan)),
            None => self.run_nodes(&plan),
        }
    }

    /// Checks `inputs` against the engine's and puts them in their slots.
    fn bind_inputs(&mut self, inputs: &[(&str, Value)]) -> Result<()> {
        let engine = self.engine.clone();
        let infos = engine.inputs();
        for (name, _) in inputs {
            if !infos.iter().any(|i| i.name == *name) {
                let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
                return Err(KilnError::BadInput {
                    name: name.to_string(),
                    msg: format!(
                        "the model has no such input (its inputs are: {})",
                        names.join(", ")
                    ),
                });
            }
        }
        for (index, (info, id)) in infos.iter().zip(&engine.graph().inputs).enumerate() {
            let mut given = inputs.iter().filter(|(n, _)| *n == info.name);
            let Some((_, v)) = given.next() else {
                return Err(KilnError::BadInput {
                    name: info.name.clone(),
                    msg: format!("missing: the model needs this input ({})", info.describe()),
                });
            };
            if given.next().is_some() {
                return Err(KilnError::BadInput {
                    name: info.name.clone(),
                    msg: "given more than once".into(),
                });
            }
            if info.kind == ValueKind::Tensor {
                let t = v.as_tensor().map_err(|e| KilnError::BadInput {
                    name: info.name.clone(),
                    msg: e.to_string(),
                })?;
                info.check(t)?;
                self.check_shape(index, t.shape())?;
                if self.input_shapes[index].as_deref() != Some(t.shape()) {
                    self.input_shapes[index] = Some(t.shape().to_vec());
                }
            }
            self.slots[*id] = Some(v.clone());
        }
        Ok(())
    }

    /// The memory plan for the bound inputs' shapes: the last one used when they match it
    /// (no allocation), else a cached or new one.
    fn plan_for_bound(&mut self) -> Result<Arc<ShapePlan>> {
        let graph_inputs = &self.engine.graph().inputs;
        let same = self.current.is_some()
            && self.key.len() == graph_inputs.len()
            && graph_inputs
                .iter()
                .zip(&self.key)
                .all(|(id, k)| match (&self.slots[*id], k) {
                    (Some(Value::Tensor(t)), Some((d, s))) => t.dtype() == *d && t.shape() == s,
                    (Some(Value::Tensor(_)), None) | (_, Some(_)) => false,
                    _ => true,
                });
        if same {
            if let Some(p) = &self.current {
                return Ok(p.clone());
            }
        }
        self.key.clear();
        for id in graph_inputs {
            match &self.slots[*id] {
                Some(Value::Tensor(t)) => self.key.push(Some((t.dtype(), t.shape().to_vec()))),
                _ => self.key.push(None),
            }
        }
        let plan = self.plan_for_key(self.key.clone())?;
        if let Some(g) = &plan.graph {
            // A specialised graph: its extra values get slots, its constants (inlined
            // branches bring theirs) are bound once per switch to this plan.
            if self.slots.len() < g.values.len() {
                self.slots.resize(g.values.len(), None);
            }
            for (id, t) in &g.constants {
                self.slots[*id] = Some(Value::Tensor(t.clone()));
            }
        }
        self.current = Some(plan.clone());
        Ok(plan)
    }

    /// The memory plan for input signature `key` (cached per signature).
    fn plan_for_key(&mut self, key: ShapeKey) -> Result<Arc<ShapePlan>> {
        if let Some(p) = self.plans.get(&key) {
            return Ok(p.clone());
        }
        let plan = Arc::new(plan_for_inputs(self.engine.graph(), &key)?);
        tracing::debug!(
            arena = plan.arena_size,
            "planned memory for new input shapes"
        );
        self.plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// GPU engines: inputs checked and bound as on the CPU, then run by this context's
    /// device side (created on first use).
    fn execute_gpu(&mut self, inputs: &[(&str, Value)]) -> Result<Vec<Value>> {
        let ordered = self.bind_gpu_inputs(inputs)?;
        let engine = self.engine.clone();
        let ctx = self.gpu.as_mut().expect("created by bind_gpu_inputs");
        let refs: Vec<&Value> = ordered.iter().collect();
        ctx.run(engine.graph(), &refs)
    }

    /// GPU engines: checks and binds `inputs`, takes them out of their slots in the
    /// engine's input order, and creates this context's device side on first use.
    fn bind_gpu_inputs(&mut self, inputs: &[(&str, Value)]) -> Result<Vec<Value>> {
        self.bind_inputs(inputs)?;
        let engine = self.engine.clone();
        let ordered: Vec<Value> = engine
            .graph()
            .inputs
            .iter()
            .map(|id| self.slots[*id].take())
            .collect::<Option<_>>()
            .ok_or_else(|| KilnError::Other("an input was not bound".into()))?;
        let gpu = engine
            .gpu()
            .cloned()
            .ok_or_else(|| KilnError::Other("not a GPU engine".into()))?;
        if self.gpu.is_none() {
            self.gpu = Some(kiln_cuda::GpuContext::new(gpu)?);
        }
        Ok(ordered)
    }

    fn run_nodes(&mut self, plan: &ShapePlan) -> Result<()> {
        let engine = self.engine.clone();
        let graph = plan.graph.as_deref().unwrap_or(engine.graph());
        if let Some(p) = &mut self.cpu_profile {
            if p.layers.len() != graph.nodes.len()
                || p.layers
                    .iter()
                    .zip(&graph.nodes)
                    .any(|(l, n)| l.0 != n.name)
            {
                // First profiled run, or another specialised graph: start over.
                p.layers = graph
                    .nodes
                    .iter()
                    .map(|n| (n.name.clone(), n.desc.op_type.clone()))
                    .collect();
                p.seconds = vec![0.0; graph.nodes.len()];
                p.runs = 0;
            }
            p.runs += 1;
        }
        for (i, node) in graph.nodes.iter().enumerate() {
            let started = self.cpu_profile.is_some().then(std::time::Instant::now);
            let produced: SmallVec<[Option<Value>; 4]> = {
                let mut args: SmallVec<[Option<&Value>; 8]> = SmallVec::new();
                for inp in &node.inputs {
                    match inp {
                        None => args.push(None),
                        Some(id) => match &self.slots[*id] {
                            Some(v) => args.push(Some(v)),
                            None => {
                                return Err(KilnError::Kernel {
                                    node: node.name.clone(),
                                    op: node.desc.op_type.clone(),
                                    msg: format!("input {} has no value", graph.values[*id].name),
                                })
                            }
                        },
                    }
                }
                if plan.writes_in_place[i] {
                    guard(node, || self.run_in_place(node, &args, plan))?
                } else {
                    let outs =
                        guard(node, || node.op.eval(&args)).map_err(|e| e.at_node(&node.name))?;
                    let needed = node
                        .outputs
                        .iter()
                        .rposition(|o| o.is_some())
                        .map_or(0, |p| p + 1);
                    if outs.len() < needed {
                        return Err(KilnError::Kernel {
                            node: node.name.clone(),
                            op: node.desc.op_type.clone(),
                            msg: format!("produced {} outputs, {needed} expected", outs.len()),
                        });
                    }
                    outs.into_iter().map(|v| Some(detach(v))).collect()
                }
            };
            if let (Some(t0), Some(p)) = (started, &mut self.cpu_profile) {
                p.seconds[i] += t0.elapsed().as_secs_f64();
            }
            for (slot, v) in node.outputs.iter().zip(produced) {
                if let Some(id) = slot {
                    self.slots[*id] = v;
                }
            }
            for inp in node.inputs.iter().flatten() {
                if plan.last_use[*inp] == i {
                    self.slots[*inp] = None;
                }
            }
        }
        Ok(())
    }

    fn run_in_place(
        &self,
        node: &kiln_core::Node,
        args: &[Option<&Value>],
        plan: &ShapePlan,
    ) -> Result<SmallVec<[Option<Value>; 4]>> {
        let unplanned = || KilnError::Other(format!("output of {} was not planned", node.name));
        let mut views: SmallVec<[TensorMut<'_>; 4]> = SmallVec::new();
        for o in node.outputs.iter().flatten() {
            let Placement::Arena {
                offset,
                dtype,
                shape,
            } = &plan.placements[*o]
            else {
                return Err(unplanned());
            };
            let len = kiln_core::numel(shape) * dtype.size();
            // SAFETY: the planner gave this output a slot that no value alive at this
            // step overlaps (inputs of this node and other outputs included).
            let bytes = unsafe { self.arena.slot_mut(*offset, len) };
            views.push(TensorMut::new(*dtype, shape, bytes)?);
        }
        node.op
            .eval_into(args, &mut views)
            .map_err(|e| e.at_node(&node.name))?;
        drop(views);
        let mut out = SmallVec::new();
        for o in &node.outputs {
            let Some(o) = o else {
                out.push(None);
                continue;
            };
            let Placement::Arena {
                offset,
                dtype,
                shape,
            } = &plan.placements[*o]
            else {
                return Err(unplanned());
            };
            let len = kiln_core::numel(shape) * dtype.size();
            let t = Tensor::from_storage(
                *dtype,
                shape,
                Bytes::Arena {
                    arena: self.arena.clone(),
                    offset: *offset,
                    len,
                },
            )?;
            out.push(Some(Value::Tensor(t)));
        }
        Ok(out)
    }

    fn output_value(&self, index: usize) -> Result<&Value> {
        let graph = self.engine.graph();
        let o = graph.outputs[index];
        self.slots[o].as_ref().ok_or_else(|| {
            KilnError::Other(format!("output {} was not computed", graph.values[o].name))
        })
    }

    fn collect_outputs(&mut self) -> Result<Vec<Value>> {
        let n = self.engine.graph().outputs.len();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(detach(self.output_value(i)?.clone()));
        }
        Ok(out)
    }

    fn copy_outputs(&self, outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let infos = self.engine.outputs();
        if outputs.len() != infos.len() {
            return Err(KilnError::Other(format!(
                "execute_into: {} output buffers given, the engine has {} outputs",
                outputs.len(),
                infos.len()
            )));
        }
        for (i, (slot, info)) in outputs.iter_mut().zip(infos).enumerate() {
            let t = self
                .output_value(i)?
                .as_tensor()
                .map_err(|e| KilnError::BadInput {
                    name: info.name.clone(),
                    msg: format!("execute_into needs tensor outputs: {e}"),
                })?;
            slot.copy_from(t).map_err(|e| KilnError::BadInput {
                name: info.name.clone(),
                msg: format!("output buffer does not fit: {e}"),
            })?;
        }
        Ok(())
    }

    fn clear_activations(&mut self) {
        // The current plan's graph when it is specialised (its inlined constants stay).
        let graph = match self.current.as_ref().and_then(|p| p.graph.as_deref()) {
            Some(g) => g,
            None => self.engine.graph(),
        };
        for (id, slot) in self.slots.iter_mut().enumerate() {
            if !graph.constants.contains_key(&id) {
                *slot = None;
            }
        }
    }
}

/// Runs a kernel, turning a panic inside it (a kernel bug) into an error naming the node,
/// so one bad layer never takes the caller's process down.
fn guard<T>(node: &kiln_core::Node, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(KilnError::Kernel {
                node: node.name.clone(),
                op: node.desc.op_type.clone(),
                msg: format!("internal error in the kernel (please report): {msg}"),
            })
        }
    }
}

/// Copies arena-backed tensors to the heap so they outlive their slot.
fn detach(v: Value) -> Value {
    match v {
        Value::Tensor(t) => Value::Tensor(detach_tensor(t)),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(detach_tensor).collect()),
        Value::Optional(Some(b)) => Value::Optional(Some(Box::new(detach(*b)))),
        other => other,
    }
}

fn detach_tensor(t: Tensor) -> Tensor {
    match t.storage() {
        Some(Bytes::Arena { .. }) => t.to_owned_heap(),
        _ => t,
    }
}

/// Describes an engine input or output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoInfo {
    /// Name in the model.
    pub name: String,
    /// Kind of value.
    pub kind: ValueKind,
    /// Element type, when known.
    pub dtype: Option<DType>,
    /// Shape with symbolic dims, when the rank is known.
    pub shape: Option<Vec<Dim>>,
}

impl IoInfo {
    /// `f32[1,3,224,224]`-style description.
    pub fn describe(&self) -> String {
        kiln_core::Fact {
            kind: self.kind,
            dtype: self.dtype,
            shape: self.shape.clone(),
            konst: None,
        }
        .describe()
    }

    /// Checks a tensor against this input's dtype, rank and known dims.
    pub fn check(&self, t: &Tensor) -> Result<()> {
        if let Some(d) = self.dtype {
            if t.dtype() != d {
                return Err(KilnError::BadInput {
                    name: self.name.clone(),
                    msg: format!("expected dtype {d}, got {}", t.dtype()),
                });
            }
        }
        self.check_shape(t.shape())
    }

    /// Checks a shape against this input's rank and known dims.
    pub fn check_shape(&self, given: &[usize]) -> Result<()> {
        let bad = |msg: String| KilnError::BadInput {
            name: self.name.clone(),
            msg,
        };
        if let Some(shape) = &self.shape {
            if shape.len() != given.len() {
                return Err(bad(format!(
                    "expected rank {} ({}), got rank {} with shape {:?}",
                    shape.len(),
                    self.describe(),
                    given.len(),
                    given
                )));
            }
            for (axis, (want, got)) in shape.iter().zip(given).enumerate() {
                if let Dim::Known(w) = want {
                    if w != got {
                        return Err(bad(format!(
                            "dimension {axis} must be {w} ({}), got {got} (shape {:?})",
                            self.describe(),
                            given
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Timed runs per mode while a multi-threaded context decides between its pool and the
/// calling thread alone.
const MODE_PROBE_SAMPLES: usize = 4;

/// Runs of one input shape that a multi-threaded context spends deciding between its pool
/// and the calling thread alone: one warm-up each, then [`MODE_PROBE_SAMPLES`] timed runs
/// each, alternated.
pub const MODE_PROBE_RUNS: usize = 2 + 2 * MODE_PROBE_SAMPLES;

/// After the decision, the first run that tries the other mode again (doubling after
/// each try, see [`ModeProbe::record`]).
const MODE_RETRY_FIRST: usize = 26;

/// No more tries of the other mode from this run on.
const MODE_RETRY_LAST: usize = MODE_RETRY_FIRST << 7;

/// A try of the other mode takes over when it is at least this much faster (as a ratio of
/// the chosen mode's best run).
const MODE_SWITCH_RATIO: f64 = 0.9;

/// The pool-or-serial decision for one shape plan (see [`ExecutionContext::set_threads`]).
#[derive(Debug, Clone)]
struct ModeProbe {
    runs: usize,
    /// Fastest timed run in the pool / serially so far.
    pool: f64,
    serial: f64,
    /// Decided: run in the pool (true) or serially.
    choice: Option<bool>,
    /// The run that next tries the mode not chosen.
    retry_at: usize,
}

impl Default for ModeProbe {
    fn default() -> Self {
        ModeProbe {
            runs: 0,
            pool: f64::INFINITY,
            serial: f64::INFINITY,
            choice: None,
            retry_at: MODE_RETRY_FIRST,
        }
    }
}

impl ModeProbe {
    /// Whether the next run goes to the pool: alternating while probing (pool first), then
    /// the chosen mode, except on a retry run.
    fn next_in_pool(&self) -> bool {
        match self.choice {
            None => self.runs.is_multiple_of(2),
            Some(pool) => pool != (self.runs == self.retry_at),
        }
    }

    /// The best run so far of one mode.
    fn best(&mut self, in_pool: bool) -> &mut f64 {
        if in_pool {
            &mut self.pool
        } else {
            &mut self.serial
        }
    }

    /// Records a run's seconds. After [`MODE_PROBE_RUNS`] runs keeps the mode whose fastest
    /// run was faster (the pool on a tie): the minimum is what the mode can do, the other
    /// samples mostly measure what else the machine was doing. Later, a retry of the other
    /// mode that beats the chosen mode's best by [`MODE_SWITCH_RATIO`] switches to it.
    fn record(&mut self, in_pool: bool, seconds: f64) {
        let run = self.runs;
        self.runs = self.runs.saturating_add(1);
        // Runs 0 and 1 are the warm-ups (scratch buffers sized, caches filled).
        if run < 2 {
            return;
        }
        let best = self.best(in_pool);
        *best = best.min(seconds);
        match self.choice {
            None if self.runs == MODE_PROBE_RUNS => {
                self.choice = Some(self.pool <= self.serial);
            }
            None => {}
            Some(chosen) if run == self.retry_at && in_pool != chosen => {
                if seconds < *self.best(chosen) * MODE_SWITCH_RATIO {
                    self.choice = Some(in_pool);
                }
                self.retry_at = if run >= MODE_RETRY_LAST {
                    usize::MAX
                } else {
                    run * 2
                };
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    /// Probing alternates pool / serial, then sticks to the faster mode.
    #[test]
    fn mode_probe_keeps_the_faster_mode() {
        for (pool_s, serial_s, want) in [(1.0, 2.0, true), (3.0, 2.0, false), (2.0, 2.0, true)] {
            let mut p = ModeProbe::default();
            let mut seen = Vec::new();
            for _ in 0..MODE_PROBE_RUNS {
                let in_pool = p.next_in_pool();
                seen.push(in_pool);
                p.record(in_pool, if in_pool { pool_s } else { serial_s });
            }
            let alternating: Vec<bool> = (0..MODE_PROBE_RUNS).map(|i| i % 2 == 0).collect();
            assert_eq!(seen, alternating);
            for _ in 0..5 {
                assert_eq!(p.next_in_pool(), want);
                p.record(want, 100.0);
            }
        }
    }

    /// A wrong early decision (the pool's first runs slow) is undone by a later try of the
    /// other mode; a mode that stays slower is tried less and less often, then never.
    #[test]
    fn mode_probe_retries_the_other_mode_with_backoff() {
        // The pool reads 10 ms while warming up, 5 ms afterwards; serial is always 9 ms.
        let mut p = ModeProbe::default();
        let mut pool_runs = 0;
        let mut switched_at = None;
        for run in 0..200 {
            let in_pool = p.next_in_pool();
            let ms = if in_pool {
                pool_runs += 1;
                if pool_runs <= 6 {
                    10.0
                } else {
                    5.0
                }
            } else {
                9.0
            };
            p.record(in_pool, ms);
            if run == MODE_PROBE_RUNS {
                assert_eq!(p.choice, Some(false), "the probe sees a slower pool");
            }
            if switched_at.is_none() && p.choice == Some(true) {
                switched_at = Some(run);
            }
        }
        // The first retry (run 26) is the pool's 6th run, still slow; run 52 switches.
        assert_eq!(switched_at, Some(2 * MODE_RETRY_FIRST));
        assert!(p.next_in_pool());
        // A pool that is always slower: retries at 26, 52, 104, …, never after the last.
        let mut p = ModeProbe::default();
        let mut retries = Vec::new();
        for run in 0..MODE_RETRY_LAST * 3 {
            let in_pool = p.next_in_pool();
            if run >= MODE_PROBE_RUNS && in_pool {
                retries.push(run);
            }
            p.record(in_pool, if in_pool { 2.0 } else { 1.0 });
        }
        let want: Vec<usize> = (0..8).map(|i| MODE_RETRY_FIRST << i).collect();
        assert_eq!(retries, want);
        assert_eq!(p.choice, Some(false));
        // Slow outliers (another process running) do not decide: the fastest runs do;
        // the warm-ups are not counted.
        let mut p = ModeProbe::default();
        let times = [0.1, 9.0, 1.0, 2.0, 50.0, 2.0, 60.0, 2.0, 70.0, 2.0];
        for (i, t) in times.into_iter().enumerate() {
            p.record(i % 2 == 0, t);
        }
        assert!(p.next_in_pool());
        let mut p = ModeProbe::default();
        let times = [9.0, 0.1, 3.0, 2.0, 2.5, 50.0, 2.5, 60.0, 2.5, 70.0];
        for (i, t) in times.into_iter().enumerate() {
            p.record(i % 2 == 0, t);
        }
        assert!(!p.next_in_pool());
    }
}
