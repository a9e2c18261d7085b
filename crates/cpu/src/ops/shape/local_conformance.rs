//! Runs ONNX node test cases extracted to JSON (by a helper script) against the ops of
//! this family, checking both eval and shape inference. Skipped when the cases directory
//! (`KILN_SHAPEOPS_CASES`, default `/tmp/shapeops_cases`) does not exist.

use std::collections::BTreeMap;

use kiln_core::{Attr, BuildCtx, DType, Dim, Fact, OpDesc, Tensor, Value};
use serde_json::Value as J;

fn parse_tensor(j: &J) -> Tensor {
    let code = j["dtype"].as_i64().unwrap() as i32;
    let shape: Vec<usize> = j["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let data: Vec<&str> = j["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let dt = DType::from_onnx_code(code).unwrap();
    if dt == DType::String {
        return Tensor::from_strings(&shape, data.iter().map(|s| s.to_string()).collect()).unwrap();
    }
    if dt == DType::Bool {
        let v: Vec<bool> = data.iter().map(|s| *s != "0").collect();
        return Tensor::from_bools(&shape, &v).unwrap();
    }
    if dt.is_float() {
        let v: Vec<f64> = data.iter().map(|s| s.parse::<f64>().unwrap()).collect();
        return Tensor::from_vec(&shape, v).unwrap().cast(dt).unwrap();
    }
    if dt == DType::U64 {
        let v: Vec<u64> = data.iter().map(|s| s.parse::<u64>().unwrap()).collect();
        return Tensor::from_vec(&shape, v).unwrap();
    }
    let v: Vec<i64> = data.iter().map(|s| s.parse::<i64>().unwrap()).collect();
    Tensor::from_vec(&shape, v).unwrap().cast(dt).unwrap()
}

fn parse_attr(j: &J) -> Option<Attr> {
    let v = &j["value"];
    Some(match j["kind"].as_str()? {
        "int" => Attr::Int(v.as_i64()?),
        "ints" => Attr::Ints(v.as_array()?.iter().map(|x| x.as_i64().unwrap()).collect()),
        "float" => Attr::Float(v.as_str()?.parse().ok()?),
        "floats" => Attr::Floats(
            v.as_array()?
                .iter()
                .map(|x| x.as_str().unwrap().parse().unwrap())
                .collect(),
        ),
        "string" => Attr::String(v.as_str()?.to_string()),
        "tensor" => Attr::Tensor(parse_tensor(v)),
        _ => return None,
    })
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return false;
    }
    if a.dtype().is_float() {
        let (x, y) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
        return x
            .iter()
            .zip(&y)
            .all(|(p, q)| (p.is_nan() && q.is_nan()) || (p - q).abs() <= 1e-7 + 1e-3 * q.abs());
    }
    a.same_as(b)
}

fn check_fact(f: &Fact, t: &Tensor) -> Result<(), String> {
    if let Some(d) = f.dtype {
        if d != t.dtype() {
            return Err(format!("inferred dtype {d}, actual {}", t.dtype()));
        }
    }
    if let Some(s) = &f.shape {
        if s.len() != t.rank() {
            return Err(format!("inferred {}, actual {:?}", f.describe(), t.shape()));
        }
        for (d, &a) in s.iter().zip(t.shape()) {
            if let Dim::Known(k) = d {
                if *k != a {
                    return Err(format!("inferred {}, actual {:?}", f.describe(), t.shape()));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn onnx_node_cases() {
    let dir = std::env::var("KILN_SHAPEOPS_CASES").unwrap_or_else(|_| "/tmp/shapeops_cases".into());
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    let reg = crate::registry();
    let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    files.sort();
    let (mut pass, mut fail, mut infer_partial) = (0, Vec::new(), Vec::new());
    for p in files {
        let j: J = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let name = j["name"].as_str().unwrap().to_string();
        let mut desc = OpDesc::new("", j["op"].as_str().unwrap(), j["opset"].as_i64().unwrap());
        let mut attrs = BTreeMap::new();
        for (k, v) in j["attrs"].as_object().unwrap() {
            if let Some(a) = parse_attr(v) {
                attrs.insert(k.clone(), a);
            }
        }
        desc.attrs = attrs;
        let inputs: Vec<Option<Value>> = j["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                if v.is_null() {
                    None
                } else {
                    Some(parse_tensor(v).into())
                }
            })
            .collect();
        let outputs: Vec<Tensor> = j["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(parse_tensor)
            .collect();
        let n_out = j["n_outputs"].as_u64().unwrap() as usize;
        let ctx = BuildCtx {
            node: "n",
            desc: &desc,
            n_inputs: inputs.len(),
            n_outputs: n_out,
        };
        let op = match reg.build(&ctx) {
            Ok(op) => op,
            Err(e) => {
                fail.push(format!("{name}: build: {e}"));
                continue;
            }
        };
        let refs: Vec<Option<&Value>> = inputs.iter().map(|v| v.as_ref()).collect();
        let mut problems = Vec::new();
        match op.eval(&refs) {
            Ok(got) => {
                for (i, want) in outputs.iter().enumerate() {
                    match got.get(i).map(|v| v.as_tensor()) {
                        Some(Ok(g)) if close(g, want) => {}
                        Some(Ok(g)) => {
                            problems.push(format!("output {i}: got {g:?}, want {want:?}"))
                        }
                        _ => problems.push(format!("output {i} missing")),
                    }
                }
            }
            Err(e) => problems.push(format!("eval: {e}")),
        }
        // shape inference: plain facts, then with inputs 1.. constant
        let plain: Vec<Option<Fact>> = inputs
            .iter()
            .map(|v| {
                v.as_ref().map(|v| {
                    let t = v.as_tensor().unwrap();
                    Fact::concrete(t.dtype(), t.shape())
                })
            })
            .collect();
        let konst: Vec<Option<Fact>> = inputs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_ref().map(|v| {
                    let t = v.as_tensor().unwrap();
                    if i == 0 {
                        Fact::concrete(t.dtype(), t.shape())
                    } else {
                        Fact::constant(t.clone())
                    }
                })
            })
            .collect();
        for facts in [&plain, &konst] {
            let fr: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
            match op.infer(&fr, n_out) {
                Ok(inf) => {
                    for (i, want) in outputs.iter().enumerate() {
                        if let Some(f) = inf.get(i) {
                            if let Err(e) = check_fact(f, want) {
                                problems.push(format!("infer output {i}: {e}"));
                            }
                        }
                    }
                    if std::ptr::eq(facts, &konst)
                        && inf
                            .iter()
                            .take(outputs.len())
                            .any(|f| f.concrete_shape().is_none())
                    {
                        infer_partial.push(format!(
                            "{name}: {:?}",
                            inf.iter().map(|f| f.describe()).collect::<Vec<_>>()
                        ));
                    }
                }
                Err(e) => problems.push(format!("infer: {e}")),
            }
        }
        if problems.is_empty() {
            pass += 1;
        } else {
            fail.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    for f in &infer_partial {
        eprintln!("partial infer: {f}");
    }
    for f in &fail {
        eprintln!("FAIL {f}");
    }
    eprintln!("{pass} passed, {} failed", fail.len());
    assert!(fail.is_empty());
}
