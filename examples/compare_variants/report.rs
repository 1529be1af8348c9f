//! The written results: a text table, CSV, JSON and an SVG of the loss curves.

use crate::core::MethodResult;

/// Trainable parameters of full fine-tuning, the 100% reference.
fn full_params(results: &[MethodResult]) -> Option<usize> {
    results
        .iter()
        .find(|r| r.method == crate::methods::Method::Full)
        .map(|r| r.trainable_params)
}

/// The loss level whose first crossing the report counts steps to.
pub const LOSS_MARK: f64 = 0.01;

/// The first step (1-based) whose loss is below [`LOSS_MARK`].
fn steps_to_mark(r: &MethodResult) -> Option<usize> {
    r.losses.iter().position(|l| *l < LOSS_MARK).map(|i| i + 1)
}

fn steps_cell(r: &MethodResult) -> String {
    steps_to_mark(r).map_or("-".to_string(), |s| s.to_string())
}

fn percent(r: &MethodResult, full: Option<usize>) -> f64 {
    full.map_or(f64::NAN, |f| 100.0 * r.trainable_params as f64 / f as f64)
}

/// The table printed at the end of the run.
pub fn table(results: &[MethodResult]) -> String {
    let full = full_params(results);
    let mut s = format!(
        "{:<18} {:>10} {:>8} {:>10} {:>9} {:>10} {:>12} {:>8}\n",
        "method",
        "trainable",
        "% full",
        "acc before",
        "acc after",
        "final loss",
        "steps<0.01",
        "ms/step"
    );
    for r in results {
        s += &format!(
            "{:<18} {:>10} {:>7.2}% {:>9.1}% {:>8.1}% {:>10.4} {:>12} {:>8.2}\n",
            r.method.name(),
            r.trainable_params,
            percent(r, full),
            100.0 * r.acc_before,
            100.0 * r.acc_after,
            r.final_loss,
            steps_cell(r),
            r.ms_per_step
        );
    }
    s
}

/// The same table as CSV.
pub fn csv(results: &[MethodResult]) -> String {
    let full = full_params(results);
    let mut s = String::from(
        "method,trainable_params,percent_of_full,acc_before,acc_after,final_loss,steps_to_0.01,ms_per_step\n",
    );
    for r in results {
        s += &format!(
            "{},{},{:.4},{:.4},{:.4},{:.6},{},{:.3}\n",
            r.method.name(),
            r.trainable_params,
            percent(r, full),
            r.acc_before,
            r.acc_after,
            r.final_loss,
            steps_cell(r),
            r.ms_per_step
        );
    }
    s
}

/// The table and the loss curves as JSON.
pub fn json(results: &[MethodResult]) -> String {
    let full = full_params(results);
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "method": r.method.name(),
                "trainable_params": r.trainable_params,
                "percent_of_full": percent(r, full),
                "acc_before": r.acc_before,
                "acc_after": r.acc_after,
                "final_loss": r.final_loss,
                "steps_to_0.01": steps_to_mark(r),
                "ms_per_step": r.ms_per_step,
                "losses": r.losses,
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

const COLORS: [&str; 10] = [
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22",
];

/// Loss curves of all methods (log-scale loss against step), as an SVG document.
pub fn loss_svg(results: &[MethodResult]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 60.0, 190.0, 20.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let steps = results
        .iter()
        .map(|r| r.losses.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let logs: Vec<f64> = results
        .iter()
        .flat_map(|r| r.losses.iter().map(|l| l.max(1e-6).log10()))
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let hi = logs
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil()
        .max(lo + 1.0);
    let x = |i: usize| left + pw * i as f64 / (steps - 1) as f64;
    let y = |l: f64| top + ph * (hi - l.max(1e-6).log10()) / (hi - lo);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n"
    );
    let mut decade = lo;
    while decade <= hi {
        let yy = top + ph * (hi - decade) / (hi - lo);
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">1e{decade}</text>\n",
            left + pw,
            left - 6.0,
            yy + 4.0
        );
        decade += 1.0;
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">adaptation step (task B: reverse)</text>\n",
        left + pw / 2.0,
        h - 8.0
    );
    for (k, r) in results.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> = r
            .losses
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{:.1},{:.1}", x(i), y(*l)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.2\" points=\"{}\"/>\n",
            points.join(" ")
        );
        let ly = top + 16.0 * k as f64 + 10.0;
        s += &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            w - right + 10.0,
            w - right + 30.0,
            w - right + 36.0,
            ly + 4.0,
            r.method.name()
        );
    }
    s + "</svg>\n"
}
