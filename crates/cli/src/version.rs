//! `kiln version`: version and build details.

use std::path::{Path, PathBuf};

use crate::common::{self, CliResult};
use crate::VersionArgs;

/// Git commit the binary was built from (`unknown` outside a git checkout).
pub const GIT_COMMIT: &str = env!("KILN_GIT_COMMIT");
/// UTC date of the build.
pub const BUILD_DATE: &str = env!("KILN_BUILD_DATE");
/// Target triple.
pub const TARGET: &str = env!("KILN_TARGET");
/// Cargo profile (`debug` or `release`).
pub const PROFILE: &str = env!("KILN_PROFILE");
/// Backends compiled in.
pub const BACKENDS: &[&str] = &["cpu", "cuda"];

/// The version as one number, as the C API's `KILN_VERSION` and `kiln_get_version()`:
/// major * 10000 + minor * 100 + patch.
pub fn version_number() -> u64 {
    let mut parts = kiln::VERSION
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    major * 10000 + minor * 100 + patch
}

/// GPU libraries looked for at run time: report key and file name.
const GPU_LIBRARIES: [(&str, &str); 5] = [
    ("cuda_driver", "libcuda.so"),
    ("nvrtc", "libnvrtc.so"),
    ("cublas", "libcublas.so"),
    ("cublaslt", "libcublasLt.so"),
    ("cudnn", "libcudnn.so"),
];

/// Directories searched for GPU libraries: `LD_LIBRARY_PATH`, `CUDA_PATH`/`CUDA_HOME`, the
/// usual system and CUDA toolkit places.
fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/cuda/targets/sbsa-linux/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// The newest `FILE` or `FILE.<version>` in `dirs`: its path and version (from the name).
fn find_library(dirs: &[PathBuf], file: &str) -> Option<(PathBuf, Option<String>)> {
    let mut best: Option<(PathBuf, Option<String>)> = None;
    let key = |v: &Option<String>| -> Vec<u64> {
        v.iter()
            .flat_map(|s| s.split('.').map(|p| p.parse().unwrap_or(0)))
            .collect()
    };
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = match name.strip_prefix(file) {
                Some("") => None,
                Some(rest) => match rest.strip_prefix('.') {
                    Some(v) if v.split('.').all(|p| p.parse::<u64>().is_ok()) => {
                        Some(v.to_string())
                    }
                    _ => continue,
                },
                None => continue,
            };
            if best.as_ref().is_none_or(|(_, b)| key(&version) > key(b)) {
                best = Some((e.path(), version));
            }
        }
        if best.is_some() {
            break;
        }
    }
    best
}

/// The NVIDIA kernel driver version from /proc (Linux), when a GPU driver is loaded.
fn kernel_driver_version() -> Option<String> {
    parse_driver_version(&std::fs::read_to_string("/proc/driver/nvidia/version").ok()?)
}

/// The version in `NVRM version: NVIDIA UNIX ... Kernel Module  580.159.04  Release ...`.
fn parse_driver_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    line.split_whitespace()
        .find(|w| w.contains('.') && w.split('.').all(|p| p.parse::<u64>().is_ok()))
        .map(str::to_string)
}

/// What was found on this machine at run time: one JSON object per GPU library
/// (`found`, `version`, `path`, `status`), plus whether libcuda can be loaded.
pub fn runtime_probe() -> serde_json::Value {
    let dirs = library_dirs();
    let mut out = serde_json::Map::new();
    for (key, file) in GPU_LIBRARIES {
        let found = find_library(&dirs, file);
        let mut version = found.as_ref().and_then(|(_, v)| v.clone());
        if key == "cuda_driver" {
            version = kernel_driver_version().or(version);
        }
        let status = match (&found, &version) {
            (None, _) => "not found".to_string(),
            (Some(_), Some(v)) => format!("found {v}"),
            (Some(_), None) => "found (version unknown)".to_string(),
        };
        out.insert(
            key.to_string(),
            serde_json::json!({
                "found": found.is_some(),
                "version": version,
                "path": found.map(|(p, _)| p.display().to_string()),
                "status": status,
            }),
        );
    }
    if let Some(d) = out.get_mut("cuda_driver").and_then(|d| d.as_object_mut()) {
        d.insert(
            "loadable".into(),
            serde_json::json!(kiln_cuda::driver_present()),
        );
    }
    serde_json::Value::Object(out)
}

/// Runs `kiln version`.
pub fn run(a: VersionArgs) -> CliResult<()> {
    let features = kiln::fingerprint::cpu_features();
    let probe = runtime_probe();
    if a.json {
        return common::print_json(&serde_json::json!({
            "version": kiln::VERSION,
            "version_number": version_number(),
            "git_commit": GIT_COMMIT,
            "build_date": BUILD_DATE,
            "profile": PROFILE,
            "target": TARGET,
            "arch": std::env::consts::ARCH,
            "backends": BACKENDS,
            "cuda_driver_found": kiln_cuda::driver_present(),
            "cpu_features": features,
            "runtime": probe,
            "plan_format_version": kiln::plan::FORMAT_VERSION,
        }));
    }
    println!("kiln {}", kiln::VERSION);
    let rows = vec![
        vec!["  commit".to_string(), GIT_COMMIT.to_string()],
        vec![
            "  built".to_string(),
            format!("{BUILD_DATE} ({PROFILE} profile)"),
        ],
        vec!["  target".to_string(), TARGET.to_string()],
        vec![
            "  backends".to_string(),
            format!(
                "{} (CUDA driver {})",
                BACKENDS.join(", "),
                if kiln_cuda::driver_present() {
                    "found"
                } else {
                    "not found"
                }
            ),
        ],
        vec![
            "  cpu".to_string(),
            format!(
                "{} with {}",
                std::env::consts::ARCH,
                if features.is_empty() {
                    "no extra features".into()
                } else {
                    features.join(" ")
                }
            ),
        ],
        vec![
            "  version number".to_string(),
            format!(
                "{} (C API: KILN_VERSION, kiln_get_version())",
                version_number()
            ),
        ],
        vec![
            "  plan format".to_string(),
            kiln::plan::FORMAT_VERSION.to_string(),
        ],
    ];
    let mut rows = rows;
    for (key, _) in GPU_LIBRARIES {
        let status = probe[key]["status"].as_str().unwrap_or("not found");
        rows.push(vec![
            format!("  {}", key.replace('_', " ")),
            status.to_string(),
        ]);
    }
    print!("{}", common::table(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_library_by_file_name() {
        let dir = std::env::temp_dir().join(format!("kiln-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "libcuda.so",
            "libcuda.so.1",
            "libcuda.so.580.159.04",
            "libcudadebugger.so.1",
            "libcublasLt.so.13",
            "libcublas.so.13.0.2.14",
            "libcublas.so.12.9.1.4",
        ] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let dirs = [dir.join("absent"), dir.clone()];
        let (path, v) = find_library(&dirs, "libcuda.so").unwrap();
        assert_eq!(v.as_deref(), Some("580.159.04"));
        assert!(path.ends_with("libcuda.so.580.159.04"));
        let (_, v) = find_library(&dirs, "libcublas.so").unwrap();
        assert_eq!(v.as_deref(), Some("13.0.2.14"));
        assert!(find_library(&dirs, "libcudnn.so").is_none());
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(
            parse_driver_version(
                "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build\n"
            )
            .as_deref(),
            Some("580.159.04")
        );
        assert_eq!(version_number(), {
            let n: Vec<u64> = kiln::VERSION
                .split('.')
                .map(|p| p.parse().unwrap())
                .collect();
            n[0] * 10000 + n[1] * 100 + n[2]
        });
    }
}
