//! `cargo xtask`: developer tasks for the kiln workspace.
//!
//! Only the standard library is used, so this builds even while the rest of the
//! workspace does not.  The actual work lives in `scripts/assets.py`; this is a
//! thin launcher that forwards arguments and the exit status.
//!
//! ```text
//! cargo xtask fetch-assets [--runs N]   # python3 scripts/assets.py all
//! cargo xtask assets-info               # python3 scripts/assets.py info
//! cargo xtask assets <subcommand> ...   # any scripts/assets.py subcommand
//! ```
//!
//! The interpreter is `python3` unless `KILN_PYTHON` names another one; the
//! cache directory is `assets/` unless `KILN_ASSETS` is set (read by the script).

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  fetch-assets [--runs N]   download/verify test assets and write ORT reference
                            outputs (python3 scripts/assets.py all)
  assets-info               show what is cached (python3 scripts/assets.py info)
  assets <cmd> [args]       run any scripts/assets.py subcommand
                            (fetch, reference, all, info)
  bench-cpu [args]          kiln vs ONNX Runtime on the real models, side by side
                            (python3 scripts/bench_cpu.py; --help for options)

env: KILN_PYTHON (default python3), KILN_ASSETS (default <repo>/assets)";

/// The workspace root: the parent of this crate's manifest directory.
fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Run `python3 scripts/assets.py <args>` in the repo root and map its exit
/// status onto ours (a signal becomes 128 + signal number on Unix).
fn run_assets(args: Vec<OsString>) -> ExitCode {
    run_script("assets.py", args)
}

/// Run `python3 scripts/<name> <args>` in the repo root, forwarding its exit status.
fn run_script(name: &str, args: Vec<OsString>) -> ExitCode {
    let root = repo_root();
    let script = root.join("scripts").join(name);
    let python = env::var_os("KILN_PYTHON").unwrap_or_else(|| "python3".into());
    let status = Command::new(&python)
        .arg(&script)
        .args(&args)
        .current_dir(&root)
        .status();
    match status {
        Ok(status) => ExitCode::from(exit_byte(status)),
        Err(err) => {
            eprintln!(
                "xtask: could not run {} {}: {err}",
                python.to_string_lossy(),
                script.display()
            );
            ExitCode::from(127)
        }
    }
}

/// Exit status of a child as a process exit byte.
fn exit_byte(status: std::process::ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return u8::try_from(128 + sig).unwrap_or(1);
        }
    }
    1
}

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    let task = args.next();
    let rest: Vec<OsString> = args.collect();
    match task.as_ref().and_then(|t| t.to_str()) {
        Some("fetch-assets") => {
            let mut forwarded = vec![OsString::from("all")];
            forwarded.extend(rest);
            run_assets(forwarded)
        }
        Some("assets-info") => {
            let mut forwarded = vec![OsString::from("info")];
            forwarded.extend(rest);
            run_assets(forwarded)
        }
        Some("assets") if !rest.is_empty() => run_assets(rest),
        Some("bench-cpu") => run_script("bench_cpu.py", rest),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("xtask: unknown task {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
