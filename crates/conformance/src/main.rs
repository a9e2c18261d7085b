//! `kiln-conformance`: runs ONNX's backend test cases through kiln, each in a child
//! process, and reports, checks or updates the expected results. See the crate README.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_conformance::{
    case_name, default_assets_dir, discover, fmt_duration, model_is_float, model_ops,
    read_expected, report, run_case, tally_by_suite, workspace_root, write_expected, CaseResult,
    Tally, SUITES,
};

const USAGE: &str = "\
usage: kiln-conformance [options]

Runs ONNX backend test cases (assets/onnx-backend/<suite>/<case>) through kiln, each
case in a child process with a timeout.

options:
  --suite S          node | simple | pytorch-operator | pytorch-converted | all (default all)
  --filter SUBSTR    only cases whose `suite/case` name contains SUBSTR (repeatable: any)
  -j, --jobs N       cases run in parallel (default 2)
  --timeout SECS     per-case time limit (default 60)
  --mem-limit MB     per-case address-space limit (default 4096; 0 = none)
  --list-failures    print every failing case with its reason
  -v, --verbose      print every case as it finishes
  --update           add the cases that now pass to the expectations file
  --check            exit 1 if a case listed in the expectations file fails (CI mode)
  --expected PATH    expectations file (default tests/conformance/expected_pass.txt)
  --report PATH      write the markdown report (e.g. docs/conformance.md)
  --json             print all results as JSON on stdout (summary lines go to stderr)
  --assets DIR       assets directory (default: $KILN_ASSETS, ./assets, <repo>/assets)
  --in-process       run cases in this process (no isolation; for debugging)
  --one DIR          run one case directory in this process and print its result
  --device D         cpu (default) or cuda: build every case's engine for that device
                     (cuda: at the first data set's shapes, FP32, opt level 0; the per-case
                     memory limit defaults to none, CUDA reserves large address ranges)
  --float-only       only cases with a floating-point tensor input or output

The output always ends with `N passed, M failed`.";

const RESULT_TAG: &str = "KILN-CONFORMANCE-RESULT ";

/// Parsed command line.
#[derive(Debug)]
struct Opts {
    suites: Vec<String>,
    filters: Vec<String>,
    jobs: usize,
    timeout: Duration,
    mem_limit_mb: u64,
    list_failures: bool,
    verbose: bool,
    update: bool,
    check: bool,
    expected: PathBuf,
    report: Option<PathBuf>,
    json: bool,
    assets: PathBuf,
    in_process: bool,
    one: Option<PathBuf>,
    device: kiln::DeviceKind,
    float_only: bool,
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let mut o = Opts {
        suites: SUITES.iter().map(|s| s.to_string()).collect(),
        filters: Vec::new(),
        jobs: 2,
        timeout: Duration::from_secs(60),
        mem_limit_mb: 4096,
        list_failures: false,
        verbose: false,
        update: false,
        check: false,
        expected: workspace_root().join("tests/conformance/expected_pass.txt"),
        report: None,
        json: false,
        assets: default_assets_dir(),
        in_process: false,
        one: None,
        device: kiln::DeviceKind::Cpu,
        float_only: false,
    };
    let mut mem_limit_given = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--suite" => {
                let s = value("--suite")?;
                o.suites = match s.as_str() {
                    "all" => SUITES.iter().map(|s| s.to_string()).collect(),
                    s if SUITES.contains(&s) => vec![s.to_string()],
                    s => return Err(format!("unknown suite {s:?} (node, simple, pytorch-operator, pytorch-converted, all)")),
                };
            }
            "--filter" => o.filters.push(value("--filter")?),
            "-j" | "--jobs" => {
                o.jobs = value("--jobs")?
                    .parse()
                    .map_err(|_| "--jobs needs a number".to_string())?;
                o.jobs = o.jobs.max(1);
            }
            "--timeout" => {
                let s: f64 = value("--timeout")?
                    .parse()
                    .map_err(|_| "--timeout needs seconds".to_string())?;
                o.timeout = Duration::from_secs_f64(s.max(0.1));
            }
            "--mem-limit" => {
                o.mem_limit_mb = value("--mem-limit")?
                    .parse()
                    .map_err(|_| "--mem-limit needs MB".to_string())?;
                mem_limit_given = true;
            }
            "--device" => {
                o.device = match value("--device")?.as_str() {
                    "cpu" => kiln::DeviceKind::Cpu,
                    "cuda" | "gpu" => kiln::DeviceKind::Cuda,
                    d => return Err(format!("unknown device {d:?} (cpu, cuda)")),
                }
            }
            "--float-only" => o.float_only = true,
            "--list-failures" => o.list_failures = true,
            "-v" | "--verbose" => o.verbose = true,
            "--update" => o.update = true,
            "--check" => o.check = true,
            "--expected" => o.expected = PathBuf::from(value("--expected")?),
            "--report" => o.report = Some(PathBuf::from(value("--report")?)),
            "--json" => o.json = true,
            "--assets" => o.assets = PathBuf::from(value("--assets")?),
            "--in-process" => o.in_process = true,
            "--one" => o.one = Some(PathBuf::from(value("--one")?)),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.device == kiln::DeviceKind::Cuda && !mem_limit_given {
        o.mem_limit_mb = 0;
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1).collect()) {
        Ok(o) => o,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("kiln-conformance: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &opts.one {
        return run_one(dir, opts.device);
    }
    run_all(&opts)
}

/// Child mode: run one case, catching panics, and print the result line.
fn run_one(dir: &Path, device: kiln::DeviceKind) -> ExitCode {
    static PANIC: OnceLock<Mutex<String>> = OnceLock::new();
    std::panic::set_hook(Box::new(|info| {
        let msg = match (
            info.payload().downcast_ref::<&str>(),
            info.payload().downcast_ref::<String>(),
        ) {
            (Some(s), _) => s.to_string(),
            (_, Some(s)) => s.clone(),
            _ => "panic".to_string(),
        };
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut p) = PANIC.get_or_init(Default::default).lock() {
            if p.is_empty() {
                *p = format!("panicked{loc}: {msg}");
            }
        }
    }));
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| run_case(dir, device)).unwrap_or_else(|_| {
        let msg = PANIC
            .get_or_init(Default::default)
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        CaseResult::fail(
            &case_name(dir),
            &msg,
            model_ops(&dir.join("model.onnx")),
            start.elapsed().as_secs_f64(),
        )
    });
    match serde_json::to_string(&result) {
        Ok(json) => println!("{RESULT_TAG}{json}"),
        Err(e) => {
            eprintln!("cannot serialise result: {e}");
            return ExitCode::from(3);
        }
    }
    eprintln!(
        "{}: {}",
        result.case,
        if result.passed() {
            "pass".to_string()
        } else {
            format!("FAIL: {}", result.reason)
        }
    );
    ExitCode::SUCCESS
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// The last informative stderr line of a crashed child (allocation failure, overflow...).
fn last_words(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("note:") && !l.starts_with("stack backtrace"))
        .map(|l| format!(": {l}"))
        .unwrap_or_default()
}

fn spawn_reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Parent mode: run one case in a child process with a time and memory limit.
fn run_isolated(dir: &Path, opts: &Opts) -> CaseResult {
    let start = Instant::now();
    let name = case_name(dir);
    let ops = || model_ops(&dir.join("model.onnx"));
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return CaseResult::fail(
                &name,
                &format!("cannot find own executable: {e}"),
                ops(),
                0.0,
            )
        }
    };
    let mut cmd = if opts.mem_limit_mb > 0 {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "ulimit -v {} 2>/dev/null; exec \"$0\" \"$@\"",
                opts.mem_limit_mb * 1024
            ))
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.arg("--one")
        .arg(dir)
        .arg("--device")
        .arg(match opts.device {
            kiln::DeviceKind::Cuda => "cuda",
            _ => "cpu",
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env("RUST_BACKTRACE", "0");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CaseResult::fail(
                &name,
                &format!("cannot start child process: {e}"),
                ops(),
                0.0,
            )
        }
    };
    let out = child.stdout.take().map(spawn_reader);
    let err = child.stderr.take().map(spawn_reader);
    let mut sleep = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= opts.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(20));
            }
            Err(e) => {
                let _ = child.kill();
                return CaseResult::fail(
                    &name,
                    &format!("waiting for child failed: {e}"),
                    ops(),
                    0.0,
                );
            }
        }
    };
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    let secs = start.elapsed().as_secs_f64();
    let Some(status) = status else {
        return CaseResult::fail(
            &name,
            &format!("timed out (after {})", fmt_duration(opts.timeout)),
            ops(),
            secs,
        );
    };
    if let Some(line) = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(RESULT_TAG))
    {
        if let Ok(mut r) = serde_json::from_str::<CaseResult>(line) {
            r.seconds = secs;
            return r;
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let reason = match (status.signal(), status.code()) {
        (Some(sig), _) => format!(
            "crashed (signal {sig}, {}){}",
            signal_name(sig),
            last_words(&stderr)
        ),
        (None, Some(code)) => format!("crashed (exit code {code}){}", last_words(&stderr)),
        _ => format!("crashed{}", last_words(&stderr)),
    };
    CaseResult::fail(&name, &reason, ops(), secs)
}

fn selected_cases(opts: &Opts) -> Vec<PathBuf> {
    let mut cases = Vec::new();
    for suite in &opts.suites {
        for dir in discover(&opts.assets, suite) {
            let name = case_name(&dir);
            let wanted =
                opts.filters.is_empty() || opts.filters.iter().any(|f| name.contains(f.as_str()));
            if wanted && (!opts.float_only || model_is_float(&dir.join("model.onnx"))) {
                cases.push(dir);
            }
        }
    }
    cases
}

/// Runs every selected case on `opts.jobs` worker threads; results come back in order.
fn run_cases(cases: &[PathBuf], opts: &Opts) -> Vec<CaseResult> {
    let total = cases.len();
    let queue = Arc::new(Mutex::new(
        cases
            .iter()
            .cloned()
            .enumerate()
            .collect::<Vec<_>>()
            .into_iter(),
    ));
    let (tx, rx) = mpsc::channel::<(usize, CaseResult)>();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.min(total.max(1)) {
            let queue = queue.clone();
            let tx = tx.clone();
            s.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some((i, dir)) = next else { break };
                let r = if opts.in_process {
                    run_case(&dir, opts.device)
                } else {
                    run_isolated(&dir, opts)
                };
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut results: Vec<Option<CaseResult>> = vec![None; total];
        let mut done = 0;
        let mut tally = Tally::default();
        for (i, r) in rx {
            done += 1;
            tally.add(r.passed());
            if opts.verbose {
                let what = if r.passed() {
                    "pass".to_string()
                } else {
                    format!("FAIL: {}", r.reason)
                };
                eprintln!("[{done}/{total}] {} ({:.2}s) {what}", r.case, r.seconds);
            } else if done % 100 == 0 || done == total {
                eprintln!("[{done}/{total}] {}", tally.line());
            }
            results[i] = Some(r);
        }
        results.into_iter().flatten().collect()
    })
}

fn run_all(opts: &Opts) -> ExitCode {
    let root = opts.assets.join("onnx-backend");
    if !root.is_dir() {
        eprintln!(
            "kiln-conformance: {} not found; `cargo xtask fetch-assets` fetches the test assets \
             (or set KILN_ASSETS / --assets)",
            root.display()
        );
        return ExitCode::from(2);
    }
    let cases = selected_cases(opts);
    let start = Instant::now();
    let results = run_cases(&cases, opts);
    let elapsed = start.elapsed();
    let mut code = ExitCode::SUCCESS;

    if opts.json {
        match serde_json::to_string_pretty(&results) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("cannot serialise results: {e}"),
        }
    }
    // Human output goes to stdout, or to stderr when stdout carries JSON.
    let say = |s: &str| {
        if opts.json {
            eprintln!("{s}")
        } else {
            println!("{s}")
        }
    };
    if opts.list_failures {
        for r in results.iter().filter(|r| !r.passed()) {
            say(&format!("FAIL {}: {}", r.case, r.reason));
        }
    }
    let partial = !opts.filters.is_empty() || opts.suites.len() != SUITES.len() || opts.float_only;
    let expected = read_expected(&opts.expected);
    let expected_set: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let by_name: BTreeMap<&str, &CaseResult> =
        results.iter().map(|r| (r.case.as_str(), r)).collect();
    let regressions: Vec<&CaseResult> = expected
        .iter()
        .filter_map(|c| by_name.get(c.as_str()).copied())
        .filter(|r| !r.passed())
        .collect();
    let new_passes: Vec<&str> = results
        .iter()
        .filter(|r| r.passed() && !expected_set.contains(r.case.as_str()))
        .map(|r| r.case.as_str())
        .collect();
    if opts.check {
        for r in &regressions {
            say(&format!("REGRESSION {}: {}", r.case, r.reason));
        }
        if !regressions.is_empty() {
            say(&format!(
                "{} expected case(s) failed (listed in {})",
                regressions.len(),
                opts.expected.display()
            ));
            code = ExitCode::from(1);
        }
    }
    if opts.update {
        let existing = |c: &String| {
            let mut parts = c.splitn(2, '/');
            match (parts.next(), parts.next()) {
                (Some(s), Some(n)) => opts.assets.join("onnx-backend").join(s).join(n).is_dir(),
                _ => false,
            }
        };
        let mut all: Vec<String> = expected.iter().filter(|c| existing(c)).cloned().collect();
        all.extend(new_passes.iter().map(|s| s.to_string()));
        match write_expected(&opts.expected, &all) {
            Ok(()) => say(&format!(
                "updated {}: {} new pass(es)",
                opts.expected.display(),
                new_passes.len()
            )),
            Err(e) => {
                say(&format!("cannot update expectations: {e}"));
                code = ExitCode::from(1);
            }
        }
    } else if !new_passes.is_empty() {
        say(&format!(
            "{} case(s) pass but are not in {} (run with --update)",
            new_passes.len(),
            opts.expected.display()
        ));
    }
    if let Some(path) = &opts.report {
        let text = report::render(
            &results,
            partial,
            match opts.device {
                kiln::DeviceKind::Cuda => {
                    "kiln::Builder --device cuda (FP32, opt level 0) + ExecutionContext"
                }
                _ => "kiln::Builder + ExecutionContext (import, optimise, plan, run)",
            },
        );
        match std::fs::write(path, text) {
            Ok(()) => say(&format!("wrote {}", path.display())),
            Err(e) => {
                say(&format!("cannot write {}: {e}", path.display()));
                code = ExitCode::from(1);
            }
        }
    }
    let by_suite = tally_by_suite(&results);
    for suite in SUITES {
        if let Some(t) = by_suite.get(suite) {
            say(&format!("{suite}: {}", t.line()));
        }
    }
    let mut all = Tally::default();
    let mut float = Tally::default();
    for r in &results {
        all.add(r.passed());
        if r.float {
            float.add(r.passed());
        }
    }
    say(&format!("float cases: {}", float.line()));
    if opts.device == kiln::DeviceKind::Cuda {
        say(&gpu_layer_line(&results));
    }
    say(&format!(
        "{} cases in {} with {} job(s)",
        all.total(),
        fmt_duration(elapsed),
        opts.jobs
    ));
    say(&all.line());
    code
}

/// How many layers of the passing cases ran on the GPU (the rest were CPU fallbacks), and
/// in how many passing cases every layer did.
fn gpu_layer_line(results: &[CaseResult]) -> String {
    let passing: Vec<[usize; 2]> = results
        .iter()
        .filter(|r| r.passed())
        .filter_map(|r| r.gpu_layers)
        .collect();
    let on_gpu: usize = passing.iter().map(|c| c[0]).sum();
    let total: usize = passing.iter().map(|c| c[1]).sum();
    let all_gpu = passing.iter().filter(|c| c[0] == c[1]).count();
    let mut by_op: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results.iter().filter(|r| r.passed()) {
        for op in &r.cpu_fallback_ops {
            *by_op.entry(op.as_str()).or_default() += 1;
        }
    }
    let mut ops: Vec<(&str, usize)> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
    format!(
        "GPU layers in passing cases: {on_gpu} of {total} ({:.1}%); {all_gpu} of {} passing \
         cases ran every layer on the GPU\nCPU-fallback layers by op: {}",
        100.0 * on_gpu as f64 / total.max(1) as f64,
        passing.len(),
        ops.join(", ")
    )
}
