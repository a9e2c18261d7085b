//! Shared pieces of the subcommands: errors, argument parsers, model loading, progress
//! spinners, input generation and formatting.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln::{
    Builder, BuilderConfig, DType, DeviceKind, Dim, Engine, IoInfo, KilnError, OptimizationProfile,
    ProfileBound, Runtime, Tensor,
};
use kiln_core::ValueKind;

/// An error shown to the user as `error: <message>`.
#[derive(Debug)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<KilnError> for CliError {
    fn from(e: KilnError) -> Self {
        CliError(e.to_string())
    }
}

impl From<String> for CliError {
    fn from(s: String) -> Self {
        CliError(s)
    }
}

/// The CLI's result type.
pub type CliResult<T> = Result<T, CliError>;

/// Adds context in front of an error message.
pub trait Context<T> {
    /// `context: error`.
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> CliResult<T> {
        self.map_err(|e| CliError(format!("{}: {e}", what())))
    }
}

/// Options shared by every subcommand.
#[derive(Debug, Clone, Copy)]
pub struct Globals {
    /// `-q`: no progress output, only errors.
    pub quiet: bool,
    /// `-v` count.
    pub verbose: u8,
}

/// One `--shapes` argument, parsed.
pub type ShapesArg = BTreeMap<String, Vec<usize>>;

/// Parses a `--shapes` value (clap value parser; errors are usage errors).
pub fn parse_shapes_arg(s: &str) -> Result<ShapesArg, String> {
    let shapes = kiln::parse_shapes(s).map_err(|e| e.to_string())?;
    if shapes.is_empty() {
        return Err("expected NAME:DIMxDIMx..., e.g. x:1x3x224x224".into());
    }
    Ok(shapes)
}

/// Merges repeated `--shapes` arguments, refusing an input named twice.
pub fn merge_shapes(args: &[ShapesArg]) -> CliResult<BTreeMap<String, Vec<usize>>> {
    let mut out = BTreeMap::new();
    for a in args {
        for (k, v) in a {
            if out.insert(k.clone(), v.clone()).is_some() {
                return Err(CliError(format!(
                    "--shapes gives the shape of input {k} twice"
                )));
            }
        }
    }
    Ok(out)
}

/// The optimization profiles of `--min-shapes/--opt-shapes/--max-shapes`: the k-th
/// occurrence of each flag forms profile k.
pub fn profiles_from_args(
    min: &[ShapesArg],
    opt: &[ShapesArg],
    max: &[ShapesArg],
) -> CliResult<Vec<OptimizationProfile>> {
    if min.len() != opt.len() || min.len() != max.len() {
        return Err(CliError(format!(
            "each optimization profile needs --min-shapes, --opt-shapes and --max-shapes once: got {} --min-shapes, {} --opt-shapes, {} --max-shapes",
            min.len(),
            opt.len(),
            max.len()
        )));
    }
    min.iter()
        .zip(opt)
        .zip(max)
        .enumerate()
        .map(|(k, ((lo, mid), hi))| {
            OptimizationProfile::new(lo.clone(), mid.clone(), hi.clone())
                .map_err(|e| CliError(format!("optimization profile {k}: {e}")))
        })
        .collect()
}

/// One `--input NAME=FILE.npy` argument.
#[derive(Debug, Clone)]
pub struct InputArg {
    /// Input name.
    pub name: String,
    /// The `.npy` file.
    pub path: PathBuf,
}

/// Parses `NAME=FILE.npy` (split at the first `=`; the path may contain more).
pub fn parse_input_arg(s: &str) -> Result<InputArg, String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(InputArg {
            name: name.to_string(),
            path: PathBuf::from(path),
        }),
        _ => Err(format!("expected NAME=FILE.npy, got {s:?}")),
    }
}

/// Tensors with their input names.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Reads every `--input` file, refusing an input named twice.
pub fn read_inputs(inputs: &[InputArg]) -> CliResult<NamedTensors> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for i in inputs {
        if out.iter().any(|(n, _)| *n == i.name) {
            return Err(CliError(format!(
                "--input {} is given more than once",
                i.name
            )));
        }
        let t = kiln::npy::read_npy(&i.path).context(|| format!("input {}", i.name))?;
        out.push((i.name.clone(), t));
    }
    Ok(out)
}

/// What a model file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A plan file, loaded.
    Plan,
    /// An ONNX model, built in memory.
    Onnx,
}

/// A loaded engine and how it was obtained.
pub struct Loaded {
    /// The engine.
    pub engine: Engine,
    /// Plan or ONNX.
    pub kind: ModelKind,
    /// Time to load or build.
    pub elapsed: Duration,
}

/// A spinner on stderr (hidden with `-q` or when stderr is not a terminal).
pub fn spinner(g: &Globals, msg: impl Into<String>) -> ProgressBar {
    if g.quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    pb.set_style(style);
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// True when the file starts with the plan magic.
/// True when the file starts with the plan magic.
pub fn looks_like_plan(path: &Path) -> CliResult<bool> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).context(|| format!("cannot open model {}", path.display()))?;
    let mut head = [0u8; 8];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(CliError(format!(
                    "cannot read model {}: {e}",
                    path.display()
                )))
            }
        }
    }
    Ok(&head[..n] == kiln::plan::MAGIC)
}

/// Loads a plan, or builds an ONNX model in memory with `shapes`.
///
/// The kind is decided by the content (plan magic) and the extension: `.plan` files are
/// always loaded as plans (so a damaged one reports what is wrong with it).
pub fn load_model(
    g: &Globals,
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    profiles: &[OptimizationProfile],
    device: DeviceKind,
    optimize: bool,
) -> CliResult<Loaded> {
    let config = BuilderConfig {
        device,
        shapes: shapes.clone(),
        profiles: profiles.to_vec(),
        optimize,
        ..Default::default()
    };
    load_model_with(g, path, &config)
}

/// [`load_model`] with a whole builder configuration (what `kiln build` takes).
pub fn load_model_with(g: &Globals, path: &Path, config: &BuilderConfig) -> CliResult<Loaded> {
    let meta =
        std::fs::metadata(path).context(|| format!("cannot open model {}", path.display()))?;
    if meta.is_dir() {
        return Err(CliError(format!(
            "cannot open model {}: it is a directory",
            path.display()
        )));
    }
    let is_plan_ext = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("plan"));
    let start = Instant::now();
    if is_plan_ext || looks_like_plan(path)? {
        let pb = spinner(g, format!("loading {}", path.display()));
        let engine = Runtime::load(path).context(|| format!("cannot load plan {}", path.display()));
        pb.finish_and_clear();
        let engine = engine?;
        tracing::info!(plan = %path.display(), ms = start.elapsed().as_secs_f64() * 1e3, "loaded plan");
        return Ok(Loaded {
            engine,
            kind: ModelKind::Plan,
            elapsed: start.elapsed(),
        });
    }
    let pb = spinner(g, format!("building {}", path.display()));
    let engine = Builder::new()
        .build_onnx_file(path, config)
        .context(|| format!("cannot build {}", path.display()));
    pb.finish_and_clear();
    let engine = engine?;
    tracing::info!(model = %path.display(), ms = start.elapsed().as_secs_f64() * 1e3, "built engine");
    Ok(Loaded {
        engine,
        kind: ModelKind::Onnx,
        elapsed: start.elapsed(),
    })
}

/// The concrete shape of input `info`: known dims, with symbolic/unknown ones taken from
/// `shapes`. Errors tell the user which `--shapes` to pass.
pub fn resolve_shape(
    info: &IoInfo,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> CliResult<Vec<usize>> {
    let hint = |what: String| {
        let (example, blanks): (Vec<String>, Vec<String>) = match &info.shape {
            Some(dims) => {
                let ex: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(axis, d)| match d {
                        Dim::Known(n) => n.to_string(),
                        Dim::Sym(s) if is_name(s) => s.clone(),
                        _ => format!("D{axis}"),
                    })
                    .collect();
                let blanks = dims
                    .iter()
                    .zip(&ex)
                    .filter(|(d, _)| d.known().is_none())
                    .map(|(_, e)| e.clone())
                    .collect();
                (ex, blanks)
            }
            None => (vec!["D0".into(), "D1".into()], vec!["the dims".into()]),
        };
        CliError(format!(
            "input {} ({}): {what}; pass --shapes {}:{} with sizes for {}",
            info.name,
            info.describe(),
            info.name,
            example.join("x"),
            blanks.join(", ")
        ))
    };
    if let Some(given) = shapes.get(&info.name) {
        if let Some(dims) = &info.shape {
            if dims.len() != given.len() {
                return Err(CliError(format!(
                    "--shapes gives input {} rank {} but the engine expects {}",
                    info.name,
                    given.len(),
                    info.describe()
                )));
            }
            for (axis, (d, s)) in dims.iter().zip(given).enumerate() {
                if let Dim::Known(k) = d {
                    if k != s {
                        return Err(CliError(format!(
                            "--shapes sets dimension {axis} of input {} to {s} but the engine fixes it to {k} ({})",
                            info.name,
                            info.describe()
                        )));
                    }
                }
            }
        }
        return Ok(given.clone());
    }
    let Some(dims) = &info.shape else {
        return Err(hint("its rank is unknown".into()));
    };
    let unknown: Vec<String> = dims
        .iter()
        .enumerate()
        .filter(|(_, d)| d.known().is_none())
        .map(|(axis, d)| match d {
            Dim::Sym(s) if is_name(s) => format!("{axis} ({s})"),
            _ => axis.to_string(),
        })
        .collect();
    if !unknown.is_empty() {
        let plural = if unknown.len() > 1 { "s" } else { "" };
        return Err(hint(format!(
            "dimension{plural} {} not known",
            unknown.join(", ")
        )));
    }
    Ok(dims.iter().filter_map(|d| d.known()).collect())
}

/// True for symbolic dim names worth showing (`batch`, `seq_len`; not `?` or `unk__3`).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with("unk__")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `--shapes` completed with the opt shapes of optimization profile `profile` for the
/// inputs it does not name (so `kiln bench plan` runs at the shape the profile tunes for).
pub fn with_profile_opt_shapes(
    engine: &Engine,
    shapes: &BTreeMap<String, Vec<usize>>,
    profile: usize,
) -> BTreeMap<String, Vec<usize>> {
    let mut out = shapes.clone();
    if let Some(p) = engine.profiles().get(profile) {
        for info in engine.inputs() {
            if let Some(s) = p.shape(&info.name, ProfileBound::Opt) {
                out.entry(info.name.clone()).or_insert_with(|| s.to_vec());
            }
        }
    }
    out
}

/// Checks that every `--shapes` name is an input of the engine.
pub fn check_shape_names(engine: &Engine, shapes: &BTreeMap<String, Vec<usize>>) -> CliResult<()> {
    for name in shapes.keys() {
        if !engine.inputs().iter().any(|i| i.name == *name) {
            let names: Vec<&str> = engine.inputs().iter().map(|i| i.name.as_str()).collect();
            return Err(CliError(format!(
                "--shapes names input {name}, which the model does not have (its inputs are: {})",
                names.join(", ")
            )));
        }
    }
    Ok(())
}

/// A small deterministic generator (SplitMix64): benchmarks need repeatable inputs, not
/// cryptographic randomness.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// A seeded random tensor: floats ~ N(0, 1), integers in 0..10, random bools.
pub fn random_tensor(name: &str, dtype: DType, shape: &[usize], seed: u64) -> CliResult<Tensor> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= (1 << 32))
        .ok_or_else(|| {
            CliError(format!(
                "input {name}: shape {shape:?} is too large to generate"
            ))
        })?;
    let mut rng = SplitMix64::new(seed);
    let t = if dtype.is_float() {
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(shape, v)?.cast(dtype)?
    } else if dtype.is_int() {
        let v: Vec<i64> = (0..n).map(|_| (rng.next_u64() % 10) as i64).collect();
        Tensor::from_vec(shape, v)?.cast(dtype)?
    } else if dtype == DType::Bool {
        let v: Vec<bool> = (0..n).map(|_| rng.next_u64() & 1 == 1).collect();
        Tensor::from_bools(shape, &v)?
    } else {
        return Err(CliError(format!(
            "input {name}: cannot generate random {dtype} values; pass --input {name}=FILE.npy"
        )));
    };
    Ok(t)
}

/// Inputs for a benchmark: the given files, and random tensors for the others.
/// Returns the inputs in engine order and the names of generated ones.
pub fn bench_inputs(
    engine: &Engine,
    given: NamedTensors,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> CliResult<(NamedTensors, Vec<String>)> {
    let mut given = given;
    for (name, _) in &given {
        if !engine.inputs().iter().any(|i| i.name == *name) {
            let names: Vec<&str> = engine.inputs().iter().map(|i| i.name.as_str()).collect();
            return Err(CliError(format!(
                "--input {name}: the model has no such input (its inputs are: {})",
                names.join(", ")
            )));
        }
    }
    let mut out = Vec::new();
    let mut generated = Vec::new();
    for (k, info) in engine.inputs().iter().enumerate() {
        if let Some(pos) = given.iter().position(|(n, _)| *n == info.name) {
            out.push(given.swap_remove(pos));
            continue;
        }
        if info.kind != ValueKind::Tensor {
            return Err(CliError(format!(
                "input {} is a {:?}, which kiln bench cannot generate",
                info.name, info.kind
            )));
        }
        let dtype = info.dtype.ok_or_else(|| {
            CliError(format!(
                "input {}: the model does not declare its dtype; pass --input {}=FILE.npy",
                info.name, info.name
            ))
        })?;
        let shape = resolve_shape(info, shapes)?;
        let seed = 0x6b69_6c6e_u64 ^ ((k as u64) << 32);
        out.push((
            info.name.clone(),
            random_tensor(&info.name, dtype, &shape, seed)?,
        ));
        generated.push(info.name.clone());
    }
    Ok((out, generated))
}

/// An output name as a file name (`kiln::npy::file_name_for`).
pub use kiln::npy::file_name_for as sanitize_name;

/// `1.5 MiB`-style size.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `[1, 3, 224, 224]`.
pub fn shape_str(shape: &[usize]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// JSON for a symbolic shape: numbers for known dims, names for symbolic ones, null for unknown.
pub fn dims_json(shape: &Option<Vec<Dim>>) -> serde_json::Value {
    match shape {
        None => serde_json::Value::Null,
        Some(dims) => dims
            .iter()
            .map(|d| match d {
                Dim::Known(n) => serde_json::json!(n),
                Dim::Sym(s) => serde_json::json!(s),
                Dim::Unknown => serde_json::Value::Null,
            })
            .collect(),
    }
}

/// JSON for an engine input or output.
pub fn io_json(info: &IoInfo) -> serde_json::Value {
    serde_json::json!({
        "name": info.name,
        "kind": format!("{:?}", info.kind).to_lowercase(),
        "dtype": info.dtype.map(|d| d.name()),
        "shape": dims_json(&info.shape),
        "description": info.describe(),
    })
}

/// Prints a JSON value on stdout.
pub fn print_json(v: &serde_json::Value) -> CliResult<()> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError(format!("cannot encode JSON: {e}")))?;
    println!("{s}");
    Ok(())
}

/// Pads columns of a text table to equal widths (last column unpadded).
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_output_names() {
        assert_eq!(
            sanitize_name("save_infer_model/scale_0.tmp_1"),
            "save_infer_model_scale_0.tmp_1"
        );
        assert_eq!(sanitize_name("a b:c\\d"), "a_b_c_d");
        assert_eq!(sanitize_name("ok-Name_1.x"), "ok-Name_1.x");
        assert_eq!(sanitize_name("é"), "_");
        assert_eq!(sanitize_name(""), "_");
        assert_eq!(sanitize_name(".."), "__");
        assert_eq!(sanitize_name("../etc"), ".._etc");
    }

    #[test]
    fn parses_inputs() {
        let i = parse_input_arg("x=a/b.npy").unwrap();
        assert_eq!(
            (i.name.as_str(), i.path.to_str().unwrap()),
            ("x", "a/b.npy")
        );
        assert!(parse_input_arg("x").is_err());
        assert!(parse_input_arg("=a.npy").is_err());
        assert!(parse_input_arg("x=").is_err());
    }

    #[test]
    fn merges_shapes() {
        let a = parse_shapes_arg("x:1x2").unwrap();
        let b = parse_shapes_arg("y:3,z:").unwrap();
        let m = merge_shapes(&[a.clone(), b]).unwrap();
        assert_eq!(m["y"], vec![3]);
        assert_eq!(m["z"], Vec::<usize>::new());
        assert!(merge_shapes(&[a.clone(), a]).is_err());
        assert!(parse_shapes_arg("").is_err());
        assert!(parse_shapes_arg("x:1x-2").is_err());
    }

    fn info(shape: Option<Vec<Dim>>) -> IoInfo {
        IoInfo {
            name: "x".into(),
            kind: ValueKind::Tensor,
            dtype: Some(DType::F32),
            shape,
        }
    }

    #[test]
    fn resolves_symbolic_dims() {
        let none = BTreeMap::new();
        let i = info(Some(vec![Dim::Sym("batch".into()), Dim::Known(3)]));
        let e = resolve_shape(&i, &none).unwrap_err().0;
        assert!(
            e.contains("--shapes x:batchx3 with sizes for batch")
                && e.contains("dimension 0 (batch) not known"),
            "{e}"
        );
        let mut s = BTreeMap::new();
        s.insert("x".to_string(), vec![4, 3]);
        assert_eq!(resolve_shape(&i, &s).unwrap(), vec![4, 3]);
        s.insert("x".to_string(), vec![4, 5]);
        assert!(resolve_shape(&i, &s)
            .unwrap_err()
            .0
            .contains("fixes it to 3"));
        s.insert("x".to_string(), vec![4]);
        assert!(resolve_shape(&i, &s).unwrap_err().0.contains("rank"));
        assert_eq!(
            resolve_shape(&info(Some(vec![Dim::Known(2)])), &none).unwrap(),
            vec![2]
        );
        assert!(resolve_shape(&info(None), &none)
            .unwrap_err()
            .0
            .contains("rank is unknown"));
        let e = resolve_shape(
            &info(Some(vec![Dim::Unknown, Dim::Known(3), Dim::Unknown])),
            &none,
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("dimensions 0, 2 not known")
                && e.contains("--shapes x:D0x3xD2 with sizes for D0, D2"),
            "{e}"
        );
    }

    #[test]
    fn random_tensors_are_seeded_and_typed() {
        for d in [
            DType::F32,
            DType::F16,
            DType::F64,
            DType::I64,
            DType::I32,
            DType::U8,
            DType::Bool,
        ] {
            let a = random_tensor("x", d, &[2, 50], 7).unwrap();
            let b = random_tensor("x", d, &[2, 50], 7).unwrap();
            assert_eq!(a.dtype(), d);
            assert_eq!(a.shape(), &[2, 50]);
            assert!(a.same_as(&b));
        }
        let f = random_tensor("x", DType::F32, &[10000], 1)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let mean = f.iter().sum::<f32>() / f.len() as f32;
        let var = f.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / f.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.1, "{mean} {var}");
        let i = random_tensor("x", DType::I64, &[1000], 1)
            .unwrap()
            .to_i64_vec()
            .unwrap();
        assert!(i.iter().all(|v| (0..10).contains(v)));
        assert!(random_tensor("x", DType::String, &[2], 1).is_err());
        assert!(random_tensor("x", DType::F32, &[usize::MAX, 2], 1).is_err());
        assert_eq!(random_tensor("x", DType::F32, &[], 1).unwrap().len(), 1);
    }

    #[test]
    fn formats() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(shape_str(&[1, 3]), "[1, 3]");
        assert_eq!(shape_str(&[]), "[]");
        let t = table(&[
            vec!["a".into(), "bb".into(), "c".into()],
            vec!["ddd".into(), "e".into(), "f".into()],
        ]);
        assert_eq!(t, "a    bb  c\nddd  e   f\n");
        assert_eq!(
            dims_json(&Some(vec![
                Dim::Known(1),
                Dim::Sym("n".into()),
                Dim::Unknown
            ])),
            serde_json::json!([1, "n", null])
        );
    }
}
