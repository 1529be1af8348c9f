//! Loss curves as an SVG document (log-scale loss against step), shared by the examples.

const COLORS: [&str; 10] = [
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22",
];

/// One named curve: `(step, loss)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// The curves on one log-scale plot with a legend, `x_label` under the step axis.
pub fn loss_svg(series: &[Series], x_label: &str) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 60.0, 190.0, 20.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let (x_lo, x_hi) = if x_lo.is_finite() && x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (0.0, 1.0)
    };
    let logs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1.max(1e-6).log10()))
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let lo = if lo.is_finite() { lo } else { 0.0 };
    let hi = logs
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil()
        .max(lo + 1.0);
    let x = |v: f64| left + pw * (v - x_lo) / (x_hi - x_lo);
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
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n",
        left + pw / 2.0,
        h - 8.0
    );
    for (k, curve) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> = curve
            .points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
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
            curve.name
        );
    }
    s + "</svg>\n"
}
