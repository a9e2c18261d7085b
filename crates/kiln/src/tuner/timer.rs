//! Timing tactics on the device. The tuner talks to a [`LayerTimer`]; the CPU backend's is
//! [`CpuTimer`] (a monotonic clock around the op's in-place kernel); tests inject a
//! deterministic one so they know which choice is right.

use std::time::Instant;

use kiln_core::{
    AlignedBuf, BuildCtx, DType, Fact, Format, KilnError, Layout, Node, Precision, Result, Tactic,
    Tensor, TensorMut, Value,
};

use crate::engine::registry;

/// Measures one layer with one tactic, and reformats between formats.
pub trait LayerTimer {
    /// Median time (ms) of `node` run with `tactic`, on inputs of the given facts;
    /// `constants[i]` is the real value of input `i` when it is a weight. An error drops the
    /// candidate (the reason is logged).
    fn time_tactic(
        &mut self,
        node: &Node,
        inputs: &[Option<&Fact>],
        constants: &[Option<&Tensor>],
        tactic: &Tactic,
    ) -> Result<f64>;

    /// Median time (ms) of converting a tensor with `fact` from `from` to `to`.
    fn time_reformat(&mut self, fact: &Fact, from: Format, to: Format) -> Result<f64>;

    /// The whole-engine check's race: `[tuned, float]` run end to end on their device,
    /// interleaved ([`super::whole_engine::race`]). `None` skips the check (the default:
    /// test timers with made-up layer times have no engine times to match them).
    fn race_engines(
        &mut self,
        _engines: [&crate::Engine; 2],
    ) -> Option<Result<super::whole_engine::EngineRace>> {
        None
    }
}

/// Times on this machine's CPU: warm-up runs, then `reps` timed runs, median.
#[derive(Debug, Clone)]
pub struct CpuTimer {
    /// Untimed runs first (caches, page faults, thread pool start).
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub reps: usize,
    /// Intra-op threads to time at ([`CpuTimer::with_threads`]); `None`: the global pool.
    threads: Option<usize>,
    /// The pool of `threads` threads (two or more) the layers are timed in.
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

impl CpuTimer {
    /// The timer for a builder optimisation level (higher levels repeat more).
    pub fn for_level(level: u8) -> CpuTimer {
        CpuTimer {
            warmup: if level >= 4 { 3 } else { 1 },
            reps: match level {
                0..=2 => 3,
                3 => 5,
                _ => 9,
            },
            threads: None,
            pool: None,
        }
    }

    /// The timer a build with `config` uses: its opt level's repetitions, at its thread
    /// count ([`CpuTimer::with_threads`]).
    pub fn for_config(config: &crate::BuilderConfig) -> Result<CpuTimer> {
        CpuTimer::for_level(config.opt_level).with_threads(config.threads)
    }

    /// Times layers, and races engines, at `threads` intra-op threads, as an execution
    /// context with [`crate::ExecutionContext::set_threads`] runs them: one thread runs
    /// every kernel on the calling thread, more run in a private pool of that size. `None`
    /// (or 0) keeps the global pool. Errors when the pool cannot be made.
    pub fn with_threads(mut self, threads: Option<usize>) -> Result<CpuTimer> {
        self.threads = threads.filter(|&n| n > 0);
        self.pool = match self.threads {
            Some(n) if n > 1 => Some(std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| {
                        KilnError::Other(format!("cannot create a pool of {n} threads: {e}"))
                    })?,
            )),
            _ => None,
        };
        Ok(self)
    }

    /// The thread count set by [`CpuTimer::with_threads`].
    pub fn threads(&self) -> Option<usize> {
        self.threads
    }

    /// [`CpuTimer::measure`] at the timer's thread count.
    fn median_ms(&self, run: impl FnMut() -> Result<()> + Send) -> Result<f64> {
        match (&self.pool, self.threads) {
            (Some(pool), _) => pool.install(|| self.measure(run)),
            (None, Some(1)) => kiln_cpu::parallel::serial(|| self.measure(run)),
            _ => self.measure(run),
        }
    }

    /// Warm-up runs, then the median of the timed runs, in ms.
    fn measure(&self, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..self.warmup {
            run()?;
        }
        let mut times = Vec::with_capacity(self.reps.max(1));
        for _ in 0..self.reps.max(1) {
            let t = Instant::now();
            run()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// A seeded tensor of `fact`'s dtype and shape, never all zeros: floats uniform in
/// [-1, 1), integers in 1..=3 (small, so index-like inputs stay in range), bools alternate.
pub fn random_input(fact: &Fact, seed: u64) -> Result<Tensor> {
    let (Some(dtype), Some(shape)) = (fact.dtype, fact.concrete_shape()) else {
        return Err(KilnError::Other(format!(
            "cannot time a layer whose input is not fully known ({})",
            fact.describe()
        )));
    };
    let n: usize = shape.iter().product();
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    if dtype.is_float() {
        let v: Vec<f32> = (0..n)
            .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect();
        return Tensor::from_vec(&shape, v)?.cast(dtype);
    }
    if dtype == DType::Bool {
        let v: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        return Tensor::from_bools(&shape, &v);
    }
    let v: Vec<i64> = (0..n).map(|_| 1 + (next() % 3) as i64).collect();
    Tensor::from_vec(&shape, v)?.cast(dtype)
}

/// A Conv with a Winograd or channels-last 1×1 tactic is timed the way the engine runs it:
/// with its constant weights transformed once, as the builder stores them (unpacked, the
/// filters would be transformed or read transposed on every run). Any other op is returned
/// as it is.
fn winograd_packed(
    op: std::sync::Arc<dyn kiln_core::Op>,
    facts: &mut [Option<Fact>],
    values: &mut [Option<Value>],
) -> Result<std::sync::Arc<dyn kiln_core::Op>> {
    use kiln_cpu::ops::conv::{kernel::ConvAlgo, Conv};
    let Some(conv) = op.as_any().downcast_ref::<Conv>() else {
        return Ok(op);
    };
    if !matches!(conv.algo, ConvAlgo::Winograd(_) | ConvAlgo::NhwcPointwise) {
        return Ok(op);
    }
    let xs = facts
        .first()
        .and_then(|f| f.as_ref()?.concrete_shape())
        .map(|s| {
            if conv.algo.is_nhwc() {
                kiln_cpu::ops::conv::nhwc::to_nchw(&s)
            } else {
                s
            }
        });
    let (Some(xs), Some(Some(Value::Tensor(w)))) = (xs, values.get(1)) else {
        return Ok(op);
    };
    if w.dtype() != DType::F32 {
        return Ok(op);
    }
    let Some(isa) = conv.weight_packing(&xs, w.shape()) else {
        return Ok(op);
    };
    let (data, shape) = conv.packed_weights(w.as_slice::<f32>()?, w.shape(), isa)?;
    let packed: std::sync::Arc<dyn kiln_core::Op> = std::sync::Arc::new(conv.with_packed(isa));
    values[1] = Some(Value::Tensor(Tensor::from_vec(&shape, data)?));
    facts[1] = Some(Fact::concrete(DType::F32, &shape));
    Ok(packed)
}

fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::Fp32 => DType::F32,
        Precision::Fp16 => DType::F16,
        Precision::Int8 => DType::I8,
    }
}

impl CpuTimer {
    /// Times the layout reformat layer [`super::reformat::insert`] places: an ONNX
    /// `Transpose` of the FP32 tensor `fact` (given in the linear layout).
    fn time_transpose(&self, fact: &Fact, from: Layout, to: Layout) -> Result<f64> {
        let Some(shape) = fact.concrete_shape() else {
            return Err(KilnError::Other(
                "cannot time a layout change of a tensor whose shape is not known".into(),
            ));
        };
        let (node, in_shape) =
            super::reformat::layout_node("timing".into(), 0, 1, from, to, &shape)?;
        let src = random_input(&Fact::concrete(DType::F32, &in_shape), 0x6c61_796f)?;
        let args = [Some(Value::Tensor(src))];
        let args: Vec<Option<&Value>> = args.iter().map(|v| v.as_ref()).collect();
        let mut buf = AlignedBuf::zeroed(shape.iter().product::<usize>() * 4);
        let out_shape = super::reformat::layout_shape(to, &shape);
        self.median_ms(|| {
            let mut slots = [TensorMut::new(DType::F32, &out_shape, buf.as_mut_slice())?];
            node.op.eval_into(&args, &mut slots)
        })
    }
}

impl LayerTimer for CpuTimer {
    fn time_tactic(
        &mut self,
        node: &Node,
        inputs: &[Option<&Fact>],
        constants: &[Option<&Tensor>],
        tactic: &Tactic,
    ) -> Result<f64> {
        let mut desc = node.desc.clone();
        desc.attrs.insert(
            kiln_core::tactic::TACTIC_ATTR.into(),
            kiln_core::Attr::String(tactic.id.clone()),
        );
        // INT8 tactics run the lowered layer: quantized weights, i8 activations.
        let int8 = tactic.format.precision == Precision::Int8;
        let mut replaced: Vec<Option<Tensor>> = Vec::new();
        if int8 {
            (desc, replaced) = crate::int8::lower::lowered(node, constants, &tactic.id)?;
        }
        let n_inputs = if int8 {
            replaced.len()
        } else {
            node.inputs.len()
        };
        let op = registry().build(&BuildCtx {
            node: &node.name,
            desc: &desc,
            n_inputs,
            n_outputs: node.outputs.len(),
        })?;
        let mut facts: Vec<Option<Fact>> = Vec::with_capacity(n_inputs);
        let mut values: Vec<Option<Value>> = Vec::with_capacity(n_inputs);
        for i in 0..n_inputs {
            let fact = inputs.get(i).copied().flatten();
            let konst = constants.get(i).copied().flatten();
            let (f, v) = match (replaced.get(i).cloned().flatten(), konst, fact) {
                (Some(t), _, _) => (Some(Fact::concrete(t.dtype(), t.shape())), Some(t)),
                (None, Some(c), _)
                    if tactic.format.layout == Layout::ChannelsLast
                        && c.rank() == 4
                        && node.desc.op_type != "Conv" =>
                {
                    // An elementwise layer's constant operand, permuted as the engine
                    // stores it.
                    let t = super::reformat::permute_constant(c)?;
                    (Some(Fact::concrete(t.dtype(), t.shape())), Some(t))
                }
                (None, Some(c), f) => (f.cloned(), Some(c.clone())),
                (None, None, Some(f)) => {
                    let f = if int8 {
                        Fact {
                            dtype: Some(DType::I8),
                            ..f.clone()
                        }
                    } else if tactic.format.layout != Layout::Linear {
                        // The layer reads its activations in the tactic's layout.
                        let shape = f.concrete_shape().ok_or_else(|| {
                            KilnError::Other("an input's shape is not known".into())
                        })?;
                        let shape = super::reformat::layout_shape(tactic.format.layout, &shape);
                        Fact::concrete(f.dtype.unwrap_or(DType::F32), &shape)
                    } else {
                        f.clone()
                    };
                    let t = random_input(&f, 0x7475_6e65 + i as u64)?;
                    (Some(f), Some(t))
                }
                (None, None, None) => (None, None),
            };
            facts.push(f);
            values.push(v.map(Value::Tensor));
        }
        let op = if int8 {
            op
        } else {
            winograd_packed(op, &mut facts, &mut values)?
        };
        let fact_refs: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
        let args: Vec<Option<&Value>> = values.iter().map(|v| v.as_ref()).collect();
        let out_facts = op.infer(&fact_refs, node.outputs.len())?;
        let mut shapes = Vec::with_capacity(out_facts.len());
        let mut bufs = Vec::with_capacity(out_facts.len());
        for f in &out_facts {
            let (Some(d), Some(s)) = (f.dtype, f.concrete_shape()) else {
                return Err(KilnError::Other(
                    "an output's shape is not known at build time".into(),
                ));
            };
            bufs.push(AlignedBuf::zeroed(s.iter().product::<usize>() * d.size()));
            shapes.push((d, s));
        }
        self.median_ms(|| {
            let mut slots: Vec<TensorMut<'_>> = bufs
                .iter_mut()
                .zip(&shapes)
                .map(|(b, (d, s))| TensorMut::new(*d, s, b.as_mut_slice()))
                .collect::<Result<_>>()?;
            op.eval_into(&args, &mut slots)
        })
    }

    fn time_reformat(&mut self, fact: &Fact, from: Format, to: Format) -> Result<f64> {
        if from.layout != to.layout {
            // A layout change runs in FP32 (the channels-last tactics are FP32): the
            // precision change, when there is one too, is a second layer.
            let fp32 = |f: Format| Format {
                precision: Precision::Fp32,
                layout: f.layout,
            };
            let mut ms = self.time_transpose(fact, from.layout, to.layout)?;
            if from.precision != Precision::Fp32 {
                ms += self.time_reformat(fact, from, fp32(from))?;
            }
            if to.precision != Precision::Fp32 {
                ms += self.time_reformat(fact, fp32(to), to)?;
            }
            return Ok(ms);
        }
        let src = random_input(
            &Fact {
                dtype: Some(dtype_of(from.precision)),
                ..fact.clone()
            },
            0x7265_666d,
        )?;
        let to = dtype_of(to.precision);
        if to == DType::I8 && src.dtype() == DType::F32 {
            let mut dst = vec![0i8; src.len()];
            let x = src.as_slice::<f32>()?;
            return self.median_ms(|| {
                kiln_cpu::ops::int8::qdq::quantize(x, 0.01, &mut dst);
                Ok(())
            });
        }
        if src.dtype() == DType::I8 && to == DType::F32 {
            let mut dst = vec![0f32; src.len()];
            let q = src.as_slice::<i8>()?;
            return self.median_ms(|| {
                kiln_cpu::ops::int8::qdq::dequantize(q, 0.01, &mut dst);
                Ok(())
            });
        }
        self.median_ms(|| src.cast(to).map(drop))
    }

    /// Races the engines for about 1 s (opt levels ≤ 2), 2 s (3) or 4 s (4–5): GPU engines
    /// by CUDA events, CPU engines by this clock.
    fn race_engines(
        &mut self,
        engines: [&crate::Engine; 2],
    ) -> Option<Result<super::whole_engine::EngineRace>> {
        let int8_layers = engines[0].tuning_report().map_or(0, |t| t.int8_layers());
        let budget = std::time::Duration::from_millis(match self.reps {
            0..=3 => 1000,
            4..=5 => 2000,
            _ => 4000,
        });
        Some(super::whole_engine::race(
            engines,
            int8_layers,
            budget,
            self.threads,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The kernels a timer runs see the timer's thread count: one thread runs them
    /// serially, more in a pool of that size, none in the global pool.
    #[test]
    fn layers_are_timed_at_the_timers_thread_count() {
        let seen = |threads: Option<usize>| {
            let timer = CpuTimer::for_level(1).with_threads(threads).unwrap();
            assert_eq!(timer.threads(), threads);
            let max = AtomicUsize::new(0);
            let min = AtomicUsize::new(usize::MAX);
            timer
                .median_ms(|| {
                    let n = kiln_cpu::parallel::threads();
                    max.fetch_max(n, Ordering::Relaxed);
                    min.fetch_min(n, Ordering::Relaxed);
                    Ok(())
                })
                .unwrap();
            let (lo, hi) = (min.into_inner(), max.into_inner());
            assert_eq!(lo, hi, "{threads:?}");
            hi
        };
        assert_eq!(seen(Some(1)), 1);
        assert_eq!(seen(Some(3)), 3);
        assert_eq!(seen(None), rayon::current_num_threads());
        assert!(CpuTimer::for_level(1)
            .with_threads(Some(0))
            .unwrap()
            .threads()
            .is_none());
    }
}
