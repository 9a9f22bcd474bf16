//! Simultaneous-perturbation stochastic approximation (Spall 1992), the gradient-free
//! search MambaExtend and Mamba Modulation calibrate their scales with
//! (ArminAzizi98/LongContextMamba `perplexity_eval/eval.py::main`; the same loop in
//! gnepul-ace/mamba_modulation). Iteration x:
//!   c = c0/(1+x)^0.1,  a = a0·cos(xπ/198),  δ ∈ {±1}^n,
//!   t± = clamp(t ± cδ),  g = (f(t+) − f(t−))·δ/(2c),  t ← clamp(t − a·g),
//! with clamp to [lower, upper]. Upstream keeps t+ or t− by the test-set score; we never
//! look at evaluation data.
//!
//! Each iteration's δ comes from its own generator seeded by (seed, x), so a run resumed
//! from a saved [`SpsaState`] draws exactly what an uninterrupted one would.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpsaSettings {
    pub iterations: usize,
    /// c0 of c = c0/(1+x)^0.1.
    pub perturbation: f64,
    /// a0 of a = a0·cos(xπ/198).
    pub step: f64,
    pub lower: f64,
    pub upper: Option<f64>,
    pub seed: u64,
}

impl SpsaSettings {
    /// MambaExtend's perplexity calibration: 50 iterations, c0 0.1, a0 0.001, t ≥ 0.01.
    pub fn mambaextend(seed: u64) -> Self {
        Self {
            iterations: 50,
            perturbation: 0.1,
            step: 0.001,
            lower: 0.01,
            upper: None,
            seed,
        }
    }

    /// Mamba Modulation's: the same loop for 30 iterations, s in [0.01, 1].
    pub fn modulation(seed: u64) -> Self {
        Self {
            iterations: 30,
            upper: Some(1.0),
            ..Self::mambaextend(seed)
        }
    }

    fn clamp(&self, v: f64) -> f64 {
        let v = v.max(self.lower);
        match self.upper {
            Some(u) => v.min(u),
            None => v,
        }
    }
}

/// One iteration's record: the objective at both perturbed points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpsaStep {
    pub iteration: usize,
    pub objective_plus: f64,
    pub objective_minus: f64,
}

/// Where a calibration stands: what an interrupted run resumes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpsaState {
    pub next_iteration: usize,
    pub theta: Vec<f64>,
    pub trace: Vec<SpsaStep>,
}

/// Large odd constant that spreads iteration numbers over seeds.
const SEED_STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;

impl SpsaState {
    /// t = U[0,1)/4 + 0.75 for each of `n` parameters, drawn from `settings.seed`.
    pub fn initial(n: usize, settings: &SpsaSettings) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed);
        let theta = (0..n)
            .map(|_| settings.clamp(rng.gen::<f64>() / 4.0 + 0.75))
            .collect();
        Self {
            next_iteration: 0,
            theta,
            trace: Vec::new(),
        }
    }

    pub fn done(&self, settings: &SpsaSettings) -> bool {
        self.next_iteration >= settings.iterations
    }

    /// Runs iteration `next_iteration` with `objective` (lower is better).
    pub fn step(
        &mut self,
        settings: &SpsaSettings,
        mut objective: impl FnMut(&[f64]) -> Result<f64>,
    ) -> Result<()> {
        let x = self.next_iteration;
        let c = settings.perturbation / (1.0 + x as f64).powf(0.1);
        let a = settings.step * (x as f64 * std::f64::consts::PI / 198.0).cos();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            settings.seed ^ (x as u64 + 1).wrapping_mul(SEED_STRIDE),
        );
        let signs: Vec<f64> = (0..self.theta.len())
            .map(|_| if rng.gen::<bool>() { 1.0 } else { -1.0 })
            .collect();
        let shifted = |sign: f64| -> Vec<f64> {
            self.theta
                .iter()
                .zip(&signs)
                .map(|(t, d)| settings.clamp(t + sign * c * d))
                .collect()
        };
        let f_plus = objective(&shifted(1.0))?;
        let f_minus = objective(&shifted(-1.0))?;
        if !f_plus.is_finite() || !f_minus.is_finite() {
            bail!("the calibration objective is not finite ({f_plus}, {f_minus}) at iteration {x}");
        }
        for (t, d) in self.theta.iter_mut().zip(&signs) {
            let g = (f_plus - f_minus) * d / (2.0 * c);
            *t = settings.clamp(*t - a * g);
        }
        self.trace.push(SpsaStep {
            iteration: x,
            objective_plus: f_plus,
            objective_minus: f_minus,
        });
        self.next_iteration += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bowl(t: &[f64]) -> Result<f64> {
        Ok(t.iter()
            .enumerate()
            .map(|(i, v)| (v - 0.3 - 0.1 * i as f64).powi(2))
            .sum())
    }

    #[test]
    fn is_deterministic_and_resumable() {
        let s = SpsaSettings {
            step: 0.05,
            ..SpsaSettings::mambaextend(7)
        };
        let run = |split: usize| {
            let mut st = SpsaState::initial(4, &s);
            for _ in 0..split {
                st.step(&s, bowl).unwrap();
            }
            // Resume from a serialised copy, as after an interrupt.
            let mut st: SpsaState =
                serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
            while !st.done(&s) {
                st.step(&s, bowl).unwrap();
            }
            st
        };
        let a = run(50);
        assert_eq!(a, run(17));
        assert_eq!(a.trace.len(), 50);
        assert_ne!(a, {
            let s2 = SpsaSettings {
                seed: 8,
                ..s.clone()
            };
            let mut st = SpsaState::initial(4, &s2);
            while !st.done(&s2) {
                st.step(&s2, bowl).unwrap();
            }
            st
        });
        // It descends the bowl.
        let start = bowl(&SpsaState::initial(4, &s).theta).unwrap();
        assert!(bowl(&a.theta).unwrap() < 0.5 * start);
    }

    #[test]
    fn starts_in_the_upstream_range_and_respects_bounds() {
        let s = SpsaSettings::modulation(1);
        let st = SpsaState::initial(24, &s);
        assert!(st.theta.iter().all(|t| (0.75..1.0).contains(t)));
        let mut st = st;
        let steep = |t: &[f64]| Ok(-1e6 * t.iter().sum::<f64>());
        st.step(
            &SpsaSettings {
                step: 1.0,
                ..s.clone()
            },
            steep,
        )
        .unwrap();
        assert!(st.theta.iter().all(|t| (0.01..=1.0).contains(t)));
        let nan = |_: &[f64]| Ok(f64::NAN);
        assert!(st.step(&s, nan).is_err());
    }
}
