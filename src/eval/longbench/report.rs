//! The scores of a LongBench run per method and task (and per LongBench-E bucket), and
//! their table.

use super::run::LongBenchRecord;
use super::{py_round, LengthBucket};
use crate::eval::common::render_table;
use crate::eval::sweep::{Shard, Throughput};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One method's result on one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskScore {
    pub task: String,
    pub metric: &'static str,
    /// Samples counted.
    pub samples: usize,
    /// eval.py's `round(100 · mean, 2)`; `None` with no samples.
    pub score: Option<f64>,
    /// LongBench-E: the `scorer_e` buckets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<BTreeMap<&'static str, Option<f64>>>,
}

/// What [`super::run::run_longbench`] returns.
#[derive(Debug, Clone)]
pub struct LongBenchReport {
    pub methods: Vec<String>,
    pub longbench_e: bool,
    /// `scores[method][task]`, over the samples every method finished.
    pub scores: Vec<Vec<TaskScore>>,
    /// All finished records, in report order (method, task, sample).
    pub records: Vec<LongBenchRecord>,
    pub resumed: usize,
    pub complete: bool,
    pub shard: Option<Shard>,
    pub throughput: Throughput,
    pub out_dir: PathBuf,
}

/// LongBench-E's buckets, in `scorer_e`'s order.
pub(crate) const BUCKETS: [LengthBucket; 3] = [
    LengthBucket::Upto4k,
    LengthBucket::From4kTo8k,
    LengthBucket::Over8k,
];

/// The mean of the present values, rounded to 2 decimals (the average over tasks).
fn average(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| py_round(v.iter().sum::<f64>() / v.len() as f64, 2))
}

impl LongBenchReport {
    /// The average over tasks of `method`'s scores (LongBench) or of one bucket's.
    pub fn average(&self, method: usize, bucket: Option<LengthBucket>) -> Option<f64> {
        average(self.scores[method].iter().map(|t| match bucket {
            None => t.score,
            Some(b) => t.buckets.as_ref().and_then(|m| m[b.label()]),
        }))
    }

    fn format_score(v: Option<f64>) -> String {
        v.map_or("-".into(), |s| format!("{s:.2}"))
    }

    /// The terminal table: a row per task and the average; a column per method (per
    /// method and bucket for LongBench-E).
    pub fn table(&self) -> String {
        let mut header = vec!["task".to_string(), "metric".into(), "samples".into()];
        for m in &self.methods {
            if self.longbench_e {
                header.extend(BUCKETS.iter().map(|b| format!("{m} {}", b.label())));
            } else {
                header.push(m.clone());
            }
        }
        let cells = |t: &TaskScore| -> Vec<String> {
            if self.longbench_e {
                BUCKETS
                    .iter()
                    .map(|b| Self::format_score(t.buckets.as_ref().and_then(|x| x[b.label()])))
                    .collect()
            } else {
                vec![Self::format_score(t.score)]
            }
        };
        let mut rows: Vec<Vec<String>> = Vec::new();
        if let Some(first) = self.scores.first() {
            for (ti, t) in first.iter().enumerate() {
                let mut r = vec![t.task.clone(), t.metric.to_string(), t.samples.to_string()];
                for m in 0..self.methods.len() {
                    r.extend(cells(&self.scores[m][ti]));
                }
                rows.push(r);
            }
        }
        let mut avg = vec!["average".to_string(), String::new(), String::new()];
        for m in 0..self.methods.len() {
            if self.longbench_e {
                avg.extend(
                    BUCKETS
                        .iter()
                        .map(|b| Self::format_score(self.average(m, Some(*b)))),
                );
            } else {
                avg.push(Self::format_score(self.average(m, None)));
            }
        }
        rows.push(avg);
        format!(
            "{}: scores per task (0-100, the official metrics){}\n{}",
            if self.longbench_e {
                "LongBench-E"
            } else {
                "LongBench"
            },
            if self.longbench_e {
                " by context length (the length field)"
            } else {
                ""
            },
            render_table(&header, &rows)
        )
    }
}
