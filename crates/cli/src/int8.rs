//! `kiln calibrate` (INT8 calibration cache from real data) and `kiln compare` (accuracy of
//! one engine against another on the same inputs).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln::int8::data::list_batches;
use kiln::int8::{Algorithm, Calibrator};
use kiln::Tensor;

use crate::common::{self, CliError, CliResult, Globals, ShapesArg};

/// Calibration algorithm for `--algo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algo {
    /// KL divergence over activation histograms (TensorRT's EntropyCalibration2).
    Entropy,
    /// Largest absolute value.
    Minmax,
    /// A percentile of the absolute values (--percentile).
    Percentile,
}

/// Arguments of `kiln calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The ONNX model (FP32).
    #[arg(value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Calibration batches: one subdirectory per batch with <input>.npy per model input,
    /// or (one-input models) .npy files directly, each one batch.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Calibration algorithm.
    #[arg(long, value_enum, default_value_t = Algo::Entropy)]
    pub algo: Algo,
    /// Percentile kept by --algo percentile.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// Where to write the cache [default: MODEL with the extension .calib].
    #[arg(long, value_name = "MODEL.calib")]
    pub cache: Option<PathBuf>,
}

/// Arguments of `kiln compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The reference engine or model (e.g. the FP32 ONNX model).
    #[arg(value_name = "A")]
    pub a: PathBuf,
    /// The engine or model to check (e.g. an INT8 plan).
    #[arg(value_name = "B")]
    pub b: PathBuf,
    /// Input batches, laid out as for `kiln calibrate --data`.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Input shapes for ONNX models with open dims [default: the first batch's shapes].
    #[arg(long, value_name = "NAME:1x3x224x224,...", value_parser = common::parse_shapes_arg)]
    pub shapes: Option<ShapesArg>,
    /// Print a JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also compare every intermediate tensor (matched by its source-model name; both
    /// built from the same model, on the CPU or the GPU: a GPU engine runs with every
    /// tensor kept) and name the first one, in topological order, whose rel L2 exceeds
    /// --tolerance.
    #[arg(long)]
    pub per_layer: bool,
    /// --per-layer: the rel L2 (‖a−b‖/‖a‖ over all batches) above which a tensor diverges.
    #[arg(long, default_value_t = 0.05, requires = "per_layer")]
    pub tolerance: f64,
    /// Also compare every output thresholded at T (for probability or segmentation maps,
    /// e.g. a text detector's 0.3): IoU of the `> T` elements of A and B, and the share of
    /// elements on the same side of T.
    #[arg(long, value_name = "T")]
    pub threshold: Option<f64>,
}

fn progress(g: &Globals, n: usize, what: &str) -> ProgressBar {
    if g.quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} batches {elapsed}")
    {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    pb
}

fn shapes_of(batch: &[(String, Tensor)]) -> BTreeMap<String, Vec<usize>> {
    batch
        .iter()
        .map(|(n, t)| (n.clone(), t.shape().to_vec()))
        .collect()
}

/// Runs `kiln calibrate`.
pub fn calibrate(g: &Globals, a: CalibrateArgs) -> CliResult<()> {
    let algorithm = match a.algo {
        Algo::Entropy => Algorithm::Entropy,
        Algo::Minmax => Algorithm::MinMax,
        Algo::Percentile => {
            if !(a.percentile > 0.0 && a.percentile <= 100.0) {
                return Err(CliError(format!(
                    "--percentile {} must be in (0, 100]",
                    a.percentile
                )));
            }
            Algorithm::Percentile(a.percentile)
        }
    };
    let out = a
        .cache
        .clone()
        .unwrap_or_else(|| a.model.with_extension("calib"));
    let inputs = kiln::int8::calibrate::model_inputs(&a.model)?;
    let batches = list_batches(&a.data, &inputs)?;
    let first = batches[0].load()?;
    let pb = common::spinner(
        g,
        format!(
            "building the observing FP32 engine for {}",
            a.model.display()
        ),
    );
    let cal = Calibrator::new(&a.model, shapes_of(&first));
    pb.finish_and_clear();
    let mut cal = cal?;
    let bar = progress(g, batches.len(), "calibrating");
    for b in &batches {
        let tensors = b.load()?;
        cal.observe(&tensors)
            .map_err(|e| CliError(format!("batch {}: {e}", b.label)))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let cache = cal.cache(algorithm);
    cache.save(&out)?;
    println!(
        "wrote {} ({} tensors, {} batches, {})",
        out.display(),
        cache.scales.len(),
        batches.len(),
        algorithm.header_name()
    );
    Ok(())
}

/// Accumulated differences of one output.
#[derive(Debug, Default, Clone)]
struct Diff {
    sq_err: f64,
    sq_ref: f64,
    sq_b: f64,
    dot: f64,
    max_abs: f64,
    rows: usize,
    top1_same: usize,
    classifier: bool,
    /// `--threshold`: counts of elements above it.
    thresholded: Option<Thresholded>,
}

/// `--threshold T`: how the `> T` masks of A and B agree.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Thresholded {
    t: f64,
    /// Elements above T in A, in B, in both.
    in_a: u64,
    in_b: u64,
    both: u64,
    /// All elements compared.
    total: u64,
}

impl Thresholded {
    fn new(t: f64) -> Self {
        Thresholded {
            t,
            in_a: 0,
            in_b: 0,
            both: 0,
            total: 0,
        }
    }

    fn add(&mut self, p: f64, q: f64) {
        let (a, b) = (p > self.t, q > self.t);
        self.in_a += u64::from(a);
        self.in_b += u64::from(b);
        self.both += u64::from(a && b);
        self.total += 1;
    }

    /// |A ∩ B| / |A ∪ B| of the masks; 1 when both are empty (they agree).
    fn iou(&self) -> f64 {
        let union = self.in_a + self.in_b - self.both;
        if union == 0 {
            1.0
        } else {
            self.both as f64 / union as f64
        }
    }

    /// Share of elements on the same side of T in A and B.
    fn agreement(&self) -> f64 {
        let differ = self.in_a + self.in_b - 2 * self.both;
        if self.total == 0 {
            1.0
        } else {
            1.0 - differ as f64 / self.total as f64
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "threshold": self.t,
            "iou": self.iou(),
            "agreement": self.agreement(),
            "above_a": self.in_a,
            "above_b": self.in_b,
            "elements": self.total,
        })
    }
}

impl Diff {
    fn add(&mut self, xs: &[f32], ys: &[f32]) {
        for (&p, &q) in xs.iter().zip(ys) {
            let (p, q) = (p as f64, q as f64);
            self.sq_err += (p - q) * (p - q);
            self.sq_ref += p * p;
            self.sq_b += q * q;
            self.dot += p * q;
            self.max_abs = self.max_abs.max((p - q).abs());
            if let Some(t) = self.thresholded.as_mut() {
                t.add(p, q);
            }
        }
    }

    fn rel_l2(&self) -> f64 {
        if self.sq_ref > 0.0 {
            (self.sq_err / self.sq_ref).sqrt()
        } else if self.sq_err > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }

    fn cosine(&self) -> f64 {
        let d = self.sq_ref.sqrt() * self.sq_b.sqrt();
        if d > 0.0 {
            self.dot / d
        } else if self.sq_err == 0.0 {
            1.0
        } else {
            0.0
        }
    }
}

/// `--per-layer`: one compared tensor, accumulated over the batches.
struct LayerDiff {
    tensor: String,
    layer: String,
    diff: Diff,
}

/// Per-layer comparison state: the tensors both engines compute (A's order), and how many
/// of either engine's tensors have no counterpart.
struct PerLayer {
    rows: Vec<LayerDiff>,
    skipped_a: usize,
    skipped_b: usize,
}

/// f32 tensors by name (others cast when they are float; integer tensors are skipped:
/// their codes are not comparable values).
fn float_values(v: Vec<(String, Tensor)>) -> CliResult<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (n, t) in v {
        if matches!(
            t.dtype(),
            kiln::DType::F32 | kiln::DType::F16 | kiln::DType::F64
        ) {
            out.push((n, t.cast(kiln::DType::F32)?));
        }
    }
    Ok(out)
}

fn producer_names(e: &kiln::Engine) -> std::collections::HashMap<String, String> {
    let g = e.graph();
    let mut m = std::collections::HashMap::new();
    for n in &g.nodes {
        for &o in n.outputs.iter().flatten() {
            m.insert(g.values[o].name.clone(), n.name.clone());
        }
    }
    m
}

impl PerLayer {
    fn observe(
        &mut self,
        ea: &kiln::Engine,
        eb: &kiln::Engine,
        args: &[(&str, Tensor)],
    ) -> CliResult<()> {
        let va = float_values(ea.all_values(args)?)?;
        let vb: std::collections::HashMap<String, Tensor> =
            float_values(eb.all_values(args)?)?.into_iter().collect();
        let first = self.rows.is_empty() && self.skipped_a == 0;
        let producers = producer_names(ea);
        let mut i = 0;
        let mut matched = 0;
        for (name, ta) in &va {
            let Some(tb) = vb.get(name).filter(|tb| tb.shape() == ta.shape()) else {
                if first {
                    self.skipped_a += 1;
                }
                continue;
            };
            matched += 1;
            if first {
                self.rows.push(LayerDiff {
                    tensor: name.clone(),
                    layer: producers.get(name).cloned().unwrap_or_default(),
                    diff: Diff::default(),
                });
            }
            let row = self
                .rows
                .get_mut(i)
                .filter(|r| r.tensor == *name)
                .ok_or_else(|| {
                    CliError(format!(
                        "tensor {name} appeared in one batch and not another"
                    ))
                })?;
            row.diff.add(ta.as_slice::<f32>()?, tb.as_slice::<f32>()?);
            i += 1;
        }
        if first {
            self.skipped_b = vb.len() - matched;
        }
        Ok(())
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Runs `kiln compare`.
pub fn compare(g: &Globals, a: CompareArgs) -> CliResult<()> {
    let load = |path: &PathBuf, shapes: &BTreeMap<String, Vec<usize>>| {
        common::load_model(g, path, shapes, &[], kiln::DeviceKind::Cpu, true).map(|l| l.engine)
    };
    // Input names from A (a plan or a model: build it at the first batch's shapes).
    let probe = load(&a.a, &a.shapes.clone().unwrap_or_default());
    let names: Vec<String> = match &probe {
        Ok(e) => e.inputs().iter().map(|i| i.name.clone()).collect(),
        Err(_) => kiln::int8::calibrate::model_inputs(&a.a)?,
    };
    let batches = list_batches(&a.data, &names)?;
    let shapes = a
        .shapes
        .clone()
        .unwrap_or_else(|| shapes_of(&batches[0].load().unwrap_or_default()));
    let ea = load(&a.a, &shapes)?;
    let eb = load(&a.b, &shapes)?;
    let outs: Vec<String> = ea.outputs().iter().map(|o| o.name.clone()).collect();
    let outs_b: Vec<String> = eb.outputs().iter().map(|o| o.name.clone()).collect();
    if outs != outs_b {
        return Err(CliError(format!(
            "A and B have different outputs ({} vs {})",
            outs.join(", "),
            outs_b.join(", ")
        )));
    }
    if let Some(t) = a.threshold.filter(|t| !t.is_finite()) {
        return Err(CliError(format!(
            "--threshold {t}: expected a finite value (e.g. 0.3)"
        )));
    }
    let mut diffs = vec![
        Diff {
            thresholded: a.threshold.map(Thresholded::new),
            ..Diff::default()
        };
        outs.len()
    ];
    let mut per_layer = a.per_layer.then(|| PerLayer {
        rows: Vec::new(),
        skipped_a: 0,
        skipped_b: 0,
    });
    if a.per_layer && !(a.tolerance >= 0.0 && a.tolerance.is_finite()) {
        return Err(CliError(format!(
            "--tolerance {}: expected a finite rel L2 ≥ 0 (e.g. 0.05)",
            a.tolerance
        )));
    }
    let (mut ca, mut cb) = (ea.create_context(), eb.create_context());
    let bar = progress(g, batches.len(), "comparing");
    for batch in &batches {
        let tensors = batch.load()?;
        let args: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let ra = ca.execute_tensors(&args)?;
        let rb = cb.execute_tensors(&args)?;
        if let Some(pl) = per_layer.as_mut() {
            pl.observe(&ea, &eb, &args)
                .map_err(|e| CliError(format!("--per-layer, batch {}: {e}", batch.label)))?;
        }
        for ((d, x), y) in diffs.iter_mut().zip(&ra).zip(&rb) {
            let (x, y) = (x.cast(kiln::DType::F32)?, y.cast(kiln::DType::F32)?);
            let (xs, ys) = (x.as_slice::<f32>()?, y.as_slice::<f32>()?);
            if xs.len() != ys.len() {
                return Err(CliError(format!(
                    "output shapes differ: {:?} vs {:?}",
                    x.shape(),
                    y.shape()
                )));
            }
            d.add(xs, ys);
            // Top-1 for classifier-like outputs: rank 2, N × classes.
            if x.shape().len() == 2 && x.shape()[1] > 1 {
                d.classifier = true;
                let c = x.shape()[1];
                for (rx, ry) in xs.chunks(c).zip(ys.chunks(c)) {
                    d.rows += 1;
                    d.top1_same += usize::from(argmax(rx) == argmax(ry));
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rows: Vec<serde_json::Value> = outs
        .iter()
        .zip(&diffs)
        .map(|(name, d)| {
            serde_json::json!({
                "output": name,
                "rel_l2": d.rel_l2(),
                "max_abs": d.max_abs,
                "cosine": d.cosine(),
                "top1_agreement": d.classifier.then(|| d.top1_same as f64 / d.rows.max(1) as f64),
                "top1_rows": d.classifier.then_some(d.rows),
                "thresholded": d.thresholded.map(|t| t.json()),
            })
        })
        .collect();
    let per_layer_json = per_layer.as_ref().map(|pl| {
        let first = pl.rows.iter().position(|r| r.diff.rel_l2() > a.tolerance);
        serde_json::json!({
            "tolerance": a.tolerance,
            "tensors": pl.rows.iter().map(|r| serde_json::json!({
                "tensor": r.tensor,
                "layer": r.layer,
                "rel_l2": r.diff.rel_l2(),
                "cosine": r.diff.cosine(),
                "max_abs": r.diff.max_abs,
            })).collect::<Vec<_>>(),
            "compared": pl.rows.len(),
            "skipped_only_in_a": pl.skipped_a,
            "skipped_only_in_b": pl.skipped_b,
            "first_divergent": first.map(|i| serde_json::json!({
                "index": i,
                "tensor": pl.rows[i].tensor,
                "layer": pl.rows[i].layer,
                "rel_l2": pl.rows[i].diff.rel_l2(),
            })),
        })
    });
    if a.json {
        let mut v = serde_json::json!({
            "a": a.a.display().to_string(),
            "b": a.b.display().to_string(),
            "batches": batches.len(),
            "outputs": rows,
        });
        if let Some(pl) = per_layer_json {
            v["per_layer"] = pl;
        }
        return common::print_json(&v);
    }
    println!(
        "{} vs {} on {} batches",
        a.a.display(),
        a.b.display(),
        batches.len()
    );
    let mut table = vec![vec![
        "output".to_string(),
        "rel L2".into(),
        "max abs".into(),
        "cosine".into(),
        "top-1 agreement".into(),
    ]];
    if let Some(t) = a.threshold {
        table[0].push(format!("IoU of > {t}"));
        table[0].push(format!("same side of {t}"));
    }
    for r in &rows {
        table.push(vec![
            r["output"].as_str().unwrap_or("").to_string(),
            format!("{:.5}", r["rel_l2"].as_f64().unwrap_or(f64::NAN)),
            format!("{:.5}", r["max_abs"].as_f64().unwrap_or(f64::NAN)),
            format!("{:.6}", r["cosine"].as_f64().unwrap_or(f64::NAN)),
            match (r["top1_agreement"].as_f64(), r["top1_rows"].as_u64()) {
                (Some(t), Some(n)) => format!("{:.2} % of {n}", t * 100.0),
                _ => "-".into(),
            },
        ]);
        let th = &r["thresholded"];
        if !th.is_null() {
            let row = table.last_mut().expect("a row was just pushed");
            row.push(format!("{:.4}", th["iou"].as_f64().unwrap_or(f64::NAN)));
            row.push(format!(
                "{:.4} %",
                100.0 * th["agreement"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    print!("{}", common::table(&table));
    if let (Some(pl), Some(js)) = (&per_layer, &per_layer_json) {
        println!(
            "\nper layer (topological order, tolerance rel L2 {}): {} tensors compared; skipped {} only in A and {} only in B (fused away or not float)",
            a.tolerance,
            pl.rows.len(),
            pl.skipped_a,
            pl.skipped_b
        );
        let mut t = vec![vec![
            "#".to_string(),
            "tensor".into(),
            "layer (A)".into(),
            "rel L2".into(),
            "cosine".into(),
            "".into(),
        ]];
        let first = js["first_divergent"]["index"].as_u64().map(|i| i as usize);
        for (i, r) in pl.rows.iter().enumerate() {
            t.push(vec![
                i.to_string(),
                r.tensor.clone(),
                r.layer.clone(),
                format!("{:.5}", r.diff.rel_l2()),
                format!("{:.6}", r.diff.cosine()),
                match first {
                    Some(f) if f == i => "<- first beyond tolerance".into(),
                    _ if r.diff.rel_l2() > a.tolerance => "beyond".into(),
                    _ => String::new(),
                },
            ]);
        }
        print!("{}", common::table(&t));
        match first {
            Some(i) => println!(
                "first divergent tensor: {} (layer {}), rel L2 {:.5} > {}",
                pl.rows[i].tensor,
                pl.rows[i].layer,
                pl.rows[i].diff.rel_l2(),
                a.tolerance
            ),
            None => println!("no tensor beyond tolerance {}", a.tolerance),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholded_masks_iou_and_agreement() {
        let mut t = Thresholded::new(0.3);
        // A above at 0, 1, 2; B above at 1, 2, 3; element 4 below in both; 0.3 is not above.
        for (p, q) in [
            (0.9, 0.1),
            (0.5, 0.4),
            (0.31, 0.99),
            (0.3, 0.7),
            (-1.0, 0.3),
        ] {
            t.add(p, q);
        }
        assert_eq!((t.in_a, t.in_b, t.both, t.total), (3, 3, 2, 5));
        assert!((t.iou() - 2.0 / 4.0).abs() < 1e-12);
        assert!((t.agreement() - 3.0 / 5.0).abs() < 1e-12);
        // No element above T in either: the masks agree.
        let mut e = Thresholded::new(10.0);
        e.add(1.0, 2.0);
        assert_eq!((e.iou(), e.agreement()), (1.0, 1.0));
        // Through Diff, as compare accumulates it.
        let mut d = Diff {
            thresholded: Some(Thresholded::new(0.5)),
            ..Diff::default()
        };
        d.add(&[0.6, 0.2, 0.7], &[0.6, 0.8, 0.1]);
        let th = d.thresholded.unwrap();
        assert_eq!((th.in_a, th.in_b, th.both), (2, 2, 1));
        assert!((th.iou() - 1.0 / 3.0).abs() < 1e-12);
    }
}
