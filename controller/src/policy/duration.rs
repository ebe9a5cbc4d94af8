//! Durations as Kubernetes users write them (Gateway API timeouts, annotations, flags):
//! Go-style `1h30m`, `10s`, `500ms`, `1.5s`, `250us`. A bare number is refused: its unit
//! would be a guess.

use std::time::Duration;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration (e.g. 10s, 500ms, 1h30m): {reason}")]
pub struct DurationError {
    /// The text.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a Go-style duration: one or more `<number><unit>` with units `h`, `m`, `s`, `ms`,
/// `us`/`µs`, `ns`; numbers may have a fraction. Negative durations are refused.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let error = |reason| DurationError {
        text: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(error("empty"));
    }
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = trimmed;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| error("a number without a unit"))?;
        if number_len == 0 {
            return Err(error("expected a number"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| error("not a number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(error("unknown unit (use h, m, s, ms, us or ns)")),
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).map_err(|_| error("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations_parse_and_the_rest_is_refused() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("10s", Some(Duration::from_secs(10))),
            ("500ms", Some(Duration::from_millis(500))),
            ("1h30m", Some(Duration::from_secs(5400))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("24h", Some(Duration::from_secs(86400))),
            ("250us", Some(Duration::from_micros(250))),
            (" 2m ", Some(Duration::from_secs(120))),
            ("0", Some(Duration::ZERO)),
            ("10", None),
            ("", None),
            ("-1s", None),
            ("5 s", None),
            ("1d", None),
            ("s", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).ok(), *want, "{text:?}");
        }
    }
}
