//! `kiln version`: version and build details.

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

/// Runs `kiln version`.
pub fn run(a: VersionArgs) -> CliResult<()> {
    let features = kiln::fingerprint::cpu_features();
    if a.json {
        return common::print_json(&serde_json::json!({
            "version": kiln::VERSION,
            "git_commit": GIT_COMMIT,
            "build_date": BUILD_DATE,
            "profile": PROFILE,
            "target": TARGET,
            "arch": std::env::consts::ARCH,
            "backends": BACKENDS,
            "cuda_driver_found": kiln_cuda::driver_present(),
            "cpu_features": features,
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
            "  plan format".to_string(),
            kiln::plan::FORMAT_VERSION.to_string(),
        ],
    ];
    print!("{}", common::table(&rows));
    Ok(())
}
