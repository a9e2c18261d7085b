//! Shared machinery of kiln's NVRTC kernels: C type names and conversions per dtype, module
//! naming, launch sizes, and [`KernelLayer`], the one [`GpuLayer`] every kernel family builds.
//!
//! Every kernel entry point has the signature `(ptr0, ptr1, ..., const P p)`: device pointers
//! first (inputs, then outputs, as [`Ptr`] lists them), then one parameter struct made only of
//! 8-byte fields (`long long` / `double`), written on the host as a list of `i64` words
//! ([`Params`]). The driver reads exactly the struct's size from the word block, so one Rust
//! type carries every family's parameters.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use kiln_core::{DType, KilnError, Result};

use crate::layer::{cuda_err, DevTensor, GpuLayer, KernelSource, LaunchCx};

/// Largest rank the kernels' index math handles.
pub const MAX_RANK: usize = 8;
/// Threads per block of the grid-stride kernels.
pub const BLOCK: u32 = 256;
/// Most parameter words one launch may carry.
pub const MAX_WORDS: usize = 256;

/// The C type that stores `dt` on the device.
pub fn ctype(dt: DType) -> Option<&'static str> {
    Some(match dt {
        DType::F32 => "float",
        DType::F64 => "double",
        DType::F16 => "__half",
        DType::BF16 => "__nv_bfloat16",
        DType::I8 => "signed char",
        DType::I16 => "short",
        DType::I32 => "int",
        DType::I64 => "long long",
        DType::U8 | DType::Bool => "unsigned char",
        DType::U16 => "unsigned short",
        DType::U32 => "unsigned int",
        DType::U64 => "unsigned long long",
        _ => return None,
    })
}

/// The C type arithmetic on `dt` uses: `float` for the 16- and 32-bit floats, the storage
/// type otherwise.
pub fn compute_type(dt: DType) -> Option<&'static str> {
    match dt {
        DType::F16 | DType::BF16 | DType::F32 => Some("float"),
        other => ctype(other),
    }
}

/// True for the float dtypes the float kernels accept (computed in `float`).
pub fn is_kernel_float(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::F16 | DType::BF16)
}

/// C expression converting a stored value `e` of `dt` to its compute type.
pub fn load(dt: DType, e: &str) -> String {
    match dt {
        DType::F16 => format!("__half2float({e})"),
        DType::BF16 => format!("__bfloat162float({e})"),
        _ => e.to_string(),
    }
}

/// C expression converting a compute value `e` to the storage type of `dt`.
pub fn store(dt: DType, e: &str) -> String {
    match dt {
        DType::F16 => format!("__float2half_rn((float)({e}))"),
        DType::BF16 => format!("__float2bfloat16_rn((float)({e}))"),
        DType::Bool => format!("(unsigned char)(({e}) != 0)"),
        other => format!("({})({e})", ctype(other).unwrap_or("float")),
    }
}

/// The unsigned C type of an element of `size` bytes (for type-blind data movement).
pub fn raw_type(size: usize) -> Option<&'static str> {
    Some(match size {
        1 => "unsigned char",
        2 => "unsigned short",
        4 => "unsigned int",
        8 => "unsigned long long",
        _ => return None,
    })
}

/// Headers and helpers every module starts with; fp16/bf16 headers only when used.
pub fn prelude(dtypes: &[DType]) -> String {
    let mut s = String::new();
    if dtypes.contains(&DType::F16) {
        s.push_str("#include <cuda_fp16.h>\n");
    }
    if dtypes.contains(&DType::BF16) {
        s.push_str("#include <cuda_bf16.h>\n");
    }
    s.push_str(
        "#define KILN_INF __int_as_float(0x7f800000)\n\
         #define KILN_LL_MAX 9223372036854775807LL\n\
         #define KILN_LL_MIN (-KILN_LL_MAX - 1LL)\n\
         #define KILN_TID ((long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x)\n\
         #define KILN_STRIDE ((long long)gridDim.x * (long long)blockDim.x)\n",
    );
    s
}

/// 64-bit FNV-1a of a string (module names are derived from their code).
pub fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A kernel source named by family and content hash.
pub fn source(family: &str, code: String) -> KernelSource {
    KernelSource {
        module: format!("kiln_{family}_{:016x}", fnv(&code)),
        code,
    }
}

/// Blocks of [`BLOCK`] threads for a grid-stride loop over `n` items.
pub fn grid_for(n: usize) -> u32 {
    let blocks = n.div_ceil(BLOCK as usize).max(1);
    blocks.min(1 << 20) as u32
}

/// Row-major strides of `shape` (in elements).
pub fn strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1] as i64;
    }
    s
}

/// Broadcast strides of an input of shape `ins` read at the coordinates of `out`
/// (numpy rules, aligned right); `None` when `ins` does not broadcast to `out`.
pub fn broadcast_strides(ins: &[usize], out: &[usize]) -> Option<Vec<i64>> {
    if ins.len() > out.len() {
        return None;
    }
    let st = strides(ins);
    let lead = out.len() - ins.len();
    let mut r = vec![0i64; out.len()];
    for (d, &od) in out.iter().enumerate().skip(lead) {
        let id = ins[d - lead];
        if id == od {
            r[d] = if id == 1 { 0 } else { st[d - lead] };
        } else if id == 1 {
            r[d] = 0;
        } else {
            return None;
        }
    }
    Some(r)
}

/// Merges adjacent dimensions that every stride list walks contiguously, and drops size-1
/// dims. Returns the reduced dims and the per-list reduced strides (at least rank 1).
pub fn coalesce(dims: &[usize], lists: &[Vec<i64>]) -> (Vec<usize>, Vec<Vec<i64>>) {
    let mut od: Vec<usize> = Vec::new();
    let mut os: Vec<Vec<i64>> = vec![Vec::new(); lists.len()];
    for (d, &n) in dims.iter().enumerate() {
        if n == 1 {
            continue;
        }
        if let Some(&last) = od.last() {
            let mergeable = lists
                .iter()
                .enumerate()
                .all(|(k, l)| *os[k].last().unwrap() == l[d] * n as i64);
            if mergeable {
                let nl = od.len() - 1;
                od[nl] = last * n;
                for (k, l) in lists.iter().enumerate() {
                    let m = os[k].len() - 1;
                    os[k][m] = l[d];
                }
                continue;
            }
        }
        od.push(n);
        for (k, l) in lists.iter().enumerate() {
            os[k].push(l[d]);
        }
    }
    if od.is_empty() {
        od.push(1);
        for o in os.iter_mut() {
            o.push(0);
        }
    }
    (od, os)
}

/// Parameter words of one launch (each an `i64`, or an `f64` stored by its bits).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(pub Vec<i64>);

impl Params {
    /// An empty word list.
    pub fn new() -> Self {
        Params(Vec::new())
    }
    /// Appends an integer word.
    pub fn i(&mut self, v: i64) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Appends a `double` word.
    pub fn f(&mut self, v: f64) -> &mut Self {
        self.0.push(v.to_bits() as i64);
        self
    }
    /// Appends `vals` padded with `pad` to exactly `len` words.
    pub fn arr(&mut self, vals: &[i64], len: usize, pad: i64) -> &mut Self {
        for k in 0..len {
            self.0.push(vals.get(k).copied().unwrap_or(pad));
        }
        self
    }
}

/// Fixed-size word block handed to the driver.
#[repr(C)]
#[derive(Clone, Copy)]
struct Words([i64; MAX_WORDS]);

// SAFETY: a plain array of i64, `repr(C)`, valid for any bit pattern.
unsafe impl DeviceRepr for Words {}

/// A device pointer argument: an input or output of the node plus a byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ptr {
    /// Node input `i`, plus bytes.
    In(usize, u64),
    /// Node output `i`, plus bytes.
    Out(usize, u64),
    /// The layer's workspace, plus bytes.
    Work(u64),
}

/// One step of a layer.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A kernel launch.
    Launch {
        /// Entry point name.
        func: &'static str,
        /// Blocks.
        grid: u32,
        /// Threads per block.
        block: u32,
        /// Dynamic shared memory bytes.
        shmem: u32,
        /// Pointer arguments, in order.
        ptrs: Vec<Ptr>,
        /// The parameter struct's words.
        params: Params,
    },
    /// A device-to-device copy.
    Copy {
        /// Source.
        src: Ptr,
        /// Destination.
        dst: Ptr,
        /// Bytes.
        bytes: usize,
    },
}

/// A node lowered to kiln's NVRTC kernels: a module and a fixed list of steps, all sizes
/// computed at build time from the concrete shapes.
#[derive(Debug, Clone)]
pub struct KernelLayer {
    /// Tactic id (`nvrtc.<family>.<detail>`).
    pub tactic: String,
    /// The module (None for copy-only layers).
    pub src: Option<KernelSource>,
    /// What enqueue does, in order.
    pub steps: Vec<Step>,
    /// Expected (dtype, shape) of each node input (None: absent or not read).
    pub in_facts: Vec<Option<(DType, Vec<usize>)>>,
    /// Expected (dtype, shape) of each node output.
    pub out_facts: Vec<Option<(DType, Vec<usize>)>>,
    /// Workspace bytes.
    pub work: usize,
}

impl KernelLayer {
    fn resolve(
        &self,
        p: Ptr,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<u64> {
        let err = |what: String| cuda_err(&self.tactic, what);
        let (base, off) = match p {
            Ptr::In(i, o) => (
                inputs
                    .get(i)
                    .ok_or_else(|| err(format!("input {i} was not given")))?
                    .ptr,
                o,
            ),
            Ptr::Out(i, o) => (
                outputs
                    .get(i)
                    .ok_or_else(|| err(format!("output {i} was not given")))?
                    .ptr,
                o,
            ),
            Ptr::Work(o) => (cx.workspace, o),
        };
        Ok(base + off)
    }

    fn check(
        &self,
        what: &str,
        facts: &[Option<(DType, Vec<usize>)>],
        ts: &[DevTensor],
    ) -> Result<()> {
        for (i, f) in facts.iter().enumerate() {
            let Some((dt, shape)) = f else { continue };
            let t = ts
                .get(i)
                .ok_or_else(|| cuda_err(&self.tactic, format!("{what} {i} was not given")))?;
            if t.dtype != *dt || t.shape.as_slice() != shape.as_slice() {
                return Err(cuda_err(
                    &self.tactic,
                    format!(
                        "{what} {i}: expected {} {:?}, found {} {:?}",
                        dt.name(),
                        shape,
                        t.dtype.name(),
                        t.shape.as_slice()
                    ),
                ));
            }
            if t.ptr == 0 && !t.is_empty() {
                return Err(cuda_err(
                    &self.tactic,
                    format!("{what} {i} has a null pointer"),
                ));
            }
        }
        Ok(())
    }
}

impl GpuLayer for KernelLayer {
    fn tactic(&self) -> String {
        self.tactic.clone()
    }

    fn sources(&self) -> Vec<KernelSource> {
        self.src.iter().cloned().collect()
    }

    fn workspace_bytes(&self, _inputs: &[DevTensor]) -> usize {
        self.work
    }

    fn enqueue(
        &self,
        cx: &LaunchCx<'_>,
        inputs: &[DevTensor],
        outputs: &[DevTensor],
    ) -> Result<()> {
        self.check("input", &self.in_facts, inputs)?;
        self.check("output", &self.out_facts, outputs)?;
        if cx.workspace_bytes < self.work {
            return Err(cuda_err(
                &self.tactic,
                format!(
                    "workspace of {} bytes, {} needed",
                    cx.workspace_bytes, self.work
                ),
            ));
        }
        for step in &self.steps {
            match step {
                Step::Copy { src, dst, bytes } => {
                    if *bytes == 0 {
                        continue;
                    }
                    let s = self.resolve(*src, cx, inputs, outputs)?;
                    let d = self.resolve(*dst, cx, inputs, outputs)?;
                    // SAFETY: both ranges lie inside tensors the executor allocated with the
                    // shapes checked above; the copy is ordered on the inference stream.
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            d,
                            s,
                            *bytes,
                            cx.stream.cu_stream(),
                        )
                    }
                    .map_err(|e| cuda_err(&self.tactic, e))?;
                }
                Step::Launch {
                    func,
                    grid,
                    block,
                    shmem,
                    ptrs,
                    params,
                } => {
                    let module = self
                        .src
                        .as_ref()
                        .ok_or_else(|| cuda_err(&self.tactic, "no module"))?;
                    let f = cx.modules.function(&module.module, func)?;
                    let addrs = ptrs
                        .iter()
                        .map(|p| self.resolve(*p, cx, inputs, outputs))
                        .collect::<Result<Vec<u64>>>()?;
                    if params.0.len() > MAX_WORDS {
                        return Err(cuda_err(&self.tactic, "too many parameter words"));
                    }
                    let mut words = Words([0; MAX_WORDS]);
                    words.0[..params.0.len()].copy_from_slice(&params.0);
                    let mut b = cx.stream.launch_builder(&f);
                    for a in &addrs {
                        b.arg(a);
                    }
                    b.arg(&words);
                    let cfg = LaunchConfig {
                        grid_dim: (*grid, 1, 1),
                        block_dim: (*block, 1, 1),
                        shared_mem_bytes: *shmem,
                    };
                    // SAFETY: the kernel's signature is (pointers..., struct of 8-byte words)
                    // as generated by this module; pointers address tensors whose dtypes and
                    // shapes were checked above and every kernel bounds-checks its indices.
                    unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&self.tactic, e))?;
                }
            }
        }
        Ok(())
    }
}

/// Error for a node this module cannot lower although it claimed to.
pub fn lower_err(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::kernel(op, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_coalesce() {
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), Some(vec![0, 1, 0]));
        assert_eq!(broadcast_strides(&[2, 3], &[3, 3]), None);
        assert_eq!(broadcast_strides(&[4], &[2, 3, 4]), Some(vec![0, 0, 1]));
        // [N,C,H,W] + [1,C,1,1]: H and W merge, N stays apart.
        let out = [2, 3, 4, 5];
        let a = strides(&out);
        let b = broadcast_strides(&[1, 3, 1, 1], &out).unwrap();
        let (d, s) = coalesce(&out, &[a, b]);
        assert_eq!(d, vec![2, 3, 20]);
        assert_eq!(s, vec![vec![60, 20, 1], vec![0, 1, 0]]);
        // Same shapes collapse to one dim; all-ones to [1].
        let (d, _) = coalesce(&[2, 3, 4], &[strides(&[2, 3, 4])]);
        assert_eq!(d, vec![24]);
        let (d, s) = coalesce(&[1, 1], &[vec![1, 1]]);
        assert_eq!((d, s), (vec![1], vec![vec![0]]));
    }

    #[test]
    fn grid_and_names() {
        assert_eq!(grid_for(0), 1);
        assert_eq!(grid_for(257), 2);
        assert_eq!(grid_for(usize::MAX / 2), 1 << 20);
        let a = source("x", "code a".into());
        let b = source("x", "code b".into());
        assert_ne!(a.module, b.module);
        assert_eq!(a.module, source("x", "code a".into()).module);
        assert_eq!(store(DType::F16, "y"), "__float2half_rn((float)(y))");
        assert!(prelude(&[DType::F16]).contains("cuda_fp16.h"));
        assert!(!prelude(&[DType::F32]).contains("cuda_fp16.h"));
    }
}
