//! Low-precision element formats of ONNX: float8 (E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ),
//! the exponent-only E8M0, float4 E2M1 and the 4-bit integers.
//!
//! In memory every element takes one byte: the 8-bit formats hold their bit pattern, the
//! 4-bit formats hold their 4-bit code in the low nibble (INT4 sign-extended to a full `i8`).
//! ONNX storage packs 4-bit elements two per byte, low nibble first ([`pack_4bit`],
//! [`unpack_4bit`]).
//!
//! Conversions follow ONNX's reference implementation (`onnx.numpy_helper`, which uses
//! `ml_dtypes`): round to nearest, ties to even; `saturate` clamps out-of-range values
//! (infinities included) to the largest finite value; without it they become NaN for the
//! formats without infinities (FN: `S.1111.111`, FNUZ: `0x80`) and infinity for E5M2.
//! FNUZ formats have no negative zero. FLOAT4E2M1 has neither infinity nor NaN and always
//! saturates.

use crate::dtype::DType;

/// Parameters of a small float format with sign, `exp` exponent bits and `man` mantissa bits.
#[derive(Debug, Clone, Copy)]
struct MiniFloat {
    man: u32,
    bias: i32,
    /// Largest finite bit pattern (positive).
    max_code: u8,
    /// How infinities and NaNs are represented.
    kind: Special,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    /// IEEE-like: all-ones exponent is inf (zero mantissa) or NaN.
    Ieee,
    /// "Finite": no infinity; `S.1111.111` is NaN.
    Fn,
    /// "Finite, unsigned zero": no infinity, no negative zero; `0x80` is the only NaN.
    Fnuz,
    /// No infinity and no NaN (float4): everything saturates.
    None,
}

const E4M3FN: MiniFloat = MiniFloat {
    man: 3,
    bias: 7,
    max_code: 0x7E,
    kind: Special::Fn,
};
const E4M3FNUZ: MiniFloat = MiniFloat {
    man: 3,
    bias: 8,
    max_code: 0x7F,
    kind: Special::Fnuz,
};
const E5M2: MiniFloat = MiniFloat {
    man: 2,
    bias: 15,
    max_code: 0x7B,
    kind: Special::Ieee,
};
const E5M2FNUZ: MiniFloat = MiniFloat {
    man: 2,
    bias: 16,
    max_code: 0x7F,
    kind: Special::Fnuz,
};
const E2M1: MiniFloat = MiniFloat {
    man: 1,
    bias: 1,
    max_code: 0x7,
    kind: Special::None,
};

impl MiniFloat {
    /// Position of the sign bit.
    fn sign_bit(self) -> u8 {
        if self.kind == Special::None {
            0x8
        } else {
            0x80
        }
    }

    /// Value of a (sign-less) finite code.
    fn magnitude(self, code: u8) -> f64 {
        let e = (code >> self.man) as i32;
        let m = (code & ((1u8 << self.man) - 1)) as f64;
        let scale = (1u32 << self.man) as f64;
        if e == 0 {
            m / scale * 2f64.powi(1 - self.bias)
        } else {
            (1.0 + m / scale) * 2f64.powi(e - self.bias)
        }
    }

    fn decode(self, code: u8) -> f32 {
        let sign = self.sign_bit();
        let neg = code & sign != 0;
        let mag = code & (sign - 1);
        match self.kind {
            Special::Fnuz if code == 0x80 => return f32::NAN,
            Special::Fn if mag == 0x7F => return f32::NAN,
            Special::Ieee if mag >= 0x7C => {
                return if mag == 0x7C {
                    if neg {
                        f32::NEG_INFINITY
                    } else {
                        f32::INFINITY
                    }
                } else {
                    f32::NAN
                };
            }
            _ => {}
        }
        let v = self.magnitude(mag) as f32;
        if neg {
            -v
        } else {
            v
        }
    }

    /// The NaN pattern for a NaN of sign `neg` (None for float4).
    fn nan(self, neg: bool) -> u8 {
        let s = if neg { 0x80 } else { 0 };
        match self.kind {
            Special::Fn => 0x7F | s,
            Special::Ieee => 0x7E | s,
            Special::Fnuz => 0x80,
            Special::None => 0,
        }
    }

    /// The pattern of an overflowing value of sign `neg` when not saturating.
    fn overflow(self, neg: bool) -> u8 {
        match self.kind {
            Special::Ieee => 0x7C | if neg { 0x80 } else { 0 },
            Special::Fn | Special::Fnuz => self.nan(neg),
            Special::None => self.max_code | if neg { self.sign_bit() } else { 0 },
        }
    }

    fn encode(self, x: f64, saturate: bool) -> u8 {
        let neg = x.is_sign_negative();
        let sign = if neg { self.sign_bit() } else { 0 };
        if x.is_nan() {
            // ml_dtypes maps NaN to float4 as a zero of the opposite sign.
            if self.kind == Special::None {
                return if neg { 0 } else { self.sign_bit() };
            }
            return self.nan(neg);
        }
        let saturate = saturate || self.kind == Special::None;
        let max = self.magnitude(self.max_code);
        let a = x.abs();
        if a.is_infinite() {
            return if saturate {
                self.max_code | sign
            } else {
                self.overflow(neg)
            };
        }
        let emin = 1 - self.bias;
        let e = if a == 0.0 {
            emin
        } else {
            (a.log2().floor() as i32).max(emin)
        };
        // Guard against log2 rounding: make 2^e <= a < 2^(e+1) hold exactly (for normals).
        let e = adjust_exp(a, e, emin);
        let step = 2f64.powi(e - self.man as i32);
        let q = (a / step).round_ties_even();
        let v = q * step;
        if v > max {
            return if saturate {
                self.max_code | sign
            } else {
                self.overflow(neg)
            };
        }
        if v == 0.0 {
            return if self.kind == Special::Fnuz { 0 } else { sign };
        }
        let code = self.code_of(v);
        code | sign
    }

    /// The code of a representable positive magnitude.
    fn code_of(self, v: f64) -> u8 {
        let emin = 1 - self.bias;
        let e = adjust_exp(v, (v.log2().floor() as i32).max(emin), emin);
        let unit = 1u32 << self.man;
        let q = (v / 2f64.powi(e - self.man as i32)) as u32;
        if q < unit {
            // Subnormal (only possible at e == emin).
            q as u8
        } else {
            let ef = (e + self.bias) as u32;
            ((ef << self.man) | (q - unit)) as u8
        }
    }
}

/// The exponent `e >= emin` with `2^e <= a < 2^(e+1)` (or `e == emin` for tiny values).
fn adjust_exp(a: f64, mut e: i32, emin: i32) -> i32 {
    while e > emin && 2f64.powi(e) > a {
        e -= 1;
    }
    while 2f64.powi(e + 1) <= a {
        e += 1;
    }
    e
}

fn minifloat(dtype: DType) -> Option<MiniFloat> {
    Some(match dtype {
        DType::F8E4M3FN => E4M3FN,
        DType::F8E4M3FNUZ => E4M3FNUZ,
        DType::F8E5M2 => E5M2,
        DType::F8E5M2FNUZ => E5M2FNUZ,
        DType::F4E2M1 => E2M1,
        _ => return None,
    })
}

/// Rounding of a conversion to FLOAT8E8M0 (the `round_mode` attribute of Cast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum E8M0Round {
    /// Round toward +infinity (to the next power of two); the default.
    #[default]
    Up,
    /// Truncate to the power of two below.
    Down,
    /// Round to the nearest power of two.
    Nearest,
}

impl E8M0Round {
    /// Parses the `round_mode` attribute ("up", "down", "nearest").
    pub fn parse(s: &str) -> Option<E8M0Round> {
        match s {
            "up" => Some(E8M0Round::Up),
            "down" => Some(E8M0Round::Down),
            "nearest" => Some(E8M0Round::Nearest),
            _ => None,
        }
    }
}

/// f32 → FLOAT8E8M0 (an unsigned power of two `2^(code-127)`, 0xFF is NaN), as ONNX's
/// `to_float8e8m0`: the sign is dropped, NaN and infinities become 0xFF; with `saturate` the
/// result never rounds up past 0xFE.
pub fn f32_to_e8m0(x: f32, saturate: bool, mode: E8M0Round) -> u8 {
    let bits = x.to_bits();
    let exp = (bits >> 23) & 0xFF;
    if exp == 0xFF {
        return 0xFF;
    }
    let round_up = match mode {
        E8M0Round::Down => false,
        E8M0Round::Up => bits & 0x7F_FFFF != 0,
        E8M0Round::Nearest => {
            let g = bits & 0x40_0000 != 0;
            let r = bits & 0x20_0000 != 0;
            let s = bits & 0x1F_FFFF != 0;
            let lsb = exp > 0;
            g && (r || s || lsb)
        }
    };
    if round_up && !(saturate && exp == 0xFE) {
        (exp + 1) as u8
    } else {
        exp as u8
    }
}

/// FLOAT8E8M0 → f32 (`2^(code-127)`, 0xFF is NaN).
pub fn e8m0_to_f32(code: u8) -> f32 {
    if code == 0xFF {
        return f32::NAN;
    }
    if code == 0 {
        // 2^-127 is an f32 subnormal.
        return f32::from_bits(0x0040_0000);
    }
    f32::from_bits((code as u32) << 23)
}

/// True for the dtypes of this module (float8, float8e8m0, float4, int4, uint4).
pub fn is_low_precision(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F8E4M3FN
            | DType::F8E4M3FNUZ
            | DType::F8E5M2
            | DType::F8E5M2FNUZ
            | DType::F8E8M0
            | DType::F4E2M1
            | DType::I4
            | DType::U4
    )
}

/// Decodes one stored byte of a low-precision `dtype` to f32 (None for other dtypes).
pub fn decode(dtype: DType, byte: u8) -> Option<f32> {
    if let Some(f) = minifloat(dtype) {
        return Some(f.decode(byte));
    }
    match dtype {
        DType::F8E8M0 => Some(e8m0_to_f32(byte)),
        DType::I4 => Some(byte as i8 as f32),
        DType::U4 => Some(byte as f32),
        _ => None,
    }
}

/// Encodes a number as one stored byte of a low-precision `dtype` with `Cast` semantics
/// (None for other dtypes). Floats round to nearest even (`saturate` as described in the
/// module docs; E8M0 rounds up, see [`encode_e8m0`] for the other modes); INT4/UINT4
/// truncate toward zero and wrap to 4 bits, like a C cast.
pub fn encode(dtype: DType, x: f64, saturate: bool) -> Option<u8> {
    if let Some(f) = minifloat(dtype) {
        return Some(f.encode(x, saturate));
    }
    match dtype {
        DType::F8E8M0 => Some(f32_to_e8m0(x as f32, saturate, E8M0Round::Up)),
        DType::I4 => Some(wrap_i4(int_of(x))),
        DType::U4 => Some((int_of(x) & 0xF) as u8),
        _ => None,
    }
}

/// Encodes an integer with `Cast` semantics (exact for large integers, unlike through f64).
pub fn encode_int(dtype: DType, v: i64, saturate: bool) -> Option<u8> {
    match dtype {
        DType::I4 => Some(wrap_i4(v)),
        DType::U4 => Some((v & 0xF) as u8),
        _ => encode(dtype, v as f64, saturate),
    }
}

/// The stored byte of an INT4 from the low 4 bits of `v` (sign-extended).
fn wrap_i4(v: i64) -> u8 {
    ((((v & 0xF) as u8) << 4) as i8 >> 4) as u8
}

/// Float → integer truncating toward zero (NaN → 0, saturating at the i64 range).
fn int_of(x: f64) -> i64 {
    x as i64
}

/// Encodes with saturation to the 4-bit integer range and round-half-even for floats, as
/// QuantizeLinear does (for INT4/UINT4: clamp to [-8, 7] / [0, 15]).
pub fn encode_saturating_int(dtype: DType, x: f64) -> Option<u8> {
    match dtype {
        DType::I4 => Some((x.round_ties_even().clamp(-8.0, 7.0) as i8) as u8),
        DType::U4 => Some(x.round_ties_even().clamp(0.0, 15.0) as u8),
        _ => None,
    }
}

/// Normalises a stored byte of `dtype`: INT4 is sign-extended from its low nibble, UINT4 and
/// FLOAT4E2M1 keep only the low nibble; other dtypes are unchanged.
pub fn normalize_byte(dtype: DType, b: u8) -> u8 {
    match dtype {
        DType::I4 => wrap_i4(b as i64),
        DType::U4 | DType::F4E2M1 => b & 0xF,
        _ => b,
    }
}

/// True for the 4-bit dtypes, stored packed two per byte by ONNX.
pub fn is_4bit(dtype: DType) -> bool {
    matches!(dtype, DType::I4 | DType::U4 | DType::F4E2M1)
}

/// Unpacks `n` 4-bit elements stored two per byte (low nibble first) to one byte each,
/// normalised for `dtype` (see [`normalize_byte`]). Needs `n.div_ceil(2)` bytes.
pub fn unpack_4bit(dtype: DType, packed: &[u8], n: usize) -> Option<Vec<u8>> {
    if packed.len() != n.div_ceil(2) {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let b = packed[i / 2];
        let nib = if i % 2 == 0 { b & 0xF } else { b >> 4 };
        out.push(normalize_byte(dtype, nib));
    }
    Some(out)
}

/// Packs one-byte-per-element 4-bit values two per byte (low nibble first; an odd count
/// leaves the last high nibble zero).
pub fn pack_4bit(unpacked: &[u8]) -> Vec<u8> {
    unpacked
        .chunks(2)
        .map(|c| (c[0] & 0xF) | (c.get(1).copied().unwrap_or(0) & 0xF) << 4)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(d: DType, x: f32, sat: bool) -> u8 {
        encode(d, x as f64, sat).unwrap()
    }

    fn dec(d: DType, b: u8) -> f32 {
        decode(d, b).unwrap()
    }

    #[test]
    fn e4m3fn_known_patterns() {
        let d = DType::F8E4M3FN;
        assert_eq!(enc(d, 448.0, true), 0x7E);
        assert_eq!(dec(d, 0x7E), 448.0);
        assert_eq!(enc(d, -448.0, true), 0xFE);
        assert_eq!(enc(d, 1.0, true), 0x38);
        assert_eq!(enc(d, 1e6, true), 0x7E);
        assert_eq!(enc(d, -1e6, true), 0xFE);
        assert_eq!(enc(d, 1e6, false), 0x7F);
        assert_eq!(enc(d, -1e6, false), 0xFF);
        assert_eq!(enc(d, f32::INFINITY, true), 0x7E);
        assert_eq!(enc(d, f32::INFINITY, false), 0x7F);
        assert_eq!(enc(d, f32::NAN, true), 0x7F);
        assert_eq!(enc(d, -f32::NAN, true), 0xFF);
        // Ties to even at the top: 464 lies between 448 and (NaN's) 480.
        assert_eq!(enc(d, 464.0, false), 0x7E);
        assert_eq!(enc(d, 470.0, false), 0x7F);
        assert_eq!(enc(d, -0.0, true), 0x80);
        assert_eq!(enc(d, 1e-7, true), 0x00);
        assert_eq!(enc(d, -1e-7, true), 0x80);
        // Smallest subnormal 2^-9 and rounding around it.
        assert_eq!(enc(d, 2f32.powi(-9), true), 0x01);
        assert_eq!(dec(d, 0x01), 2f32.powi(-9));
        assert_eq!(enc(d, 2f32.powi(-10), true), 0x00);
        assert_eq!(enc(d, 1.5 * 2f32.powi(-10), true), 0x01);
        assert_eq!(dec(d, 0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(dec(d, 0x08), 2f32.powi(-6));
        assert!(dec(d, 0x7F).is_nan() && dec(d, 0xFF).is_nan());
        // 1.0625 ties between 1.0 (even) and 1.125.
        assert_eq!(enc(d, 1.0625, true), 0x38);
        assert_eq!(enc(d, 1.1875, true), 0x3A);
    }

    #[test]
    fn e4m3fnuz_and_e5m2fnuz() {
        let d = DType::F8E4M3FNUZ;
        assert_eq!(enc(d, 240.0, true), 0x7F);
        assert_eq!(dec(d, 0x7F), 240.0);
        assert_eq!(enc(d, 1e6, true), 0x7F);
        assert_eq!(enc(d, -1e6, true), 0xFF);
        assert_eq!(enc(d, 1e6, false), 0x80);
        assert_eq!(enc(d, f32::NAN, true), 0x80);
        assert_eq!(enc(d, -0.0, true), 0x00);
        assert_eq!(enc(d, -1e-7, true), 0x00);
        assert_eq!(enc(d, 1.0, true), 0x40);
        assert!(dec(d, 0x80).is_nan());
        assert_eq!(dec(d, 0x01), 2f32.powi(-10));
        let d = DType::F8E5M2FNUZ;
        assert_eq!(enc(d, 57344.0, true), 0x7F);
        assert_eq!(dec(d, 0x7F), 57344.0);
        assert_eq!(enc(d, f32::NEG_INFINITY, false), 0x80);
        assert_eq!(enc(d, f32::NEG_INFINITY, true), 0xFF);
        assert_eq!(enc(d, -1e-9, true), 0x00);
        assert_eq!(enc(d, 1.0, true), 0x40);
    }

    #[test]
    fn e5m2_patterns() {
        let d = DType::F8E5M2;
        assert_eq!(enc(d, 57344.0, true), 0x7B);
        assert_eq!(enc(d, 1e6, true), 0x7B);
        assert_eq!(enc(d, 1e6, false), 0x7C);
        assert_eq!(enc(d, -1e6, false), 0xFC);
        assert_eq!(enc(d, 61440.0, false), 0x7C);
        assert_eq!(enc(d, 61439.0, false), 0x7B);
        assert_eq!(enc(d, f32::INFINITY, false), 0x7C);
        assert_eq!(enc(d, f32::INFINITY, true), 0x7B);
        assert_eq!(enc(d, f32::NAN, false), 0x7E);
        assert_eq!(enc(d, -0.0, false), 0x80);
        assert_eq!(enc(d, 1.0, false), 0x3C);
        assert_eq!(dec(d, 0x7C), f32::INFINITY);
        assert_eq!(dec(d, 0xFC), f32::NEG_INFINITY);
        assert!(dec(d, 0x7D).is_nan());
        assert_eq!(dec(d, 0x01), 2f32.powi(-16));
    }

    #[test]
    fn round_trips() {
        for d in [
            DType::F8E4M3FN,
            DType::F8E4M3FNUZ,
            DType::F8E5M2,
            DType::F8E5M2FNUZ,
            DType::F8E8M0,
        ] {
            for b in 0..=255u8 {
                let v = dec(d, b);
                // E8M0's 2^-127 is an f32 subnormal, which ONNX's reference rounds up.
                if v.is_nan() || (d == DType::F8E8M0 && b == 0) {
                    continue;
                }
                let back = if d == DType::F8E8M0 {
                    f32_to_e8m0(v, true, E8M0Round::Up)
                } else {
                    enc(d, v, false)
                };
                assert_eq!(back, b, "{d} {b:#x} -> {v}");
            }
        }
        for b in 0..16u8 {
            let v = dec(DType::F4E2M1, b);
            assert_eq!(enc(DType::F4E2M1, v, false), b, "f4 {b:#x}");
        }
    }

    #[test]
    fn float4() {
        let d = DType::F4E2M1;
        let xs = [
            0.48f32,
            0.25,
            1.05,
            -3.5,
            -8.0,
            9.0,
            1e6,
            1e-7,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -4.0,
            0.01,
            -0.0,
            5.0,
            7.0,
            0.75,
            2.5,
        ];
        let want = [1u8, 0, 2, 14, 15, 7, 7, 0, 8, 7, 15, 14, 0, 8, 6, 7, 2, 4];
        for (x, w) in xs.iter().zip(want) {
            assert_eq!(enc(d, *x, false), w, "{x}");
        }
        assert_eq!(dec(d, 0x7), 6.0);
        assert_eq!(dec(d, 0xF), -6.0);
        assert_eq!(dec(d, 0x1), 0.5);
    }

    #[test]
    fn e8m0() {
        let xs = [0.0f32, 0.124, 0.25, 0.5, 1.1, 2.0, 4.0, 8.0];
        let up: Vec<u8> = xs
            .iter()
            .map(|&x| f32_to_e8m0(x, true, E8M0Round::Up))
            .collect();
        assert_eq!(up, [0, 124, 125, 126, 128, 128, 129, 130]);
        assert_eq!(f32_to_e8m0(1.1, true, E8M0Round::Down), 127);
        assert_eq!(f32_to_e8m0(1.5, true, E8M0Round::Nearest), 128);
        assert_eq!(f32_to_e8m0(1.2, true, E8M0Round::Nearest), 127);
        assert_eq!(f32_to_e8m0(f32::NAN, true, E8M0Round::Up), 0xFF);
        assert_eq!(f32_to_e8m0(f32::MAX, true, E8M0Round::Up), 0xFE);
        assert_eq!(f32_to_e8m0(f32::MAX, false, E8M0Round::Up), 0xFF);
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn int4() {
        let xs: Vec<f64> = (-9..16).map(|v| v as f64).collect();
        let i4: Vec<i8> = xs
            .iter()
            .map(|&x| encode(DType::I4, x, true).unwrap() as i8)
            .collect();
        assert_eq!(&i4[..4], &[7, -8, -7, -6]);
        assert_eq!(&i4[16..19], &[7, -8, -7]);
        let u4: Vec<u8> = xs
            .iter()
            .map(|&x| encode(DType::U4, x, true).unwrap())
            .collect();
        assert_eq!(&u4[..3], &[7, 8, 9]);
        assert_eq!(encode(DType::I4, 7.9, true), Some(7));
        assert_eq!(encode(DType::I4, -3.5, true), Some(-3i8 as u8));
        assert_eq!(encode_saturating_int(DType::I4, 100.0), Some(7));
        assert_eq!(encode_saturating_int(DType::I4, -2.5), Some(-2i8 as u8));
        assert_eq!(encode_saturating_int(DType::U4, -2.5), Some(0));
        assert_eq!(decode(DType::I4, 0xF8), Some(-8.0));
    }

    #[test]
    fn packing() {
        let v = [1u8, 2, 3, 4, 5];
        let p = pack_4bit(&v);
        assert_eq!(p, [0x21, 0x43, 0x05]);
        assert_eq!(unpack_4bit(DType::U4, &p, 5).unwrap(), v);
        let s = unpack_4bit(DType::I4, &[0xF8, 0x07], 3).unwrap();
        assert_eq!(s, [0xF8, 0xFF, 0x07]);
        assert_eq!(pack_4bit(&s), [0xF8, 0x07]);
        assert!(unpack_4bit(DType::U4, &p, 7).is_none());
        assert_eq!(unpack_4bit(DType::U4, &[], 0).unwrap(), Vec::<u8>::new());
    }
}
