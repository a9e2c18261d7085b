//! Status codes, the per-thread last error, and the boundary guard every `extern "C"`
//! function runs its body in (argument checks, panics caught).

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kiln_core::KilnError;

/// The result of every kiln C function. On anything but `KILN_STATUS_OK`,
/// `kiln_last_error()` describes what went wrong.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilnStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// An argument is malformed: a string that is not UTF-8, a bad shape, an index out of
    /// range, a dimension below zero.
    InvalidArgument = 2,
    /// The ONNX model cannot be read or is malformed.
    InvalidModel = 3,
    /// The model uses something kiln does not support (an operator, a dtype, a device).
    Unsupported = 4,
    /// The plan file cannot be loaded (magic, format version, checksum, device).
    InvalidPlan = 5,
    /// An input does not fit the engine (name, dtype, rank, fixed dimension, missing).
    BadInput = 6,
    /// An input shape is outside the active optimization profile.
    ShapeOutsideProfile = 7,
    /// A buffer's size does not match the tensor (or a dims array is too short).
    BufferSize = 8,
    /// A file could not be read or written.
    Io = 9,
    /// Inference failed in a layer.
    RuntimeError = 10,
    /// A bug in kiln (a caught panic); please report it.
    InternalError = 11,
}

/// An error on its way to C: a status and a message.
#[derive(Debug)]
pub struct CError {
    /// Status code returned.
    pub status: KilnStatus,
    /// Message for `kiln_last_error`.
    pub msg: String,
}

impl CError {
    /// An error with a status and a message.
    pub fn new(status: KilnStatus, msg: impl Into<String>) -> CError {
        CError {
            status,
            msg: msg.into(),
        }
    }
}

impl From<KilnError> for CError {
    fn from(e: KilnError) -> CError {
        let status = match &e {
            KilnError::InvalidModel(_) | KilnError::InvalidNode { .. } => KilnStatus::InvalidModel,
            KilnError::UnsupportedOp { .. } | KilnError::UnsupportedDType { .. } => {
                KilnStatus::Unsupported
            }
            KilnError::InvalidPlan(_) => KilnStatus::InvalidPlan,
            KilnError::BadInput { .. } => KilnStatus::BadInput,
            KilnError::ShapeOutsideProfile { .. } => KilnStatus::ShapeOutsideProfile,
            KilnError::Io { .. } => KilnStatus::Io,
            KilnError::Inference { .. } | KilnError::Kernel { .. } => KilnStatus::RuntimeError,
            _ => KilnStatus::InvalidArgument,
        };
        CError::new(status, e.to_string())
    }
}

/// Result type of function bodies.
pub type CResult<T> = Result<T, CError>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // Interior NULs cannot be represented in a C string: replace them.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// The message of the last failed kiln call on this thread ("" when none failed yet).
/// The string belongs to kiln and stays valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    static EMPTY: &CStr = c"";
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|e| e.borrow().as_ptr())
            .unwrap_or(EMPTY.as_ptr())
    })
    .unwrap_or(EMPTY.as_ptr())
}

/// Runs a function body at the C boundary: its error becomes a status and the thread's
/// last error; a panic becomes `InternalError` instead of unwinding into C.
pub fn guard(body: impl FnOnce() -> CResult<()>) -> KilnStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => KilnStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.msg);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error in kiln (this is a bug; please report it): {what}"
            ));
            KilnStatus::InternalError
        }
    }
}

/// Drops a boxed handle created by kiln, catching a panic in a destructor.
pub fn destroy<T>(p: *mut T) {
    if p.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: non-null handles passed to `kiln_*_destroy` were created by
        // `Box::into_raw` in this library and are destroyed once (the API's contract).
        drop(unsafe { Box::from_raw(p) });
    }));
}

/// A shared reference from a handle pointer, or `NullPointer` naming the argument.
pub fn handle<'a, T>(p: *const T, what: &str) -> CResult<&'a T> {
    // SAFETY: non-null handles were created by this library (Box::into_raw) and are alive
    // until destroyed (the API's contract).
    unsafe { p.as_ref() }
        .ok_or_else(|| CError::new(KilnStatus::NullPointer, format!("{what} is NULL")))
}

/// A mutable reference from a handle pointer, or `NullPointer` naming the argument.
pub fn handle_mut<'a, T>(p: *mut T, what: &str) -> CResult<&'a mut T> {
    // SAFETY: as in `handle`; the API's contract gives the caller's thread exclusive use.
    unsafe { p.as_mut() }
        .ok_or_else(|| CError::new(KilnStatus::NullPointer, format!("{what} is NULL")))
}

/// A Rust string from a C string, or `NullPointer` / `InvalidArgument` (not UTF-8).
pub fn string<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    if p.is_null() {
        return Err(CError::new(
            KilnStatus::NullPointer,
            format!("{what} is NULL"),
        ));
    }
    // SAFETY: non-null; the caller passes a NUL-terminated string (the API's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| {
        CError::new(
            KilnStatus::InvalidArgument,
            format!("{what} is not valid UTF-8 ({e})"),
        )
    })
}

/// Writes `value` through an out-pointer, or `NullPointer` naming it.
pub fn write_out<T>(out: *mut T, value: T, what: &str) -> CResult<()> {
    if out.is_null() {
        return Err(CError::new(
            KilnStatus::NullPointer,
            format!("{what} is NULL"),
        ));
    }
    // SAFETY: non-null; the caller passes a pointer to writable memory for one T.
    unsafe { out.write(value) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: kiln_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(kiln_last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn panics_become_internal_errors() {
        let s = guard(|| panic!("boom"));
        assert_eq!(s, KilnStatus::InternalError);
        assert!(last().contains("boom"), "{}", last());
    }

    #[test]
    fn null_and_bad_utf8_are_errors() {
        assert_eq!(
            guard(|| string(std::ptr::null(), "path").map(|_| ())),
            KilnStatus::NullPointer
        );
        assert!(last().contains("path is NULL"));
        let bad = [0xffu8, 0xfe, 0];
        assert_eq!(
            guard(|| string(bad.as_ptr().cast(), "name").map(|_| ())),
            KilnStatus::InvalidArgument
        );
        assert!(last().contains("UTF-8"));
    }

    #[test]
    fn last_error_is_per_thread() {
        let _ = guard(|| Err(CError::new(KilnStatus::Io, "main thread")));
        std::thread::spawn(|| assert_eq!(last(), ""))
            .join()
            .unwrap();
        assert_eq!(last(), "main thread");
    }
}
