//! The tuner's decisions with an injected deterministic timer, so each test knows which
//! choice is right: winners recorded in the plan, the timing cache (warm builds time
//! nothing; another device's cache is ignored), precision pools and pins, and reformat
//! layers inserted between layers of different precisions — the engine still computes the
//! model's function (checked against ONNX Runtime's outputs).

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;

use kiln::tuner::{self, LayerTimer};
use kiln::{parse_shapes, Builder, BuilderConfig, Runtime};
use kiln_core::{Fact, Format, Layout, Node, Precision, Result, Tactic, Tensor};

const FP16: Format = Format {
    precision: Precision::Fp16,
    layout: Layout::Linear,
};

/// Times from a rule, counting calls.
struct FakeTimer<F: Fn(&Node, &Tactic) -> f64> {
    rule: F,
    reformat_ms: f64,
    calls: Cell<usize>,
}

impl<F: Fn(&Node, &Tactic) -> f64> LayerTimer for FakeTimer<F> {
    fn time_tactic(
        &mut self,
        node: &Node,
        _inputs: &[Option<&Fact>],
        _constants: &[Option<&Tensor>],
        tactic: &Tactic,
    ) -> Result<f64> {
        self.calls.set(self.calls.get() + 1);
        Ok((self.rule)(node, tactic))
    }
    fn time_reformat(&mut self, _fact: &Fact, _from: Format, _to: Format) -> Result<f64> {
        Ok(self.reformat_ms)
    }
}

fn orientation() -> Option<(common::Case, BuilderConfig)> {
    let assets = common::assets()?;
    let case = common::case(&assets, "orientation_b1");
    let config = BuilderConfig {
        shapes: parse_shapes(&case.shapes).unwrap(),
        ..Default::default()
    };
    Some((case, config))
}

fn tactic_of(engine: &kiln::Engine, layer: &str) -> String {
    engine
        .layers()
        .into_iter()
        .find(|l| l.name == layer)
        .unwrap_or_else(|| panic!("layer {layer}"))
        .tactic
}

/// Runs `engine` on the case's inputs, checks the output against ONNX Runtime's (relative
/// L2 below `tol`), saves it as `plan`, and checks the loaded plan gives the same output bit
/// for bit. Returns the loaded engine.
fn matches_ort_through_a_plan(
    engine: &kiln::Engine,
    case: &common::Case,
    plan: &str,
    tol: f64,
) -> kiln::Engine {
    let out = engine
        .create_context()
        .execute(&common::named(&case.inputs))
        .unwrap();
    let err = common::rel_l2(out[0].as_tensor().unwrap(), &case.outputs[0].1);
    assert!(err < tol, "rel L2 {err}");
    let plan = temp(plan);
    engine.save(&plan).unwrap();
    let loaded = Runtime::load(&plan).unwrap();
    let out2 = loaded
        .create_context()
        .execute(&common::named(&case.inputs))
        .unwrap();
    assert!(out2[0]
        .as_tensor()
        .unwrap()
        .same_as(out[0].as_tensor().unwrap()));
    loaded
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-tuning-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_fastest_tactic_wins_and_travels_in_the_plan() {
    let Some((case, config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    // The largest im2col tile with inner threading is "fastest" wherever it is offered.
    let mut timer = FakeTimer {
        rule: |_n: &Node, t: &Tactic| {
            if t.id == "cpu.conv.im2col_gemm.t262144.inner" {
                0.5
            } else {
                1.0 + t.id.len() as f64 * 1e-3
            }
        },
        reformat_ms: 0.0,
        calls: Cell::new(0),
    };
    let engine = Builder::new()
        .build_onnx_file_with(&case.model, &config, &tuner::cpu_tactics, &mut timer)
        .unwrap();
    assert!(timer.calls.get() > 0);
    let report = engine.tuning_report().unwrap();
    assert!(!report.layers.is_empty());
    for l in &report.layers {
        let offered = l
            .candidates
            .iter()
            .any(|c| c.tactic == "cpu.conv.im2col_gemm.t262144.inner");
        if offered {
            assert_eq!(
                l.chosen, "cpu.conv.im2col_gemm.t262144.inner",
                "{}",
                l.layer
            );
        } else {
            // Otherwise the shortest id (the rule's tie-break) wins.
            let best = l.candidates.iter().min_by_key(|c| c.tactic.len()).unwrap();
            assert_eq!(l.chosen, best.tactic, "{}", l.layer);
        }
        assert_eq!(tactic_of(&engine, &l.layer), l.chosen);
    }
    // The choice survives a plan round trip, and the tuned engine still matches ORT.
    let plan = temp("fastest.plan");
    engine.save(&plan).unwrap();
    let loaded = Runtime::load(&plan).unwrap();
    for l in &report.layers {
        assert_eq!(tactic_of(&loaded, &l.layer), l.chosen);
    }
    let out = loaded
        .create_context()
        .execute(&common::named(&case.inputs))
        .unwrap();
    let err = common::rel_l2(out[0].as_tensor().unwrap(), &case.outputs[0].1);
    assert!(err < 1e-4, "rel L2 {err}");
}

#[test]
fn a_warm_timing_cache_times_nothing_and_another_device_is_ignored() {
    let Some((case, mut config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    let path = temp("cache.json");
    let _ = std::fs::remove_file(&path);
    config.timing_cache = Some(path.clone());
    let rule = |_n: &Node, t: &Tactic| 1.0 + (t.id.len() % 7) as f64;
    let build = |timer: &mut FakeTimer<_>| {
        Builder::new()
            .build_onnx_file_with(&case.model, &config, &tuner::cpu_tactics, timer)
            .unwrap()
    };
    let mut cold = FakeTimer {
        rule,
        reformat_ms: 0.0,
        calls: Cell::new(0),
    };
    let a = build(&mut cold);
    assert!(cold.calls.get() > 0);
    let mut warm = FakeTimer {
        rule,
        reformat_ms: 0.0,
        calls: Cell::new(0),
    };
    let b = build(&mut warm);
    assert_eq!(warm.calls.get(), 0, "a warm cache must not time anything");
    assert_eq!(b.tuning_report().unwrap().timed, 0);
    assert!(b.tuning_report().unwrap().cache_hits > 0);
    for l in &a.tuning_report().unwrap().layers {
        assert_eq!(tactic_of(&b, &l.layer), l.chosen);
    }
    // The same file claimed by another device: ignored (warning), everything timed again.
    let text = std::fs::read_to_string(&path).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let device = j["device"].as_str().unwrap().to_string();
    std::fs::write(&path, text.replace(&device, "cuda|some other GPU|x86_64|")).unwrap();
    let mut other = FakeTimer {
        rule,
        reformat_ms: 0.0,
        calls: Cell::new(0),
    };
    build(&mut other);
    assert_eq!(other.calls.get(), cold.calls.get());
    // A build for another thread count (`--threads`) does not take the default build's
    // times: they were measured with another number of cores working.
    config.threads = Some(1);
    let mut one_thread = FakeTimer {
        rule,
        reformat_ms: 0.0,
        calls: Cell::new(0),
    };
    let c = Builder::new()
        .build_onnx_file_with(&case.model, &config, &tuner::cpu_tactics, &mut one_thread)
        .unwrap();
    assert_eq!(one_thread.calls.get(), cold.calls.get());
    assert_eq!(c.tuning_report().unwrap().threads, Some(1));
    assert_eq!(a.tuning_report().unwrap().threads, None);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("|threads=1"),
        "the cache file names its thread count"
    );
}

#[test]
fn opt_level_zero_times_nothing_and_levels_widen_the_search() {
    let Some((case, mut config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    let mut calls = Vec::new();
    for level in [0u8, 1, 2, 4] {
        config.opt_level = level;
        let mut t = FakeTimer {
            rule: |_n: &Node, _t: &Tactic| 1.0,
            reformat_ms: 0.0,
            calls: Cell::new(0),
        };
        let e = Builder::new()
            .build_onnx_file_with(&case.model, &config, &tuner::cpu_tactics, &mut t)
            .unwrap();
        if level == 0 {
            assert!(e.layers().iter().all(|l| l.tactic_time_ms.is_none()));
        }
        calls.push(t.calls.get());
    }
    assert_eq!(calls[0], 0);
    assert!(
        calls[0] < calls[1] && calls[1] < calls[2] && calls[2] < calls[3],
        "{calls:?}"
    );
}

/// Offers an FP16 twin of every CPU tactic (the CPU kernels accept F16 tensors), so the
/// graph-level choice between precisions can be exercised on this machine.
fn with_fp16_twins(node: &Node, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
    let mut v = tuner::cpu_tactics(node, inputs);
    let twins: Vec<Tactic> = v
        .iter()
        .map(|t| Tactic {
            format: FP16,
            ..t.clone()
        })
        .collect();
    v.extend(twins);
    v
}

fn fp16_build(
    case: &common::Case,
    config: &BuilderConfig,
    fast_fp16_layer: &'static str,
    reformat_ms: f64,
) -> kiln::Engine {
    let mut timer = FakeTimer {
        rule: move |n: &Node, t: &Tactic| match (t.format.precision, n.name == fast_fp16_layer) {
            (Precision::Fp16, true) => 0.1,
            (Precision::Fp16, false) => 2.0,
            _ => 1.0,
        },
        reformat_ms,
        calls: Cell::new(0),
    };
    Builder::new()
        .build_onnx_file_with(&case.model, config, &with_fp16_twins, &mut timer)
        .unwrap()
}

#[test]
fn reformat_layers_are_inserted_only_when_they_pay() {
    let Some((case, mut config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    config.fp16 = true;
    // Cheap reformats: the one layer that is faster in FP16 runs in FP16, between reformats.
    let mixed = fp16_build(&case, &config, "Conv.3", 0.01);
    let layers = mixed.layers();
    let conv = layers.iter().find(|l| l.name == "Conv.3").unwrap();
    assert_eq!(conv.precision, "fp16");
    let reformats: Vec<_> = layers.iter().filter(|l| l.reformat).collect();
    assert!(reformats.len() >= 2, "{reformats:?}");
    assert!(layers
        .iter()
        .filter(|l| !l.reformat && l.name != "Conv.3" && l.tactic_time_ms.is_some())
        .all(|l| l.precision == "fp32"));
    assert_eq!(mixed.tuning_report().unwrap().reformats, reformats.len());
    // It still computes the model: FP16 rounding in one layer, FP16-sized error at most;
    // through a plan file too.
    matches_ort_through_a_plan(&mixed, &case, "mixed.plan", 1e-2);

    // Expensive reformats: FP16 does not pay for them, everything stays FP32.
    let uniform = fp16_build(&case, &config, "Conv.3", 50.0);
    assert!(uniform
        .layers()
        .iter()
        .all(|l| !l.reformat && l.precision == "fp32"));

    // A pin overrides the timing: Conv.3 pinned to FP32 stays FP32 even with cheap reformats.
    config.layer_precision = BTreeMap::from([("Conv.3".to_string(), Precision::Fp32)]);
    let pinned = fp16_build(&case, &config, "Conv.3", 0.01);
    assert!(pinned
        .layers()
        .iter()
        .all(|l| !l.reformat && l.precision == "fp32"));
}

#[test]
fn pools_follow_the_flags() {
    assert_eq!(tuner::pools(false, false).unwrap(), vec![Precision::Fp32]);
    assert_eq!(
        tuner::pools(true, false).unwrap(),
        vec![Precision::Fp16, Precision::Fp32]
    );
    assert_eq!(
        tuner::pools(false, true).unwrap(),
        vec![Precision::Int8, Precision::Fp32]
    );
    assert_eq!(
        tuner::pools(true, true).unwrap(),
        vec![Precision::Int8, Precision::Fp16, Precision::Fp32]
    );
    // Without --fp16 the FP16 twins are never considered.
    let Some((case, config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    let e = fp16_build(&case, &config, "Conv.3", 0.01);
    assert!(e.layers().iter().all(|l| l.precision == "fp32"));
}

#[test]
fn engines_with_profiles_are_tuned_at_the_opt_shape() {
    let Some((case, _)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    let shapes = |s: &str| parse_shapes(s).unwrap();
    let config = BuilderConfig {
        profiles: vec![kiln::OptimizationProfile::new(
            shapes("x:1x3x224x224"),
            shapes("x:2x3x224x224"),
            shapes("x:4x3x224x224"),
        )
        .unwrap()],
        ..Default::default()
    };
    let seen_batch = Cell::new(0usize);
    let mut timer = FakeTimer {
        rule: |_n: &Node, t: &Tactic| {
            if t.id.ends_with(".outer") {
                0.5
            } else {
                1.0
            }
        },
        reformat_ms: 0.0,
        calls: Cell::new(0),
    };
    struct Spy<'a, T: LayerTimer>(&'a mut T, &'a Cell<usize>);
    impl<T: LayerTimer> LayerTimer for Spy<'_, T> {
        fn time_tactic(
            &mut self,
            node: &Node,
            inputs: &[Option<&Fact>],
            constants: &[Option<&Tensor>],
            tactic: &Tactic,
        ) -> Result<f64> {
            if let Some(s) = inputs[0].and_then(|f| f.concrete_shape()) {
                self.1.set(s[0]);
            }
            self.0.time_tactic(node, inputs, constants, tactic)
        }
        fn time_reformat(&mut self, fact: &Fact, from: Format, to: Format) -> Result<f64> {
            self.0.time_reformat(fact, from, to)
        }
    }
    let engine = Builder::new()
        .build_onnx_file_with(
            &case.model,
            &config,
            &tuner::cpu_tactics,
            &mut Spy(&mut timer, &seen_batch),
        )
        .unwrap();
    assert!(timer.calls.get() > 0, "nothing was timed");
    assert_eq!(seen_batch.get(), 2, "timed at the opt batch");
    let report = engine.tuning_report().unwrap();
    assert!(!report.layers.is_empty());
    // At batch 2 every non-1x1 conv offers an `outer` tactic, which the rule prefers.
    assert!(report
        .layers
        .iter()
        .any(|l| l.chosen.ends_with(".outer") && tactic_of(&engine, &l.layer) == l.chosen));
    // The engine still accepts the profile's range and matches ORT at batch 1.
    let out = engine
        .create_context()
        .execute(&common::named(&case.inputs))
        .unwrap();
    let err = common::rel_l2(out[0].as_tensor().unwrap(), &case.outputs[0].1);
    assert!(err < 1e-4, "rel L2 {err}");
}

/// Builds orientation with channels-last tactics twice as fast as the rest and every
/// reformat costing `reformat_ms`.
fn channels_last_build(
    case: &common::Case,
    config: &BuilderConfig,
    reformat_ms: f64,
) -> kiln::Engine {
    let mut timer = FakeTimer {
        rule: |_n: &Node, t: &Tactic| {
            if t.format.layout == Layout::ChannelsLast {
                0.5
            } else {
                1.0
            }
        },
        reformat_ms,
        calls: Cell::new(0),
    };
    Builder::new()
        .build_onnx_file_with(&case.model, config, &tuner::cpu_tactics, &mut timer)
        .unwrap()
}

#[test]
fn channels_last_runs_take_transposes_only_at_their_ends() {
    let Some((case, config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    let engine = channels_last_build(&case, &config, 0.01);
    let report = engine.tuning_report().unwrap();
    let offered: Vec<_> = report
        .layers
        .iter()
        .filter(|l| l.candidates.iter().any(|c| c.format == "fp32/nhwc"))
        .collect();
    assert!(offered.len() >= 20, "{} layers offer nhwc", offered.len());
    for l in &offered {
        assert_eq!(l.format, "fp32/nhwc", "{}", l.layer);
        assert!(l.chosen.contains(".nhwc"), "{}: {}", l.layer, l.chosen);
    }
    // Runs of channels-last layers pass their tensors on directly: far fewer Transposes
    // than channels-last layers, each one a reformat layer.
    let layers = engine.layers();
    let transposes: Vec<_> = layers.iter().filter(|l| l.op == "Transpose").collect();
    assert!(!transposes.is_empty());
    assert!(transposes.iter().all(|l| l.reformat), "{transposes:?}");
    assert!(
        transposes.len() * 2 < offered.len(),
        "{} transposes for {} channels-last layers",
        transposes.len(),
        offered.len()
    );
    assert_eq!(report.reformats, transposes.len());
    // The engine computes the model (checked against ONNX Runtime), from a plan file too.
    let loaded = matches_ort_through_a_plan(&engine, &case, "nhwc.plan", 1e-4);
    for l in &offered {
        assert_eq!(tactic_of(&loaded, &l.layer), l.chosen);
    }

    // Transposes dearer than what the layers gain: everything stays linear.
    let linear = channels_last_build(&case, &config, 100.0);
    let all_linear = |e: &kiln::Engine| {
        e.layers()
            .iter()
            .all(|l| l.op != "Transpose" && !l.tactic.contains(".nhwc."))
    };
    assert!(all_linear(&linear));
    // Engines with optimization profiles take no reformat layers: no channels-last layer.
    let shapes = |s: &str| parse_shapes(s).unwrap();
    let profiled = BuilderConfig {
        profiles: vec![kiln::OptimizationProfile::new(
            shapes("x:1x3x224x224"),
            shapes("x:1x3x224x224"),
            shapes("x:2x3x224x224"),
        )
        .unwrap()],
        ..Default::default()
    };
    assert!(all_linear(&channels_last_build(&case, &profiled, 0.01)));
}

/// [`FakeTimer`]'s choices, raced end to end with made-up engine times.
struct RacingTimer<T: LayerTimer> {
    inner: T,
    tuned_ms: f64,
    other_ms: f64,
    raced: usize,
}

impl<T: LayerTimer> LayerTimer for RacingTimer<T> {
    fn time_tactic(
        &mut self,
        node: &Node,
        inputs: &[Option<&Fact>],
        constants: &[Option<&Tensor>],
        tactic: &Tactic,
    ) -> Result<f64> {
        self.inner.time_tactic(node, inputs, constants, tactic)
    }
    fn time_reformat(&mut self, fact: &Fact, from: Format, to: Format) -> Result<f64> {
        self.inner.time_reformat(fact, from, to)
    }
    fn race_engines(
        &mut self,
        [tuned, linear]: [&kiln::Engine; 2],
    ) -> Option<Result<kiln::tuner::whole_engine::EngineRace>> {
        let nhwc = |e: &kiln::Engine| e.tuning_report().unwrap().channels_last_layers();
        assert!(nhwc(tuned) > 0);
        assert_eq!(nhwc(linear), 0);
        assert!(linear.layers().iter().all(|l| l.op != "Transpose"));
        self.raced += 1;
        Some(Ok(kiln::tuner::whole_engine::EngineRace {
            int8_layers: 0,
            tuned_ms: self.tuned_ms,
            float_ms: self.other_ms,
            rounds: 5,
            clock: "test".into(),
            // Deliberately wrong: the builder decides from the times.
            kept: kiln::tuner::whole_engine::Kept::Float,
            check: kiln::tuner::whole_engine::Check::Int8,
            tuned: None,
        }))
    }
}

#[test]
fn the_whole_engine_check_keeps_channels_last_only_when_it_pays_end_to_end() {
    use kiln::tuner::whole_engine::{Check, Kept};
    let Some((case, config)) = orientation() else {
        panic!("the tuning tests need the assets (cargo xtask fetch-assets)");
    };
    for (tuned_ms, other_ms, kept) in [(1.0, 1.5, Kept::Tuned), (1.0, 1.01, Kept::Float)] {
        let mut timer = RacingTimer {
            inner: FakeTimer {
                rule: |_n: &Node, t: &Tactic| {
                    if t.format.layout == Layout::ChannelsLast {
                        0.5
                    } else {
                        1.0
                    }
                },
                reformat_ms: 0.01,
                calls: Cell::new(0),
            },
            tuned_ms,
            other_ms,
            raced: 0,
        };
        let engine = Builder::new()
            .build_onnx_file_with(&case.model, &config, &tuner::cpu_tactics, &mut timer)
            .unwrap();
        assert_eq!(timer.raced, 1);
        let report = engine.tuning_report().unwrap();
        let race = report.whole_engine.as_ref().unwrap();
        assert_eq!((race.check, race.kept), (Check::Layouts, kept));
        let nhwc = report.channels_last_layers();
        match kept {
            Kept::Tuned => assert!(nhwc > 0),
            Kept::Float => {
                assert_eq!(nhwc, 0);
                assert!(engine.layers().iter().all(|l| l.op != "Transpose"));
            }
        }
    }
    // Turned off: no race, the tuner's channels-last choice stays.
    let off = BuilderConfig {
        engine_check: false,
        ..config
    };
    let engine = channels_last_build(&case, &off, 0.01);
    assert!(engine.tuning_report().unwrap().whole_engine.is_none());
    assert!(engine.tuning_report().unwrap().channels_last_layers() > 0);
}
