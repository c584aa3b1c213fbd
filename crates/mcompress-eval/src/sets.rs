//! Eval sets. Labelled classification CSV: optional header, then one sample per line with the
//! features followed by an integer label in `[0, num_labels)` (fixtures/digits/test.csv).

use std::path::Path;

use crate::{Error, Result};

/// Samples and labels.
#[derive(Clone, Debug)]
pub struct LabelledSet {
    features: usize,
    x: Vec<f32>,
    y: Vec<usize>,
}

impl LabelledSet {
    /// Reads a CSV of `features` values and a label per line. Errors name the file and line.
    pub fn load_csv(path: &Path, features: usize, num_labels: usize) -> Result<Self> {
        let at = |line: usize, m: String| Error::Set(format!("{}:{line}: {m}", path.display()));
        let text = fs_err::read_to_string(path).map_err(|e| Error::Set(e.to_string()))?;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            // A header names its columns: the first line is one when its label cell is not a number.
            if i == 0 && cells.last().is_some_and(|c| c.parse::<f64>().is_err()) {
                continue;
            }
            if cells.len() != features + 1 {
                return Err(at(
                    line_no,
                    format!("{} columns, expected {} features and a label", cells.len(), features),
                ));
            }
            for (c, v) in cells[..features].iter().enumerate() {
                let f: f32 = v.parse().map_err(|_| at(line_no, format!("column {}: {v:?} is not a number", c + 1)))?;
                if !f.is_finite() {
                    return Err(at(line_no, format!("column {}: {v:?} is not finite", c + 1)));
                }
                x.push(f);
            }
            let label = cells[features];
            let l: usize =
                label.parse().map_err(|_| at(line_no, format!("label {label:?} is not a non-negative integer")))?;
            if l >= num_labels {
                return Err(at(line_no, format!("label {l} is out of range: the model has {num_labels} labels")));
            }
            y.push(l);
        }
        if y.is_empty() {
            return Err(Error::Set(format!("{}: no samples", path.display())));
        }
        Ok(LabelledSet { features, x, y })
    }

    /// Samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no samples (never true for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Batches of (features, labels).
    pub fn batches(&self, size: usize) -> impl Iterator<Item = (&[f32], &[usize])> {
        self.x.chunks(size * self.features).zip(self.y.chunks(size))
    }
}

/// Plain text, one item per line (blank lines skipped). Errors on a missing, non-UTF-8 or
/// empty file, naming it.
pub fn load_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = fs_err::read(path).map_err(|e| Error::Set(e.to_string()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Set(format!("{}: not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to())))?;
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(Error::Set(format!("{}: empty text set", path.display())));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LabelledSet> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.csv");
        std::fs::write(&p, text).unwrap();
        LabelledSet::load_csv(&p, 2, 3)
    }

    #[test]
    fn test_reads_with_and_without_header() {
        assert_eq!(load("a,b,label\n1,2,0\n3,4,2\n").unwrap().len(), 2);
        assert_eq!(load("1,2,1\n").unwrap().len(), 1);
    }

    #[test]
    fn test_bad_sets_name_line() {
        assert!(
            load("1,2,0\n1,2\n")
                .unwrap_err()
                .to_string()
                .ends_with("s.csv:2: 2 columns, expected 2 features and a label")
        );
        assert!(load("1,x,0\n").unwrap_err().to_string().contains(":1: column 2"));
        assert!(load("1,2,3\n").unwrap_err().to_string().contains("label 3 is out of range"));
        assert!(load("1,2,-1\n").unwrap_err().to_string().contains("not a non-negative integer"));
        assert!(load("a,b,label\n").unwrap_err().to_string().contains("no samples"));
        assert!(load("").unwrap_err().to_string().contains("no samples"));
    }
}
