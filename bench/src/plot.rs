//! PNG plots (plotters, bitmap backend; text through ab_glyph with a TTF
//! loaded at run time, so no system fontconfig is needed):
//! latency over time with the snapshot window shaded, one panel per mode;
//! pause and worst latency against guest size, one line per mode.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{BenchError, Result};
use crate::kv_run::label;
use crate::report::Report;
use crate::stats::Window;

const FONT: &str = "sans-serif";

static FONT_LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

fn load_font(path: &Path) -> Result<()> {
    FONT_LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(path).map_err(|e| {
                format!(
                    "{}: {e} (install fonts-dejavu-core or pass --font)",
                    path.display()
                )
            })?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(|message| BenchError::Plot {
            path: path.to_path_buf(),
            message,
        })
}

/// One panel: p99 and max per bucket (ms, log scale) over time (s).
struct Panel {
    title: String,
    /// (t_s, p99_ms, max_ms)
    points: Vec<(f64, f64, f64)>,
    window: (f64, f64),
    p99_label: &'static str,
    max_label: &'static str,
}

fn secs(w: &Window) -> (f64, f64) {
    (w.start_ns as f64 / 1e9, w.end_ns as f64 / 1e9)
}

/// The series legend, drawn the same way on every plot.
fn draw_legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>) -> std::result::Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| x.to_string())
}

fn err(path: &Path) -> impl Fn(String) -> BenchError + '_ {
    move |message| BenchError::Plot {
        path: path.to_path_buf(),
        message,
    }
}

fn grid(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let e = err(path);
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (1200, 60 + 320 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root
        .titled(title, (FONT, 22))
        .map_err(|x| e(x.to_string()))?;
    let areas = root.split_evenly((rows, cols));
    for (p, area) in panels.iter().zip(areas.iter()) {
        let t_max = p
            .points
            .iter()
            .map(|x| x.0)
            .fold(p.window.1, f64::max)
            .max(0.1);
        let y_max = p.points.iter().map(|x| x.2).fold(1.0, f64::max) * 2.0;
        let y_min = p
            .points
            .iter()
            .map(|x| x.1)
            .filter(|v| *v > 0.0)
            .fold(y_max, f64::min)
            .clamp(0.001, 1.0)
            / 2.0;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, (FONT, 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..t_max, (y_min..y_max).log_scale())
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("latency (ms)")
            .light_line_style(TRANSPARENT)
            .label_style((FONT, 12))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (p.window.0, y_min),
                    (p.window.1.max(p.window.0 + 0.01), y_max),
                ],
                RGBColor(255, 200, 120).mix(0.4).filled(),
            )))
            .map_err(|x| e(x.to_string()))?
            .label("snapshot window")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 15, y + 5)],
                    RGBColor(255, 200, 120).filled(),
                )
            });
        chart
            .draw_series(LineSeries::new(
                p.points.iter().map(|x| (x.0, x.2.max(y_min))),
                &RED,
            ))
            .map_err(|x| e(x.to_string()))?
            .label(p.max_label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], RED));
        chart
            .draw_series(LineSeries::new(
                p.points.iter().map(|x| (x.0, x.1.max(y_min))),
                &BLUE,
            ))
            .map_err(|x| e(x.to_string()))?
            .label(p.p99_label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLUE));
        draw_legend(&mut chart).map_err(&e)?;
    }
    root.present().map_err(|x| e(x.to_string()))
}

/// (name, x, y) points drawn as one line per name.
fn lines(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let e = err(path);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let all = series.iter().flat_map(|s| s.1.iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let y_max = all.clone().map(|p| p.1).fold(1.0, f64::max) * 2.0;
    let y_min = all
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .fold(y_max, f64::min)
        .clamp(0.001, 1.0)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("guest RAM (GiB)")
        .y_desc(y_desc)
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 13))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1.max(y_min))),
                color.stroke_width(2),
            ))
            .map_err(|x| e(x.to_string()))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1.max(y_min)), 3, color.filled())),
            )
            .map_err(|x| e(x.to_string()))?;
    }
    draw_legend(&mut chart).map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))
}

fn gib(mib: u64) -> f64 {
    mib as f64 / 1024.0
}

fn size_tag(mib: u64) -> String {
    if mib % 1024 == 0 {
        format!("{}g", mib / 1024)
    } else {
        format!("{mib}m")
    }
}

/// Writes every plot into `out`; returns the file names.
/// With `every_size` false, the latency-over-time grids are drawn for the
/// largest size only (they are big files).
pub fn all(r: &Report, out: &Path, font: &Path, every_size: bool) -> Result<Vec<String>> {
    load_font(font)?;
    let mut files = Vec::new();

    // Latency over time, one image per (size, backing), one panel per mode.
    let largest = r.kv.iter().map(|k| k.memory_mib).max().unwrap_or(0);
    let mut groups: Vec<(u64, bool)> =
        r.kv.iter()
            .map(|k| (k.memory_mib, k.hugepages))
            .filter(|g| every_size || g.0 == largest)
            .collect();
    groups.dedup();
    for (mib, huge) in groups {
        let mut panels: Vec<Panel> =
            r.kv.iter()
                .filter(|k| k.memory_mib == mib && k.hugepages == huge)
                .map(|k| Panel {
                    title: format!(
                        "{} ({} ms buckets)",
                        label(&k.mode, k.workers),
                        r.config["bucket_ms"]
                    ),
                    points: k
                        .windows
                        .series
                        .iter()
                        .map(|b| (b.t_s, b.p99_us / 1e3, b.max_us / 1e3))
                        .collect(),
                    window: secs(&k.windows.snapshot),
                    p99_label: "client p99",
                    max_label: "client max",
                })
                .collect();
        if huge {
            panels.extend(r.redis.iter().filter(|x| x.memory_mib == mib).map(|x| {
                Panel {
                    title: "native redis-server BGSAVE (same dataset)".into(),
                    points: x
                        .windows
                        .series
                        .iter()
                        .map(|b| (b.t_s, b.p99_us / 1e3, b.max_us / 1e3))
                        .collect(),
                    window: secs(&x.windows.snapshot),
                    p99_label: "client p99",
                    max_label: "client max",
                }
            }));
        }
        let name = format!(
            "latency-{}-{}.png",
            size_tag(mib),
            if huge { "thp" } else { "4k" }
        );
        grid(
            &out.join(&name),
            &format!(
                "KV guest {} MiB, {} pages: open-loop client latency, snapshot window shaded",
                mib,
                if huge { "THP" } else { "4 KiB" }
            ),
            &panels,
        )?;
        files.push(name);
    }

    // The same ELF in mode=bench under snapvm and QEMU.
    if !r.guest_bench.is_empty() {
        let panels: Vec<Panel> = r
            .guest_bench
            .iter()
            .map(|g| Panel {
                title: format!("{} {}", g.vmm, g.mode),
                points: g
                    .series
                    .iter()
                    .map(|(t, w)| (*t, w.p99_us / 1e3, w.max_stall_us.max(w.max_us) / 1e3))
                    .collect(),
                window: secs(&g.snapshot_window),
                p99_label: "guest p99 per window",
                max_label: "guest max op / stall",
            })
            .collect();
        let name = "guest-bench.png".to_string();
        grid(
            &out.join(&name),
            "Same guest ELF, mode=bench: guest-observed latency, snapshot window shaded",
            &panels,
        )?;
        files.push(name);
    }

    // Pause and worst latency against size.
    let mut names: Vec<(String, bool)> =
        r.kv.iter()
            .map(|k| (label(&k.mode, k.workers), k.hugepages))
            .collect();
    names.sort();
    names.dedup();
    let series =
        |f: &dyn Fn(&crate::kv_run::KvRun) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
            names
                .iter()
                .map(|(n, huge)| {
                    let pts =
                        r.kv.iter()
                            .filter(|k| &label(&k.mode, k.workers) == n && k.hugepages == *huge)
                            .filter_map(|k| f(k).map(|y| (gib(k.memory_mib), y)))
                            .collect();
                    (
                        format!("{n} ({})", if *huge { "THP" } else { "4 KiB" }),
                        pts,
                    )
                })
                .collect()
        };
    if !r.kv.is_empty() {
        let name = "pause-vs-size.png".to_string();
        lines(
            &out.join(&name),
            "Sync-phase pause (metrics.json) against guest size",
            "pause (ms)",
            &series(&|k| k.sync_pause_us.map(|u| u / 1e3)),
        )?;
        files.push(name);
        let name = "max-latency-vs-size.png".to_string();
        lines(
            &out.join(&name),
            "Worst client latency during the snapshot against guest size",
            "max latency (ms)",
            &series(&|k| Some(k.windows.snapshot_latency.max_us / 1e3)),
        )?;
        files.push(name);
    }
    Ok(files)
}
