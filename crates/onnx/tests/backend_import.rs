//! Imports every model of ONNX's backend test suite (when `assets/` is present) with a
//! registry that accepts any op, to check the importer itself on real files.

use std::any::Any;
use std::path::PathBuf;

use kiln_core::{BuildCtx, Op, OpRegistry, Result, Value};
use kiln_onnx::proto;
use prost::Message;

#[derive(Debug)]
struct AnyOp(String);

impl Op for AnyOp {
    fn op_type(&self) -> &str {
        &self.0
    }
    fn eval(&self, _: &[Option<&Value>]) -> Result<Vec<Value>> {
        Err(kiln_core::KilnError::kernel(&self.0, "placeholder op"))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn build_any(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(AnyOp(ctx.desc.op_type.clone())))
}

fn collect_ops(g: &proto::GraphProto, reg: &mut OpRegistry) {
    for n in &g.node {
        reg.register_in(n.domain(), n.op_type(), build_any);
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                collect_ops(sg, reg);
            }
            for sg in &a.graphs {
                collect_ops(sg, reg);
            }
        }
    }
}

/// Reads every `input_K.pb` / `output_K.pb` as the kind the model declares.
fn read_test_data(
    case: &std::path::Path,
    model: &kiln_onnx::Model,
) -> std::result::Result<(), String> {
    for set in std::fs::read_dir(case)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        if !set
            .file_name()
            .to_string_lossy()
            .starts_with("test_data_set_")
        {
            continue;
        }
        for (prefix, ios) in [("input", &model.inputs), ("output", &model.outputs)] {
            let n = (0..)
                .take_while(|k| set.path().join(format!("{prefix}_{k}.pb")).is_file())
                .count();
            if n != ios.len() {
                return Err(format!(
                    "{n} {prefix} files, the model declares {}",
                    ios.len()
                ));
            }
            for (k, io) in ios.iter().enumerate() {
                kiln_onnx::read_value_pb(
                    &set.path().join(format!("{prefix}_{k}.pb")),
                    io.fact.kind,
                )
                .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

#[test]
fn every_backend_model_imports() {
    let assets = std::env::var("KILN_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let root = assets.join("onnx-backend");
    if !root.is_dir() {
        eprintln!(
            "skipped: {} not found (cargo xtask fetch-assets)",
            root.display()
        );
        return;
    }
    let mut failures = Vec::new();
    let mut count = 0;
    for suite in ["node", "simple", "pytorch-operator", "pytorch-converted"] {
        let Ok(dir) = std::fs::read_dir(root.join(suite)) else {
            continue;
        };
        let mut cases: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        cases.sort();
        for case in cases {
            let path = case.join("model.onnx");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            count += 1;
            let m = proto::ModelProto::decode(bytes.as_slice()).expect("decodes");
            let mut reg = OpRegistry::new();
            if let Some(g) = &m.graph {
                collect_ops(g, &mut reg);
            }
            let name = format!("{suite}/{}", case.file_name().unwrap().to_string_lossy());
            match kiln_onnx::load_model(&path, &reg) {
                Ok(model) => {
                    if let Err(e) = read_test_data(&case, &model) {
                        failures.push(format!("{name}: test data: {e}"));
                    }
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
    }
    for f in &failures {
        eprintln!("{f}");
    }
    eprintln!("{count} models, {} failed to import", failures.len());
    // Known unsupported element types (float8, int4, complex, ...) fail on purpose.
    let unexpected: Vec<&String> = failures
        .iter()
        .filter(|f| !f.contains("unsupported dtype"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
}
