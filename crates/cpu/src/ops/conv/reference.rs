//! The naive direct convolution: obviously right, slow. It is the oracle of the tests and
//! the kernel of the integer convolutions (f64 sums of integer products are exact far
//! beyond any realistic tensor size).

use super::geom::Spatial3;

/// Shapes of a convolution in 3-D canonical form.
#[derive(Debug, Clone, Copy)]
pub struct ConvDims {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub m: usize,
    /// Groups.
    pub group: usize,
}

/// `y[n, m, o] = b[m] + Σ_{c in group, k} x[n, c, o·s + k·d − p] · w[m, c, k]`, NC(D)(H)W layout.
pub fn conv_reference(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    dims: ConvDims,
    sp: &Spatial3,
) -> Vec<f64> {
    let ConvDims { n, c, m, group } = dims;
    let (cg, mg) = (c / group, m / group);
    let [kd_n, kh_n, kw_n] = sp.kernel;
    let [id_n, ih_n, iw_n] = sp.input;
    let [od_n, oh_n, ow_n] = sp.output;
    let mut y = vec![0.0; n * m * sp.out_size()];
    let mut yi = 0;
    for bn in 0..n {
        for om in 0..m {
            let g = om / mg;
            for od in 0..od_n {
                for oh in 0..oh_n {
                    for ow in 0..ow_n {
                        let mut acc = b.map_or(0.0, |b| b[om]);
                        for ic in 0..cg {
                            let cin = g * cg + ic;
                            for kd in 0..kd_n {
                                for kh in 0..kh_n {
                                    for kw in 0..kw_n {
                                        let (Some(id), Some(ih), Some(iw)) = (
                                            sp.in_coord(0, od, kd),
                                            sp.in_coord(1, oh, kh),
                                            sp.in_coord(2, ow, kw),
                                        ) else {
                                            continue;
                                        };
                                        let xv = x[(((bn * c + cin) * id_n + id) * ih_n + ih)
                                            * iw_n
                                            + iw];
                                        let wv = w[(((om * cg + ic) * kd_n + kd) * kh_n + kh)
                                            * kw_n
                                            + kw];
                                        acc += xv * wv;
                                    }
                                }
                            }
                        }
                        y[yi] = acc;
                        yi += 1;
                    }
                }
            }
        }
    }
    y
}
