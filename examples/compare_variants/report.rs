//! The written results: a text table, CSV, JSON and an SVG of the loss curves.

use crate::core::MethodResult;
use crate::loss_plot::Series;

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

/// Loss curves of all methods (log-scale loss against step), as an SVG document.
pub fn loss_svg(results: &[MethodResult]) -> String {
    let series: Vec<Series> = results
        .iter()
        .map(|r| Series {
            name: r.method.name(),
            points: r
                .losses
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as f64, l))
                .collect(),
        })
        .collect();
    crate::loss_plot::loss_svg(&series, "adaptation step (task B: reverse)")
}
