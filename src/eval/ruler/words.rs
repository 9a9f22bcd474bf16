//! RULER's word lists, from the wonderwords 2.2.0 package that RULER's generators import
//! (`assets/wordlists/wonderwords-2.2.0`, MIT; see `assets/NOTICE.md`).

use std::sync::OnceLock;

const NOUNS: &str = include_str!("../../../assets/wordlists/wonderwords-2.2.0/nounlist.txt");
const ADJECTIVES: &str =
    include_str!("../../../assets/wordlists/wonderwords-2.2.0/adjectivelist.txt");
const VERBS: &str = include_str!("../../../assets/wordlists/wonderwords-2.2.0/verblist.txt");

/// A word file as wonderwords reads it: one word per line, trailing whitespace removed
/// (`_get_words_from_text_file`: `readlines()` then `rstrip()`).
fn lines(text: &'static str) -> Vec<&'static str> {
    text.lines().map(str::trim_end).collect()
}

/// niah's word keys: `sorted(set(f"{adj}-{noun}"))` over every adjective and noun
/// (`niah.py`), 6,175,260 strings. Held as (adjective, noun) index pairs sorted by the
/// joined string's code points (UTF-8 byte order is code point order), so the list
/// costs 25 MB instead of 250.
pub struct KeyWords {
    adjectives: Vec<&'static str>,
    nouns: Vec<&'static str>,
    pairs: Vec<(u16, u16)>,
}

impl KeyWords {
    /// Number of distinct keys.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none (never, with the shipped lists).
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Key number `i` in sorted order.
    pub fn get(&self, i: usize) -> String {
        let (a, n) = self.pairs[i];
        format!("{}-{}", self.adjectives[a as usize], self.nouns[n as usize])
    }

    fn joined(&self, (a, n): (u16, u16)) -> impl Iterator<Item = u8> + '_ {
        self.adjectives[a as usize]
            .bytes()
            .chain(std::iter::once(b'-'))
            .chain(self.nouns[n as usize].bytes())
    }
}

/// The niah key list, built once per process (about a second).
pub fn key_words() -> &'static KeyWords {
    static KEYS: OnceLock<KeyWords> = OnceLock::new();
    KEYS.get_or_init(|| {
        use rayon::prelude::*;
        let adjectives = lines(ADJECTIVES);
        let nouns = lines(NOUNS);
        let mut keys = KeyWords {
            pairs: Vec::new(),
            adjectives,
            nouns,
        };
        let mut pairs: Vec<(u16, u16)> = (0..keys.adjectives.len() as u16)
            .flat_map(|a| (0..keys.nouns.len() as u16).map(move |n| (a, n)))
            .collect();
        let k = &keys;
        pairs.par_sort_unstable_by(|&x, &y| k.joined(x).cmp(k.joined(y)));
        // `set()`: equal strings (a repeated adjective, or hyphens that join the same way)
        // are kept once.
        pairs.dedup_by(|x, y| k.joined(*x).eq(k.joined(*y)));
        keys.pairs = pairs;
        keys
    })
}

/// cwe's words: `sorted(set(nouns + adjs + verbs))` (`common_words_extraction.py`), before
/// RULER's seeded shuffle.
pub fn common_words() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = lines(NOUNS)
        .into_iter()
        .chain(lines(ADJECTIVES))
        .chain(lines(VERBS))
        .collect();
    words.sort_unstable();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_have_wonderwords_sizes() {
        assert_eq!(lines(NOUNS).len(), 6786);
        assert_eq!(lines(ADJECTIVES).len(), 912);
        assert_eq!(lines(VERBS).len(), 1042);
        // Counted with Python: len(sorted(set(nouns + adjs + verbs))).
        assert_eq!(common_words().len(), 8169);
    }
}
