//! Macros that run one generic body per dtype, so a kernel is written once.

/// Runs `$body` with `$T` bound to the Rust type of a float dtype (f32, f64, f16, bf16);
/// evaluates `$other` for any other dtype.
#[macro_export]
macro_rules! dispatch_float {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            kiln_core::DType::F32 => {
                type $T = f32;
                $body
            }
            kiln_core::DType::F64 => {
                type $T = f64;
                $body
            }
            kiln_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            kiln_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            _ => $other,
        }
    };
}

/// Runs `$body` with `$T` bound to the Rust type of any numeric dtype (floats and
/// integers; bool is excluded); evaluates `$other` otherwise.
#[macro_export]
macro_rules! dispatch_numeric {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            kiln_core::DType::F32 => {
                type $T = f32;
                $body
            }
            kiln_core::DType::F64 => {
                type $T = f64;
                $body
            }
            kiln_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            kiln_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            kiln_core::DType::I8 => {
                type $T = i8;
                $body
            }
            kiln_core::DType::I16 => {
                type $T = i16;
                $body
            }
            kiln_core::DType::I32 => {
                type $T = i32;
                $body
            }
            kiln_core::DType::I64 => {
                type $T = i64;
                $body
            }
            kiln_core::DType::U8 => {
                type $T = u8;
                $body
            }
            kiln_core::DType::U16 => {
                type $T = u16;
                $body
            }
            kiln_core::DType::U32 => {
                type $T = u32;
                $body
            }
            kiln_core::DType::U64 => {
                type $T = u64;
                $body
            }
            _ => $other,
        }
    };
}

/// Runs `$body` with `$T` bound to a Rust type whose bytes match the dtype's layout
/// (bool as u8); for data movement ops (gather, concat, transpose) that never look at
/// values. Strings evaluate `$other`.
#[macro_export]
macro_rules! dispatch_pod {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype.size() {
            1 => {
                type $T = u8;
                $body
            }
            2 => {
                type $T = u16;
                $body
            }
            4 => {
                type $T = u32;
                $body
            }
            8 => {
                type $T = u64;
                $body
            }
            _ => $other,
        }
    };
}
