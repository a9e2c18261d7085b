//! INT8 in GPU engines: calibrated Conv/MatMul/Gemm layers that have an INT8 form offer
//! the tactic `cuda.int8.<family>` (`kiln.Int8Conv` / `kiln.Int8MatMul`, run by the CUDA
//! backend's `nvrtc.int8.*` kernels) next to their float GPU tactics.
//!
//! - **Timed pool** (opt level ≥ 1): the GPU tuner ([`crate::tuner::gpu`]) times the INT8
//!   layer ([`probe`]: quantized weights, i8 activations) against the float tactics, and
//!   the quantize/dequantize reformats ([`reformat_probe`]) on the edges where an INT8 layer
//!   meets a float neighbour, and the graph-level choice ([`crate::tuner::select`]) keeps a
//!   layer in INT8 only where its time plus the reformats it forces beats the float one —
//!   the CPU tuner's machinery, with the GPU as the timer.
//! - **Level 0** (no timing): [`lower_all`] lowers every such layer, whatever it costs.
//!
//! Either way the reformat pass then puts `kiln.Int8Quantize` / `kiln.Int8Dequantize`
//! between the INT8 layers and their FP32/FP16 neighbours. Layers without an INT8 form
//! (depthwise, fewer than 4 channels per group, …) stay in the engine's float precision.

use std::collections::HashMap;

use kiln_core::{
    DType, Fact, Format, Graph, KilnError, Layout, Node, Precision, Result, Tactic, Tensor,
};
use kiln_cpu::ops::int8 as k8;

use super::lower::{lower_node, lowered, X_SCALE_ATTR};

/// The INT8 format of GPU INT8 tactics.
pub const INT8_LINEAR: Format = Format {
    precision: Precision::Int8,
    layout: Layout::Linear,
};

/// The GPU INT8 tactic id of a layer family (`conv` or `matmul`).
pub fn tactic_id(family: &str) -> String {
    format!("cuda.int8.{family}")
}

/// The GPU INT8 tactic of a family on cuBLASLt's IMMA path ([`kiln_cuda::lt::Int8LtLayer`]:
/// MatMul/Gemm, and 1×1 convolutions).
pub fn imma_tactic_id(family: &str) -> String {
    format!("cuda.int8.{family}.cublaslt")
}

/// True for the id of a GPU INT8 tactic.
pub fn is_tactic(id: &str) -> bool {
    id.starts_with("cuda.int8.")
}

/// The [`kiln_cuda::library::GPU_TACTIC_ATTR`] value a GPU INT8 tactic records on its
/// lowered layer (`cublaslt` for the IMMA ones, [`imma_tactic_id`]; none for the NVRTC
/// kernels).
pub fn gpu_attr(id: &str) -> Option<&'static str> {
    (is_tactic(id) && id.ends_with(".cublaslt")).then_some("cublaslt")
}

/// Records what [`gpu_attr`] says for tactic `id` on a lowered INT8 node.
pub fn mark(node: &mut Node, id: &str) {
    if let Some(v) = gpu_attr(id) {
        node.desc.attrs.insert(
            kiln_cuda::library::GPU_TACTIC_ATTR.into(),
            kiln_core::Attr::String(v.into()),
        );
    }
}

/// The INT8 family (`conv` or `matmul`) of a calibrated layer that has an INT8 form; `None`
/// for every other layer.
pub fn family(node: &Node, inputs: &[Option<&Fact>]) -> Option<&'static str> {
    if !node.desc.attrs.contains_key(X_SCALE_ATTR) || k8::tactics_for(&node.desc, inputs).is_empty()
    {
        return None;
    }
    Some(if node.desc.op_type == "Conv" {
        "conv"
    } else {
        "matmul"
    })
}

/// What a GPU layer offers the tuner: its float tactics (`float`, ids of
/// [`kiln_cuda::tune`], all FP32/linear at graph level) and, for a calibrated layer with an
/// INT8 form when `int8` is allowed, `cuda.int8.<family>` in the INT8 format (and
/// `cuda.int8.<family>.cublaslt` too when `imma`: cuBLASLt loads; the timer drops it where
/// the product does not fit IMMA: convolutions other than 1×1, unaligned sizes). A layer with an INT8
/// candidate but no float alternative gets the backend's own float choice
/// ([`kiln_cuda::tune::DEFAULT_TACTIC`]) to be timed against. Empty when there is nothing
/// to choose between (fewer than two candidates).
pub fn offer(
    node: &Node,
    inputs: &[Option<&Fact>],
    float: Vec<Tactic>,
    int8: bool,
    imma: bool,
) -> Vec<Tactic> {
    let mut out = float;
    if let Some(f) = family(node, inputs).filter(|_| int8) {
        if out.is_empty() {
            out.push(Tactic {
                id: kiln_cuda::tune::DEFAULT_TACTIC.into(),
                format: Format::FP32_LINEAR,
                min_level: 1,
            });
        }
        out.push(Tactic {
            id: tactic_id(f),
            format: INT8_LINEAR,
            min_level: 1,
        });
        if imma {
            out.push(Tactic {
                id: imma_tactic_id(f),
                format: INT8_LINEAR,
                min_level: 1,
            });
        }
    }
    if out.len() < 2 {
        out.clear();
    }
    out
}

/// One layer as the GPU runs it, for timing: the node, the device facts of its inputs and
/// outputs, and the real values of its constant inputs.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The node (a `kiln` domain INT8 op).
    pub node: Node,
    /// Device facts of its inputs (weights as constants).
    pub inputs: Vec<Fact>,
    /// Device facts of its outputs.
    pub outputs: Vec<Fact>,
    /// Values of the constant inputs, by input index.
    pub consts: Vec<Option<Tensor>>,
}

impl Probe {
    /// The constants as the timer takes them.
    pub fn const_refs(&self) -> Vec<Option<&Tensor>> {
        self.consts.iter().map(|c| c.as_ref()).collect()
    }
}

fn as_i8(fact: &Fact) -> Fact {
    Fact {
        dtype: Some(DType::I8),
        konst: None,
        ..fact.clone()
    }
}

/// `node` lowered for INT8 tactic `tactic_id` as the engine would run it: weights quantized
/// per output channel, i8 input activation and output (`inputs`: the float layer's input
/// facts, `constants`: its constant inputs' values).
pub fn probe(
    node: &Node,
    inputs: &[Option<&Fact>],
    constants: &[Option<&Tensor>],
    tactic_id: &str,
) -> Result<Probe> {
    let (desc, replaced) = lowered(node, constants, tactic_id)?;
    let op = crate::engine::registry().build(&kiln_core::BuildCtx {
        node: &node.name,
        desc: &desc,
        n_inputs: replaced.len(),
        n_outputs: node.outputs.len(),
    })?;
    let mut fin = Vec::with_capacity(replaced.len());
    for (i, r) in replaced.iter().enumerate() {
        fin.push(match (r, inputs.get(i).copied().flatten()) {
            (Some(t), _) => Fact::constant(t.clone()),
            (None, Some(f)) => as_i8(f),
            (None, None) => Fact::unknown(),
        });
    }
    let refs: Vec<Option<&Fact>> = fin.iter().map(Some).collect();
    let outputs: Vec<Fact> = op
        .infer(&refs, node.outputs.len())?
        .iter()
        .map(as_i8)
        .collect();
    let mut n = node.clone();
    n.inputs.resize(replaced.len(), None);
    n.desc = desc;
    n.op = op;
    mark(&mut n, tactic_id);
    Ok(Probe {
        node: n,
        inputs: fin,
        outputs,
        consts: replaced,
    })
}

/// The reformat between an INT8 layer and a float neighbour, for timing: `kiln.Int8Quantize`
/// (`from` float, `to` INT8) or `kiln.Int8Dequantize` (the reverse) of a tensor of `fact`'s
/// shape, the float side in `float` (F32, or F16 in FP16 engines). Other pairs have no GPU
/// reformat (every GPU float tactic is FP32/linear at graph level).
pub fn reformat_probe(fact: &Fact, from: Format, to: Format, float: DType) -> Result<Probe> {
    let quantize = match (from.precision, to.precision) {
        (p, Precision::Int8) if p != Precision::Int8 => true,
        (Precision::Int8, p) if p != Precision::Int8 => false,
        _ => {
            return Err(KilnError::Other(format!(
                "no GPU reformat from {from} to {to}"
            )))
        }
    };
    if from.layout != Layout::Linear || to.layout != Layout::Linear {
        return Err(KilnError::Other(format!(
            "layout reformats ({from} -> {to}) are not implemented"
        )));
    }
    let shape = fact.concrete_shape().ok_or_else(|| {
        KilnError::Other(format!(
            "cannot time a reformat of a tensor whose shape is not known ({})",
            fact.describe()
        ))
    })?;
    // The scale does not change the time; any positive one lowers.
    let node = crate::tuner::reformat::qdq_node("reformat:probe".into(), 0, 1, quantize, 0.05)?;
    let (a, b) = (
        Fact::concrete(float, &shape),
        Fact::concrete(DType::I8, &shape),
    );
    let (fin, fout) = if quantize { (a, b) } else { (b, a) };
    Ok(Probe {
        node,
        inputs: vec![fin],
        outputs: vec![fout],
        consts: vec![None],
    })
}

/// Lowers every annotated layer with an INT8 form and inserts the reformats, untimed (GPU
/// builds at opt level 0); returns how many layers now run in INT8.
pub fn lower_all(graph: &mut Graph) -> Result<usize> {
    let mut formats: HashMap<usize, Format> = HashMap::new();
    for ni in 0..graph.nodes.len() {
        let node = &graph.nodes[ni];
        let facts: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| i.map(|v| &graph.values[v].fact))
            .collect();
        let Some(f) = family(node, &facts) else {
            continue;
        };
        lower_node(graph, ni, &tactic_id(f))?;
        formats.insert(ni, INT8_LINEAR);
    }
    crate::tuner::reformat::insert(graph, &formats)?;
    Ok(formats.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::lower::Y_SCALE_ATTR;
    use kiln_core::{Attr, BuildCtx, OpDesc};

    /// Seeded values in ±[0.05, 1.05), never zero.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = 0.05 + (s % 1000) as f32 / 1000.0;
                if i % 2 == 0 {
                    u
                } else {
                    -u
                }
            })
            .collect()
    }

    /// A Conv/Gemm node, calibrated or not, with its input facts (x, W[, B]).
    fn layer(
        op: &str,
        attrs: &[(&str, Attr)],
        x: &[usize],
        w: &[usize],
        bias: bool,
        calibrated: bool,
    ) -> (Node, Vec<Fact>) {
        let mut desc = OpDesc::new("", op, 13);
        for (k, v) in attrs {
            desc.attrs.insert(k.to_string(), v.clone());
        }
        if calibrated {
            desc.attrs.insert(X_SCALE_ATTR.into(), Attr::Float(0.02));
            desc.attrs.insert(Y_SCALE_ATTR.into(), Attr::Float(0.05));
        }
        let mut facts = vec![
            Fact::concrete(DType::F32, x),
            Fact::constant(Tensor::from_vec(w, values(w.iter().product(), 7)).unwrap()),
        ];
        let m = if op == "Conv" { w[0] } else { w[1] };
        if bias {
            facts.push(Fact::constant(
                Tensor::from_vec(&[m], values(m, 11)).unwrap(),
            ));
        }
        let op = crate::engine::registry()
            .build(&BuildCtx {
                node: "layer",
                desc: &desc,
                n_inputs: facts.len(),
                n_outputs: 1,
            })
            .unwrap();
        let node = Node {
            name: "layer".into(),
            desc,
            op,
            inputs: (0..facts.len()).map(Some).collect(),
            outputs: vec![Some(facts.len())],
            fused_from: vec!["layer".into()],
        };
        (node, facts)
    }

    fn float(ids: &[&str]) -> Vec<Tactic> {
        ids.iter()
            .map(|id| Tactic {
                id: id.to_string(),
                format: Format::FP32_LINEAR,
                min_level: 1,
            })
            .collect()
    }

    fn ids(t: &[Tactic]) -> Vec<(String, Precision)> {
        t.iter()
            .map(|t| (t.id.clone(), t.format.precision))
            .collect()
    }

    #[test]
    fn calibrated_layers_offer_int8_next_to_their_float_tactics() {
        let (conv, facts) = layer("Conv", &[], &[1, 8, 6, 6], &[16, 8, 1, 1], true, true);
        let f: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        assert_eq!(family(&conv, &f), Some("conv"));
        let both = offer(
            &conv,
            &f,
            float(&["cuda.conv.kiln", "cuda.conv.cudnn.1"]),
            true,
            false,
        );
        assert_eq!(
            ids(&both),
            vec![
                ("cuda.conv.kiln".into(), Precision::Fp32),
                ("cuda.conv.cudnn.1".into(), Precision::Fp32),
                ("cuda.int8.conv".into(), Precision::Int8),
            ]
        );
        assert!(is_tactic(&both[2].id) && !is_tactic(&both[0].id));
        // Without --int8: the float tactics only.
        assert_eq!(offer(&conv, &f, float(&["a", "b"]), false, true).len(), 2);
        // No float alternative: the backend's own choice is timed against INT8.
        assert_eq!(
            ids(&offer(&conv, &f, Vec::new(), true, true)),
            vec![
                (kiln_cuda::tune::DEFAULT_TACTIC.into(), Precision::Fp32),
                ("cuda.int8.conv".into(), Precision::Int8),
                ("cuda.int8.conv.cublaslt".into(), Precision::Int8),
            ]
        );
        // One candidate is no choice.
        assert!(offer(&conv, &f, float(&["a"]), false, false).is_empty());
        // Not calibrated, or no INT8 form (depthwise): no INT8 candidate.
        let (plain, pf) = layer("Conv", &[], &[1, 8, 6, 6], &[16, 8, 1, 1], true, false);
        let pf: Vec<Option<&Fact>> = pf.iter().map(Some).collect();
        assert_eq!(family(&plain, &pf), None);
        assert!(offer(&plain, &pf, float(&["a"]), true, true).is_empty());
        let (dw, df) = layer(
            "Conv",
            &[("group", Attr::Int(8))],
            &[1, 8, 6, 6],
            &[8, 1, 3, 3],
            false,
            true,
        );
        let df: Vec<Option<&Fact>> = df.iter().map(Some).collect();
        assert_eq!(family(&dw, &df), None);
        assert_eq!(
            ids(&offer(&dw, &df, float(&["a", "b"]), true, true)).len(),
            2
        );
        // MatMul/Gemm: the NVRTC kernel and, where cuBLASLt loads, its IMMA path.
        let (gemm, gf) = layer("Gemm", &[], &[3, 16], &[16, 8], false, true);
        let gf: Vec<Option<&Fact>> = gf.iter().map(Some).collect();
        assert_eq!(
            ids(&offer(&gemm, &gf, Vec::new(), true, true)),
            vec![
                (kiln_cuda::tune::DEFAULT_TACTIC.into(), Precision::Fp32),
                ("cuda.int8.matmul".into(), Precision::Int8),
                ("cuda.int8.matmul.cublaslt".into(), Precision::Int8),
            ]
        );
        assert_eq!(offer(&gemm, &gf, Vec::new(), true, false).len(), 2);
        assert_eq!(offer(&conv, &f, float(&["a"]), true, true).len(), 3);
        assert_eq!(gpu_attr(&imma_tactic_id("conv")), Some("cublaslt"));
        assert_eq!(gpu_attr("cuda.gemm.cublaslt"), None);
        assert_eq!(gpu_attr("cuda.int8.matmul"), None);
    }

    /// The layer the tuner times for an INT8 candidate is the one the CUDA backend runs:
    /// it lowers to the `nvrtc.int8.*` kernels (lowering needs no GPU).
    #[test]
    fn int8_probes_lower_to_the_gpu_int8_kernels() {
        let (conv, facts) = layer(
            "Conv",
            &[("pads", Attr::Ints(vec![1, 1, 1, 1]))],
            &[2, 8, 7, 5],
            &[12, 8, 3, 3],
            true,
            true,
        );
        let f: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let consts: Vec<Option<&Tensor>> = facts.iter().map(|f| f.konst.as_ref()).collect();
        let p = probe(&conv, &f, &consts, &tactic_id("conv")).unwrap();
        assert_eq!(p.node.desc.op_type, "Int8Conv");
        assert_eq!(p.inputs[0].dtype, Some(DType::I8));
        assert_eq!(p.inputs[1].dtype, Some(DType::I8));
        assert!(p.inputs[1].konst.is_some() && p.consts[1].is_some());
        assert_eq!(p.outputs[0].dtype, Some(DType::I8));
        assert_eq!(p.outputs[0].concrete_shape(), Some(vec![2, 12, 7, 5]));
        let l = kiln_cuda::library::lower_any(&p.node, &p.inputs, &p.outputs)
            .expect("a GPU layer")
            .unwrap();
        assert_eq!(l.tactic(), "nvrtc.int8.conv");
        // Gemm with transB and a bias: the INT8 MatMul kernel.
        let (gemm, facts) = layer(
            "Gemm",
            &[("transB", Attr::Int(1))],
            &[3, 16],
            &[10, 16],
            false,
            true,
        );
        let mut facts = facts;
        facts.push(Fact::constant(
            Tensor::from_vec(&[10], values(10, 3)).unwrap(),
        ));
        let mut gemm = gemm;
        gemm.inputs.push(Some(9));
        let f: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let consts: Vec<Option<&Tensor>> = facts.iter().map(|f| f.konst.as_ref()).collect();
        let p = probe(&gemm, &f, &consts, &tactic_id("matmul")).unwrap();
        assert_eq!(p.outputs[0].concrete_shape(), Some(vec![3, 10]));
        let l = kiln_cuda::library::lower_any(&p.node, &p.inputs, &p.outputs)
            .expect("a GPU layer")
            .unwrap();
        assert_eq!(l.tactic(), "nvrtc.int8.matmul");
        // The IMMA tactic records `cublaslt`; it lowers to cuBLASLt where it loads (K = 16 and
        // N = 10: N is not a multiple of 4, so IMMA's alignment rule sends it to the kernel).
        let p = probe(&gemm, &f, &consts, &imma_tactic_id("matmul")).unwrap();
        assert!(matches!(
            p.node.desc.attrs.get(kiln_cuda::library::GPU_TACTIC_ATTR),
            Some(Attr::String(v)) if v == "cublaslt"
        ));
        let l = kiln_cuda::library::lower_any(&p.node, &p.inputs, &p.outputs)
            .expect("a GPU layer")
            .unwrap();
        assert_eq!(l.tactic(), "nvrtc.int8.matmul");
        // An uncalibrated layer has no INT8 form: a clear error, not a panic.
        let (plain, facts) = layer("Conv", &[], &[1, 8, 6, 6], &[16, 8, 1, 1], false, false);
        let f: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let consts: Vec<Option<&Tensor>> = facts.iter().map(|f| f.konst.as_ref()).collect();
        let e = probe(&plain, &f, &consts, &tactic_id("conv")).unwrap_err();
        assert!(e.to_string().contains("not calibrated"), "{e}");
    }

    #[test]
    fn reformat_probes_are_the_quantize_and_dequantize_kernels() {
        let fact = Fact::concrete(DType::F32, &[1, 16, 9, 9]);
        for (float, from, to, kernel) in [
            (
                DType::F32,
                Format::FP32_LINEAR,
                INT8_LINEAR,
                "nvrtc.int8.quantize",
            ),
            (
                DType::F16,
                Format::FP32_LINEAR,
                INT8_LINEAR,
                "nvrtc.int8.quantize",
            ),
            (
                DType::F32,
                INT8_LINEAR,
                Format::FP32_LINEAR,
                "nvrtc.int8.dequantize",
            ),
            (
                DType::F16,
                INT8_LINEAR,
                Format::FP32_LINEAR,
                "nvrtc.int8.dequantize",
            ),
        ] {
            let p = reformat_probe(&fact, from, to, float).unwrap();
            let l = kiln_cuda::library::lower_any(&p.node, &p.inputs, &p.outputs)
                .expect("a GPU layer")
                .unwrap();
            assert_eq!(l.tactic(), kernel, "{from} -> {to} ({float})");
        }
        let fp16 = Format {
            precision: Precision::Fp16,
            layout: Layout::Linear,
        };
        assert!(reformat_probe(&fact, Format::FP32_LINEAR, fp16, DType::F32).is_err());
        assert!(reformat_probe(
            &Fact::unknown(),
            Format::FP32_LINEAR,
            INT8_LINEAR,
            DType::F32
        )
        .is_err());
    }
}
