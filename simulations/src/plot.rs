//! SVG plots of a run folder, drawn from its CSV files (so `tidings-sim plot DIR` can redraw
//! them): latency CDF by path, delivery over time, mailbox occupancy, bytes per node.

use std::path::Path;

use plotters::prelude::*;

use crate::output::{self, OutputError};

pub const LATENCY_CDF: &str = "latency_cdf.svg";
pub const DELIVERY_OVER_TIME: &str = "delivery_over_time.svg";
pub const MAILBOX_OCCUPANCY: &str = "mailbox_occupancy.svg";
pub const BYTES_PER_NODE: &str = "bytes_per_node.svg";

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A named line.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn num(path: &Path, line: usize, s: &str) -> Result<f64, OutputError> {
    s.parse().map_err(|_| OutputError::Csv {
        path: path.display().to_string(),
        line,
    })
}

/// Draws every plot of a run folder from its CSVs.
pub fn plot_dir(dir: &Path) -> Result<(), OutputError> {
    let title = output::read_manifest(dir)
        .map(|m| format!("{} (seed {})", m.scenario_name, m.seed))
        .unwrap_or_default();

    // Latency CDF.
    let path = dir.join(output::LATENCY);
    let mut lat: Vec<Series> = Vec::new();
    for (i, row) in output::read_csv(&path, 3)?.iter().enumerate() {
        let (q, v) = (num(&path, i + 2, &row[1])?, num(&path, i + 2, &row[2])?);
        if !v.is_finite() {
            continue;
        }
        match lat.iter_mut().find(|s| s.name == row[0]) {
            Some(s) => s.points.push((v.max(0.1), q)),
            None => lat.push(Series {
                name: row[0].clone(),
                points: vec![(v.max(0.1), q)],
            }),
        }
    }
    lines(
        &dir.join(LATENCY_CDF),
        &format!("Delivery latency CDF — {title}"),
        "latency (ms)",
        "fraction delivered",
        &lat,
        true,
    )?;

    // Delivery over time.
    let path = dir.join(output::DELIVERY);
    let mut on_time = Series {
        name: "delivered within deadline".into(),
        points: Vec::new(),
    };
    let mut by_end = Series {
        name: "delivered by end of run".into(),
        points: Vec::new(),
    };
    for (i, row) in output::read_csv(&path, 4)?.iter().enumerate() {
        let t = num(&path, i + 2, &row[0])? / 3_600.0;
        let sent = num(&path, i + 2, &row[1])?;
        if sent > 0.0 {
            on_time.points.push((t, num(&path, i + 2, &row[2])? / sent));
            by_end.points.push((t, num(&path, i + 2, &row[3])? / sent));
        }
    }
    lines(
        &dir.join(DELIVERY_OVER_TIME),
        &format!("Delivery by send time — {title}"),
        "time sent (h)",
        "fraction of messages",
        &[on_time, by_end],
        false,
    )?;

    // Mailbox occupancy.
    let path = dir.join(output::TIMESERIES);
    let mut total = Series {
        name: "envelopes held, all relays".into(),
        points: Vec::new(),
    };
    let mut max = Series {
        name: "most on one relay".into(),
        points: Vec::new(),
    };
    for (i, row) in output::read_csv(&path, output::TIMESERIES_COLUMNS.len())
        // Folders written before the memory column have nine, before the connection columns seven.
        .or_else(|_| output::read_csv(&path, 9))
        .or_else(|_| output::read_csv(&path, 7))?
        .iter()
        .enumerate()
    {
        let t = num(&path, i + 2, &row[0])? / 3_600.0;
        total.points.push((t, num(&path, i + 2, &row[3])?));
        max.points.push((t, num(&path, i + 2, &row[4])?));
    }
    lines(
        &dir.join(MAILBOX_OCCUPANCY),
        &format!("Mailbox occupancy — {title}"),
        "time (h)",
        "envelopes",
        &[total, max],
        false,
    )?;

    // Bytes per node.
    let path = dir.join(output::BYTES);
    let mut bytes: Vec<Series> = Vec::new();
    for (i, row) in output::read_csv(&path, 4)?.iter().enumerate() {
        let name = format!("{} {}", row[0], row[1]);
        let (q, v) = (num(&path, i + 2, &row[2])?, num(&path, i + 2, &row[3])?);
        // The totals and a client's three main protocols; the rest (Tier A counts more) are in
        // the CSV. More lines than the palette's colours would repeat them.
        let keep =
            row[1] == "total" || (row[0] == "client" && ["kad", "deliver", "mailbox"].contains(&row[1].as_str()));
        if !keep {
            continue;
        }
        match bytes.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((v.max(1.0), q)),
            None => bytes.push(Series {
                name,
                points: vec![(v.max(1.0), q)],
            }),
        }
    }
    lines(
        &dir.join(BYTES_PER_NODE),
        &format!("Bytes per node (CDF) — {title}"),
        "bytes over the run",
        "fraction of nodes",
        &bytes,
        true,
    )
}

fn lines(
    path: &Path,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), OutputError> {
    let fail = |e: &dyn std::fmt::Display| OutputError::Plot {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for (x, y) in all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if !x0.is_finite() || !x1.is_finite() {
        (x0, x1) = (if log_x { 1.0 } else { 0.0 }, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 * 2.0 + 1.0;
    }
    let y1 = if y1 <= 1.0 { 1.02 } else { y1 * 1.05 };
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()
                .map_err(|e| fail(&e))?;
            for (i, s) in series.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))
                    .map_err(|e| fail(&e))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| fail(&e))?;
        }};
    }
    if log_x {
        draw!(
            builder
                .build_cartesian_2d((x0..x1).log_scale(), 0.0..y1)
                .map_err(|e| fail(&e))?
        );
    } else {
        draw!(builder.build_cartesian_2d(x0..x1, 0.0..y1).map_err(|e| fail(&e))?);
    }
    root.present().map_err(|e| fail(&e))
}
