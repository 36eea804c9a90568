//! Information measures of routing tables: counts of assignments `counts[row][expert]`, rows
//! being domains, documents, or domains given one current token.

/// Entropy (nats) of a distribution given by non-negative weights.
pub fn entropy(weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    -weights
        .iter()
        .filter(|&&w| w > 0.0)
        .map(|w| (w / total) * (w / total).ln())
        .sum::<f64>()
}

/// Row and column sums of a count table.
fn marginals(counts: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let rows = counts.iter().map(|r| r.iter().sum()).collect();
    let n_cols = counts.first().map_or(0, Vec::len);
    let cols = (0..n_cols)
        .map(|e| counts.iter().map(|r| r[e]).sum())
        .collect();
    (rows, cols)
}

/// Mutual information (nats) between row and column of a count table.
pub fn mutual_information(counts: &[Vec<f64>]) -> f64 {
    let (rows, cols) = marginals(counts);
    let total: f64 = rows.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let mut mi = 0.0;
    for (d, row) in counts.iter().enumerate() {
        for (e, &c) in row.iter().enumerate() {
            if c > 0.0 {
                mi += c / total * (c * total / (rows[d] * cols[e])).ln();
            }
        }
    }
    mi.max(0.0)
}

/// Normalised mutual information `2 I(D;E) / (H(D) + H(E))`, in [0, 1].
pub fn normalized_mutual_information(counts: &[Vec<f64>]) -> f64 {
    let (rows, cols) = marginals(counts);
    let h = entropy(&rows) + entropy(&cols);
    if h <= 0.0 {
        0.0
    } else {
        (2.0 * mutual_information(counts) / h).clamp(0.0, 1.0)
    }
}

/// The highest normalised mutual information a router can reach when every token takes `k`
/// distinct experts of `n_experts`, for domains with the given sizes.
///
/// Each token's k picks leave at least ln k of expert entropy within a domain, so
/// `I(D;E) <= min(H(D), ln(E / k))`, reached when each domain has k experts of its own used
/// evenly (or the experts are split as evenly as they allow); then `H(E) = I + ln k`. With 4
/// equal domains, 8 experts and k = 2 the maximum is 0.8, not 1.
pub fn reachable_nmi(domain_sizes: &[f64], n_experts: usize, k: f64) -> f64 {
    let h_d = entropy(domain_sizes);
    let k = k.max(1.0);
    let i_max = h_d.min((n_experts as f64 / k).ln().max(0.0));
    let h = h_d + i_max + k.ln();
    if h <= 0.0 { 0.0 } else { 2.0 * i_max / h }
}

/// The conditional mutual information `I(D;E|X) = sum_x p(x) I(D;E | X = x)` (nats) from one
/// count table per value x of the condition (the current token).
pub fn conditional_mutual_information<'a>(tables: impl Iterator<Item = &'a [Vec<f64>]>) -> f64 {
    let (mut weighted, mut total) = (0.0, 0.0);
    for table in tables {
        let n: f64 = table.iter().flatten().sum();
        weighted += n * mutual_information(table);
        total += n;
    }
    if total > 0.0 { weighted / total } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmi_is_zero_for_independence_and_one_for_a_bijection() {
        let independent = vec![vec![10.0, 20.0], vec![5.0, 10.0]];
        assert!(normalized_mutual_information(&independent).abs() < 1e-12);
        let bijection = vec![
            vec![7.0, 0.0, 0.0],
            vec![0.0, 3.0, 0.0],
            vec![0.0, 0.0, 5.0],
        ];
        assert!((normalized_mutual_information(&bijection) - 1.0).abs() < 1e-12);
        // Hand-computed: p = [[.4, .1], [.1, .4]] -> I = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.19274,
        // H(D) = H(E) = ln 2 -> NMI = 0.19274 / ln 2 = 0.27807.
        let partial = vec![vec![4.0, 1.0], vec![1.0, 4.0]];
        assert!((normalized_mutual_information(&partial) - 0.278072).abs() < 1e-5);
        assert!((mutual_information(&partial) - 0.192745).abs() < 1e-5);
    }

    #[test]
    fn the_reachable_maximum_is_what_k_experts_per_domain_give() {
        // 4 domains, each on 2 experts of its own out of 8, top-2: the best top-2 routing.
        let mut best = vec![vec![0.0; 8]; 4];
        for (d, row) in best.iter_mut().enumerate() {
            row[2 * d] = 50.0;
            row[2 * d + 1] = 50.0;
        }
        let max = reachable_nmi(&[100.0; 4], 8, 2.0);
        assert!((max - 0.8).abs() < 1e-12, "{max}");
        assert!((normalized_mutual_information(&best) - max).abs() < 1e-12);
        // Top-1 with an expert per domain reaches 1.
        assert!((reachable_nmi(&[1.0; 4], 8, 1.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn conditioning_on_a_token_removes_what_the_token_explains() {
        // Domain a writes only token 0, domain b only token 1, and each token has its expert:
        // routing by token separates the domains (I(D;E) = ln 2), but given the token the
        // expert says nothing more about the domain.
        let by_token = [
            vec![vec![10.0, 0.0], vec![0.0, 0.0]],
            vec![vec![0.0, 0.0], vec![0.0, 10.0]],
        ];
        let joint = vec![vec![10.0, 0.0], vec![0.0, 10.0]];
        assert!((mutual_information(&joint) - 2f64.ln()).abs() < 1e-12);
        let cmi = conditional_mutual_information(by_token.iter().map(Vec::as_slice));
        assert!(cmi.abs() < 1e-12);
        // Both domains write token 0, and the expert follows the domain: all of it stays.
        let shared = [vec![vec![10.0, 0.0], vec![0.0, 10.0]]];
        let cmi = conditional_mutual_information(shared.iter().map(Vec::as_slice));
        assert!((cmi - 2f64.ln()).abs() < 1e-12);
    }
}
