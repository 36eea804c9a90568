"""Means with 95% Student's t intervals, and a verdict against a target, for the scripts in this
directory (seeds in routing_summary.py, rounds of a peer comparison in peer_decode.py and
peer_moe_layer.py). Imported, not run."""

import math
import statistics

# Two-sided 95% quantiles of Student's t, by degrees of freedom (as crates/moe-train/src/interval.rs).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
       2.052, 2.048, 2.045, 2.042]


def interval(xs):
    """(mean, half-width of its 95% interval); the half-width is NaN for fewer than 2 values."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, float("nan")
    t = T95[len(xs) - 2] if len(xs) - 1 <= len(T95) else 1.96
    return mean, t * statistics.stdev(xs) / math.sqrt(len(xs))


def verdict(xs, target):
    """'met' where the whole interval of the mean of xs lies at or above target, 'not met' where
    it lies below, else 'undecided' (also for a single value, which has no interval)."""
    mean, half = interval(xs)
    if math.isnan(half):
        return "undecided"
    if mean - half >= target:
        return "met"
    return "not met" if mean + half < target else "undecided"


def summary(xs, target=None):
    """'mean ± half (min-max, n)', and the verdict against target when one is given."""
    mean, half = interval(xs)
    text = f"{mean:.2f} ± {half:.2f} ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)})"
    return text if target is None else f"{text}: {verdict(xs, target)} (target {target})"
