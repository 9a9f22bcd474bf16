//! PNG plots: the passkey heatmap (like Fig. 1 right of the paper), the
//! perplexity-vs-context-length line plot, a linear line plot (doc-retrieval accuracy
//! against the number of documents) and a grouped bar chart (LongBench scores per task).
//! Text uses an embedded DejaVu Sans (no system fonts needed). Files are written atomically.

use super::common::{format_length, temp_sibling};
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::OnceLock;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";

/// Width of one heatmap panel in pixels.
pub const HEATMAP_PANEL_WIDTH: u32 = 820;
/// Height of the heatmap in pixels.
pub const HEATMAP_HEIGHT: u32 = 520;
/// Size of the perplexity plot in pixels.
pub const LINE_PLOT_SIZE: (u32, u32) = (900, 560);

/// Most heatmap panels in one row; more methods wrap onto further rows.
pub const HEATMAP_COLUMNS: usize = 3;

/// (columns, rows) of a heatmap with `panels` panels.
fn heatmap_grid(panels: usize) -> (usize, usize) {
    let n = panels.max(1);
    (n.min(HEATMAP_COLUMNS), n.div_ceil(HEATMAP_COLUMNS))
}

/// Size of a heatmap with `panels` panels, at most [`HEATMAP_COLUMNS`] to a row.
pub fn heatmap_size(panels: usize) -> (u32, u32) {
    let (cols, rows) = heatmap_grid(panels);
    (
        HEATMAP_PANEL_WIDTH * cols as u32,
        HEATMAP_HEIGHT * rows as u32,
    )
}

/// Registers the embedded font with plotters (once).
pub fn ensure_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        ["sans-serif", "serif", "monospace"]
            .iter()
            .all(|f| plotters::style::register_font(f, FontStyle::Normal, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded plot font could not be loaded"))
    }
}

pub(crate) fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

/// One heatmap panel: rows top to bottom, columns left to right.
#[derive(Debug, Clone)]
pub struct HeatmapPanel {
    /// The panel's title.
    pub title: String,
    /// Column labels (context lengths).
    pub x_labels: Vec<String>,
    /// Row labels (needle depths), drawn top to bottom.
    pub y_labels: Vec<String>,
    /// `values[row][col]` in [0, 1]; `None` for a cell without samples.
    pub values: Vec<Vec<Option<f64>>>,
}

/// Red (0) → yellow (0.5) → green (1).
pub fn success_color(v: f64) -> RGBColor {
    let stops = [
        (215.0, 48.0, 39.0),
        (254.0, 224.0, 139.0),
        (26.0, 152.0, 80.0),
    ];
    let v = v.clamp(0.0, 1.0) * 2.0;
    let i = (v.floor() as usize).min(1);
    let t = v - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let lerp = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

pub(crate) fn write_via_temp(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ensure_font()?;
    let tmp = temp_sibling(path);
    if let Err(e) = draw(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Draws the passkey heatmap(s) side by side, wrapping after [`HEATMAP_COLUMNS`], into
/// `path` (PNG); returns the size.
pub fn passkey_heatmap(path: &Path, panels: &[HeatmapPanel]) -> Result<(u32, u32)> {
    let size = heatmap_size(panels.len());
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let (cols, rows) = heatmap_grid(panels.len());
        let areas = root.split_evenly((rows, cols));
        for (area, p) in areas.iter().zip(panels) {
            draw_panel(area, p)?;
        }
        root.present().map_err(pe)?;
        Ok(())
    })?;
    Ok(size)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &HeatmapPanel,
) -> Result<()> {
    let nx = p.x_labels.len().max(1);
    let ny = p.y_labels.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 20))
        .margin_top(10)
        .margin_left(10)
        .margin_right(80)
        .margin_bottom(10)
        .x_label_area_size(62)
        .y_label_area_size(86)
        .build_cartesian_2d(0f64..nx as f64, 0f64..ny as f64)
        .map_err(pe)?;
    // Cells: row 0 at the top.
    let mut cells = Vec::new();
    let mut texts = Vec::new();
    for r in 0..ny {
        for c in 0..nx {
            let v = p
                .values
                .get(r)
                .and_then(|row| row.get(c))
                .copied()
                .flatten();
            let y0 = (ny - r - 1) as f64;
            let color = v.map(success_color).unwrap_or(RGBColor(200, 200, 200));
            cells.push(Rectangle::new(
                [(c as f64, y0), (c as f64 + 1.0, y0 + 1.0)],
                color.filled(),
            ));
            cells.push(Rectangle::new(
                [(c as f64, y0), (c as f64 + 1.0, y0 + 1.0)],
                WHITE.stroke_width(2),
            ));
            let label = v.map_or("–".to_string(), |v| format!("{v:.2}"));
            texts.push((label, (c as f64 + 0.5, y0 + 0.5)));
        }
    }
    chart.draw_series(cells).map_err(pe)?;
    let (x0, y_top) = chart.backend_coord(&(0.0, ny as f64));
    let (x1, y_bot) = chart.backend_coord(&(nx as f64, 0.0));
    let cell_w = (x1 - x0) as f64 / nx as f64;
    let cell_h = (y_bot - y_top) as f64 / ny as f64;
    let cell_font = (cell_w.min(cell_h) * 0.28).clamp(9.0, 18.0);
    let center = Pos::new(HPos::Center, VPos::Center);
    let cell_style = TextStyle::from((FAMILY, cell_font).into_font())
        .pos(center)
        .color(&BLACK);
    for (label, at) in texts {
        let px = chart.backend_coord(&at);
        area.draw(&Text::new(label, rel(area, px), cell_style.clone()))
            .map_err(pe)?;
    }
    // Axis labels.
    let tick = TextStyle::from((FAMILY, 15).into_font()).color(&BLACK);
    let nx_label_font = if nx > 10 { 12 } else { 15 };
    for (c, l) in p.x_labels.iter().enumerate() {
        let (px, _) = chart.backend_coord(&(c as f64 + 0.5, 0.0));
        let st = TextStyle::from((FAMILY, nx_label_font).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        area.draw(&Text::new(l.clone(), rel(area, (px, y_bot + 8)), st))
            .map_err(pe)?;
    }
    for (r, l) in p.y_labels.iter().enumerate() {
        let (_, py) = chart.backend_coord(&(0.0, (ny - r) as f64 - 0.5));
        area.draw(&Text::new(
            l.clone(),
            rel(area, (x0 - 8, py)),
            tick.clone().pos(Pos::new(HPos::Right, VPos::Center)),
        ))
        .map_err(pe)?;
    }
    let desc = TextStyle::from((FAMILY, 16).into_font()).color(&BLACK);
    area.draw(&Text::new(
        "context length (tokens, K = 1024)",
        rel(area, ((x0 + x1) / 2, y_bot + 36)),
        desc.clone().pos(Pos::new(HPos::Center, VPos::Top)),
    ))
    .map_err(pe)?;
    area.draw(&Text::new(
        "needle depth",
        rel(area, (x0 - 62, (y_top + y_bot) / 2)),
        desc.clone()
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))
    .map_err(pe)?;
    // Colour bar.
    let bx = x1 + 22;
    let steps = 50;
    let h = (y_bot - y_top).max(1);
    for i in 0..steps {
        let ya = y_bot - h * i / steps;
        let yb = y_bot - h * (i + 1) / steps;
        let col = success_color((i as f64 + 0.5) / steps as f64);
        area.draw(&Rectangle::new(
            [rel(area, (bx, yb)), rel(area, (bx + 16, ya))],
            col.filled(),
        ))
        .map_err(pe)?;
    }
    for (v, y) in [(1.0, y_top), (0.5, (y_top + y_bot) / 2), (0.0, y_bot)] {
        area.draw(&Text::new(
            format!("{v:.1}"),
            rel(area, (bx + 20, y)),
            tick.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(pe)?;
    }
    Ok(())
}

/// Converts an absolute backend coordinate into one relative to `area`.
fn rel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: (i32, i32),
) -> (i32, i32) {
    let (xr, yr) = area.get_pixel_range();
    (p.0 - xr.start, p.1 - yr.start)
}

/// One line of the perplexity plot.
#[derive(Debug, Clone)]
pub struct LineSeries {
    /// Legend name.
    pub name: String,
    /// (context length, perplexity) points, by increasing length.
    pub points: Vec<(f64, f64)>,
}

/// Matplotlib's "tab10" palette: ten distinct line colours before any repeats.
pub(crate) const LINE_COLORS: [RGBColor; 10] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Nice tick values for a log axis over [lo, hi].
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    for mults in [&[1.0, 2.0, 3.0, 5.0, 7.0][..], &[1.0, 2.0, 5.0], &[1.0]] {
        out.clear();
        let mut e = lo.log10().floor() as i32 - 1;
        while 10f64.powi(e) <= hi * 10.0 {
            for m in mults {
                let v = m * 10f64.powi(e);
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
            e += 1;
        }
        if out.len() <= 10 {
            break;
        }
    }
    if out.len() > 10 {
        // Many decades: every k-th power of ten.
        let k = out.len().div_ceil(8);
        out = out.into_iter().step_by(k).collect();
    }
    if out.len() < 3 {
        // Narrow range: evenly spaced round values.
        let raw = (hi - lo) / 4.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(raw);
        out.clear();
        let mut v = (lo / step).ceil() * step;
        while v <= hi + 1e-9 {
            out.push(v);
            v += step;
        }
    }
    out
}

fn format_tick(v: f64) -> String {
    if v >= 1e5 {
        format!("{v:.0e}")
    } else if v >= 10.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Draws perplexity vs context length (log x, log y) into `path` (PNG).
pub fn ppl_line_plot(path: &Path, title: &str, series: &[LineSeries]) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, LINE_PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        if all.is_empty() {
            root.draw(&Text::new(
                "no perplexity to plot",
                (LINE_PLOT_SIZE.0 as i32 / 2, LINE_PLOT_SIZE.1 as i32 / 2),
                TextStyle::from((FAMILY, 20).into_font()).pos(Pos::new(HPos::Center, VPos::Center)),
            ))
            .map_err(pe)?;
            root.present().map_err(pe)?;
            return Ok(());
        }
        let fold = |f: fn(f64, f64) -> f64, init: f64, sel: fn(&(f64, f64)) -> f64| {
            all.iter().map(sel).fold(init, f)
        };
        let (xmin, xmax) = (
            fold(f64::min, f64::INFINITY, |p| p.0),
            fold(f64::max, 0.0, |p| p.0),
        );
        let (ymin, ymax) = (
            fold(f64::min, f64::INFINITY, |p| p.1),
            fold(f64::max, 0.0, |p| p.1),
        );
        let (ymin, ymax) = (ymin.max(1e-3), ymax.max(1e-3));
        let xr = (xmin / 1.25)..(xmax * 1.25);
        let (ylo, yhi) = if ymax / ymin < 1.05 {
            (ymin * 0.9, ymax * 1.1)
        } else {
            (ymin / 1.1, ymax * 1.1)
        };
        let xticks: Vec<f64> = {
            let mut v: Vec<f64> = all.iter().map(|p| p.0).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v.dedup();
            v
        };
        let yticks = log_ticks(ylo, yhi);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(14)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d(
                xr.log_scale().with_key_points(xticks),
                (ylo..yhi).log_scale().with_key_points(yticks),
            )
            .map_err(pe)?;
        chart
            .configure_mesh()
            .x_desc("context length (tokens, K = 1024; log scale)")
            .y_desc("perplexity (log scale)")
            .x_label_formatter(&|v| format_length(v.round() as usize))
            .y_label_formatter(&|v| format_tick(*v))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(pe)?;
        for (i, s) in series.iter().enumerate() {
            let color = match s.name.as_str() {
                super::common::VANILLA => LINE_COLORS[0],
                super::common::DECIMAMBA => LINE_COLORS[1],
                _ => LINE_COLORS[i % LINE_COLORS.len()],
            };
            chart
                .draw_series(plotters::series::LineSeries::new(
                    s.points.clone(),
                    color.stroke_width(3),
                ))
                .map_err(pe)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(pe)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 15))
            .draw()
            .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    })
}

fn series_color(name: &str, i: usize) -> RGBColor {
    match name {
        super::common::VANILLA => LINE_COLORS[0],
        super::common::DECIMAMBA => LINE_COLORS[1],
        _ => LINE_COLORS[i % LINE_COLORS.len()],
    }
}

fn draw_message(path: &Path, size: (u32, u32), message: &str) -> Result<()> {
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        root.draw(&Text::new(
            message.to_string(),
            (size.0 as i32 / 2, size.1 as i32 / 2),
            TextStyle::from((FAMILY, 20).into_font()).pos(Pos::new(HPos::Center, VPos::Center)),
        ))
        .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    })
}

/// Draws lines on linear axes into `path` (PNG): `axes` = (x, y) descriptions, `y_range`
/// fixed (e.g. 0–1 for accuracy) or fitted to the points. The x ticks are the points' x.
pub fn linear_line_plot(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    y_range: Option<(f64, f64)>,
    series: &[LineSeries],
) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if all.is_empty() {
        return draw_message(path, LINE_PLOT_SIZE, "no results to plot");
    }
    let (xmin, xmax) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let pad = ((xmax - xmin) * 0.04).max(0.5);
    let (ylo, yhi) = y_range.unwrap_or_else(|| {
        let (lo, hi) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        let m = ((hi - lo) * 0.08).max(0.05);
        (lo - m, hi + m)
    });
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, LINE_PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(14)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d((xmin - pad)..(xmax + pad), ylo..yhi)
            .map_err(pe)?;
        chart
            .configure_mesh()
            .x_desc(axes.0)
            .y_desc(axes.1)
            .x_label_formatter(&|v| format_tick(*v))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(pe)?;
        for (i, s) in series.iter().enumerate() {
            let color = series_color(&s.name, i);
            chart
                .draw_series(plotters::series::LineSeries::new(
                    s.points.clone(),
                    color.stroke_width(3),
                ))
                .map_err(pe)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(pe)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 15))
            .draw()
            .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    })
}

/// One group of bars per category (e.g. a task), one bar per series (e.g. a method);
/// `values[series][category]`, `None` for a missing bar.
#[derive(Debug, Clone)]
pub struct BarGroups {
    pub categories: Vec<String>,
    pub series: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
}

/// Size of a grouped bar chart with `categories` groups.
pub fn bar_plot_size(categories: usize) -> (u32, u32) {
    (
        (160 * categories as u32 + 200).max(LINE_PLOT_SIZE.0),
        LINE_PLOT_SIZE.1,
    )
}

/// Draws a grouped bar chart into `path` (PNG), y from 0 to the largest value (at least
/// `y_min_top`), each bar labelled with its value.
pub fn grouped_bar_plot(
    path: &Path,
    title: &str,
    y_desc: &str,
    y_min_top: f64,
    bars: &BarGroups,
) -> Result<()> {
    let size = bar_plot_size(bars.categories.len());
    if bars.categories.is_empty() || bars.series.is_empty() {
        return draw_message(path, size, "no results to plot");
    }
    let top = bars
        .values
        .iter()
        .flatten()
        .flatten()
        .fold(y_min_top, |a, &v| a.max(v))
        * 1.12;
    let groups = bars.categories.len();
    let per = bars.series.len() as f64;
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(14)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..groups as f64, 0f64..top)
            .map_err(pe)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(1)
            .x_label_formatter(&|_| String::new())
            .y_desc(y_desc)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(pe)?;
        let width = 0.8 / per;
        for (si, name) in bars.series.iter().enumerate() {
            let color = series_color(name, si);
            let rects: Vec<(f64, f64, f64)> = bars.values[si]
                .iter()
                .enumerate()
                .filter_map(|(c, v)| v.map(|v| (c as f64 + 0.1 + si as f64 * width, v, width)))
                .collect();
            chart
                .draw_series(rects.iter().map(|&(x, v, w)| {
                    Rectangle::new([(x, 0.0), (x + w * 0.92, v)], color.filled())
                }))
                .map_err(pe)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
            chart
                .draw_series(rects.iter().map(|&(x, v, w)| {
                    Text::new(
                        format!("{v:.1}"),
                        (x + w * 0.46, v + top * 0.01),
                        TextStyle::from((FAMILY, 12).into_font())
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(pe)?;
        }
        // Category names under the middle of their groups.
        for (k, name) in bars.categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(k as f64 + 0.5, 0.0));
            root.draw(&Text::new(
                name.clone(),
                (x, y + 10),
                TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(pe)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 15))
            .draw()
            .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmaps_wrap_after_three_panels() {
        assert_eq!(heatmap_size(1), (HEATMAP_PANEL_WIDTH, HEATMAP_HEIGHT));
        assert_eq!(heatmap_size(2), (2 * HEATMAP_PANEL_WIDTH, HEATMAP_HEIGHT));
        assert_eq!(
            heatmap_size(7),
            (3 * HEATMAP_PANEL_WIDTH, 3 * HEATMAP_HEIGHT)
        );
    }

    #[test]
    fn colours_run_red_to_green() {
        assert_eq!(success_color(0.0), RGBColor(215, 48, 39));
        assert_eq!(success_color(1.0), RGBColor(26, 152, 80));
        assert_eq!(success_color(0.5), RGBColor(254, 224, 139));
    }

    #[test]
    fn log_ticks_are_sane() {
        let t = log_ticks(3.0, 5000.0);
        assert!(t.len() >= 3 && t.len() <= 10, "{t:?}");
        assert!(t.iter().all(|v| *v >= 3.0 && *v <= 5000.0));
        let t = log_ticks(10.0, 1e103);
        assert!(t.len() >= 3 && t.len() <= 10, "{t:?}");
        let t = log_ticks(20.0, 24.0);
        assert!(t.len() >= 2, "{t:?}");
    }
}
