//! How a command prints what it found (`-o`): a table for people, or the same data as JSON or
//! YAML for programs, as kubectl does. One type for every command, so `-o yaml` works wherever
//! `-o json` does.

use anyhow::Context as _;
use serde::Serialize;

/// The output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// Indented JSON.
    Json,
    /// YAML.
    Yaml,
}

impl Output {
    /// `value` in this format: JSON for `Json` (and for `Table`, whose callers print their own
    /// tables and never ask), YAML for `Yaml`.
    pub fn render(self, value: &impl Serialize) -> anyhow::Result<String> {
        match self {
            Output::Yaml => serde_saphyr::to_string(value).context("writing YAML"),
            Output::Json | Output::Table => {
                serde_json::to_string_pretty(value).context("writing JSON")
            }
        }
    }

    /// Prints `value` in this format.
    pub fn print(self, value: &impl Serialize) -> anyhow::Result<()> {
        let text = self.render(value)?;
        println!("{}", text.trim_end());
        Ok(())
    }

    /// One item of a stream (`meshctl tap -o json|yaml`): a JSON object per line, or a YAML
    /// document per item.
    pub fn stream_item(self, value: &impl Serialize) -> anyhow::Result<String> {
        match self {
            Output::Yaml => Ok(format!("---\n{}", self.render(value)?.trim_end())),
            Output::Json | Output::Table => serde_json::to_string(value).context("writing JSON"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_carry_the_same_data() {
        let value = serde_json::json!({"name": "web", "rps": 1.5, "tls": ["mtls"]});
        let json: serde_json::Value =
            serde_json::from_str(&Output::Json.render(&value).expect("json")).expect("parse");
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&Output::Yaml.render(&value).expect("yaml")).expect("parse");
        assert_eq!(json, value);
        assert_eq!(yaml, value);
        assert_eq!(
            Output::Json
                .stream_item(&value)
                .expect("line")
                .lines()
                .count(),
            1
        );
        assert!(
            Output::Yaml
                .stream_item(&value)
                .expect("doc")
                .starts_with("---\n")
        );
    }
}
