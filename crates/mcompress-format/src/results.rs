//! What a calibration produced, by tensor name ([`Calibrated`]), held in memory up to a budget
//! and past it in an unlinked scratch file: a 7B model's GPTQ int4 codes are 3.4 GB and its
//! SparseGPT values 27 GB in f32, more than a calibration that streams the model one block at a
//! time should hold until the weights stream. Only the bulk goes to the file (packed codes,
//! dense and pruned values, masks); shapes, scales and statistics stay in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::Calibrated;

/// Where a byte range lives.
#[derive(Clone, Copy, Debug)]
struct Blob {
    offset: u64,
    len: u64,
}

#[derive(Debug)]
enum Entry {
    Memory(Calibrated),
    /// A quantized matrix with its packed codes in the file (`packed` emptied here).
    Quantized(crate::Quantized, Blob),
    Dense(Blob),
    Pruned(Blob, Blob),
}

/// Calibrated tensors by name.
#[derive(Debug, Default)]
pub struct Results {
    entries: BTreeMap<String, Entry>,
    /// Where bulk goes past the budget, and bytes held in memory so far.
    spill: Option<(PathBuf, u64)>,
    held: u64,
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
        Results { spill: Some((dir, budget)), ..Results::default() }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<Blob> {
        if self.file.is_none() {
            let dir = &self.spill.as_ref().expect("spilling").0;
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
        let (f, _) = self.file.as_ref().expect("a blob implies the file");
        let mut out = vec![0u8; usize::try_from(b.len).map_err(std::io::Error::other)?];
        f.read_exact_at(&mut out, b.offset)?;
        Ok(out)
    }

    /// Adds (or replaces) one tensor's result.
    ///
    /// # Errors
    /// The scratch file could not be created or written.
    pub fn insert(&mut self, name: String, c: Calibrated) -> std::io::Result<()> {
        let size = bulk(&c);
        let fits = self.spill.as_ref().is_none_or(|(_, budget)| self.held + size <= *budget);
        let entry = if fits {
            self.held += size;
            Entry::Memory(c)
        } else {
            match c {
                Calibrated::Quantized(mut q) => {
                    let packed = std::mem::take(&mut q.packed);
                    Entry::Quantized(q, self.write(&packed)?)
                }
                Calibrated::Dense(v) => Entry::Dense(self.write(&f32_bytes(&v))?),
                Calibrated::Pruned { values, keep } => {
                    let v = self.write(&f32_bytes(&values))?;
                    let k: Vec<u8> = keep.iter().map(|b| u8::from(*b)).collect();
                    Entry::Pruned(v, self.write(&k)?)
                }
            }
        };
        if let Some(Entry::Memory(old)) = self.entries.insert(name, entry) {
            self.held -= bulk(&old);
        }
        Ok(())
    }

    /// One tensor's result (read back from the scratch file if it went there).
    ///
    /// # Errors
    /// The scratch file could not be read.
    pub fn get(&self, name: &str) -> std::io::Result<Option<Calibrated>> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        Ok(Some(match e {
            Entry::Memory(c) => c.clone(),
            Entry::Quantized(q, b) => {
                let mut q = q.clone();
                q.packed = self.read(*b)?;
                Calibrated::Quantized(q)
            }
            Entry::Dense(b) => Calibrated::Dense(f32s(&self.read(*b)?)),
            Entry::Pruned(v, k) => Calibrated::Pruned {
                values: f32s(&self.read(*v)?),
                keep: self.read(*k)?.into_iter().map(|b| b != 0).collect(),
            },
        }))
    }

    /// Whether `name` has a result, and whether it is dense values (a rewritten norm) rather
    /// than a quantized or pruned matrix.
    pub fn kind(&self, name: &str) -> Option<ResultKind> {
        Some(match self.entries.get(name)? {
            Entry::Memory(Calibrated::Quantized(_)) | Entry::Quantized(..) => ResultKind::Quantized,
            Entry::Memory(Calibrated::Dense(_)) | Entry::Dense(_) => ResultKind::Dense,
            Entry::Memory(Calibrated::Pruned { .. }) | Entry::Pruned(..) => ResultKind::Pruned,
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
    use crate::QScheme;

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
}
