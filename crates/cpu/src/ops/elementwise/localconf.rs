//! A local runner for ONNX node tests dumped to JSON (see the `KILN_NODE_CASES` variable);
//! `cargo test -p kiln-cpu --lib localconf -- --ignored --nocapture`.

use kiln_core::{Attr, BuildCtx, DType, OpDesc, Tensor, Value};
use serde_json::Value as J;

fn b64(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        } as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

fn tensor(j: &J) -> Result<Tensor, String> {
    let code = j["dtype"].as_i64().ok_or("dtype")?;
    let shape: Vec<usize> = j["shape"]
        .as_array()
        .ok_or("shape")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0) as usize)
        .collect();
    let dt = DType::from_onnx_code(code as i32).ok_or(format!("unsupported dtype code {code}"))?;
    if dt == DType::String {
        let s = j["strings"]
            .as_array()
            .ok_or("strings")?
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect();
        return Tensor::from_strings(&shape, s).map_err(|e| e.to_string());
    }
    Tensor::from_bytes(dt, &shape, &b64(j["data"].as_str().ok_or("data")?))
        .map_err(|e| e.to_string())
}

fn compare(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.dtype() != want.dtype() || got.shape() != want.shape() {
        return Err(format!(
            "got {} {:?}, want {} {:?}",
            got.dtype(),
            got.shape(),
            want.dtype(),
            want.shape()
        ));
    }
    if want.dtype().is_float() {
        let (g, w) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let ok = (a - b).abs() <= 1e-7 + 1e-3 * b.abs() || (a.is_nan() && b.is_nan()) || a == b;
            if !ok {
                return Err(format!("element {i}: got {a}, want {b}"));
            }
        }
        return Ok(());
    }
    if got.same_as(want) {
        Ok(())
    } else {
        Err(format!("values differ: got {got:?}, want {want:?}"))
    }
}

fn run_case(c: &J) -> Result<(), String> {
    let mut desc = OpDesc::new(
        "",
        c["op"].as_str().ok_or("op")?,
        c["opset"].as_i64().ok_or("opset")?,
    );
    for (k, v) in c["attrs"].as_object().ok_or("attrs")? {
        let a = if let Some(i) = v.get("int") {
            Attr::Int(i.as_i64().unwrap_or(0))
        } else if let Some(f) = v.get("float") {
            Attr::Float(f.as_f64().unwrap_or(0.0) as f32)
        } else if let Some(s) = v.get("string") {
            Attr::String(s.as_str().unwrap_or("").into())
        } else if let Some(s) = v.get("ints") {
            Attr::Ints(
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap_or(0))
                    .collect(),
            )
        } else if let Some(s) = v.get("floats") {
            Attr::Floats(
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(0.0) as f32)
                    .collect(),
            )
        } else {
            return Err(format!("attr {k}"));
        };
        desc.attrs.insert(k.clone(), a);
    }
    let inputs: Vec<Option<Value>> = c["inputs"]
        .as_array()
        .ok_or("inputs")?
        .iter()
        .map(|j| {
            if j.is_null() {
                Ok(None)
            } else {
                tensor(j).map(|t| Some(Value::Tensor(t)))
            }
        })
        .collect::<Result<_, String>>()?;
    let n_out = c["n_outputs"].as_u64().unwrap_or(1) as usize;
    let reg = crate::registry();
    let ctx = BuildCtx {
        node: "n",
        desc: &desc,
        n_inputs: inputs.len(),
        n_outputs: n_out,
    };
    let op = reg.build(&ctx).map_err(|e| e.to_string())?;
    let refs: Vec<Option<&Value>> = inputs.iter().map(|v| v.as_ref()).collect();
    let facts: Vec<Option<kiln_core::Fact>> = inputs
        .iter()
        .map(|v| {
            v.as_ref()
                .and_then(|v| v.as_tensor().ok())
                .map(|t| kiln_core::Fact::concrete(t.dtype(), t.shape()))
        })
        .collect();
    let frefs: Vec<Option<&kiln_core::Fact>> = facts.iter().map(|f| f.as_ref()).collect();
    let inferred = op.infer(&frefs, n_out).map_err(|e| format!("infer: {e}"))?;
    let outs = op.eval(&refs).map_err(|e| e.to_string())?;
    for (i, w) in c["outputs"].as_array().ok_or("outputs")?.iter().enumerate() {
        let want = tensor(w)?;
        let got = outs
            .get(i)
            .ok_or(format!("missing output {i}"))?
            .as_tensor()
            .map_err(|e| e.to_string())?;
        compare(got, &want).map_err(|e| format!("output {i}: {e}"))?;
        if let Some(f) = inferred.get(i) {
            if f.dtype.is_some_and(|d| d != got.dtype()) {
                return Err(format!("infer dtype {:?} != {}", f.dtype, got.dtype()));
            }
            if let Some(s) = f.concrete_shape() {
                if s != got.shape() {
                    return Err(format!("infer shape {s:?} != {:?}", got.shape()));
                }
            }
        }
    }
    Ok(())
}

#[test]
#[ignore]
fn node_cases() {
    let path =
        std::env::var("KILN_NODE_CASES").unwrap_or_else(|_| "../../.localconf/cases.json".into());
    let data = std::fs::read_to_string(&path).expect("cases file");
    let cases: J = serde_json::from_str(&data).unwrap();
    let (mut pass, mut fail) = (0, 0);
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap_or("?");
        match std::panic::catch_unwind(|| run_case(c)) {
            Ok(Ok(())) => pass += 1,
            Ok(Err(e)) => {
                fail += 1;
                println!("FAIL {name}: {}", e.chars().take(300).collect::<String>());
            }
            Err(_) => {
                fail += 1;
                println!("PANIC {name}");
            }
        }
    }
    println!("passed {pass}, failed {fail}");
}
