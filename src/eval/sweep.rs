//! The one sweep runner every evaluation uses: work units, resume, batching, shards, a pool
//! of workers, progress and interruption.
//!
//! An evaluation lists its work units in one canonical order ([`SweepUnits`]) and says how
//! to score a batch of them ([`Sweep`]); the runner does the rest. `--shard I/N` keeps unit
//! `i` of that order when `i mod N = I`, so N processes anywhere cover a sweep exactly once,
//! and [`super::merge`] joins their folders into the folder of one unsharded run.

use super::common::{progress_bar, RunOptions};
use super::runlog::RunLog;
use super::EvalModel;
use anyhow::{bail, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The key a sharded run adds to its `run.json` settings.
pub const SHARD_KEY: &str = "shard";

/// One of `count` deterministic slices of a sweep: the units whose index in the sweep's
/// canonical order is `index` modulo `count`. Interleaving spreads every length over all
/// shards, so shards take about the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether unit number `unit` (in canonical order) belongs to this shard.
    pub fn owns(&self, unit: usize) -> bool {
        unit % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "bad shard '{s}': expected I/N with 0 ≤ I < N, e.g. 0/4 (the first of four shards)"
            )
        };
        let (i, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(i) || !digits(n) {
            return Err(bad());
        }
        let index: usize = i.parse().map_err(|_| bad())?;
        let count: usize = n.parse().map_err(|_| bad())?;
        if count == 0 {
            bail!("bad shard '{s}': the shard count must be at least 1");
        }
        if index >= count {
            bail!(
                "bad shard '{s}': the index must be below the count (the shards of {count} are 0/{count} to {}/{count})",
                count - 1
            );
        }
        Ok(Shard { index, count })
    }
}

impl Serialize for Shard {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Shard {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The settings a run records: `settings`, plus the shard when there is one.
pub fn sharded_settings(settings: &Value, shard: Option<Shard>) -> Value {
    let mut v = settings.clone();
    if let (Some(shard), Some(map)) = (shard, v.as_object_mut()) {
        map.insert(SHARD_KEY.into(), Value::String(shard.to_string()));
    }
    v
}

/// `run.json` settings split into those of the unsharded run and the shard (if any).
pub fn split_shard(settings: &Value) -> Result<(Value, Option<Shard>)> {
    let mut v = settings.clone();
    let shard = match v.as_object_mut().and_then(|m| m.remove(SHARD_KEY)) {
        None => None,
        Some(s) => Some(serde_json::from_value(s)?),
    };
    Ok((v, shard))
}

/// Field `key` of a `run.json` settings object, for plans read back from a run folder.
pub fn field<T: DeserializeOwned>(v: &Value, key: &str) -> Result<T> {
    serde_json::from_value(v.get(key).cloned().unwrap_or(Value::Null))
        .map_err(|e| anyhow::anyhow!("run.json: bad or missing \"{key}\": {e}"))
}

/// What a sweep consists of: its units in canonical order, how units and finished records
/// are identified, and how a unit is named to people. Needs no model, so `merge` can check
/// shards from their `run.json` alone.
pub trait SweepUnits {
    /// One work unit (a sample of one cell and method, a window and method, …).
    type Unit: Sync;
    /// One finished unit, a line of `results.jsonl`.
    type Record: Serialize + DeserializeOwned + Send;
    /// `samples`, `windows`, …: what a unit is called in messages.
    const UNIT_NAME: &'static str;
    /// Every unit of the unsharded sweep, in canonical order.
    fn units(&self) -> &[Self::Unit];
    /// A key naming `unit`, unique within the sweep.
    fn unit_id(&self, unit: &Self::Unit) -> String;
    /// The key of the unit `record` finished.
    fn record_id(&self, record: &Self::Record) -> String;
    /// The unit in words, e.g. `vanilla at length 2048, depth 0.50, sample 3`.
    fn describe(&self, unit: &Self::Unit) -> String;
}

/// A sweep whose units are exactly its plan's: it gets [`SweepUnits`] by forwarding to
/// the plan, so the evaluations that need no more (naming a unit from the plan alone)
/// write only [`Sweep`].
pub trait PlanSweep {
    type Plan: SweepUnits;
    fn plan(&self) -> &Self::Plan;
}

impl<T: PlanSweep> SweepUnits for T {
    type Unit = <T::Plan as SweepUnits>::Unit;
    type Record = <T::Plan as SweepUnits>::Record;
    const UNIT_NAME: &'static str = <T::Plan as SweepUnits>::UNIT_NAME;

    fn units(&self) -> &[Self::Unit] {
        self.plan().units()
    }
    fn unit_id(&self, unit: &Self::Unit) -> String {
        self.plan().unit_id(unit)
    }
    fn record_id(&self, record: &Self::Record) -> String {
        self.plan().record_id(record)
    }
    fn describe(&self, unit: &Self::Unit) -> String {
        self.plan().describe(unit)
    }
}

/// A sweep that can run: units that may share a batch, and how to score a batch.
pub trait Sweep: SweepUnits + Sync {
    /// Units with equal keys can be scored in one batch (same length and method).
    fn batch_key(&self, unit: &Self::Unit) -> String;
    /// Scores `units` (one unit, or several with one batch key) on `model`: one record per
    /// unit, in order. The records must not depend on how the units were batched.
    fn score(&self, model: &dyn EvalModel, units: &[&Self::Unit]) -> Result<Vec<Self::Record>>;
}

/// Where a sweep runs and how.
pub struct SweepSetup<'a> {
    /// The run folder.
    pub out_dir: &'a Path,
    /// The settings of the unsharded run (`run.json` adds the shard).
    pub settings: &'a Value,
    /// Progress, interruption, batch size and shard.
    pub options: &'a RunOptions,
    /// One worker per model (copies of one model on several devices); at least one.
    pub workers: &'a [&'a dyn EvalModel],
    /// The progress bar's label.
    pub label: &'a str,
}

/// What [`run_sweep`] leaves: every finished record, by unit key.
pub struct SweepOutcome<R> {
    pub done: HashMap<String, R>,
    /// Records that were on disk when the run started.
    pub resumed: usize,
    /// Units this run (this shard) covers.
    pub planned: usize,
    /// Whether Ctrl-C stopped the run.
    pub interrupted: bool,
    /// This run's shard.
    pub shard: Option<Shard>,
    /// Units this invocation ran, and the wall-clock seconds it spent on them.
    pub ran: usize,
    pub ran_secs: f64,
}

impl<R> SweepOutcome<R> {
    /// What this invocation ran, and in how long.
    pub fn throughput(&self) -> Throughput {
        Throughput {
            units: self.ran,
            secs: self.ran_secs,
        }
    }

    /// Whether every unit of this run is finished.
    pub fn complete(&self) -> bool {
        !self.interrupted && self.done.len() >= self.planned
    }
}

/// How fast a run went: units it ran, over the seconds it spent on them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Throughput {
    pub units: usize,
    pub secs: f64,
}

impl Throughput {
    /// `ran 80 samples in 3.21 s (24.9 samples/s)`, or `None` when nothing ran.
    pub fn line(&self, unit_name: &str) -> Option<String> {
        (self.units > 0).then(|| {
            format!(
                "ran {} {unit_name} in {:.2} s ({:.1} {unit_name}/s)",
                self.units,
                self.secs,
                self.units as f64 / self.secs.max(1e-9)
            )
        })
    }
}

/// Indices (into `units()`) of the units `shard` covers.
pub fn shard_units<S: SweepUnits + ?Sized>(sweep: &S, shard: Option<Shard>) -> Vec<usize> {
    (0..sweep.units().len())
        .filter(|&i| shard.is_none_or(|s| s.owns(i)))
        .collect()
}

/// Runs (or resumes) `sweep` in `setup.out_dir`: opens the run log, skips finished units,
/// scores the rest in batches of up to `options.batch_size` units of one batch key, on
/// every worker at once, and appends each finished record to `results.jsonl` as it comes.
pub fn run_sweep<S: Sweep>(sweep: &S, setup: &SweepSetup) -> Result<SweepOutcome<S::Record>> {
    let options = setup.options;
    if setup.workers.is_empty() {
        bail!("no worker to run the sweep on");
    }
    let settings = sharded_settings(setup.settings, options.shard);
    let (mut log, prior) = RunLog::open::<S::Record>(setup.out_dir, &settings)?;
    let mut done: HashMap<String, S::Record> = HashMap::new();
    for r in prior {
        done.insert(sweep.record_id(&r), r);
    }
    let mine = shard_units(sweep, options.shard);
    let planned = mine.len();
    let units = sweep.units();
    let finished_here = mine
        .iter()
        .filter(|&&i| done.contains_key(&sweep.unit_id(&units[i])))
        .count();
    let resumed = done.len();
    let pb = progress_bar(planned as u64, options.quiet, setup.label);
    pb.set_position(finished_here as u64);
    pb.reset_eta();
    if resumed > 0 && !options.quiet {
        pb.suspend(|| {
            eprintln!(
                "resuming: {resumed} finished {} are already in {}",
                S::UNIT_NAME,
                log.results_path().display()
            )
        });
    }
    let todo: Vec<&S::Unit> = mine
        .iter()
        .map(|&i| &units[i])
        .filter(|u| !done.contains_key(&sweep.unit_id(u)))
        .collect();
    let groups = batches(sweep, todo, options.batch_size.max(1));

    let results_path = log.results_path();
    let started = std::time::Instant::now();
    let mut ran = 0usize;
    let mut interrupted = false;
    let mut failure: Option<anyhow::Error> = None;
    let mut finish =
        |group: &[&S::Unit], scored: Result<Vec<S::Record>>, log: &mut RunLog| -> Result<bool> {
            let records = match scored {
                Ok(r) => r,
                // Ctrl-C stopped a forward pass: these units are abandoned.
                Err(_) if options.stopped() => return Ok(false),
                Err(e) => {
                    return Err(e.context(format!(
                        "{} failed (finished {} are saved in {})",
                        sweep.describe(group[0]),
                        S::UNIT_NAME,
                        results_path.display()
                    )))
                }
            };
            if records.len() != group.len() {
                bail!(
                    "scoring {} units returned {} records",
                    group.len(),
                    records.len()
                );
            }
            for rec in records {
                log.append(&rec)?;
                done.insert(sweep.record_id(&rec), rec);
                pb.inc(1);
                ran += 1;
            }
            pb.set_message(sweep.describe(group[group.len() - 1]));
            Ok(true)
        };

    if setup.workers.len() == 1 {
        let model = setup.workers[0];
        for group in &groups {
            if options.stopped() {
                interrupted = true;
                break;
            }
            pb.set_message(describe_group(sweep, group));
            if !finish(group, sweep.score(model, group), &mut log)? {
                interrupted = true;
                break;
            }
        }
    } else {
        // One thread per worker takes the next batch from a shared queue; this thread
        // writes every result, so the log has one writer.
        let queue = Mutex::new(groups.iter().collect::<VecDeque<_>>());
        let abort = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            for &model in setup.workers {
                let (tx, queue, abort) = (tx.clone(), &queue, &abort);
                scope.spawn(move || loop {
                    if abort.load(Ordering::SeqCst) || options.stopped() {
                        break;
                    }
                    let Some(group) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                        break;
                    };
                    let scored = sweep.score(model, group);
                    let failed = scored.is_err();
                    if tx.send((group, scored)).is_err() || failed {
                        break;
                    }
                });
            }
            drop(tx);
            for (group, scored) in rx {
                if failure.is_some() {
                    continue;
                }
                match finish(group, scored, &mut log) {
                    Ok(true) => {}
                    Ok(false) => interrupted = true,
                    Err(e) => {
                        abort.store(true, Ordering::SeqCst);
                        failure = Some(e);
                    }
                }
            }
        });
        if options.stopped() {
            interrupted = true;
        }
    }
    pb.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(SweepOutcome {
        done,
        resumed,
        planned,
        interrupted,
        shard: options.shard,
        ran,
        ran_secs: started.elapsed().as_secs_f64(),
    })
}

fn describe_group<S: SweepUnits>(sweep: &S, group: &[&S::Unit]) -> String {
    match group.len() {
        1 => sweep.describe(group[0]),
        n => format!("{} (+{} more)", sweep.describe(group[0]), n - 1),
    }
}

/// `todo` in batches: one unit each at batch size 1 (canonical order); else the units of
/// each batch key in order of first appearance, cut into batches of `batch_size`.
fn batches<'u, S: Sweep>(
    sweep: &S,
    todo: Vec<&'u S::Unit>,
    batch_size: usize,
) -> Vec<Vec<&'u S::Unit>> {
    if batch_size <= 1 {
        return todo.into_iter().map(|u| vec![u]).collect();
    }
    let mut order: Vec<String> = Vec::new();
    let mut by_key: HashMap<String, Vec<&S::Unit>> = HashMap::new();
    for u in todo {
        let key = sweep.batch_key(u);
        if !by_key.contains_key(&key) {
            order.push(key.clone());
        }
        by_key.entry(key).or_default().push(u);
    }
    order
        .iter()
        .flat_map(|k| {
            by_key[k]
                .chunks(batch_size)
                .map(<[_]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The finished records of `sweep`'s units, in canonical order.
pub fn in_unit_order<S: SweepUnits>(
    sweep: &S,
    done: &mut HashMap<String, S::Record>,
) -> Vec<S::Record> {
    sweep
        .units()
        .iter()
        .filter_map(|u| done.remove(&sweep.unit_id(u)))
        .collect()
}

/// One shard's folder as `merge` reads it.
pub struct ShardRun<R> {
    pub dir: PathBuf,
    pub shard: Option<Shard>,
    pub records: Vec<R>,
}

/// Joins the records of shard folders into the records of the whole sweep, in canonical
/// order: every record must be a unit of its folder's shard, no unit may appear twice, and
/// none may be missing (each missing one is named).
pub fn join_shards<S: SweepUnits>(
    sweep: &S,
    runs: Vec<ShardRun<S::Record>>,
) -> Result<Vec<S::Record>> {
    let index: HashMap<String, usize> = sweep
        .units()
        .iter()
        .enumerate()
        .map(|(i, u)| (sweep.unit_id(u), i))
        .collect();
    let mut owner: HashMap<String, PathBuf> = HashMap::new();
    let mut done: HashMap<String, S::Record> = HashMap::new();
    for run in runs {
        for rec in run.records {
            let id = sweep.record_id(&rec);
            let Some(&i) = index.get(&id) else {
                bail!(
                    "{} holds a result that is not part of this sweep ({id}); it is not a shard of this run",
                    run.dir.display()
                );
            };
            let unit = &sweep.units()[i];
            if let Some(s) = run.shard.filter(|s| !s.owns(i)) {
                bail!(
                    "{} is shard {s} but holds {}, a unit of shard {}/{}: the shards overlap",
                    run.dir.display(),
                    sweep.describe(unit),
                    i % s.count,
                    s.count
                );
            }
            if let Some(first) = owner.get(&id) {
                bail!(
                    "{} is in both {} and {}: the shards overlap",
                    sweep.describe(unit),
                    first.display(),
                    run.dir.display()
                );
            }
            owner.insert(id.clone(), run.dir.clone());
            done.insert(id, rec);
        }
    }
    let missing: Vec<String> = sweep
        .units()
        .iter()
        .filter(|u| !done.contains_key(&sweep.unit_id(u)))
        .map(|u| sweep.describe(u))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} of {} {} are missing (finish or add their shards, then merge again): {}",
            missing.len(),
            sweep.units().len(),
            S::UNIT_NAME,
            missing.join("; ")
        );
    }
    Ok(in_unit_order(sweep, &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_bad_input() {
        assert_eq!(
            "1/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
        assert_eq!("0/1".parse::<Shard>().unwrap().to_string(), "0/1");
        for (bad, says) in [
            ("2/2", "below the count"),
            ("0/0", "at least 1"),
            ("a/b", "expected I/N"),
            ("1", "expected I/N"),
            ("-1/2", "expected I/N"),
            ("1/2/3", "expected I/N"),
            ("", "expected I/N"),
        ] {
            let e = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn shards_cover_every_unit_once() {
        let n = 3;
        let mut seen = [0; 10];
        for index in 0..n {
            let s = Shard { index, count: n };
            for (u, c) in seen.iter_mut().enumerate() {
                if s.owns(u) {
                    *c += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn the_shard_travels_in_the_settings() {
        let s = serde_json::json!({"eval": "x", "lengths": [1]});
        let sharded = sharded_settings(&s, Some(Shard { index: 2, count: 5 }));
        assert_eq!(sharded["shard"], "2/5");
        let (base, shard) = split_shard(&sharded).unwrap();
        assert_eq!(base, s);
        assert_eq!(shard, Some(Shard { index: 2, count: 5 }));
        assert_eq!(split_shard(&s).unwrap().1, None);
    }
}
