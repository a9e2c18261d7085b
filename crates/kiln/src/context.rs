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
    key: ShapeKey,
    current: Option<Arc<ShapePlan>>,
    _not_sync: PhantomData<Cell<()>>,
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
        ExecutionContext {
            engine,
            plans,
            arena: Arc::new(Arena::new(arena_size)),
            slots,
            pool: None,
            key: Vec::new(),
            current: None,
            _not_sync: PhantomData,
        }
    }

    /// The engine this context runs.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs intra-op parallel kernels on a private pool of `threads` threads (default: the
    /// global rayon pool, one thread per core).
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| {
                KilnError::Other(format!("cannot create a pool of {threads} threads: {e}"))
            })?;
        self.pool = Some(pool);
        Ok(())
    }

    /// Bytes of the activation arena currently allocated.
    pub fn arena_bytes(&self) -> usize {
        self.arena.len()
    }

    /// Runs inference. `inputs` names every engine input once; returns the outputs in the
    /// engine's output order (copied to fresh heap buffers: use
    /// [`ExecutionContext::execute_into`] for a call that allocates nothing).
    pub fn execute(&mut self, inputs: &[(&str, Value)]) -> Result<Vec<Value>> {
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
                let r = pool.install(|| self.run_nodes(&plan));
                self.pool = Some(pool);
                r
            }
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
        for (info, id) in infos.iter().zip(&engine.graph().inputs) {
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
        let plan = match self.plans.get(&self.key) {
            Some(p) => p.clone(),
            None => {
                let plan = Arc::new(plan_for_inputs(self.engine.graph(), &self.key)?);
                tracing::debug!(
                    arena = plan.arena_size,
                    "planned memory for new input shapes"
                );
                self.plans.insert(self.key.clone(), plan.clone());
                plan
            }
        };
        self.current = Some(plan.clone());
        Ok(plan)
    }

    fn run_nodes(&mut self, plan: &ShapePlan) -> Result<()> {
        let engine = self.engine.clone();
        let graph = engine.graph();
        for (i, node) in graph.nodes.iter().enumerate() {
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
        let graph = self.engine.graph();
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
        let bad = |msg: String| KilnError::BadInput {
            name: self.name.clone(),
            msg,
        };
        if let Some(d) = self.dtype {
            if t.dtype() != d {
                return Err(bad(format!("expected dtype {d}, got {}", t.dtype())));
            }
        }
        if let Some(shape) = &self.shape {
            if shape.len() != t.rank() {
                return Err(bad(format!(
                    "expected rank {} ({}), got rank {} with shape {:?}",
                    shape.len(),
                    self.describe(),
                    t.rank(),
                    t.shape()
                )));
            }
            for (axis, (want, got)) in shape.iter().zip(t.shape()).enumerate() {
                if let Dim::Known(w) = want {
                    if w != got {
                        return Err(bad(format!(
                            "dimension {axis} must be {w} ({}), got {got} (shape {:?})",
                            self.describe(),
                            t.shape()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}
