//! Robust trend statistics over a short series of samples: the Mann–Kendall test (is there
//! a monotonic trend at all, and how sure are we) and the Theil–Sen slope (how fast,
//! unmoved by a few outliers). Both compare every pair of samples, so a window of n samples
//! costs n²/2 comparisons; windows are tens of samples.

/// Mann–Kendall trend test of `values` (in time order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    /// Σ sign(x_j − x_i) over all pairs i < j: positive for a rising series.
    pub s: i64,
    /// The normal approximation's z score, with the continuity correction and the variance
    /// corrected for ties (counts are integers: ties are common).
    pub z: f64,
    /// One-sided p-value of "rising": small when the series rises beyond chance.
    pub p_rising: f64,
}

pub fn mann_kendall(values: &[f64]) -> Trend {
    let n = values.len();
    let mut s: i64 = 0;
    for i in 0..n {
        for j in i + 1..n {
            s += match values[j].partial_cmp(&values[i]) {
                Some(std::cmp::Ordering::Greater) => 1,
                Some(std::cmp::Ordering::Less) => -1,
                _ => 0,
            };
        }
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mut ties = 0.0;
    let mut run = 1usize;
    for k in 1..=sorted.len() {
        if k < sorted.len() && sorted[k] == sorted[k - 1] {
            run += 1;
        } else {
            let t = run as f64;
            ties += t * (t - 1.0) * (2.0 * t + 5.0);
            run = 1;
        }
    }
    let nf = n as f64;
    let variance = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - ties) / 18.0;
    let z = if variance <= 0.0 {
        0.0
    } else if s > 0 {
        (s as f64 - 1.0) / variance.sqrt()
    } else if s < 0 {
        (s as f64 + 1.0) / variance.sqrt()
    } else {
        0.0
    };
    Trend {
        s,
        z,
        p_rising: upper_tail(z),
    }
}

/// P(Z > z) for a standard normal Z.
fn upper_tail(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// Theil–Sen slope: the median of the slopes between every pair of samples with distinct
/// times. `None` with fewer than two distinct times.
pub fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len().saturating_sub(1) / 2);
    for (i, &(ti, vi)) in points.iter().enumerate() {
        for &(tj, vj) in &points[i + 1..] {
            if tj != ti {
                slopes.push((vj - vi) / (tj - ti));
            }
        }
    }
    if slopes.is_empty() {
        return None;
    }
    let mid = slopes.len() / 2;
    let (_, &mut upper, _) = slopes.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    if slopes.len() % 2 == 1 {
        return Some(upper);
    }
    let lower = slopes[..mid]
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    Some((lower + upper) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_climb_is_a_significant_trend() {
        let values: Vec<f64> = (0..12).map(f64::from).collect();
        let trend = mann_kendall(&values);
        assert_eq!(trend.s, 66);
        // Var = 12·11·29/18 = 212.67; z = 65/14.58.
        assert!((trend.z - 4.457).abs() < 1e-3, "{trend:?}");
        assert!(trend.p_rising < 1e-4, "{trend:?}");
    }

    #[test]
    fn flat_and_noisy_series_are_not_trends() {
        let flat = mann_kendall(&[5.0; 20]);
        assert_eq!((flat.s, flat.z), (0, 0.0));
        assert!((flat.p_rising - 0.5).abs() < 1e-9);
        // Up and down around a level: no significant rise.
        let noisy = [3.0, 5.0, 4.0, 6.0, 3.0, 5.0, 4.0, 6.0, 3.0, 5.0, 4.0, 6.0];
        assert!(mann_kendall(&noisy).p_rising > 0.1);
        // A burst that drains: falls overall.
        let burst = [1.0, 9.0, 8.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0];
        assert!(mann_kendall(&burst).p_rising > 0.5);
    }

    #[test]
    fn ties_shrink_the_variance() {
        // Two-level step: many ties; the tie-corrected variance makes it more significant.
        let step = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let trend = mann_kendall(&step);
        assert_eq!(trend.s, 25);
        // Var = (10·9·25 − 2·5·4·15)/18 = (2250 − 600)/18 = 91.67.
        assert!(
            (trend.z - 24.0 / 91.666_f64.sqrt()).abs() < 1e-3,
            "{trend:?}"
        );
    }

    #[test]
    fn theil_sen_ignores_an_outlier() {
        let mut points: Vec<(f64, f64)> = (0..10)
            .map(|t| (f64::from(t), 2.0 * f64::from(t)))
            .collect();
        points[4].1 = 1000.0;
        assert_eq!(theil_sen(&points), Some(2.0));
        assert_eq!(theil_sen(&[(1.0, 5.0)]), None);
        assert_eq!(theil_sen(&[(0.0, 0.0), (2.0, 1.0)]), Some(0.5));
        // Three slopes (1, 4, 2): the middle one.
        assert_eq!(theil_sen(&[(0.0, 0.0), (1.0, 1.0), (2.0, 4.0)]), Some(2.0));
    }
}
