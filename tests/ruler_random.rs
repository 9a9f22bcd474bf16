//! Replays tests/fixtures/reference/ruler/pyrandom.json (written by
//! scripts/pyrandom_reference.py from real CPython `random` and numpy's legacy
//! `RandomState`) through eval::ruler::pyrandom and demands identical output.

use decimamba::eval::ruler::pyrandom::{uuid4_string, NumpyRandomState, PyRandom};
use serde_json::Value;
use std::path::PathBuf;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/ruler/pyrandom.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("parse pyrandom.json")
}

fn int(v: &Value) -> i128 {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
        .unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// Python ints in the fixture may exceed u64 (getrandbits out is a string).
fn seed_u64(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("seed not a u64: {v}"))
}

fn py_call(r: &mut PyRandom, op: &str, args: &[Value]) -> Value {
    match op {
        "getrandbits" => Value::from(r.getrandbits(int(&args[0]) as u32).to_string()),
        "random" => Value::from(r.random()),
        "randbelow" => Value::from(r.randbelow(int(&args[0]) as u64)),
        "randint" => Value::from(r.randint(int(&args[0]) as i64, int(&args[1]) as i64)),
        "choice" => {
            let n = int(&args[0]) as usize;
            let seq: Vec<usize> = (0..n).collect();
            Value::from(*r.choice(&seq))
        }
        "choices" => {
            let pop: Vec<char> = args[0].as_str().unwrap().chars().collect();
            let picked = r.choices(&pop, int(&args[1]) as usize);
            Value::from(picked.into_iter().collect::<String>())
        }
        "shuffle" => {
            let mut x: Vec<usize> = (0..int(&args[0]) as usize).collect();
            r.shuffle(&mut x);
            Value::from(x)
        }
        "sample" => {
            let (n, k) = (int(&args[0]) as usize, int(&args[1]) as usize);
            let idx = r.sample_indices(n, k).expect("sample_indices");
            // sample() over a population must give the same draws as sample_indices.
            Value::from(idx)
        }
        "uuid4" => Value::from(uuid4_string(r.getrandbits(128))),
        other => panic!("unknown py op {other}"),
    }
}

fn np_call(r: &mut NumpyRandomState, op: &str, args: &[Value]) -> Value {
    match op {
        "randint" => Value::from(r.randint(int(&args[0]) as i64, int(&args[1]) as i64)),
        "random_sample" => Value::from(r.random_sample()),
        other => panic!("unknown np op {other}"),
    }
}

/// Exact equality; floats compared by their bits.
fn assert_same(got: &Value, want: &Value, what: &str) {
    if let (Some(g), Some(w)) = (got.as_f64(), want.as_f64()) {
        if want.is_f64() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}: got {g:?}, want {w:?}");
            return;
        }
    }
    assert_eq!(got, want, "{what}");
}

fn replay<R>(
    entries: &Value,
    mut make: impl FnMut(&Value) -> R,
    call: fn(&mut R, &str, &[Value]) -> Value,
) -> usize {
    let mut n = 0;
    for (ei, entry) in entries.as_array().unwrap().iter().enumerate() {
        let mut rng = make(&entry["seed"]);
        for (ci, c) in entry["calls"].as_array().unwrap().iter().enumerate() {
            let op = c["op"].as_str().unwrap();
            let args = c["args"].as_array().unwrap();
            let got = call(&mut rng, op, args);
            let what = format!(
                "entry {ei} (seed {}) call {ci}: {op}{:?}",
                entry["seed"], args
            );
            assert_same(&got, &c["out"], &what);
            n += 1;
        }
    }
    n
}

#[test]
fn python_random_matches_cpython() {
    let fx = fixture();
    let n = replay(&fx["py"], |s| PyRandom::new(seed_u64(s)), py_call);
    assert!(n > 500, "only {n} calls replayed");
}

#[test]
fn numpy_legacy_matches_numpy() {
    let fx = fixture();
    let n = replay(
        &fx["np"],
        |s| NumpyRandomState::new(seed_u64(s) as u32),
        np_call,
    );
    assert!(n > 100, "only {n} calls replayed");
}

#[test]
fn sample_of_population_equals_sample_indices() {
    let pop: Vec<String> = (0..500).map(|i| format!("w{i}")).collect();
    for &(n, k) in &[(500usize, 3usize), (500, 20), (90, 20), (500, 400)] {
        let mut a = PyRandom::new(42);
        let mut b = PyRandom::new(42);
        let idx = a.sample_indices(n, k).unwrap();
        let got = b.sample(&pop[..n], k).unwrap();
        let want: Vec<String> = idx.iter().map(|&i| pop[i].clone()).collect();
        assert_eq!(got, want);
        assert_eq!(a.genrand_u32(), b.genrand_u32());
    }
}

#[test]
fn sample_larger_than_population_errors() {
    let mut r = PyRandom::new(42);
    assert!(r.sample_indices(3, 4).is_err());
    assert!(r.sample(&[1, 2, 3], 4).is_err());
    assert!(r.sample::<u8>(&[], 1).is_err());
    assert_eq!(r.sample::<u8>(&[], 0).unwrap(), Vec::<u8>::new());
    // A failed sample draws nothing.
    let mut fresh = PyRandom::new(42);
    assert_eq!(r.genrand_u32(), fresh.genrand_u32());
}

#[test]
fn uuid4_sets_version_and_variant() {
    assert_eq!(uuid4_string(0), "00000000-0000-4000-8000-000000000000");
    assert_eq!(
        uuid4_string(u128::MAX),
        "ffffffff-ffff-4fff-bfff-ffffffffffff"
    );
}
