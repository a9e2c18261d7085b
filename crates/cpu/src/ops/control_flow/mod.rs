//! Control-flow ops: `If`, `Loop`, `Scan`. Their bodies are [`Graph`]s run with
//! [`kiln_core::exec::run_graph`].
//!
//! # Captures contract (shared with the ONNX importer)
//!
//! A subgraph may read values of enclosing graphs by name. The importer lists those in the
//! subgraph's `graph.captures` and appends their values to the owning node's inputs, after
//! the node's formal ONNX inputs:
//!
//! - `If`: inputs are `[cond, captures...]`; both branches share one capture list (the
//!   union of what either branch reads, each name once), so each branch's `captures` are
//!   the node's last inputs.
//! - `Loop`: `[M, cond, v_initial..., body captures...]`.
//! - `Scan`: `[(sequence_lens, opset 8), initial states..., scan inputs..., body captures...]`.
//! - `SequenceMap` (in `sequence.rs`): `[input_sequence, additional_inputs..., body captures...]`.
//!
//! Ops find the captures by counting from the end of their inputs, so trailing empty
//! optional inputs between the formal inputs and the captures are not an issue.

pub(crate) mod util;

use std::any::Any;
use std::sync::Arc;

use kiln_core::{BuildCtx, Dim, Fact, Graph, KilnError, Op, OpRegistry, Result, Tensor, Value};

use util::{
    captures, empty_stacked, merge_facts, output_facts, run_body, stack, stacked_fact, take, truthy,
};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("If", build_if);
    reg.register("Loop", build_loop);
    reg.register("Scan", build_scan);
}

// ---------------------------------------------------------------- If

/// `If`: runs `then_branch` or `else_branch` depending on a boolean condition.
#[derive(Debug)]
pub struct If {
    then_branch: Arc<Graph>,
    else_branch: Arc<Graph>,
}

fn build_if(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let then_branch = a.graph("then_branch")?;
    let else_branch = a.graph("else_branch")?;
    if then_branch.outputs.len() != else_branch.outputs.len() {
        return Err(a.invalid(format!(
            "then_branch has {} outputs but else_branch has {}",
            then_branch.outputs.len(),
            else_branch.outputs.len()
        )));
    }
    if !then_branch.inputs.is_empty() || !else_branch.inputs.is_empty() {
        return Err(a.invalid("If branches must not have formal inputs"));
    }
    Ok(Box::new(If {
        then_branch,
        else_branch,
    }))
}

impl Op for If {
    fn op_type(&self) -> &str {
        "If"
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let then_f = output_facts(&self.then_branch);
        let else_f = output_facts(&self.else_branch);
        let cond = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| truthy("If", t).ok());
        let mut out: Vec<Fact> = match cond {
            Some(true) => then_f,
            Some(false) => else_f,
            None => then_f
                .iter()
                .zip(&else_f)
                .map(|(a, b)| merge_facts(a, b))
                .collect(),
        };
        out.resize(n_outputs, Fact::unknown());
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let cond = kiln_core::input_tensor(inputs, 0, "If")?;
        let cond = truthy("If", cond)?;
        // Both branches share one capture list (the importer's contract): the node's
        // trailing inputs after `cond`, in the order of each branch's `captures`.
        let branch = if cond {
            &self.then_branch
        } else {
            &self.else_branch
        };
        let n_caps = branch.captures.len();
        let start = inputs
            .len()
            .checked_sub(n_caps)
            .filter(|s| *s >= 1)
            .ok_or_else(|| {
                KilnError::kernel(
                    "If",
                    format!("expected {n_caps} captured values after cond"),
                )
            })?;
        let caps = captures("If", inputs, start, n_caps)?;
        let name = if cond { "then_branch" } else { "else_branch" };
        run_body("If", name, branch, &[], &caps)
    }

    fn subgraphs(&self) -> Vec<Arc<Graph>> {
        vec![self.then_branch.clone(), self.else_branch.clone()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Loop

/// `Loop`: a `for`/`while` loop with loop-carried values and stacked scan outputs.
#[derive(Debug)]
pub struct Loop {
    body: Arc<Graph>,
}

fn build_loop(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let body = a.graph("body")?;
    if body.inputs.len() < 2 {
        return Err(a.invalid(format!(
            "Loop body needs at least 2 inputs (iteration, cond), has {}",
            body.inputs.len()
        )));
    }
    if body.outputs.len() < body.inputs.len() - 1 {
        return Err(a.invalid(format!(
            "Loop body has {} inputs, so it needs at least {} outputs (cond + carried), has {}",
            body.inputs.len(),
            body.inputs.len() - 1,
            body.outputs.len()
        )));
    }
    Ok(Box::new(Loop { body }))
}

impl Loop {
    /// Number of loop-carried values.
    fn n_carried(&self) -> usize {
        self.body.inputs.len() - 2
    }

    /// Number of scan outputs.
    fn n_scan(&self) -> usize {
        self.body.outputs.len() - 1 - self.n_carried()
    }

    /// The trip count when the loop provably runs exactly `M` times.
    fn static_trip_count(&self, inputs: &[Option<&Fact>]) -> Option<usize> {
        let m = inputs
            .first()
            .copied()
            .flatten()?
            .konst
            .as_ref()?
            .to_i64_vec()
            .ok()?;
        let m = usize::try_from(*m.first()?).ok()?;
        let cond_out = *self.body.outputs.first()?;
        let cond_passthrough =
            Some(&util::skip_identities(&self.body, cond_out)) == self.body.inputs.get(1);
        let cond_true = match inputs.get(1).copied().flatten() {
            None => true,
            Some(f) => f
                .konst
                .as_ref()
                .is_some_and(|t| truthy("Loop", t).unwrap_or(false)),
        };
        (cond_passthrough && cond_true).then_some(m)
    }
}

impl Op for Loop {
    fn op_type(&self) -> &str {
        "Loop"
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let body_out = output_facts(&self.body);
        let n = self.n_carried();
        let mut out = Vec::with_capacity(n_outputs);
        for i in 0..n {
            let from_body = &body_out[1 + i];
            let f = match inputs.get(2 + i).copied().flatten() {
                Some(init) => merge_facts(init, from_body),
                None => Fact {
                    konst: None,
                    ..from_body.clone()
                },
            };
            out.push(f);
        }
        let trips = self
            .static_trip_count(inputs)
            .map_or(Dim::Unknown, Dim::Known);
        for k in 0..self.n_scan() {
            out.push(stacked_fact(&body_out[1 + n + k], 0, trips.clone()));
        }
        out.resize(n_outputs, Fact::unknown());
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "Loop";
        let n = self.n_carried();
        let n_caps = self.body.captures.len();
        let formal = inputs
            .len()
            .checked_sub(n_caps)
            .filter(|f| *f >= 2 + n)
            .ok_or_else(|| {
                KilnError::kernel(
                    OP,
                    format!("expected {} inputs, got {}", 2 + n + n_caps, inputs.len()),
                )
            })?;
        let caps = captures(OP, inputs, formal, n_caps)?;
        let max_trips = match kiln_core::optional_tensor(inputs, 0, OP)? {
            None => None,
            Some(m) => {
                let v = m
                    .to_i64_vec()
                    .map_err(|e| KilnError::kernel(OP, format!("M: {e}")))?;
                match v.as_slice() {
                    [m] => Some(*m),
                    _ => {
                        return Err(KilnError::kernel(
                            OP,
                            format!("M must be a scalar, found shape {:?}", m.shape()),
                        ))
                    }
                }
            }
        };
        let mut cond = match kiln_core::optional_tensor(inputs, 1, OP)? {
            None => true,
            Some(c) => truthy(OP, c)?,
        };
        let mut carried: Vec<Value> = (0..n)
            .map(|i| {
                inputs[2 + i].cloned().ok_or_else(|| {
                    KilnError::kernel(OP, format!("loop-carried input {} is missing", 2 + i))
                })
            })
            .collect::<Result<_>>()?;
        let k = self.n_scan();
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); k];
        let mut it: i64 = 0;
        while cond && max_trips.is_none_or(|m| it < m) {
            let mut body_in = Vec::with_capacity(2 + n);
            body_in.push(Value::Tensor(Tensor::scalar(it)));
            body_in.push(Value::Tensor(Tensor::from_bools(&[], &[cond])?));
            body_in.append(&mut carried);
            let mut outs = run_body(
                OP,
                &format!("body (iteration {it})"),
                &self.body,
                &body_in,
                &caps,
            )?;
            if outs.len() != 1 + n + k {
                return Err(KilnError::kernel(
                    OP,
                    format!(
                        "body produced {} outputs, {} expected",
                        outs.len(),
                        1 + n + k
                    ),
                ));
            }
            let scan_part = outs.split_off(1 + n);
            carried = outs.split_off(1);
            cond = truthy(
                OP,
                outs[0]
                    .as_tensor()
                    .map_err(|e| KilnError::kernel(OP, format!("cond output: {e}")))?,
            )?;
            for (acc, v) in scans.iter_mut().zip(scan_part) {
                acc.push(
                    v.into_tensor()
                        .map_err(|e| KilnError::kernel(OP, format!("scan output: {e}")))?,
                );
            }
            it += 1;
        }
        let body_out = output_facts(&self.body);
        let mut result = carried;
        for (i, acc) in scans.into_iter().enumerate() {
            let t = if acc.is_empty() {
                empty_stacked(&body_out[1 + n + i], 0)?
            } else {
                stack(OP, &acc, 0)?
            };
            result.push(Value::Tensor(t));
        }
        Ok(result)
    }

    fn subgraphs(&self) -> Vec<Arc<Graph>> {
        vec![self.body.clone()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Scan

/// `Scan`: iterates a body over slices of its scan inputs, carrying state.
///
/// Opset 8 has a leading batch axis on every input/output and an optional
/// `sequence_lens` first input; opset 9+ drops both and adds per-input/output axes and
/// directions.
#[derive(Debug)]
pub struct Scan {
    body: Arc<Graph>,
    num_scan_inputs: usize,
    /// Opset 8 semantics (batch axis, `sequence_lens`).
    batched: bool,
    input_axes: Vec<i64>,
    input_directions: Vec<i64>,
    output_axes: Vec<i64>,
    output_directions: Vec<i64>,
}

fn build_scan(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let body = a.graph("body")?;
    let m = a.req_int("num_scan_inputs")?;
    let num_scan_inputs =
        usize::try_from(m).map_err(|_| a.invalid(format!("num_scan_inputs {m} is negative")))?;
    if num_scan_inputs == 0 || num_scan_inputs > body.inputs.len() {
        return Err(a.invalid(format!(
            "num_scan_inputs {num_scan_inputs} must be in 1..={} (the body's input count)",
            body.inputs.len()
        )));
    }
    let n_state = body.inputs.len() - num_scan_inputs;
    if body.outputs.len() < n_state {
        return Err(a.invalid(format!(
            "body has {} outputs, fewer than its {n_state} states",
            body.outputs.len()
        )));
    }
    let n_scan_out = body.outputs.len() - n_state;
    let batched = ctx.opset() < 9;
    let in_dir_name = if batched {
        "directions"
    } else {
        "scan_input_directions"
    };
    let input_directions = a
        .opt_ints(in_dir_name)?
        .unwrap_or_else(|| vec![0; num_scan_inputs]);
    let input_axes = a
        .opt_ints("scan_input_axes")?
        .unwrap_or_else(|| vec![0; num_scan_inputs]);
    let output_axes = a
        .opt_ints("scan_output_axes")?
        .unwrap_or_else(|| vec![0; n_scan_out]);
    let output_directions = a
        .opt_ints("scan_output_directions")?
        .unwrap_or_else(|| vec![0; n_scan_out]);
    for (name, v, want) in [
        (in_dir_name, &input_directions, num_scan_inputs),
        ("scan_input_axes", &input_axes, num_scan_inputs),
        ("scan_output_axes", &output_axes, n_scan_out),
        ("scan_output_directions", &output_directions, n_scan_out),
    ] {
        if v.len() != want {
            return Err(a.invalid(format!("{name} has {} entries, {want} expected", v.len())));
        }
    }
    if input_directions
        .iter()
        .chain(&output_directions)
        .any(|d| *d != 0 && *d != 1)
    {
        return Err(a.invalid("scan directions must be 0 (forward) or 1 (reverse)"));
    }
    Ok(Box::new(Scan {
        body,
        num_scan_inputs,
        batched,
        input_axes,
        input_directions,
        output_axes,
        output_directions,
    }))
}

/// One scan input prepared for iteration.
struct ScanIn {
    tensor: Tensor,
    axis: usize,
    reverse: bool,
}

impl Scan {
    fn n_state(&self) -> usize {
        self.body.inputs.len() - self.num_scan_inputs
    }

    fn n_scan_out(&self) -> usize {
        self.body.outputs.len() - self.n_state()
    }

    /// Runs the body `len` times; returns the final states and, per scan output, the
    /// per-iteration slices in iteration order.
    fn iterate(
        &self,
        mut states: Vec<Value>,
        scan_in: &[ScanIn],
        len: usize,
        caps: &[Value],
    ) -> Result<(Vec<Value>, Vec<Vec<Tensor>>)> {
        const OP: &str = "Scan";
        let n = self.n_state();
        let k = self.n_scan_out();
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::with_capacity(len); k];
        for t in 0..len {
            let mut body_in = std::mem::take(&mut states);
            for s in scan_in {
                let idx = if s.reverse { len - 1 - t } else { t };
                body_in.push(Value::Tensor(take(OP, &s.tensor, s.axis, idx)?));
            }
            let mut outs = run_body(
                OP,
                &format!("body (iteration {t})"),
                &self.body,
                &body_in,
                caps,
            )?;
            if outs.len() != n + k {
                return Err(KilnError::kernel(
                    OP,
                    format!("body produced {} outputs, {} expected", outs.len(), n + k),
                ));
            }
            let scan_part = outs.split_off(n);
            states = outs;
            for (acc, v) in scans.iter_mut().zip(scan_part) {
                acc.push(
                    v.into_tensor()
                        .map_err(|e| KilnError::kernel(OP, format!("scan output: {e}")))?,
                );
            }
        }
        Ok((states, scans))
    }

    /// Stacks per-iteration slices of scan output `k` along its output axis.
    fn finish_output(
        &self,
        k: usize,
        mut slices: Vec<Tensor>,
        axis: i64,
        reverse: bool,
    ) -> Result<Tensor> {
        const OP: &str = "Scan";
        let body_out = output_facts(&self.body);
        let elem = &body_out[self.n_state() + k];
        if reverse {
            slices.reverse();
        }
        let rank = match slices.first() {
            Some(s) => s.rank(),
            None => match elem.rank() {
                Some(r) => r,
                None => return empty_stacked(elem, 0),
            },
        };
        let axis = util::norm_axis(OP, axis, rank + 1)?;
        if slices.is_empty() {
            return empty_stacked(elem, axis);
        }
        stack(OP, &slices, axis)
    }

    fn eval_v9(&self, formal: &[Option<&Value>], caps: &[Value]) -> Result<Vec<Value>> {
        const OP: &str = "Scan";
        let n = self.n_state();
        let states: Vec<Value> = formal[..n]
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.cloned()
                    .ok_or_else(|| KilnError::kernel(OP, format!("state input {i} is missing")))
            })
            .collect::<Result<_>>()?;
        let mut scan_in = Vec::with_capacity(self.num_scan_inputs);
        let mut len: Option<usize> = None;
        for j in 0..self.num_scan_inputs {
            let t = kiln_core::input_tensor(formal, n + j, OP)?.clone();
            let axis = util::norm_axis(OP, self.input_axes[j], t.rank())?;
            let l = t.shape()[axis];
            if len.is_some_and(|x| x != l) {
                return Err(KilnError::kernel(
                    OP,
                    format!("scan inputs disagree on the sequence length ({l} vs {len:?})"),
                ));
            }
            len = Some(l);
            scan_in.push(ScanIn {
                tensor: t,
                axis,
                reverse: self.input_directions[j] == 1,
            });
        }
        let (states, scans) = self.iterate(states, &scan_in, len.unwrap_or(0), caps)?;
        let mut out = states;
        for (k, slices) in scans.into_iter().enumerate() {
            let t = self.finish_output(
                k,
                slices,
                self.output_axes[k],
                self.output_directions[k] == 1,
            )?;
            out.push(Value::Tensor(t));
        }
        Ok(out)
    }

    fn eval_v8(&self, formal: &[Option<&Value>], caps: &[Value]) -> Result<Vec<Value>> {
        const OP: &str = "Scan";
        let n = self.n_state();
        let m = self.num_scan_inputs;
        let states: Vec<&Tensor> = (0..n)
            .map(|i| kiln_core::input_tensor(formal, 1 + i, OP))
            .collect::<Result<_>>()?;
        let xs: Vec<&Tensor> = (0..m)
            .map(|j| kiln_core::input_tensor(formal, 1 + n + j, OP))
            .collect::<Result<_>>()?;
        let batch = match (states.first(), xs.first()) {
            (Some(s), _) if s.rank() > 0 => s.shape()[0],
            (_, Some(x)) if x.rank() > 0 => x.shape()[0],
            _ => return Err(KilnError::kernel(OP, "inputs need a leading batch axis")),
        };
        let mut max_len = 0usize;
        for x in &xs {
            if x.rank() < 2 || x.shape()[0] != batch {
                return Err(KilnError::kernel(
                    OP,
                    format!(
                        "scan input of shape {:?} lacks [batch={batch}, seq, ...]",
                        x.shape()
                    ),
                ));
            }
            if max_len != 0 && x.shape()[1] != max_len {
                return Err(KilnError::kernel(
                    OP,
                    "scan inputs disagree on the sequence length",
                ));
            }
            max_len = x.shape()[1];
        }
        let seq_lens: Vec<usize> = match kiln_core::optional_tensor(formal, 0, OP)? {
            None => vec![max_len; batch],
            Some(t) => {
                let v = t
                    .to_i64_vec()
                    .map_err(|e| KilnError::kernel(OP, format!("sequence_lens: {e}")))?;
                if v.len() != batch {
                    return Err(KilnError::kernel(
                        OP,
                        format!("sequence_lens has {} entries, batch is {batch}", v.len()),
                    ));
                }
                v.iter()
                    .map(|&l| {
                        usize::try_from(l)
                            .ok()
                            .filter(|l| *l <= max_len)
                            .ok_or_else(|| {
                                KilnError::kernel(
                                    OP,
                                    format!("sequence length {l} is out of 0..={max_len}"),
                                )
                            })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let k = self.n_scan_out();
        let mut final_states: Vec<Vec<Tensor>> = vec![Vec::with_capacity(batch); n];
        let mut outputs: Vec<Vec<Tensor>> = vec![Vec::with_capacity(batch); k];
        for (b, &len) in seq_lens.iter().enumerate() {
            let st: Vec<Value> = states
                .iter()
                .map(|s| take(OP, s, 0, b).map(Value::Tensor))
                .collect::<Result<_>>()?;
            let scan_in: Vec<ScanIn> = xs
                .iter()
                .enumerate()
                .map(|(j, x)| {
                    let full = take(OP, x, 0, b)?;
                    let part = util::narrow(OP, &full, 0, 0, len)?;
                    Ok(ScanIn {
                        tensor: part,
                        axis: 0,
                        reverse: self.input_directions[j] == 1,
                    })
                })
                .collect::<Result<_>>()?;
            let (st, scans) = self.iterate(st, &scan_in, len, caps)?;
            for (acc, v) in final_states.iter_mut().zip(st) {
                acc.push(
                    v.into_tensor()
                        .map_err(|e| KilnError::kernel(OP, format!("state output: {e}")))?,
                );
            }
            for (kk, mut slices) in scans.into_iter().enumerate() {
                // Shorter sequences are padded with zeros up to the longest one.
                if let Some(first) = slices.first().cloned() {
                    while slices.len() < max_len {
                        slices.push(Tensor::zeros(first.dtype(), first.shape()));
                    }
                }
                outputs[kk].push(self.finish_output(kk, slices, 0, false)?);
            }
        }
        let mut out = Vec::with_capacity(n + k);
        for acc in final_states.into_iter().chain(outputs) {
            out.push(Value::Tensor(stack(OP, &acc, 0)?));
        }
        Ok(out)
    }
}

impl Op for Scan {
    fn op_type(&self) -> &str {
        "Scan"
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let body_out = output_facts(&self.body);
        let n = self.n_state();
        let off = usize::from(self.batched);
        let mut out = Vec::with_capacity(n_outputs);
        // The sequence length, when a scan input's fact tells it.
        let seq_len = inputs.get(off + n).copied().flatten().and_then(|f| {
            let s = f.shape.as_ref()?;
            if self.batched {
                s.get(1).cloned()
            } else {
                let axis = util::norm_axis("Scan", self.input_axes[0], s.len()).ok()?;
                s.get(axis).cloned()
            }
        });
        let batch = if self.batched {
            inputs
                .iter()
                .skip(1)
                .flatten()
                .find_map(|f| f.shape.as_ref().and_then(|s| s.first().cloned()))
        } else {
            None
        };
        for (i, body_f) in body_out.iter().enumerate().take(n) {
            let f = match inputs.get(off + i).copied().flatten() {
                Some(init) if !self.batched => merge_facts(init, body_f),
                Some(init) => Fact {
                    konst: None,
                    ..init.clone()
                },
                None => Fact {
                    konst: None,
                    ..body_f.clone()
                },
            };
            out.push(f);
        }
        for k in 0..self.n_scan_out() {
            let elem = &body_out[n + k];
            let len = seq_len.clone().unwrap_or(Dim::Unknown);
            let f = if self.batched {
                let inner = stacked_fact(elem, 0, len);
                stacked_fact(&inner, 0, batch.clone().unwrap_or(Dim::Unknown))
            } else {
                stacked_fact(elem, self.output_axes[k], len)
            };
            out.push(f);
        }
        out.resize(n_outputs, Fact::unknown());
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "Scan";
        let n_caps = self.body.captures.len();
        let want = usize::from(self.batched) + self.body.inputs.len();
        let formal = inputs
            .len()
            .checked_sub(n_caps)
            .filter(|f| *f >= want)
            .ok_or_else(|| {
                KilnError::kernel(
                    OP,
                    format!("expected {} inputs, got {}", want + n_caps, inputs.len()),
                )
            })?;
        let caps = captures(OP, inputs, formal, n_caps)?;
        if self.batched {
            self.eval_v8(&inputs[..want], &caps)
        } else {
            self.eval_v9(&inputs[..want], &caps)
        }
    }

    fn subgraphs(&self) -> Vec<Arc<Graph>> {
        vec![self.body.clone()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
