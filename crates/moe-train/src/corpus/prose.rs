//! Prose domains: a world of people and invented words, written as sentences by a
//! [`Language`] (English or Spanish, in `english.rs` and `spanish.rs`).

use std::collections::HashSet;

use rand::Rng;
use rand::rngs::StdRng;

use super::Units;
pub use super::english::ENGLISH;
use super::lexicon::{Lexicon, Phonology};
pub use super::spanish::SPANISH;

/// One person of a prose world and the facts about them.
pub struct Person {
    /// Given and family name.
    pub name: String,
    /// Whether the given name is feminine (Spanish agreement).
    pub feminine: bool,
    /// Index of their town.
    pub town: usize,
    /// Index of their job.
    pub job: usize,
    /// Age in years.
    pub age: u32,
    /// Index of their friend (another person).
    pub friend: usize,
    /// Noun index of their pet.
    pub pet: usize,
}

/// How a language names things and states facts; the world's content is language-independent.
pub struct Language {
    /// Syllables of invented content words and names.
    pub phonology: Phonology,
    /// Turns an invented word into a noun (Spanish: adds the gender ending).
    pub noun: fn(&mut StdRng, String) -> String,
    /// Turns an invented word into a verb stem.
    pub verb: fn(&mut StdRng, String) -> String,
    /// Turns an invented word into an adjective stem.
    pub adjective: fn(&mut StdRng, String) -> String,
    /// Turns an invented word into a given name; feminine when it ends in 'a'.
    pub given: fn(&mut StdRng, String) -> String,
    /// Number of fact templates [`Self::fact`] knows.
    pub fact_templates: usize,
    /// A sentence stating facts about a person with template `t`.
    pub fact: fn(&ProseWorld, &Person, usize) -> String,
    /// A sentence of prose; its subject is a person when one is given.
    pub narrative: fn(&ProseWorld, &mut StdRng, Option<&Person>) -> String,
}

/// The vocabularies and people of one prose domain.
pub struct ProseWorld {
    /// The language that writes it.
    pub lang: &'static Language,
    /// Nouns, Zipf by rank.
    pub nouns: Lexicon,
    /// Verb stems.
    pub verbs: Lexicon,
    /// Adjective stems.
    pub adjectives: Lexicon,
    /// Town names.
    pub towns: Lexicon,
    /// Job names (nouns).
    pub jobs: Lexicon,
    /// People, the first the most talked about.
    pub people: Vec<Person>,
    people_rank: Lexicon,
    /// The usual adjective and verb of each noun.
    pub collocations: Vec<(usize, usize)>,
}

/// `w` with its first letter in upper case (a shape for names).
pub fn capitalised(_: &mut StdRng, w: String) -> String {
    let mut c = w.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

impl ProseWorld {
    /// Draws a world: 4,000 nouns, 1,200 verbs and adjectives, 300 towns, 150 jobs and 2,000
    /// people.
    pub fn new(rng: &mut StdRng, lang: &'static Language) -> Self {
        let p = &lang.phonology;
        let mut taken = HashSet::new();
        let nouns = Lexicon::invent(rng, 4000, p, (1, 3), &mut taken, lang.noun);
        let verbs = Lexicon::invent(rng, 1200, p, (1, 2), &mut taken, lang.verb);
        let adjectives = Lexicon::invent(rng, 1200, p, (1, 3), &mut taken, lang.adjective);
        let jobs = Lexicon::invent(rng, 150, p, (2, 3), &mut taken, lang.noun);
        let towns = Lexicon::invent(rng, 300, p, (2, 3), &mut taken, capitalised);
        let given = Lexicon::invent(rng, 600, p, (2, 3), &mut taken, lang.given);
        let family = Lexicon::invent(rng, 1500, p, (2, 3), &mut taken, capitalised);
        let n_people = 2000;
        let mut names = HashSet::new();
        let mut people = Vec::with_capacity(n_people);
        while people.len() < n_people {
            let first = given.zipf(rng).to_string();
            let name = format!("{first} {}", family.uniform(rng));
            if !names.insert(name.clone()) {
                continue;
            }
            people.push(Person {
                name,
                feminine: first.ends_with('a'),
                town: towns.zipf_index(rng),
                job: jobs.zipf_index(rng),
                age: rng.random_range(18..90),
                friend: rng.random_range(0..n_people),
                pet: nouns.zipf_index(rng),
            });
        }
        let collocations = (0..nouns.len())
            .map(|_| (adjectives.zipf_index(rng), verbs.zipf_index(rng)))
            .collect();
        let people_rank = Lexicon::from_words(people.iter().map(|p| p.name.clone()).collect());
        Self {
            lang,
            nouns,
            verbs,
            adjectives,
            towns,
            jobs,
            people,
            people_rank,
            collocations,
        }
    }

    /// A noun index with its usual adjective and verb (three times in four) or others.
    pub fn noun_with(&self, rng: &mut StdRng) -> (usize, &str, &str) {
        let n = self.nouns.zipf_index(rng);
        let (a, v) = self.collocations[n];
        if rng.random_bool(0.75) {
            (n, self.adjectives.get(a), self.verbs.get(v))
        } else {
            (n, self.adjectives.zipf(rng), self.verbs.zipf(rng))
        }
    }

    /// A document: a few sentences about one or two people, facts and prose mixed.
    pub fn document(&self, units: &mut Units) -> String {
        let n = units.rng.random_range(3..8);
        let first = self.people_rank.zipf_index(&mut units.rng);
        let second = self.people_rank.zipf_index(&mut units.rng);
        let mut sentences = Vec::with_capacity(n);
        for i in 0..n {
            let person = &self.people[if i % 2 == 0 { first } else { second }];
            sentences.push(units.draw(|rng| {
                if rng.random_bool(0.5) {
                    (self.lang.fact)(self, person, rng.random_range(0..self.lang.fact_templates))
                } else {
                    let subject = rng.random_bool(0.4).then_some(person);
                    (self.lang.narrative)(self, rng, subject)
                }
            }));
        }
        sentences.join(" ") + "\n"
    }
}

/// A sentence from its body: after an opener ("Then, ...") three times in ten, otherwise
/// capitalised; with a full stop.
pub fn sentence(rng: &mut StdRng, body: String, openers: &[&str]) -> String {
    if rng.random_bool(0.3) {
        format!("{}, {body}.", openers[rng.random_range(0..openers.len())])
    } else {
        format!("{}.", capitalised(rng, body))
    }
}

/// The sentences of a prose document (each ends with '.' or '?').
pub fn sentences(doc: &str) -> Vec<&str> {
    doc.split_inclusive(['.', '?'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}
