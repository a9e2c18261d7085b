//! Detection ops: `NonMaxSuppression` (opsets 10, 11).

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, Value,
};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("NonMaxSuppression", build_nms);
}

/// `NonMaxSuppression`: greedy per-(batch, class) box selection by score and IoU.
#[derive(Debug, Clone)]
pub struct NonMaxSuppression {
    /// Boxes are `[x_center, y_center, width, height]` (true) or two corners (false).
    pub center_point_box: bool,
}

fn build_nms(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let c = a.int("center_point_box", 0)?;
    if c != 0 && c != 1 {
        return Err(a.invalid(format!("center_point_box must be 0 or 1, got {c}")));
    }
    Ok(Box::new(NonMaxSuppression {
        center_point_box: c == 1,
    }))
}

/// A box as (x_min, x_max, y_min, y_max), in f32 like ONNX's reference.
fn corners(b: &[f32], center: bool) -> [f32; 4] {
    if center {
        let (hw, hh) = (b[2] / 2.0, b[3] / 2.0);
        [b[0] - hw, b[0] + hw, b[1] - hh, b[1] + hh]
    } else {
        [
            b[1].min(b[3]),
            b[1].max(b[3]),
            b[0].min(b[2]),
            b[0].max(b[2]),
        ]
    }
}

/// True when `a` and `b` overlap with IoU above the threshold.
fn suppresses(a: &[f32; 4], b: &[f32; 4], iou_threshold: f32) -> bool {
    let ix_min = a[0].max(b[0]);
    let ix_max = a[1].min(b[1]);
    if ix_max <= ix_min {
        return false;
    }
    let iy_min = a[2].max(b[2]);
    let iy_max = a[3].min(b[3]);
    if iy_max <= iy_min {
        return false;
    }
    let inter = (ix_max - ix_min) * (iy_max - iy_min);
    if inter <= 0.0 {
        return false;
    }
    let area_a = (a[1] - a[0]) * (a[3] - a[2]);
    let area_b = (b[1] - b[0]) * (b[3] - b[2]);
    let union = area_a + area_b - inter;
    if area_a <= 0.0 || area_b <= 0.0 || union <= 0.0 {
        return false;
    }
    inter / union > iou_threshold
}

impl NonMaxSuppression {
    fn run(
        &self,
        boxes: &Tensor,
        scores: &Tensor,
        max_out: i64,
        iou: f32,
        score_threshold: Option<f32>,
    ) -> Result<Tensor> {
        let err = |m: String| KilnError::kernel("NonMaxSuppression", m);
        let (bs, ss) = (boxes.shape(), scores.shape());
        if bs.len() != 3 || bs[2] != 4 {
            return Err(err(format!(
                "boxes must have shape [batches, boxes, 4], found {bs:?}"
            )));
        }
        if ss.len() != 3 || ss[0] != bs[0] || ss[2] != bs[1] {
            return Err(err(format!(
                "scores must have shape [{}, classes, {}], found {ss:?}",
                bs[0], bs[1]
            )));
        }
        let (nb, nc, n) = (bs[0], ss[1], bs[1]);
        let bv = boxes.to_f32_vec()?;
        let sv = scores.to_f32_vec()?;
        let max_out = max_out.max(0) as u64;
        let mut selected: Vec<i64> = Vec::new();
        if max_out > 0 {
            for b in 0..nb {
                let bx: Vec<[f32; 4]> = (0..n)
                    .map(|i| {
                        corners(
                            &bv[(b * n + i) * 4..(b * n + i + 1) * 4],
                            self.center_point_box,
                        )
                    })
                    .collect();
                for c in 0..nc {
                    let sc = &sv[(b * nc + c) * n..(b * nc + c + 1) * n];
                    let mut cand: Vec<usize> = (0..n)
                        .filter(|&i| score_threshold.is_none_or(|t| sc[i] > t))
                        .collect();
                    // Highest score first; ties keep the lower index first.
                    cand.sort_by(|&i, &j| {
                        sc[j]
                            .partial_cmp(&sc[i])
                            .unwrap_or(std::cmp::Ordering::Equal)
                            .then(i.cmp(&j))
                    });
                    let mut kept: Vec<usize> = Vec::new();
                    for i in cand {
                        if kept.len() as u64 >= max_out {
                            break;
                        }
                        if kept.iter().all(|&k| !suppresses(&bx[i], &bx[k], iou)) {
                            kept.push(i);
                            selected.extend_from_slice(&[b as i64, c as i64, i as i64]);
                        }
                    }
                }
            }
        }
        let rows = selected.len() / 3;
        Tensor::from_vec(&[rows, 3], selected)
    }
}

fn scalar_of(t: Option<&Tensor>) -> Option<&Tensor> {
    t.filter(|t| !t.is_empty())
}

impl Op for NonMaxSuppression {
    fn op_type(&self) -> &str {
        "NonMaxSuppression"
    }

    fn infer(&self, _inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        Ok(vec![Fact::tensor(
            DType::I64,
            vec![Dim::Unknown, Dim::Known(3)],
        )])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "NonMaxSuppression";
        let boxes = input_tensor(inputs, 0, op)?;
        let scores = input_tensor(inputs, 1, op)?;
        if !boxes.dtype().is_float() || !scores.dtype().is_float() {
            return Err(KilnError::kernel(
                op,
                "boxes and scores must be float tensors",
            ));
        }
        let max_out = match scalar_of(optional_tensor(inputs, 2, op)?) {
            Some(t) => t.to_i64_vec()?[0],
            None => 0,
        };
        let iou = match scalar_of(optional_tensor(inputs, 3, op)?) {
            Some(t) => t.to_f32_vec()?[0],
            None => 0.0,
        };
        if !(0.0..=1.0).contains(&iou) {
            return Err(KilnError::kernel(
                op,
                format!("iou_threshold must be in [0, 1], got {iou}"),
            ));
        }
        let score_threshold = match scalar_of(optional_tensor(inputs, 4, op)?) {
            Some(t) => Some(t.to_f32_vec()?[0]),
            None => None,
        };
        Ok(vec![Value::Tensor(self.run(
            boxes,
            scores,
            max_out,
            iou,
            score_threshold,
        )?)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes() -> Tensor {
        // ONNX test_nonmaxsuppression_suppress_by_IOU boxes.
        Tensor::from_vec(
            &[1, 6, 4],
            vec![
                0.0f32, 0.0, 1.0, 1.0, 0.0, 0.1, 1.0, 1.1, 0.0, -0.1, 1.0, 0.9, 0.0, 10.0, 1.0,
                11.0, 0.0, 10.1, 1.0, 11.1, 0.0, 100.0, 1.0, 101.0,
            ],
        )
        .unwrap()
    }

    fn scores() -> Tensor {
        Tensor::from_vec(&[1, 1, 6], vec![0.9f32, 0.75, 0.6, 0.95, 0.5, 0.3]).unwrap()
    }

    fn run(op: &NonMaxSuppression, inputs: Vec<Option<Tensor>>) -> Result<Vec<i64>> {
        let vals: Vec<Option<Value>> = inputs.into_iter().map(|t| t.map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        op.eval(&refs)?.remove(0).into_tensor()?.to_i64_vec()
    }

    #[test]
    fn suppress_by_iou_and_score() {
        let op = NonMaxSuppression {
            center_point_box: false,
        };
        let mo = Tensor::from_vec(&[1], vec![3i64]).unwrap();
        let iou = Tensor::from_vec(&[1], vec![0.5f32]).unwrap();
        let got = run(
            &op,
            vec![
                Some(boxes()),
                Some(scores()),
                Some(mo.clone()),
                Some(iou.clone()),
            ],
        )
        .unwrap();
        assert_eq!(got, [0, 0, 3, 0, 0, 0, 0, 0, 5]);
        let st = Tensor::from_vec(&[1], vec![0.4f32]).unwrap();
        let got = run(
            &op,
            vec![Some(boxes()), Some(scores()), Some(mo), Some(iou), Some(st)],
        )
        .unwrap();
        assert_eq!(got, [0, 0, 3, 0, 0, 0]);
        // No max_output_boxes_per_class: nothing selected.
        assert!(run(&op, vec![Some(boxes()), Some(scores())])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn center_point_format_and_errors() {
        let op = NonMaxSuppression {
            center_point_box: true,
        };
        let b =
            Tensor::from_vec(&[1, 2, 4], vec![0.5f32, 0.5, 1.0, 1.0, 0.5, 0.6, 1.0, 1.0]).unwrap();
        let s = Tensor::from_vec(&[1, 1, 2], vec![0.9f32, 0.8]).unwrap();
        let mo = Tensor::from_vec(&[1], vec![10i64]).unwrap();
        let iou = Tensor::from_vec(&[1], vec![0.5f32]).unwrap();
        assert_eq!(
            run(
                &op,
                vec![Some(b.clone()), Some(s), Some(mo.clone()), Some(iou)]
            )
            .unwrap(),
            [0, 0, 0]
        );
        let bad = Tensor::from_vec(&[1, 1, 3], vec![0.9f32, 0.8, 0.1]).unwrap();
        assert!(run(&op, vec![Some(b), Some(bad), Some(mo)]).is_err());
    }
}
