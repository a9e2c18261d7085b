//! Build configurations: device, fixed shapes, optimization profiles.

use std::ffi::c_char;

use kiln_rt::{parse_shapes, BuilderConfig, OptimizationProfile};

use crate::error::{destroy, guard, handle_mut, string, write_out, CError, KilnStatus};

/// How to build an engine from an ONNX model (opaque). Defaults: device `auto`, no fixed
/// shapes, no profiles (any shape the model allows), optimisations on.
pub struct KilnBuildConfig {
    pub(crate) config: BuilderConfig,
}

fn spec(
    p: *const c_char,
    what: &str,
) -> Result<std::collections::BTreeMap<String, Vec<usize>>, CError> {
    let s = string(p, what)?;
    parse_shapes(s).map_err(|e| CError::new(KilnStatus::InvalidArgument, format!("{what}: {e}")))
}

/// Creates a build configuration with the defaults; release it with
/// `kiln_build_config_destroy`.
#[no_mangle]
pub extern "C" fn kiln_build_config_create(out: *mut *mut KilnBuildConfig) -> KilnStatus {
    guard(|| {
        let cfg = Box::new(KilnBuildConfig {
            config: BuilderConfig::default(),
        });
        write_out(out, Box::into_raw(cfg), "out")
    })
}

/// Releases a build configuration (NULL is ignored).
#[no_mangle]
pub extern "C" fn kiln_build_config_destroy(config: *mut KilnBuildConfig) {
    destroy(config)
}

/// Sets the target device: `"auto"`, `"cpu"` or `"cuda"`.
#[no_mangle]
pub extern "C" fn kiln_build_config_set_device(
    config: *mut KilnBuildConfig,
    device: *const c_char,
) -> KilnStatus {
    guard(|| {
        let cfg = handle_mut(config, "config")?;
        let d = string(device, "device")?;
        cfg.config.device = d.parse().map_err(|e: kiln_rt::KilnError| {
            CError::new(KilnStatus::InvalidArgument, e.to_string())
        })?;
        Ok(())
    })
}

/// Specialises the engine to fixed input shapes, written like the CLI's `--shapes`:
/// `"x:1x3x224x224,y:4"` (a scalar is `"name:"`). Same as one profile with
/// min = opt = max; cannot be combined with `kiln_build_config_add_profile`.
#[no_mangle]
pub extern "C" fn kiln_build_config_set_shapes(
    config: *mut KilnBuildConfig,
    shapes: *const c_char,
) -> KilnStatus {
    guard(|| {
        let cfg = handle_mut(config, "config")?;
        cfg.config.shapes = spec(shapes, "shapes")?;
        Ok(())
    })
}

/// Adds an optimization profile: the smallest, the tuning and the largest shape of each
/// dynamic input, each written like `"x:1x3x64x64,y:1x4"` (the same inputs in all three).
/// Profiles are numbered in the order they are added, from 0.
#[no_mangle]
pub extern "C" fn kiln_build_config_add_profile(
    config: *mut KilnBuildConfig,
    min_shapes: *const c_char,
    opt_shapes: *const c_char,
    max_shapes: *const c_char,
) -> KilnStatus {
    guard(|| {
        let cfg = handle_mut(config, "config")?;
        let p = OptimizationProfile::new(
            spec(min_shapes, "min_shapes")?,
            spec(opt_shapes, "opt_shapes")?,
            spec(max_shapes, "max_shapes")?,
        )?;
        cfg.config.profiles.push(p);
        Ok(())
    })
}
