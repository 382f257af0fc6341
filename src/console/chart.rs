//! A group's arrivals over time as a small inline SVG bar chart: no script,
//! no image request, readable without colour (each bar has a title).

/// Chart size in CSS pixels.
const WIDTH: u32 = 144;
const HEIGHT: u32 = 28;

/// Bars for `counts` (oldest first), scaled to the largest; `label` says the
/// span (e.g. "2026-12-01 10:00 to 2026-12-02 10:00") for screen readers.
pub fn arrivals(counts: &[u32], label: &str) -> String {
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    let n = counts.len().max(1) as u32;
    let bar = WIDTH / n;
    let mut svg = format!(
        r#"<svg class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="arrivals {label}">"#,
        label = super::page::esc(label)
    );
    for (i, &count) in counts.iter().enumerate() {
        // A bucket with any job gets at least one pixel, so it never looks empty.
        let h = if count == 0 {
            0
        } else {
            (count * (HEIGHT - 1)).div_ceil(max).max(1)
        };
        let x = i as u32 * bar;
        svg.push_str(&format!(
            r#"<rect x="{x}" y="{y}" width="{w}" height="{h}"><title>{count}</title></rect>"#,
            y = HEIGHT - h,
            w = bar.saturating_sub(1).max(1),
        ));
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_and_a_lone_job_is_visible() {
        let svg = arrivals(&[0, 1, 100], "a <b>");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains(r#"height="0"><title>0</title>"#), "{svg}");
        assert!(svg.contains(r#"height="1"><title>1</title>"#), "{svg}");
        assert!(
            svg.contains(&format!(
                r#"y="1" width="47" height="{}"><title>100</title>"#,
                HEIGHT - 1
            )),
            "{svg}"
        );
        assert!(svg.contains("a &lt;b&gt;"), "the label is escaped");
        assert_eq!(arrivals(&[], "").matches("<rect").count(), 0);
    }
}
