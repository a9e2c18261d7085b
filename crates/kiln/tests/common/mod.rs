//! Shared helpers for tests on the real models (fetched by `cargo xtask fetch-assets`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln::{Tensor, Value};

/// The assets folder (`KILN_ASSETS` or `<workspace>/assets`), if it holds the references.
pub fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    if dir.join("reference/index.json").exists() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: no test assets at {} (run `cargo xtask fetch-assets`)",
            dir.display()
        );
        None
    }
}

/// One reference case: model, inputs and ONNX Runtime's outputs.
pub struct Case {
    pub name: String,
    pub model: PathBuf,
    pub shapes: String,
    pub inputs: Vec<(String, Tensor)>,
    pub outputs: Vec<(String, Tensor)>,
}

/// Loads a case by name from `assets/reference/<name>/case.json`.
pub fn case(assets: &Path, name: &str) -> Case {
    let text = std::fs::read_to_string(assets.join(format!("reference/{name}/case.json")))
        .expect("case.json");
    let j: serde_json::Value = serde_json::from_str(&text).expect("case.json is JSON");
    let load = |map: &serde_json::Value| -> Vec<(String, Tensor)> {
        map.as_object()
            .expect("object")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    kiln::npy::read_npy(assets.join(v.as_str().expect("path"))).expect("npy"),
                )
            })
            .collect()
    };
    Case {
        name: name.to_string(),
        model: assets.join(j["model"].as_str().expect("model")),
        shapes: j["shapes"].as_str().unwrap_or("").to_string(),
        inputs: load(&j["inputs"]),
        outputs: load(&j["outputs"]),
    }
}

/// Names of every reference case.
pub fn case_names(assets: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(assets.join("reference/index.json")).expect("index.json");
    let j: serde_json::Value = serde_json::from_str(&text).expect("index.json is JSON");
    j["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_string())
        .collect()
}

/// ‖a − b‖₂ / ‖b‖₂ over f32 data.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_f64_vec().expect("numeric");
    let b = b.to_f64_vec().expect("numeric");
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Argmax along the last axis for each row.
pub fn argmax_rows(t: &Tensor) -> Vec<usize> {
    let v = t.to_f32_vec().expect("numeric");
    let last = *t.shape().last().unwrap_or(&1);
    v.chunks(last.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(0, |best, (i, x)| if *x > row[best] { i } else { best })
        })
        .collect()
}

/// Inputs as named values.
pub fn named(inputs: &[(String, Tensor)]) -> Vec<(&str, Value)> {
    inputs
        .iter()
        .map(|(n, t)| (n.as_str(), Value::Tensor(t.clone())))
        .collect()
}
