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

/// A whole plain-text file (strict UTF-8, not empty).
pub fn load_text(path: &Path) -> Result<String> {
    let bytes = fs_err::read(path).map_err(|e| Error::Set(e.to_string()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Set(format!("{}: not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to())))?;
    if text.trim().is_empty() {
        return Err(Error::Set(format!("{}: empty text", path.display())));
    }
    Ok(text)
}

/// A word/sentence similarity set: `item1 <TAB> item2 <TAB> score` per line, `#` comments
/// (WordSim-353 and SimLex-999 as gensim ships them; extra columns ignored).
pub fn load_pairs(path: &Path) -> Result<Vec<(String, String, f64)>> {
    let text = load_lines(path)?;
    let mut out = Vec::new();
    for (i, line) in text.iter().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').map(str::trim).collect();
        let bad = |m: &str| Error::Set(format!("{}: item {}: {m}: {line:?}", path.display(), i + 1));
        if cols.len() < 3 {
            return Err(bad("expected item1, item2 and a score separated by tabs"));
        }
        let Ok(score) = cols[2].parse::<f64>() else {
            if out.is_empty() {
                continue; // a header line without '#'
            }
            return Err(bad("score is not a number"));
        };
        out.push((cols[0].to_string(), cols[1].to_string(), score));
    }
    if out.len() < 3 {
        return Err(Error::Set(format!(
            "{}: {} pairs; a rank correlation needs at least 3",
            path.display(),
            out.len()
        )));
    }
    Ok(out)
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0f64; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]].total_cmp(&v[idx[i]]).is_eq() {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for &k in &idx[i..=j] {
                r[k] = avg;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 { 0.0 } else { cov / (va * vb).sqrt() }
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
    #[allow(clippy::float_cmp)]
    fn test_spearman_with_ties() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), 1.0);
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
        assert!((spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]) - 0.948_683_298_050_513_8).abs() < 1e-12);
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
