//! `/metrics` scraped and parsed by Prometheus' own OpenMetrics parser
//! (Debian's python3-prometheus-client).

use std::collections::HashMap;

use crate::net::{Pair, python};

pub type Labels = Vec<(String, String)>;
/// `(name, sorted labels)` -> value, for every sample.
pub type Samples = HashMap<(String, Labels), f64>;

/// Scrapes `http://{metrics}/metrics` from inside the server namespace.
pub fn scrape(pair: &Pair, metrics: &str) -> Samples {
    let script = format!(
        r#"
import json, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://{metrics}/metrics", timeout=5).read().decode()
out = []
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.append([s.name, sorted(s.labels.items()), s.value])
print(json.dumps(out))
"#
    );
    let out = python(&pair.server, 15, &script);
    let rows: Vec<(String, Labels, f64)> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    rows.into_iter().map(|(n, l, v)| ((n, l), v)).collect()
}

/// One sample's value; panics naming it when it is missing.
pub fn get(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    *s.get(&(name.to_string(), l))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}
