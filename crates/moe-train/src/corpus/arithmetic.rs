//! The arithmetic domain: multi-digit sums and differences, two-digit products, division with
//! remainder, multi-step chains with each intermediate result, and sums over a price list of
//! invented items (knowledge to memorise).

use std::collections::HashSet;

use rand::Rng;
use rand::rngs::StdRng;

use super::Units;
use super::lexicon::{Lexicon, Phonology};

const ITEMS: Phonology = Phonology {
    onsets: &[
        "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "gr",
    ],
    vowels: &["a", "e", "i", "o", "u", "oo"],
    codas: &["", "p", "k", "n", "sh", "x"],
};

/// The price list.
pub struct ArithmeticWorld {
    items: Lexicon,
    prices: Vec<i64>,
}

impl ArithmeticWorld {
    /// 400 items with prices from 2 to 99.
    pub fn new(rng: &mut StdRng) -> Self {
        let items = Lexicon::invent(rng, 400, &ITEMS, (1, 3), &mut HashSet::new(), |_, w| w);
        let prices = (0..items.len()).map(|_| rng.random_range(2..100)).collect();
        Self { items, prices }
    }

    /// The price of the item named `name`, if there is one.
    #[cfg(test)]
    pub fn price(&self, name: &str) -> Option<i64> {
        (0..self.items.len())
            .find(|&i| self.items.get(i) == name)
            .map(|i| self.prices[i])
    }

    /// One line: an equation whose sides are all equal.
    fn line(&self, rng: &mut StdRng) -> String {
        let mut r = |lo: i64, hi: i64| rng.random_range(lo..hi);
        match r(0, 9) {
            0 => {
                let (a, b) = (r(100, 10_000), r(100, 10_000));
                format!("{a} + {b} = {}", a + b)
            }
            1 => {
                let (a, b) = (r(100, 10_000), r(100, 10_000));
                format!("{a} - {b} = {}", a - b)
            }
            2 => {
                let (a, b) = (r(10, 100), r(2, 100));
                format!("{a} * {b} = {}", a * b)
            }
            3 => {
                let (a, b, c) = (r(10, 100), r(10, 100), r(2, 10));
                format!("({a} + {b}) * {c} = {} * {c} = {}", a + b, (a + b) * c)
            }
            4 => {
                let (a, b, c) = (r(10, 100), r(2, 10), r(10, 1000));
                format!("{a} * {b} + {c} = {} + {c} = {}", a * b, a * b + c)
            }
            5 => {
                let (a, b) = (r(100, 1000), r(2, 20));
                format!("{a} / {b} = {} r {}", a / b, a % b)
            }
            _ => self.price_line(rng),
        }
    }

    /// A line about the price list.
    fn price_line(&self, rng: &mut StdRng) -> String {
        let i = self.items.zipf_index(rng);
        let (item, price) = (self.items.get(i), self.prices[i]);
        match rng.random_range(0..3) {
            0 => format!("price of {item} is {price}"),
            1 => {
                let k = rng.random_range(2..10);
                format!("{k} {item} = {k} * {price} = {}", k * price)
            }
            _ => {
                let j = self.items.zipf_index(rng);
                let (other, other_price) = (self.items.get(j), self.prices[j]);
                format!(
                    "{item} + {other} = {price} + {other_price} = {}",
                    price + other_price
                )
            }
        }
    }

    /// A document of 3 to 9 lines.
    pub fn document(&self, units: &mut Units) -> String {
        let n = units.rng.random_range(3..10);
        (0..n)
            .map(|_| units.draw(|rng| self.line(rng)) + "\n")
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::corpus::{TRAIN, Units};

    /// Evaluates one side: numbers, item names (their price), `k item` (k times its price),
    /// `+ - * /` with the usual precedence, parentheses.
    fn eval(world: &ArithmeticWorld, side: &str) -> i64 {
        let side = side.replace('(', "( ").replace(')', " )");
        let mut tokens: Vec<String> = Vec::new();
        for t in side.split_whitespace() {
            match (t.parse::<i64>(), world.price(t)) {
                (_, Some(p)) if tokens.last().is_some_and(|l| l.parse::<i64>().is_ok()) => {
                    let k: i64 = tokens.pop().unwrap().parse().unwrap();
                    tokens.push((k * p).to_string());
                }
                (_, Some(p)) => tokens.push(p.to_string()),
                _ => tokens.push(t.to_string()),
            }
        }
        let mut pos = 0;
        expr(&tokens, &mut pos)
    }

    fn expr(t: &[String], pos: &mut usize) -> i64 {
        let mut v = term(t, pos);
        while *pos < t.len() && (t[*pos] == "+" || t[*pos] == "-") {
            let op = t[*pos].clone();
            *pos += 1;
            let rhs = term(t, pos);
            v = if op == "+" { v + rhs } else { v - rhs };
        }
        v
    }

    fn term(t: &[String], pos: &mut usize) -> i64 {
        let mut v = atom(t, pos);
        while *pos < t.len() && t[*pos] == "*" {
            *pos += 1;
            v *= atom(t, pos);
        }
        v
    }

    fn atom(t: &[String], pos: &mut usize) -> i64 {
        *pos += 1;
        if t[*pos - 1] == "(" {
            let v = expr(t, pos);
            *pos += 1;
            v
        } else {
            t[*pos - 1].parse().unwrap()
        }
    }

    #[test]
    fn every_line_is_a_true_equation() {
        let mut rng = StdRng::seed_from_u64(3);
        let world = ArithmeticWorld::new(&mut rng);
        let mut units = Units { rng, split: TRAIN };
        for _ in 0..300 {
            for line in world.document(&mut units).lines() {
                if let Some(rest) = line.strip_prefix("price of ") {
                    let (item, price) = rest.split_once(" is ").unwrap();
                    assert_eq!(world.price(item), Some(price.parse().unwrap()), "{line}");
                } else if let Some((lhs, rhs)) = line.split_once(" / ") {
                    let (b, qr) = rhs.split_once(" = ").unwrap();
                    let (q, m) = qr.split_once(" r ").unwrap();
                    let (a, b): (i64, i64) = (lhs.parse().unwrap(), b.parse().unwrap());
                    assert_eq!((a / b, a % b), (q.parse().unwrap(), m.parse().unwrap()));
                } else {
                    let sides: Vec<i64> = line.split(" = ").map(|s| eval(&world, s)).collect();
                    assert!(
                        sides.len() >= 2 && sides.windows(2).all(|w| w[0] == w[1]),
                        "{line}"
                    );
                }
            }
        }
    }
}
