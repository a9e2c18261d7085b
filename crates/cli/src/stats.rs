//! Latency statistics for `kiln bench`.

/// Summary of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Fastest sample.
    pub min: f64,
    /// 50th percentile.
    pub median: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest sample.
    pub max: f64,
}

/// The `p`-th percentile (0..=100) of sorted samples, interpolating linearly between the
/// closest ranks (NumPy's default method).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            let frac = rank - lo as f64;
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

impl Latency {
    /// Statistics of samples in milliseconds (NaN everywhere when there are none).
    pub fn from_samples(samples: &[f64]) -> Latency {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        let mean = if s.is_empty() {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        };
        Latency {
            min: s.first().copied().unwrap_or(f64::NAN),
            median: percentile(&s, 50.0),
            mean,
            p90: percentile(&s, 90.0),
            p95: percentile(&s, 95.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// As a JSON object with the keys min, median, mean, p90, p95, p99, max.
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "min": self.min, "median": self.median, "mean": self.mean,
            "p90": self.p90, "p95": self.p95, "p99": self.p99, "max": self.max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy() {
        // np.percentile([1,2,3,4,5,6,7,8,9,10], [50, 90, 95, 99]) = 5.5, 9.1, 9.55, 9.91
        let v: Vec<f64> = (1..=10).map(|i| i as f64).collect();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(percentile(&v, 50.0), 5.5));
        assert!(close(percentile(&v, 90.0), 9.1));
        assert!(close(percentile(&v, 95.0), 9.55));
        assert!(close(percentile(&v, 99.0), 9.91));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 10.0));
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn summarises_unsorted_samples() {
        let l = Latency::from_samples(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((l.min, l.median, l.mean, l.max), (1.0, 3.0, 3.0, 5.0));
        assert!(l.p90 > l.median && l.p99 <= l.max && l.p95 <= l.p99);
        let j = l.to_json();
        for k in ["min", "median", "mean", "p90", "p95", "p99", "max"] {
            assert!(j[k].is_number(), "{k}");
        }
        assert!(Latency::from_samples(&[]).min.is_nan());
    }
}
