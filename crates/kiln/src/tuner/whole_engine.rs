//! The whole-engine check: the tuner chooses INT8 layers from per-layer and per-edge
//! timings, but those do not always add up to the engine's time (launch gaps, caches warmed
//! differently, reformats measured alone). So when tuning put any layer in INT8, the builder
//! also tunes the same graph without the INT8 pool, runs both engines end to end on their
//! device, interleaved, on the same seeded inputs, and keeps the tuned engine only when it is
//! at least [`MIN_GAIN`] faster; otherwise the float engine (which is also the more accurate
//! one) is kept. The race is recorded in the tuning report ([`EngineRace`]).
//!
//! The same check guards the CPU's channels-last layouts ([`Check::Layouts`]): when tuning
//! put layers in `fp32/nhwc`, an engine tuned in the linear layout only is raced against it
//! (a layer timed alone reads hot inputs; in the engine its Transposes and its neighbours
//! decide).
//!
//! GPU engines are timed by CUDA events around the layers (the compute time, what `kiln
//! bench` reports as GPU compute); CPU engines by a monotonic clock around the run.

use std::time::{Duration, Instant};

use kiln_core::{Fact, KilnError, Precision, Result, Value};
use serde::Serialize;

use super::timer::{random_input, LayerTimer};
use crate::config::BuilderConfig;
use crate::Engine;

/// How much faster (relative) the tuned mixed-precision engine must run than the float one
/// to be kept: below that the difference is within run-to-run noise, and the float engine
/// is the more accurate.
pub const MIN_GAIN: f64 = 0.02;

/// Which engine the check kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// The tuned engine, with its INT8 (or channels-last) layers.
    Tuned,
    /// The engine tuned without the INT8 pool (or in the linear layout only).
    Float,
}

/// What a race checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// INT8 layers against the engine tuned without the INT8 pool.
    #[default]
    Int8,
    /// Channels-last layers against the engine tuned in the linear layout only.
    Layouts,
}

/// One whole-engine race, as the tuning report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EngineRace {
    /// INT8 layers in the tuned engine.
    pub int8_layers: usize,
    /// Median time (ms) of the tuned engine.
    pub tuned_ms: f64,
    /// Median time (ms) of the float-only engine.
    pub float_ms: f64,
    /// Timed runs of each engine.
    pub rounds: usize,
    /// What was timed: `gpu compute (CUDA events)` or `cpu wall clock`.
    pub clock: String,
    /// The engine kept.
    pub kept: Kept,
    /// What was raced.
    #[serde(default)]
    pub check: Check,
    /// When the float engine was kept: the tuned engine's own tuning report (its INT8
    /// candidates and choices), which the kept engine's report no longer shows.
    pub tuned: Option<Box<super::TuneReport>>,
}

/// Whether a build with `config` runs the check (when its tuning then puts layers in INT8):
/// INT8 allowed, timed tuning (opt level ≥ 1), static shapes (no optimization profiles),
/// no layer pinned to INT8 (a pin is the user's choice, not the tuner's), and not turned off.
pub fn applies(config: &BuilderConfig) -> bool {
    config.int8
        && applies_to_layouts(config)
        && !config
            .layer_precision
            .values()
            .any(|&p| p == Precision::Int8)
}

/// Whether a build with `config` races an engine with channels-last layers against one in
/// the linear layout (when its tuning then chooses any): timed tuning, static shapes, not
/// turned off.
pub fn applies_to_layouts(config: &BuilderConfig) -> bool {
    config.engine_check
        && config.opt_level >= 1
        && config.profiles.is_empty()
        && !config.observe_activations
}

/// True when the tuned engine's time beats the float engine's by at least [`MIN_GAIN`].
pub fn tuned_wins(tuned_ms: f64, float_ms: f64) -> bool {
    tuned_ms.is_finite() && tuned_ms <= float_ms * (1.0 - MIN_GAIN)
}

/// Runs `[tuned, float]` end to end, interleaved (the order alternates per round), on the
/// same seeded random inputs, for about `budget` after 2–20 warm-up runs each (at least 5
/// and at most 50 rounds), each engine in its own execution context with `threads`
/// intra-op threads when given ([`crate::ExecutionContext::set_threads`]). Returns the
/// medians; `kept` is decided by [`tuned_wins`].
pub fn race(
    engines: [&Engine; 2],
    int8_layers: usize,
    budget: Duration,
    threads: Option<usize>,
) -> Result<EngineRace> {
    let [tuned, float] = engines;
    let mut inputs: Vec<(String, Value)> = Vec::new();
    for (i, io) in tuned.inputs().iter().enumerate() {
        let fact = Fact {
            kind: io.kind,
            dtype: io.dtype,
            shape: io.shape.clone(),
            konst: None,
        };
        let t = random_input(&fact, 0x9e37_79b9 + i as u64).map_err(|e| {
            KilnError::Other(format!(
                "whole-engine check: input `{}` ({}): {e}",
                io.name,
                io.describe()
            ))
        })?;
        inputs.push((io.name.clone(), Value::Tensor(t)));
    }
    let refs: Vec<(&str, Value)> = inputs
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let mut contexts = [tuned.create_context(), float.create_context()];
    if let Some(n) = threads {
        for ctx in &mut contexts {
            ctx.set_threads(n)?;
        }
    }
    let gpu = tuned.gpu().is_some();
    let mut run = |which: usize| -> Result<f64> {
        let ctx = &mut contexts[which];
        let start = Instant::now();
        ctx.execute(&refs)?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        Ok(ctx.gpu_timing().map_or(wall, |t| t.compute_ms))
    };
    // Warm-up: two runs each, then more (up to 20 each, about a tenth of the budget) so a
    // GPU's clocks and caches settle before timing.
    let mut first = [0.0; 2];
    for _ in 0..2 {
        for (which, f) in first.iter_mut().enumerate() {
            *f = run(which)?;
        }
    }
    let per_round = (first[0] + first[1]).max(1e-3);
    let warm = ((0.1 * budget.as_secs_f64() * 1e3 / per_round) as usize).min(18);
    for _ in 0..warm {
        run(0)?;
        run(1)?;
    }
    let rounds = ((budget.as_secs_f64() * 1e3 / per_round) as usize).clamp(5, 50);
    let mut times = [Vec::with_capacity(rounds), Vec::with_capacity(rounds)];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            times[which].push(run(which)?);
        }
    }
    let [tuned_ms, float_ms] = times.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    });
    Ok(EngineRace {
        int8_layers,
        tuned_ms,
        float_ms,
        rounds,
        clock: if gpu {
            "gpu compute (CUDA events)".into()
        } else {
            "cpu wall clock".into()
        },
        kept: if tuned_wins(tuned_ms, float_ms) {
            Kept::Tuned
        } else {
            Kept::Float
        },
        check: Check::Int8,
        tuned: None,
    })
}

/// Races `tuned` against `float` through `timer` ([`LayerTimer::race_engines`]) and returns
/// the engine to keep, its tuning report carrying the race. A timer that does not race
/// keeps `tuned`; a race that fails (an engine that cannot run on random inputs) keeps
/// `tuned` with a warning, since both engines passed the build.
pub fn keep_faster(
    tuned: Engine,
    float: Engine,
    timer: &mut dyn LayerTimer,
    check: Check,
) -> Result<Engine> {
    let mut race = match timer.race_engines([&tuned, &float]) {
        None => return Ok(tuned),
        Some(Err(e)) => {
            tracing::warn!("whole-engine check skipped: {e}");
            return Ok(tuned);
        }
        Some(Ok(race)) => {
            // The decision is made here, whatever the timer reported.
            let mut race = race;
            race.kept = if tuned_wins(race.tuned_ms, race.float_ms) {
                Kept::Tuned
            } else {
                Kept::Float
            };
            race.check = check;
            race
        }
    };
    tracing::info!(
        check = ?race.check,
        int8_layers = race.int8_layers,
        tuned_ms = race.tuned_ms,
        float_ms = race.float_ms,
        rounds = race.rounds,
        kept = ?race.kept,
        "whole-engine check"
    );
    let keep = match race.kept {
        Kept::Tuned => tuned,
        Kept::Float => {
            race.tuned = tuned.tuning_report().cloned().map(Box::new);
            float
        }
    };
    let mut report = keep.tuning_report().cloned().unwrap_or_default();
    report.whole_engine = Some(race);
    Ok(keep.with_tuning(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuned_engine_must_win_by_the_margin() {
        assert!(tuned_wins(0.90, 1.0));
        assert!(tuned_wins(0.98, 1.0));
        assert!(!tuned_wins(0.99, 1.0));
        assert!(!tuned_wins(1.2, 1.0));
        assert!(!tuned_wins(f64::NAN, 1.0));
        assert!(!tuned_wins(f64::INFINITY, 1.0));
    }

    #[test]
    fn applies_only_to_timed_int8_builds_without_int8_pins() {
        let mut c = BuilderConfig {
            int8: true,
            ..Default::default()
        };
        assert!(applies(&c));
        c.engine_check = false;
        assert!(!applies(&c));
        c.engine_check = true;
        c.opt_level = 0;
        assert!(!applies(&c));
        c.opt_level = 3;
        c.layer_precision.insert("conv".into(), Precision::Fp32);
        assert!(applies(&c), "an FP32 pin leaves the choice to the tuner");
        c.layer_precision.insert("conv".into(), Precision::Int8);
        assert!(!applies(&c));
        c.layer_precision.clear();
        c.int8 = false;
        assert!(!applies(&c));
    }
}
