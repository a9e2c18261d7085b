//! The timing cache (`--timing-cache FILE`): measured tactic and reformat times, keyed by
//! layer signature, valid for one device and one kiln version.
//!
//! File: JSON `{"format", "kiln_version", "device", "entries": {key: milliseconds}}`. A file
//! written on another device or by another kiln version is ignored with a warning (its
//! times do not transfer), never an error; a damaged file likewise.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_core::{Attr, Fact, Format, KilnError, Node, Result, Tactic};
use serde::{Deserialize, Serialize};

/// The file format tag.
pub const CACHE_FORMAT: &str = "kiln-timing-cache-1";

#[derive(Debug, Serialize, Deserialize)]
struct CacheFile {
    format: String,
    kiln_version: String,
    device: String,
    entries: BTreeMap<String, f64>,
}

/// Measured times by key, for one device.
#[derive(Debug, Clone, Default)]
pub struct TimingCache {
    device: String,
    entries: BTreeMap<String, f64>,
    hits: usize,
    misses: usize,
}

impl TimingCache {
    /// An empty cache for `device` (a [`crate::Fingerprint::device_key`]).
    pub fn new(device: impl Into<String>) -> TimingCache {
        TimingCache {
            device: device.into(),
            ..Default::default()
        }
    }

    /// Reads `path` for `device`. A missing file gives an empty cache; a file that is
    /// damaged, of another format, another kiln version or another device gives an empty
    /// cache and the warning to show.
    pub fn load(path: &Path, device: &str) -> (TimingCache, Option<String>) {
        let empty = TimingCache::new(device);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (empty, None),
            Err(e) => {
                return (
                    empty,
                    Some(format!(
                        "timing cache {} cannot be read ({e}); timing every tactic",
                        path.display()
                    )),
                )
            }
        };
        let file: CacheFile = match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                return (
                    empty,
                    Some(format!(
                        "timing cache {} is not a kiln timing cache ({e}); ignoring it",
                        path.display()
                    )),
                )
            }
        };
        let why = if file.format != CACHE_FORMAT {
            Some(format!(
                "its format is {:?}, expected {CACHE_FORMAT:?}",
                file.format
            ))
        } else if file.kiln_version != crate::VERSION {
            Some(format!(
                "it was written by kiln {}, this is kiln {}",
                file.kiln_version,
                crate::VERSION
            ))
        } else if file.device != device {
            Some(format!(
                "it was measured on {:?}, this device is {device:?}",
                file.device
            ))
        } else {
            None
        };
        match why {
            Some(why) => (
                empty,
                Some(format!(
                    "ignoring timing cache {}: {why}; timing every tactic and overwriting it",
                    path.display()
                )),
            ),
            None => (
                TimingCache {
                    device: device.into(),
                    entries: file.entries,
                    hits: 0,
                    misses: 0,
                },
                None,
            ),
        }
    }

    /// Writes the cache to `path` (through a temporary file, so a crash never leaves half a
    /// cache).
    pub fn save(&self, path: &Path) -> Result<()> {
        let file = CacheFile {
            format: CACHE_FORMAT.into(),
            kiln_version: crate::VERSION.into(),
            device: self.device.clone(),
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| KilnError::Other(format!("cannot encode the timing cache: {e}")))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| {
                KilnError::Other(format!("cannot write timing cache {}: {e}", path.display()))
            })
    }

    /// The cached time of `key`, counting a hit or a miss.
    pub fn get(&mut self, key: &str) -> Option<f64> {
        let v = self.entries.get(key).copied();
        if v.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        v
    }

    /// Records a measured time.
    pub fn insert(&mut self, key: String, ms: f64) {
        self.entries.insert(key, ms);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (hits, misses) since this cache was created or loaded.
    pub fn stats(&self) -> (usize, usize) {
        (self.hits, self.misses)
    }
}

/// FNV-1a, 64 bits: a stable hash (unlike std's, which is seeded per process).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn describe_input(f: Option<&Fact>, constant: bool) -> String {
    match f {
        None => "-".into(),
        Some(f) => {
            let dtype = f.dtype.map_or("?".to_string(), |d| d.to_string());
            let shape = f
                .concrete_shape()
                .map_or("?".to_string(), |s| format!("{s:?}"));
            format!("{dtype}{shape}{}", if constant { "c" } else { "" })
        }
    }
}

/// The key of one layer timed with one tactic: op, attributes (hashed, tactic attributes
/// excluded), input dtypes and shapes (constants marked), format and tactic id.
pub fn layer_key(
    node: &Node,
    inputs: &[Option<&Fact>],
    constant: &[bool],
    tactic: &Tactic,
) -> String {
    let attrs: Vec<(&String, &Attr)> = node
        .desc
        .attrs
        .iter()
        .filter(|(k, _)| {
            k.as_str() != kiln_core::tactic::TACTIC_ATTR
                && k.as_str() != kiln_core::tactic::TACTIC_TIME_ATTR
        })
        .collect();
    let attr_hash = fnv64(format!("{attrs:?}").as_bytes());
    let ins: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(i, f)| describe_input(*f, constant.get(i).copied().unwrap_or(false)))
        .collect();
    format!(
        "{}:{}:{}|a{attr_hash:016x}|{}|{}|{}",
        node.desc.domain,
        node.desc.op_type,
        node.desc.opset,
        ins.join(","),
        tactic.format,
        tactic.id
    )
}

/// The key of a reformat of a tensor with `fact` from one format to another.
pub fn reformat_key(fact: &Fact, from: Format, to: Format) -> String {
    format!(
        "reformat|{}|{from}->{to}",
        describe_input(Some(fact), false)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn round_trip_and_invalidation() {
        let p = tmp("a.json");
        let mut c = TimingCache::new("cpu:x86_64:avx2");
        c.insert("k1".into(), 1.5);
        c.insert("k2".into(), 0.25);
        c.save(&p).unwrap();

        let (mut same, warn) = TimingCache::load(&p, "cpu:x86_64:avx2");
        assert!(warn.is_none());
        assert_eq!(same.get("k1"), Some(1.5));
        assert_eq!(same.get("k3"), None);
        assert_eq!(same.stats(), (1, 1));

        let (other, warn) = TimingCache::load(&p, "cuda:NVIDIA H100");
        assert!(other.is_empty());
        let warn = warn.unwrap();
        assert!(
            warn.contains("measured on") && warn.contains("cpu:x86_64:avx2"),
            "{warn}"
        );

        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace(crate::VERSION, "0.0.0-old");
        std::fs::write(&p, text).unwrap();
        let (old, warn) = TimingCache::load(&p, "cpu:x86_64:avx2");
        assert!(old.is_empty());
        assert!(warn.unwrap().contains("0.0.0-old"));

        std::fs::write(&p, "not json").unwrap();
        let (bad, warn) = TimingCache::load(&p, "cpu:x86_64:avx2");
        assert!(bad.is_empty());
        assert!(warn.unwrap().contains("not a kiln timing cache"));

        let (missing, warn) = TimingCache::load(&tmp("none.json"), "cpu");
        assert!(missing.is_empty() && warn.is_none());
    }

    #[test]
    fn keys_separate_shapes_attributes_and_tactics() {
        use kiln_core::{DType, OpDesc};
        let mut desc = OpDesc::new("", "Conv", 11);
        desc.attrs.insert("group".into(), Attr::Int(1));
        let node = Node {
            name: "c".into(),
            desc: desc.clone(),
            op: crate::engine::registry()
                .build(&kiln_core::BuildCtx {
                    node: "c",
                    desc: &desc,
                    n_inputs: 2,
                    n_outputs: 1,
                })
                .unwrap(),
            inputs: vec![Some(0), Some(1)],
            outputs: vec![Some(2)],
            fused_from: vec![],
        };
        let x = Fact::concrete(DType::F32, &[1, 3, 8, 8]);
        let x2 = Fact::concrete(DType::F32, &[1, 3, 9, 8]);
        let w = Fact::concrete(DType::F32, &[4, 3, 3, 3]);
        let t1 = Tactic::fp32("a", 1);
        let t2 = Tactic::fp32("b", 1);
        let k = |x: &Fact, t: &Tactic, node: &Node| {
            layer_key(node, &[Some(x), Some(&w)], &[false, true], t)
        };
        let base = k(&x, &t1, &node);
        assert_eq!(base, k(&x, &t1, &node), "keys are deterministic");
        assert_ne!(base, k(&x2, &t1, &node));
        assert_ne!(base, k(&x, &t2, &node));
        let mut tuned = node.clone();
        tuned.desc.attrs.insert(
            kiln_core::tactic::TACTIC_ATTR.into(),
            Attr::String("a".into()),
        );
        assert_eq!(
            base,
            k(&x, &t1, &tuned),
            "the chosen tactic is not part of the key"
        );
        let mut other = node.clone();
        other.desc.attrs.insert("group".into(), Attr::Int(3));
        assert_ne!(base, k(&x, &t1, &other));
    }
}
