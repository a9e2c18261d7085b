//! The plan file: a serialised engine.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! | --- | --- |
//! | 0..8 | magic `KILNPLAN` |
//! | 8..12 | format version (u32) |
//! | 12..16 | header length H (u32) |
//! | 16..20 | CRC-32 of every byte from 24 to the end of the file |
//! | 20..24 | reserved (0) |
//! | 24..24+H | header, JSON: kiln version, fingerprint, section offsets |
//! | … | metadata (bincode): the optimised graph, build settings |
//! | … | weights, each tensor 64-byte aligned, section 64-byte aligned in the file |
//!
//! Loading maps the file and checks, in order: magic, format version, checksum,
//! fingerprint (backend, architecture, required CPU features), then decodes the metadata;
//! each failure names the field that does not match. Weights are used in place from the
//! mapping (no copy).

pub mod codec;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kiln_core::{Graph, KilnError, OpRegistry, Result};
use serde::{Deserialize, Serialize};

use crate::fingerprint::Fingerprint;
use crate::optimize::OptimizeReport;
use crate::profile::OptimizationProfile;
use bincode::Options;
use codec::{GraphReader, GraphRec, WeightWriter};

fn bincode_opts(limit: u64) -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit)
}

/// The magic bytes at the start of every plan.
pub const MAGIC: &[u8; 8] = b"KILNPLAN";
/// The plan format version this kiln writes and reads. 3: Conv weights may be stored
/// packed for the GEMM kernels (`kiln_weight_layout`), which an older kiln would misread.
/// 4: a `kiln.Conv` may read a fused residual (input 3), which an older kiln would ignore.
pub const FORMAT_VERSION: u32 = 4;
const PREFIX: usize = 24;

/// The JSON header of a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanHeader {
    /// Version of kiln that wrote the plan.
    pub kiln_version: String,
    /// Plan format version (same as the prefix field).
    pub format_version: u32,
    /// What the plan was built for.
    pub fingerprint: Fingerprint,
    /// Offset of the metadata section.
    pub metadata_offset: u64,
    /// Length of the metadata section.
    pub metadata_len: u64,
    /// Offset of the weights section (64-byte aligned).
    pub weights_offset: u64,
    /// Length of the weights section.
    pub weights_len: u64,
}

/// Everything about an engine except the weights' bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanMetadata {
    /// The optimised graph.
    pub graph: GraphRec,
    /// Input shapes the engine was specialised to (empty: dynamic).
    pub build_shapes: BTreeMap<String, Vec<usize>>,
    /// Optimization profiles (format version 2 on).
    pub profiles: Vec<OptimizationProfile>,
    /// What the optimiser did.
    pub optimize_report: OptimizeReport,
    /// Opsets of the source model.
    pub opsets: BTreeMap<String, i64>,
    /// Name of the source model file.
    pub source: String,
    /// GPU engines: precision switches and the compiled CUBIN modules.
    pub gpu: Option<GpuPlanRec>,
}

/// The GPU section of a plan.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GpuPlanRec {
    /// Precision switches the engine was built with.
    pub options: kiln_cuda::GpuOptions,
    /// CUBIN images by module name (loading never runs NVRTC).
    pub modules: kiln_cuda::ModuleImages,
}

/// The decoded contents of a plan.
pub struct LoadedPlan {
    /// The header.
    pub header: PlanHeader,
    /// The graph with ops rebuilt and weights mapped.
    pub graph: Graph,
    /// Metadata other than the graph.
    pub build_shapes: BTreeMap<String, Vec<usize>>,
    /// Optimization profiles.
    pub profiles: Vec<OptimizationProfile>,
    /// What the optimiser did at build time.
    pub optimize_report: OptimizeReport,
    /// Opsets of the source model.
    pub opsets: BTreeMap<String, i64>,
    /// Name of the source model.
    pub source: String,
    /// GPU section, for CUDA plans.
    pub gpu: Option<GpuPlanRec>,
}

/// Serialises an engine's parts into plan bytes.
#[allow(clippy::too_many_arguments)] // one argument per part of an engine
pub fn write_plan(
    graph: &Graph,
    fingerprint: &Fingerprint,
    build_shapes: &BTreeMap<String, Vec<usize>>,
    profiles: &[OptimizationProfile],
    optimize_report: &OptimizeReport,
    opsets: &BTreeMap<String, i64>,
    source: &str,
    gpu: Option<GpuPlanRec>,
) -> Result<Vec<u8>> {
    let mut weights = WeightWriter::default();
    let meta = PlanMetadata {
        graph: weights.graph(graph)?,
        build_shapes: build_shapes.clone(),
        profiles: profiles.to_vec(),
        optimize_report: optimize_report.clone(),
        opsets: opsets.clone(),
        source: source.to_string(),
        gpu,
    };
    let meta_bytes = bincode_opts(u64::MAX)
        .serialize(&meta)
        .map_err(|e| KilnError::Other(format!("cannot encode plan: {e}")))?;
    // The header holds offsets that depend on its own length: iterate until stable.
    let mut header = PlanHeader {
        kiln_version: crate::VERSION.to_string(),
        format_version: FORMAT_VERSION,
        fingerprint: fingerprint.clone(),
        metadata_offset: 0,
        metadata_len: meta_bytes.len() as u64,
        weights_offset: 0,
        weights_len: weights.data.len() as u64,
    };
    let mut header_json;
    loop {
        header_json = serde_json::to_vec(&header).map_err(|e| KilnError::Other(e.to_string()))?;
        let meta_off = (PREFIX + header_json.len()) as u64;
        let w_off = (meta_off + meta_bytes.len() as u64).div_ceil(64) * 64;
        if header.metadata_offset == meta_off && header.weights_offset == w_off {
            break;
        }
        header.metadata_offset = meta_off;
        header.weights_offset = w_off;
    }
    let mut out = Vec::with_capacity(header.weights_offset as usize + weights.data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&header_json);
    out.extend_from_slice(&meta_bytes);
    out.resize(header.weights_offset as usize, 0);
    out.extend_from_slice(&weights.data);
    let crc = crc32fast::hash(&out[PREFIX..]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads the header of plan bytes, checking magic, format version and checksum.
pub fn read_header(bytes: &[u8]) -> Result<PlanHeader> {
    if bytes.len() < PREFIX || &bytes[..8] != MAGIC {
        return Err(KilnError::InvalidPlan(
            "not a kiln plan (bad magic: the file does not start with KILNPLAN)".into(),
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(KilnError::InvalidPlan(format!(
            "plan format version {version} is not supported: this kiln ({}) reads format version {FORMAT_VERSION}; rebuild the plan",
            crate::VERSION
        )));
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let stored_crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let crc = crc32fast::hash(&bytes[PREFIX..]);
    if crc != stored_crc {
        return Err(KilnError::InvalidPlan(format!(
            "plan is damaged: checksum mismatch (stored {stored_crc:08x}, computed {crc:08x})"
        )));
    }
    let header_end = PREFIX
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            KilnError::InvalidPlan("plan is truncated: header runs past the end".into())
        })?;
    let header: PlanHeader = serde_json::from_slice(&bytes[PREFIX..header_end])
        .map_err(|e| KilnError::InvalidPlan(format!("plan header is damaged: {e}")))?;
    let in_file = |off: u64, len: u64| {
        off.checked_add(len)
            .is_some_and(|e| e <= bytes.len() as u64)
    };
    if !in_file(header.metadata_offset, header.metadata_len)
        || !in_file(header.weights_offset, header.weights_len)
    {
        return Err(KilnError::InvalidPlan(
            "plan is truncated: a section runs past the end of the file".into(),
        ));
    }
    Ok(header)
}

/// The backend a plan file was built for (`cpu`, `cuda`), read from its header only (no
/// checksum yet: [`load_plan`] checks everything).
pub fn peek_backend(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| KilnError::io(path, e))?;
    let mut prefix = [0u8; PREFIX];
    if f.read_exact(&mut prefix).is_err() || &prefix[..8] != MAGIC {
        // Let load_plan report what is wrong.
        return Ok("cpu".into());
    }
    let len = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes")) as usize;
    let mut header = vec![0u8; len.min(1 << 20)];
    if f.read_exact(&mut header).is_err() {
        return Ok("cpu".into());
    }
    Ok(serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .and_then(|v| v["fingerprint"]["backend"].as_str().map(str::to_string))
        .unwrap_or_else(|| "cpu".into()))
}

/// Loads a plan file: maps it, validates it against this machine, rebuilds the graph.
pub fn load_plan(path: &Path, registry: &OpRegistry, here: &Fingerprint) -> Result<LoadedPlan> {
    let file = std::fs::File::open(path).map_err(|e| KilnError::io(path, e))?;
    // SAFETY: the mapping is read-only; kiln never writes plan files while they are mapped,
    // and a plan modified by another process while mapped is outside the supported use
    // (documented in the runtime docs), as with every mmap-based loader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| KilnError::io(path, e))?;
    let map = Arc::new(map);
    let header = read_header(&map)?;
    if let Some(why) = header.fingerprint.incompatibility(here) {
        return Err(KilnError::InvalidPlan(format!(
            "plan is for another device: {why}"
        )));
    }
    let meta_range =
        header.metadata_offset as usize..(header.metadata_offset + header.metadata_len) as usize;
    let limit = 16 * header.metadata_len + (1 << 20);
    let meta: PlanMetadata = bincode_opts(limit)
        .deserialize(&map[meta_range])
        .map_err(|e| KilnError::InvalidPlan(format!("plan metadata cannot be decoded: {e}")))?;
    let reader = GraphReader {
        registry,
        map: map.clone(),
        weights_offset: header.weights_offset as usize,
        weights_len: header.weights_len as usize,
    };
    let graph = reader.graph(&meta.graph)?;
    Ok(LoadedPlan {
        header,
        graph,
        build_shapes: meta.build_shapes,
        profiles: meta.profiles,
        optimize_report: meta.optimize_report,
        opsets: meta.opsets,
        source: meta.source,
        gpu: meta.gpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{DType, Fact, Tensor};

    fn sample_plan() -> Vec<u8> {
        let mut g = Graph::default();
        let w = g.add_value("w", Fact::concrete(DType::F32, &[4, 8]));
        let data: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 - 3.0).collect();
        g.constants
            .insert(w, Tensor::from_vec(&[4, 8], data).unwrap());
        let s = g.add_value("s", Fact::concrete(DType::I64, &[2]));
        g.constants
            .insert(s, Tensor::from_vec(&[2], vec![7i64, -1]).unwrap());
        g.outputs = vec![w, s];
        write_plan(
            &g,
            &Fingerprint::cpu(),
            &BTreeMap::new(),
            &[],
            &OptimizeReport::default(),
            &BTreeMap::new(),
            "t.onnx",
            None,
        )
        .unwrap()
    }

    #[test]
    fn round_trip_maps_weights() {
        let bytes = sample_plan();
        let header = read_header(&bytes).unwrap();
        assert_eq!(header.weights_offset % 64, 0);
        let path = std::env::temp_dir().join(format!("kiln-plan-rt-{}.plan", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load_plan(&path, &OpRegistry::new(), &Fingerprint::cpu()).unwrap();
        let w = &loaded.graph.constants[&0];
        assert!(
            matches!(w.storage(), Some(kiln_core::Bytes::Mapped { .. })),
            "large weights are mapped"
        );
        assert_eq!(w.as_slice::<f32>().unwrap()[3], 1.5 - 3.0);
        assert_eq!(
            loaded.graph.constants[&1].to_i64_vec().unwrap(),
            vec![7, -1]
        );
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn rejects_bad_magic() {
        let mut bytes = sample_plan();
        bytes[0] = b'X';
        let e = read_header(&bytes).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
        assert!(read_header(b"short")
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }

    #[test]
    fn rejects_other_format_version() {
        let mut bytes = sample_plan();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = read_header(&bytes).unwrap_err().to_string();
        assert!(
            e.contains(&format!("format version {}", FORMAT_VERSION + 1)),
            "{e}"
        );
    }

    #[test]
    fn rejects_every_flipped_byte_after_the_prefix() {
        let bytes = sample_plan();
        for pos in (PREFIX..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 0x10;
            let e = read_header(&damaged).unwrap_err().to_string();
            assert!(e.contains("checksum"), "byte {pos}: {e}");
        }
        let mut damaged = bytes.clone();
        damaged[17] ^= 1; // the stored checksum itself
        assert!(read_header(&damaged)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }

    fn gpu_info(cublas: &str) -> kiln_cuda::GpuInfo {
        kiln_cuda::GpuInfo {
            name: "NVIDIA H200".into(),
            compute_capability: "9.0".into(),
            driver_version: "13.0".into(),
            nvrtc_version: "13.0".into(),
            cublas_version: cublas.into(),
            cudnn_version: "none".into(),
        }
    }

    fn gpu_plan(path: &Path, fp: &Fingerprint) {
        let mut g = Graph::default();
        let w = g.add_value("w", Fact::concrete(DType::F32, &[2]));
        g.constants
            .insert(w, Tensor::from_vec(&[2], vec![1.5f32, -2.0]).unwrap());
        g.outputs = vec![w];
        let mut modules = kiln_cuda::ModuleImages::new();
        modules.insert("kiln_x".into(), vec![1, 2, 3]);
        let rec = GpuPlanRec {
            options: kiln_cuda::GpuOptions {
                fp16: true,
                tf32: false,
            },
            modules,
        };
        let bytes = write_plan(
            &g,
            fp,
            &BTreeMap::new(),
            &[],
            &OptimizeReport::default(),
            &BTreeMap::new(),
            "t.onnx",
            Some(rec),
        )
        .unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// A GPU plan keeps its GPU section, and is refused, naming the field, on a machine
    /// whose libraries differ.
    #[test]
    fn gpu_plan_round_trip_and_library_mismatch() {
        let path = std::env::temp_dir().join(format!("kiln-plan-gpu-{}.plan", std::process::id()));
        let built = Fingerprint::cuda(gpu_info("13.0.0"));
        gpu_plan(&path, &built);
        assert_eq!(peek_backend(&path).unwrap(), "cuda");
        let loaded = load_plan(&path, &OpRegistry::new(), &built).unwrap();
        let gpu = loaded.gpu.expect("GPU section");
        assert!(gpu.options.fp16 && !gpu.options.tf32);
        assert_eq!(gpu.modules["kiln_x"], vec![1, 2, 3]);
        let here = Fingerprint::cuda(gpu_info("12.9.1"));
        let e = load_plan(&path, &OpRegistry::new(), &here)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cuBLAS version") && e.contains("13.0.0") && e.contains("12.9.1"),
            "{e}"
        );
        // Without a driver, loading a GPU plan says so.
        if !kiln_cuda::driver_present() {
            let e = crate::Runtime::load(&path).err().unwrap().to_string();
            assert!(e.contains("no CUDA driver found"), "{e}");
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn rejects_plan_for_another_device() {
        let bytes = sample_plan();
        let path = std::env::temp_dir().join(format!("kiln-plan-dev-{}.plan", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let mut gpu = Fingerprint::cpu();
        gpu.backend = "cuda".into();
        gpu.device = "NVIDIA H100".into();
        let e = load_plan(&path, &OpRegistry::new(), &gpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("another device") && e.contains("cpu backend"),
            "{e}"
        );
        let mut needs = Fingerprint::cpu();
        needs.cpu_features.clear();
        let plan_fp = Fingerprint {
            required_features: vec!["avx512f".into()],
            ..Fingerprint::cpu()
        };
        assert!(plan_fp.incompatibility(&needs).unwrap().contains("avx512f"));
        std::fs::remove_file(&path).ok();
    }
}
