//! Kernel auto-tuning (TensorRT's tactic selection): for every layer, every candidate
//! implementation its backend offers in the allowed precision pools is timed on the device
//! with the layer's real shapes; the choice is made over the whole graph, counting the
//! reformat layers that neighbours in different formats force ([`select`]); results are
//! remembered in a [`TimingCache`].
//!
//! The chosen tactic is written into each node's description ([`TACTIC_ATTR`], with its
//! time in [`TACTIC_TIME_ATTR`]), so plans carry it and ops are rebuilt with it.

pub mod cache;
pub mod gpu;
pub mod layout;
pub mod reformat;
pub mod select;
pub mod timer;
pub mod whole_engine;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use kiln_core::tactic::{TACTIC_ATTR, TACTIC_TIME_ATTR};
use kiln_core::{
    Attr, BuildCtx, Fact, Format, Graph, KilnError, Layout, Node, Precision, Result, Tactic,
    ValueKind,
};
use serde::Serialize;

pub use cache::TimingCache;
pub use timer::{CpuTimer, LayerTimer};

use crate::engine::registry;
use select::{Edge, End, Option_, Problem};

/// What the tuner may do.
#[derive(Debug, Clone)]
pub struct TuneSettings {
    /// Builder optimisation level: 0 = heuristics only (no timing); 1..=5 time more
    /// candidates ([`Tactic::min_level`]) with more repetitions.
    pub level: u8,
    /// Precisions layers may run in (the seed's pools: FP32; FP16+FP32; INT8+FP32; all).
    pub pools: Vec<Precision>,
    /// Layers pinned to one precision, by node name (or the name of a source node fused
    /// into it).
    pub pins: BTreeMap<String, Precision>,
    /// Whether tactics in layouts other than the linear one (`fp32/nhwc`) may be chosen:
    /// false for engines with optimization profiles, whose graphs take no reformat layers.
    pub layouts: bool,
}

/// The precision pools for a build's flags, exactly as TensorRT forms them: FP32 always,
/// plus FP16 with `--fp16` and INT8 with `--int8`.
pub fn pools(fp16: bool, int8: bool) -> Result<Vec<Precision>> {
    let mut v = Vec::new();
    if int8 {
        v.push(Precision::Int8);
    }
    if fp16 {
        v.push(Precision::Fp16);
    }
    v.push(Precision::Fp32);
    Ok(v)
}

/// One candidate as the tuner saw it.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    /// Tactic id.
    pub tactic: String,
    /// Format (`fp32/linear`, ...).
    pub format: String,
    /// Median time in ms, when measured (or read from the cache).
    pub time_ms: Option<f64>,
    /// Why it was dropped, when it was.
    pub dropped: Option<String>,
    /// True when the time came from the timing cache.
    pub cached: bool,
}

/// The tuning of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTuning {
    /// Node name.
    pub layer: String,
    /// Every candidate considered.
    pub candidates: Vec<CandidateReport>,
    /// The chosen tactic.
    pub chosen: String,
    /// Its format.
    pub format: String,
    /// Its time (ms).
    pub time_ms: f64,
}

/// What tuning did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TuneReport {
    /// Optimisation level used.
    pub level: u8,
    /// Layers with more than one candidate, as tuned.
    pub layers: Vec<LayerTuning>,
    /// Tactics timed on the device in this build.
    pub timed: usize,
    /// Times read from the timing cache.
    pub cache_hits: usize,
    /// Reformat layers inserted.
    pub reformats: usize,
    /// Sum of chosen tactic and reformat times (ms), as the selection saw it.
    pub estimated_ms: f64,
    /// The same sum for the fastest candidate per layer with no reformat counted
    /// (layer-by-layer choice).
    pub layerwise_ms: f64,
    /// Seconds spent tuning.
    pub seconds: f64,
    /// The whole-engine check's race, when one ran ([`whole_engine`]).
    pub whole_engine: Option<whole_engine::EngineRace>,
    /// CPU builds: the intra-op thread count tactics were timed at (`--threads`); `None`:
    /// the global pool, one thread per core.
    pub threads: Option<usize>,
}

impl TuneReport {
    /// Layers the tuner put in INT8.
    pub fn int8_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.format.starts_with(Precision::Int8.name()))
            .count()
    }

    /// Layers the tuner put in the channels-last layout.
    pub fn channels_last_layers(&self) -> usize {
        let nhwc = Layout::ChannelsLast.name();
        self.layers
            .iter()
            .filter(|l| l.format.ends_with(&format!("/{nhwc}")))
            .count()
    }
}

/// Lists the tactics of a node for its input facts (a backend's offer).
pub type TacticLister<'a> = dyn Fn(&Node, &[Option<&Fact>]) -> Vec<Tactic> + 'a;

/// The CPU backend's offer: what each op lists, and both layouts for the elementwise layers
/// that run in either ([`layout`]).
pub fn cpu_tactics(node: &Node, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
    let offered = node.op.tactics(inputs);
    if offered.is_empty() && layout::is_layout_free(node, inputs) {
        return layout::tactics();
    }
    offered
}

fn matches_pin(node: &Node, name: &str) -> bool {
    node.name == name || node.fused_from.iter().any(|f| f == name)
}

/// Tunes `graph` in place: chooses and records a tactic per layer, inserts reformat layers.
/// Layers whose inputs are not fully known at build time keep their heuristic.
pub fn tune(
    graph: &mut Graph,
    settings: &TuneSettings,
    tactics_of: &TacticLister<'_>,
    timer: &mut dyn LayerTimer,
    cache: &mut TimingCache,
) -> Result<TuneReport> {
    let start = Instant::now();
    let mut report = TuneReport {
        level: settings.level,
        ..Default::default()
    };
    for name in settings.pins.keys() {
        if !graph.nodes.iter().any(|n| matches_pin(n, name)) {
            return Err(KilnError::Other(format!(
                "--layer-precision names layer `{name}`, which is not in the optimized graph (names of ONNX nodes and of fused layers are accepted)"
            )));
        }
    }
    // 1. Candidates per node.
    let mut tuned: Vec<(usize, Vec<Tactic>)> = Vec::new();
    for (ni, node) in graph.nodes.iter().enumerate() {
        let facts: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| i.map(|v| &graph.values[v].fact))
            .collect();
        let pin = settings
            .pins
            .iter()
            .find(|(name, _)| matches_pin(node, name))
            .map(|(_, p)| *p);
        let known = facts.iter().flatten().all(|f| {
            f.kind != ValueKind::Tensor || (f.dtype.is_some() && f.concrete_shape().is_some())
        });
        let offered = if known {
            tactics_of(node, &facts)
        } else {
            Vec::new()
        };
        if offered.is_empty() {
            if let Some(p) = pin.filter(|&p| p != Precision::Fp32) {
                return Err(KilnError::Other(format!(
                    "--layer-precision {}:{p}: layer `{}` ({}) runs only in fp32 on this backend",
                    node.name, node.name, node.desc.op_type
                )));
            }
            continue;
        }
        let allowed: Vec<Tactic> = offered
            .into_iter()
            .filter(|t| t.min_level <= settings.level.max(1))
            .filter(|t| settings.pools.contains(&t.format.precision))
            .filter(|t| pin.is_none_or(|p| t.format.precision == p))
            .filter(|t| settings.layouts || t.format.layout == Layout::Linear)
            .collect();
        if allowed.is_empty() {
            return Err(KilnError::Other(format!(
                "layer `{}` ({}) has no tactic in the allowed precisions {:?}{}",
                node.name,
                node.desc.op_type,
                settings.pools.iter().map(|p| p.name()).collect::<Vec<_>>(),
                pin.map_or(String::new(), |p| format!(" pinned to {p}"))
            )));
        }
        tuned.push((ni, allowed));
    }
    if settings.level == 0 {
        // Heuristics only: each op runs its first (preferred) tactic, nothing is timed.
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    // 2. Time every candidate (or read it from the cache).
    let constants = &graph.constants;
    let mut layers: Vec<Vec<Option_>> = Vec::new();
    let mut kept: Vec<(usize, Vec<Tactic>)> = Vec::new();
    for (ni, allowed) in tuned {
        let node = &graph.nodes[ni];
        let facts: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| i.map(|v| &graph.values[v].fact))
            .collect();
        let consts: Vec<Option<&kiln_core::Tensor>> = node
            .inputs
            .iter()
            .map(|i| i.and_then(|v| constants.get(&v)))
            .collect();
        let is_const: Vec<bool> = consts.iter().map(|c| c.is_some()).collect();
        let mut opts = Vec::new();
        let mut ok = Vec::new();
        let mut cands = Vec::new();
        for t in allowed {
            let key = cache::layer_key(node, &facts, &is_const, &t);
            let (time, cached) = match cache.get(&key) {
                Some(ms) => {
                    report.cache_hits += 1;
                    (Ok(ms), true)
                }
                None => {
                    report.timed += 1;
                    let r = timer.time_tactic(node, &facts, &consts, &t);
                    if let Ok(ms) = r {
                        cache.insert(key, ms);
                    }
                    (r, false)
                }
            };
            match time {
                Ok(ms) => {
                    tracing::debug!(layer = %node.name, tactic = %t.id, ms, cached, "timed");
                    cands.push(CandidateReport {
                        tactic: t.id.clone(),
                        format: t.format.to_string(),
                        time_ms: Some(ms),
                        dropped: None,
                        cached,
                    });
                    opts.push(Option_ {
                        format: t.format,
                        time: ms,
                    });
                    ok.push(t);
                }
                Err(e) => {
                    tracing::info!(layer = %node.name, tactic = %t.id, reason = %e, "candidate dropped");
                    cands.push(CandidateReport {
                        tactic: t.id.clone(),
                        format: t.format.to_string(),
                        time_ms: None,
                        dropped: Some(e.to_string()),
                        cached: false,
                    });
                }
            }
        }
        if ok.is_empty() {
            tracing::warn!(layer = %node.name, "every tactic failed; keeping the heuristic");
            continue;
        }
        report.layers.push(LayerTuning {
            layer: node.name.clone(),
            candidates: cands,
            chosen: String::new(),
            format: String::new(),
            time_ms: 0.0,
        });
        layers.push(opts);
        kept.push((ni, ok));
    }
    // 3. Choose over the graph.
    let (problem, edge_facts) = build_problem(graph, &kept, layers);
    let mut reformat_ms: HashMap<usize, f64> = HashMap::new();
    let mut cost = |e: usize, from: Format, to: Format| -> f64 {
        *reformat_ms.entry(e).or_insert_with(|| {
            let fact = &graph.values[edge_facts[e]].fact;
            let key = cache::reformat_key(fact, from, to);
            if let Some(ms) = cache.get(&key) {
                return ms;
            }
            match timer.time_reformat(fact, from, to) {
                Ok(ms) => {
                    cache.insert(key, ms);
                    ms
                }
                // A reformat that cannot run makes the mixed choice impossible.
                Err(_) => f64::INFINITY,
            }
        })
    };
    let solution = problem.solve(&mut cost);
    report.layerwise_ms = problem.greedy_cost();
    report.estimated_ms = solution.cost;
    // 4. Record the choices and rebuild the ops with them.
    let mut formats: HashMap<usize, Format> = HashMap::new();
    for (li, (ni, ok)) in kept.iter().enumerate() {
        let t = &ok[solution.choice[li]];
        let ms = problem.layers[li][solution.choice[li]].time;
        if t.format.precision == Precision::Int8 {
            // INT8 layers become kiln.Int8* ops with quantized weights.
            crate::int8::lower::lower_node(graph, *ni, &t.id)?;
            crate::int8::gpu::mark(&mut graph.nodes[*ni], &t.id);
        }
        let node = &mut graph.nodes[*ni];
        node.desc
            .attrs
            .insert(TACTIC_TIME_ATTR.into(), Attr::Float(ms as f32));
        if t.id == kiln_cuda::tune::DEFAULT_TACTIC {
            // The GPU backend's own float choice: nothing to record.
        } else if let Some(v) = kiln_cuda::tune::attr_value(&t.id) {
            // A GPU implementation: read by the CUDA backend's lowering, not by the op.
            node.desc.attrs.insert(
                kiln_cuda::library::GPU_TACTIC_ATTR.into(),
                Attr::String(v.into()),
            );
        } else {
            node.desc
                .attrs
                .insert(TACTIC_ATTR.into(), Attr::String(t.id.clone()));
            node.op = registry().build(&BuildCtx {
                node: &node.name,
                desc: &node.desc,
                n_inputs: node.inputs.len(),
                n_outputs: node.outputs.len(),
            })?;
        }
        formats.insert(*ni, t.format);
        let lt = &mut report.layers[li];
        lt.chosen = t.id.clone();
        lt.format = t.format.to_string();
        lt.time_ms = ms;
    }
    report.reformats = reformat::insert(graph, &formats)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The selection problem: one layer per kept node, an edge per tensor passed between
/// ends (engine inputs/outputs and untuned nodes are fixed FP32/linear ends); with it, the
/// value each edge carries.
fn build_problem(
    graph: &Graph,
    kept: &[(usize, Vec<Tactic>)],
    layers: Vec<Vec<Option_>>,
) -> (Problem, Vec<usize>) {
    let layer_of: HashMap<usize, usize> =
        kept.iter().enumerate().map(|(l, (n, _))| (*n, l)).collect();
    let producers = graph.producers();
    let consumers = graph.consumers();
    let end_of = |node: Option<usize>| match node.and_then(|n| layer_of.get(&n)) {
        Some(&l) => End::Layer(l),
        None => End::Fixed(Format::FP32_LINEAR),
    };
    let mut edges = Vec::new();
    let mut values = Vec::new();
    for (l, (ni, _)) in kept.iter().enumerate() {
        let node = &graph.nodes[*ni];
        for &v in node.inputs.iter().flatten() {
            if graph.constants.contains_key(&v) {
                continue; // weights are converted at build time, not reformatted per run
            }
            edges.push(Edge {
                from: end_of(producers[v]),
                to: End::Layer(l),
            });
            values.push(v);
        }
        for &v in node.outputs.iter().flatten() {
            let untuned = consumers[v].iter().any(|c| !layer_of.contains_key(c));
            if untuned || graph.is_output(v) {
                edges.push(Edge {
                    from: End::Layer(l),
                    to: End::Fixed(Format::FP32_LINEAR),
                });
                values.push(v);
            }
        }
    }
    (Problem { layers, edges }, values)
}
