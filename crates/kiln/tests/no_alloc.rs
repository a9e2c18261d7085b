//! Steady-state inference allocates nothing: a counting global allocator watches every
//! thread (rayon workers included) while warm contexts run the real models through
//! `ExecutionContext::execute_into`, and the test fails naming each model that allocated.
//!
//! Cases listed in `ALLOCATION_FREE` must allocate nothing; set `KILN_ALLOC_STRICT=1` to
//! require it of every case. Set `KILN_ALLOC_TRACE=N` to print backtraces of the first N allocations seen, and
//! `KILN_ALLOC_CASE=name` to run one case only.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kiln::{parse_shapes, Builder, BuilderConfig, Engine, Tensor, TensorMut};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static TRACE_LEFT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

fn note_alloc() {
    if !COUNTING.load(Ordering::Relaxed) {
        return;
    }
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    if TRACE_LEFT.load(Ordering::Relaxed) == 0 {
        return;
    }
    // Capturing a backtrace allocates: guard against recursion.
    let _ = IN_TRACE.try_with(|t| {
        if t.get() {
            return;
        }
        t.set(true);
        if TRACE_LEFT.fetch_sub(1, Ordering::Relaxed) > 0 {
            eprintln!(
                "allocation during steady state:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
        }
        t.set(false);
    });
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CASES: &[&str] = &[
    "orientation_b1",
    "orientation_b4",
    "ppocr_det_640",
    "ppocr_det_480x800",
    "ppocr_cls_b6",
    "silero_op15",
    "silero_sequence",
];
/// (case, static plan) pairs that must not allocate at all (today: every case); a case
/// left out would still be counted and printed, and required to be zero with
/// `KILN_ALLOC_STRICT=1`.
const ALLOCATION_FREE: &[(&str, bool)] = &[
    ("orientation_b1", true),
    ("orientation_b4", true),
    ("ppocr_det_640", true),
    ("ppocr_det_480x800", true),
    ("ppocr_cls_b6", true),
    ("silero_op15", true),
    ("silero_sequence", true),
    ("orientation_b1", false),
    ("orientation_b4", false),
    ("ppocr_det_640", false),
    ("ppocr_det_480x800", false),
    ("ppocr_cls_b6", false),
    // Without --shapes silero_op15 keeps its `If`; the memory plan for the first input
    // shapes inlines the branch they decide, so it is planned like the rest.
    ("silero_op15", false),
    ("silero_sequence", false),
];
/// Enough warm-up calls for every pool thread to have sized its scratch buffers.
const WARMUP: usize = 20;
const RUNS: usize = 8;

/// Windows of `RUNS` measured after warm-up at most, for contexts with several threads.
const WINDOWS: usize = 3;

/// Allocations counted over windows of `RUNS` warm inferences of one case, or None without
/// assets. One window with one thread; with several, further windows until one counts
/// zero (at most `WINDOWS`): which pool thread runs which job changes from run to run, so
/// a thread can meet a scratch nesting it has not seen during warm-up and size one more
/// buffer once — the steady state is reached when a whole window allocates nothing.
/// A tuning timer under which every channels-last tactic wins and reformats are cheap, so
/// an engine runs its layers in NHWC wherever they can.
struct PreferChannelsLast;

impl kiln::tuner::LayerTimer for PreferChannelsLast {
    fn time_tactic(
        &mut self,
        _: &kiln_core::Node,
        _: &[Option<&kiln_core::Fact>],
        _: &[Option<&Tensor>],
        t: &kiln_core::Tactic,
    ) -> kiln::Result<f64> {
        Ok(if t.format.layout == kiln_core::Layout::ChannelsLast {
            0.5
        } else {
            1.0
        })
    }
    fn time_reformat(
        &mut self,
        _: &kiln_core::Fact,
        _: kiln_core::Format,
        _: kiln_core::Format,
    ) -> kiln::Result<f64> {
        Ok(0.01)
    }
}

fn count_case(name: &str, specialise: bool, threads: usize) -> Option<Vec<usize>> {
    count_engine(name, specialise, threads, false)
}

/// [`count_case`], with `nhwc`: the engine tuned to run channels-last wherever it can.
fn count_engine(name: &str, specialise: bool, threads: usize, nhwc: bool) -> Option<Vec<usize>> {
    let assets = common::assets()?;
    let case = common::case(&assets, name);
    let config = BuilderConfig {
        shapes: if specialise {
            parse_shapes(&case.shapes).expect("shapes")
        } else {
            Default::default()
        },
        ..Default::default()
    };
    let engine: Engine = if nhwc {
        let tactics = &kiln::tuner::cpu_tactics;
        let engine = Builder::new()
            .build_onnx_file_with(&case.model, &config, tactics, &mut PreferChannelsLast)
            .expect("build");
        let layers = engine
            .tuning_report()
            .map_or(0, |t| t.channels_last_layers());
        assert!(layers > 0, "{name}: no channels-last layer");
        engine
    } else {
        Builder::new()
            .build_onnx_file(&case.model, &config)
            .expect("build")
    };
    let mut ctx = engine.create_context();
    ctx.set_threads(threads).expect("pool");
    let inputs = common::named(&case.inputs);
    // Output buffers, allocated once by the caller.
    let reference = ctx.execute(&inputs).expect("first run");
    let shapes: Vec<Vec<usize>> = reference
        .iter()
        .map(|v| v.as_tensor().expect("tensor").shape().to_vec())
        .collect();
    let mut bufs: Vec<Vec<u8>> = reference
        .iter()
        .map(|v| vec![0u8; v.as_tensor().unwrap().bytes().len()])
        .collect();
    let dtypes: Vec<_> = reference
        .iter()
        .map(|v| v.as_tensor().unwrap().dtype())
        .collect();
    let windows = if threads > 1 { WINDOWS } else { 1 };
    let mut counts = vec![0; windows];
    for round in 0..WARMUP + RUNS * windows {
        if round >= WARMUP + RUNS && (round - WARMUP).is_multiple_of(RUNS) {
            let done = (round - WARMUP) / RUNS;
            if counts[done - 1] == 0 {
                counts.truncate(done);
                break;
            }
        }
        let mut outs: Vec<TensorMut<'_>> = Vec::with_capacity(bufs.len());
        for ((b, s), d) in bufs.iter_mut().zip(&shapes).zip(&dtypes) {
            outs.push(TensorMut::new(*d, s, b).expect("view"));
        }
        let before = ALLOCS.load(Ordering::SeqCst);
        COUNTING.store(round >= WARMUP, Ordering::SeqCst);
        let r = ctx.execute_into(&inputs, &mut outs);
        COUNTING.store(false, Ordering::SeqCst);
        if round >= WARMUP {
            counts[(round - WARMUP) / RUNS] += ALLOCS.load(Ordering::SeqCst) - before;
        }
        r.expect("execute_into");
    }
    // What the caller got equals what `execute` returns (the path really computes).
    for ((b, want), (s, d)) in bufs.iter().zip(&reference).zip(shapes.iter().zip(&dtypes)) {
        let got = Tensor::from_bytes(*d, s, b).unwrap();
        assert!(
            got.same_as(want.as_tensor().unwrap()),
            "{name}: execute_into differs from execute"
        );
    }
    Some(counts)
}

/// The counter is global, so every configuration runs from this one test, in turn.
/// The test (no libtest harness: see `Cargo.toml`).
fn main() {
    steady_state_inference_does_not_allocate();
    println!("test steady_state_inference_does_not_allocate ... ok");
}

fn steady_state_inference_does_not_allocate() {
    if let Some(n) = std::env::var_os("KILN_ALLOC_TRACE") {
        let n = n.to_str().and_then(|s| s.parse().ok()).unwrap_or(3);
        TRACE_LEFT.store(n, Ordering::SeqCst);
    }
    let only = std::env::var("KILN_ALLOC_CASE").ok();
    let strict = std::env::var_os("KILN_ALLOC_STRICT").is_some();
    let mut bad = Vec::new();
    // (static plan built with --shapes, threads of the context's pool)
    for (specialise, threads) in [(true, 1), (true, 2), (false, 1), (false, 2)] {
        for name in CASES {
            if only.as_deref().is_some_and(|o| o != *name) {
                continue;
            }
            let Some(counts) = count_case(name, specialise, threads) else {
                return;
            };
            // The last window is the steady state (earlier ones, when present, allocated).
            let n = *counts.last().expect("one window at least");
            eprintln!(
                "{name} (static plan: {specialise}, {threads} threads): {n} allocations in {RUNS} runs (windows: {counts:?})"
            );
            let required = strict || ALLOCATION_FREE.contains(&(*name, specialise));
            if n > 0 && required {
                bad.push(format!(
                    "{name} (static plan: {specialise}, {threads} threads): {counts:?}"
                ));
            }
        }
    }
    // Engines that run channels-last wherever they can (Transposes, NHWC convs, pools and
    // elementwise layers), at 1 and 2 threads.
    for threads in [1, 2] {
        for name in ["orientation_b4", "ppocr_cls_b6", "ppocr_det_640"] {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let Some(counts) = count_engine(name, true, threads, true) else {
                return;
            };
            let n = *counts.last().expect("one window at least");
            eprintln!("{name} (channels-last, {threads} threads): {n} allocations in {RUNS} runs");
            if n > 0 {
                bad.push(format!(
                    "{name} (channels-last, {threads} threads): {counts:?}"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "steady-state inference allocated: {}",
        bad.join("; ")
    );
}
