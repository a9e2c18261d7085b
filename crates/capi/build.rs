//! Generates the data symbol `kiln_version_<major>_<minor>_<patch>` from the package
//! version, so `nm -D libkiln.so | grep kiln_version` shows the version (as TensorRT's
//! `tensorrt_version_*` symbol does).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let v = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("cargo sets {k}"));
    let (major, minor, patch) = (
        v("CARGO_PKG_VERSION_MAJOR"),
        v("CARGO_PKG_VERSION_MINOR"),
        v("CARGO_PKG_VERSION_PATCH"),
    );
    let code = format!(
        "/// The library's version as a data symbol in the dynamic symbol table; its value is\n\
         /// [`KILN_VERSION`](crate::version::KILN_VERSION).\n\
         #[no_mangle]\n\
         #[used]\n\
         #[allow(non_upper_case_globals)]\n\
         pub static kiln_version_{major}_{minor}_{patch}: u32 = crate::version::KILN_VERSION;\n"
    );
    let out = PathBuf::from(v("OUT_DIR")).join("version_symbol.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}
