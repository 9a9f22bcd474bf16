//! The passkey grid: success fractions per method, needle depth and context length.

use super::run::PasskeySample;
use crate::eval::common::{format_length, render_table};
use crate::eval::plot::HeatmapPanel;
use serde::{Deserialize, Serialize};

/// Successes over trials of one cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CellStat {
    /// Successful samples.
    pub successes: usize,
    /// Finished samples.
    pub total: usize,
}

impl CellStat {
    /// The success fraction, `None` without samples.
    pub fn fraction(&self) -> Option<f64> {
        (self.total > 0).then(|| self.successes as f64 / self.total as f64)
    }
}

/// Success fractions per method, depth and length.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeyGrid {
    /// Column values.
    pub lengths: Vec<usize>,
    /// Row values.
    pub depths: Vec<f64>,
    /// Method names, in run order.
    pub methods: Vec<String>,
    /// `cells[method][depth][length]`.
    pub cells: Vec<Vec<Vec<CellStat>>>,
}

impl PasskeyGrid {
    /// Tallies `samples` into the grid of `lengths` × `depths` for `methods`;
    /// samples outside the grid are ignored.
    pub fn from_samples(
        lengths: &[usize],
        depths: &[f64],
        methods: &[String],
        samples: &[PasskeySample],
    ) -> Self {
        let mut cells =
            vec![vec![vec![CellStat::default(); lengths.len()]; depths.len()]; methods.len()];
        for s in samples {
            let m = methods.iter().position(|m| *m == s.method);
            let d = depths.iter().position(|d| d.to_bits() == s.depth.to_bits());
            let l = lengths.iter().position(|l| *l == s.length);
            if let (Some(m), Some(d), Some(l)) = (m, d, l) {
                let c = &mut cells[m][d][l];
                c.total += 1;
                c.successes += usize::from(s.success);
            }
        }
        PasskeyGrid {
            lengths: lengths.to_vec(),
            depths: depths.to_vec(),
            methods: methods.to_vec(),
            cells,
        }
    }

    /// Totals of a method over all depths at one length.
    pub fn length_stat(&self, method: usize, length: usize) -> CellStat {
        self.cells[method]
            .iter()
            .fold(CellStat::default(), |a, row| CellStat {
                successes: a.successes + row[length].successes,
                total: a.total + row[length].total,
            })
    }

    /// Totals of a method over the whole grid.
    pub fn overall(&self, method: usize) -> CellStat {
        (0..self.lengths.len()).fold(CellStat::default(), |a, l| {
            let s = self.length_stat(method, l);
            CellStat {
                successes: a.successes + s.successes,
                total: a.total + s.total,
            }
        })
    }

    /// The terminal table: one block per method (stacked), rows = needle
    /// depth, columns = context length, cells = success fraction.
    pub fn table(&self) -> String {
        let fmt = |c: CellStat| c.fraction().map_or("-".to_string(), |f| format!("{f:.2}"));
        let mut out = String::new();
        for (m, name) in self.methods.iter().enumerate() {
            if m > 0 {
                out.push('\n');
            }
            let overall = self.overall(m);
            out.push_str(&format!(
                "{name}: passkey success rate {} ({}/{}); rows: needle depth, columns: context length (K = 1024 tokens)\n",
                fmt(overall),
                overall.successes,
                overall.total
            ));
            let mut header = vec!["depth".to_string()];
            header.extend(self.lengths.iter().map(|l| format_length(*l)));
            let mut rows: Vec<Vec<String>> = self
                .depths
                .iter()
                .enumerate()
                .map(|(d, depth)| {
                    let mut r = vec![format!("{depth:.2}")];
                    r.extend(self.cells[m][d].iter().map(|c| fmt(*c)));
                    r
                })
                .collect();
            let mut mean = vec!["all".to_string()];
            mean.extend((0..self.lengths.len()).map(|l| fmt(self.length_stat(m, l))));
            rows.push(mean);
            out.push_str(&render_table(&header, &rows));
        }
        out
    }

    /// Heatmap panels, one per method.
    pub fn panels(&self, model_name: &str) -> Vec<HeatmapPanel> {
        self.methods
            .iter()
            .enumerate()
            .map(|(m, name)| HeatmapPanel {
                title: format!("{model_name} — {name}"),
                x_labels: self.lengths.iter().map(|l| format_length(*l)).collect(),
                y_labels: self.depths.iter().map(|d| format!("{d:.2}")).collect(),
                values: self.cells[m]
                    .iter()
                    .map(|row| row.iter().map(|c| c.fraction()).collect())
                    .collect(),
            })
            .collect()
    }
}
