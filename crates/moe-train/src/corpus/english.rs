//! English for the prose world: invented words with English endings and fact templates.

use rand::Rng;
use rand::rngs::StdRng;

use super::lexicon::Phonology;
use super::prose::{self, Language, Person, ProseWorld, capitalised};

/// English.
pub const ENGLISH: Language = Language {
    phonology: Phonology {
        onsets: &[
            "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr",
            "h", "j", "k", "l", "m", "n", "p", "pl", "pr", "r", "s", "sh", "sl", "sn", "st", "str",
            "t", "th", "tr", "v", "w", "wh", "y", "",
        ],
        vowels: &["a", "e", "i", "o", "u", "ea", "ee", "oo", "ai", "ou", "ow"],
        codas: &[
            "", "n", "r", "l", "st", "nd", "ck", "ng", "t", "m", "sh", "th", "ll", "ss", "rk",
        ],
    },
    noun: |_, w| w,
    verb: |_, w| w,
    adjective: |rng, w| match rng.random_range(0..6) {
        0 => w + "y",
        1 => w + "ful",
        2 => w + "ish",
        _ => w,
    },
    given: capitalised,
    fact_templates: 9,
    fact,
    narrative,
};

fn fact(w: &ProseWorld, p: &Person, t: usize) -> String {
    let (name, town, job) = (&p.name, w.towns.get(p.town), w.jobs.get(p.job));
    match t {
        0 => format!("{name} lives in {town}."),
        1 => format!("{name} works as a {job} in {town}."),
        2 => format!("{name} is {} years old.", p.age),
        3 => format!("{name} is a friend of {}.", w.people[p.friend].name),
        4 => format!("{name} keeps a {} at home.", w.nouns.get(p.pet)),
        5 => format!("The {job} from {town} is called {name}."),
        6 => format!("{name}, who is {}, lives in {town}.", p.age),
        7 => format!("Everyone in {town} knows {name}, the {job}."),
        _ => format!("Why does {name} live in {town}?"),
    }
}

const PREPOSITIONS: [&str; 6] = ["near", "under", "behind", "beside", "in", "on"];
const OPENERS: [&str; 6] = [
    "Then",
    "Later",
    "After that",
    "Every day",
    "Sometimes",
    "At night",
];

fn narrative(w: &ProseWorld, rng: &mut StdRng, subject: Option<&Person>) -> String {
    let (object, adj, _) = w.noun_with(rng);
    let object = w.nouns.get(object);
    let (place, place_adj, _) = w.noun_with(rng);
    let place = w.nouns.get(place);
    let prep = PREPOSITIONS[rng.random_range(0..PREPOSITIONS.len())];
    let sentence = match subject {
        Some(p) => {
            let verb = w.verbs.zipf(rng);
            format!(
                "{} {verb}s the {adj} {object} in {}",
                p.name,
                w.towns.get(p.town)
            )
        }
        None => {
            let (noun, noun_adj, verb) = w.noun_with(rng);
            let noun = w.nouns.get(noun);
            if rng.random_bool(0.3) {
                format!("the {noun_adj} {noun}s {verb} a {object} {prep} the {place_adj} {place}")
            } else {
                format!("the {noun_adj} {noun} {verb}s the {adj} {object} {prep} the {place}")
            }
        }
    };
    prose::sentence(rng, sentence, &OPENERS)
}
