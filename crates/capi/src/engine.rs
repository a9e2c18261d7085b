//! Engines: build from ONNX, load and save plans, describe inputs, outputs and profiles.

use std::ffi::{c_char, CString};
use std::path::Path;

use kiln_rt::{Builder, BuilderConfig, DType, Engine, ProfileBound, Runtime};

use crate::config::KilnBuildConfig;
use crate::error::{destroy, guard, handle, string, write_out, CError, CResult, KilnStatus};

/// A built engine (opaque). Safe to use from many threads at once.
pub struct KilnEngine {
    pub(crate) engine: Engine,
    input_names: Vec<CString>,
    output_names: Vec<CString>,
}

/// Element types, numbered as ONNX's `TensorProto.DataType`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilnDataType {
    /// Not known (or not a tensor).
    Undefined = 0,
    /// 32-bit float.
    Float32 = 1,
    /// Unsigned 8-bit integer.
    Uint8 = 2,
    /// Signed 8-bit integer.
    Int8 = 3,
    /// Unsigned 16-bit integer.
    Uint16 = 4,
    /// Signed 16-bit integer.
    Int16 = 5,
    /// Signed 32-bit integer.
    Int32 = 6,
    /// Signed 64-bit integer.
    Int64 = 7,
    /// String (not accepted through the C API's buffers).
    String = 8,
    /// Boolean, one byte per element (0 or 1).
    Bool = 9,
    /// 16-bit IEEE float.
    Float16 = 10,
    /// 64-bit float.
    Float64 = 11,
    /// Unsigned 32-bit integer.
    Uint32 = 12,
    /// Unsigned 64-bit integer.
    Uint64 = 13,
    /// bfloat16.
    Bfloat16 = 16,
    /// Another type (float8/float4 variants): see the ONNX numbering.
    Other = 255,
}

impl KilnDataType {
    /// The C value for a kiln dtype.
    pub fn of(d: Option<DType>) -> KilnDataType {
        use KilnDataType as K;
        match d {
            None => K::Undefined,
            Some(d) => match d.onnx_code() {
                1 => K::Float32,
                2 => K::Uint8,
                3 => K::Int8,
                4 => K::Uint16,
                5 => K::Int16,
                6 => K::Int32,
                7 => K::Int64,
                8 => K::String,
                9 => K::Bool,
                10 => K::Float16,
                11 => K::Float64,
                12 => K::Uint32,
                13 => K::Uint64,
                16 => K::Bfloat16,
                _ => K::Other,
            },
        }
    }
}

/// Which shape of an optimization profile `kiln_engine_profile_shape` returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilnProfileBound {
    /// The smallest shape.
    Min = 0,
    /// The shape kernels are tuned at.
    Opt = 1,
    /// The largest shape.
    Max = 2,
}

fn wrap(engine: Engine, out: *mut *mut KilnEngine) -> CResult<()> {
    let names = |v: &[kiln_rt::IoInfo]| -> CResult<Vec<CString>> {
        v.iter()
            .map(|i| {
                CString::new(i.name.as_str()).map_err(|_| {
                    CError::new(
                        KilnStatus::Unsupported,
                        format!("tensor name {:?} contains a NUL byte", i.name),
                    )
                })
            })
            .collect()
    };
    let e = KilnEngine {
        input_names: names(engine.inputs())?,
        output_names: names(engine.outputs())?,
        engine,
    };
    write_out(out, Box::into_raw(Box::new(e)), "out")
}

/// Builds an engine from an ONNX model file. `config` may be NULL (defaults). Release the
/// engine with `kiln_engine_destroy`.
#[no_mangle]
pub extern "C" fn kiln_engine_build_onnx(
    onnx_path: *const c_char,
    config: *const KilnBuildConfig,
    out: *mut *mut KilnEngine,
) -> KilnStatus {
    guard(|| {
        let path = string(onnx_path, "onnx_path")?;
        if out.is_null() {
            return Err(CError::new(KilnStatus::NullPointer, "out is NULL"));
        }
        let default = BuilderConfig::default();
        let cfg = if config.is_null() {
            &default
        } else {
            &handle(config, "config")?.config
        };
        let engine = Builder::new().build_onnx_file(Path::new(path), cfg)?;
        wrap(engine, out)
    })
}

/// Loads a plan file written by `kiln build` or `kiln_engine_save_plan`.
#[no_mangle]
pub extern "C" fn kiln_engine_load_plan(
    plan_path: *const c_char,
    out: *mut *mut KilnEngine,
) -> KilnStatus {
    guard(|| {
        let path = string(plan_path, "plan_path")?;
        if out.is_null() {
            return Err(CError::new(KilnStatus::NullPointer, "out is NULL"));
        }
        wrap(Runtime::load(Path::new(path))?, out)
    })
}

/// Writes the engine as a plan file.
#[no_mangle]
pub extern "C" fn kiln_engine_save_plan(
    engine: *const KilnEngine,
    plan_path: *const c_char,
) -> KilnStatus {
    guard(|| {
        let e = handle(engine, "engine")?;
        let path = string(plan_path, "plan_path")?;
        e.engine.save(Path::new(path))?;
        Ok(())
    })
}

/// Releases an engine (NULL is ignored). Contexts created from it stay usable.
#[no_mangle]
pub extern "C" fn kiln_engine_destroy(engine: *mut KilnEngine) {
    destroy(engine)
}

/// Number of inputs.
#[no_mangle]
pub extern "C" fn kiln_engine_num_inputs(engine: *const KilnEngine, out: *mut usize) -> KilnStatus {
    guard(|| write_out(out, handle(engine, "engine")?.input_names.len(), "out"))
}

/// Number of outputs.
#[no_mangle]
pub extern "C" fn kiln_engine_num_outputs(
    engine: *const KilnEngine,
    out: *mut usize,
) -> KilnStatus {
    guard(|| write_out(out, handle(engine, "engine")?.output_names.len(), "out"))
}

fn name_at(names: &[CString], index: usize, what: &str, out: *mut *const c_char) -> CResult<()> {
    let n = names.get(index).ok_or_else(|| {
        CError::new(
            KilnStatus::InvalidArgument,
            format!(
                "{what} index {index} is out of range (the engine has {})",
                names.len()
            ),
        )
    })?;
    write_out(out, n.as_ptr(), "out")
}

/// Name of input `index` (owned by the engine: valid until `kiln_engine_destroy`).
#[no_mangle]
pub extern "C" fn kiln_engine_input_name(
    engine: *const KilnEngine,
    index: usize,
    out: *mut *const c_char,
) -> KilnStatus {
    guard(|| name_at(&handle(engine, "engine")?.input_names, index, "input", out))
}

/// Name of output `index` (owned by the engine: valid until `kiln_engine_destroy`).
#[no_mangle]
pub extern "C" fn kiln_engine_output_name(
    engine: *const KilnEngine,
    index: usize,
    out: *mut *const c_char,
) -> KilnStatus {
    guard(|| {
        name_at(
            &handle(engine, "engine")?.output_names,
            index,
            "output",
            out,
        )
    })
}

/// Element type of the input or output `name`.
#[no_mangle]
pub extern "C" fn kiln_engine_tensor_dtype(
    engine: *const KilnEngine,
    name: *const c_char,
    out: *mut KilnDataType,
) -> KilnStatus {
    guard(|| {
        let e = &handle(engine, "engine")?.engine;
        let name = string(name, "name")?;
        let info = e
            .inputs()
            .iter()
            .chain(e.outputs())
            .find(|i| i.name == name)
            .ok_or_else(|| no_tensor(e, name))?;
        write_out(out, KilnDataType::of(info.dtype), "out")
    })
}

/// Number of optimization profiles (0 for an engine that accepts any shape the model
/// allows).
#[no_mangle]
pub extern "C" fn kiln_engine_num_profiles(
    engine: *const KilnEngine,
    out: *mut usize,
) -> KilnStatus {
    guard(|| {
        write_out(
            out,
            handle(engine, "engine")?.engine.profiles().len(),
            "out",
        )
    })
}

/// One shape of input `name` in optimization profile `profile`: `bound` is a
/// `KilnProfileBound` value. Writes the rank to `*rank` and the dims to `dims` (which
/// must hold `capacity` values; `KILN_STATUS_BUFFER_SIZE` when it is too short, with
/// `*rank` set).
#[no_mangle]
pub extern "C" fn kiln_engine_profile_shape(
    engine: *const KilnEngine,
    profile: usize,
    name: *const c_char,
    bound: i32,
    dims: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> KilnStatus {
    guard(|| {
        let e = &handle(engine, "engine")?.engine;
        let name = string(name, "name")?;
        let bound = match bound {
            0 => ProfileBound::Min,
            1 => ProfileBound::Opt,
            2 => ProfileBound::Max,
            b => {
                return Err(CError::new(
                    KilnStatus::InvalidArgument,
                    format!("bound {b} is not a KilnProfileBound (0 min, 1 opt, 2 max)"),
                ))
            }
        };
        let p = e.profiles().get(profile).ok_or_else(|| {
            CError::new(
                KilnStatus::InvalidArgument,
                format!(
                    "optimization profile {profile} does not exist (the engine has {})",
                    e.profiles().len()
                ),
            )
        })?;
        let shape = p.shape(name, bound).ok_or_else(|| {
            CError::new(
                KilnStatus::InvalidArgument,
                format!("optimization profile {profile} gives no shape for {name:?}"),
            )
        })?;
        write_dims(shape, dims, capacity, rank)
    })
}

/// The error for a name that is neither an input nor an output.
pub(crate) fn no_tensor(e: &Engine, name: &str) -> CError {
    let names: Vec<&str> = e
        .inputs()
        .iter()
        .chain(e.outputs())
        .map(|i| i.name.as_str())
        .collect();
    CError::new(
        KilnStatus::InvalidArgument,
        format!(
            "{name:?} is not an input or output of the engine (it has: {})",
            names.join(", ")
        ),
    )
}

/// Writes a shape to a caller's dims array.
pub(crate) fn write_dims(
    shape: &[usize],
    dims: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> CResult<()> {
    write_out(rank, shape.len(), "rank")?;
    if shape.len() > capacity {
        return Err(CError::new(
            KilnStatus::BufferSize,
            format!("the shape has rank {}, dims holds {capacity}", shape.len()),
        ));
    }
    if shape.is_empty() {
        return Ok(());
    }
    if dims.is_null() {
        return Err(CError::new(KilnStatus::NullPointer, "dims is NULL"));
    }
    for (i, &d) in shape.iter().enumerate() {
        // SAFETY: dims is non-null and holds `capacity` >= shape.len() values (contract).
        unsafe { dims.add(i).write(d as i64) };
    }
    Ok(())
}
