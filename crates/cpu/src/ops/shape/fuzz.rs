//! Robustness: every op of this family, fed random (often invalid) inputs and attributes,
//! must return `Ok` or `Err` and never panic, in eval and in infer.

use std::panic::{catch_unwind, AssertUnwindSafe};

use kiln_core::{Attr, BuildCtx, Fact, OpDesc, Tensor, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn int(&mut self) -> i64 {
        const POOL: [i64; 6] = [i64::MIN, i64::MAX, 1 << 40, -(1 << 40), 1000, -1000];
        if self.below(10) == 0 {
            POOL[self.below(POOL.len() as u64) as usize]
        } else {
            self.below(9) as i64 - 4
        }
    }
    fn shape(&mut self, max_rank: u64) -> Vec<usize> {
        (0..self.below(max_rank + 1))
            .map(|_| self.below(5) as usize)
            .collect()
    }
    fn tensor(&mut self) -> Tensor {
        let shape = self.shape(4);
        let n: usize = shape.iter().product();
        match self.below(4) {
            0 | 1 => Tensor::from_vec(&shape, (0..n).map(|i| i as f32 - 2.0).collect()).unwrap(),
            2 => {
                let shape = self.shape(1);
                let n: usize = shape.iter().product();
                Tensor::from_vec(&shape, (0..n).map(|_| self.int()).collect()).unwrap()
            }
            _ => Tensor::from_vec(&shape, (0..n).map(|_| self.int()).collect()).unwrap(),
        }
    }
}

/// (op, opset, int attributes, max inputs, max outputs)
const OPS: &[(&str, i64, &[&str], usize, usize)] = &[
    ("Shape", 15, &["start", "end"], 1, 1),
    ("Size", 13, &[], 1, 1),
    ("Reshape", 14, &["allowzero"], 2, 1),
    ("Reshape", 1, &[], 1, 1),
    ("Flatten", 13, &["axis"], 1, 1),
    ("Squeeze", 13, &[], 2, 1),
    ("Squeeze", 11, &["axes"], 1, 1),
    ("Unsqueeze", 13, &[], 2, 1),
    ("Unsqueeze", 11, &["axes"], 1, 1),
    ("Transpose", 13, &["perm"], 1, 1),
    ("Concat", 13, &["axis"], 3, 1),
    ("Split", 13, &["axis"], 2, 3),
    ("Split", 18, &["axis", "num_outputs"], 2, 3),
    ("Split", 11, &["axis", "split"], 1, 3),
    ("Slice", 13, &[], 5, 1),
    ("Slice", 9, &["starts", "ends", "axes"], 1, 1),
    ("Expand", 13, &[], 2, 1),
    ("Tile", 13, &[], 2, 1),
    ("Pad", 18, &[], 4, 1),
    ("Pad", 2, &["pads"], 1, 1),
    ("DepthToSpace", 13, &["blocksize"], 1, 1),
    ("SpaceToDepth", 13, &["blocksize"], 1, 1),
    ("ConstantOfShape", 13, &[], 1, 1),
    ("Identity", 13, &[], 1, 1),
    ("Dropout", 13, &["seed"], 3, 2),
    ("CenterCropPad", 18, &["axes"], 2, 1),
    ("Gather", 13, &["axis"], 2, 1),
    ("GatherElements", 13, &["axis"], 2, 1),
    ("GatherND", 13, &["batch_dims"], 2, 1),
    ("ScatterElements", 13, &["axis"], 3, 1),
    ("Scatter", 9, &["axis"], 3, 1),
    ("ScatterND", 13, &[], 3, 1),
    ("TensorScatter", 24, &["axis"], 3, 1),
    ("Compress", 13, &["axis"], 2, 1),
    ("OneHot", 13, &["axis"], 3, 1),
    ("NonZero", 13, &[], 1, 1),
    ("TopK", 11, &["axis", "largest"], 2, 2),
    ("Unique", 13, &["axis", "sorted"], 1, 4),
    ("ReverseSequence", 13, &["batch_axis", "time_axis"], 2, 1),
    ("Trilu", 14, &["upper"], 2, 1),
    ("EyeLike", 13, &["k"], 1, 1),
    ("Range", 13, &[], 3, 1),
];

#[test]
fn random_inputs_never_panic() {
    let reg = crate::registry();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for &(op, opset, int_attrs, max_in, max_out) in OPS {
        for trial in 0..1500 {
            let mut desc = OpDesc::new("", op, opset);
            for &a in int_attrs {
                if rng.below(3) == 0 {
                    continue;
                }
                let v = if matches!(a, "perm" | "axes" | "split" | "pads" | "starts" | "ends") {
                    Attr::Ints((0..rng.below(5)).map(|_| rng.int()).collect())
                } else {
                    Attr::Int(rng.int())
                };
                desc.attrs.insert(a.to_string(), v);
            }
            if op == "Pad" {
                let modes = ["constant", "reflect", "edge", "wrap"];
                desc.attrs.insert(
                    "mode".into(),
                    Attr::String(modes[rng.below(4) as usize].into()),
                );
            }
            let n_in = 1 + rng.below(max_in as u64) as usize;
            let n_out = 1 + rng.below(max_out as u64) as usize;
            let inputs: Vec<Option<Value>> = (0..n_in)
                .map(|_| {
                    if rng.below(8) == 0 {
                        None
                    } else {
                        Some(rng.tensor().into())
                    }
                })
                .collect();
            let ctx = BuildCtx {
                node: "fuzz",
                desc: &desc,
                n_inputs: n_in,
                n_outputs: n_out,
            };
            let Ok(built) = reg.build(&ctx) else { continue };
            let refs: Vec<Option<&Value>> = inputs.iter().map(|v| v.as_ref()).collect();
            let r = catch_unwind(AssertUnwindSafe(|| {
                let _ = built.eval(&refs);
            }));
            assert!(
                r.is_ok(),
                "{op} eval panicked (trial {trial}): {desc:?} {inputs:?}"
            );
            let facts: Vec<Option<Fact>> = inputs
                .iter()
                .map(|v| {
                    v.as_ref().map(|v| {
                        let t = v.as_tensor().unwrap();
                        if rng.below(2) == 0 {
                            Fact::constant(t.clone())
                        } else {
                            Fact::concrete(t.dtype(), t.shape())
                        }
                    })
                })
                .collect();
            let frefs: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
            let r = catch_unwind(AssertUnwindSafe(|| {
                let _ = built.infer(&frefs, n_out);
            }));
            assert!(
                r.is_ok(),
                "{op} infer panicked (trial {trial}): {desc:?} {inputs:?}"
            );
        }
    }
}
