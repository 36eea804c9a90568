//! The code domain: Python-like functions that call a library of about a thousand functions,
//! each with fixed keyword arguments (knowledge to memorise), over a Zipf vocabulary of
//! identifier parts.

use std::collections::HashSet;

use rand::Rng;
use rand::rngs::StdRng;

use super::Units;
use super::lexicon::{Lexicon, Phonology};

const ASCII: Phonology = Phonology {
    onsets: &[
        "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "st",
        "tr", "pl", "",
    ],
    vowels: &["a", "e", "i", "o", "u"],
    codas: &["", "", "n", "r", "x", "t", "m", "s"],
};

/// Common identifier parts, the most frequent ranks of the vocabulary.
const COMMON: [&str; 40] = [
    "get", "set", "load", "save", "read", "write", "parse", "find", "make", "build", "count",
    "total", "items", "value", "index", "result", "data", "node", "left", "right", "size", "key",
    "buf", "acc", "name", "path", "user", "rows", "table", "limit", "offset", "scale", "mode",
    "flag", "text", "line", "file", "cache", "queue", "batch",
];

/// A library function: its name and its keyword parameters, in order.
struct ApiFn {
    name: String,
    params: Vec<String>,
}

/// The identifier vocabulary and the library.
pub struct CodeWorld {
    parts: Lexicon,
    api: Vec<ApiFn>,
    api_rank: Lexicon,
}

impl CodeWorld {
    /// 1,500 identifier parts and 1,000 library functions of 1 to 4 parameters.
    pub fn new(rng: &mut StdRng) -> Self {
        let mut taken: HashSet<String> = COMMON.iter().map(|s| s.to_string()).collect();
        let invented = Lexicon::invent(rng, 1460, &ASCII, (1, 3), &mut taken, |_, w| w);
        let words = COMMON
            .iter()
            .map(|s| s.to_string())
            .chain((0..invented.len()).map(|i| invented.get(i).to_string()))
            .collect();
        let parts = Lexicon::from_words(words);
        let mut names = HashSet::new();
        let mut api = Vec::new();
        while api.len() < 1000 {
            let name = format!("{}_{}", parts.zipf(rng), parts.uniform(rng));
            if !names.insert(name.clone()) {
                continue;
            }
            let mut params: Vec<String> = Vec::new();
            while params.len() < rng.random_range(1..=4) {
                let p = parts.zipf(rng).to_string();
                if !params.contains(&p) {
                    params.push(p);
                }
            }
            api.push(ApiFn { name, params });
        }
        let api_rank = Lexicon::from_words(api.iter().map(|f| f.name.clone()).collect());
        Self {
            parts,
            api,
            api_rank,
        }
    }

    /// A call of a library function with its keyword arguments bound to variables or numbers.
    fn call(&self, rng: &mut StdRng, vars: &[String]) -> String {
        let f = &self.api[self.api_rank.zipf_index(rng)];
        let args: Vec<String> = f
            .params
            .iter()
            .map(|p| format!("{p}={}", operand(rng, vars)))
            .collect();
        format!("{}({})", f.name, args.join(", "))
    }

    /// A statement of the function body: one line or a block header with its line.
    fn statement(&self, units: &mut Units, vars: &mut Vec<String>) -> String {
        let v = self.parts.zipf(&mut units.rng).to_string();
        let line = match units.rng.random_range(0..4) {
            0 => units.draw(|rng| format!("    {v} = {}", self.call(rng, vars))),
            1 => {
                let head = units.draw(|rng| format!("    for {v} in {}:", self.call(rng, vars)));
                let body = units.draw(|rng| {
                    let acc = &vars[rng.random_range(0..vars.len())];
                    match rng.random_range(0..3) {
                        0 => format!("        {acc} += {v}"),
                        1 => format!("        {acc} += {v} * {}", rng.random_range(2..10)),
                        _ => format!(
                            "        {acc} = {}",
                            self.call(rng, &[acc.clone(), v.clone()])
                        ),
                    }
                });
                head + "\n" + &body
            }
            2 => {
                let head = units.draw(|rng| {
                    let op = ["<", ">", "==", "!="][rng.random_range(0..4)];
                    format!(
                        "    if {} {op} {}:",
                        pick(rng, vars),
                        rng.random_range(0..100)
                    )
                });
                let body = units.draw(|rng| format!("        {v} = {}", self.call(rng, vars)));
                head + "\n" + &body
            }
            _ => units.draw(|rng| {
                let op = ["+", "-", "*", "//", "%"][rng.random_range(0..5)];
                format!("    {v} = {} {op} {}", pick(rng, vars), operand(rng, vars))
            }),
        };
        vars.push(v);
        line + "\n"
    }

    /// A function definition of 2 to 6 statements.
    pub fn document(&self, units: &mut Units) -> String {
        let n_args = units.rng.random_range(1..4);
        let mut vars: Vec<String> = (0..n_args)
            .map(|_| self.parts.zipf(&mut units.rng).to_string())
            .collect();
        let mut seen = HashSet::new();
        vars.retain(|v| seen.insert(v.clone()));
        let mut out = units.draw(|rng| {
            let name = format!("{}_{}", self.parts.zipf(rng), self.parts.zipf(rng));
            format!("def {name}({}):", vars.join(", "))
        }) + "\n";
        for _ in 0..units.rng.random_range(2..7) {
            out += &self.statement(units, &mut vars);
        }
        out + &units.draw(|rng| match rng.random_range(0..3) {
            0 => format!("    return {}", pick(rng, &vars)),
            1 => format!("    return {} + {}", pick(rng, &vars), operand(rng, &vars)),
            _ => format!("    return {}", self.call(rng, &vars)),
        }) + "\n"
    }
}

fn pick<'a>(rng: &mut StdRng, vars: &'a [String]) -> &'a str {
    &vars[rng.random_range(0..vars.len())]
}

/// A variable (two times in three) or a small number.
fn operand(rng: &mut StdRng, vars: &[String]) -> String {
    if rng.random_bool(0.67) {
        pick(rng, vars).to_string()
    } else {
        rng.random_range(0..10).to_string()
    }
}
