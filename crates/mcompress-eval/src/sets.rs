//! Eval sets. Labelled classification:
//! - CSV: optional header, then one sample per line with the features followed by an integer
//!   label in `[0, num_labels)` (fixtures/digits/test.csv);
//! - IDX (the MNIST / Fashion-MNIST format, optionally gzipped): `set` names the images file
//!   (`…-images-idx3-ubyte[.gz]`, unsigned bytes, one sample per leading index) and the labels are
//!   read from the file beside it with `images-idx3` replaced by `labels-idx1`.

use std::path::Path;

use crate::{Error, Result};

/// Samples and labels.
#[derive(Clone, Debug)]
pub struct LabelledSet {
    features: usize,
    x: Vec<f32>,
    y: Vec<usize>,
}

/// The largest decompressed IDX file (a bound against gzip bombs) or CSV file read.
const MAX_IDX_BYTES: u64 = 1 << 30;
/// The longest CSV line read (1 MiB: 100,000 features of 10 characters).
pub const MAX_CSV_LINE: usize = 1 << 20;

impl LabelledSet {
    /// Reads a labelled set: IDX when the file name says `images-idx3`, else CSV.
    pub fn load(path: &Path, features: usize, num_labels: usize) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.contains("images-idx3") {
            Self::load_idx(path, features, num_labels)
        } else {
            Self::load_csv(path, features, num_labels)
        }
    }

    /// Reads IDX images and the labels file beside them. Errors name the file.
    pub fn load_idx(path: &Path, features: usize, num_labels: usize) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let labels_path = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
        let (dims, images) = read_idx(path, 3)?;
        let (ldims, labels) = read_idx(&labels_path, 1)?;
        let bad = |m: String| Error::Set(format!("{}: {m}", path.display()));
        let per: usize = dims[1..].iter().product();
        if per != features {
            return Err(bad(format!("images of {per} values ({dims:?}), but the model takes {features} features")));
        }
        if ldims[0] != dims[0] {
            return Err(bad(format!("{} images but {} labels in {}", dims[0], ldims[0], labels_path.display())));
        }
        if dims[0] == 0 {
            return Err(bad("no samples".into()));
        }
        let mut y = Vec::with_capacity(labels.len());
        for (i, &l) in labels.iter().enumerate() {
            if usize::from(l) >= num_labels {
                return Err(Error::Set(format!(
                    "{}: sample {i}: label {l} is out of range: the model has {num_labels} labels",
                    labels_path.display()
                )));
            }
            y.push(usize::from(l));
        }
        Ok(LabelledSet { features, x: images.iter().map(|&b| f32::from(b)).collect(), y })
    }

    /// Reads a CSV of `features` values and a label per line. Errors name the file and line.
    /// Read a line at a time: a line longer than [`MAX_CSV_LINE`] bytes is refused without being
    /// held in memory, and the whole file is bounded like an IDX file.
    pub fn load_csv(path: &Path, features: usize, num_labels: usize) -> Result<Self> {
        let file = mcompress_core::fsutil::open_regular(path, MAX_IDX_BYTES)
            .map_err(|e| Error::Set(format!("{}: {e}", path.display())))?;
        Self::read_csv(&path.display().to_string(), std::io::BufReader::new(file), features, num_labels)
    }

    /// [`Self::load_csv`] from any reader; `name` names the source in errors.
    pub fn read_csv(name: &str, mut reader: impl std::io::BufRead, features: usize, num_labels: usize) -> Result<Self> {
        use std::io::{BufRead, Read};
        let at = |line: usize, m: String| Error::Set(format!("{name}:{line}: {m}"));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut buf = Vec::new();
        let mut line_no = 0;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_CSV_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::Set(format!("{name}: reading: {e}")))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if buf.len() > MAX_CSV_LINE {
                return Err(at(line_no, format!("line longer than {MAX_CSV_LINE} bytes")));
            }
            let line = std::str::from_utf8(&buf).map_err(|_| at(line_no, "not UTF-8 text".into()))?.trim();
            if line.is_empty() {
                continue;
            }
            // A header names its columns: the first line is one when its label cell is not a number.
            let last = line.rsplit(',').next().unwrap_or_default().trim();
            if line_no == 1 && last.parse::<f64>().is_err() {
                continue;
            }
            let columns = line.bytes().filter(|&b| b == b',').count() + 1;
            if columns != features + 1 {
                return Err(at(line_no, format!("{columns} columns, expected {features} features and a label")));
            }
            for (c, v) in line.split(',').map(str::trim).take(features).enumerate() {
                let f: f32 = v.parse().map_err(|_| at(line_no, format!("column {}: {v:?} is not a number", c + 1)))?;
                if !f.is_finite() {
                    return Err(at(line_no, format!("column {}: {v:?} is not finite", c + 1)));
                }
                x.push(f);
            }
            let l: usize =
                last.parse().map_err(|_| at(line_no, format!("label {last:?} is not a non-negative integer")))?;
            if l >= num_labels {
                return Err(at(line_no, format!("label {l} is out of range: the model has {num_labels} labels")));
            }
            y.push(l);
        }
        if y.is_empty() {
            return Err(Error::Set(format!("{name}: no samples")));
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

/// An IDX file of unsigned bytes with `want_dims` dimensions (gzipped if it ends in `.gz`):
/// the dimensions and the data, checked against each other.
fn read_idx(path: &Path, want_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    use std::io::Read;
    let bad = |m: String| Error::Set(format!("{}: {m}", path.display()));
    let file = fs_err::File::open(path).map_err(|e| Error::Set(e.to_string()))?;
    let mut bytes = Vec::new();
    let read = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).take(MAX_IDX_BYTES + 1).read_to_end(&mut bytes)
    } else {
        file.take(MAX_IDX_BYTES + 1).read_to_end(&mut bytes)
    };
    read.map_err(|e| bad(format!("reading: {e}")))?;
    if bytes.len() as u64 > MAX_IDX_BYTES {
        return Err(bad(format!("larger than {MAX_IDX_BYTES} bytes")));
    }
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (magic 0x0000 missing)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("IDX element type 0x{:02x}; only unsigned bytes (0x08) are supported", bytes[2])));
    }
    let nd = usize::from(bytes[3]);
    if nd != want_dims {
        return Err(bad(format!("{nd} dimensions, expected {want_dims}")));
    }
    let head = 4 + 4 * nd;
    if bytes.len() < head {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let count =
        dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("dimensions overflow".into()))?;
    if bytes.len() - head != count {
        return Err(bad(format!("{} data bytes, but dimensions {dims:?} need {count}", bytes.len() - head)));
    }
    bytes.drain(..head);
    Ok((dims, bytes))
}

/// Plain text, one item per line (blank lines skipped). Errors on a missing, non-UTF-8 or
/// empty file, naming it.
pub fn load_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = mcompress_core::fsutil::read_regular(path, MAX_IDX_BYTES)
        .map_err(|e| Error::Set(format!("{}: {e}", path.display())))?;
    lines_from_bytes(&path.display().to_string(), bytes)
}

/// [`load_lines`] from bytes; `name` names the source in errors.
pub fn lines_from_bytes(name: &str, bytes: Vec<u8>) -> Result<Vec<String>> {
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Set(format!("{name}: not UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(Error::Set(format!("{name}: empty text set")));
    }
    Ok(lines)
}

/// A whole plain-text file (strict UTF-8, not empty).
pub fn load_text(path: &Path) -> Result<String> {
    let bytes = mcompress_core::fsutil::read_regular(path, MAX_IDX_BYTES)
        .map_err(|e| Error::Set(format!("{}: {e}", path.display())))?;
    text_from_bytes(&path.display().to_string(), bytes)
}

/// [`load_text`] from bytes; `name` names the source in errors.
pub fn text_from_bytes(name: &str, bytes: Vec<u8>) -> Result<String> {
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Set(format!("{name}: not UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
    if text.trim().is_empty() {
        return Err(Error::Set(format!("{name}: empty text")));
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
