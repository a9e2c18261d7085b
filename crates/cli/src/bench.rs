//! `kiln bench`: latency and throughput of a model.

use std::time::{Duration, Instant};

use kiln::{ExecutionContext, Value};
use kiln_cuda::GpuTiming;

use crate::common::{self, shape_str, CliError, CliResult, Globals};
use crate::stats::Latency;
use crate::BenchArgs;

/// When to stop a phase (warm-up or timing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopRule {
    /// Exactly this many iterations.
    Iterations(u64),
    /// Until this much time has passed (at least one iteration).
    Duration(Duration),
    /// Whichever of the two comes first (at least one iteration).
    FirstOf(u64, Duration),
    /// Until both are reached.
    BothOf(u64, Duration),
}

impl StopRule {
    /// True when a phase that has run `done` iterations in `elapsed` should stop.
    pub fn done(self, done: u64, elapsed: Duration) -> bool {
        match self {
            StopRule::Iterations(n) => done >= n,
            StopRule::Duration(d) => done >= 1 && elapsed >= d,
            StopRule::FirstOf(n, d) => done >= 1 && (done >= n || elapsed >= d),
            StopRule::BothOf(n, d) => done >= n && elapsed >= d,
        }
    }

    /// The warm-up rule for `--warmup`.
    pub fn warmup(n: Option<u64>) -> StopRule {
        match n {
            Some(n) => StopRule::Iterations(n),
            None => StopRule::FirstOf(10, Duration::from_secs(1)),
        }
    }

    /// The timing rule for `--iterations` / `--duration`.
    pub fn timing(iterations: Option<u64>, duration: Option<f64>) -> CliResult<StopRule> {
        match (iterations, duration) {
            (Some(n), _) => Ok(StopRule::Iterations(n)),
            (None, Some(s)) => {
                if !(s.is_finite() && s > 0.0 && s < 1e9) {
                    return Err(CliError(format!(
                        "--duration must be a positive number of seconds, got {s}"
                    )));
                }
                Ok(StopRule::Duration(Duration::from_secs_f64(s)))
            }
            (None, None) => Ok(StopRule::BothOf(10, Duration::from_secs(3))),
        }
    }
}

/// Runs iterations until `rule` says stop; returns each iteration's host latency in ms and,
/// for GPU engines, its CUDA-event timings.
fn phase(
    ctx: &mut ExecutionContext,
    inputs: &[(&str, Value)],
    rule: StopRule,
) -> CliResult<(Vec<f64>, Vec<GpuTiming>)> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut gpu = Vec::new();
    while !rule.done(samples.len() as u64, start.elapsed()) {
        let t = Instant::now();
        let out = ctx.execute(inputs)?;
        let dt = t.elapsed();
        drop(out);
        samples.push(dt.as_secs_f64() * 1e3);
        if let Some(g) = ctx.gpu_timing() {
            gpu.push(g);
        }
    }
    Ok((samples, gpu))
}

/// Per-layer profile: (layer, op, tactic, mean ms, share of the total), slowest first,
/// from 10 runs with CUDA events (GPU engines) or a monotonic clock (CPU engines) around
/// every layer.
type LayerProfile = (String, String, String, f64, f64);

fn profile_layers(
    ctx: &mut ExecutionContext,
    inputs: &[(&str, Value)],
) -> CliResult<Vec<LayerProfile>> {
    let layers = ctx.engine().layers();
    let rows: Vec<(String, String, String, f64)> = if ctx.engine().gpu().is_some() {
        ctx.set_gpu_profiling(true)?;
        for _ in 0..10 {
            ctx.execute(inputs)?;
        }
        let times = ctx.gpu_layer_times().unwrap_or_default();
        ctx.set_gpu_profiling(false)?;
        layers
            .into_iter()
            .zip(times)
            .map(|(l, t)| (l.name, l.op, l.tactic, t))
            .collect()
    } else {
        ctx.set_cpu_profiling(true)?;
        for _ in 0..10 {
            ctx.execute(inputs)?;
        }
        let times = ctx.cpu_layer_times().unwrap_or_default();
        ctx.set_cpu_profiling(false)?;
        // Tactics by layer name (a dynamic plan may run inlined layers the engine's list
        // does not have: "-").
        let tactic: std::collections::HashMap<String, String> =
            layers.into_iter().map(|l| (l.name, l.tactic)).collect();
        times
            .into_iter()
            .map(|t| {
                let tac = tactic.get(&t.name).cloned().unwrap_or_else(|| "-".into());
                (t.name, t.op, tac, t.mean_ms)
            })
            .collect()
    };
    let total: f64 = rows.iter().map(|r| r.3).sum::<f64>().max(1e-12);
    let mut v: Vec<LayerProfile> = rows
        .into_iter()
        .map(|(n, o, t, ms)| (n, o, t, ms, ms / total))
        .collect();
    v.sort_by(|a, b| b.3.total_cmp(&a.3));
    Ok(v)
}

/// The trtexec-style GPU metrics: name and per-iteration values (ms).
fn gpu_metrics(t: &[GpuTiming]) -> Vec<(&'static str, Latency)> {
    let col =
        |f: fn(&GpuTiming) -> f64| Latency::from_samples(&t.iter().map(f).collect::<Vec<_>>());
    vec![
        ("latency (H2D+compute+D2H)", col(|g| g.latency_ms)),
        ("GPU compute", col(|g| g.compute_ms)),
        ("enqueue", col(|g| g.enqueue_ms)),
        ("H2D", col(|g| g.h2d_ms)),
        ("D2H", col(|g| g.d2h_ms)),
    ]
}

fn json_key(name: &str) -> &'static str {
    match name {
        "latency (H2D+compute+D2H)" => "gpu_latency_ms",
        "GPU compute" => "gpu_compute_ms",
        "enqueue" => "enqueue_ms",
        "H2D" => "h2d_ms",
        _ => "d2h_ms",
    }
}

/// Runs `kiln bench`.
pub fn run(g: &Globals, a: BenchArgs) -> CliResult<()> {
    let shapes = common::merge_shapes(&a.shapes)?;
    let timing = StopRule::timing(a.iterations, a.duration)?;
    let warmup = StopRule::warmup(a.warmup);
    let given = common::read_inputs(&a.inputs)?;
    let loaded = common::load_model(g, &a.model, &shapes, &[], kiln::DeviceKind::Auto, true)?;
    let engine = loaded.engine;
    common::check_shape_names(&engine, &shapes)?;
    let mut ctx = engine.create_context();
    ctx.set_optimization_profile(a.optimization_profile)?;
    let shapes = common::with_profile_opt_shapes(&engine, &shapes, a.optimization_profile);
    let (inputs, generated) = common::bench_inputs(&engine, given, &shapes)?;
    // Refuses a shape outside the profile before any timing, naming the profile's range.
    for (name, t) in &inputs {
        ctx.set_input_shape(name, t.shape())?;
    }
    let values: Vec<(&str, Value)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), Value::Tensor(t.clone())))
        .collect();

    let threads = match a.threads {
        Some(n) => {
            ctx.set_threads(n as usize)?;
            n as usize
        }
        None => rayon::current_num_threads(),
    };
    let hint = |e: CliError| {
        if generated.is_empty() {
            e
        } else {
            CliError(format!(
                "{e} (inputs {} were filled with random values; pass --input NAME=FILE.npy for inputs that need meaningful data)",
                generated.join(", ")
            ))
        }
    };
    let pb = common::spinner(g, "warming up");
    let warm = phase(&mut ctx, &values, warmup).map_err(hint);
    pb.finish_and_clear();
    let (warm, _) = warm?;
    let sampler = if engine.gpu().is_some() {
        match kiln_cuda::monitor::Sampler::start(0, Duration::from_millis(100)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("no NVML sampling during the run: {e}");
                None
            }
        }
    } else {
        None
    };
    let pb = common::spinner(g, "timing");
    let start = Instant::now();
    let samples = phase(&mut ctx, &values, timing).map_err(hint);
    let wall = start.elapsed();
    pb.finish_and_clear();
    let nvml = sampler.map(|s| s.stop());
    let (samples, gpu_t) = samples?;
    // CPU engines have no device timings: no GPU rows.
    let metrics = if gpu_t.is_empty() {
        Vec::new()
    } else {
        gpu_metrics(&gpu_t)
    };
    let profile = if a.profile {
        profile_layers(&mut ctx, &values)?
    } else {
        Vec::new()
    };
    // The same timing with the layers replayed from a CUDA graph.
    let graph_metrics = if a.cuda_graph {
        ctx.set_cuda_graph(true)?;
        phase(&mut ctx, &values, warmup).map_err(hint)?;
        let (_, gt) = phase(&mut ctx, &values, timing).map_err(hint)?;
        ctx.set_cuda_graph(false)?;
        Some(gpu_metrics(&gt))
    } else {
        None
    };

    let lat = Latency::from_samples(&samples);
    let busy: f64 = samples.iter().sum::<f64>() / 1e3;
    let throughput = if busy > 0.0 {
        samples.len() as f64 / busy
    } else {
        f64::NAN
    };
    let batch = inputs.first().and_then(|(_, t)| t.shape().first().copied());
    if a.json {
        let shapes_json: serde_json::Map<String, serde_json::Value> = inputs
            .iter()
            .map(|(n, t)| (n.clone(), serde_json::json!(t.shape())))
            .collect();
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "device": engine.device(),
            "threads": threads,
            "iterations": samples.len(),
            "latency_ms": lat.to_json(),
            "throughput_per_s": throughput,
            "inputs": shapes_json,
        });
        let mut v = v;
        if !gpu_t.is_empty() {
            let gpu = engine.gpu().expect("GPU timings come from GPU engines");
            v["gpu"] = serde_json::json!({
                "name": gpu.info().name,
                "precision": if gpu.options().fp16 { "fp16" } else if gpu.options().tf32 { "tf32" } else { "fp32" },
                "fallback_layers": gpu.fallbacks(),
                "nvml": nvml,
            });
            for (name, l) in &metrics {
                v[json_key(name)] = l.to_json();
            }
            let median = metrics[0].1.median;
            v["gpu_throughput_per_s"] = serde_json::json!(1e3 / median);
        }
        if let Some(m) = &graph_metrics {
            let mut o = serde_json::Map::new();
            for (name, l) in m {
                o.insert(json_key(name).into(), l.to_json());
            }
            v["cuda_graph"] = serde_json::Value::Object(o);
        }
        if a.profile {
            v["profile"] = serde_json::json!(profile
                .iter()
                .map(|p| serde_json::json!({"layer": p.0, "op": p.1, "tactic": p.2, "ms": p.3, "share": p.4}))
                .collect::<Vec<_>>());
        }
        // One line: easy to append to a log of runs (JSON Lines).
        println!("{v}");
        return Ok(());
    }
    println!("model       {}", a.model.display());
    println!(
        "device      {} ({})",
        engine.device(),
        engine.fingerprint().device
    );
    println!("threads     {threads}");
    for (n, t) in &inputs {
        let origin = if generated.contains(n) {
            "random"
        } else {
            "from file"
        };
        println!(
            "input       {n} {}{} ({origin})",
            t.dtype(),
            shape_str(t.shape())
        );
    }
    println!("warm-up     {} iterations", warm.len());
    println!(
        "timed       {} iterations in {:.2} s",
        samples.len(),
        wall.as_secs_f64()
    );
    let rows = vec![
        vec![
            "latency (ms)".to_string(),
            "min".into(),
            "median".into(),
            "mean".into(),
            "p90".into(),
            "p95".into(),
            "p99".into(),
            "max".into(),
        ],
        std::iter::once(String::new())
            .chain(
                [
                    lat.min, lat.median, lat.mean, lat.p90, lat.p95, lat.p99, lat.max,
                ]
                .iter()
                .map(|v| format!("{v:.3}")),
            )
            .collect(),
    ];
    let mut rows = rows;
    let graph_rows = graph_metrics
        .iter()
        .flatten()
        .map(|(name, l)| (format!("{name}, CUDA graph"), l));
    let plain_rows = metrics.iter().map(|(name, l)| (name.to_string(), l));
    for (name, l) in plain_rows.chain(graph_rows) {
        rows.push(
            std::iter::once(format!("{name} (ms)"))
                .chain(
                    [l.min, l.median, l.mean, l.p90, l.p95, l.p99, l.max]
                        .iter()
                        .map(|v| format!("{v:.3}")),
                )
                .collect(),
        );
    }
    print!("{}", common::table(&rows));
    if let Some(n) = &nvml {
        println!(
            "nvml        {} samples: GPU util {:.0}%, SM clock {:.0} MHz, memory used {} MiB, power {:.0} W",
            n.samples,
            n.avg_gpu_util_pct,
            n.avg_sm_clock_mhz,
            n.max_mem_used_bytes >> 20,
            n.avg_power_w
        );
    }
    if let Some(gpu) = engine.gpu() {
        println!(
            "gpu         {} layers on the CPU (fallback)",
            gpu.fallbacks()
        );
    }
    if !profile.is_empty() {
        let mut rows = vec![vec![
            "slowest layers".to_string(),
            "op".into(),
            "tactic".into(),
            "ms".into(),
            "share".into(),
        ]];
        for p in profile.iter().take(15) {
            rows.push(vec![
                p.0.clone(),
                p.1.clone(),
                p.2.clone(),
                format!("{:.4}", p.3),
                format!("{:.1}%", p.4 * 100.0),
            ]);
        }
        print!("{}", common::table(&rows));
    }
    match batch {
        Some(b) if b > 1 => println!(
            "throughput  {throughput:.2} inferences/s (batch {b}: {:.2} samples/s)",
            throughput * b as f64
        ),
        Some(b) => println!("throughput  {throughput:.2} inferences/s (batch {b})"),
        None => println!("throughput  {throughput:.2} inferences/s"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_rules() {
        let s = Duration::from_secs;
        let w = StopRule::warmup(None);
        assert!(!w.done(0, s(5)));
        assert!(w.done(10, s(0)));
        assert!(w.done(1, s(1)));
        assert!(!w.done(3, Duration::from_millis(10)));
        assert!(StopRule::warmup(Some(0)).done(0, s(0)));
        let t = StopRule::timing(None, None).unwrap();
        assert!(!t.done(100, s(2)));
        assert!(!t.done(5, s(10)));
        assert!(t.done(10, s(3)));
        let t = StopRule::timing(Some(7), None).unwrap();
        assert!(!t.done(6, s(100)) && t.done(7, s(0)));
        let t = StopRule::timing(None, Some(0.5)).unwrap();
        assert!(!t.done(0, s(1)) && !t.done(3, Duration::from_millis(100)) && t.done(1, s(1)));
        assert!(StopRule::timing(None, Some(-1.0)).is_err());
        assert!(StopRule::timing(None, Some(f64::NAN)).is_err());
        assert!(StopRule::timing(None, Some(0.0)).is_err());
    }
}
