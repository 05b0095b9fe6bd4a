//! The usage page's charts as server-rendered SVG: requests over time by
//! status class (stacked bars), refusals by reason (horizontal bars). Each
//! has a text alternative; the numbers are also in the table beside it.

use maud::{Markup, html};

use crate::api::LogSummary;

/// Status classes: label and a fill with at least 3:1 contrast on white
/// (WCAG non-text contrast).
const CLASSES: [(&str, &str); 4] = [
    ("2xx", "#1b6e3a"),
    ("3xx", "#1d4f91"),
    ("4xx", "#a3461b"),
    ("5xx", "#7a1f5c"),
];

const W: i64 = 720;
const H: i64 = 180;
const PAD: i64 = 30;

pub fn over_time(s: &LogSummary) -> Markup {
    let max = s
        .buckets
        .iter()
        .map(|b| b.s2xx + b.s3xx + b.s4xx + b.s5xx)
        .max()
        .unwrap_or(0)
        .max(1);
    let n = s.buckets.len().max(1) as i64;
    let slot = (W - PAD) / n;
    let bar = (slot - 2).max(1);
    let label = format!(
        "Requests over time by status class: {} in all, from {} to {}",
        s.total,
        super::layout::time_ms(s.since_ms),
        super::layout::time_ms(s.until_ms)
    );
    html! {
        figure {
            svg class="chart" role="img" aria-label=(label) viewBox=(format!("0 0 {W} {}", H + 20)) width=(W) height=(H + 20) {
                line x1=(PAD) y1=(H) x2=(W) y2=(H) stroke="#333" {}
                text x="0" y="12" font-size="11" fill="#222" { (max) }
                text x="0" y=(H) font-size="11" fill="#222" { "0" }
                @for (i, b) in s.buckets.iter().enumerate() {
                    @let x = PAD + i as i64 * slot;
                    @let counts = [b.s2xx, b.s3xx, b.s4xx, b.s5xx];
                    @let mut y = H;
                    @for (j, c) in counts.iter().enumerate() {
                        @if *c > 0 {
                            @let h = ((*c as i64) * (H - 10) / max as i64).max(1);
                            @let top = { y -= h; y };
                            rect x=(x) y=(top) width=(bar) height=(h) fill=(CLASSES[j].1) {
                                title { (CLASSES[j].0) ": " (c) " from " (super::layout::time_ms(b.at_ms)) }
                            }
                        }
                    }
                }
                text x=(PAD) y=(H + 15) font-size="11" fill="#222" { (super::layout::time_ms(s.since_ms)) }
                text x=(W) y=(H + 15) font-size="11" fill="#222" text-anchor="end" { (super::layout::time_ms(s.until_ms)) }
            }
            figcaption {
                "Requests over time. "
                @for (name, color) in CLASSES {
                    span class="legend" { span class="swatch" data-color=(color) aria-hidden="true" {
                        svg width="10" height="10" { rect width="10" height="10" fill=(color) {} } } " " (name) }
                }
            }
        }
    }
}

pub fn refusals(s: &LogSummary) -> Markup {
    if s.refusals.is_empty() {
        return html! { p { "No refusal in this range." } };
    }
    let max = s.refusals.iter().map(|r| r.count).max().unwrap_or(1).max(1);
    let row = 22;
    let height = row * s.refusals.len() as i64;
    let label = s
        .refusals
        .iter()
        .map(|r| format!("{}: {}", r.reason, r.count))
        .collect::<Vec<_>>()
        .join(", ");
    html! {
        figure {
            svg class="chart" role="img" aria-label=(format!("Refusals by reason: {label}")) viewBox=(format!("0 0 {W} {height}")) width=(W) height=(height) {
                @for (i, r) in s.refusals.iter().enumerate() {
                    @let y = i as i64 * row;
                    @let w = ((r.count as i64) * (W - 260) / max as i64).max(1);
                    text x="0" y=(y + 15) font-size="12" fill="#222" { (r.reason) }
                    rect x="160" y=(y + 3) width=(w) height="16" fill="#a3461b" {}
                    text x=(165 + w) y=(y + 15) font-size="12" fill="#222" { (r.count) }
                }
            }
            figcaption { "Refusals by reason." }
        }
    }
}
