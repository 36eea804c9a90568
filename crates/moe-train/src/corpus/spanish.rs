//! Spanish for the prose world: invented words with Spanish endings, gender agreement of
//! articles and adjectives, and fact templates.

use rand::Rng;
use rand::rngs::StdRng;

use super::lexicon::Phonology;
use super::prose::{self, Language, Person, ProseWorld, capitalised};

/// Spanish.
pub const SPANISH: Language = Language {
    phonology: Phonology {
        onsets: &[
            "b", "c", "ch", "d", "f", "g", "j", "l", "ll", "m", "n", "ñ", "p", "qu", "r", "rr",
            "s", "t", "v", "z", "br", "tr", "pl", "",
        ],
        vowels: &["a", "e", "i", "o", "u", "ue", "ie", "á", "é", "ó"],
        codas: &["", "", "n", "l", "r", "s"],
    },
    noun: |rng, w| w + if rng.random_bool(0.5) { "o" } else { "a" },
    verb: |rng, w| w + ["r", "l", "nd", "t", "c", "m"][rng.random_range(0..6)],
    adjective: |rng, w| w + ["r", "l", "s", "t", "d", "n"][rng.random_range(0..6)],
    given: |rng, w| {
        let ending = if rng.random_bool(0.5) { "o" } else { "a" };
        capitalised(rng, w + ending)
    },
    fact_templates: 9,
    fact,
    narrative,
};

fn feminine(noun: &str) -> bool {
    noun.ends_with('a')
}

/// "el" or "la", and the adjective's ending, for a noun.
fn agree(noun: &str) -> (&'static str, &'static str) {
    if feminine(noun) {
        ("la", "a")
    } else {
        ("el", "o")
    }
}

fn fact(w: &ProseWorld, p: &Person, t: usize) -> String {
    let (name, town, job) = (&p.name, w.towns.get(p.town), w.jobs.get(p.job));
    let friend_ending = if p.feminine { "a" } else { "o" };
    let (job_article, _) = agree(job);
    match t {
        0 => format!("{name} vive en {town}."),
        1 => format!("{name} trabaja de {job} en {town}."),
        2 => format!("{name} tiene {} años.", p.age),
        3 => format!(
            "{name} es amig{friend_ending} de {}.",
            w.people[p.friend].name
        ),
        4 => {
            let pet = w.nouns.get(p.pet);
            let article = if feminine(pet) { "una" } else { "un" };
            format!("{name} tiene {article} {pet} en casa.")
        }
        5 => format!(
            "{} {job} de {town} se llama {name}.",
            capitalised_article(job_article)
        ),
        6 => format!("{name}, que tiene {} años, vive en {town}.", p.age),
        7 => format!("Todos en {town} conocen a {name}, {job_article} {job}."),
        _ => format!("¿Por qué vive {name} en {town}?"),
    }
}

fn capitalised_article(article: &str) -> &'static str {
    if article == "la" { "La" } else { "El" }
}

const PREPOSITIONS: [&str; 6] = ["bajo", "en", "sobre", "con", "sin", "tras"];
const OPENERS: [&str; 6] = [
    "Luego",
    "Más tarde",
    "Después",
    "Cada día",
    "A veces",
    "De noche",
];

fn narrative(w: &ProseWorld, rng: &mut StdRng, subject: Option<&Person>) -> String {
    let (object, adj, _) = w.noun_with(rng);
    let object = w.nouns.get(object);
    let (o_article, o_end) = agree(object);
    let (place, _, _) = w.noun_with(rng);
    let place = w.nouns.get(place);
    let (p_article, _) = agree(place);
    let prep = PREPOSITIONS[rng.random_range(0..PREPOSITIONS.len())];
    let sentence = match subject {
        Some(p) => format!(
            "{} {}a {o_article} {object} {adj}{o_end} en {}",
            p.name,
            w.verbs.zipf(rng),
            w.towns.get(p.town)
        ),
        None => {
            let (noun, noun_adj, verb) = w.noun_with(rng);
            let noun = w.nouns.get(noun);
            let (article, end) = agree(noun);
            if rng.random_bool(0.3) {
                let article = if feminine(noun) { "las" } else { "los" };
                format!(
                    "{article} {noun}s {noun_adj}{end}s {verb}an {o_article} {object} {prep} {p_article} {place}"
                )
            } else {
                format!(
                    "{article} {noun} {noun_adj}{end} {verb}a {o_article} {object} {adj}{o_end} {prep} {p_article} {place}"
                )
            }
        }
    };
    prose::sentence(rng, sentence, &OPENERS)
}
