//! NVRTC: CUDA C source to CUBIN for one architecture. Used when an engine is built; plans
//! store the CUBIN images so loading a plan never compiles.

use std::ffi::CString;

use cudarc::nvrtc::{result, sys};
use kiln_core::{KilnError, Result};

/// Include directories handed to NVRTC: `$KILN_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, then `/usr/local/cuda/include`.
pub fn include_paths() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("KILN_CUDA_INCLUDE") {
        v.push(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            v.push(format!("{p}/include"));
        }
    }
    v.push("/usr/local/cuda/include".into());
    v
}

/// The NVRTC options kiln compiles with for `arch` (e.g. `sm_90`).
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    for p in include_paths() {
        o.push(format!("--include-path={p}"));
    }
    o
}

fn nvrtc_err(module: &str, what: impl std::fmt::Display) -> KilnError {
    KilnError::Other(format!("NVRTC: module {module}: {what}"))
}

/// Compiles `code` to a CUBIN for `arch`. A compile error carries NVRTC's log.
pub fn compile_cubin(module: &str, code: &str, arch: &str) -> Result<Vec<u8>> {
    // SAFETY: probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(nvrtc_err(
            module,
            "libnvrtc could not be loaded (set LD_LIBRARY_PATH to CUDA's lib64)",
        ));
    }
    let src = CString::new(code).map_err(|_| nvrtc_err(module, "source holds a NUL byte"))?;
    let name = CString::new(format!("{module}.cu")).map_err(|_| nvrtc_err(module, "bad name"))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err(module, e))?;
    let opts = options(arch);
    // SAFETY: `prog` is a live program; options are plain strings.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(e) => {
            // SAFETY: `prog` is live; the log is a NUL-terminated buffer.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(nvrtc_err(module, format!("{e:?}: {log}")))
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; writes one size.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| nvrtc_err(module, format!("CUBIN size: {e:?}")))?;
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` holds exactly the size NVRTC reported.
            unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char) }
                .result()
                .map_err(|e| nvrtc_err(module, format!("CUBIN: {e:?}")))?;
            Ok(buf)
        }
    };
    // SAFETY: destroys the program created above, once.
    unsafe { result::destroy_program(prog) }.map_err(|e| nvrtc_err(module, e))?;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_arch_and_headers() {
        let o = options("sm_90");
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(o
            .iter()
            .any(|s| s == "--include-path=/usr/local/cuda/include"));
    }
}
