//! `kiln run`: inputs from `.npy` files, outputs to `DIR/<name>.npy`.

use std::collections::BTreeSet;
use std::time::Instant;

use kiln::{DType, Tensor, Value};

use crate::common::{self, sanitize_name, shape_str, CliError, CliResult, Context, Globals};
use crate::RunArgs;

/// Runs `kiln run`.
pub fn run(g: &Globals, a: RunArgs) -> CliResult<()> {
    let shapes = common::merge_shapes(&a.shapes)?;
    // Read the inputs first: a bad file is reported before a long build.
    let inputs = common::read_inputs(&a.inputs)?;
    let loaded = common::load_model(g, &a.model, &shapes, &[], kiln::DeviceKind::Auto, true)?;
    let engine = loaded.engine;
    common::check_shape_names(&engine, &shapes)?;
    let mut ctx = engine.create_context();
    ctx.set_optimization_profile(a.optimization_profile)?;
    // --shapes are checked against the profile; the input files must then match them.
    for (name, shape) in &shapes {
        ctx.set_input_shape(name, shape)?;
        if let Some((_, t)) = inputs.iter().find(|(n, _)| n == name) {
            if t.shape() != shape.as_slice() {
                return Err(CliError(format!(
                    "input {name}: --shapes gives {} but the file holds {}",
                    shape_str(shape),
                    shape_str(t.shape())
                )));
            }
        }
    }
    let values: Vec<(&str, Value)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), Value::Tensor(t.clone())))
        .collect();
    let pb = common::spinner(g, "running");
    let start = Instant::now();
    let result = ctx.execute(&values);
    let elapsed = start.elapsed();
    pb.finish_and_clear();
    let outputs = result?;
    tracing::info!(ms = elapsed.as_secs_f64() * 1e3, "inference done");

    std::fs::create_dir_all(&a.output_dir)
        .context(|| format!("cannot create output directory {}", a.output_dir.display()))?;
    let mut rows = vec![vec![
        "output".to_string(),
        "dtype".into(),
        "shape".into(),
        "file".into(),
    ]];
    let mut used = BTreeSet::new();
    for (info, value) in engine.outputs().iter().zip(outputs) {
        let base = unique(sanitize_name(&info.name), &mut used);
        for (suffix, tensor) in flatten(&info.name, value)? {
            let (tensor, note) = npy_compatible(tensor)?;
            let file = a.output_dir.join(format!("{base}{suffix}.npy"));
            kiln::npy::write_npy(&file, &tensor)
                .context(|| format!("cannot write output {}", info.name))?;
            rows.push(vec![
                format!("{}{suffix}", info.name),
                format!("{}{note}", tensor.dtype()),
                shape_str(tensor.shape()),
                file.display().to_string(),
            ]);
        }
    }
    print!("{}", common::table(&rows));
    if !g.quiet {
        eprintln!("inference took {:.3} ms", elapsed.as_secs_f64() * 1e3);
    }
    Ok(())
}

/// The file name for an output, made unique when two names sanitise to the same one.
fn unique(base: String, used: &mut BTreeSet<String>) -> String {
    let mut name = base.clone();
    let mut k = 2;
    while !used.insert(name.clone()) {
        tracing::warn!("two outputs are both named {base} once sanitised; writing {base}_{k}");
        name = format!("{base}_{k}");
        k += 1;
    }
    name
}

/// The tensors of an output value with file-name suffixes: a tensor is itself; a sequence
/// gives `_0`, `_1`, ...; an empty optional gives nothing.
fn flatten(name: &str, v: Value) -> CliResult<Vec<(String, Tensor)>> {
    Ok(match v {
        Value::Tensor(t) => vec![(String::new(), t)],
        Value::Sequence(s) => s
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("_{i}"), t))
            .collect(),
        Value::Optional(None) => {
            tracing::warn!("output {name} is an empty optional: no file written");
            vec![]
        }
        Value::Optional(Some(b)) => flatten(name, *b)?,
    })
}

/// bf16 has no NumPy dtype: such outputs are written as f32.
fn npy_compatible(t: Tensor) -> CliResult<(Tensor, &'static str)> {
    if t.dtype() == DType::BF16 {
        return Ok((t.cast(DType::F32)?, " (bf16 written as f32)"));
    }
    Ok((t, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names() {
        let mut used = BTreeSet::new();
        assert_eq!(unique("a_b".into(), &mut used), "a_b");
        assert_eq!(unique("a_b".into(), &mut used), "a_b_2");
        assert_eq!(unique("a_b".into(), &mut used), "a_b_3");
    }

    #[test]
    fn flattens_values() {
        let t = Tensor::scalar(1.0f32);
        assert_eq!(flatten("o", Value::Tensor(t.clone())).unwrap().len(), 1);
        let s = flatten("o", Value::Sequence(vec![t.clone(), t.clone()])).unwrap();
        assert_eq!(
            s.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["_0", "_1"]
        );
        assert!(flatten("o", Value::Optional(None)).unwrap().is_empty());
        let (c, note) = npy_compatible(Tensor::zeros(DType::BF16, &[2])).unwrap();
        assert_eq!(c.dtype(), DType::F32);
        assert!(!note.is_empty());
    }
}
