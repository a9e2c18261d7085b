//! Version numbers: the header's `KILN_VERSION_*` macros, `kiln_get_version()` and the
//! `kiln_version_<major>_<minor>_<patch>` data symbol all say the same version.

use std::ffi::c_char;

/// kiln's major version.
pub const KILN_VERSION_MAJOR: u32 = 0;
/// kiln's minor version.
pub const KILN_VERSION_MINOR: u32 = 1;
/// kiln's patch version.
pub const KILN_VERSION_PATCH: u32 = 0;
/// The version as one number: major * 10000 + minor * 100 + patch (0.1.0 is 100, 1.2.3 is
/// 10203). Compare it with `kiln_get_version()` to check that the header and the library
/// agree.
pub const KILN_VERSION: u32 =
    KILN_VERSION_MAJOR * 10000 + KILN_VERSION_MINOR * 100 + KILN_VERSION_PATCH;

/// The library's version as one number (same encoding as the `KILN_VERSION` macro).
#[no_mangle]
pub extern "C" fn kiln_get_version() -> u32 {
    KILN_VERSION
}

/// The library's version as a string, `"major.minor.patch"` (static, never freed).
#[no_mangle]
pub extern "C" fn kiln_get_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_package_version() {
        let parse = |s: &str| s.parse::<u32>().unwrap();
        assert_eq!(KILN_VERSION_MAJOR, parse(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(KILN_VERSION_MINOR, parse(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(KILN_VERSION_PATCH, parse(env!("CARGO_PKG_VERSION_PATCH")));
        assert_eq!(kiln_get_version(), KILN_VERSION);
        const { assert!(KILN_VERSION_MINOR < 100 && KILN_VERSION_PATCH < 100) };
        assert_eq!(kiln_rt::VERSION, env!("CARGO_PKG_VERSION"));
        // SAFETY: the string is a static NUL-terminated literal.
        let s = unsafe { std::ffi::CStr::from_ptr(kiln_get_version_string()) };
        assert_eq!(s.to_str().unwrap(), kiln_rt::VERSION);
    }
}
