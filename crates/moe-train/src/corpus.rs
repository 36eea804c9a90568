//! The built-in multi-domain corpus, generated deterministically from a seed: program-like code,
//! arithmetic with correct results, English and Spanish sentences from small vocabularies and
//! templates written for this project. Each domain's validation text comes from its own random
//! stream, disjoint from the training text's.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The built-in domains, in order.
pub const BUILTIN_DOMAINS: [&str; 4] = ["code", "arithmetic", "english", "spanish"];

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

const NAMES: [&str; 14] = [
    "count", "total", "items", "value", "index", "result", "data", "node", "left", "right", "size",
    "key", "buf", "acc",
];
const FUNCS: [&str; 8] = [
    "sum_items",
    "find_key",
    "merge",
    "scale",
    "count_if",
    "walk",
    "reduce",
    "split_at",
];

fn code_expr(rng: &mut StdRng, vars: &[&str]) -> String {
    let a = pick(rng, vars);
    match rng.random_range(0..5) {
        0 => a.to_string(),
        1 => format!(
            "{a} {} {}",
            pick(rng, &["+", "-", "*", "//", "%"]),
            rng.random_range(1..10)
        ),
        2 => format!("{a} {} {}", pick(rng, &["+", "-", "*"]), pick(rng, vars)),
        3 => format!("len({a})"),
        _ => format!("{}({a})", pick(rng, &FUNCS)),
    }
}

fn code_doc(rng: &mut StdRng) -> String {
    let name = pick(rng, &FUNCS);
    let args: Vec<&str> = (0..rng.random_range(1..4))
        .map(|_| pick(rng, &NAMES))
        .collect();
    let mut vars = args.clone();
    let mut out = format!("def {name}({}):\n", args.join(", "));
    for _ in 0..rng.random_range(2..6) {
        let v = pick(rng, &NAMES);
        match rng.random_range(0..4) {
            0 => {
                out += &format!("    {v} = {}\n", code_expr(rng, &vars));
                vars.push(v);
            }
            1 => {
                let it = pick(rng, &vars);
                out += &format!(
                    "    for {v} in {it}:\n        {} += {v}\n",
                    pick(rng, &vars)
                );
            }
            2 => {
                out += &format!(
                    "    if {} {} {}:\n        {v} = {}\n",
                    pick(rng, &vars),
                    pick(rng, &["<", ">", "==", "!="]),
                    rng.random_range(0..100),
                    code_expr(rng, &vars)
                );
                vars.push(v);
            }
            _ => {
                out += &format!(
                    "    while {} > 0:\n        {} -= 1\n",
                    pick(rng, &vars),
                    pick(rng, &vars)
                )
            }
        }
    }
    out + &format!("    return {}\n", code_expr(rng, &vars))
}

fn arithmetic_line(rng: &mut StdRng) -> String {
    let (a, b, c) = (
        rng.random_range(0..100i64),
        rng.random_range(1..100i64),
        rng.random_range(1..20i64),
    );
    match rng.random_range(0..6) {
        0 => format!("{a} + {b} = {}", a + b),
        1 => format!("{a} - {b} = {}", a - b),
        2 => format!("{c} * {b} = {}", c * b),
        3 => format!("{} / {c} = {b}", b * c),
        4 => format!("({a} + {b}) * {c} = {}", (a + b) * c),
        _ => format!("{a} * {c} - {b} = {}", a * c - b),
    }
}

fn arithmetic_doc(rng: &mut StdRng) -> String {
    (0..rng.random_range(3..9))
        .map(|_| arithmetic_line(rng) + "\n")
        .collect()
}

/// Words of one language's templates.
struct Lexicon {
    subjects: &'static [&'static str],
    verbs: &'static [&'static str],
    objects: &'static [&'static str],
    places: &'static [&'static str],
    links: &'static [&'static str],
    question: fn(&str, &str, &str) -> String,
}

const ENGLISH: Lexicon = Lexicon {
    subjects: &[
        "the old man",
        "a small dog",
        "my sister",
        "the teacher",
        "our neighbour",
        "the children",
        "a tired farmer",
        "the young doctor",
    ],
    verbs: &[
        "reads", "finds", "carries", "watches", "paints", "likes", "opens", "cleans",
    ],
    objects: &[
        "a red book",
        "the garden",
        "an apple",
        "the river",
        "a long letter",
        "the window",
        "a wooden box",
        "the old bridge",
    ],
    places: &[
        "in the morning",
        "near the station",
        "every day",
        "after school",
        "with great care",
        "before dinner",
        "in the rain",
    ],
    links: &["Then", "Later", "Every week", "Sometimes", "After that"],
    question: |s, v, o| format!("Why does {s} {} {o}?", v.trim_end_matches('s')),
};

const SPANISH: Lexicon = Lexicon {
    subjects: &[
        "el viejo",
        "un perro pequeño",
        "mi hermana",
        "la maestra",
        "nuestro vecino",
        "los niños",
        "un granjero cansado",
        "la joven doctora",
    ],
    verbs: &[
        "lee",
        "encuentra",
        "lleva",
        "mira",
        "pinta",
        "quiere",
        "abre",
        "limpia",
    ],
    objects: &[
        "un libro rojo",
        "el jardín",
        "una manzana",
        "el río",
        "una carta larga",
        "la ventana",
        "una caja de madera",
        "el puente viejo",
    ],
    places: &[
        "por la mañana",
        "cerca de la estación",
        "todos los días",
        "después de la escuela",
        "con mucho cuidado",
        "antes de la cena",
        "bajo la lluvia",
    ],
    links: &["Luego", "Más tarde", "Cada semana", "A veces", "Después"],
    question: |s, v, o| format!("¿Por qué {s} {v} {o}?"),
};

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map_or_else(String::new, |f| {
        f.to_uppercase().collect::<String>() + c.as_str()
    })
}

fn prose_doc(rng: &mut StdRng, lex: &Lexicon) -> String {
    let mut sentences = Vec::new();
    for i in 0..rng.random_range(3..7) {
        let (s, v, o, p) = (
            pick(rng, lex.subjects),
            pick(rng, lex.verbs),
            pick(rng, lex.objects),
            pick(rng, lex.places),
        );
        sentences.push(match rng.random_range(0..4) {
            0 if i > 0 => format!("{} {s} {v} {o}.", pick(rng, lex.links)),
            1 => (lex.question)(s, v, o),
            _ => format!("{} {v} {o} {p}.", capitalise(s)),
        });
    }
    sentences.join(" ") + "\n"
}

/// One document of a built-in domain.
pub fn builtin_document(domain: usize, rng: &mut StdRng) -> String {
    match domain {
        0 => code_doc(rng),
        1 => arithmetic_doc(rng),
        2 => prose_doc(rng, &ENGLISH),
        _ => prose_doc(rng, &SPANISH),
    }
}

/// At least `bytes` bytes of documents of a built-in domain, from its own seeded stream.
/// `split` 0 is training text, 1 validation.
pub fn builtin_text(domain: usize, split: u64, seed: u64, bytes: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(
        seed ^ (domain as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (split << 40),
    );
    let mut docs = Vec::new();
    let mut total = 0;
    while total < bytes {
        let doc = builtin_document(domain, &mut rng);
        total += doc.len();
        docs.push(doc);
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_in_its_seed() {
        for d in 0..4 {
            assert_eq!(builtin_text(d, 0, 42, 2000), builtin_text(d, 0, 42, 2000));
            assert_ne!(builtin_text(d, 0, 42, 2000), builtin_text(d, 0, 43, 2000));
            assert_ne!(
                builtin_text(d, 0, 42, 2000),
                builtin_text(d, 1, 42, 2000),
                "validation differs from training"
            );
        }
    }

    #[test]
    fn arithmetic_results_are_correct() {
        for doc in builtin_text(1, 0, 7, 5000) {
            for line in doc.lines() {
                let (lhs, rhs) = line.split_once(" = ").unwrap();
                assert_eq!(eval(lhs), rhs.parse::<i64>().unwrap(), "{line}");
            }
        }
    }

    /// Evaluates the generator's expressions: `a op b`, `(a + b) * c`, `a * c - b`.
    fn eval(expr: &str) -> i64 {
        let t: Vec<&str> = expr.split(' ').collect();
        let num = |s: &str| {
            s.trim_matches(|c| c == '(' || c == ')')
                .parse::<i64>()
                .unwrap()
        };
        let apply = |a: i64, op: &str, b: i64| match op {
            "+" => a + b,
            "-" => a - b,
            "*" => a * b,
            "/" => a / b,
            _ => panic!("{op}"),
        };
        match t.len() {
            3 => apply(num(t[0]), t[1], num(t[2])),
            // Both 5-token forms, `(a + b) * c` and `a * c - b`, evaluate left to right.
            5 => apply(apply(num(t[0]), t[1], num(t[2])), t[3], num(t[4])),
            _ => panic!("{expr}"),
        }
    }

    #[test]
    fn domains_differ_in_kind() {
        let sample = |d| builtin_text(d, 0, 1, 3000).concat();
        assert!(sample(0).contains("def ") && sample(0).contains("return"));
        assert!(sample(1).contains(" = ") && !sample(1).contains("def "));
        assert!(sample(2).contains("the ") && !sample(2).contains("¿"));
        assert!(sample(3).contains("el ") || sample(3).contains("la "));
    }
}
