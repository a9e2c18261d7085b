//! `kiln::ElementwiseChain`: several f32 elementwise ops fused into one pass over memory.
//!
//! The optimiser (`kiln`'s `fuse_elementwise` pass) replaces a connected group of
//! elementwise nodes with a single output by one node carrying a small program. Every
//! instruction reads operands that are graph inputs of the group (a full tensor of the
//! output's shape, or a one-element tensor broadcast to all), immediate constants, or
//! earlier instructions' results; the last instruction is the output. The kernel runs the
//! program over chunks of [`CHUNK`] elements, so intermediates live in a few KiB of
//! thread-local scratch instead of full tensors in memory.
//!
//! Attributes: `kiln_program` (ints, three per instruction: opcode, operand a, operand b)
//! and `kiln_constants` (floats). Operand `i` names input `i` when `i < inputs`, constant
//! `i − inputs` when below `inputs + constants`, else the result of instruction
//! `i − inputs − constants` (an earlier one).

use rayon::prelude::*;

use kiln_core::{
    input_tensor, Attr, BuildCtx, DType, Fact, KilnError, Op, OpDesc, OpRegistry, Result,
    TensorMut, Value,
};

use super::{infer_broadcast, new_tensor};
use crate::fused::KILN_DOMAIN;

/// Op type of the fused chain (in the `kiln` domain).
pub const CHAIN_OP: &str = "ElementwiseChain";
/// Attribute holding the instructions.
pub const PROGRAM_ATTR: &str = "kiln_program";
/// Attribute holding the immediate constants.
pub const CONSTANTS_ATTR: &str = "kiln_constants";
/// Elements per chunk of the kernel.
pub const CHUNK: usize = 256;
/// Elements from which the chain splits over threads.
const PARALLEL_MIN: usize = 1 << 15;

/// One operation of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainOp {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b.
    Div,
    /// max(a, b).
    Max,
    /// min(a, b).
    Min,
    /// max(a, 0).
    Relu,
    /// 1 / (1 + e^−a).
    Sigmoid,
    /// tanh(a).
    Tanh,
    /// a · max(0, min(1, a/6 + 1/2)).
    HardSwish,
    /// −a.
    Neg,
    /// |a|.
    Abs,
    /// a rounded to the nearest integer, halves to even (ONNX QuantizeLinear's rounding).
    RoundEven,
    /// b where a is NaN, else a.
    NanTo,
    /// QuantizeLinear then DequantizeLinear with one per-tensor scale and zero point, in
    /// registers: operand b names the first of [`FAKE_QUANT_PARAMS`] consecutive constants
    /// `[scale, −zp, lo − zp, hi − zp]` (lo, hi: the integer type's range); see
    /// [`fake_quant`].
    FakeQuant,
}

/// Constants a [`ChainOp::FakeQuant`] reads, from its operand b on.
pub const FAKE_QUANT_PARAMS: usize = 4;

/// Opcodes are positions in this list: new ops go at the end, so plans stay readable.
const OPS: [ChainOp; 15] = [
    ChainOp::Add,
    ChainOp::Sub,
    ChainOp::Mul,
    ChainOp::Div,
    ChainOp::Max,
    ChainOp::Min,
    ChainOp::Relu,
    ChainOp::Sigmoid,
    ChainOp::Tanh,
    ChainOp::HardSwish,
    ChainOp::Neg,
    ChainOp::Abs,
    ChainOp::RoundEven,
    ChainOp::NanTo,
    ChainOp::FakeQuant,
];

impl ChainOp {
    /// True for ops of two operands.
    pub fn is_binary(self) -> bool {
        matches!(
            self,
            ChainOp::Add
                | ChainOp::Sub
                | ChainOp::Mul
                | ChainOp::Div
                | ChainOp::Max
                | ChainOp::Min
                | ChainOp::NanTo
        )
    }

    fn code(self) -> i64 {
        OPS.iter().position(|&o| o == self).unwrap_or(0) as i64
    }

    /// The op applied to one pair of values (`b` ignored by unary ops).
    #[inline(always)]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            ChainOp::Add => a + b,
            ChainOp::Sub => a - b,
            ChainOp::Mul => a * b,
            ChainOp::Div => a / b,
            ChainOp::Max => a.max(b),
            ChainOp::Min => a.min(b),
            ChainOp::Relu => a.max(0.0),
            ChainOp::Sigmoid => 1.0 / (1.0 + (-a).exp()),
            ChainOp::Tanh => a.tanh(),
            ChainOp::HardSwish => a * (a * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
            ChainOp::Neg => -a,
            ChainOp::Abs => a.abs(),
            ChainOp::RoundEven => round_even(a),
            // Needs its parameter block: evaluated by `Program::eval_one` and the kernel.
            ChainOp::FakeQuant => f32::NAN,
            ChainOp::NanTo => {
                if a.is_nan() {
                    b
                } else {
                    a
                }
            }
        }
    }
}

/// Rounds half to even like `f32::round_ties_even`, in a form that vectorises without
/// SSE4.1's `roundps` (the std call is a libm call per element on the portable and AVX
/// builds): below 2^23 adding and subtracting 2^23 rounds in the default mode; larger
/// values, ±∞ and NaN are already integral or pass through.
#[inline(always)]
pub fn round_even(a: f32) -> f32 {
    const TWO23: f32 = 8_388_608.0;
    let m = a.abs();
    if m < TWO23 {
        ((m + TWO23) - TWO23).copysign(a)
    } else {
        a
    }
}

/// `DequantizeLinear(QuantizeLinear(x))` with per-tensor parameters `p = [scale, −zp,
/// lo − zp, hi − zp]`, bit for bit what kiln's QuantizeLinear and DequantizeLinear kernels
/// compute one after the other: `x / scale` (a division, as ONNX specifies), NaN → code 0,
/// clamped to the type's range, rounded half to even, times the scale, `+ 0` (turning −0
/// into +0 as `(q − zp) · scale` does).
#[inline(always)]
pub fn fake_quant(x: f32, p: [f32; FAKE_QUANT_PARAMS]) -> f32 {
    let d = x / p[0];
    let d = if d.is_nan() { p[1] } else { d };
    round_even(d.max(p[2]).min(p[3])) * p[0] + 0.0
}

/// One instruction: `op(operand a, operand b)` (see the module doc for operand numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instr {
    /// The operation.
    pub op: ChainOp,
    /// First operand.
    pub a: usize,
    /// Second operand (ignored by unary ops).
    pub b: usize,
}

/// A validated chain program.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// Number of tensor inputs.
    pub inputs: usize,
    /// Immediate constants.
    pub constants: Vec<f32>,
    /// Instructions; the last one's result is the output.
    pub instrs: Vec<Instr>,
}

impl Program {
    /// Checks operand numbers (each refers to an input, a constant or an earlier result).
    pub fn validate(&self) -> Result<()> {
        if self.instrs.is_empty() {
            return Err(KilnError::Other(format!("{CHAIN_OP}: empty program")));
        }
        let base = self.inputs + self.constants.len();
        for (t, ins) in self.instrs.iter().enumerate() {
            if ins.op == ChainOp::FakeQuant {
                let block = ins.b.checked_sub(self.inputs);
                if block.is_none_or(|c| c + FAKE_QUANT_PARAMS > self.constants.len()) {
                    return Err(KilnError::Other(format!(
                        "{CHAIN_OP}: instruction {t} (FakeQuant) needs {FAKE_QUANT_PARAMS} \
                         constants from operand {}, but constants are operands {}..{}",
                        ins.b, self.inputs, base
                    )));
                }
            }
            let ops: &[usize] = if ins.op.is_binary() {
                &[ins.a, ins.b]
            } else {
                &[ins.a]
            };
            if let Some(bad) = ops.iter().find(|&&o| o >= base + t) {
                return Err(KilnError::Other(format!(
                    "{CHAIN_OP}: instruction {t} reads operand {bad}, but only {} exist before it",
                    base + t
                )));
            }
        }
        Ok(())
    }

    /// Writes the program into an op description in the `kiln` domain.
    pub fn to_desc(&self) -> OpDesc {
        let mut desc = OpDesc {
            domain: KILN_DOMAIN.into(),
            op_type: CHAIN_OP.into(),
            opset: 1,
            attrs: Default::default(),
        };
        let prog: Vec<i64> = self
            .instrs
            .iter()
            .flat_map(|i| [i.op.code(), i.a as i64, i.b as i64])
            .collect();
        desc.attrs.insert(PROGRAM_ATTR.into(), Attr::Ints(prog));
        desc.attrs
            .insert(CONSTANTS_ATTR.into(), Attr::Floats(self.constants.clone()));
        desc
    }

    /// The program's value for one element (`inputs[i]` is input i's value): the reference
    /// the kernel is tested against.
    pub fn eval_one(&self, inputs: &[f32]) -> f32 {
        let mut vals: Vec<f32> = inputs.to_vec();
        vals.extend_from_slice(&self.constants);
        for ins in &self.instrs {
            let v = if ins.op == ChainOp::FakeQuant {
                fake_quant(vals[ins.a], self.fake_quant_params(ins.b))
            } else {
                let b = if ins.op.is_binary() { vals[ins.b] } else { 0.0 };
                ins.op.apply(vals[ins.a], b)
            };
            vals.push(v);
        }
        vals.last().copied().unwrap_or(0.0)
    }
}

impl Program {
    /// The parameter block of a FakeQuant whose operand b is `b` (checked by `validate`).
    pub fn fake_quant_params(&self, b: usize) -> [f32; FAKE_QUANT_PARAMS] {
        let c = b - self.inputs;
        let mut p = [0.0; FAKE_QUANT_PARAMS];
        p.copy_from_slice(&self.constants[c..c + FAKE_QUANT_PARAMS]);
        p
    }

    /// Reads a program back from its op description (`inputs`: the node's input count).
    pub fn from_desc(desc: &OpDesc, node: &str, inputs: usize) -> Result<Program> {
        let ctx = BuildCtx {
            node,
            desc,
            n_inputs: inputs,
            n_outputs: 1,
        };
        let a = ctx.attrs();
        let code = a
            .opt_ints(PROGRAM_ATTR)?
            .ok_or_else(|| a.invalid(format!("{PROGRAM_ATTR} is missing")))?;
        if code.len() % 3 != 0 {
            return Err(a.invalid(format!(
                "{PROGRAM_ATTR} must hold three ints per instruction"
            )));
        }
        let operand = |v: i64| usize::try_from(v).map_err(|_| a.invalid("negative operand"));
        let instrs = code
            .chunks_exact(3)
            .map(|c| {
                let op = usize::try_from(c[0])
                    .ok()
                    .and_then(|i| OPS.get(i).copied())
                    .ok_or_else(|| a.invalid(format!("unknown chain opcode {}", c[0])))?;
                Ok(Instr {
                    op,
                    a: operand(c[1])?,
                    b: operand(c[2])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let prog = Program {
            inputs,
            constants: a.opt_floats(CONSTANTS_ATTR)?.unwrap_or_default(),
            instrs,
        };
        prog.validate().map_err(|e| a.invalid(e.to_string()))?;
        Ok(prog)
    }
}

fn build_chain(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let prog = Program::from_desc(ctx.desc, ctx.node, ctx.n_inputs)?;
    Ok(Box::new(ElementwiseChain { prog }))
}

/// Registers `kiln::ElementwiseChain`.
pub fn register(reg: &mut OpRegistry) {
    reg.register_in(KILN_DOMAIN, CHAIN_OP, build_chain);
}

/// The fused elementwise chain op.
#[derive(Debug, Clone)]
pub struct ElementwiseChain {
    /// Its program.
    pub prog: Program,
}

impl ElementwiseChain {
    /// Reads the f32 inputs: each has `len` elements or one (broadcast).
    fn slices<'a>(
        &self,
        inputs: &[Option<&'a Value>],
        len: usize,
    ) -> Result<smallvec::SmallVec<[&'a [f32]; 8]>> {
        let mut out = smallvec::SmallVec::new();
        for i in 0..self.prog.inputs {
            let t = input_tensor(inputs, i, CHAIN_OP)?;
            let s = t.as_slice::<f32>().map_err(|_| {
                KilnError::kernel(
                    CHAIN_OP,
                    format!("input {i} must be f32, found {}", t.dtype()),
                )
            })?;
            if s.len() != len && s.len() != 1 {
                return Err(KilnError::kernel(
                    CHAIN_OP,
                    format!("input {i} has {} elements; expected {len} or 1", s.len()),
                ));
            }
            out.push(s);
        }
        Ok(out)
    }
}

impl Op for ElementwiseChain {
    fn op_type(&self) -> &str {
        CHAIN_OP
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        infer_broadcast(CHAIN_OP, inputs, Some(DType::F32))
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let facts: Vec<Fact> = inputs
            .iter()
            .map(|v| match v {
                Some(Value::Tensor(t)) => Fact::concrete(t.dtype(), t.shape()),
                _ => Fact::unknown(),
            })
            .collect();
        let refs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let shape = self
            .infer(&refs, 1)?
            .remove(0)
            .concrete_shape()
            .ok_or_else(|| KilnError::kernel(CHAIN_OP, "inputs do not broadcast"))?;
        let t = new_tensor::<f32>(DType::F32, &shape, |out| {
            let ins = self.slices(inputs, out.len())?;
            run(&self.prog, &ins, out);
            Ok(())
        })?;
        Ok(vec![t.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let Some(slot) = outputs.first_mut() else {
            return Err(KilnError::kernel(CHAIN_OP, "no output slot"));
        };
        let out = slot.as_mut_slice::<f32>()?;
        let ins = self.slices(inputs, out.len())?;
        run(&self.prog, &ins, out);
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Runs `prog` over every element: `inputs[i]` has `out.len()` elements or one.
pub fn run(prog: &Program, inputs: &[&[f32]], out: &mut [f32]) {
    let slots = SlotPlan::new(prog);
    let block = CHUNK * 16;
    if out.len() >= PARALLEL_MIN && crate::parallel::threads() > 1 {
        out.par_chunks_mut(block)
            .enumerate()
            .for_each(|(i, o)| run_block(prog, &slots, inputs, i * block, o));
    } else {
        run_block(prog, &slots, inputs, 0, out);
    }
}

/// Where each instruction's chunk of results lives in the scratch: slots are reused once
/// their value's last reader has run, so a long chain (Q/DQ chains reach ~60 steps) works
/// in a few live chunks that stay in L1 instead of one chunk per instruction.
#[derive(Debug)]
struct SlotPlan {
    /// Slot of instruction `t`'s result (unused for the last instruction, which writes
    /// the output).
    slot: smallvec::SmallVec<[usize; 64]>,
    /// Number of slots.
    count: usize,
}

impl SlotPlan {
    /// Greedy allocation in program order. An instruction's destination is taken before
    /// its operands' slots are released, so it never aliases an operand.
    fn new(prog: &Program) -> SlotPlan {
        let n = prog.instrs.len();
        let base = prog.inputs + prog.constants.len();
        let reads = |ins: &Instr| {
            let b = if ins.op.is_binary() {
                Some(ins.b)
            } else {
                None
            };
            [Some(ins.a), b]
                .into_iter()
                .flatten()
                .filter_map(move |o| o.checked_sub(base))
        };
        // Last reader of every result (itself when nothing reads it).
        let mut last: smallvec::SmallVec<[usize; 64]> = (0..n).collect();
        for (t, ins) in prog.instrs.iter().enumerate() {
            for r in reads(ins) {
                last[r] = last[r].max(t);
            }
        }
        let mut slot = smallvec::SmallVec::from_elem(0, n);
        let mut free: smallvec::SmallVec<[usize; 16]> = smallvec::SmallVec::new();
        let mut count = 0;
        for (t, ins) in prog.instrs.iter().enumerate() {
            if t + 1 < n {
                slot[t] = free.pop().unwrap_or_else(|| {
                    count += 1;
                    count - 1
                });
            }
            let mut released: smallvec::SmallVec<[usize; 2]> = smallvec::SmallVec::new();
            for r in reads(ins).chain((t + 1 < n).then_some(t)) {
                if last[r] == t && !released.contains(&r) {
                    released.push(r);
                    free.push(slot[r]);
                }
            }
        }
        SlotPlan { slot, count }
    }
}

/// Elements `off..off + out.len()`, with the best SIMD build of the loops.
///
/// The scratch is taken here, outside the `#[target_feature]` functions: a closure does
/// not inherit its enclosing function's target features, so a chunk loop written inside
/// `with_scratch`'s closure was compiled for plain SSE2 whatever the build.
fn run_block(prog: &Program, slots: &SlotPlan, inputs: &[&[f32]], off: usize, out: &mut [f32]) {
    let regs_len = slots.count * CHUNK;
    crate::scratch::with_scratch::<f32, _>(regs_len, |regs| {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::ops::linalg::sgemm::Isa;
            match Isa::detect() {
                // SAFETY: the CPU supports the features (run-time detection).
                Isa::Avx512 => return unsafe { block_avx512(prog, slots, inputs, off, out, regs) },
                // SAFETY: as above.
                Isa::Avx2 => return unsafe { block_avx2(prog, slots, inputs, off, out, regs) },
                Isa::Scalar => {}
            }
        }
        block_body::<false>(prog, slots, inputs, off, out, regs)
    })
}

/// [`block_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn block_avx512(
    prog: &Program,
    slots: &SlotPlan,
    inputs: &[&[f32]],
    off: usize,
    out: &mut [f32],
    regs: &mut [f32],
) {
    block_body::<true>(prog, slots, inputs, off, out, regs)
}

/// [`block_body`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(
    prog: &Program,
    slots: &SlotPlan,
    inputs: &[&[f32]],
    off: usize,
    out: &mut [f32],
    regs: &mut [f32],
) {
    block_body::<true>(prog, slots, inputs, off, out, regs)
}

/// An operand over one chunk.
#[derive(Clone, Copy)]
enum Src<'a> {
    Run(&'a [f32]),
    Splat(f32),
}

/// Runs the program chunk by chunk; `regs` holds the [`SlotPlan`]'s chunks of
/// intermediates. Written without closures around the loops so that the SIMD builds above
/// inline it. `ROUND_INSN`: the build has SSE4.1's rounding instruction (the AVX2 and
/// AVX-512 builds), so rounding half to even is one instruction rather than
/// [`round_even`]'s five.
#[inline(always)]
fn block_body<const ROUND_INSN: bool>(
    prog: &Program,
    slots: &SlotPlan,
    inputs: &[&[f32]],
    off: usize,
    out: &mut [f32],
    regs: &mut [f32],
) {
    let n = prog.instrs.len();
    let mut c0 = 0;
    while c0 < out.len() {
        let len = CHUNK.min(out.len() - c0);
        let at = off + c0;
        for (t, ins) in prog.instrs.iter().enumerate() {
            // The destination chunk split out of the scratch; operands read the rest.
            let (below, dst, above, d): (&[f32], &mut [f32], &[f32], usize) = if t + 1 == n {
                (&*regs, &mut out[c0..c0 + len], &[], usize::MAX)
            } else {
                let d = slots.slot[t];
                let (lo, hi) = regs.split_at_mut(d * CHUNK);
                let (dst, hi) = hi.split_at_mut(CHUNK);
                (&*lo, &mut dst[..len], &*hi, d)
            };
            let regs = Regs { below, above, d };
            let a = operand(prog, slots, inputs, &regs, ins.a, at, len);
            if ins.op == ChainOp::FakeQuant {
                apply_fake_quant::<ROUND_INSN>(a, prog.fake_quant_params(ins.b), dst);
                continue;
            }
            let b = if ins.op.is_binary() {
                operand(prog, slots, inputs, &regs, ins.b, at, len)
            } else {
                Src::Splat(0.0)
            };
            apply(ins.op, a, b, dst);
        }
        c0 += len;
    }
}

/// The scratch slots other than the destination `d`: slots below it and above it.
struct Regs<'a> {
    below: &'a [f32],
    above: &'a [f32],
    d: usize,
}

/// Operand `o` over elements `at..at + len` (see the module doc for operand numbers);
/// results of earlier instructions are read from their slots in `regs`.
#[inline(always)]
fn operand<'a>(
    prog: &'a Program,
    slots: &SlotPlan,
    inputs: &[&'a [f32]],
    regs: &Regs<'a>,
    o: usize,
    at: usize,
    len: usize,
) -> Src<'a> {
    let base = prog.inputs + prog.constants.len();
    if o < prog.inputs {
        let s = inputs[o];
        if s.len() == 1 {
            Src::Splat(s[0])
        } else {
            Src::Run(&s[at..at + len])
        }
    } else if o < base {
        Src::Splat(prog.constants[o - prog.inputs])
    } else {
        let r = slots.slot[o - base];
        let start = if r < regs.d {
            r * CHUNK
        } else {
            // Slot r sits after the destination's chunk in `above`.
            (r - regs.d - 1) * CHUNK
        };
        let src = if r < regs.d { regs.below } else { regs.above };
        Src::Run(&src[start..start + len])
    }
}

/// [`fake_quant`] written for the vector units, with the same result for every input:
///
/// - the clamp is two compare-selects (`d > lo ? d : lo`, the x86 `max`/`min` semantics)
///   after NaN was replaced, instead of `f32::max`/`min`, whose NaN rules cost a compare
///   and a blend more each (no operand can be NaN there: `d` was replaced and the bounds
///   are numbers; a ±0 tie may pick the other zero, which the `+ 0` at the end erases);
/// - with `ROUND_INSN`, rounding is `round_ties_even` (`vroundps`/`vrndscaleps`), which
///   gives [`round_even`]'s result for every input.
///
/// About 9 vector operations per 16 values instead of ~17; the division stays (ONNX
/// specifies `x / scale`, and `x · (1/scale)` rounds differently next to a half-integer,
/// which the structured values of Q/DQ models hit in ~10 % of 256-value chunks).
#[inline(always)]
fn fake_quant_lanes<const ROUND_INSN: bool>(x: f32, p: [f32; FAKE_QUANT_PARAMS]) -> f32 {
    let d = x / p[0];
    let d = if d.is_nan() { p[1] } else { d };
    let c = if d > p[2] { d } else { p[2] };
    let c = if c < p[3] { c } else { p[3] };
    let t = if ROUND_INSN {
        c.round_ties_even()
    } else {
        round_even(c)
    };
    t * p[0] + 0.0
}

/// [`fake_quant`] over one chunk (one loop, so the whole pair stays in registers).
#[inline(always)]
fn apply_fake_quant<const ROUND_INSN: bool>(a: Src, p: [f32; FAKE_QUANT_PARAMS], dst: &mut [f32]) {
    match a {
        Src::Run(x) => {
            for (d, &x) in dst.iter_mut().zip(x) {
                *d = fake_quant_lanes::<ROUND_INSN>(x, p);
            }
        }
        Src::Splat(x) => dst.fill(fake_quant(x, p)),
    }
}

#[inline(always)]
fn apply(op: ChainOp, a: Src, b: Src, dst: &mut [f32]) {
    macro_rules! each {
        ($f:expr) => {{
            let f = $f;
            match (a, b) {
                (Src::Run(x), Src::Run(y)) => {
                    for ((d, &x), &y) in dst.iter_mut().zip(x).zip(y) {
                        *d = f(x, y);
                    }
                }
                (Src::Run(x), Src::Splat(y)) => {
                    for (d, &x) in dst.iter_mut().zip(x) {
                        *d = f(x, y);
                    }
                }
                (Src::Splat(x), Src::Run(y)) => {
                    for (d, &y) in dst.iter_mut().zip(y) {
                        *d = f(x, y);
                    }
                }
                (Src::Splat(x), Src::Splat(y)) => dst.fill(f(x, y)),
            }
        }};
    }
    // One monomorphic loop per op so each vectorises.
    match op {
        ChainOp::Add => each!(|x: f32, y: f32| x + y),
        ChainOp::Sub => each!(|x: f32, y: f32| x - y),
        ChainOp::Mul => each!(|x: f32, y: f32| x * y),
        ChainOp::Div => each!(|x: f32, y: f32| x / y),
        ChainOp::Max => each!(|x: f32, y: f32| x.max(y)),
        ChainOp::Min => each!(|x: f32, y: f32| x.min(y)),
        ChainOp::RoundEven => each!(|x: f32, _y: f32| round_even(x)),
        ChainOp::NanTo => each!(|x: f32, y: f32| if x.is_nan() { y } else { x }),
        other => each!(|x: f32, y: f32| other.apply(x, y)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::test_util::Lcg;
    use kiln_core::Tensor;

    /// x·clip(x+3, 0, 6)/6 + y·sigmoid(z), with z a broadcast one-element input.
    fn sample() -> Program {
        // inputs 0 (x), 1 (y), 2 (z, one element); constants 3 (3.0), 4 (0.0), 5 (6.0)
        let i = |op, a, b| Instr { op, a, b };
        Program {
            inputs: 3,
            constants: vec![3.0, 0.0, 6.0],
            instrs: vec![
                i(ChainOp::Add, 0, 3),     // 6
                i(ChainOp::Max, 6, 4),     // 7
                i(ChainOp::Min, 7, 5),     // 8
                i(ChainOp::Mul, 0, 8),     // 9
                i(ChainOp::Div, 9, 5),     // 10
                i(ChainOp::Sigmoid, 2, 0), // 11
                i(ChainOp::Mul, 1, 11),    // 12
                i(ChainOp::Add, 10, 12),   // 13
                i(ChainOp::HardSwish, 13, 0),
                i(ChainOp::Sub, 4, 14),
                i(ChainOp::Abs, 15, 0),
                i(ChainOp::Neg, 16, 0),
                i(ChainOp::Tanh, 17, 0),
                i(ChainOp::Relu, 18, 0),
                i(ChainOp::Mul, 0, 5),        // 20: x·6, some exact halves
                i(ChainOp::RoundEven, 20, 0), // 21
                i(ChainOp::Div, 21, 4),       // 22: ±inf or NaN (0/0)
                i(ChainOp::NanTo, 22, 3),     // 23
                i(ChainOp::Min, 23, 5),       // 24
                i(ChainOp::Max, 24, 4),       // 25
                i(ChainOp::Add, 19, 25),
            ],
        }
    }

    #[test]
    fn round_even_is_round_ties_even() {
        let mut r = Lcg(5);
        let mut xs: Vec<f32> = (0..4000)
            .map(|i| r.next() * (1u64 << (i % 30)) as f32)
            .collect();
        xs.extend((-40..40).map(|k| k as f32 + 0.5));
        xs.extend([
            0.0,
            -0.0,
            -0.3,
            0.49999997,
            8_388_607.5,
            -8_388_607.5,
            4_194_304.5,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ]);
        for x in xs {
            assert_eq!(
                round_even(x).to_bits(),
                x.round_ties_even().to_bits(),
                "{x}"
            );
        }
        assert!(round_even(f32::NAN).is_nan());
    }

    #[test]
    fn kernel_matches_the_per_element_program_on_odd_lengths() {
        let prog = sample();
        prog.validate().unwrap();
        for len in [
            1,
            7,
            CHUNK - 1,
            CHUNK,
            CHUNK + 3,
            5 * CHUNK + 11,
            PARALLEL_MIN + 77,
        ] {
            let mut r = Lcg(len as u64);
            let x: Vec<f32> = r.vec(len).iter().map(|v| v * 8.0).collect();
            let y = r.vec(len);
            let z = [r.next() * 4.0];
            let mut out = vec![f32::NAN; len];
            run(&prog, &[&x, &y, &z], &mut out);
            for e in 0..len {
                let want = prog.eval_one(&[x[e], y[e], z[0]]);
                assert!(
                    (out[e] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "len {len} element {e}: {} vs {want}",
                    out[e]
                );
            }
        }
    }

    /// The portable and AVX2 builds of the chunk loop (the dispatcher picks AVX-512 here).
    #[test]
    fn every_build_of_the_chunk_loop_agrees() {
        let prog = sample();
        let len = 3 * CHUNK + 5;
        let mut r = Lcg(77);
        let x: Vec<f32> = r.vec(len).iter().map(|v| v * 8.0).collect();
        let y = r.vec(len);
        let z = [0.75f32];
        let want: Vec<f32> = (0..len)
            .map(|e| prog.eval_one(&[x[e], y[e], z[0]]))
            .collect();
        let runs = every_build(&prog, &[&x, &y, &z]);
        assert!(!runs.is_empty());
        for (name, got) in runs {
            for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{name} element {e}: {g} vs {w}"
                );
            }
        }
    }

    /// `prog` over `inputs` through each build of the chunk loop this CPU has (portable,
    /// AVX2, AVX-512), with its name.
    fn every_build(prog: &Program, inputs: &[&[f32]]) -> Vec<(&'static str, Vec<f32>)> {
        let len = inputs.iter().map(|i| i.len()).max().unwrap_or(1);
        let slots = SlotPlan::new(prog);
        let mut regs = vec![f32::NAN; slots.count * CHUNK];
        let mut runs = Vec::new();
        let mut out = vec![f32::NAN; len];
        block_body::<false>(prog, &slots, inputs, 0, &mut out, &mut regs);
        runs.push(("portable", out.clone()));
        #[cfg(target_arch = "x86_64")]
        if crate::ops::linalg::sgemm::Isa::Avx2.supported() {
            out.fill(f32::NAN);
            // SAFETY: AVX2 and FMA are present (checked above).
            unsafe { block_avx2(prog, &slots, inputs, 0, &mut out, &mut regs) };
            runs.push(("avx2", out.clone()));
        }
        #[cfg(target_arch = "x86_64")]
        if crate::ops::linalg::sgemm::Isa::Avx512.supported() {
            out.fill(f32::NAN);
            // SAFETY: AVX-512F, AVX2 and FMA are present (checked above).
            unsafe { block_avx512(prog, &slots, inputs, 0, &mut out, &mut regs) };
            runs.push(("avx512", out));
        }
        runs
    }

    /// FakeQuant against the seven separate steps it replaces (divide, NaN → code 0,
    /// clamp, round half to even, multiply, + 0), bit for bit, through `eval_one` and every
    /// kernel path (full runs and a one-element broadcast input), for u8 and i8 ranges and
    /// several zero points, on random values, exact ties and special values; and a
    /// FakeQuant whose parameter block runs past the constants is rejected.
    #[test]
    fn fake_quant_is_the_seven_step_pair_bit_for_bit() {
        let i = |op, a, b| Instr { op, a, b };
        let mut r = Lcg(9);
        let mut xs: Vec<f32> = (0..3000).map(|k| r.next() * (k % 300) as f32).collect();
        xs.extend([
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            f32::MIN_POSITIVE,
        ]);
        for (scale, zp, lo, hi) in [
            (0.05f32, 128i32, 0i32, 255i32),
            (0.0173, 0, 0, 255),
            (0.5, 3, 0, 255),
            (0.031, 0, -128, 127),
            (0.25, -9, -128, 127),
        ] {
            // Exact ties of x / scale.
            let mut xs = xs.clone();
            xs.extend((-300..300).map(|k| (k as f32 + 0.5) * scale));
            let params = vec![scale, -zp as f32, (lo - zp) as f32, (hi - zp) as f32, 0.0];
            let steps = Program {
                inputs: 1,
                constants: params.clone(),
                instrs: vec![
                    i(ChainOp::Div, 0, 1),
                    i(ChainOp::NanTo, 6, 2),
                    i(ChainOp::Max, 7, 3),
                    i(ChainOp::Min, 8, 4),
                    i(ChainOp::RoundEven, 9, 0),
                    i(ChainOp::Mul, 10, 1),
                    i(ChainOp::Add, 11, 5),
                ],
            };
            let fused = Program {
                inputs: 1,
                constants: params,
                instrs: vec![i(ChainOp::FakeQuant, 0, 1)],
            };
            fused.validate().unwrap();
            let mut out = vec![f32::NAN; xs.len()];
            run(&fused, &[&xs], &mut out);
            for (&x, &got) in xs.iter().zip(&out) {
                let want = steps.eval_one(&[x]);
                assert_eq!(
                    fused.eval_one(&[x]).to_bits(),
                    want.to_bits(),
                    "{x} / {scale}"
                );
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "kernel: {x} / {scale} zp {zp}"
                );
                let mut one = [f32::NAN; 3];
                run(&fused, &[&[x]], &mut one);
                assert_eq!(one[1].to_bits(), want.to_bits(), "splat: {x}");
            }
            for (build, got) in every_build(&fused, &[&xs]) {
                for (&x, g) in xs.iter().zip(got) {
                    let want = steps.eval_one(&[x]);
                    assert_eq!(g.to_bits(), want.to_bits(), "{build}: {x} / {scale}");
                }
            }
        }
        let bad = Program {
            inputs: 1,
            constants: vec![0.5, 0.0, 0.0],
            instrs: vec![i(ChainOp::FakeQuant, 0, 1)],
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("FakeQuant"));
    }

    /// Random long programs (operands from anywhere earlier, results read late, never or
    /// twice by one instruction) against the per-element reference: the reused slots
    /// must never hand out a value that a later reader still needs.
    #[test]
    fn reused_slots_keep_every_live_value() {
        let unary = [ChainOp::Relu, ChainOp::Neg, ChainOp::Abs, ChainOp::Tanh];
        let binary = [
            ChainOp::Add,
            ChainOp::Sub,
            ChainOp::Mul,
            ChainOp::Max,
            ChainOp::Min,
        ];
        for seed in 0..20u64 {
            let mut r = Lcg(seed + 1000);
            let mut pick = |n: usize| ((r.next() + 1.0) * 0.5 * n as f32) as usize % n;
            let (inputs, constants) = (2, vec![0.5f32, -1.25]);
            let base = inputs + constants.len();
            let n = 20 + seed as usize * 4;
            let instrs: Vec<Instr> = (0..n)
                .map(|t| {
                    // Mostly recent results (long live ranges now and then).
                    let near = |p: usize| base + t - 1 - p.min(t - 1);
                    let a = if t == 0 { pick(base) } else { near(pick(3)) };
                    let b = match pick(4) {
                        0 => pick(base + t),
                        1 => a,
                        _ => pick(base + t),
                    };
                    if pick(3) == 0 {
                        Instr {
                            op: unary[pick(unary.len())],
                            a,
                            b: 0,
                        }
                    } else {
                        Instr {
                            op: binary[pick(binary.len())],
                            a,
                            b,
                        }
                    }
                })
                .collect();
            let prog = Program {
                inputs,
                constants,
                instrs,
            };
            prog.validate().unwrap();
            let slots = SlotPlan::new(&prog);
            assert!(
                slots.count < n,
                "seed {seed}: no slot reused ({} for {n})",
                slots.count
            );
            let len = 2 * CHUNK + 9;
            let mut r = Lcg(seed);
            let (x, y) = (r.vec(len), r.vec(len));
            let mut out = vec![f32::NAN; len];
            run(&prog, &[&x, &y], &mut out);
            for e in 0..len {
                let want = prog.eval_one(&[x[e], y[e]]);
                assert!(
                    (out[e] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "seed {seed} element {e}: {} vs {want}",
                    out[e]
                );
            }
        }
    }

    #[test]
    fn op_round_trips_through_its_description_and_rejects_bad_programs() {
        let prog = sample();
        let desc = prog.to_desc();
        let mut reg = OpRegistry::new();
        register(&mut reg);
        fn ctx(desc: &OpDesc, n: usize) -> BuildCtx<'_> {
            BuildCtx {
                node: "chain",
                desc,
                n_inputs: n,
                n_outputs: 1,
            }
        }
        let op = reg.build(&ctx(&desc, 3)).unwrap();
        let x = Tensor::from_vec(&[2, 3], vec![-4.0f32, -1.0, 0.0, 1.0, 2.5, 9.0]).unwrap();
        let y = Tensor::from_vec(&[2, 3], vec![0.5f32; 6]).unwrap();
        let z = Tensor::from_vec(&[1], vec![0.25f32]).unwrap();
        let (xv, yv, zv) = (Value::from(x.clone()), Value::from(y), Value::from(z));
        let got = op.eval(&[Some(&xv), Some(&yv), Some(&zv)]).unwrap();
        let got = got[0].as_tensor().unwrap();
        assert_eq!(got.shape(), &[2, 3]);
        for (g, xe) in got
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(x.as_slice::<f32>().unwrap())
        {
            assert_eq!(*g, prog.eval_one(&[*xe, 0.5, 0.25]));
        }
        // wrong sizes and dtypes are errors, not panics
        let bad = Value::from(Tensor::from_vec(&[4], vec![1.0f32; 4]).unwrap());
        assert!(op.eval(&[Some(&xv), Some(&bad), Some(&zv)]).is_err());
        let int = Value::from(Tensor::from_vec(&[2, 3], vec![1i32; 6]).unwrap());
        assert!(op.eval(&[Some(&xv), Some(&int), Some(&zv)]).is_err());
        // an operand from the future, a bad opcode
        let mut fwd = desc.clone();
        fwd.attrs
            .insert(PROGRAM_ATTR.into(), Attr::Ints(vec![0, 0, 7]));
        assert!(reg.build(&ctx(&fwd, 3)).is_err());
        let mut code = desc.clone();
        code.attrs
            .insert(PROGRAM_ATTR.into(), Attr::Ints(vec![99, 0, 0]));
        assert!(reg.build(&ctx(&code, 3)).is_err());
    }
}
