//! Tensors: a dtype, a shape and bytes (or strings), cheap to clone.

use std::sync::Arc;

use half::{bf16, f16};
use num_traits::AsPrimitive;
use smallvec::SmallVec;

use crate::buffer::{AlignedBuf, Bytes};
use crate::dtype::{DType, Element};
use crate::error::{KilnError, Result};
use crate::lowp::{self, E8M0Round};

/// Options of a conversion to the low-precision float types (the `saturate` and
/// `round_mode` attributes of ONNX `Cast`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastOptions {
    /// Clamp out-of-range values (infinities included) to the largest finite float8 value
    /// instead of producing NaN / infinity. Default true.
    pub saturate: bool,
    /// Rounding of conversions to FLOAT8E8M0. Default "up".
    pub round_mode: E8M0Round,
}

impl Default for CastOptions {
    fn default() -> Self {
        CastOptions {
            saturate: true,
            round_mode: E8M0Round::Up,
        }
    }
}

/// A concrete shape. Inline up to 6 dims so building one allocates nothing.
pub type Shape = SmallVec<[usize; 6]>;

/// Number of elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Shape {
    let mut s: Shape = smallvec::smallvec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

#[derive(Clone)]
enum Data {
    Bytes(Bytes),
    Strings(Arc<Vec<String>>),
}

/// An n-dimensional array. Clones share the data (copy-on-write is never needed: tensors are
/// immutable once built; kernels write into fresh buffers or arena slots).
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Shape,
    data: Data,
}

impl Tensor {
    /// A tensor from a typed vector.
    pub fn from_vec<T: Element>(shape: &[usize], data: Vec<T>) -> Result<Tensor> {
        if numel(shape) != data.len() {
            return Err(KilnError::Other(format!(
                "tensor of shape {shape:?} needs {} elements, got {}",
                numel(shape),
                data.len()
            )));
        }
        Ok(Tensor::from_slice_unchecked(
            T::DTYPE,
            shape,
            bytemuck::cast_slice(&data),
        ))
    }

    /// A tensor from a typed slice (copied).
    pub fn from_slice<T: Element>(shape: &[usize], data: &[T]) -> Result<Tensor> {
        if numel(shape) != data.len() {
            return Err(KilnError::Other(format!(
                "tensor of shape {shape:?} needs {} elements, got {}",
                numel(shape),
                data.len()
            )));
        }
        Ok(Tensor::from_slice_unchecked(
            T::DTYPE,
            shape,
            bytemuck::cast_slice(data),
        ))
    }

    fn from_slice_unchecked(dtype: DType, shape: &[usize], bytes: &[u8]) -> Tensor {
        Tensor {
            dtype,
            shape: shape.into(),
            data: Data::Bytes(Bytes::Heap(Arc::new(AlignedBuf::from_bytes(bytes)))),
        }
    }

    /// A tensor that takes ownership of an aligned buffer.
    pub fn from_aligned(dtype: DType, shape: &[usize], buf: AlignedBuf) -> Result<Tensor> {
        Tensor::from_storage(dtype, shape, Bytes::Heap(Arc::new(buf)))
    }

    /// A tensor over existing storage (heap, mapped or arena), checked for length.
    pub fn from_storage(dtype: DType, shape: &[usize], bytes: Bytes) -> Result<Tensor> {
        if dtype == DType::String {
            return Err(KilnError::Other(
                "string tensors cannot be built from bytes".into(),
            ));
        }
        let want = numel(shape) * dtype.size();
        if bytes.len() != want {
            return Err(KilnError::Other(format!(
                "{dtype} tensor of shape {shape:?} needs {want} bytes, got {}",
                bytes.len()
            )));
        }
        let t = Tensor {
            dtype,
            shape: shape.into(),
            data: Data::Bytes(bytes),
        };
        Ok(t)
    }

    /// A tensor from raw little-endian bytes (copied). Bool bytes are normalised to 0/1, the
    /// unpacked 4-bit types to their low nibble (INT4 sign-extended).
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let mut buf = AlignedBuf::from_bytes(bytes);
        if dtype == DType::Bool {
            for b in buf.as_mut_slice() {
                *b = (*b != 0) as u8;
            }
        } else if dtype.is_4bit() {
            for b in buf.as_mut_slice() {
                *b = lowp::normalize_byte(dtype, *b);
            }
        }
        Tensor::from_storage(dtype, shape, Bytes::Heap(Arc::new(buf)))
    }

    /// A boolean tensor.
    pub fn from_bools(shape: &[usize], data: &[bool]) -> Result<Tensor> {
        let bytes: Vec<u8> = data.iter().map(|&b| b as u8).collect();
        Tensor::from_bytes(DType::Bool, shape, &bytes)
    }

    /// A string tensor.
    pub fn from_strings(shape: &[usize], data: Vec<String>) -> Result<Tensor> {
        if numel(shape) != data.len() {
            return Err(KilnError::Other(format!(
                "string tensor of shape {shape:?} needs {} elements, got {}",
                numel(shape),
                data.len()
            )));
        }
        Ok(Tensor {
            dtype: DType::String,
            shape: shape.into(),
            data: Data::Strings(Arc::new(data)),
        })
    }

    /// A zero-filled tensor (empty strings for string tensors).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        if dtype == DType::String {
            return Tensor {
                dtype,
                shape: shape.into(),
                data: Data::Strings(Arc::new(vec![String::new(); numel(shape)])),
            };
        }
        Tensor {
            dtype,
            shape: shape.into(),
            data: Data::Bytes(Bytes::Heap(Arc::new(AlignedBuf::zeroed(
                numel(shape) * dtype.size(),
            )))),
        }
    }

    /// A rank-0 tensor.
    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor::from_slice_unchecked(T::DTYPE, &[], bytemuck::bytes_of(&v))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw bytes (empty for string tensors).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Bytes(b) => b.as_slice(),
            Data::Strings(_) => &[],
        }
    }

    /// The storage behind a numeric tensor (None for strings).
    pub fn storage(&self) -> Option<&Bytes> {
        match &self.data {
            Data::Bytes(b) => Some(b),
            Data::Strings(_) => None,
        }
    }

    /// The elements as a typed slice; fails when `T` is not the tensor's dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(KilnError::Other(format!(
                "expected a {} tensor, found {}",
                T::DTYPE,
                self.dtype
            )));
        }
        let bytes = self.bytes();
        bytemuck::try_cast_slice(bytes)
            .map_err(|e| KilnError::Other(format!("misaligned tensor data: {e}")))
    }

    /// The elements reinterpreted as `T`, which must have the dtype's size (any dtype but
    /// string). For data-movement kernels that copy elements without looking at them.
    pub fn as_raw<T: bytemuck::Pod>(&self) -> Result<&[T]> {
        if self.dtype == DType::String || std::mem::size_of::<T>() != self.dtype.size() {
            return Err(KilnError::Other(format!(
                "cannot view {} elements as {}-byte words",
                self.dtype,
                std::mem::size_of::<T>()
            )));
        }
        bytemuck::try_cast_slice(self.bytes())
            .map_err(|e| KilnError::Other(format!("misaligned tensor data: {e}")))
    }

    /// A tensor of `dtype` from words of the same size (the inverse of [`Tensor::as_raw`]).
    /// For bool, words must be 0 or 1 (they are normalised).
    pub fn from_raw<T: bytemuck::Pod>(dtype: DType, shape: &[usize], data: &[T]) -> Result<Tensor> {
        if dtype == DType::String || std::mem::size_of::<T>() != dtype.size() {
            return Err(KilnError::Other(format!(
                "cannot build a {dtype} tensor from {}-byte words",
                std::mem::size_of::<T>()
            )));
        }
        if numel(shape) != data.len() {
            return Err(KilnError::Other(format!(
                "tensor of shape {shape:?} needs {} elements, got {}",
                numel(shape),
                data.len()
            )));
        }
        Tensor::from_bytes(dtype, shape, bytemuck::cast_slice(data))
    }

    /// The elements of a bool tensor.
    pub fn as_bools(&self) -> Result<&[bool]> {
        if self.dtype != DType::Bool {
            return Err(KilnError::Other(format!(
                "expected a bool tensor, found {}",
                self.dtype
            )));
        }
        let bytes = self.bytes();
        // SAFETY: every constructor of a Bool tensor normalises its bytes to 0 or 1
        // (`from_bytes`, `from_bools`, kernels writing through `TensorMut::as_bools_mut`), and
        // bool has the same size and alignment as u8, so each byte is a valid bool.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const bool, bytes.len()) })
    }

    /// The elements of a string tensor.
    pub fn as_strings(&self) -> Result<&[String]> {
        match &self.data {
            Data::Strings(s) => Ok(s),
            Data::Bytes(_) => Err(KilnError::Other(format!(
                "expected a string tensor, found {}",
                self.dtype
            ))),
        }
    }

    /// The same data viewed with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.len() {
            return Err(KilnError::Other(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.len()
            )));
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape: shape.into(),
            data: self.data.clone(),
        })
    }

    /// A copy whose bytes live on the heap (detaches from arenas and mappings).
    pub fn to_owned_heap(&self) -> Tensor {
        match &self.data {
            Data::Bytes(Bytes::Heap(_)) | Data::Strings(_) => self.clone(),
            Data::Bytes(b) => Tensor::from_slice_unchecked(self.dtype, &self.shape, b.as_slice()),
        }
    }

    /// The elements converted to `T` with `as`-cast semantics (bool → 0/1).
    pub fn to_vec<T>(&self) -> Result<Vec<T>>
    where
        T: Copy + 'static,
        f32: AsPrimitive<T>,
        f64: AsPrimitive<T>,
        i8: AsPrimitive<T>,
        i16: AsPrimitive<T>,
        i32: AsPrimitive<T>,
        i64: AsPrimitive<T>,
        u8: AsPrimitive<T>,
        u16: AsPrimitive<T>,
        u32: AsPrimitive<T>,
        u64: AsPrimitive<T>,
    {
        fn conv<S: Element + AsPrimitive<T>, T: Copy + 'static>(t: &Tensor) -> Result<Vec<T>> {
            Ok(t.as_slice::<S>()?.iter().map(|v| v.as_()).collect())
        }
        fn conv_raw<T: Copy + 'static>(t: &Tensor) -> Result<Vec<T>>
        where
            u8: AsPrimitive<T>,
        {
            Ok(t.as_raw::<u8>()?.iter().map(|v| v.as_()).collect())
        }
        match self.dtype {
            DType::F32 => conv::<f32, T>(self),
            DType::F64 => conv::<f64, T>(self),
            DType::F16 => Ok(self
                .as_slice::<f16>()?
                .iter()
                .map(|v| v.to_f32().as_())
                .collect()),
            DType::BF16 => Ok(self
                .as_slice::<bf16>()?
                .iter()
                .map(|v| v.to_f32().as_())
                .collect()),
            DType::I8 => conv::<i8, T>(self),
            DType::I16 => conv::<i16, T>(self),
            DType::I32 => conv::<i32, T>(self),
            DType::I64 => conv::<i64, T>(self),
            DType::U8 => conv::<u8, T>(self),
            DType::Bool => Ok(self.as_raw::<u8>()?.iter().map(|v| v.as_()).collect()),
            DType::U16 => conv::<u16, T>(self),
            DType::U32 => conv::<u32, T>(self),
            DType::U64 => conv::<u64, T>(self),
            DType::String => Err(KilnError::Other(
                "cannot convert a string tensor to numbers".into(),
            )),
            DType::I4 => Ok(self
                .as_raw::<u8>()?
                .iter()
                .map(|&v| (v as i8).as_())
                .collect()),
            DType::U4 => conv_raw::<T>(self),
            d => Ok(self
                .as_raw::<u8>()?
                .iter()
                .map(|&b| lowp::decode(d, b).unwrap_or(f32::NAN).as_())
                .collect()),
        }
    }

    /// Integer elements as i64 (for shapes, indices, axes); fails for non-integer dtypes.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        if !(self.dtype.is_int() || matches!(self.dtype, DType::Bool | DType::I4 | DType::U4)) {
            return Err(KilnError::Other(format!(
                "expected an integer tensor, found {}",
                self.dtype
            )));
        }
        self.to_vec::<i64>()
    }

    /// Elements as f32 (any numeric dtype).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.to_vec::<f32>()
    }

    /// Elements as f64 (any numeric dtype).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.to_vec::<f64>()
    }

    /// Converts to another dtype with ONNX `Cast` semantics for numeric types: float → int
    /// truncates toward zero (saturating), anything → bool is `!= 0`, bool → number is 0/1.
    /// Strings are parsed from / formatted to decimal text. Conversions to the
    /// low-precision types use the default [`CastOptions`] (saturating, E8M0 rounds up).
    pub fn cast(&self, to: DType) -> Result<Tensor> {
        self.cast_with(to, CastOptions::default())
    }

    /// [`Tensor::cast`] with explicit options for the low-precision float types: float8
    /// and float4 round to nearest even, see [`crate::lowp`]; INT4/UINT4 wrap like C casts.
    pub fn cast_with(&self, to: DType, opts: CastOptions) -> Result<Tensor> {
        if to == self.dtype {
            return Ok(self.clone());
        }
        if to.is_low_precision() {
            return self.cast_to_low_precision(to, opts);
        }
        if self.dtype.is_low_precision() {
            return self.widen()?.cast_with(to, opts);
        }
        self.cast_standard(to)
    }

    /// A low-precision tensor converted exactly to a standard dtype (f32 for the floats,
    /// i8 / u8 for INT4 / UINT4).
    fn widen(&self) -> Result<Tensor> {
        match self.dtype {
            DType::I4 => Tensor::from_vec(&self.shape, self.to_vec::<i8>()?),
            DType::U4 => Tensor::from_vec(&self.shape, self.to_vec::<u8>()?),
            _ => Tensor::from_vec(&self.shape, self.to_vec::<f32>()?),
        }
    }

    fn cast_to_low_precision(&self, to: DType, opts: CastOptions) -> Result<Tensor> {
        let shape = self.shape.clone();
        let unsupported = || KilnError::Other(format!("cannot cast {} to {to}", self.dtype));
        let bytes: Vec<u8> = if self.dtype == DType::String {
            let s = self.as_strings()?;
            let vals: Vec<f64> = s.iter().map(|x| parse_number(x)).collect::<Result<_>>()?;
            return Tensor::from_vec(&shape, vals)?.cast_to_low_precision(to, opts);
        } else if self.dtype.is_int() || matches!(self.dtype, DType::Bool | DType::I4 | DType::U4) {
            let v = self.to_i64_vec()?;
            v.iter()
                .map(|&x| lowp::encode_int(to, x, opts.saturate).ok_or_else(unsupported))
                .collect::<Result<_>>()?
        } else if to == DType::F8E8M0 {
            self.to_vec::<f32>()?
                .iter()
                .map(|&x| lowp::f32_to_e8m0(x, opts.saturate, opts.round_mode))
                .collect()
        } else {
            self.to_f64_vec()?
                .iter()
                .map(|&x| lowp::encode(to, x, opts.saturate).ok_or_else(unsupported))
                .collect::<Result<_>>()?
        };
        Tensor::from_bytes(to, &shape, &bytes)
    }

    /// Cast between the standard (non low-precision) dtypes.
    fn cast_standard(&self, to: DType) -> Result<Tensor> {
        let shape = self.shape.clone();
        if self.dtype == DType::String {
            let s = self.as_strings()?;
            let vals: Vec<f64> = s.iter().map(|x| parse_number(x)).collect::<Result<_>>()?;
            let f = Tensor::from_vec(&shape, vals)?;
            return f.cast(to);
        }
        match to {
            DType::String => {
                let strs: Vec<String> = if self.dtype.is_float() {
                    self.to_f64_vec()?
                        .iter()
                        .map(|v| format_float(*v, self.dtype))
                        .collect()
                } else if self.dtype == DType::Bool {
                    self.as_bools()?
                        .iter()
                        .map(|b| if *b { "1".into() } else { "0".into() })
                        .collect()
                } else {
                    self.to_i64_vec()?.iter().map(|v| v.to_string()).collect()
                };
                Tensor::from_strings(&shape, strs)
            }
            DType::Bool => {
                let v: Vec<bool> = self.to_f64_vec()?.iter().map(|x| *x != 0.0).collect();
                Tensor::from_bools(&shape, &v)
            }
            DType::F32 => Tensor::from_vec(&shape, self.to_vec::<f32>()?),
            DType::F64 => Tensor::from_vec(&shape, self.to_vec::<f64>()?),
            DType::F16 => Tensor::from_vec(
                &shape,
                self.to_vec::<f32>()?
                    .into_iter()
                    .map(f16::from_f32)
                    .collect(),
            ),
            DType::BF16 => Tensor::from_vec(
                &shape,
                self.to_vec::<f32>()?
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect(),
            ),
            DType::I8 => Tensor::from_vec(&shape, self.to_vec::<i8>()?),
            DType::I16 => Tensor::from_vec(&shape, self.to_vec::<i16>()?),
            DType::I32 => Tensor::from_vec(&shape, self.to_vec::<i32>()?),
            DType::I64 => Tensor::from_vec(&shape, self.to_vec::<i64>()?),
            DType::U8 => Tensor::from_vec(&shape, self.to_vec::<u8>()?),
            DType::U16 => Tensor::from_vec(&shape, self.to_vec::<u16>()?),
            DType::U32 => Tensor::from_vec(&shape, self.to_vec::<u32>()?),
            DType::U64 => Tensor::from_vec(&shape, self.to_vec::<u64>()?),
            d => self.cast_to_low_precision(d, CastOptions::default()),
        }
    }

    /// True when dtype, shape and every element are equal (NaN equals NaN).
    pub fn same_as(&self, other: &Tensor) -> bool {
        if self.dtype != other.dtype || self.shape != other.shape {
            return false;
        }
        match self.dtype {
            DType::String => self.as_strings().ok() == other.as_strings().ok(),
            DType::F32 => eq_nan(
                self.as_slice::<f32>().unwrap_or(&[]),
                other.as_slice::<f32>().unwrap_or(&[]),
            ),
            DType::F64 => eq_nan(
                self.as_slice::<f64>().unwrap_or(&[]),
                other.as_slice::<f64>().unwrap_or(&[]),
            ),
            _ => self.bytes() == other.bytes(),
        }
    }
}

fn eq_nan<T: num_traits::Float>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

fn parse_number(s: &str) -> Result<f64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    match lower.as_str() {
        "nan" | "+nan" | "-nan" => return Ok(f64::NAN),
        "inf" | "+inf" | "infinity" | "+infinity" => return Ok(f64::INFINITY),
        "-inf" | "-infinity" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    t.parse::<f64>()
        .map_err(|_| KilnError::Other(format!("cannot parse {s:?} as a number")))
}

fn format_float(v: f64, dtype: DType) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "INF".into() } else { "-INF".into() };
    }
    if dtype == DType::F64 {
        format!("{v}")
    } else {
        format!("{}", v as f32)
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype, self.shape.as_slice())?;
        if self.len() <= 8 {
            match self.dtype {
                DType::String => write!(f, " {:?}", self.as_strings().unwrap_or(&[]))?,
                DType::Bool => write!(f, " {:?}", self.as_bools().unwrap_or(&[]))?,
                d if d.is_float() || d.is_low_precision() => {
                    write!(f, " {:?}", self.to_f64_vec().unwrap_or_default())?
                }
                _ => write!(f, " {:?}", self.to_i64_vec().unwrap_or_default())?,
            }
        }
        Ok(())
    }
}

/// A writable view of an output slot (arena slot or fresh buffer) handed to a kernel.
pub struct TensorMut<'a> {
    dtype: DType,
    shape: &'a [usize],
    bytes: &'a mut [u8],
}

impl<'a> TensorMut<'a> {
    /// A view over `bytes`, which must hold exactly `numel(shape) * dtype.size()` bytes.
    pub fn new(dtype: DType, shape: &'a [usize], bytes: &'a mut [u8]) -> Result<Self> {
        if dtype == DType::String || bytes.len() != numel(shape) * dtype.size() {
            return Err(KilnError::Other(format!(
                "output slot of {} bytes does not fit a {dtype} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        Ok(TensorMut {
            dtype,
            shape,
            bytes,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.shape
    }

    /// The elements reinterpreted as `T` of the dtype's size (see [`Tensor::as_raw`]).
    pub fn as_raw_mut<T: bytemuck::Pod>(&mut self) -> Result<&mut [T]> {
        if std::mem::size_of::<T>() != self.dtype.size() {
            return Err(KilnError::Other(format!(
                "cannot view {} output as {}-byte words",
                self.dtype,
                std::mem::size_of::<T>()
            )));
        }
        bytemuck::try_cast_slice_mut(self.bytes)
            .map_err(|e| KilnError::Other(format!("misaligned output: {e}")))
    }

    /// The raw bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.bytes
    }

    /// Typed mutable elements.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        if T::DTYPE != self.dtype {
            return Err(KilnError::Other(format!(
                "expected a {} output, found {}",
                T::DTYPE,
                self.dtype
            )));
        }
        bytemuck::try_cast_slice_mut(self.bytes)
            .map_err(|e| KilnError::Other(format!("misaligned output: {e}")))
    }

    /// Copies a tensor of the same dtype and element count into this slot.
    pub fn copy_from(&mut self, t: &Tensor) -> Result<()> {
        if t.dtype() != self.dtype || t.shape() != self.shape {
            return Err(KilnError::Other(format!(
                "kernel produced {} {:?}, the plan expected {} {:?}",
                t.dtype(),
                t.shape(),
                self.dtype,
                self.shape
            )));
        }
        self.bytes.copy_from_slice(t.bytes());
        Ok(())
    }
}
