//! The built-in multi-domain corpus: generated deterministically from a seed, about as fast as it
//! can be written, with knowledge in every domain that a model has to memorise, so that extra
//! parameters have something to learn:
//! - **code**: functions calling a library of about a thousand functions, each with its own fixed
//!   keyword arguments, over a Zipf-distributed vocabulary of identifiers;
//! - **arithmetic**: multi-digit sums, two-digit products and multi-step chains with every
//!   intermediate result, and a price list of items used in sums;
//! - **english** and **spanish**: a world of people with fixed homes, jobs, ages, friends and
//!   pets stated in many paraphrases, and prose over Zipf-distributed lexicons of invented words
//!   with each language's morphology (plural and verb endings, Spanish gender agreement) and fixed
//!   collocations (each noun has its usual adjective and verb).
//!
//! The facts ([`World`]) depend only on the corpus seed, so training and validation text state
//! the same facts. The text is made of *units* (a line of code or arithmetic, a sentence of
//! prose) and every unit belongs to one split, chosen by a hash of its text ([`split_of`]): a
//! validation unit never occurs verbatim in the training text, while the facts it states do,
//! in other words.

mod arithmetic;
mod code;
mod english;
mod lexicon;
mod prose;
mod spanish;

use rand::SeedableRng;
use rand::rngs::StdRng;

pub use lexicon::Lexicon;

/// The built-in domains, in order.
pub const BUILTIN_DOMAINS: [&str; 4] = ["code", "arithmetic", "english", "spanish"];

/// Training text (split 0).
pub const TRAIN: u64 = 0;
/// Validation text (split 1).
pub const VALID: u64 = 1;

/// One in this many units is a validation unit.
const VALID_EVERY: u64 = 10;

/// The split a unit of text belongs to: [`VALID`] for about one unit in ten, chosen by a stable
/// hash (FNV-1a) of its bytes, otherwise [`TRAIN`].
pub fn split_of(unit: &str) -> u64 {
    let hash = unit.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    u64::from(hash % VALID_EVERY == 0)
}

/// A random stream that writes the units of one split only.
pub(crate) struct Units {
    /// The stream's generator.
    pub rng: StdRng,
    pub(crate) split: u64,
}

impl Units {
    /// Draws units from `make` until one belongs to this stream's split. A generator with very
    /// few distinct outputs would loop long; after 10,000 draws the last one is taken (the
    /// disjointness test would then fail, rather than the generator hang).
    pub fn draw(&mut self, mut make: impl FnMut(&mut StdRng) -> String) -> String {
        let mut unit = make(&mut self.rng);
        for _ in 0..10_000 {
            if split_of(&unit) == self.split {
                break;
            }
            unit = make(&mut self.rng);
        }
        unit
    }
}

/// The facts and vocabularies of every built-in domain, drawn from the corpus seed.
pub struct World {
    code: code::CodeWorld,
    arithmetic: arithmetic::ArithmeticWorld,
    english: prose::ProseWorld,
    spanish: prose::ProseWorld,
}

impl World {
    /// The world of corpus seed `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x005E_ED0F_C0DE);
        Self {
            code: code::CodeWorld::new(&mut rng),
            arithmetic: arithmetic::ArithmeticWorld::new(&mut rng),
            english: prose::ProseWorld::new(&mut rng, &prose::ENGLISH),
            spanish: prose::ProseWorld::new(&mut rng, &prose::SPANISH),
        }
    }

    /// One document of built-in domain `domain`, written with `units`.
    fn document(&self, domain: usize, units: &mut Units) -> String {
        match domain {
            0 => self.code.document(units),
            1 => self.arithmetic.document(units),
            2 => self.english.document(units),
            _ => self.spanish.document(units),
        }
    }

    /// At least `bytes` bytes of documents of domain `domain` in split `split` ([`TRAIN`] or
    /// [`VALID`]), from a stream of its own seeded by `seed`.
    pub fn text(&self, domain: usize, split: u64, seed: u64, bytes: usize) -> Vec<String> {
        let mut units = Units {
            rng: StdRng::seed_from_u64(
                seed ^ (domain as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (split << 40),
            ),
            split,
        };
        let mut docs = Vec::new();
        let mut total = 0;
        while total < bytes {
            let doc = self.document(domain, &mut units);
            total += doc.len();
            docs.push(doc);
        }
        docs
    }
}

/// At least `bytes` bytes of documents of a built-in domain (see [`World::text`]).
pub fn builtin_text(domain: usize, split: u64, seed: u64, bytes: usize) -> Vec<String> {
    World::new(seed).text(domain, split, seed, bytes)
}

/// The units of a document: lines for code and arithmetic, sentences for prose.
pub fn units_of(domain: usize, doc: &str) -> Vec<&str> {
    if domain < 2 {
        doc.lines().collect()
    } else {
        prose::sentences(doc)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_generator_is_deterministic_in_its_seed() {
        for d in 0..4 {
            assert_eq!(builtin_text(d, 0, 42, 2000), builtin_text(d, 0, 42, 2000));
            assert_ne!(builtin_text(d, 0, 42, 2000), builtin_text(d, 0, 43, 2000));
            assert_ne!(builtin_text(d, 0, 42, 2000), builtin_text(d, 1, 42, 2000));
        }
    }

    #[test]
    fn no_validation_unit_occurs_in_the_training_text() {
        let world = World::new(5);
        for d in 0..4 {
            let train = world.text(d, TRAIN, 5, 300_000);
            let seen: HashSet<&str> = train.iter().flat_map(|doc| units_of(d, doc)).collect();
            let valid = world.text(d, VALID, 5, 30_000);
            let units: Vec<&str> = valid.iter().flat_map(|doc| units_of(d, doc)).collect();
            assert!(units.len() > 100, "domain {d}: {} units", units.len());
            for u in &units {
                assert!(!seen.contains(u), "domain {d}: {u:?} is in both splits");
                assert_eq!(split_of(u), VALID, "domain {d}: {u:?}");
            }
        }
    }

    #[test]
    fn domains_differ_in_kind() {
        let sample = |d| builtin_text(d, 0, 1, 3000).concat();
        assert!(sample(0).contains("def ") && sample(0).contains("return"));
        assert!(sample(1).contains(" = ") && !sample(1).contains("def "));
        assert!(sample(2).contains(" lives in ") && !sample(2).contains('¿'));
        assert!(sample(3).contains(" vive en ") || sample(3).contains(" tiene "));
    }

    #[test]
    fn three_megabytes_per_domain_are_generated() {
        let world = World::new(0);
        for d in 0..4 {
            let bytes: usize = world
                .text(d, TRAIN, 0, 3_000_000)
                .iter()
                .map(String::len)
                .sum();
            assert!(bytes >= 3_000_000);
        }
    }
}
