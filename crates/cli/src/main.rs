//! `kiln`: build optimised inference engines from ONNX models, run, benchmark and inspect them.
//!
//! Every failure prints one `error: <message>` line on stderr and exits with code 1
//! (usage errors: code 2, from clap). Nothing prints a backtrace.

mod bench;
mod build;
mod common;
mod inspect;
mod int8;
mod monitor;
mod run;
mod stats;
mod version;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use common::{CliError, Globals, InputArg, ShapesArg};

const TOP_EXAMPLES: &str = "\
Examples:
  kiln build model.onnx -o model.plan --shapes x:1x3x224x224
  kiln run model.plan --input x=x.npy --output-dir out/
  kiln bench model.plan --threads 4 --duration 5
  kiln inspect model.plan
  kiln version --json

Run `kiln <command> --help` for the options of each command.
Logs: -v (info), -vv (debug), -vvv (trace), or RUST_LOG=kiln=debug.";

const BUILD_EXAMPLES: &str = "\
Examples:
  # Specialise to one input shape (folds shape computations, plans memory now):
  kiln build model.onnx -o model.plan --shapes x:1x3x224x224
  # Keep symbolic dims: memory is planned per input shape at run time:
  kiln build model.onnx -o model.plan
  # Several inputs; a scalar input is written NAME: (empty dims):
  kiln build vad.onnx -o vad.plan --shapes input:1x512,state:2x1x128
  # An optimization profile: any shape from min to max is accepted at run time,
  # tuning happens at opt:
  kiln build det.onnx -o det.plan --min-shapes x:1x3x64x64 --opt-shapes x:1x3x640x640 \
      --max-shapes x:1x3x960x960
  # Two profiles: each --min/--opt/--max-shapes triple (in order) is one profile:
  kiln build cls.onnx -o cls.plan \
      --min-shapes x:1x3x48x48 --opt-shapes x:1x3x48x192 --max-shapes x:8x3x48x320 \
      --min-shapes x:9x3x48x48 --opt-shapes x:32x3x48x192 --max-shapes x:64x3x48x320
  # Machine-readable summary:
  kiln build model.onnx -o model.plan --json
  # On the GPU, FP16 (needs concrete shapes):
  kiln build model.onnx -o model.plan --device cuda --fp16 --shapes x:8x3x224x224";

const RUN_EXAMPLES: &str = "\
Examples:
  kiln run model.plan --input x=x.npy --output-dir out/
  # An .onnx model is built in memory first:
  kiln run model.onnx --input x=x.npy --output-dir out/ --shapes x:1x3x224x224
  kiln run vad.plan --input input=audio.npy --input state=state.npy --input sr=sr.npy --output-dir out/
  # A plan with two optimization profiles: check the inputs against the second one:
  kiln run cls.plan --optimization-profile 1 --input x=batch32.npy --output-dir out/

Each output is written to DIR/<name>.npy, where <name> is the model's output name with
every character outside [A-Za-z0-9._-] replaced by '_'.";

const BENCH_EXAMPLES: &str = "\
Examples:
  kiln bench model.plan
  kiln bench model.onnx --shapes x:8x3x224x224 --threads 4 --iterations 200
  kiln bench model.plan --input x=x.npy --duration 10 --warmup 20 --json
  # A plan with a profile: random inputs at a shape inside it (default: its opt shape):
  kiln bench det.plan --shapes x:1x3x320x480

Inputs not given with --input are filled with seeded random values (floats ~ N(0,1),
integers in 0..10, random bools). Symbolic dims must be set with --shapes.
Default: warm up for 10 iterations or 1 s, then time for 3 s (at least 10 iterations).";

const INSPECT_EXAMPLES: &str = "\
Examples:
  kiln inspect model.plan
  kiln inspect model.onnx --shapes x:1x3x224x224
  kiln inspect model.plan --shapes x:4x3x224x224 --json   # memory plan at batch 4";

const MONITOR_EXAMPLES: &str = "\
Examples:
  kiln monitor                          # every 500 ms until Ctrl-C
  kiln monitor --interval-ms 100 --count 20
  kiln monitor --csv --count 60 > gpu.csv";

const CALIBRATE_EXAMPLES: &str = "\
Examples:
  kiln calibrate model.onnx --data calib/ --algo entropy --cache model.calib
  kiln calibrate model.onnx --data calib/ --algo percentile --percentile 99.99
  kiln build model.onnx --int8 --calib-cache model.calib -o model.int8.plan --shapes x:1x3x224x224
  kiln build model.onnx --int8 --calib-cache model.calib --accuracy-budget 0.02 --calib-data calib/
  kiln build model_qdq.onnx   # Q/DQ models run INT8 with their own scales, no cache needed

--data holds one subdirectory per batch with <input name>.npy for every model input, or
(models with one input) .npy files directly, each one batch. Docs: docs/int8.md.";

const COMPARE_EXAMPLES: &str = "\
Examples:
  kiln compare model.onnx model.int8.plan --data calib/
  kiln compare model.fp32.plan model.int8.plan --data calib/ --json
  kiln compare model.onnx model.int8.plan --data calib/ --per-layer --tolerance 0.05";

const VERSION_EXAMPLES: &str = "\
Examples:
  kiln version
  kiln version --json";

/// kiln: build optimised inference engines from ONNX models and run them.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, after_help = TOP_EXAMPLES, propagate_version = true)]
struct Cli {
    /// More logging on stderr: -v info, -vv debug, -vvv trace.
    #[arg(short, long, action = ArgAction::Count, global = true, help_heading = "Global options")]
    verbose: u8,
    /// Only errors on stderr: no progress spinners, no warnings.
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an optimised engine (plan file) from an ONNX model.
    #[command(after_help = BUILD_EXAMPLES)]
    Build(BuildArgs),
    /// Run a model on inputs from .npy files and write its outputs as .npy files.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Measure latency and throughput of a model.
    #[command(after_help = BENCH_EXAMPLES)]
    Bench(BenchArgs),
    /// Show an engine's inputs, outputs, memory plan, optimisations and layers.
    #[command(after_help = INSPECT_EXAMPLES)]
    Inspect(InspectArgs),
    /// Show kiln's version and build details.
    #[command(after_help = VERSION_EXAMPLES)]
    Version(VersionArgs),
    /// Calibrate a model for INT8: run it on real input batches and write the per-tensor
    /// scales to a calibration cache.
    #[command(after_help = CALIBRATE_EXAMPLES)]
    Calibrate(int8::CalibrateArgs),
    /// Compare two engines or models on the same inputs (rel L2, max abs, cosine, top-1).
    #[command(after_help = COMPARE_EXAMPLES)]
    Compare(int8::CompareArgs),
    /// Sample GPU utilization, memory, clocks, power, temperature and throttling (NVML).
    #[command(after_help = MONITOR_EXAMPLES)]
    Monitor(MonitorArgs),
}

/// Target device for `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend (needs a GPU, its driver and --shapes for every input).
    Cuda,
}

impl From<Device> for kiln::DeviceKind {
    fn from(d: Device) -> Self {
        match d {
            Device::Auto => kiln::DeviceKind::Auto,
            Device::Cpu => kiln::DeviceKind::Cpu,
            Device::Cuda => kiln::DeviceKind::Cuda,
        }
    }
}

/// Arguments of `kiln build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The ONNX model.
    #[arg(value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Where to write the plan [default: MODEL with the extension .plan].
    #[arg(short, long, value_name = "MODEL.plan")]
    pub output: Option<PathBuf>,
    /// Target device.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Input shapes to specialise the engine to: NAME:DxDxD,... (repeatable).
    #[arg(long, value_name = "NAME:1x3x224x224,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append)]
    pub shapes: Vec<ShapesArg>,
    /// Smallest input shapes of an optimization profile: NAME:DxDxD,... Each
    /// --min-shapes/--opt-shapes/--max-shapes triple, in order, is one profile.
    #[arg(long, value_name = "NAME:1x3x64x64,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append, requires_all = ["opt_shapes", "max_shapes"], conflicts_with = "shapes", help_heading = "Optimization profiles")]
    pub min_shapes: Vec<ShapesArg>,
    /// Input shapes of a profile that kernels are tuned at (min <= opt <= max).
    #[arg(long, value_name = "NAME:1x3x224x224,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append, requires_all = ["min_shapes", "max_shapes"], help_heading = "Optimization profiles")]
    pub opt_shapes: Vec<ShapesArg>,
    /// Largest input shapes of a profile.
    #[arg(long, value_name = "NAME:1x3x640x640,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append, requires_all = ["min_shapes", "opt_shapes"], help_heading = "Optimization profiles")]
    pub max_shapes: Vec<ShapesArg>,
    /// Skip the optimisation passes (for debugging).
    #[arg(long)]
    pub no_optimize: bool,
    /// Builder optimisation level: 0 = heuristic tactics only (no timing); 1..5 time more
    /// tactic candidates per layer, with more repetitions (needs --shapes to time).
    #[arg(long, value_name = "0..5", default_value_t = kiln::config::DEFAULT_OPT_LEVEL, value_parser = clap::value_parser!(u8).range(0..=5))]
    pub opt_level: u8,
    /// Timing cache: read before tuning (a cache from another device or kiln version is
    /// ignored with a warning) and written after.
    #[arg(long, value_name = "FILE")]
    pub timing_cache: Option<PathBuf>,
    /// Skip the whole-engine check. By default, when tuning puts layers in INT8 (with
    /// --int8) or in the CPU's channels-last layout, the engine is also built without them
    /// (without INT8; in the linear layout only) and both are timed end to end on the
    /// device; the tuned one is kept only if it is at least 2 % faster.
    #[arg(long)]
    pub no_engine_check: bool,
    /// CPU engines: the intra-op thread count the plan will run with (`kiln bench
    /// --threads`, `ExecutionContext::set_threads`). Tactics are timed and the whole-engine
    /// check is raced at it, so the plan is the fastest for that count [default: one per
    /// core]. A timing cache made at another thread count is ignored (with a warning),
    /// as one from another device is.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Also allow FP16 layers (FP16 + FP32 precision pools); GPU engines store float
    /// weights and activations in FP16 (GEMMs accumulate in FP32).
    #[arg(long)]
    pub fp16: bool,
    /// GPU engines: allow TF32 tensor-core math in FP32 matrix products (off by default).
    #[arg(long)]
    pub tf32: bool,
    /// Also allow INT8 layers (INT8 + FP32 pools; CPU and GPU): calibrated Conv/MatMul/Gemm
    /// layers get INT8 tactics, timed against the float ones with the reformats they need
    /// (GPU engines at --opt-level 0: every such layer runs INT8, untimed).
    #[arg(long, requires = "calib_cache")]
    pub int8: bool,
    /// Calibration cache from `kiln calibrate` (checked against the model's sha256).
    #[arg(long, value_name = "MODEL.calib")]
    pub calib_cache: Option<PathBuf>,
    /// Q/DQ models: run their QuantizeLinear/DequantizeLinear-wrapped layers through the
    /// reference ops and float layers instead of the INT8 kernels (a reference to compare
    /// with: `kiln compare ref.plan int8.plan --per-layer`).
    #[arg(long)]
    pub no_explicit_int8: bool,
    /// With --int8: the largest rel L2 error ‖int8 − fp32‖/‖fp32‖ allowed per output,
    /// measured on --calib-data (e.g. 0.02). INT8 layers fall back to FP32, the largest
    /// own error first, until the engine is within it; the plan records which.
    #[arg(long, value_name = "X", requires = "int8", requires = "calib_data")]
    pub accuracy_budget: Option<f64>,
    /// Batches --accuracy-budget measures on (the `kiln calibrate --data` layout; the
    /// calibration batches themselves, or held-out ones).
    #[arg(long, value_name = "DIR", requires = "accuracy_budget")]
    pub calib_data: Option<PathBuf>,
    /// Pin layers to a precision: NAME:fp32,... (ONNX node names or fused layer names).
    #[arg(long, value_name = "NAME:fp32,...", action = ArgAction::Append)]
    pub layer_precision: Vec<String>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Time between samples, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    pub interval_ms: u64,
    /// Stop after this many samples [default: run until interrupted].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Comma-separated values with a header line instead of a table.
    #[arg(long)]
    pub csv: bool,
}

/// Arguments of `kiln run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A plan built by `kiln build`, or an ONNX model (built in memory first).
    #[arg(value_name = "MODEL.plan|MODEL.onnx")]
    pub model: PathBuf,
    /// An input: NAME=FILE.npy (repeat for each input).
    #[arg(short, long = "input", value_name = "NAME=FILE.npy", value_parser = common::parse_input_arg)]
    pub inputs: Vec<InputArg>,
    /// Directory for the outputs (created when missing).
    #[arg(short = 'o', long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Input shapes: for an .onnx model, the engine is built for them; for a plan, they are
    /// checked (against the plan's optimization profile) and must match the input files.
    #[arg(long, value_name = "NAME:1x3x224x224,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append)]
    pub shapes: Vec<ShapesArg>,
    /// Optimization profile the input shapes are checked against.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub optimization_profile: usize,
}

/// Arguments of `kiln bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A plan built by `kiln build`, or an ONNX model (built in memory first).
    #[arg(value_name = "MODEL.plan|MODEL.onnx")]
    pub model: PathBuf,
    /// Input shapes: for an .onnx model, the engine is built for them; for any model, they
    /// set the symbolic dims of generated inputs. NAME:DxDxD,...
    #[arg(long, value_name = "NAME:1x3x224x224,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append)]
    pub shapes: Vec<ShapesArg>,
    /// An input from a file: NAME=FILE.npy (others are random).
    #[arg(short, long = "input", value_name = "NAME=FILE.npy", value_parser = common::parse_input_arg)]
    pub inputs: Vec<InputArg>,
    /// Optimization profile the input shapes are checked against; generated inputs whose
    /// shape --shapes does not give take the profile's opt shape.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub optimization_profile: usize,
    /// Intra-op threads [default: one per core].
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
    /// Timed iterations [default: 3 s and at least 10 iterations].
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "duration")]
    pub iterations: Option<u64>,
    /// Time for this many seconds (at least one iteration).
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Warm-up iterations [default: 10 iterations or 1 s, whichever comes first].
    #[arg(short, long, value_name = "N")]
    pub warmup: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// After timing, run 10 more times with every layer timed (CUDA events on the GPU, a
    /// monotonic clock on the CPU) and print the slowest layers (in `--json`: `profile`).
    #[arg(long)]
    pub profile: bool,
    /// GPU engines: time again with the layers captured once into a CUDA graph and replayed
    /// (reported next to the plain run; in `--json`: `cuda_graph`).
    #[arg(long)]
    pub cuda_graph: bool,
}

/// Arguments of `kiln inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A plan built by `kiln build`, or an ONNX model (built in memory first).
    #[arg(value_name = "MODEL.plan|MODEL.onnx")]
    pub model: PathBuf,
    /// Input shapes: for an .onnx model, the engine is built for them; for a plan, the
    /// memory report is computed at them. NAME:DxDxD,...
    #[arg(long, value_name = "NAME:1x3x224x224,...", value_parser = common::parse_shapes_arg, action = ArgAction::Append)]
    pub shapes: Vec<ShapesArg>,
    /// Print everything as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln version`.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Print a JSON object.
    #[arg(long)]
    pub json: bool,
}

fn init_logging(g: &Globals) {
    use tracing_subscriber::EnvFilter;
    let filter = match (g.quiet, g.verbose) {
        (true, _) => EnvFilter::new("error"),
        (false, 0) => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        (false, 1) => EnvFilter::new("info"),
        (false, 2) => EnvFilter::new("debug"),
        (false, _) => EnvFilter::new("trace"),
    };
    // try_init: never panic, even if a subscriber were already set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Set when printing failed because the reader of stdout went away.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Replaces the default panic message (which mentions RUST_BACKTRACE) by one error line.
/// kiln is written not to panic; this is a safety net so a bug still reads like an error.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown cause".to_string()
        };
        // `kiln inspect m.plan | head`: stdout closed early is not an error.
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error{at}: {msg} (this is a bug in kiln; please report it)");
    }));
}

fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = Globals {
        quiet: cli.quiet,
        verbose: cli.verbose,
    };
    init_logging(&g);
    match cli.command {
        Command::Build(a) => build::run(&g, a),
        Command::Run(a) => run::run(&g, a),
        Command::Bench(a) => bench::run(&g, a),
        Command::Inspect(a) => inspect::run(&g, a),
        Command::Version(a) => version::run(a),
        Command::Monitor(a) => monitor::run(a),
        Command::Calibrate(a) => int8::calibrate(&g, a),
        Command::Compare(a) => int8::compare(&g, a),
    }
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = Cli::parse();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(_) if STDOUT_CLOSED.load(std::sync::atomic::Ordering::SeqCst) => ExitCode::SUCCESS,
        // The panic hook already printed the error line.
        Err(_) => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_contract_forms() {
        let c = Cli::try_parse_from([
            "kiln",
            "build",
            "m.onnx",
            "-o",
            "m.plan",
            "--device",
            "cpu",
            "--shapes",
            "x:1x3x4x4,y:2",
            "--no-optimize",
        ])
        .unwrap();
        let Command::Build(b) = c.command else {
            panic!()
        };
        assert_eq!(b.output.unwrap(), PathBuf::from("m.plan"));
        assert_eq!(b.device, Device::Cpu);
        assert!(b.no_optimize);
        assert_eq!(
            common::merge_shapes(&b.shapes).unwrap()["x"],
            vec![1, 3, 4, 4]
        );

        let c = Cli::try_parse_from([
            "kiln",
            "run",
            "m.plan",
            "--input",
            "x=a.npy",
            "--input",
            "y=dir/b=c.npy",
            "--output-dir",
            "out",
        ])
        .unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.inputs[1].name, "y");
        assert_eq!(r.inputs[1].path, PathBuf::from("dir/b=c.npy"));

        let c = Cli::try_parse_from([
            "kiln",
            "-vv",
            "bench",
            "m.onnx",
            "--shapes",
            "x:1x3",
            "--threads",
            "2",
            "--iterations",
            "5",
            "--warmup",
            "1",
            "--json",
        ])
        .unwrap();
        assert_eq!(c.verbose, 2);
        let Command::Bench(b) = c.command else {
            panic!()
        };
        assert_eq!(
            (b.threads, b.iterations, b.warmup, b.json),
            (Some(2), Some(5), Some(1), true)
        );

        assert!(Cli::try_parse_from([
            "kiln",
            "bench",
            "m",
            "--iterations",
            "5",
            "--duration",
            "1"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["kiln", "bench", "m", "--threads", "0"]).is_err());
        assert!(Cli::try_parse_from(["kiln", "build", "m.onnx", "--threads", "0"]).is_err());
        assert!(Cli::try_parse_from(["kiln", "build", "m.onnx", "--threads", "1"]).is_ok());
        assert!(Cli::try_parse_from([
            "kiln",
            "run",
            "m",
            "--input",
            "noequals",
            "--output-dir",
            "o"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["kiln", "build", "m", "--shapes", "x:1xA"]).is_err());
        assert!(Cli::try_parse_from(["kiln", "build", "m", "--device", "tpu"]).is_err());
        assert!(Cli::try_parse_from(["kiln", "inspect", "m", "--json", "-q"]).is_ok());
        assert!(Cli::try_parse_from(["kiln", "version", "--json"]).is_ok());
    }
}
