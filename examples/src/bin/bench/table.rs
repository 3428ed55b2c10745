//! The report: Markdown sections of figures, printed as each part finishes and
//! written to `--out`.

use std::fmt::Write as _;

use crate::stats::Summary;

/// One table with a title, a header row, rows, and notes under it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Section {
    pub(crate) title: String,
    pub(crate) header: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
    pub(crate) notes: Vec<String>,
}

impl Section {
    pub(crate) fn new(title: &str, header: &[&str]) -> Section {
        Section {
            title: title.to_owned(),
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            ..Section::default()
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub(crate) fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        if !self.header.is_empty() {
            let _ = writeln!(out, "| {} |", self.header.join(" | "));
            let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
            for row in &self.rows {
                let _ = writeln!(out, "| {} |", row.join(" | "));
            }
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "{note}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// Every section so far, in order.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) sections: Vec<Section>,
    out: Option<std::path::PathBuf>,
}

impl Report {
    pub(crate) fn new(out: Option<std::path::PathBuf>) -> Report {
        Report {
            sections: Vec::new(),
            out,
        }
    }

    /// Print `section` and keep it; rewrite `--out` so a run cut short keeps what it measured.
    pub(crate) fn add(&mut self, section: Section) -> anyhow::Result<()> {
        println!("\n{}", section.markdown());
        self.sections.push(section);
        self.write()
    }

    pub(crate) fn markdown(&self) -> String {
        self.sections.iter().map(Section::markdown).collect()
    }

    fn write(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.out {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, self.markdown())?;
        }
        Ok(())
    }
}

/// `12,345` (no decimals) with thousands separators.
pub(crate) fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        out.insert(0, '-');
    }
    out
}

/// A rate: `12,345 (11,900–12,800)`, or `-` without runs.
pub(crate) fn rate(summary: Option<Summary>) -> String {
    match summary {
        None => "-".to_owned(),
        Some(s) if s.runs == 1 => thousands(s.median),
        Some(s) => format!(
            "{} ({}–{})",
            thousands(s.median),
            thousands(s.min),
            thousands(s.max)
        ),
    }
}

/// A figure with `decimals` decimals: `0.93 (0.90–0.95)`.
pub(crate) fn fixed(summary: Option<Summary>, decimals: usize) -> String {
    match summary {
        None => "-".to_owned(),
        Some(s) if s.runs == 1 => format!("{:.*}", decimals, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, s.median, decimals, s.min, decimals, s.max
        ),
    }
}

/// `met` or `missed` for a median against a target; `-` without a figure.
pub(crate) fn verdict(summary: Option<Summary>, met: impl Fn(f64) -> bool) -> String {
    match summary {
        None => "-".to_owned(),
        Some(s) if met(s.median) => "met".to_owned(),
        Some(_) => "**missed**".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
        assert_eq!(thousands(f64::NAN), "-");
    }
}
