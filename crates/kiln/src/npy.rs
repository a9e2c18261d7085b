//! NumPy `.npy` files: read (format versions 1.0, 2.0 and 3.0) and write (1.0, or 2.0 when
//! the header is too long for 1.0).
//!
//! Supported element types: `f2 f4 f8 i1 i2 i4 i8 u1 u2 u4 u8 b1` in any byte order
//! (`<`, `>`, `=`, `|`; big-endian data is byte-swapped) and unicode strings (`<U<n>`).
//! Fortran-ordered arrays are transposed to C order on reading. Malformed files give a
//! [`KilnError::Other`] naming the file and what is wrong; nothing here panics on bad input.
//!
//! ```no_run
//! # fn main() -> kiln::Result<()> {
//! let x = kiln::npy::read_npy("x.npy")?;
//! kiln::npy::write_npy("copy.npy", &x)?;
//! # Ok(()) }
//! ```

use std::path::Path;

use kiln_core::{DType, KilnError, Result, Tensor};

/// The magic bytes at the start of every `.npy` file.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Reads a `.npy` file into a tensor.
pub fn read_npy(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| KilnError::io(path, e))?;
    parse(&bytes, &path.display().to_string())
}

/// Decodes the bytes of a `.npy` file.
pub fn read_npy_bytes(bytes: &[u8]) -> Result<Tensor> {
    parse(bytes, "npy data")
}

/// Writes a tensor as a `.npy` file (created or replaced).
pub fn write_npy(path: impl AsRef<Path>, tensor: &Tensor) -> Result<()> {
    let path = path.as_ref();
    let bytes =
        to_npy_bytes(tensor).map_err(|e| KilnError::Other(format!("{}: {e}", path.display())))?;
    std::fs::write(path, bytes).map_err(|e| KilnError::io(path, e))
}

/// Encodes a tensor as the bytes of a `.npy` file (C order, little-endian).
///
/// bf16 has no NumPy dtype and is refused (cast to f32 first).
pub fn to_npy_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let (descr, data) = encode_data(tensor)?;
    let shape = match tensor.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Like np.save: spare spaces so the first dimension can grow in place, then padding
    // and a newline so that the data starts 64-byte aligned.
    if let Some(first) = tensor.shape().first() {
        dict.push_str(&" ".repeat(GROWTH_DIGITS.saturating_sub(first.to_string().len())));
    }
    let (major, len_bytes) = if header_len(10, dict.len()) <= u16::MAX as usize {
        (1u8, 2)
    } else {
        (2u8, 4)
    };
    let hlen = header_len(6 + 2 + len_bytes, dict.len());
    let mut out = Vec::with_capacity(6 + 2 + len_bytes + hlen + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(hlen as u16).to_le_bytes());
    } else {
        let len = u32::try_from(hlen)
            .map_err(|_| KilnError::Other(format!("npy header of {hlen} bytes is too long")))?;
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + hlen - dict.len() - 1, b' ');
    out.push(b'\n');
    out.extend_from_slice(&data);
    Ok(out)
}

/// NumPy's `GROWTH_AXIS_MAX_DIGITS`.
const GROWTH_DIGITS: usize = 21;

/// Header length (dict + at least one space of padding + newline) so that `prefix + header`
/// is a multiple of 64, computed as NumPy does.
fn header_len(prefix: usize, dict_len: usize) -> usize {
    let hlen = dict_len + 1;
    hlen + 64 - (prefix + hlen) % 64
}

fn encode_data(t: &Tensor) -> Result<(String, Vec<u8>)> {
    let little = cfg!(target_endian = "little");
    let descr = match t.dtype() {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::U8 => "|u1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
        DType::BF16 => {
            return Err(KilnError::UnsupportedDType {
                dtype: DType::BF16,
                context: "a .npy file (NumPy has no bfloat16; cast to f32 first)".into(),
            })
        }
        DType::String => return encode_strings(t),
        d => {
            return Err(KilnError::UnsupportedDType {
                dtype: d,
                context: "a .npy file (NumPy has no such dtype; cast to f32 first)".into(),
            })
        }
    };
    let mut data = t.bytes().to_vec();
    if !little {
        swap_bytes(&mut data, t.dtype().size());
    }
    Ok((descr.to_string(), data))
}

fn encode_strings(t: &Tensor) -> Result<(String, Vec<u8>)> {
    let strings = t.as_strings()?;
    let width = strings
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0)
        .max(1);
    let total = width
        .checked_mul(4)
        .and_then(|w| w.checked_mul(strings.len()))
        .ok_or_else(|| KilnError::Other("string tensor too large for a .npy file".into()))?;
    let mut data = Vec::with_capacity(total);
    for s in strings {
        let mut n = 0;
        for c in s.chars() {
            data.extend_from_slice(&(c as u32).to_le_bytes());
            n += 1;
        }
        data.resize(data.len() + (width - n) * 4, 0);
    }
    Ok((format!("<U{width}"), data))
}

fn swap_bytes(data: &mut [u8], size: usize) {
    if size > 1 {
        for chunk in data.chunks_exact_mut(size) {
            chunk.reverse();
        }
    }
}

/// The element type described by a `descr` string.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Elem {
    /// A numeric or bool dtype; `big` when the data is big-endian.
    Pod { dtype: DType, big: bool },
    /// Unicode strings of `width` UCS-4 code units each.
    Unicode { width: usize, big: bool },
}

fn parse_descr(descr: &str) -> std::result::Result<Elem, String> {
    let native_big = cfg!(target_endian = "big");
    let (order, rest) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '=' | '|')) => (c, &descr[1..]),
        _ => ('=', descr),
    };
    let big = match order {
        '>' => true,
        '<' => false,
        _ => native_big,
    };
    if let Some(width) = rest.strip_prefix('U') {
        let width: usize = width
            .parse()
            .map_err(|_| format!("unsupported dtype {descr:?}"))?;
        return Ok(Elem::Unicode { width, big });
    }
    let dtype = match rest {
        "f2" | "e" => DType::F16,
        "f4" | "f" => DType::F32,
        "f8" | "d" => DType::F64,
        "i1" | "b" => DType::I8,
        "i2" | "h" => DType::I16,
        "i4" => DType::I32,
        "i8" | "q" => DType::I64,
        "u1" | "B" => DType::U8,
        "u2" | "H" => DType::U16,
        "u4" => DType::U32,
        "u8" | "Q" => DType::U64,
        "b1" | "?" => DType::Bool,
        "O" => return Err("object arrays (dtype 'O', pickled Python objects) are not supported".into()),
        _ => {
            return Err(format!(
                "unsupported dtype {descr:?} (supported: f2 f4 f8 i1 i2 i4 i8 u1 u2 u4 u8 b1 and U<n>, any byte order)"
            ))
        }
    };
    if order == '|' && dtype.size() > 1 {
        return Err(format!(
            "dtype {descr:?} has no byte order ('|' is only valid for one-byte types)"
        ));
    }
    Ok(Elem::Pod { dtype, big })
}

/// Parsed `.npy` header.
struct Header {
    elem: Elem,
    fortran: bool,
    shape: Vec<usize>,
}

fn parse(bytes: &[u8], origin: &str) -> Result<Tensor> {
    parse_inner(bytes)
        .map_err(|msg| KilnError::Other(format!("{origin}: invalid .npy file: {msg}")))
}

fn parse_inner(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    if bytes.len() < 8 || &bytes[..6] != MAGIC {
        return Err("bad magic (the file does not start with \\x93NUMPY)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_bytes, utf8) = match major {
        1 => (2, false),
        2 => (4, false),
        3 => (4, true),
        _ => {
            return Err(format!(
                "format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"
            ))
        }
    };
    let prefix = 8 + len_bytes;
    if bytes.len() < prefix {
        return Err("truncated: the header length is missing".into());
    }
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_start = prefix
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            format!("truncated: the header should be {header_len} bytes but the file ends before")
        })?;
    let raw = &bytes[prefix..data_start];
    let text: String = if utf8 {
        std::str::from_utf8(raw)
            .map_err(|_| "header is not valid UTF-8".to_string())?
            .to_string()
    } else {
        raw.iter().map(|&b| b as char).collect() // latin-1
    };
    let header = parse_header(&text)?;
    decode_data(&header, &bytes[data_start..])
}

fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let value = PyParser {
        s: text.as_bytes(),
        pos: 0,
    }
    .parse_all()
    .map_err(|e| format!("header is malformed: {e}"))?;
    let PyValue::Dict(entries) = value else {
        return Err(format!("header is not a dict: {}", text.trim()));
    };
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    for (k, _) in &entries {
        if !matches!(k.as_str(), "descr" | "fortran_order" | "shape") {
            return Err(format!("header has an unexpected key {k:?}"));
        }
    }
    let elem = match get("descr") {
        Some(PyValue::Str(s)) => parse_descr(s)?,
        Some(PyValue::List(_)) | Some(PyValue::Tuple(_)) => {
            return Err("structured dtypes (record arrays) are not supported".into())
        }
        Some(_) => return Err("header 'descr' is not a string".into()),
        None => return Err("header has no 'descr' key".into()),
    };
    let fortran = match get("fortran_order") {
        Some(PyValue::Bool(b)) => *b,
        Some(_) => return Err("header 'fortran_order' is not True or False".into()),
        None => return Err("header has no 'fortran_order' key".into()),
    };
    let shape = match get("shape") {
        Some(PyValue::Tuple(items)) | Some(PyValue::List(items)) => items
            .iter()
            .map(|v| match v {
                PyValue::Int(n) => usize::try_from(*n)
                    .map_err(|_| format!("shape has a negative or huge dimension {n}")),
                _ => Err("shape holds something other than integers".to_string()),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(_) => return Err("header 'shape' is not a tuple".into()),
        None => return Err("header has no 'shape' key".into()),
    };
    Ok(Header {
        elem,
        fortran,
        shape,
    })
}

fn decode_data(h: &Header, data: &[u8]) -> std::result::Result<Tensor, String> {
    // Refuse shapes whose extent overflows even when a zero dimension makes them empty:
    // no real array has them and later stride arithmetic would overflow.
    let extent = h
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d.max(1)));
    let elem_size = match h.elem {
        Elem::Pod { dtype, .. } => dtype.size(),
        Elem::Unicode { width, .. } => width.checked_mul(4).ok_or("string width overflows")?,
    };
    let too_big = || format!("shape {:?} is absurdly large (its size overflows)", h.shape);
    extent
        .and_then(|e| e.checked_mul(elem_size.max(1)))
        .ok_or_else(too_big)?;
    let count: usize = if h.shape.contains(&0) {
        0
    } else {
        extent.ok_or_else(too_big)?
    };
    let need = count * elem_size;
    if data.len() != need {
        let what = if data.len() < need { "short" } else { "long" };
        return Err(format!(
            "data is too {what}: shape {:?} needs {need} bytes, the file holds {}",
            h.shape,
            data.len()
        ));
    }
    let mut data = data.to_vec();
    if h.fortran && h.shape.len() > 1 && elem_size > 0 {
        data = fortran_to_c(&data, &h.shape, elem_size);
    }
    match h.elem {
        Elem::Pod { dtype, big } => {
            if big != cfg!(target_endian = "big") {
                swap_bytes(&mut data, dtype.size());
            }
            if dtype == DType::Bool && data.iter().any(|&b| b > 1) {
                return Err("bool data holds bytes other than 0 and 1".into());
            }
            Tensor::from_bytes(dtype, &h.shape, &data).map_err(|e| e.to_string())
        }
        Elem::Unicode { width, big } => {
            let mut strings = Vec::with_capacity(count);
            if width == 0 {
                strings.resize(count, String::new());
            }
            for item in data
                .chunks_exact(width.max(1) * 4)
                .take(if width == 0 { 0 } else { count })
            {
                let mut s = String::new();
                for cu in item.chunks_exact(4) {
                    let arr = [cu[0], cu[1], cu[2], cu[3]];
                    let code = if big {
                        u32::from_be_bytes(arr)
                    } else {
                        u32::from_le_bytes(arr)
                    };
                    if code == 0 {
                        break;
                    }
                    s.push(
                        char::from_u32(code)
                            .ok_or_else(|| format!("invalid unicode code point {code:#x}"))?,
                    );
                }
                strings.push(s);
            }
            Tensor::from_strings(&h.shape, strings).map_err(|e| e.to_string())
        }
    }
}

/// Reorders column-major data of `shape` to row-major.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let rank = shape.len();
    // Column-major strides, in elements.
    let mut fstride = vec![1usize; rank];
    for k in 1..rank {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; rank];
    let count = data.len() / size;
    for _ in 0..count {
        let off: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&data[off * size..(off + 1) * size]);
        // Advance the row-major index (last axis fastest).
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// The subset of Python literals a `.npy` header uses.
#[derive(Debug, Clone, PartialEq)]
enum PyValue {
    Dict(Vec<(String, PyValue)>),
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    Str(String),
    Int(i128),
    Bool(bool),
    None,
}

/// A small recursive-descent parser for Python literals (dict, tuple, list, str, int,
/// True/False/None). Nesting is bounded so hostile headers cannot overflow the stack.
struct PyParser<'a> {
    s: &'a [u8],
    pos: usize,
}

const MAX_DEPTH: usize = 32;

impl PyParser<'_> {
    fn parse_all(mut self) -> std::result::Result<PyValue, String> {
        let v = self.value(0)?;
        self.skip_ws();
        if self.pos != self.s.len() {
            return Err(format!(
                "unexpected text after the value at byte {}",
                self.pos
            ));
        }
        Ok(v)
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> std::result::Result<PyValue, String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        match self.peek() {
            None => Err("unexpected end of header".into()),
            Some(b'{') => {
                self.pos += 1;
                let mut entries = Vec::new();
                loop {
                    if self.eat(b'}') {
                        return Ok(PyValue::Dict(entries));
                    }
                    let PyValue::Str(key) = self.value(depth + 1)? else {
                        return Err("dict key is not a string".into());
                    };
                    if !self.eat(b':') {
                        return Err(format!("expected ':' after key {key:?}"));
                    }
                    let v = self.value(depth + 1)?;
                    entries.push((key, v));
                    if !self.eat(b',') {
                        if self.eat(b'}') {
                            return Ok(PyValue::Dict(entries));
                        }
                        return Err("expected ',' or '}' in dict".into());
                    }
                }
            }
            Some(open @ (b'(' | b'[')) => {
                self.pos += 1;
                let close = if open == b'(' { b')' } else { b']' };
                let mut items = Vec::new();
                let mut trailing_comma = false;
                loop {
                    if self.eat(close) {
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                    trailing_comma = self.eat(b',');
                    if !trailing_comma {
                        if self.eat(close) {
                            break;
                        }
                        return Err(format!("expected ',' or '{}'", close as char));
                    }
                }
                if open == b'(' {
                    // `(x)` without a comma is a parenthesised value, not a tuple.
                    if items.len() == 1 && !trailing_comma {
                        return Ok(items.pop().unwrap_or(PyValue::None));
                    }
                    Ok(PyValue::Tuple(items))
                } else {
                    Ok(PyValue::List(items))
                }
            }
            Some(q @ (b'\'' | b'"')) => self.string(q),
            Some(c) if c.is_ascii_digit() || c == b'-' || c == b'+' => self.int(),
            Some(_) => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_alphanumeric() {
                    self.pos += 1;
                }
                match &self.s[start..self.pos] {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    b"None" => Ok(PyValue::None),
                    _ => Err(format!("unexpected character at byte {start}")),
                }
            }
        }
    }

    fn string(&mut self, quote: u8) -> std::result::Result<PyValue, String> {
        self.pos += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.pos) {
            self.pos += 1;
            if c == quote {
                let s =
                    String::from_utf8(out).map_err(|_| "string is not valid text".to_string())?;
                return Ok(PyValue::Str(s));
            }
            if c == b'\\' {
                let Some(&e) = self.s.get(self.pos) else {
                    break;
                };
                self.pos += 1;
                out.push(match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    other => other,
                });
            } else {
                out.push(c);
            }
        }
        Err("unterminated string".into())
    }

    fn int(&mut self) -> std::result::Result<PyValue, String> {
        let start = self.pos;
        if matches!(self.s.get(self.pos), Some(b'-' | b'+')) {
            self.pos += 1;
        }
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        let text =
            std::str::from_utf8(&self.s[start..self.pos]).map_err(|_| "bad number".to_string())?;
        // Python 2 wrote long integers with an `L` suffix.
        if matches!(self.s.get(self.pos), Some(b'L' | b'l')) {
            self.pos += 1;
        }
        text.parse::<i128>()
            .map(PyValue::Int)
            .map_err(|_| format!("bad or too large integer {text:?}"))
    }
}

/// A tensor name as a file name (`kiln run`'s outputs, calibration inputs): every character
/// outside `[A-Za-z0-9._-]` becomes `_`, and an empty, `.` or `..` result becomes underscores.
pub fn file_name_for(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.as_str() {
        "" => "_".into(),
        "." | ".." => s.replace('.', "_"),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn roundtrip(t: &Tensor) -> Tensor {
        let bytes = to_npy_bytes(t).unwrap();
        // Data starts 64-byte aligned; header ends with a newline.
        let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        assert_eq!(bytes[10 + hl - 1], b'\n');
        read_npy_bytes(&bytes).unwrap()
    }

    fn check(t: Tensor) {
        let back = roundtrip(&t);
        assert_eq!(back.dtype(), t.dtype());
        assert_eq!(back.shape(), t.shape());
        assert_eq!(back.bytes(), t.bytes());
    }

    #[test]
    fn roundtrips_every_dtype() {
        let shape = [2, 3];
        check(
            Tensor::from_vec(
                &shape,
                vec![1.5f32, -2.0, 3.25, 0.0, f32::MAX, f32::MIN_POSITIVE],
            )
            .unwrap(),
        );
        check(Tensor::from_vec(&shape, vec![1.5f64, -2.0, 3.25, 0.0, 1e300, -1e-300]).unwrap());
        check(
            Tensor::from_vec(
                &shape,
                (0..6).map(|i| f16::from_f32(i as f32 * 0.5)).collect(),
            )
            .unwrap(),
        );
        check(Tensor::from_vec(&shape, vec![-128i8, -1, 0, 1, 2, 127]).unwrap());
        check(Tensor::from_vec(&shape, vec![-32768i16, -1, 0, 1, 2, 32767]).unwrap());
        check(Tensor::from_vec(&shape, vec![i32::MIN, -1, 0, 1, 2, i32::MAX]).unwrap());
        check(Tensor::from_vec(&shape, vec![i64::MIN, -1, 0, 1, 2, i64::MAX]).unwrap());
        check(Tensor::from_vec(&shape, vec![0u8, 1, 2, 3, 254, 255]).unwrap());
        check(Tensor::from_vec(&shape, vec![0u16, 1, 2, 3, 254, 65535]).unwrap());
        check(Tensor::from_vec(&shape, vec![0u32, 1, 2, 3, 254, u32::MAX]).unwrap());
        check(Tensor::from_vec(&shape, vec![0u64, 1, 2, 3, 254, u64::MAX]).unwrap());
        check(Tensor::from_bools(&shape, &[true, false, true, true, false, false]).unwrap());
    }

    #[test]
    fn roundtrips_scalars_empty_and_strings() {
        check(Tensor::scalar(42.5f32));
        check(Tensor::scalar(-7i64));
        check(Tensor::zeros(DType::F32, &[0]));
        check(Tensor::zeros(DType::I64, &[3, 0, 2]));
        check(Tensor::from_vec(&[5], vec![1u8, 2, 3, 4, 5]).unwrap());
        let s = Tensor::from_strings(&[3], vec!["ab".into(), "".into(), "héllo✓".into()]).unwrap();
        let back = roundtrip(&s);
        assert_eq!(back.as_strings().unwrap(), s.as_strings().unwrap());
        let e = Tensor::from_strings(&[0], vec![]).unwrap();
        assert_eq!(roundtrip(&e).shape(), &[0]);
    }

    #[test]
    fn header_format_matches_numpy() {
        let bytes = to_npy_bytes(&Tensor::from_vec(&[3], vec![1.0f32, 2.0, 3.0]).unwrap()).unwrap();
        let text = String::from_utf8_lossy(&bytes[10..]);
        assert!(
            text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"),
            "{text}"
        );
        let bytes = to_npy_bytes(&Tensor::scalar(1i32)).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("'shape': ()"));
        assert!(to_npy_bytes(&Tensor::zeros(DType::BF16, &[2])).is_err());
    }

    #[test]
    fn long_header_uses_version_2() {
        let shape = vec![1usize; 30000];
        let t = Tensor::zeros(DType::F32, &shape);
        let bytes = to_npy_bytes(&t).unwrap();
        assert_eq!(bytes[6], 2);
        let hl = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        assert_eq!((12 + hl) % 64, 0);
        assert_eq!(read_npy_bytes(&bytes).unwrap().shape(), &shape[..]);
    }

    fn npy(version: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version, 0]);
        if version == 1 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_big_endian_native_and_version_3() {
        let data: Vec<u8> = [1.0f32, -2.5]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let t = read_npy_bytes(&npy(
            1,
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2,)}\n",
            &data,
        ))
        .unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0, -2.5]);
        let data: Vec<u8> = [7i16, -300].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let t = read_npy_bytes(&npy(
            3,
            "{\"descr\": \"=i2\", \"fortran_order\": False, \"shape\": (2,)}",
            &data,
        ))
        .unwrap();
        assert_eq!(t.as_slice::<i16>().unwrap(), &[7, -300]);
        let t = read_npy_bytes(&npy(
            2,
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1L, 2L), }",
            &[9, 8],
        ))
        .unwrap();
        assert_eq!(t.shape(), &[1, 2]);
        assert_eq!(t.as_slice::<u8>().unwrap(), &[9, 8]);
    }

    #[test]
    fn transposes_fortran_order() {
        // Column-major 2x3 [[0,1,2],[3,4,5]] is stored 0,3,1,4,2,5.
        let data: Vec<u8> = [0i32, 3, 1, 4, 2, 5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = read_npy_bytes(&npy(
            1,
            "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }",
            &data,
        ))
        .unwrap();
        assert_eq!(t.as_slice::<i32>().unwrap(), &[0, 1, 2, 3, 4, 5]);
        // 2x2x2: element (i,j,k) at i + 2j + 4k.
        let vals: Vec<i32> = (0..8).collect();
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = read_npy_bytes(&npy(
            1,
            "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 2, 2), }",
            &data,
        ))
        .unwrap();
        let expect: Vec<i32> = (0..8)
            .map(|c| (c >> 2 & 1) + 2 * (c >> 1 & 1) + 4 * (c & 1))
            .collect();
        assert_eq!(t.as_slice::<i32>().unwrap(), &expect[..]);
    }

    fn err(bytes: &[u8]) -> String {
        let e = read_npy_bytes(bytes).unwrap_err().to_string();
        assert!(e.starts_with("npy data: invalid .npy file: "), "{e}");
        e
    }

    #[test]
    fn rejects_malformed_files() {
        let f32x2 = [0u8; 8];
        assert!(err(b"hello world").contains("bad magic"));
        assert!(err(b"").contains("bad magic"));
        assert!(err(b"\x93NUMPY\x01\x00").contains("truncated"));
        assert!(err(b"\x93NUMPY\x01\x00\xff\x00{'descr'").contains("truncated"));
        assert!(err(b"\x93NUMPY\x09\x00\x00\x00").contains("format version 9.0"));
        assert!(err(&npy(1, "[1, 2]", &[])).contains("not a dict"));
        assert!(
            err(&npy(1, "{'descr': '<f4', 'fortran_order': False, ", &[])).contains("malformed")
        );
        assert!(err(&npy(
            1,
            "{'descr': '<c8', 'fortran_order': False, 'shape': (2,)}",
            &f32x2
        ))
        .contains("unsupported dtype"));
        assert!(err(&npy(
            1,
            "{'descr': '|O', 'fortran_order': False, 'shape': (2,)}",
            &f32x2
        ))
        .contains("object"));
        assert!(err(&npy(
            1,
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}",
            &f32x2
        ))
        .contains("structured"));
        assert!(err(&npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}",
            &f32x2
        ))
        .contains("too short"));
        assert!(err(&npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
            &f32x2
        ))
        .contains("too long"));
        assert!(err(&npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
            &f32x2
        ))
        .contains("negative"));
        assert!(err(&npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904)}", &f32x2))
            .contains("absurd"));
        assert!(err(&npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4611686018427387904, 8)}",
            &[]
        ))
        .contains("absurd"));
        assert!(err(&npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999999999999999999999,)}", &[]))
            .contains("integer"));
        assert!(err(&npy(
            1,
            "{'descr': '<f4', 'fortran_order': 1, 'shape': (2,)}",
            &f32x2
        ))
        .contains("fortran_order"));
        assert!(err(&npy(1, "{'descr': '<f4', 'shape': (2,)}", &f32x2)).contains("fortran_order"));
        assert!(err(&npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
            &f32x2
        ))
        .contains("unexpected key"));
        assert!(err(&npy(
            1,
            "{'descr': '|b1', 'fortran_order': False, 'shape': (2,)}",
            &[0, 7]
        ))
        .contains("bool"));
        assert!(err(&npy(
            1,
            "{'descr': '|f4', 'fortran_order': False, 'shape': (2,)}",
            &f32x2
        ))
        .contains("byte order"));
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(err(&npy(1, &deep, &[])).contains("deeply"));
        // Every truncation of a valid file is an error, never a panic.
        let good = to_npy_bytes(&Tensor::from_vec(&[2, 2], vec![1i64, 2, 3, 4]).unwrap()).unwrap();
        for n in 0..good.len() {
            assert!(
                read_npy_bytes(&good[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.npy");
        std::fs::write(&p, b"not numpy").unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("bad magic"), "{e}");
        let e = read_npy(dir.join("missing.npy")).unwrap_err().to_string();
        assert!(e.contains("missing.npy"), "{e}");
        let t = Tensor::from_vec(&[2], vec![1.0f64, 2.0]).unwrap();
        write_npy(dir.join("ok.npy"), &t).unwrap();
        assert!(read_npy(dir.join("ok.npy")).unwrap().same_as(&t));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Files written by numpy itself (skipped when python3 with numpy is unavailable).
    #[test]
    fn reads_and_writes_files_numpy_understands() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-numpy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = r#"
import sys, numpy as np
d = sys.argv[1]
specs = {'f4':'<f4','f2':'<f2','f8':'<f8','i1':'|i1','i2':'<i2','i4':'<i4','i8':'<i8','u1':'|u1','u2':'<u2','u4':'<u4','u8':'<u8','b1':'|b1','bef8':'>f8','bei4':'>i4'}
for name, dt in specs.items():
    a = (np.arange(24).reshape(2, 3, 4) % 7).astype(dt)
    np.save(f'{d}/{name}.npy', a)
np.save(f'{d}/fortran.npy', np.asfortranarray(np.arange(24, dtype='<f4').reshape(2, 3, 4)))
np.save(f'{d}/scalar.npy', np.float32(3.5))
np.save(f'{d}/empty.npy', np.zeros((0, 3), dtype='<i8'))
np.save(f'{d}/str.npy', np.array(['a', 'bc', '']))
"#;
        let mut cmd = std::process::Command::new("python3");
        cmd.arg("-c").arg(script).arg(&dir);
        if std::process::Command::new("python3")
            .args(["-c", "import numpy"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            cmd.env("PYTHONPATH", "/work/main/assets/pyref");
        }
        match cmd.output() {
            Ok(o) if o.status.success() => {}
            other => {
                eprintln!("SKIP: python3 with numpy not available ({other:?})");
                return;
            }
        }
        let expect: Vec<f64> = (0..24).map(|i| (i % 7) as f64).collect();
        for name in [
            "f4", "f2", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "bef8", "bei4",
        ] {
            let t = read_npy(dir.join(format!("{name}.npy"))).unwrap();
            assert_eq!(t.shape(), &[2, 3, 4], "{name}");
            assert_eq!(t.to_f64_vec().unwrap(), expect, "{name}");
        }
        let b = read_npy(dir.join("b1.npy")).unwrap();
        assert_eq!(b.dtype(), DType::Bool);
        assert_eq!(
            b.as_bools().unwrap().iter().filter(|x| **x).count(),
            expect.iter().filter(|x| **x != 0.0).count()
        );
        let f = read_npy(dir.join("fortran.npy")).unwrap();
        assert_eq!(
            f.to_f64_vec().unwrap(),
            (0..24).map(|i| i as f64).collect::<Vec<_>>()
        );
        let s = read_npy(dir.join("scalar.npy")).unwrap();
        assert_eq!((s.shape().len(), s.as_slice::<f32>().unwrap()[0]), (0, 3.5));
        assert_eq!(read_npy(dir.join("empty.npy")).unwrap().shape(), &[0, 3]);
        assert_eq!(
            read_npy(dir.join("str.npy")).unwrap().as_strings().unwrap(),
            &["a", "bc", ""]
        );

        // And numpy reads what kiln writes, byte for byte the same header as np.save.
        for name in ["f4", "i8", "b1", "u1"] {
            let t = read_npy(dir.join(format!("{name}.npy"))).unwrap();
            let ours = to_npy_bytes(&t).unwrap();
            let theirs = std::fs::read(dir.join(format!("{name}.npy"))).unwrap();
            assert_eq!(ours, theirs, "{name}");
        }
        write_npy(dir.join("ours_scalar.npy"), &Tensor::scalar(2.5f64)).unwrap();
        write_npy(
            dir.join("ours_str.npy"),
            &Tensor::from_strings(&[2], vec!["x".into(), "yz".into()]).unwrap(),
        )
        .unwrap();
        let check = r#"
import sys, numpy as np
d = sys.argv[1]
assert np.load(f'{d}/ours_scalar.npy').shape == () and float(np.load(f'{d}/ours_scalar.npy')) == 2.5
assert list(np.load(f'{d}/ours_str.npy')) == ['x', 'yz']
"#;
        let mut cmd = std::process::Command::new("python3");
        cmd.arg("-c").arg(check).arg(&dir);
        if std::process::Command::new("python3")
            .args(["-c", "import numpy"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            cmd.env("PYTHONPATH", "/work/main/assets/pyref");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::remove_dir_all(&dir).ok();
    }
}
