//! Observers: what each layer's selective scan is about to consume, handed to the caller
//! at the pre-scan point, so that calibrations and analyses read the model's own
//! activations instead of re-implementing the forward. Defaults do nothing, as with
//! ripgrep's `Sink`.

use anyhow::Result;

/// One layer's scan inputs, token-major f32 on the host, under the layer's plan (Δ scale
/// and filter, A under its A_log scale), for every row of the layer's input; `kept` says
/// which rows the scan consumes when the plan drops tokens.
pub struct ScanView<'a> {
    pub layer: usize,
    pub batch: usize,
    /// Rows per sequence in this view.
    pub len: usize,
    pub d_inner: usize,
    pub d_state: usize,
    /// A, `[d_inner, d_state]`.
    pub a: &'a [f32],
    /// Δ_t, `[batch·len, d_inner]`.
    pub delta: &'a [f32],
    /// The scan's input x_t (conv + SiLU output), `[batch·len, d_inner]`.
    pub x: &'a [f32],
    /// x_proj's output rows `(dt | B | C)`, `bc_row_stride` wide.
    pub(crate) bc: &'a [f32],
    pub(crate) bc_row_stride: usize,
    pub(crate) b_offset: usize,
    pub(crate) c_offset: usize,
    /// When the layer drops tokens: the indices of this view's rows that the scan keeps,
    /// ascending (batch 1).
    pub kept: Option<&'a [usize]>,
}

impl ScanView<'_> {
    /// B_t of row `row` (`row` counts over batch·len), `d_state` values.
    pub fn b(&self, row: usize) -> &[f32] {
        let at = row * self.bc_row_stride + self.b_offset;
        &self.bc[at..at + self.d_state]
    }

    /// C_t of row `row`, `d_state` values.
    pub fn c(&self, row: usize) -> &[f32] {
        let at = row * self.bc_row_stride + self.c_offset;
        &self.bc[at..at + self.d_state]
    }

    /// Δ of row `row`, `d_inner` values.
    pub fn delta_row(&self, row: usize) -> &[f32] {
        &self.delta[row * self.d_inner..(row + 1) * self.d_inner]
    }
}

/// Receives every observed layer's [`ScanView`] during a forward pass. Calls for one layer
/// arrive in token order; a prefill the model runs in chunks calls once per chunk and
/// layer. Observers collect through interior mutability (`&self`), since a forward pass
/// only borrows them.
pub trait ScanObserver {
    /// Whether `layer` is observed. On a GPU an observed layer's inputs are copied to the
    /// host, so say no to the layers you do not need.
    fn observes(&self, _layer: usize) -> bool {
        true
    }

    /// Layer `view.layer` is about to scan `view`. An error stops the forward pass.
    fn on_scan(&self, _view: &ScanView) -> Result<()> {
        Ok(())
    }
}
