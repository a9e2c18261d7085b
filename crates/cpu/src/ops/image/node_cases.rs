//! Checks the ops of this branch against ONNX's backend node tests, exported by a script to
//! a plain text file (`KILN_NODE_CASES=path cargo test -p kiln-cpu --lib node_cases -- --ignored
//! --nocapture`). One case per block: `case`, `attr`, `input`, `output` lines, then `end`.

use kiln_core::{Attr, BuildCtx, DType, OpDesc, Tensor, Value};

fn parse_tensor(tok: &mut std::slice::Iter<'_, &str>) -> Tensor {
    let dt = *tok.next().unwrap();
    let rank: usize = tok.next().unwrap().parse().unwrap();
    let shape: Vec<usize> = (0..rank)
        .map(|_| tok.next().unwrap().parse().unwrap())
        .collect();
    let n: usize = shape.iter().product();
    let vals: Vec<&str> = (0..n).map(|_| *tok.next().unwrap()).collect();
    let f = |s: &str| -> f64 {
        match s {
            "nan" => f64::NAN,
            "inf" => f64::INFINITY,
            "-inf" => f64::NEG_INFINITY,
            _ => s.parse().unwrap(),
        }
    };
    match dt {
        "f32" => {
            Tensor::from_vec(&shape, vals.iter().map(|s| f(s) as f32).collect::<Vec<_>>()).unwrap()
        }
        "f64" => Tensor::from_vec(&shape, vals.iter().map(|s| f(s)).collect::<Vec<_>>()).unwrap(),
        "f16" => Tensor::from_vec(
            &shape,
            vals.iter()
                .map(|s| half::f16::from_f64(f(s)))
                .collect::<Vec<_>>(),
        )
        .unwrap(),
        "bool" => {
            Tensor::from_bools(&shape, &vals.iter().map(|s| *s == "1").collect::<Vec<_>>()).unwrap()
        }
        other => {
            let v: Vec<i64> = vals.iter().map(|s| s.parse().unwrap()).collect();
            let t = Tensor::from_vec(&shape, v).unwrap();
            let d = DType::ALL
                .iter()
                .copied()
                .find(|d| d.name() == other)
                .unwrap();
            t.cast(d).unwrap()
        }
    }
}

fn compare(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!("shape {:?} != {:?}", got.shape(), want.shape()));
    }
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != {}", got.dtype(), want.dtype()));
    }
    let g = got.to_f64_vec().map_err(|e| e.to_string())?;
    let w = want.to_f64_vec().map_err(|e| e.to_string())?;
    let (rtol, atol) = if want.dtype() == DType::F16 {
        (1e-3, 1e-3)
    } else {
        (1e-3, 1e-5)
    };
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs();
        if !ok {
            return Err(format!("element {i}: got {a}, want {b}"));
        }
    }
    Ok(())
}

#[test]
#[ignore]
fn node_cases() {
    let Ok(path) = std::env::var("KILN_NODE_CASES") else {
        return;
    };
    let text = std::fs::read_to_string(path).unwrap();
    let reg = crate::registry();
    let (mut pass, mut fail) = (0, 0);
    let mut lines = text.lines();
    while let Some(head) = lines.next() {
        let h: Vec<&str> = head.split_whitespace().collect();
        let (name, op, opset, n_in, n_out) = (
            h[1],
            h[2],
            h[3].parse().unwrap(),
            h[4].parse().unwrap(),
            h[5].parse().unwrap(),
        );
        let mut desc = OpDesc::new("", op, opset);
        let mut inputs: Vec<Option<Tensor>> = vec![None; n_in];
        let mut outputs: Vec<(usize, Tensor)> = Vec::new();
        for line in lines.by_ref() {
            let toks: Vec<&str> = line.split_whitespace().collect();
            let mut it = toks.iter();
            match *it.next().unwrap() {
                "end" => break,
                "attr" => {
                    let an = it.next().unwrap().to_string();
                    let kind = *it.next().unwrap();
                    let rest: Vec<&str> = it.copied().collect();
                    let a = match kind {
                        "int" => Attr::Int(rest[0].parse().unwrap()),
                        "float" => Attr::Float(rest[0].parse::<f64>().unwrap() as f32),
                        "string" => Attr::String(rest.join(" ")),
                        "ints" => {
                            Attr::Ints(rest[1..].iter().map(|s| s.parse().unwrap()).collect())
                        }
                        "floats" => Attr::Floats(
                            rest[1..]
                                .iter()
                                .map(|s| s.parse::<f64>().unwrap() as f32)
                                .collect(),
                        ),
                        _ => Attr::Strings(rest[1..].iter().map(|s| s.to_string()).collect()),
                    };
                    desc.attrs.insert(an, a);
                }
                "input" => {
                    let i: usize = it.next().unwrap().parse().unwrap();
                    if toks[2] != "none" {
                        inputs[i] = Some(parse_tensor(&mut it));
                    }
                }
                _ => {
                    let i: usize = it.next().unwrap().parse().unwrap();
                    outputs.push((i, parse_tensor(&mut it)));
                }
            }
        }
        let ctx = BuildCtx {
            node: name,
            desc: &desc,
            n_inputs: n_in,
            n_outputs: n_out,
        };
        let result = reg.build(&ctx).and_then(|op| {
            let vals: Vec<Option<Value>> = inputs
                .iter()
                .map(|t| t.clone().map(Value::Tensor))
                .collect();
            let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
            op.eval(&refs)
        });
        let verdict = match result {
            Err(e) => Err(format!("error: {e}")),
            Ok(got) => outputs.iter().try_for_each(|(i, want)| match got.get(*i) {
                Some(Value::Tensor(t)) => compare(t, want).map_err(|e| format!("output {i}: {e}")),
                _ => Err(format!("output {i} missing")),
            }),
        };
        match verdict {
            Ok(()) => pass += 1,
            Err(e) => {
                fail += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    println!("node cases: {pass} passed, {fail} failed");
}
