//! Bit-exact ports of the two random generators that NVIDIA RULER's data scripts
//! use: CPython's `random.Random` (Modules/_randommodule.c + Lib/random.py, as of
//! CPython 3.10–3.13) and numpy's legacy `np.random.RandomState` (numpy ≥ 1.17).
//! Both are MT19937; they differ in seeding and in how draws are bounded.
//! tests/ruler_random.rs replays draws recorded by scripts/pyrandom_reference.py.

use anyhow::{bail, Result};
use std::collections::HashSet;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The MT19937 core shared by both generators (reference `genrand_int32`).
#[derive(Clone)]
struct Mt19937 {
    mt: [u32; N],
    index: usize,
}

impl Mt19937 {
    /// Reference `init_genrand(s)`.
    fn init_genrand(s: u32) -> Self {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, index: N }
    }

    /// Reference `init_by_array(key)` (CPython's `init_by_array`).
    fn init_by_array(key: &[u32]) -> Self {
        let mut g = Self::init_genrand(19_650_218);
        let mt = &mut g.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        g
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            let mt = &mut self.mt;
            let twist = |a: u32, b: u32| {
                let y = (a & UPPER_MASK) | (b & LOWER_MASK);
                (y >> 1) ^ if y & 1 == 1 { MATRIX_A } else { 0 }
            };
            for k in 0..N - M {
                mt[k] = mt[k + M] ^ twist(mt[k], mt[k + 1]);
            }
            for k in N - M..N - 1 {
                mt[k] = mt[k + M - N] ^ twist(mt[k], mt[k + 1]);
            }
            mt[N - 1] = mt[M - 1] ^ twist(mt[N - 1], mt[0]);
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// 53-bit float from two words: CPython `random_random`, numpy `legacy_double`.
    fn next_f64(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// CPython's `random.Random` (and the module-level functions after `random.seed`).
#[derive(Clone)]
pub struct PyRandom {
    mt: Mt19937,
}

impl PyRandom {
    /// `random.Random(seed)` / `random.seed(seed)` for a non-negative int:
    /// `init_by_array` over the seed's 32-bit words, least significant first
    /// (`[0]` for 0). Note this differs from numpy, which uses `init_genrand`.
    pub fn new(seed: u64) -> Self {
        let (lo, hi) = (seed as u32, (seed >> 32) as u32);
        if hi == 0 {
            Self::from_int_words(&[lo])
        } else {
            Self::from_int_words(&[lo, hi])
        }
    }

    /// Seed from an arbitrary non-negative int given as 32-bit words, least
    /// significant first, without high zero words (CPython passes abs(seed)).
    pub fn from_int_words(words: &[u32]) -> Self {
        let key: &[u32] = if words.is_empty() { &[0] } else { words };
        PyRandom {
            mt: Mt19937::init_by_array(key),
        }
    }

    /// One raw MT19937 output (`getrandbits(32)`).
    pub fn genrand_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// `random.random()`.
    pub fn random(&mut self) -> f64 {
        self.mt.next_f64()
    }

    /// `random.getrandbits(k)` for `k <= 128` (0 for k = 0, drawing nothing).
    /// One word per 32 bits, least significant first; a partial last word keeps
    /// its top `k % 32` bits (shifted right), as `_random_Random_getrandbits_impl`.
    ///
    /// # Panics
    /// If `k > 128`.
    pub fn getrandbits(&mut self, k: u32) -> u128 {
        assert!(k <= 128, "getrandbits: k = {k} > 128 not supported");
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return (self.genrand_u32() >> (32 - k)) as u128;
        }
        let mut out = 0u128;
        let mut left = k;
        let mut shift = 0;
        while left > 0 {
            let mut w = self.genrand_u32();
            if left < 32 {
                w >>= 32 - left;
            }
            out |= (w as u128) << shift;
            shift += 32;
            left = left.saturating_sub(32);
        }
        out
    }

    /// `Random._randbelow(n)` = `_randbelow_with_getrandbits`: draw
    /// `n.bit_length()` bits until below n (so n = 1 still draws, and powers of
    /// two reject about half). CPython ≥ 3.10 loops forever for n = 0; this
    /// returns 0 without drawing (like 3.9).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        self.randbelow_u128(n as u128) as u64
    }

    fn randbelow_u128(&mut self, n: u128) -> u128 {
        if n == 0 {
            return 0;
        }
        let k = 128 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.randrange(start, stop)` (step 1): `start + _randbelow(stop - start)`.
    ///
    /// # Panics
    /// If `stop <= start` (Python raises ValueError "empty range").
    pub fn randrange(&mut self, start: i64, stop: i64) -> i64 {
        let width = stop as i128 - start as i128;
        assert!(width > 0, "randrange: empty range ({start}, {stop})");
        (start as i128 + self.randbelow_u128(width as u128) as i128) as i64
    }

    /// `random.randint(a, b)` = `randrange(a, b + 1)`.
    ///
    /// # Panics
    /// If `b < a`.
    pub fn randint(&mut self, a: i64, b: i64) -> i64 {
        let width = b as i128 - a as i128 + 1;
        assert!(width > 0, "randint: empty range ({a}, {b})");
        (a as i128 + self.randbelow_u128(width as u128) as i128) as i64
    }

    /// `random.choice(seq)`: `seq[_randbelow(len(seq))]`.
    ///
    /// # Panics
    /// If `seq` is empty (Python raises IndexError).
    pub fn choice<'a, T>(&mut self, seq: &'a [T]) -> &'a T {
        assert!(!seq.is_empty(), "choice from an empty sequence");
        &seq[self.randbelow(seq.len() as u64) as usize]
    }

    /// Index drawn by `random.choice(seq)` for `len(seq) == n` (n > 0).
    pub fn choice_index(&mut self, n: usize) -> usize {
        assert!(n > 0, "choice from an empty sequence");
        self.randbelow(n as u64) as usize
    }

    /// `random.choices(population, k=k)` without weights: each pick is
    /// `population[floor(random() * n)]` (one float, two words, per pick).
    ///
    /// # Panics
    /// If `population` is empty and `k > 0` (Python raises IndexError).
    pub fn choices<T: Clone>(&mut self, population: &[T], k: usize) -> Vec<T> {
        let n = population.len() as f64;
        (0..k)
            .map(|_| population[(self.random() * n).floor() as usize].clone())
            .collect()
    }

    /// `random.shuffle(x)`: for i from len-1 down to 1, swap x[i] with
    /// x[_randbelow(i + 1)].
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            x.swap(i, j);
        }
    }

    /// `random.sample(range(n), k)`. Errors when k > n (Python: ValueError).
    ///
    /// CPython picks one of two algorithms: with `setsize = 21`, plus
    /// `4 ** ceil(log(3k, 4))` when k > 5, it uses a pool (partial Fisher–Yates
    /// on a copy, drawing `_randbelow(n - i)`) when n <= setsize, else rejection
    /// into a set (drawing `_randbelow(n)` until unseen). Both are reproduced.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Result<Vec<usize>> {
        if k > n {
            bail!("Sample larger than population or is negative (k = {k}, n = {n})");
        }
        let mut setsize: u128 = 21;
        if k > 5 {
            // math.log(x, 4) is log(x) / log(4) in doubles.
            let e = ((k as f64 * 3.0).ln() / 4f64.ln()).ceil() as u32;
            setsize = setsize.saturating_add(4u128.checked_pow(e).unwrap_or(u128::MAX));
        }
        let mut result = Vec::with_capacity(k);
        if n as u128 <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while !selected.insert(j) {
                    j = self.randbelow(n as u64) as usize;
                }
                result.push(j);
            }
        }
        Ok(result)
    }

    /// `random.sample(population, k)`: [`Self::sample_indices`] mapped onto
    /// `population`. Errors when k > len (Python: ValueError).
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Result<Vec<T>> {
        Ok(self
            .sample_indices(population.len(), k)?
            .into_iter()
            .map(|i| population[i].clone())
            .collect())
    }

    /// `str(uuid.UUID(int=random.getrandbits(128), version=4))`.
    pub fn uuid4(&mut self) -> String {
        uuid4_string(self.getrandbits(128))
    }
}

/// `str(uuid.UUID(int=bits, version=4))`: forces the RFC 4122 variant (bits
/// 62–63 of the 2nd half = 0b10) and version 4, then lowercase 8-4-4-4-12 hex.
pub fn uuid4_string(bits: u128) -> String {
    let mut v = bits;
    v &= !(0xc000u128 << 48);
    v |= 0x8000u128 << 48;
    v &= !(0xf000u128 << 64);
    v |= 4u128 << 76;
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// numpy's legacy `np.random.RandomState` (also the global `np.random.*` after
/// `np.random.seed`).
#[derive(Clone)]
pub struct NumpyRandomState {
    mt: Mt19937,
}

impl NumpyRandomState {
    /// `np.random.seed(seed)` / `RandomState(seed)` for an int in [0, 2**32):
    /// `_legacy_seeding` calls `mt19937_seed`, i.e. plain `init_genrand(seed)`
    /// (NOT `init_by_array` as CPython does; only array seeds use that).
    pub fn new(seed: u32) -> Self {
        NumpyRandomState {
            mt: Mt19937::init_genrand(seed),
        }
    }

    /// One raw MT19937 output.
    pub fn next_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// Two words, the first one high (numpy `mt19937_next64`).
    fn next_u64(&mut self) -> u64 {
        let hi = self.mt.next_u32() as u64;
        (hi << 32) | self.mt.next_u32() as u64
    }

    /// `np.random.random_sample()` (legacy: same 53-bit formula as CPython).
    pub fn random_sample(&mut self) -> f64 {
        self.mt.next_f64()
    }

    /// Scalar `np.random.randint(low, high)` (default dtype int64, legacy
    /// `_rand_int64` with `use_masked=True`): rng = high - 1 - low; rng = 0 draws
    /// nothing; rng < 2**32 - 1 draws words `& mask` (mask = next 2**m - 1 ≥ rng)
    /// until ≤ rng; rng = 2**32 - 1 takes one word; wider ranges do the same
    /// masking on 64-bit draws.
    ///
    /// # Panics
    /// If `high <= low` (numpy raises ValueError "low >= high").
    pub fn randint(&mut self, low: i64, high: i64) -> i64 {
        assert!(low < high, "randint: low >= high ({low}, {high})");
        let rng = (high as i128 - 1 - low as i128) as u64;
        let off = low as u64;
        let v = if rng == 0 {
            0
        } else if rng <= 0xffff_ffff {
            if rng == 0xffff_ffff {
                self.next_u32() as u64
            } else {
                let mask = gen_mask(rng) as u32;
                loop {
                    let v = self.next_u32() & mask;
                    if v as u64 <= rng {
                        break v as u64;
                    }
                }
            }
        } else if rng == u64::MAX {
            self.next_u64()
        } else {
            let mask = gen_mask(rng);
            loop {
                let v = self.next_u64() & mask;
                if v <= rng {
                    break v;
                }
            }
        };
        off.wrapping_add(v) as i64
    }
}

/// Smallest 2**m - 1 that is ≥ rng (numpy `gen_mask`).
fn gen_mask(rng: u64) -> u64 {
    if rng == 0 {
        0
    } else {
        u64::MAX >> rng.leading_zeros()
    }
}
