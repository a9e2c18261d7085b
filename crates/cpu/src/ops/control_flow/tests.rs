use std::sync::Arc;

use kiln_core::{Attr, DType, Dim, Fact, Tensor, Value};

use super::testutil::*;
use super::*;

fn bool_t(b: bool) -> Tensor {
    Tensor::from_bools(&[], &[b]).unwrap()
}

/// then: x + 1; else: x + y. Both branches share the capture list [x, y].
fn if_op() -> Box<dyn Op> {
    let mut t = GraphBuilder::new("then");
    let x = t.capture("x");
    let _y = t.capture("y");
    let one = t.constant("one", f32t(&[], &[1.0]));
    let o = t.node(add(), &[x, one], 1)[0];
    t.output(o);
    t.set_fact(o, Fact::concrete(DType::F32, &[2]));
    let mut e = GraphBuilder::new("else");
    let x2 = e.capture("x");
    let y = e.capture("y");
    let o = e.node(add(), &[x2, y], 1)[0];
    e.output(o);
    e.set_fact(o, Fact::concrete(DType::F32, &[3]));
    build(
        build_if,
        "If",
        16,
        vec![
            ("then_branch", gattr(&t.finish())),
            ("else_branch", gattr(&e.finish())),
        ],
        4,
        1,
    )
    .unwrap()
}

#[test]
fn if_runs_the_right_branch_with_captures() {
    let op = if_op();
    let x = f32t(&[2], &[1.0, 2.0]);
    let y = f32t(&[2], &[10.0, 20.0]);
    let out = run(
        op.as_ref(),
        &[tv(bool_t(true)), tv(x.clone()), tv(y.clone())],
    )
    .unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[2.0, 3.0]
    );
    let out = run(op.as_ref(), &[tv(bool_t(false)), tv(x.clone()), tv(y)]).unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[11.0, 22.0]
    );
    // Missing captures and bad conditions are errors, not panics.
    assert!(run(op.as_ref(), &[tv(bool_t(true))]).is_err());
    let two = Tensor::from_bools(&[2], &[true, false]).unwrap();
    assert!(run(op.as_ref(), &[tv(two), tv(x.clone()), tv(x.clone()), tv(x)]).is_err());
    assert_eq!(op.subgraphs().len(), 2);
}

#[test]
fn if_infers_merged_or_chosen_facts() {
    let op = if_op();
    let cond = Fact::of_dtype(DType::Bool);
    let out = op.infer(&[Some(&cond)], 1).unwrap();
    assert_eq!(out[0].dtype, Some(DType::F32));
    assert_eq!(out[0].shape, Some(vec![Dim::Unknown]));
    let cond = Fact::constant(bool_t(false));
    let out = op.infer(&[Some(&cond)], 1).unwrap();
    assert_eq!(out[0].shape, Some(vec![Dim::Known(3)]));
}

#[test]
fn if_builder_rejects_mismatched_branches() {
    let mut t = GraphBuilder::new("then");
    let c = t.constant("c", f32t(&[], &[1.0]));
    t.output(c);
    let e = GraphBuilder::new("else");
    assert!(build(
        build_if,
        "If",
        16,
        vec![
            ("then_branch", gattr(&t.finish())),
            ("else_branch", gattr(&e.finish()))
        ],
        1,
        1
    )
    .is_err());
    assert!(build(build_if, "If", 16, vec![], 1, 1).is_err());
}

/// Body: (i, cond, y) -> (cond_out, y + i + w, y + i + w) where w is captured and
/// cond_out is `i < limit` when `limit` is given, else the cond input.
fn loop_op(limit: Option<f32>) -> Box<dyn Op> {
    let mut b = GraphBuilder::new("body");
    let i = b.input("i");
    let c = b.input("cond");
    let y = b.input("y");
    let w = b.capture("w");
    let fi = b.node(Arc::new(ToF32), &[i], 1)[0];
    let s = b.node(add(), &[y, fi], 1)[0];
    let s = b.node(add(), &[s, w], 1)[0];
    let cond_out = match limit {
        Some(l) => {
            let lim = b.constant("lim", f32t(&[], &[l]));
            b.node(Arc::new(Less), &[fi, lim], 1)[0]
        }
        None => b.node(Arc::new(Ident), &[c], 1)[0],
    };
    let scan = b.node(Arc::new(Ident), &[s], 1)[0];
    b.set_fact(scan, Fact::concrete(DType::F32, &[1]));
    b.output(cond_out);
    b.output(s);
    b.output(scan);
    build(
        build_loop,
        "Loop",
        16,
        vec![("body", gattr(&b.finish()))],
        4,
        2,
    )
    .unwrap()
}

#[test]
fn loop_for_counts_and_stacks_scan_outputs() {
    let op = loop_op(None);
    let y0 = f32t(&[1], &[0.0]);
    let w = f32t(&[1], &[0.5]);
    let out = run(
        op.as_ref(),
        &[
            tv(Tensor::scalar(4i64)),
            tv(bool_t(true)),
            tv(y0.clone()),
            tv(w.clone()),
        ],
    )
    .unwrap();
    // y after i = 0..4: 0.5, 2, 4.5, 8
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[8.0]
    );
    let scan = out[1].as_tensor().unwrap();
    assert_eq!(scan.shape(), &[4, 1]);
    assert_eq!(scan.as_slice::<f32>().unwrap(), &[0.5, 2.0, 4.5, 8.0]);
    // Zero trips: carried values pass through, scan outputs are empty.
    let out = run(
        op.as_ref(),
        &[
            tv(Tensor::scalar(0i64)),
            tv(bool_t(true)),
            tv(y0.clone()),
            tv(w.clone()),
        ],
    )
    .unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[0.0]
    );
    assert_eq!(out[1].as_tensor().unwrap().shape(), &[0, 1]);
    // cond false at the start: no iteration either.
    let out = run(
        op.as_ref(),
        &[tv(Tensor::scalar(4i64)), tv(bool_t(false)), tv(y0), tv(w)],
    )
    .unwrap();
    assert_eq!(out[1].as_tensor().unwrap().shape(), &[0, 1]);
}

#[test]
fn loop_while_stops_on_body_condition() {
    let op = loop_op(Some(2.0));
    let y0 = f32t(&[1], &[0.0]);
    let w = f32t(&[1], &[0.0]);
    // M and cond absent: runs while i < 2 held at the previous iteration: i = 0, 1, 2.
    let out = run(op.as_ref(), &[None, None, tv(y0), tv(w)]).unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[3.0]
    );
    assert_eq!(out[1].as_tensor().unwrap().shape(), &[3, 1]);
}

#[test]
fn loop_errors_and_infer() {
    let op = loop_op(None);
    // Missing capture.
    assert!(run(
        op.as_ref(),
        &[
            tv(Tensor::scalar(1i64)),
            tv(bool_t(true)),
            tv(f32t(&[1], &[0.0]))
        ]
    )
    .is_err());
    // Non-scalar M.
    let m = Tensor::from_vec(&[2], vec![1i64, 2]).unwrap();
    assert!(run(
        op.as_ref(),
        &[
            tv(m),
            tv(bool_t(true)),
            tv(f32t(&[1], &[0.0])),
            tv(f32t(&[1], &[0.0]))
        ]
    )
    .is_err());
    let m = Fact::constant(Tensor::scalar(7i64));
    let c = Fact::constant(bool_t(true));
    let y = Fact::concrete(DType::F32, &[1]);
    let f = op.infer(&[Some(&m), Some(&c), Some(&y)], 2).unwrap();
    assert_eq!(f[1].shape, Some(vec![Dim::Known(7), Dim::Known(1)]));
    assert_eq!(f[1].dtype, Some(DType::F32));
}

#[test]
fn loop_carries_sequences() {
    // Body: seq_out = seq_in (identity); a sequence value flows through unchanged.
    let mut b = GraphBuilder::new("body");
    let _i = b.input("i");
    let c = b.input("cond");
    let s = b.input("s");
    let c2 = b.node(Arc::new(Ident), &[c], 1)[0];
    let s2 = b.node(Arc::new(Ident), &[s], 1)[0];
    b.output(c2);
    b.output(s2);
    let op = build(
        build_loop,
        "Loop",
        13,
        vec![("body", gattr(&b.finish()))],
        3,
        1,
    )
    .unwrap();
    let seq = Value::Sequence(vec![f32t(&[1], &[1.0])]);
    let out = run(
        op.as_ref(),
        &[tv(Tensor::scalar(3i64)), tv(bool_t(true)), Some(seq)],
    )
    .unwrap();
    assert_eq!(out[0].as_sequence().unwrap().len(), 1);
}

/// Scan body: (sum, x) -> (sum + x, sum + x).
fn scan_body() -> Arc<Graph> {
    let mut b = GraphBuilder::new("scan_body");
    let s = b.input("sum");
    let x = b.input("x");
    let o = b.node(add(), &[s, x], 1)[0];
    let o2 = b.node(Arc::new(Ident), &[o], 1)[0];
    b.output(o);
    b.output(o2);
    b.finish()
}

#[test]
fn scan9_sums_along_axes_and_directions() {
    let body = scan_body();
    let op = build(
        build_scan,
        "Scan",
        11,
        vec![("body", gattr(&body)), ("num_scan_inputs", Attr::Int(1))],
        2,
        2,
    )
    .unwrap();
    let init = f32t(&[2], &[0.0, 0.0]);
    let x = f32t(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
    let out = run(op.as_ref(), &[tv(init.clone()), tv(x.clone())]).unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[9., 12.]
    );
    assert_eq!(out[1].as_tensor().unwrap().shape(), &[3, 2]);
    assert_eq!(
        out[1].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[1., 2., 4., 6., 9., 12.]
    );

    // Reverse input direction, scan output on axis 1 and reversed.
    let op = build(
        build_scan,
        "Scan",
        11,
        vec![
            ("body", gattr(&body)),
            ("num_scan_inputs", Attr::Int(1)),
            ("scan_input_directions", Attr::Ints(vec![1])),
            ("scan_output_axes", Attr::Ints(vec![-1])),
            ("scan_output_directions", Attr::Ints(vec![1])),
        ],
        2,
        2,
    )
    .unwrap();
    let out = run(op.as_ref(), &[tv(init.clone()), tv(x.clone())]).unwrap();
    // Iterations see rows 2, 1, 0: partial sums [5,6], [8,10], [9,12]; reversed: [9,12],[8,10],[5,6].
    let y = out[1].as_tensor().unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(y.as_slice::<f32>().unwrap(), &[9., 8., 5., 12., 10., 6.]);

    // Input axis 1: x^T of shape [2,3] scanned along axis 1 gives the same sums.
    let op = build(
        build_scan,
        "Scan",
        11,
        vec![
            ("body", gattr(&body)),
            ("num_scan_inputs", Attr::Int(1)),
            ("scan_input_axes", Attr::Ints(vec![1])),
        ],
        2,
        2,
    )
    .unwrap();
    let xt = f32t(&[2, 3], &[1., 3., 5., 2., 4., 6.]);
    let out = run(op.as_ref(), &[tv(init), tv(xt)]).unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[9., 12.]
    );
    let f = op
        .infer(
            &[
                Some(&Fact::concrete(DType::F32, &[2])),
                Some(&Fact::concrete(DType::F32, &[2, 3])),
            ],
            2,
        )
        .unwrap();
    assert_eq!(f[0].dtype, Some(DType::F32));
}

#[test]
fn scan8_batches_and_sequence_lens() {
    let body = scan_body();
    let op = build(
        build_scan,
        "Scan",
        8,
        vec![("body", gattr(&body)), ("num_scan_inputs", Attr::Int(1))],
        3,
        2,
    )
    .unwrap();
    let init = f32t(&[2, 2], &[0.0, 0.0, 100.0, 100.0]);
    let x = f32t(
        &[2, 3, 2],
        &[1., 2., 3., 4., 5., 6., 1., 1., 1., 1., 1., 1.],
    );
    let lens = Tensor::from_vec(&[2], vec![3i64, 2]).unwrap();
    let out = run(op.as_ref(), &[tv(lens), tv(init.clone()), tv(x.clone())]).unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[9., 12., 102., 102.]
    );
    let y = out[1].as_tensor().unwrap();
    assert_eq!(y.shape(), &[2, 3, 2]);
    assert_eq!(
        y.as_slice::<f32>().unwrap(),
        &[1., 2., 4., 6., 9., 12., 101., 101., 102., 102., 0., 0.]
    );
    let out = run(op.as_ref(), &[None, tv(init.clone()), tv(x.clone())]).unwrap();
    assert_eq!(
        out[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
        &[9., 12., 103., 103.]
    );
    let bad = Tensor::from_vec(&[2], vec![4i64, 2]).unwrap();
    assert!(run(op.as_ref(), &[tv(bad), tv(init), tv(x)]).is_err());
}

#[test]
fn scan_builder_validates_attributes() {
    let body = scan_body();
    assert!(build(
        build_scan,
        "Scan",
        11,
        vec![("body", gattr(&body)), ("num_scan_inputs", Attr::Int(3))],
        2,
        2
    )
    .is_err());
    assert!(build(
        build_scan,
        "Scan",
        11,
        vec![
            ("body", gattr(&body)),
            ("num_scan_inputs", Attr::Int(1)),
            ("scan_input_axes", Attr::Ints(vec![0, 1]))
        ],
        2,
        2
    )
    .is_err());
}
