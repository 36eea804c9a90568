//! Invented vocabularies: unique words built from a language's syllables, drawn by Zipf rank so
//! that a few words are frequent and most are rare (as in real text, and what makes a large
//! vocabulary cost parameters to learn).

use std::collections::HashSet;

use rand::Rng;
use rand::rngs::StdRng;

/// How a language builds syllables: onset, vowel, optional coda.
pub struct Phonology {
    /// Syllable onsets (may include "").
    pub onsets: &'static [&'static str],
    /// Vowels or vowel groups.
    pub vowels: &'static [&'static str],
    /// Syllable codas (may include "").
    pub codas: &'static [&'static str],
}

impl Phonology {
    /// A word of `syllables` syllables; only the last may take a coda.
    fn word(&self, rng: &mut StdRng, syllables: usize) -> String {
        let mut w = String::new();
        for i in 0..syllables {
            w += self.onsets[rng.random_range(0..self.onsets.len())];
            w += self.vowels[rng.random_range(0..self.vowels.len())];
            if i + 1 == syllables {
                w += self.codas[rng.random_range(0..self.codas.len())];
            }
        }
        w
    }
}

/// Zipf exponent of word frequencies (about 1 in natural language).
const ZIPF_EXPONENT: f64 = 1.05;

/// A list of distinct words with a Zipf distribution over their ranks.
pub struct Lexicon {
    words: Vec<String>,
    /// Cumulative probability of ranks `0..=i`.
    cdf: Vec<f64>,
}

impl Lexicon {
    /// `n` distinct words of `min..=max` syllables, each passed through `shape` (a suffix, a
    /// gender ending); words in `taken` are avoided and the new ones added to it.
    pub fn invent(
        rng: &mut StdRng,
        n: usize,
        phonology: &Phonology,
        (min, max): (usize, usize),
        taken: &mut HashSet<String>,
        shape: impl Fn(&mut StdRng, String) -> String,
    ) -> Self {
        let mut words = Vec::with_capacity(n);
        while words.len() < n {
            let syllables = rng.random_range(min..=max);
            let word = phonology.word(rng, syllables);
            let w = shape(rng, word);
            if w.len() > 2 && taken.insert(w.clone()) {
                words.push(w);
            }
        }
        Self::from_words(words)
    }

    /// A lexicon of the given words, the first the most frequent.
    pub fn from_words(words: Vec<String>) -> Self {
        let weights: Vec<f64> = (1..=words.len())
            .map(|r| (r as f64).powf(-ZIPF_EXPONENT))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Self { words, cdf }
    }

    /// A rank drawn from the Zipf distribution.
    pub fn zipf_index(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf
            .partition_point(|&c| c < u)
            .min(self.words.len() - 1)
    }

    /// A word drawn from the Zipf distribution.
    pub fn zipf(&self, rng: &mut StdRng) -> &str {
        &self.words[self.zipf_index(rng)]
    }

    /// A word drawn uniformly.
    pub fn uniform(&self, rng: &mut StdRng) -> &str {
        &self.words[rng.random_range(0..self.words.len())]
    }

    /// The word of rank `i`.
    pub fn get(&self, i: usize) -> &str {
        &self.words[i]
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there are no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    const TOY: Phonology = Phonology {
        onsets: &["b", "d", "k", "m", "s", "t", ""],
        vowels: &["a", "e", "i", "o", "u"],
        codas: &["", "n", "s"],
    };

    #[test]
    fn words_are_distinct_and_frequencies_fall_with_rank() {
        let mut rng = StdRng::seed_from_u64(1);
        let lex = Lexicon::invent(&mut rng, 300, &TOY, (2, 3), &mut HashSet::new(), |_, w| w);
        let distinct: HashSet<&str> = (0..lex.len()).map(|i| lex.get(i)).collect();
        assert_eq!(distinct.len(), 300);
        let mut counts = vec![0usize; lex.len()];
        for _ in 0..100_000 {
            counts[lex.zipf_index(&mut rng)] += 1;
        }
        // Rank 1 about 2^1.05 times rank 2, and the top 10 ranks hold far more than the last 100.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((1.8..2.4).contains(&ratio), "{ratio}");
        let top: usize = counts[..10].iter().sum();
        let tail: usize = counts[200..].iter().sum();
        assert!(top > 3 * tail, "{top} vs {tail}");
    }
}
