//! e^x in arithmetic that vectorises, for the softmax of decode attention.

/// e^x for x in [-87.3, 88.3] (clamped outside), within 2 ulp of `f32::exp`: Cody-Waite
/// reduction to `x = n ln 2 + r`, |r| <= ln 2 / 2, and Cephes' degree-7 polynomial for e^r.
/// Only arithmetic and bit casts, so a loop of it vectorises inside a [`pulp::WithSimd`] body,
/// where the scalar `expf` call does not.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let n = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e_r * f32::from_bits(((n + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn exp_is_within_two_ulp_of_the_library(x in -87.3f32..88.3) {
            let want = x.exp();
            prop_assert!((exp(x) - want).abs() <= 2.0 * f32::EPSILON * want, "{x}: {} vs {want}", exp(x));
        }
    }

    #[test]
    fn exp_clamps_far_out_arguments() {
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e4) > 0.0 && exp(-1e4) < 1e-37);
        assert!(exp(1e4).is_finite());
    }
}
