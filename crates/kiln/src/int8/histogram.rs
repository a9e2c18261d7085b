//! Calibrators: from the activations an FP32 model produced on calibration data to one
//! INT8 scale per tensor.
//!
//! Every tensor keeps a [`TensorStats`]: the largest absolute value seen and a histogram
//! of absolute values with [`BINS`] bins over `[0, range)`. When a batch brings a larger
//! value, the range doubles (as often as needed) and neighbouring bins merge, so earlier
//! batches need not be kept. From the statistics:
//!
//! - **min-max**: `amax` = the largest absolute value;
//! - **percentile** `p`: the upper edge of the bin where the cumulative count reaches `p` %;
//! - **entropy** (TensorRT's EntropyCalibration2): for every candidate threshold `i` bins
//!   (128..=2048), the reference distribution `P` = bins `0..i` with everything above
//!   added to the last bin, and `Q` = those `i` bins merged into 128 levels and spread back
//!   evenly over the bins that were non-zero; the threshold minimising KL(P‖Q) wins (on
//!   an exact tie the larger one: clipping that loses nothing more is not preferred).
//!   With fewer than [`MIN_ENTROPY_SAMPLES`] non-zero values the KL search is not run and
//!   the threshold is the min-max one (see that constant for why).
//!
//! Exact zeros are counted but kept out of the histogram (they quantize exactly whatever
//! the threshold). The scale stored is `amax / 127` (symmetric INT8).

use crate::int8::cache::Algorithm;

/// Histogram bins per tensor.
pub const BINS: usize = 2048;
/// INT8 levels on one side of zero (the entropy calibrator merges into this many).
const LEVELS: usize = 128;
/// The fewest non-zero values (those in the histogram) the entropy calibrator needs: one
/// per histogram bin, [`BINS`]. Below it the threshold is the largest |x| (min-max).
///
/// Why: KL(P‖Q) is estimated from the histogram, which stands for a density only when its
/// bins hold several values each. With fewer values than bins it is a list of isolated
/// samples: most of Q's levels then cover at most one non-empty bin, where Q equals P
/// whatever the threshold, and the KL sees little but the bin the clipped values are
/// added to. When everything below a threshold falls into one level (e.g. a squeeze-excite
/// gate with 24 values per image: exact zeros, exact ones and a few in between) P and Q
/// are the same single spike, the KL is exactly 0 and the smallest such threshold won,
/// clipping the gate's 1.0 to 0.21. With so few values nothing can be told apart from an
/// outlier either, so the largest value is kept: what percentile 99.99 gives too (below
/// 10 000 values its 99.99 % point is the largest value).
pub const MIN_ENTROPY_SAMPLES: u64 = BINS as u64;

/// What calibration learned about one tensor.
#[derive(Debug, Clone)]
pub struct TensorStats {
    /// Largest absolute value seen.
    pub amax: f32,
    /// Histogram upper bound (bin width = range / BINS); 0 until a non-zero value is seen.
    pub range: f32,
    /// Counts of absolute values per bin.
    pub hist: Vec<u64>,
    /// Values seen (zeros included).
    pub count: u64,
}

impl Default for TensorStats {
    fn default() -> Self {
        TensorStats {
            amax: 0.0,
            range: 0.0,
            hist: vec![0; BINS],
            count: 0,
        }
    }
}

impl TensorStats {
    /// Adds one batch of values (non-finite values are ignored).
    pub fn observe(&mut self, values: &[f32]) {
        let batch_max = values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        if batch_max > self.amax {
            self.amax = batch_max;
        }
        if batch_max > 0.0 {
            if self.range == 0.0 {
                self.range = batch_max;
            }
            while batch_max > self.range {
                // Double the range: bin pairs merge into the lower half.
                for i in 0..BINS / 2 {
                    self.hist[i] = self.hist[2 * i] + self.hist[2 * i + 1];
                }
                self.hist[BINS / 2..].iter_mut().for_each(|h| *h = 0);
                self.range *= 2.0;
            }
        }
        let scale = if self.range > 0.0 {
            BINS as f32 / self.range
        } else {
            0.0
        };
        // Exact zeros (ReLU outputs, padding) quantize exactly whatever the threshold: they
        // are left out of the histogram so their spike does not drag the entropy
        // calibrator's threshold down.
        for v in values.iter().filter(|v| v.is_finite() && **v != 0.0) {
            let b = ((v.abs() * scale) as usize).min(BINS - 1);
            self.hist[b] += 1;
        }
        self.count += values.len() as u64;
    }

    /// Width of one bin.
    fn width(&self) -> f32 {
        self.range / BINS as f32
    }

    /// The clipping threshold `amax` the algorithm picks (0 for an all-zero tensor).
    pub fn threshold(&self, algorithm: Algorithm) -> f32 {
        if self.amax == 0.0 {
            return 0.0;
        }
        match algorithm {
            Algorithm::MinMax => self.amax,
            Algorithm::Percentile(p) => self.percentile(p),
            Algorithm::Entropy => self.entropy(),
        }
    }

    /// The INT8 scale (`threshold / 127`), never zero (an all-zero tensor gets the scale
    /// of amax = 1e-6, so quantizing it gives zeros).
    pub fn scale(&self, algorithm: Algorithm) -> f32 {
        (self.threshold(algorithm).max(1e-6)) / 127.0
    }

    fn percentile(&self, p: f64) -> f32 {
        let total: u64 = self.hist.iter().sum();
        let want = (p.clamp(0.0, 100.0) / 100.0 * total as f64).ceil() as u64;
        let mut acc = 0;
        for (i, &h) in self.hist.iter().enumerate() {
            acc += h;
            if acc >= want {
                return ((i + 1) as f32 * self.width()).min(self.amax);
            }
        }
        self.amax
    }

    fn entropy(&self) -> f32 {
        // Too few values to estimate the distribution the KL compares (MIN_ENTROPY_SAMPLES).
        if self.hist.iter().sum::<u64>() < MIN_ENTROPY_SAMPLES {
            return self.amax;
        }
        // Bins beyond the last non-empty one carry no information.
        let last = self.hist.iter().rposition(|&h| h > 0).unwrap_or(0) + 1;
        if last <= LEVELS {
            return self.amax;
        }
        let mut best = (f64::INFINITY, last);
        for i in LEVELS..=last {
            let kl = kl_for_threshold(&self.hist, i);
            // `<=`: of equally good thresholds the largest, which clips least (a discrete
            // tensor, e.g. only 0.5s and 1.0s, has KL 0 both at 0.5 and at 1.0).
            if kl <= best.0 {
                best = (kl, i);
            }
        }
        (best.1 as f32 * self.width()).min(self.amax)
    }
}

/// KL(P‖Q) for clipping the histogram after `i` bins (see the module doc).
fn kl_for_threshold(hist: &[u64], i: usize) -> f64 {
    let mut p: Vec<f64> = hist[..i].iter().map(|&h| h as f64).collect();
    let outliers: u64 = hist[i..].iter().sum();
    p[i - 1] += outliers as f64;
    // Q: merge the i bins into LEVELS levels, spread each level over its non-zero bins.
    let mut q = vec![0.0f64; i];
    for level in 0..LEVELS {
        let start = level * i / LEVELS;
        let end = ((level + 1) * i / LEVELS).max(start + 1);
        let src = &hist[start..end];
        let sum: f64 = src.iter().map(|&h| h as f64).sum();
        let nonzero = src.iter().filter(|&&h| h > 0).count();
        if nonzero == 0 {
            continue;
        }
        let each = sum / nonzero as f64;
        for (j, &h) in src.iter().enumerate() {
            if h > 0 {
                q[start + j] = each;
            }
        }
    }
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    let mut kl = 0.0;
    for (&pv, &qv) in p.iter().zip(&q) {
        if pv == 0.0 {
            continue;
        }
        let (pn, qn) = (pv / sp, qv / sq);
        if qn == 0.0 {
            // P has mass where Q has none (only the outlier bin can): a large penalty.
            kl += pn * (pn / 1e-12).ln();
        } else {
            kl += pn * (pn / qn).ln();
        }
    }
    kl
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic uniform values in [0, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f32 {
            let (u, v) = (self.next().max(1e-300), self.next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        }
    }

    fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
        let mut r = Rng(seed);
        (0..n).map(|_| (r.next() as f32 * 2.0 - 1.0) * a).collect()
    }

    #[test]
    fn minmax_is_the_largest_magnitude() {
        let mut s = TensorStats::default();
        s.observe(&uniform(10_000, 2.0, 1));
        s.observe(&[-7.5, 0.1]);
        s.observe(&uniform(10_000, 1.0, 2));
        assert_eq!(s.threshold(Algorithm::MinMax), 7.5);
        assert!((s.scale(Algorithm::MinMax) - 7.5 / 127.0).abs() < 1e-9);
    }

    #[test]
    fn histogram_survives_range_growth() {
        // Batches of growing range: the merged histogram still counts everything and
        // places values in the right bins.
        let mut s = TensorStats::default();
        s.observe(&uniform(50_000, 0.5, 3));
        s.observe(&uniform(50_000, 3.0, 4));
        s.observe(&[100.0]);
        assert_eq!(s.hist.iter().sum::<u64>(), 100_001);
        assert!(s.range >= 100.0 && s.range < 200.0, "{}", s.range);
        // Half the values are below 0.5; the 50th percentile is close to 0.5 (within a bin
        // and the uniform noise).
        let p50 = s.threshold(Algorithm::Percentile(50.0));
        assert!((p50 - 0.5).abs() < 0.15, "p50 {p50}");
    }

    #[test]
    fn percentile_of_a_uniform_distribution() {
        let mut s = TensorStats::default();
        s.observe(&uniform(200_000, 1.0, 5));
        for (p, want) in [(99.0, 0.99), (90.0, 0.9), (50.0, 0.5)] {
            let t = s.threshold(Algorithm::Percentile(p));
            assert!((t - want).abs() < 0.01, "p{p}: {t} vs {want}");
        }
        assert!(s.threshold(Algorithm::Percentile(100.0)) <= 1.0);
    }

    #[test]
    fn entropy_clips_outliers_of_a_gaussian() {
        let mut r = Rng(6);
        let mut v: Vec<f32> = (0..200_000).map(|_| r.normal()).collect();
        v.extend([60.0, -55.0, 58.0]);
        let mut s = TensorStats::default();
        s.observe(&v);
        let minmax = s.threshold(Algorithm::MinMax);
        let ent = s.threshold(Algorithm::Entropy);
        assert_eq!(minmax, 60.0);
        // KL keeps the bulk of N(0, 1) (a few sigma) and clips the three outliers.
        assert!(ent > 2.0 && ent < 12.0, "entropy threshold {ent}");
        // Percentile 99.99 of N(0, 1) is about 3.9.
        let p = s.threshold(Algorithm::Percentile(99.99));
        assert!(p > 3.3 && p < 4.6, "p99.99 {p}");
    }

    #[test]
    fn entropy_keeps_a_uniform_range() {
        // Nothing to clip: every bin is equally likely, the threshold stays near the top.
        let mut s = TensorStats::default();
        s.observe(&uniform(400_000, 1.0, 7));
        let ent = s.threshold(Algorithm::Entropy);
        assert!(ent > 0.85 && ent <= 1.0, "entropy threshold {ent}");
    }

    #[test]
    fn exact_zeros_do_not_pull_the_entropy_threshold_down() {
        // Half zeros (a ReLU output) and a uniform rest: the threshold stays near the top.
        let mut v = uniform(100_000, 1.0, 8);
        v.iter_mut().for_each(|x| *x = x.max(0.0));
        let mut s = TensorStats::default();
        s.observe(&v);
        let ent = s.threshold(Algorithm::Entropy);
        assert!(ent > 0.85, "entropy threshold {ent}");
        assert_eq!(s.count, 100_000);
    }

    /// Six batches of a squeeze-excite gate (HardSigmoid over 24 channels): mostly exact
    /// zeros and exact ones, a few values in between.
    fn gate_batches(mid: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut r = Rng(seed);
        let mut v = vec![0.0f32; 88];
        v.extend((0..mid).map(|_| r.next() as f32));
        v.resize(144, 1.0);
        // Spread over the batches in a fixed shuffled order.
        for i in (1..v.len()).rev() {
            v.swap(i, (r.next() * (i + 1) as f64) as usize);
        }
        v.chunks(24).map(|c| c.to_vec()).collect()
    }

    #[test]
    fn entropy_keeps_the_range_of_a_tensor_with_few_values() {
        // PP-OCR det's `hardsigmoid_10.tmp_0` over the six calibration images: 88 zeros, one
        // 0.21, 55 ones. The KL search alone clipped it to 0.21.
        let mut s = TensorStats::default();
        for b in [vec![0.0f32; 88], vec![0.21], vec![1.0; 55]] {
            s.observe(&b);
        }
        assert_eq!(s.threshold(Algorithm::Entropy), 1.0);
        // The same kind of tensor with a few more values in between, several draws.
        for (mid, seed) in [(1, 21), (4, 22), (8, 23), (8, 24), (16, 25), (40, 26)] {
            let mut s = TensorStats::default();
            for b in gate_batches(mid, seed) {
                s.observe(&b);
            }
            let ent = s.threshold(Algorithm::Entropy);
            assert_eq!(ent, 1.0, "{mid} values in (0, 1), seed {seed}: {ent}");
        }
        // A few values spread over [0, 1]: near the largest.
        let mut s = TensorStats::default();
        let v: Vec<f32> = uniform(300, 1.0, 27).iter().map(|x| x.abs()).collect();
        s.observe(&v);
        assert_eq!(s.threshold(Algorithm::Entropy), s.amax);
    }

    #[test]
    fn entropy_still_clips_a_long_tail_just_above_the_sample_floor() {
        // MIN_ENTROPY_SAMPLES values and more of N(0, 1) with three outliers at 55..60: the
        // KL search runs and clips them, as with 200 000 values. One value fewer: min-max.
        for (n, seed) in [(MIN_ENTROPY_SAMPLES as usize, 31), (4096, 32), (20_000, 33)] {
            let mut r = Rng(seed);
            let mut v: Vec<f32> = (0..n - 3).map(|_| r.normal()).collect();
            v.extend([60.0, -55.0, 58.0]);
            let mut s = TensorStats::default();
            s.observe(&v);
            let ent = s.threshold(Algorithm::Entropy);
            assert!(
                ent > 2.0 && ent < 12.0,
                "{n} values: entropy threshold {ent}"
            );
            let mut s = TensorStats::default();
            s.observe(&v[1..]);
            let ent = s.threshold(Algorithm::Entropy);
            if n == MIN_ENTROPY_SAMPLES as usize {
                assert_eq!(ent, 60.0, "{} values", n - 1);
            } else {
                assert!(ent < 12.0, "{} values: {ent}", n - 1);
            }
        }
    }

    #[test]
    fn entropy_keeps_a_discrete_tensor_whole() {
        // Only 0.5s and 1.0s, many of them: clipping at 0.5 and keeping 1.0 both give
        // KL 0; the larger threshold is kept (the smaller one halves every 1.0).
        let mut v = vec![0.5f32; 5000];
        v.extend(vec![1.0f32; 5000]);
        let mut s = TensorStats::default();
        s.observe(&v);
        assert_eq!(s.threshold(Algorithm::Entropy), 1.0);
    }

    #[test]
    fn zeros_and_non_finite_values() {
        let mut s = TensorStats::default();
        s.observe(&[0.0; 16]);
        assert_eq!(s.threshold(Algorithm::Entropy), 0.0);
        assert!(s.scale(Algorithm::Entropy) > 0.0);
        s.observe(&[f32::NAN, f32::INFINITY, 0.5]);
        assert_eq!(s.threshold(Algorithm::MinMax), 0.5);
    }
}
