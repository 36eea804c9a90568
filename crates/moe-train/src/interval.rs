//! Means with 95% confidence intervals over a few independent runs (seeds, random draws), from
//! Student's t distribution: with 3 runs the interval is mean ± 4.30 standard errors, so a
//! difference that shows with 3 seeds is a real one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom (the normal 1.96
/// above 30; infinite for 0, where no interval exists).
pub fn t95(df: usize) -> f64 {
    match df {
        0 => f64::INFINITY,
        1..=30 => T95[df - 1],
        _ => 1.96,
    }
}

/// A sample mean with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The mean.
    pub mean: f64,
    /// Half the width of the interval: the mean is within `mean ± half_width`.
    pub half_width: f64,
    /// Number of values.
    pub n: usize,
}

impl Interval {
    /// The mean of `values` and its 95% t interval (infinitely wide for one value; NaN mean for
    /// none).
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let half_width = if n < 2 {
            f64::INFINITY
        } else {
            t95(n - 1) * (variance(values) / n as f64).sqrt()
        };
        Self {
            mean,
            half_width,
            n,
        }
    }

    /// The interval of the difference `b - a` of two sets of runs: paired (per-run differences)
    /// when `paired` and the sizes match, otherwise Welch's interval for unequal variances.
    pub fn difference(a: &[f64], b: &[f64], paired: bool) -> Self {
        if paired && a.len() == b.len() {
            let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
            return Self::of(&d);
        }
        let (ia, ib) = (Self::of(a), Self::of(b));
        let (va, vb) = (variance(a) / a.len() as f64, variance(b) / b.len() as f64);
        let se = (va + vb).sqrt();
        // Welch-Satterthwaite degrees of freedom, rounded down.
        let df = (va + vb).powi(2)
            / (va.powi(2) / (a.len() as f64 - 1.0) + vb.powi(2) / (b.len() as f64 - 1.0));
        let df = if df.is_finite() {
            df.floor() as usize
        } else {
            0
        };
        Self {
            mean: ib.mean - ia.mean,
            half_width: if a.len() < 2 || b.len() < 2 {
                f64::INFINITY
            } else {
                t95(df.max(1)) * se
            },
            n: a.len().min(b.len()),
        }
    }

    /// Lower end.
    pub fn low(&self) -> f64 {
        self.mean - self.half_width
    }

    /// Upper end.
    pub fn high(&self) -> f64 {
        self.mean + self.half_width
    }

    /// Whether the interval lies entirely below zero.
    pub fn below_zero(&self) -> bool {
        self.high() < 0.0
    }

    /// Whether two intervals share no value.
    pub fn disjoint(&self, other: &Self) -> bool {
        self.high() < other.low() || other.high() < self.low()
    }
}

fn variance(v: &[f64]) -> f64 {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0)
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = f.precision().unwrap_or(4);
        let mean = if f.sign_plus() {
            format!("{:+.p$}", self.mean)
        } else {
            format!("{:.p$}", self.mean)
        };
        if self.half_width.is_finite() {
            write!(f, "{mean} ± {:.p$}", self.half_width)
        } else {
            write!(f, "{mean}")
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn three_values_give_the_t_interval() {
        // Mean 2, sample sd 1, se 1/sqrt(3), t(2) = 4.303.
        let i = Interval::of(&[1.0, 2.0, 3.0]);
        assert_eq!(i.mean, 2.0);
        assert!((i.half_width - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert!(Interval::of(&[5.0]).half_width.is_infinite());
        assert_eq!(format!("{:.2}", i), "2.00 ± 2.48");
        assert_eq!(format!("{:+.1}", i), "+2.0 ± 2.5");
    }

    #[test]
    fn paired_differences_remove_the_shared_run_effect() {
        // Each seed shifts both runs by the same amount: paired, the difference is exactly 0.1.
        let a = [1.0, 2.0, 3.0];
        let b = [1.1, 2.1, 3.1];
        let paired = Interval::difference(&a, &b, true);
        assert!((paired.mean - 0.1).abs() < 1e-12 && paired.half_width < 1e-9);
        assert!(paired.disjoint(&Interval::of(&[0.0, 0.0, 0.0])));
        let welch = Interval::difference(&a, &b, false);
        assert!((welch.mean - 0.1).abs() < 1e-12 && welch.half_width > 1.0);
    }

    proptest! {
        #[test]
        fn the_interval_holds_the_mean_and_shifts_with_the_data(
            values in prop::collection::vec(-100.0f64..100.0, 2..20),
            shift in -50.0f64..50.0,
        ) {
            let i = Interval::of(&values);
            prop_assert!(i.low() <= i.mean && i.mean <= i.high());
            let shifted: Vec<f64> = values.iter().map(|v| v + shift).collect();
            let j = Interval::of(&shifted);
            prop_assert!((j.mean - i.mean - shift).abs() < 1e-9);
            prop_assert!((j.half_width - i.half_width).abs() < 1e-6);
        }
    }
}
