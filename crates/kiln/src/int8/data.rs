//! Calibration and comparison data: batches of model inputs stored as `.npy` files.
//!
//! A data directory holds either
//!
//! - one **subdirectory per batch** (taken in name order), each holding one file per model
//!   input named `<input name>.npy` (the name with every character outside
//!   `[A-Za-z0-9._-]` replaced by `_`), or
//! - for a model with **one input**, `.npy` files directly (name order), each one batch of
//!   that input.
//!
//! Each file holds a whole batch (e.g. 6×3×48×192); all batches must have one shape.

use std::path::{Path, PathBuf};

use kiln_core::{KilnError, Result, Tensor};

use crate::npy::read_npy;

/// One batch: a file per input.
#[derive(Debug, Clone)]
pub struct BatchFiles {
    /// Short label (the subdirectory or file name).
    pub label: String,
    /// (input name, file) for every model input.
    pub files: Vec<(String, PathBuf)>,
}

impl BatchFiles {
    /// Reads the batch's tensors.
    pub fn load(&self) -> Result<Vec<(String, Tensor)>> {
        self.files
            .iter()
            .map(|(n, p)| {
                read_npy(p)
                    .map(|t| (n.clone(), t))
                    .map_err(|e| KilnError::BadInput {
                        name: n.clone(),
                        msg: format!("batch {}: {}: {e}", self.label, p.display()),
                    })
            })
            .collect()
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        KilnError::Other(format!("cannot read data directory {}: {e}", dir.display()))
    })?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// Lists the batches of a data directory for a model with these input names.
pub fn list_batches(dir: &Path, inputs: &[String]) -> Result<Vec<BatchFiles>> {
    let entries = sorted_entries(dir)?;
    let subdirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let label = |p: &Path| {
        p.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let batches: Vec<BatchFiles> = if !subdirs.is_empty() {
        subdirs
            .iter()
            .map(|d| {
                let files = inputs
                    .iter()
                    .map(|n| {
                        let p = d.join(format!("{}.npy", crate::npy::file_name_for(n)));
                        if p.is_file() {
                            Ok((n.clone(), p))
                        } else {
                            Err(KilnError::BadInput {
                                name: n.clone(),
                                msg: format!(
                                    "data batch {} has no file {} for this model input",
                                    d.display(),
                                    p.display()
                                ),
                            })
                        }
                    })
                    .collect::<Result<_>>()?;
                Ok(BatchFiles {
                    label: label(d),
                    files,
                })
            })
            .collect::<Result<_>>()?
    } else {
        let npys: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "npy"))
            .collect();
        if !npys.is_empty() && inputs.len() != 1 {
            return Err(KilnError::Other(format!(
                "data directory {} holds .npy files directly, which only works for a model with one input; this model has {} ({}): put each batch in a subdirectory with one <input>.npy per input",
                dir.display(),
                inputs.len(),
                inputs.join(", ")
            )));
        }
        npys.iter()
            .map(|p| BatchFiles {
                label: label(p),
                files: vec![(inputs[0].clone(), (*p).clone())],
            })
            .collect()
    };
    if batches.is_empty() {
        return Err(KilnError::Other(format!(
            "data directory {} has no batches (expected subdirectories with <input>.npy files, or .npy files for a one-input model)",
            dir.display()
        )));
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::write_npy;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn both_layouts() {
        let t = Tensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
        let flat = tmp("flat");
        write_npy(flat.join("b1.npy"), &t).unwrap();
        write_npy(flat.join("b0.npy"), &t).unwrap();
        let b = list_batches(&flat, &["x".into()]).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].label, "b0.npy");
        assert!(list_batches(&flat, &["x".into(), "y".into()]).is_err());
        let sub = tmp("sub");
        for batch in ["0", "1"] {
            std::fs::create_dir_all(sub.join(batch)).unwrap();
            write_npy(sub.join(batch).join("x.npy"), &t).unwrap();
            write_npy(sub.join(batch).join("a_b.npy"), &t).unwrap();
        }
        let b = list_batches(&sub, &["x".into(), "a/b".into()]).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].load().unwrap()[1].0, "a/b");
        let e = list_batches(&sub, &["x".into(), "z".into()]).unwrap_err();
        assert!(e.to_string().contains("z.npy"), "{e}");
        let empty = tmp("empty");
        assert!(list_batches(&empty, &["x".into()]).is_err());
    }
}
