//! Deterministic streaming safetensors writer.
//!
//! The layout (header and every tensor's offset) is fixed before any data is produced, from the
//! planned names, dtypes and shapes. Tensors are ordered by alignment (widest first) and then by
//! name, exactly as the reference serializer does, so every tensor is naturally aligned and the
//! bytes do not depend on the order in which tensors are produced or on the thread count. Each
//! tensor is then written at its offset with a positioned write as soon as it is ready.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::{DType, Error, Result};

/// A tensor to be written: name, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorEntry {
    /// Bytes of data for this entry (`None` on overflow or a sub-byte remainder).
    pub fn nbytes(&self) -> Option<usize> {
        let numel = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.dtype.bytes_for(numel)
    }
}

/// A computed file layout: header bytes and each tensor's absolute byte range.
#[derive(Clone, Debug)]
pub struct SafetensorsLayout {
    header: Vec<u8>,
    /// (entry, absolute start, length) in file order.
    slots: Vec<(TensorEntry, u64, usize)>,
    total: u64,
}

impl SafetensorsLayout {
    /// Computes the layout. Names must be unique.
    pub fn new(mut entries: Vec<TensorEntry>, metadata: &BTreeMap<String, String>) -> Result<Self> {
        entries.sort_by(|a, b| b.dtype.alignment().cmp(&a.dtype.alignment()).then_with(|| a.name.cmp(&b.name)));
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        let mut offset = 0usize;
        let mut ranges = Vec::with_capacity(entries.len());
        for e in &entries {
            let n = e.nbytes().ok_or_else(|| Error::WriteMismatch {
                path: PathBuf::new(),
                name: e.name.clone(),
                reason: format!("shape {:?} of {} has no whole byte length", e.shape, e.dtype),
            })?;
            if header.contains_key(&e.name) || e.name == "__metadata__" {
                return Err(Error::WriteMismatch {
                    path: PathBuf::new(),
                    name: e.name.clone(),
                    reason: "duplicate tensor name in output".into(),
                });
            }
            header.insert(
                e.name.clone(),
                json!({"dtype": e.dtype.as_str(), "shape": e.shape, "data_offsets": [offset, offset + n]}),
            );
            ranges.push((offset, n));
            offset += n;
        }
        let mut header = serde_json::to_vec(&Value::Object(header)).expect("JSON of strings and numbers");
        // Pad with spaces so the data section starts 8-byte aligned.
        while !(8 + header.len()).is_multiple_of(8) {
            header.push(b' ');
        }
        let data_start = 8 + header.len() as u64;
        let slots: Vec<_> = entries.into_iter().zip(ranges).map(|(e, (o, n))| (e, data_start + o as u64, n)).collect();
        Ok(Self { header, slots, total: data_start + offset as u64 })
    }

    /// Total file size in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Entries in file order.
    pub fn entries(&self) -> impl Iterator<Item = &TensorEntry> {
        self.slots.iter().map(|s| &s.0)
    }
}

/// Writes a file with a fixed [`SafetensorsLayout`], one tensor at a time, in any order.
#[derive(Debug)]
pub struct SafetensorsWriter {
    file: SlotFile,
}

impl SafetensorsWriter {
    /// Creates `path` (truncating it), writes the header and sizes the file.
    pub fn create(path: &Path, layout: SafetensorsLayout) -> Result<Self> {
        let mut prefix = (layout.header.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(&layout.header);
        let slots = layout.slots.into_iter().map(|(e, start, len)| (e.name, start, len as u64)).collect();
        Ok(Self { file: SlotFile::create(path, &prefix, layout.total, slots)? })
    }

    /// Writes one planned tensor's bytes at its offset.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.file.write(name, bytes)
    }

    /// Checks every tensor was written and flushes the file to disk.
    pub fn finish(self) -> Result<()> {
        self.file.finish()
    }
}

/// A file of fixed size whose named byte ranges are each written exactly once, in any order,
/// with positioned writes: the shared body of the safetensors and GGUF writers.
#[derive(Debug)]
pub(crate) struct SlotFile {
    path: PathBuf,
    file: fs_err::File,
    /// (name, absolute start, length).
    slots: Vec<(String, u64, u64)>,
    index: HashMap<String, usize>,
    written: Vec<bool>,
    /// Slots written in parts: which parts are in.
    parts: HashMap<usize, Vec<bool>>,
}

impl SlotFile {
    /// Creates `path` (truncating it), writes `prefix` at 0 and sizes the file to `total`.
    pub(crate) fn create(path: &Path, prefix: &[u8], total: u64, slots: Vec<(String, u64, u64)>) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let file = fs_err::File::create(path).map_err(io)?;
        file.file().write_all_at(prefix, 0).map_err(io)?;
        file.set_len(total).map_err(io)?;
        let index = slots.iter().enumerate().map(|(i, s)| (s.0.clone(), i)).collect();
        let written = vec![false; slots.len()];
        Ok(Self { path: path.to_path_buf(), file, slots, index, written, parts: HashMap::new() })
    }

    /// Writes one slot's bytes at its offset.
    pub(crate) fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mismatch = |reason: String| Error::WriteMismatch { path: self.path.clone(), name: name.into(), reason };
        let Some(&i) = self.index.get(name) else {
            return Err(mismatch("not in the planned layout".into()));
        };
        let (_, start, len) = &self.slots[i];
        if bytes.len() as u64 != *len {
            return Err(mismatch(format!("{} bytes produced, {len} planned", bytes.len())));
        }
        if self.parts.contains_key(&i) || std::mem::replace(&mut self.written[i], true) {
            return Err(mismatch("written twice".into()));
        }
        self.file.file().write_all_at(bytes, *start).map_err(|e| Error::io(&self.path, e))
    }

    /// Writes part `part` of a slot cut into `parts` equal parts; the slot counts as written
    /// when every part is.
    pub(crate) fn write_part(&mut self, name: &str, part: usize, parts: usize, bytes: &[u8]) -> Result<()> {
        let mismatch = |reason: String| Error::WriteMismatch { path: self.path.clone(), name: name.into(), reason };
        let Some(&i) = self.index.get(name) else {
            return Err(mismatch("not in the planned layout".into()));
        };
        let (_, start, len) = self.slots[i];
        let n = parts as u64;
        if parts == 0 || part >= parts || !len.is_multiple_of(n) || bytes.len() as u64 != len / n {
            return Err(mismatch(format!("part {part} of {parts}: {} bytes produced, slot of {len}", bytes.len())));
        }
        let done = self.parts.entry(i).or_insert_with(|| vec![false; parts]);
        if done.len() != parts || std::mem::replace(&mut done[part], true) || self.written[i] {
            return Err(mismatch(format!("part {part} of {parts} written twice")));
        }
        if done.iter().all(|d| *d) {
            self.written[i] = true;
        }
        self.file.file().write_all_at(bytes, start + part as u64 * (len / n)).map_err(|e| Error::io(&self.path, e))
    }

    /// Checks every slot was written and flushes the file to disk.
    pub(crate) fn finish(self) -> Result<()> {
        if let Some(i) = self.written.iter().position(|w| !w) {
            return Err(Error::WriteMismatch {
                path: self.path.clone(),
                name: self.slots[i].0.clone(),
                reason: "planned but never written".into(),
            });
        }
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_written_file_reads_back_with_reference_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.safetensors");
        let entries = vec![
            TensorEntry { name: "z".into(), dtype: DType::I8, shape: vec![3] },
            TensorEntry { name: "a".into(), dtype: DType::F16, shape: vec![1] },
            TensorEntry { name: "m".into(), dtype: DType::F32, shape: vec![2] },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let layout = SafetensorsLayout::new(entries, &meta).unwrap();
        let mut w = SafetensorsWriter::create(&path, layout).unwrap();
        // Out of file order on purpose.
        w.write_tensor("z", &[1, 2, 3]).unwrap();
        w.write_tensor("m", &[0; 8]).unwrap();
        assert!(w.write_tensor("m", &[0; 8]).is_err());
        assert!(w.write_tensor("a", &[0; 3]).is_err());
        w.write_tensor("a", &[0; 2]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("z").unwrap().data(), &[1, 2, 3]);
        let ours = crate::SafetensorsFile::open(&path).unwrap();
        assert_eq!(ours.metadata()["format"], "pt");
        // Wider dtypes first, so F32 "m" precedes F16 "a".
        assert_eq!(ours.get("m").unwrap().data_offsets, (0, 8));
        assert_eq!(ours.get("a").unwrap().data_offsets, (8, 10));
    }

    #[test]
    fn test_unwritten_tensor_fails_finish() {
        let dir = tempfile::tempdir().unwrap();
        let layout = SafetensorsLayout::new(
            vec![TensorEntry { name: "a".into(), dtype: DType::U8, shape: vec![1] }],
            &BTreeMap::new(),
        )
        .unwrap();
        let w = SafetensorsWriter::create(&dir.path().join("x"), layout).unwrap();
        assert!(w.finish().is_err());
    }
}
