//! Scalar arithmetic traits implemented for every numeric element type, so elementwise
//! and reduction kernels are written once with ONNX (numpy) semantics: integer arithmetic
//! wraps, integer division truncates toward zero (division by zero gives 0 instead of
//! trapping), float max/min propagate NaN.

use half::{bf16, f16};
use kiln_core::Element;

/// Arithmetic on one numeric element type (floats, signed and unsigned integers).
pub trait Num: Element + PartialOrd + Default {
    /// True for float types.
    const FLOAT: bool;
    /// True for signed types (floats included).
    const SIGNED: bool;
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// The smallest value (-inf for floats).
    const LOWEST: Self;
    /// The largest value (+inf for floats).
    const HIGHEST: Self;
    /// Converts to f64.
    fn as_f64(self) -> f64;
    /// Converts from f64 with Rust `as` semantics (saturating, NaN → 0 for integers).
    fn of_f64(v: f64) -> Self;
    /// Converts to i64 (wrapping for u64, truncating for floats).
    fn as_i64(self) -> i64;
    /// Converts from i64 (wrapping).
    fn of_i64(v: i64) -> Self;
    /// Addition (wrapping for integers).
    fn addv(self, o: Self) -> Self;
    /// Subtraction (wrapping for integers).
    fn subv(self, o: Self) -> Self;
    /// Multiplication (wrapping for integers).
    fn mulv(self, o: Self) -> Self;
    /// Division; integers truncate toward zero and give 0 when dividing by 0.
    fn divv(self, o: Self) -> Self;
    /// C `fmod` remainder (sign of the dividend); integer x % 0 gives 0.
    fn rem_c(self, o: Self) -> Self;
    /// Python remainder (sign of the divisor) for integers; `fmod` with NaN → 0 for floats
    /// (as ONNX's reference does).
    fn rem_py(self, o: Self) -> Self;
    /// Maximum, NaN-propagating for floats.
    fn maxv(self, o: Self) -> Self;
    /// Minimum, NaN-propagating for floats.
    fn minv(self, o: Self) -> Self;
    /// Absolute value (wrapping for the most negative integer).
    fn absv(self) -> Self;
    /// Negation (wrapping for integers).
    fn negv(self) -> Self;
    /// -1, 0 or 1 (NaN for NaN).
    fn signv(self) -> Self;
    /// True for NaN.
    fn is_nan_v(self) -> bool {
        false
    }
}

/// Integer-only operations (bitwise ops, integer power).
pub trait Int: Num {
    /// Bitwise and.
    fn and(self, o: Self) -> Self;
    /// Bitwise or.
    fn or(self, o: Self) -> Self;
    /// Bitwise xor.
    fn xor(self, o: Self) -> Self;
    /// Bitwise not.
    fn not(self) -> Self;
    /// Left shift; shifting by the bit width or more gives 0.
    fn shl(self, o: Self) -> Self;
    /// Right shift; shifting by the bit width or more gives 0.
    fn shr(self, o: Self) -> Self;
    /// Integer power (wrapping); negative exponents give 0 except for bases 1 and -1.
    fn powi(self, e: i64) -> Self;
}

macro_rules! int_common {
    ($t:ty) => {
        const ZERO: Self = 0;
        const ONE: Self = 1;
        const LOWEST: Self = <$t>::MIN;
        const HIGHEST: Self = <$t>::MAX;
        fn as_f64(self) -> f64 {
            self as f64
        }
        fn of_f64(v: f64) -> Self {
            v as $t
        }
        fn as_i64(self) -> i64 {
            self as i64
        }
        fn of_i64(v: i64) -> Self {
            v as $t
        }
        fn addv(self, o: Self) -> Self {
            self.wrapping_add(o)
        }
        fn subv(self, o: Self) -> Self {
            self.wrapping_sub(o)
        }
        fn mulv(self, o: Self) -> Self {
            self.wrapping_mul(o)
        }
        fn divv(self, o: Self) -> Self {
            if o == 0 {
                0
            } else {
                self.wrapping_div(o)
            }
        }
        fn rem_c(self, o: Self) -> Self {
            if o == 0 {
                0
            } else {
                self.wrapping_rem(o)
            }
        }
        fn maxv(self, o: Self) -> Self {
            if self >= o {
                self
            } else {
                o
            }
        }
        fn minv(self, o: Self) -> Self {
            if self <= o {
                self
            } else {
                o
            }
        }
    };
}

macro_rules! int_bits {
    ($t:ty) => {
        impl Int for $t {
            fn and(self, o: Self) -> Self {
                self & o
            }
            fn or(self, o: Self) -> Self {
                self | o
            }
            fn xor(self, o: Self) -> Self {
                self ^ o
            }
            fn not(self) -> Self {
                !self
            }
            fn shl(self, o: Self) -> Self {
                u32::try_from(o)
                    .ok()
                    .and_then(|s| self.checked_shl(s))
                    .unwrap_or(0)
            }
            fn shr(self, o: Self) -> Self {
                u32::try_from(o)
                    .ok()
                    .and_then(|s| self.checked_shr(s))
                    .unwrap_or(0)
            }
            fn powi(self, e: i64) -> Self {
                if e < 0 {
                    return match self.as_i64() {
                        1 => 1,
                        -1 => {
                            if e % 2 == 0 {
                                1
                            } else {
                                Self::of_i64(-1)
                            }
                        }
                        _ => 0,
                    };
                }
                let mut base = self;
                let mut acc: $t = 1;
                let mut e = e as u64;
                while e > 0 {
                    if e & 1 == 1 {
                        acc = acc.wrapping_mul(base);
                    }
                    base = base.wrapping_mul(base);
                    e >>= 1;
                }
                acc
            }
        }
    };
}

macro_rules! signed_int {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = false;
            const SIGNED: bool = true;
            int_common!($t);
            fn rem_py(self, o: Self) -> Self {
                if o == 0 {
                    return 0;
                }
                let r = self.wrapping_rem(o);
                if r != 0 && ((r < 0) != (o < 0)) {
                    r.wrapping_add(o)
                } else {
                    r
                }
            }
            fn absv(self) -> Self {
                self.wrapping_abs()
            }
            fn negv(self) -> Self {
                self.wrapping_neg()
            }
            fn signv(self) -> Self {
                self.signum()
            }
        }
        int_bits!($t);
    )*};
}

macro_rules! unsigned_int {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = false;
            const SIGNED: bool = false;
            int_common!($t);
            fn rem_py(self, o: Self) -> Self {
                self.rem_c(o)
            }
            fn absv(self) -> Self {
                self
            }
            fn negv(self) -> Self {
                self.wrapping_neg()
            }
            fn signv(self) -> Self {
                (self != 0) as $t
            }
        }
        int_bits!($t);
    )*};
}

signed_int!(i8, i16, i32, i64);
unsigned_int!(u8, u16, u32, u64);

macro_rules! native_float {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = true;
            const SIGNED: bool = true;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const LOWEST: Self = <$t>::NEG_INFINITY;
            const HIGHEST: Self = <$t>::INFINITY;
            fn as_f64(self) -> f64 { self as f64 }
            fn of_f64(v: f64) -> Self { v as $t }
            fn as_i64(self) -> i64 { self as i64 }
            fn of_i64(v: i64) -> Self { v as $t }
            fn addv(self, o: Self) -> Self { self + o }
            fn subv(self, o: Self) -> Self { self - o }
            fn mulv(self, o: Self) -> Self { self * o }
            fn divv(self, o: Self) -> Self { self / o }
            fn rem_c(self, o: Self) -> Self { self % o }
            fn rem_py(self, o: Self) -> Self {
                let r = self % o;
                if r.is_nan() { 0.0 } else { r }
            }
            fn maxv(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if self >= o { self } else { o }
            }
            fn minv(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if self <= o { self } else { o }
            }
            fn absv(self) -> Self { self.abs() }
            fn negv(self) -> Self { -self }
            fn signv(self) -> Self {
                if self > 0.0 { 1.0 } else if self < 0.0 { -1.0 } else { self }
            }
            fn is_nan_v(self) -> bool { self.is_nan() }
        }
    )*};
}
native_float!(f32, f64);

macro_rules! half_float {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = true;
            const SIGNED: bool = true;
            const ZERO: Self = <$t>::ZERO;
            const ONE: Self = <$t>::ONE;
            const LOWEST: Self = <$t>::NEG_INFINITY;
            const HIGHEST: Self = <$t>::INFINITY;
            fn as_f64(self) -> f64 { self.to_f64() }
            fn of_f64(v: f64) -> Self { <$t>::from_f64(v) }
            fn as_i64(self) -> i64 { self.to_f32() as i64 }
            fn of_i64(v: i64) -> Self { <$t>::from_f64(v as f64) }
            fn addv(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn subv(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() - o.to_f32()) }
            fn mulv(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn divv(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() / o.to_f32()) }
            fn rem_c(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() % o.to_f32()) }
            fn rem_py(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().rem_py(o.to_f32())) }
            fn maxv(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().maxv(o.to_f32())) }
            fn minv(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().minv(o.to_f32())) }
            fn absv(self) -> Self { <$t>::from_f32(self.to_f32().abs()) }
            fn negv(self) -> Self { -self }
            fn signv(self) -> Self { <$t>::from_f32(self.to_f32().signv()) }
            fn is_nan_v(self) -> bool { self.is_nan() }
        }
    )*};
}
half_float!(f16, bf16);

/// Float element types, with math through `num_traits::Float` (half types compute in f32).
pub trait Real: Num + num_traits::Float {
    /// Converts to f32.
    fn to_f32v(self) -> f32;
    /// Converts from f32.
    fn from_f32v(v: f32) -> Self;
}

impl Real for f32 {
    fn to_f32v(self) -> f32 {
        self
    }
    fn from_f32v(v: f32) -> Self {
        v
    }
}
impl Real for f64 {
    fn to_f32v(self) -> f32 {
        self as f32
    }
    fn from_f32v(v: f32) -> Self {
        v as f64
    }
}
impl Real for f16 {
    fn to_f32v(self) -> f32 {
        self.to_f32()
    }
    fn from_f32v(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl Real for bf16 {
    fn to_f32v(self) -> f32 {
        self.to_f32()
    }
    fn from_f32v(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Runs `$body` with `$T` bound to each integer Rust type, `$other` otherwise.
macro_rules! dispatch_int {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
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
pub(crate) use dispatch_int;
