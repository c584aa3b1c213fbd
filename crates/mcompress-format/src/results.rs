//! What a calibration produced, by tensor name ([`Calibrated`]), held in memory up to a budget
//! and past it in an unlinked scratch file: a 7B model's GPTQ int4 codes are 3.4 GB and its
//! SparseGPT values 27 GB in f32, more than a calibration that streams the model one block at a
//! time should hold until the weights stream. Only the bulk goes to the file (packed codes,
//! dense and pruned values, masks); shapes, scales and statistics stay in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use mcompress_core::DType;
use serde::{Deserialize, Serialize};

use crate::{Calibrated, QScheme, Quantized};

/// Where a byte range lives in the file.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Blob {
    offset: u64,
    len: u64,
}

/// A result whose arrays are in the file (floats kept as their bits, so that a checkpoint reads
/// back exactly what was written).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Record {
    /// A quantized matrix.
    Quantized {
        /// Scheme.
        scheme: QScheme,
        /// Shape.
        shape: Vec<usize>,
        /// Rows and columns.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Scale dtype.
        scale_dtype: DType,
        /// NVFP4's global scale, as f32 bits.
        global_scale: Option<u32>,
        /// Σ error² and Σ w², as f64 bits.
        err2: u64,
        /// Σ w², as f64 bits.
        ref2: u64,
        /// Packed codes.
        packed: Blob,
        /// Scales (f32 little-endian).
        scale: Blob,
        /// Zero points (i8).
        zero_point: Option<Blob>,
    },
    /// Dense values (f32 little-endian).
    Dense(Blob),
    /// Pruned values (f32) and the mask (one byte per value).
    Pruned {
        /// Values.
        values: Blob,
        /// Mask.
        keep: Blob,
    },
}

#[derive(Debug)]
enum Entry {
    Memory(Calibrated),
    Disk(Record),
}

/// Calibrated tensors by name.
#[derive(Debug, Default)]
pub struct Results {
    entries: BTreeMap<String, Entry>,
    /// Bulk in memory at most (`None`: no limit), and what is held so far.
    budget: Option<u64>,
    held: u64,
    /// Where the file is created when first needed (`None`: it was given).
    dir: Option<PathBuf>,
    /// The file and its length.
    file: Option<(File, u64)>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn bulk(c: &Calibrated) -> u64 {
    match c {
        Calibrated::Quantized(q) => q.packed.len() as u64,
        Calibrated::Dense(v) => v.len() as u64 * 4,
        Calibrated::Pruned { values, keep } => values.len() as u64 * 4 + keep.len() as u64,
    }
}

impl Results {
    /// Everything in memory.
    pub fn in_memory() -> Self {
        Results::default()
    }

    /// In memory up to `budget` bytes of bulk, the rest in a scratch file in `dir` (created
    /// unlinked when first needed: nothing is left behind, even on a kill).
    pub fn spilling(dir: PathBuf, budget: u64) -> Self {
        Results { budget: Some(budget), dir: Some(dir), ..Results::default() }
    }

    /// Everything in `file` (a checkpoint's), which holds `len` bytes of the `records` already
    /// written (a resumed calibration; empty for a new one). What follows `len` is cut off.
    ///
    /// # Errors
    /// The file cannot be truncated.
    pub fn persistent(file: File, len: u64, records: Vec<(String, Record)>) -> std::io::Result<Self> {
        file.set_len(len)?;
        Ok(Results {
            entries: records.into_iter().map(|(n, r)| (n, Entry::Disk(r))).collect(),
            budget: Some(0),
            file: Some((file, len)),
            ..Results::default()
        })
    }

    /// The file's length and every result's record: what a checkpoint stores to reopen them
    /// with [`Results::persistent`]. `None` if a result is held in memory (not persistent).
    pub fn records(&self) -> Option<(u64, Vec<(String, Record)>)> {
        let records = self
            .entries
            .iter()
            .map(|(n, e)| match e {
                Entry::Disk(r) => Some((n.clone(), r.clone())),
                Entry::Memory(_) => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some((self.file.as_ref().map_or(0, |f| f.1), records))
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<Blob> {
        if self.file.is_none() {
            let dir = self.dir.as_ref().ok_or_else(|| std::io::Error::other("no scratch directory"))?;
            let f = tempfile::tempfile_in(dir).map_err(|e| {
                std::io::Error::new(e.kind(), format!("calibration results scratch file in {}: {e}", dir.display()))
            })?;
            self.file = Some((f, 0));
        }
        let (f, end) = self.file.as_mut().expect("just opened");
        f.write_all_at(bytes, *end)?;
        let blob = Blob { offset: *end, len: bytes.len() as u64 };
        *end += blob.len;
        Ok(blob)
    }

    fn read(&self, b: Blob) -> std::io::Result<Vec<u8>> {
        let (f, _) = self.file.as_ref().ok_or_else(|| std::io::Error::other("no results file"))?;
        let mut out = vec![0u8; usize::try_from(b.len).map_err(std::io::Error::other)?];
        f.read_exact_at(&mut out, b.offset)?;
        Ok(out)
    }

    fn record(&mut self, c: Calibrated) -> std::io::Result<Record> {
        Ok(match c {
            Calibrated::Quantized(q) => Record::Quantized {
                packed: self.write(&q.packed)?,
                scale: self.write(&f32_bytes(&q.scale))?,
                zero_point: match &q.zero_point {
                    Some(z) => Some(self.write(&z.iter().map(|v| v.to_le_bytes()[0]).collect::<Vec<u8>>())?),
                    None => None,
                },
                scheme: q.scheme,
                shape: q.shape,
                rows: q.rows,
                cols: q.cols,
                scale_dtype: q.scale_dtype,
                global_scale: q.global_scale.map(f32::to_bits),
                err2: q.err2.to_bits(),
                ref2: q.ref2.to_bits(),
            },
            Calibrated::Dense(v) => Record::Dense(self.write(&f32_bytes(&v))?),
            Calibrated::Pruned { values, keep } => {
                let values = self.write(&f32_bytes(&values))?;
                let k: Vec<u8> = keep.iter().map(|b| u8::from(*b)).collect();
                Record::Pruned { values, keep: self.write(&k)? }
            }
        })
    }

    /// Adds (or replaces) one tensor's result.
    ///
    /// # Errors
    /// The scratch file could not be created or written.
    pub fn insert(&mut self, name: String, c: Calibrated) -> std::io::Result<()> {
        let size = bulk(&c);
        let fits = self.budget.is_none_or(|budget| self.held + size <= budget);
        let entry = if fits {
            self.held += size;
            Entry::Memory(c)
        } else {
            Entry::Disk(self.record(c)?)
        };
        if let Some(Entry::Memory(old)) = self.entries.insert(name, entry) {
            self.held -= bulk(&old);
        }
        Ok(())
    }

    /// One tensor's result (read back from the file if it went there).
    ///
    /// # Errors
    /// The file could not be read.
    pub fn get(&self, name: &str) -> std::io::Result<Option<Calibrated>> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        Ok(Some(match e {
            Entry::Memory(c) => c.clone(),
            Entry::Disk(Record::Quantized {
                scheme,
                shape,
                rows,
                cols,
                scale_dtype,
                global_scale,
                err2,
                ref2,
                packed,
                scale,
                zero_point,
            }) => Calibrated::Quantized(Quantized {
                scheme: *scheme,
                shape: shape.clone(),
                rows: *rows,
                cols: *cols,
                packed: self.read(*packed)?,
                scale: f32s(&self.read(*scale)?),
                scale_dtype: *scale_dtype,
                zero_point: match zero_point {
                    Some(z) => Some(self.read(*z)?.into_iter().map(|b| i8::from_le_bytes([b])).collect()),
                    None => None,
                },
                global_scale: global_scale.map(f32::from_bits),
                err2: f64::from_bits(*err2),
                ref2: f64::from_bits(*ref2),
            }),
            Entry::Disk(Record::Dense(b)) => Calibrated::Dense(f32s(&self.read(*b)?)),
            Entry::Disk(Record::Pruned { values, keep }) => Calibrated::Pruned {
                values: f32s(&self.read(*values)?),
                keep: self.read(*keep)?.into_iter().map(|b| b != 0).collect(),
            },
        }))
    }

    /// Whether `name` has a result, and whether it is dense values (a rewritten norm) rather
    /// than a quantized or pruned matrix.
    pub fn kind(&self, name: &str) -> Option<ResultKind> {
        Some(match self.entries.get(name)? {
            Entry::Memory(Calibrated::Quantized(_)) | Entry::Disk(Record::Quantized { .. }) => ResultKind::Quantized,
            Entry::Memory(Calibrated::Dense(_)) | Entry::Disk(Record::Dense(_)) => ResultKind::Dense,
            Entry::Memory(Calibrated::Pruned { .. }) | Entry::Disk(Record::Pruned { .. }) => ResultKind::Pruned,
        })
    }

    /// Tensors with a result.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Their names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Bytes of bulk in the scratch file.
    pub fn spilled_bytes(&self) -> u64 {
        self.file.as_ref().map_or(0, |(_, end)| *end)
    }
}

/// What a result is ([`Results::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultKind {
    /// A quantized matrix.
    Quantized,
    /// Rewritten dense values.
    Dense,
    /// A pruned matrix and its mask.
    Pruned,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spilled_results_read_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let w: Vec<u8> = (0..64 * 32).flat_map(|i| ((i as f32 * 0.37).sin()).to_le_bytes()).collect();
        let q = crate::quant::quantize(&QScheme::int(4, 32, true), mcompress_core::DType::F32, &[64, 32], &w).unwrap();
        let items = [
            ("q", Calibrated::Quantized(q.clone())),
            ("d", Calibrated::Dense(vec![1.0, -2.5, 3.0])),
            ("p", Calibrated::Pruned { values: vec![0.0, 4.0, 0.0], keep: vec![false, true, true] }),
        ];
        // A budget that holds the first result in memory only.
        let mut r = Results::spilling(dir.path().to_path_buf(), q.packed.len() as u64);
        for (n, c) in items.clone() {
            r.insert(n.into(), c).unwrap();
        }
        assert!(r.spilled_bytes() > 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "unlinked");
        let Some(Calibrated::Quantized(back)) = r.get("q").unwrap() else { panic!() };
        assert_eq!((back.packed, back.scale), (q.packed, q.scale));
        assert!(matches!(r.get("d").unwrap(), Some(Calibrated::Dense(v)) if v == [1.0, -2.5, 3.0]));
        assert!(
            matches!(r.get("p").unwrap(), Some(Calibrated::Pruned { values, keep }) if values == [0.0, 4.0, 0.0] && keep == [false, true, true])
        );
        assert_eq!(r.kind("d"), Some(ResultKind::Dense));
        assert_eq!(r.kind("p"), Some(ResultKind::Pruned));
        assert_eq!(r.kind("x"), None);
        assert_eq!(r.names().collect::<Vec<_>>(), ["d", "p", "q"]);
    }

    #[test]
    fn test_a_checkpoint_reopens_what_it_recorded_and_drops_what_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.bin");
        let open =
            || std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).unwrap();
        let w: Vec<u8> = (0..8 * 32).flat_map(|i| ((i as f32 * 0.11).cos()).to_le_bytes()).collect();
        let q = crate::quant::quantize(&QScheme::int(3, 16, false), DType::F32, &[8, 32], &w).unwrap();
        let mut r = Results::persistent(open(), 0, Vec::new()).unwrap();
        r.insert("a".into(), Calibrated::Quantized(q.clone())).unwrap();
        let (len, records) = r.records().unwrap();
        let json = serde_json::to_string(&records).unwrap();
        // Written after the checkpoint, then lost with the process.
        r.insert("b".into(), Calibrated::Dense(vec![1.0; 100])).unwrap();
        drop(r);
        let records: Vec<(String, Record)> = serde_json::from_str(&json).unwrap();
        let back = Results::persistent(open(), len, records).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(back.names().collect::<Vec<_>>(), ["a"]);
        let Some(Calibrated::Quantized(a)) = back.get("a").unwrap() else { panic!() };
        assert_eq!(a, q, "bit for bit, zero points and statistics included");
    }
}
