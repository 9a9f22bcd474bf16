//! The analyses' figures (plotters, PNG): the hidden-attention grid (DeciMamba Fig. 3 left),
//! MMD and ΣΔ against context length (Figs. 3 right, 4–5), the Δt profile with the kept
//! tokens, and a score against decimating layer for `find-layer`.

use super::AttentionMap;
use crate::eval::common::format_length;
use crate::eval::plot::{pe, write_via_temp, LineSeries, FAMILY, LINE_COLORS};
use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// The turbo colormap (Google, 2019) by its published polynomial fit; `x` in [0, 1].
pub fn turbo(x: f64) -> RGBColor {
    let x = x.clamp(0.0, 1.0);
    let poly = |c: [f64; 6]| {
        let v = c[0] + x * (c[1] + x * (c[2] + x * (c[3] + x * (c[4] + x * c[5]))));
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    RGBColor(
        poly([
            0.13572138,
            4.61539260,
            -42.66032258,
            132.13108234,
            -152.94239396,
            59.28637943,
        ]),
        poly([
            0.09140261,
            2.19418839,
            4.84296658,
            -14.18503333,
            4.27729857,
            2.82956604,
        ]),
        poly([
            0.10667330,
            12.64194608,
            -60.58204836,
            110.36276771,
            -89.90310912,
            27.34824973,
        ]),
    )
}

/// The colour of a map cell: log10 of the value, clipped at `clip` (−3 for the grid, −2 for
/// one layer, as the authors' notebook), mapped onto turbo.
fn cell_colour(v: f32, clip: f64) -> RGBColor {
    let l = (v as f64).max(1e-30).log10().max(clip);
    turbo((l - clip) / -clip)
}

const CELL: u32 = 200;
const LABEL_W: u32 = 90;
const HEADER_H: u32 = 70;

/// The hidden-attention grid: one row per layer, one column per (caption, maps) entry,
/// `maps[r]` the map of `layers[r]` (None: not drawn).
pub fn attention_grid(
    path: &Path,
    title: &str,
    layers: &[usize],
    columns: &[(String, Vec<Option<&AttentionMap>>)],
    clip: f64,
) -> Result<()> {
    let size = (
        LABEL_W + CELL * columns.len().max(1) as u32 + 20,
        HEADER_H + (CELL + 10) * layers.len().max(1) as u32 + 40,
    );
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let big = TextStyle::from((FAMILY, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        let small =
            TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new(
            title.to_string(),
            (size.0 as i32 / 2, 6),
            big.clone(),
        ))
        .map_err(pe)?;
        for (c, (caption, _)) in columns.iter().enumerate() {
            let x = (LABEL_W + CELL * c as u32 + CELL / 2) as i32;
            root.draw(&Text::new(
                caption.clone(),
                (x, HEADER_H as i32 - 18),
                small.clone(),
            ))
            .map_err(pe)?;
        }
        for (r, &layer) in layers.iter().enumerate() {
            let y0 = (HEADER_H + (CELL + 10) * r as u32) as i32;
            root.draw(&Text::new(
                format!("layer {layer}"),
                (LABEL_W as i32 / 2, y0 + CELL as i32 / 2),
                small.clone(),
            ))
            .map_err(pe)?;
            for (c, (_, maps)) in columns.iter().enumerate() {
                let x0 = (LABEL_W + CELL * c as u32) as i32;
                let Some(map) = maps.get(r).copied().flatten() else {
                    continue;
                };
                let p = map.size.max(1) as i32;
                let px = CELL as i32 - 8;
                for i in 0..p {
                    for j in 0..p {
                        let v = map.values[(i * p + j) as usize];
                        let colour = match j > i {
                            true => WHITE,
                            false => cell_colour(v, clip),
                        };
                        let (a, b) = (
                            (x0 + j * px / p, y0 + i * px / p),
                            (x0 + (j + 1) * px / p, y0 + (i + 1) * px / p),
                        );
                        root.draw(&Rectangle::new([a, b], colour.filled()))
                            .map_err(pe)?;
                    }
                }
            }
        }
        let legend = format!("log10 |α| / max, clipped at {clip}; rows: query, columns: key");
        root.draw(&Text::new(
            legend,
            (size.0 as i32 / 2, size.1 as i32 - 20),
            small,
        ))
        .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    })
}

/// One quantity per layer against context length (log x, log y).
pub fn against_length(path: &Path, title: &str, y_desc: &str, series: &[LineSeries]) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let fold = |f: fn(f64, f64) -> f64, init: f64, sel: fn(&(f64, f64)) -> f64| {
            all.iter().map(sel).fold(init, f)
        };
        let (xmin, xmax) = (
            fold(f64::min, f64::INFINITY, |p| p.0),
            fold(f64::max, 1.0, |p| p.0),
        );
        let (ymin, ymax) = (
            fold(f64::min, f64::INFINITY, |p| p.1).max(1e-6),
            fold(f64::max, 1e-6, |p| p.1),
        );
        let ymin = ymin.min(ymax);
        let mut xticks: Vec<f64> = all.iter().map(|p| p.0).collect();
        xticks.sort_by(f64::total_cmp);
        xticks.dedup();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(14)
            .x_label_area_size(56)
            .y_label_area_size(80)
            .build_cartesian_2d(
                ((xmin / 1.2).max(1.0)..xmax * 1.2)
                    .log_scale()
                    .with_key_points(xticks),
                (ymin / 1.3..ymax * 1.3)
                    .log_scale()
                    .with_key_points(crate::eval::plot::log_ticks(ymin / 1.3, ymax * 1.3)),
            )
            .map_err(pe)?;
        chart
            .configure_mesh()
            .x_desc("context length (tokens, K = 1024; log scale)")
            .y_desc(y_desc)
            .x_label_formatter(&|v| format_length(v.round() as usize))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(pe)?;
        for (i, s) in series.iter().enumerate() {
            let colour = LINE_COLORS[i % LINE_COLORS.len()];
            chart
                .draw_series(plotters::series::LineSeries::new(
                    s.points.clone(),
                    colour.stroke_width(2),
                ))
                .map_err(pe)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                .map_err(pe)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 13))
            .draw()
            .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    })
}

/// One panel of the Δt profile.
pub struct ProfilePanel<'a> {
    pub layer: usize,
    /// (prompt position, ‖Δ_t‖₂) of every token the layer sees.
    pub points: Vec<(f64, f64)>,
    /// Prompt positions the layer's plan keeps (empty: it keeps all).
    pub kept: Vec<f64>,
    pub label: &'a str,
}

/// ‖Δ_t‖₂ against position, one panel per layer, kept tokens in red and the needle span
/// (prompt positions) shaded.
pub fn delta_profile(
    path: &Path,
    title: &str,
    panels: &[ProfilePanel],
    needle: Option<(usize, usize)>,
) -> Result<()> {
    let h = 180 * panels.len().max(1) as u32 + 60;
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1100, h)).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let (top, body) = root.split_vertically(40);
        top.draw(&Text::new(
            title.to_string(),
            (550, 10),
            TextStyle::from((FAMILY, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(pe)?;
        let areas = body.split_evenly((panels.len().max(1), 1));
        for (area, p) in areas.iter().zip(panels) {
            let xmax = p.points.iter().map(|q| q.0).fold(1.0, f64::max);
            let ymax = p.points.iter().map(|q| q.1).fold(1e-6, f64::max) * 1.05;
            let mut chart = ChartBuilder::on(area)
                .margin(6)
                .x_label_area_size(28)
                .y_label_area_size(60)
                .caption(format!("layer {} {}", p.layer, p.label), (FAMILY, 14))
                .build_cartesian_2d(0f64..xmax, 0f64..ymax)
                .map_err(pe)?;
            chart
                .configure_mesh()
                .x_labels(8)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_labels(4)
                .y_desc("‖Δt‖₂")
                .label_style((FAMILY, 12))
                .light_line_style(WHITE)
                .draw()
                .map_err(pe)?;
            if let Some((start, len)) = needle {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(start as f64, 0.0), ((start + len.max(1)) as f64, ymax)],
                        RGBColor(255, 200, 0).mix(0.5).filled(),
                    )))
                    .map_err(pe)?;
            }
            chart
                .draw_series(plotters::series::LineSeries::new(
                    p.points.clone(),
                    RGBColor(31, 119, 180).stroke_width(1),
                ))
                .map_err(pe)?;
            let norm_at: std::collections::HashMap<u64, f64> =
                p.points.iter().map(|&(x, y)| (x as u64, y)).collect();
            chart
                .draw_series(p.kept.iter().filter_map(|&x| {
                    norm_at
                        .get(&(x as u64))
                        .map(|&y| Circle::new((x, y), 2, RGBColor(214, 39, 40).filled()))
                }))
                .map_err(pe)?;
        }
        root.present().map_err(pe)?;
        Ok(())
    })
}

/// `find-layer`'s score against the decimating layer (linear axes), the best one marked.
pub fn score_by_layer(
    path: &Path,
    title: &str,
    y_desc: &str,
    points: &[(usize, f64)],
    best: Option<usize>,
) -> Result<()> {
    write_via_temp(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let xmax = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
        let xmin = points.iter().map(|p| p.0).min().unwrap_or(0) as f64;
        let ys = points.iter().map(|p| p.1);
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let pad = ((hi - lo).abs() * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(14)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((xmin - 0.5)..(xmax + 0.5), (lo - pad)..(hi + pad))
            .map_err(pe)?;
        chart
            .configure_mesh()
            .x_desc("decimating layer")
            .y_desc(y_desc)
            .x_label_formatter(&|v| format!("{:.0}", v))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(WHITE)
            .draw()
            .map_err(pe)?;
        let pts: Vec<(f64, f64)> = points.iter().map(|&(l, v)| (l as f64, v)).collect();
        chart
            .draw_series(plotters::series::LineSeries::new(
                pts.clone(),
                RGBColor(31, 119, 180).stroke_width(2),
            ))
            .map_err(pe)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|&p| Circle::new(p, 4, RGBColor(31, 119, 180).filled())),
            )
            .map_err(pe)?;
        if let Some(b) = best {
            chart
                .draw_series(
                    pts.iter()
                        .filter(|p| p.0 as usize == b)
                        .map(|&p| Circle::new(p, 8, RGBColor(214, 39, 40).stroke_width(3))),
                )
                .map_err(pe)?;
        }
        root.present().map_err(pe)?;
        Ok(())
    })
}
