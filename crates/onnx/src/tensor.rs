//! `TensorProto` (and the sequence/optional containers of ONNX's test data) to kiln values.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use kiln_core::{numel, DType, KilnError, Result, Tensor, Value, ValueKind};
use prost::Message;

use crate::proto::{self, tensor_proto::DataLocation, tensor_proto::DataType};

/// The ONNX name of a `TensorProto.DataType` code (`FLOAT8E4M3FN`, ...).
pub fn onnx_dtype_name(code: i32) -> String {
    match DataType::try_from(code) {
        Ok(d) => d.as_str_name().to_string(),
        Err(_) => format!("data type {code}"),
    }
}

/// The kiln dtype for an ONNX data type code, or an error naming `what` (e.g. "tensor w").
pub fn dtype_from_onnx(code: i32, what: &str) -> Result<DType> {
    if code == DataType::Undefined as i32 {
        return Err(KilnError::InvalidModel(format!(
            "{what} has no data type (UNDEFINED)"
        )));
    }
    DType::from_onnx_code(code).ok_or_else(|| {
        KilnError::Other(format!(
            "unsupported dtype {} for {what}",
            onnx_dtype_name(code)
        ))
    })
}

fn describe(t: &proto::TensorProto) -> String {
    match t.name() {
        "" => "unnamed tensor".to_string(),
        n => format!("tensor {n}"),
    }
}

fn invalid(what: &str, msg: impl std::fmt::Display) -> KilnError {
    KilnError::InvalidModel(format!("{what}: {msg}"))
}

/// Converts ONNX dims to a shape, rejecting negative dims and element-count overflow.
fn shape_of(dims: &[i64], what: &str) -> Result<Vec<usize>> {
    let mut shape = Vec::with_capacity(dims.len());
    let mut count: usize = 1;
    for &d in dims {
        let d = usize::try_from(d)
            .map_err(|_| invalid(what, format!("negative dimension in {dims:?}")))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| invalid(what, format!("shape {dims:?} is too large")))?;
        shape.push(d);
    }
    Ok(shape)
}

/// Converts a `TensorProto` to a [`Tensor`].
///
/// Handles `raw_data` (little-endian), the typed fields (`float_data`, `int32_data` holding
/// int8/int16/uint8/uint16/bool, the bit patterns of float16/bfloat16/float8 and the packed
/// bytes of the 4-bit types, `int64_data`,
/// `uint64_data` for uint32/uint64, `double_data`, `string_data`) and external data
/// (`location`/`offset`/`length`, relative to `base_dir`, the model's directory; paths
/// leaving that directory are rejected). The element count must match the dims; errors
/// name the tensor.
pub fn tensor_from_proto(t: &proto::TensorProto, base_dir: Option<&Path>) -> Result<Tensor> {
    let what = describe(t);
    let dtype = dtype_from_onnx(t.data_type(), &what)?;
    let shape = shape_of(&t.dims, &what)?;
    let n = numel(&shape);
    if t.segment.is_some() {
        return Err(KilnError::Other(format!(
            "{what}: segmented tensors are not supported"
        )));
    }
    if t.data_location() == DataLocation::External {
        if dtype == DType::String {
            return Err(invalid(
                &what,
                "string tensors cannot be stored as external data",
            ));
        }
        let bytes = read_external(t, base_dir, &what)?;
        return from_raw_bytes(dtype, &shape, &bytes, &what);
    }
    if let Some(raw) = &t.raw_data {
        if dtype == DType::String {
            return Err(invalid(&what, "string tensors cannot use raw_data"));
        }
        return from_raw_bytes(dtype, &shape, raw, &what);
    }
    from_typed_fields(t, dtype, &shape, n, &what)
}

fn from_raw_bytes(dtype: DType, shape: &[usize], raw: &[u8], what: &str) -> Result<Tensor> {
    if dtype.is_4bit() {
        return from_packed_4bit(dtype, shape, raw, what, "raw_data");
    }
    let want = numel(shape)
        .checked_mul(dtype.size())
        .ok_or_else(|| invalid(what, format!("shape {shape:?} is too large")))?;
    if raw.len() != want {
        return Err(invalid(
            what,
            format!(
                "{dtype} tensor of shape {shape:?} needs {want} bytes of data, found {}",
                raw.len()
            ),
        ));
    }
    if cfg!(target_endian = "big") && dtype.size() > 1 {
        return Err(KilnError::Other(format!(
            "{what}: big-endian hosts are not supported"
        )));
    }
    Tensor::from_bytes(dtype, shape, raw)
}

/// A 4-bit tensor from ONNX's packed storage (two elements per byte, low nibble first).
fn from_packed_4bit(
    dtype: DType,
    shape: &[usize],
    packed: &[u8],
    what: &str,
    field: &str,
) -> Result<Tensor> {
    let n = numel(shape);
    let bytes = kiln_core::lowp::unpack_4bit(dtype, packed, n).ok_or_else(|| {
        invalid(
            what,
            format!(
                "{dtype} tensor of shape {shape:?} needs {} packed bytes in {field}, found {}",
                n.div_ceil(2),
                packed.len()
            ),
        )
    })?;
    Tensor::from_bytes(dtype, shape, &bytes)
}

fn check_count(found: usize, n: usize, field: &str, what: &str) -> Result<()> {
    if found != n {
        return Err(invalid(
            what,
            format!("{field} has {found} elements, the dims need {n}"),
        ));
    }
    Ok(())
}

fn from_typed_fields(
    t: &proto::TensorProto,
    dtype: DType,
    shape: &[usize],
    n: usize,
    what: &str,
) -> Result<Tensor> {
    let i32s = |field: &str| -> Result<&[i32]> {
        check_count(t.int32_data.len(), n, field, what)?;
        Ok(&t.int32_data)
    };
    match dtype {
        DType::F32 => {
            check_count(t.float_data.len(), n, "float_data", what)?;
            Tensor::from_slice(shape, &t.float_data)
        }
        DType::F64 => {
            check_count(t.double_data.len(), n, "double_data", what)?;
            Tensor::from_slice(shape, &t.double_data)
        }
        DType::I32 => Tensor::from_slice(shape, i32s("int32_data")?),
        DType::I8 => Tensor::from_vec(
            shape,
            i32s("int32_data")?.iter().map(|&v| v as i8).collect(),
        ),
        DType::I16 => Tensor::from_vec(
            shape,
            i32s("int32_data")?.iter().map(|&v| v as i16).collect(),
        ),
        DType::U8 => Tensor::from_vec(
            shape,
            i32s("int32_data")?.iter().map(|&v| v as u8).collect(),
        ),
        DType::U16 => Tensor::from_vec(
            shape,
            i32s("int32_data")?.iter().map(|&v| v as u16).collect(),
        ),
        DType::Bool => {
            let b: Vec<bool> = i32s("int32_data")?.iter().map(|&v| v != 0).collect();
            Tensor::from_bools(shape, &b)
        }
        DType::F16 | DType::BF16 => {
            let bits: Vec<u16> = i32s("int32_data")?.iter().map(|&v| v as u16).collect();
            Tensor::from_raw(dtype, shape, &bits)
        }
        DType::I64 => {
            check_count(t.int64_data.len(), n, "int64_data", what)?;
            Tensor::from_slice(shape, &t.int64_data)
        }
        DType::U32 => {
            check_count(t.uint64_data.len(), n, "uint64_data", what)?;
            Tensor::from_vec(shape, t.uint64_data.iter().map(|&v| v as u32).collect())
        }
        DType::U64 => {
            check_count(t.uint64_data.len(), n, "uint64_data", what)?;
            Tensor::from_slice(shape, &t.uint64_data)
        }
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F8E8M0 => {
            let bits: Vec<u8> = i32s("int32_data")?.iter().map(|&v| v as u8).collect();
            Tensor::from_bytes(dtype, shape, &bits)
        }
        DType::I4 | DType::U4 | DType::F4E2M1 => {
            // int32_data holds the packed bytes, one per entry.
            let packed: Vec<u8> = t.int32_data.iter().map(|&v| v as u8).collect();
            from_packed_4bit(dtype, shape, &packed, what, "int32_data")
        }
        DType::String => {
            check_count(t.string_data.len(), n, "string_data", what)?;
            let s = t
                .string_data
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect();
            Tensor::from_strings(shape, s)
        }
    }
}

/// Resolves an external-data location against the model directory, refusing absolute
/// paths and paths that leave the directory.
fn external_path(base_dir: Option<&Path>, location: &str, what: &str) -> Result<PathBuf> {
    let base = base_dir.ok_or_else(|| {
        invalid(what, format!("external data {location:?} needs the model's directory (load the model from a file)"))
    })?;
    let rel = Path::new(location);
    let escapes = rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if location.is_empty() || escapes {
        return Err(invalid(what, format!("external data location {location:?} must be a relative path inside the model's directory")));
    }
    let path = base.join(rel);
    // Symlinks could still point outside: compare canonical paths when both exist.
    if let (Ok(cb), Ok(cp)) = (base.canonicalize(), path.canonicalize()) {
        if !cp.starts_with(&cb) {
            return Err(invalid(
                what,
                format!("external data location {location:?} leaves the model's directory"),
            ));
        }
    }
    Ok(path)
}

fn read_external(t: &proto::TensorProto, base_dir: Option<&Path>, what: &str) -> Result<Vec<u8>> {
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for kv in &t.external_data {
        let parse = |v: &str| -> Result<u64> {
            v.trim().parse::<u64>().map_err(|_| {
                invalid(
                    what,
                    format!("external data {}={v:?} is not a number", kv.key()),
                )
            })
        };
        match kv.key() {
            "location" => location = Some(kv.value().to_string()),
            "offset" => offset = parse(kv.value())?,
            "length" => length = Some(parse(kv.value())?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| invalid(what, "external data without a location"))?;
    let path = external_path(base_dir, &location, what)?;
    let mut file = std::fs::File::open(&path).map_err(|e| KilnError::io(&path, e))?;
    let file_len = file.metadata().map_err(|e| KilnError::io(&path, e))?.len();
    let length = length.unwrap_or(file_len.saturating_sub(offset));
    let end = offset
        .checked_add(length)
        .ok_or_else(|| invalid(what, "external data offset+length overflows"))?;
    if end > file_len {
        return Err(invalid(
            what,
            format!(
                "external data [{offset}, {end}) lies beyond the end of {} ({file_len} bytes)",
                path.display()
            ),
        ));
    }
    let len = usize::try_from(length).map_err(|_| invalid(what, "external data too large"))?;
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| KilnError::io(&path, e))?;
    file.read_exact(&mut buf)
        .map_err(|e| KilnError::io(&path, e))?;
    Ok(buf)
}

/// Densifies a `SparseTensorProto` (values `[NNZ]`, indices `[NNZ]` linear or `[NNZ, rank]`).
pub fn sparse_to_dense(sp: &proto::SparseTensorProto, base_dir: Option<&Path>) -> Result<Tensor> {
    let values = sp
        .values
        .as_ref()
        .ok_or_else(|| KilnError::InvalidModel("sparse tensor without values".into()))?;
    let what = format!("sparse {}", describe(values));
    let values = tensor_from_proto(values, base_dir)?;
    let shape = shape_of(&sp.dims, &what)?;
    let n = numel(&shape);
    let nnz = values.len();
    let indices = match &sp.indices {
        Some(i) => tensor_from_proto(i, base_dir)?.to_i64_vec()?,
        None => Vec::new(),
    };
    let rank = shape.len();
    let linear: Vec<usize> = if indices.len() == nnz {
        indices
            .iter()
            .map(|&i| usize::try_from(i).ok().filter(|&i| i < n))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid(&what, "index out of range"))?
    } else if indices.len() == nnz * rank {
        let st = kiln_core::strides(&shape);
        let mut out = Vec::with_capacity(nnz);
        for k in 0..nnz {
            let mut lin = 0usize;
            for (d, (&dim, &s)) in shape.iter().zip(st.iter()).enumerate() {
                let i = usize::try_from(indices[k * rank + d])
                    .ok()
                    .filter(|&i| i < dim);
                lin += i.ok_or_else(|| invalid(&what, "index out of range"))? * s;
            }
            out.push(lin);
        }
        out
    } else {
        return Err(invalid(
            &what,
            format!(
                "{} indices do not fit {nnz} values of rank {rank}",
                indices.len()
            ),
        ));
    };
    let dtype = values.dtype();
    if dtype == DType::String {
        let src = values.as_strings()?;
        let mut out = vec![String::new(); n];
        for (k, &l) in linear.iter().enumerate() {
            out[l] = src[k].clone();
        }
        return Tensor::from_strings(&shape, out);
    }
    let size = dtype.size();
    let src = values.bytes();
    let mut out = vec![0u8; n * size];
    for (k, &l) in linear.iter().enumerate() {
        out[l * size..(l + 1) * size].copy_from_slice(&src[k * size..(k + 1) * size]);
    }
    Tensor::from_bytes(dtype, &shape, &out)
}

fn decode_err(kind: &str, e: prost::DecodeError) -> KilnError {
    KilnError::Other(format!("not a {kind}: protobuf decode failed: {e}"))
}

/// Decodes a serialized `TensorProto` (an `input_K.pb` / `output_K.pb` of ONNX's tests).
pub fn parse_tensor_pb(bytes: &[u8]) -> Result<Tensor> {
    let t = proto::TensorProto::decode(bytes).map_err(|e| decode_err("TensorProto", e))?;
    tensor_from_proto(&t, None)
}

/// Decodes a serialized `SequenceProto` of tensors into [`Value::Sequence`].
pub fn parse_sequence_pb(bytes: &[u8]) -> Result<Value> {
    let s = proto::SequenceProto::decode(bytes).map_err(|e| decode_err("SequenceProto", e))?;
    sequence_to_value(&s)
}

/// Decodes a serialized `OptionalProto` into [`Value::Optional`].
pub fn parse_optional_pb(bytes: &[u8]) -> Result<Value> {
    let o = proto::OptionalProto::decode(bytes).map_err(|e| decode_err("OptionalProto", e))?;
    optional_to_value(&o)
}

/// A `SequenceProto` of tensors as a [`Value::Sequence`] (nested sequences and maps are
/// not supported).
pub fn sequence_to_value(s: &proto::SequenceProto) -> Result<Value> {
    use proto::sequence_proto::DataType as S;
    let elem = s.elem_type();
    let ok = elem == S::Tensor as i32
        || (elem == S::Undefined as i32 && s.sequence_values.is_empty() && s.map_values.is_empty());
    if !ok {
        return Err(KilnError::Other(format!(
            "sequence {:?}: only sequences of tensors are supported (elem_type {elem})",
            s.name()
        )));
    }
    let tensors = s
        .tensor_values
        .iter()
        .map(|t| tensor_from_proto(t, None))
        .collect::<Result<_>>()?;
    Ok(Value::Sequence(tensors))
}

/// An `OptionalProto` as a [`Value::Optional`] (of a tensor or a sequence of tensors).
pub fn optional_to_value(o: &proto::OptionalProto) -> Result<Value> {
    if let Some(t) = &o.tensor_value {
        return Ok(Value::Optional(Some(Box::new(Value::Tensor(
            tensor_from_proto(t, None)?,
        )))));
    }
    if let Some(s) = &o.sequence_value {
        return Ok(Value::Optional(Some(Box::new(sequence_to_value(s)?))));
    }
    if o.sparse_tensor_value.is_some() || o.map_value.is_some() || o.optional_value.is_some() {
        return Err(KilnError::Other(format!(
            "optional {:?}: only optionals of tensors or sequences are supported",
            o.name()
        )));
    }
    Ok(Value::Optional(None))
}

/// Reads one `.pb` file of ONNX's test data as the kind of value the model declares for
/// it: a `TensorProto` for tensors, a `SequenceProto` for sequences, an `OptionalProto`
/// for optionals.
pub fn read_value_pb(path: &Path, kind: ValueKind) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| KilnError::io(path, e))?;
    let v = match kind {
        ValueKind::Tensor => parse_tensor_pb(&bytes).map(Value::Tensor),
        ValueKind::Sequence => parse_sequence_pb(&bytes),
        ValueKind::Optional | ValueKind::OptionalSequence => parse_optional_pb(&bytes),
    };
    v.map_err(|e| KilnError::Other(format!("{}: {e}", path.display())))
}
