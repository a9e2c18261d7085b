//! Conv's tactics on the CPU: which implementations exist for a given problem, their
//! stable ids, and the mapping from an id back to a [`ConvAlgo`].
//!
//! Ids: `cpu.conv.direct` (flattened planes: depthwise, or any 1-D/2-D window that fits),
//! `cpu.conv.direct.rows` (depthwise only: row by row), `cpu.conv.direct.cblock` (depthwise
//! only: vectors across blocks of 16 channels), `cpu.conv.gemm_1x1.{outer,inner}` (1×1,
//! stride 1, no padding) and `cpu.conv.im2col_gemm.t<tile elements>.{outer,inner}`
//! (everything), where `outer`/`inner` says whether threads split images × groups or each
//! GEMM, and `cpu.conv.winograd.{f23,f43}` (2-D 3×3, unit strides and dilations, enough
//! channels per group: Winograd F(2×2, 3×3) and F(4×4, 3×3)). In the `fp32/nhwc` format
//! (channels-last activations, [`super::nhwc`]): `cpu.conv.nhwc.gemm_1x1` (2-D, 1×1,
//! stride 1, no padding, one group) and `cpu.conv.nhwc.dw` (2-D depthwise).

use kiln_core::{Format, KilnError, Layout, Precision, Result, Tactic};

use super::kernel::{ConvAlgo, TILE_ELEMS};
use super::winograd::WinoTile;

/// im2col tile sizes (elements) the tuner may try, with the level from which each is timed.
const TILES: [(usize, u8); 5] = [
    (TILE_ELEMS, 1),
    (1 << 14, 2),
    (1 << 18, 2),
    (1 << 12, 4),
    (1 << 20, 4),
];

/// Facts about one Conv problem that decide which tactics apply.
#[derive(Debug, Clone, Copy)]
pub struct ConvShapeClass {
    /// One input channel per group, several groups.
    pub depthwise: bool,
    /// Output rows at least [`super::kernel::DIRECT_ROWS_MIN_WIDTH`] wide (the depthwise
    /// heuristic then prefers the row kernel).
    pub wide_rows: bool,
    /// 1×1 kernel, unit strides, no padding: the im2col matrix is the input itself.
    pub pointwise: bool,
    /// Not pointwise, and the flattened direct kernel takes it (a 1-D/2-D window whose
    /// padded planes fit: [`super::kernel::flat_fits`]).
    pub flat: bool,
    /// Images × groups: more than one lets threads split the outer loop.
    pub chunks: usize,
    /// The Winograd kernels take it ([`super::winograd::applies`]) and it has at least
    /// [`super::winograd::MIN_CHANNELS`] input and output channels per group.
    pub winograd: bool,
    /// A 2-D, ungrouped 1×1 problem the channels-last product takes.
    pub nhwc_pointwise: bool,
    /// A 2-D depthwise problem the channels-last depthwise kernel takes.
    pub nhwc_depthwise: bool,
}

/// FP32 with channels-last activations: the format of the `cpu.conv.nhwc.*` tactics.
pub const FP32_NHWC: Format = Format {
    precision: Precision::Fp32,
    layout: Layout::ChannelsLast,
};

fn nhwc(id: &str) -> Tactic {
    Tactic {
        id: id.into(),
        format: FP32_NHWC,
        min_level: 1,
    }
}

/// The tactics for a problem of this class, the heuristic's choice first.
pub fn list(class: ConvShapeClass) -> Vec<Tactic> {
    let par: &[&str] = if class.chunks > 1 {
        &["outer", "inner"]
    } else {
        &["inner"]
    };
    let mut out = Vec::new();
    // The channels-last tactics come last: the first entry is the heuristic's choice.
    let channels_last = [
        class.nhwc_depthwise.then(|| nhwc("cpu.conv.nhwc.dw")),
        class.nhwc_pointwise.then(|| nhwc("cpu.conv.nhwc.gemm_1x1")),
    ];
    if class.depthwise {
        let (flat, rows) = (
            Tactic::fp32("cpu.conv.direct", 1),
            Tactic::fp32("cpu.conv.direct.rows", 1),
        );
        if class.wide_rows {
            out.extend([rows, flat]);
        } else {
            out.extend([flat, rows]);
        }
        out.push(Tactic::fp32("cpu.conv.direct.cblock", 1));
    } else if class.flat {
        out.push(Tactic::fp32("cpu.conv.direct", 1));
    }
    if class.pointwise {
        for p in par {
            out.push(Tactic::fp32(format!("cpu.conv.gemm_1x1.{p}"), 1));
        }
        out.extend(channels_last.into_iter().flatten());
        return out;
    }
    for &(tile, level) in &TILES {
        for p in par {
            // A depthwise problem tries im2col only from level 2: it rarely wins there.
            let level = if class.depthwise { level.max(2) } else { level };
            out.push(Tactic::fp32(
                format!("cpu.conv.im2col_gemm.t{tile}.{p}"),
                level,
            ));
        }
    }
    if class.winograd {
        for t in [WinoTile::F43, WinoTile::F23] {
            out.push(Tactic::fp32(format!("cpu.conv.winograd.{}", t.name()), 1));
        }
    }
    out.extend(channels_last.into_iter().flatten());
    out
}

/// The algorithm a tactic id names.
pub fn parse(id: &str) -> Result<ConvAlgo> {
    let bad = || {
        KilnError::Other(format!(
            "unknown Conv tactic `{id}` (this kiln knows cpu.conv.direct, cpu.conv.direct.rows, cpu.conv.direct.cblock, cpu.conv.gemm_1x1.<outer|inner>, cpu.conv.im2col_gemm.t<N>.<outer|inner>, cpu.conv.winograd.<f23|f43> and cpu.conv.nhwc.<gemm_1x1|dw>); rebuild the plan with this kiln"
        ))
    };
    match id {
        "cpu.conv.direct" => return Ok(ConvAlgo::Direct),
        "cpu.conv.direct.rows" => return Ok(ConvAlgo::DirectRows),
        "cpu.conv.direct.cblock" => return Ok(ConvAlgo::DirectBlocked),
        "cpu.conv.nhwc.gemm_1x1" => return Ok(ConvAlgo::NhwcPointwise),
        "cpu.conv.nhwc.dw" => return Ok(ConvAlgo::NhwcDepthwise),
        _ => {}
    }
    if let Some(t) = id.strip_prefix("cpu.conv.winograd.") {
        return WinoTile::from_name(t)
            .map(ConvAlgo::Winograd)
            .ok_or_else(bad);
    }
    let parallel = |p: &str| match p {
        "outer" => Ok(true),
        "inner" => Ok(false),
        _ => Err(bad()),
    };
    if let Some(p) = id.strip_prefix("cpu.conv.gemm_1x1.") {
        return Ok(ConvAlgo::Im2colGemm {
            tile_elems: TILE_ELEMS,
            parallel_outer: parallel(p)?,
        });
    }
    let rest = id.strip_prefix("cpu.conv.im2col_gemm.t").ok_or_else(bad)?;
    let (tile, p) = rest.split_once('.').ok_or_else(bad)?;
    let tile_elems: usize = tile.parse().map_err(|_| bad())?;
    if tile_elems == 0 {
        return Err(bad());
    }
    Ok(ConvAlgo::Im2colGemm {
        tile_elems,
        parallel_outer: parallel(p)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_id_parses_back() {
        for depthwise in [false, true] {
            for pointwise in [false, true] {
                for (chunks, wide_rows) in [(1, false), (4, false), (1, true), (4, true)] {
                    let winograd = !depthwise && !pointwise;
                    let class = ConvShapeClass {
                        depthwise,
                        wide_rows,
                        pointwise,
                        flat: !depthwise && !pointwise && chunks == 1,
                        chunks,
                        winograd,
                        nhwc_pointwise: pointwise,
                        nhwc_depthwise: depthwise,
                    };
                    let list = list(class);
                    assert!(!list.is_empty());
                    for t in &list {
                        parse(&t.id).unwrap();
                    }
                    let wino = list
                        .iter()
                        .filter(|t| matches!(parse(&t.id), Ok(ConvAlgo::Winograd(_))))
                        .count();
                    assert_eq!(wino, if winograd { 2 } else { 0 });
                    let ids: std::collections::HashSet<_> = list.iter().map(|t| &t.id).collect();
                    assert_eq!(ids.len(), list.len(), "duplicate tactic ids");
                    // channels-last tactics are offered where they apply, and never first
                    let nhwc: Vec<_> = list
                        .iter()
                        .filter(|t| t.format == FP32_NHWC)
                        .map(|t| parse(&t.id).unwrap())
                        .collect();
                    assert_eq!(nhwc.len(), usize::from(depthwise) + usize::from(pointwise));
                    assert!(nhwc.iter().all(|a| a.is_nhwc()));
                    assert_ne!(list[0].format, FP32_NHWC);
                    if depthwise {
                        // The heuristic's choice comes first: rows for wide output rows.
                        let want = if wide_rows {
                            ConvAlgo::DirectRows
                        } else {
                            ConvAlgo::Direct
                        };
                        assert_eq!(parse(&list[0].id).unwrap(), want);
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_ids_are_errors() {
        for id in [
            "cpu.conv.winograd",
            "cpu.conv.winograd.f63",
            "cpu.conv.im2col_gemm.t0.outer",
            "cpu.conv.im2col_gemm.tx.outer",
            "cpu.conv.gemm_1x1.sideways",
            "",
        ] {
            let e = parse(id).unwrap_err().to_string();
            assert!(e.contains("unknown Conv tactic"), "{e}");
        }
    }
}
