//! A parser for the Prometheus text exposition the proxies serve (OpenMetrics flavour, as
//! `prometheus-client` writes it): `name{label="value",...} value [timestamp]` lines, with
//! `#` comments.
//!
//! Hand-written rather than a crate: we read only our own proxies' counters, gauges and
//! histograms, and the exposition crates pull in parsers for formats we never see. It is
//! lenient: a line it cannot read is skipped and counted, never fatal, so one odd metric
//! from a newer proxy cannot hide the rest.

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, with its suffix (`request_total`, `response_latency_ms_bucket`).
    pub name: String,
    /// The labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value; `+Inf`, `-Inf` and `NaN` included.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or "" when absent (as Prometheus treats a missing label).
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// What a parse produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Every sample read.
    pub samples: Vec<Sample>,
    /// Lines that were neither comments nor samples.
    pub skipped_lines: usize,
}

/// Parses a whole exposition.
pub fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(sample) => out.samples.push(sample),
            None => out.skipped_lines += 1,
        }
    }
    out
}

/// One sample line, or `None` when it is malformed.
pub fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // The value, then an optional timestamp we do not need.
    let value = rest.split_ascii_whitespace().next()?;
    let value = value.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` and returns the labels and what follows the brace.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start();
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = text.find('=')?;
        let name = text[..eq].trim();
        if name.is_empty() {
            return None;
        }
        let after_eq = text[eq + 1..].trim_start().strip_prefix('"')?;
        let (value, after_value) = parse_quoted(after_eq)?;
        labels.push((name.to_owned(), value));
        text = after_value.trim_start();
        if let Some(after_comma) = text.strip_prefix(',') {
            text = after_comma;
        } else if !text.starts_with('}') {
            return None;
        }
    }
}

/// Reads a label value up to its closing quote, undoing `\\`, `\"` and `\n`.
fn parse_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[at + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            other => value.push(other),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_name_labels_and_value() {
        type Want<'a> = Option<(&'a str, Vec<(&'a str, &'a str)>, f64)>;
        let cases: Vec<(&str, Want)> = vec![
            ("up 1", Some(("up", vec![], 1.0))),
            ("up 1 1700000000", Some(("up", vec![], 1.0))),
            (
                r#"request_total{direction="inbound",tls="true"} 42"#,
                Some((
                    "request_total",
                    vec![("direction", "inbound"), ("tls", "true")],
                    42.0,
                )),
            ),
            (
                r#"response_latency_ms_bucket{le="+Inf"} 7"#,
                Some(("response_latency_ms_bucket", vec![("le", "+Inf")], 7.0)),
            ),
            (
                r#"x{a="say \"hi\"\n",b="back\\slash"} 2.5e1"#,
                Some(("x", vec![("a", "say \"hi\"\n"), ("b", "back\\slash")], 25.0)),
            ),
            (r#"x{a="",} 1"#, Some(("x", vec![("a", "")], 1.0))),
            (
                r#"x{a="1"} +Inf"#,
                Some(("x", vec![("a", "1")], f64::INFINITY)),
            ),
            // Malformed: skipped, never a panic.
            (r#"x{a="unterminated} 1"#, None),
            (r#"x{a=1} 1"#, None),
            ("x", None),
            ("x{} notanumber", None),
            ("{a=\"1\"} 1", None),
            (r#"x{a="1" b="2"} 1"#, None),
        ];
        for (line, want) in cases {
            let got = parse_line(line);
            match (got, want) {
                (None, None) => {}
                (Some(sample), Some((name, labels, value))) => {
                    assert_eq!(sample.name, name, "{line}");
                    let labels: Vec<(String, String)> = labels
                        .into_iter()
                        .map(|(n, v)| (n.to_owned(), v.to_owned()))
                        .collect();
                    assert_eq!(sample.labels, labels, "{line}");
                    assert_eq!(sample.value, value, "{line}");
                }
                (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_whole_exposition_skips_comments_and_counts_bad_lines() {
        let text = "# HELP request Requests received\n\
                    # TYPE request counter\n\
                    request_total{direction=\"inbound\"} 3\n\
                    garbage here\n\
                    \n\
                    # EOF\n";
        let parsed = parse(text);
        assert_eq!(parsed.samples.len(), 1);
        assert_eq!(parsed.samples[0].label("direction"), "inbound");
        assert_eq!(parsed.samples[0].label("missing"), "");
        assert_eq!(parsed.skipped_lines, 1);
    }
}
