//! GGUF v3 writing: metadata with exact types, tensor infos, aligned data written one tensor at a
//! time at precomputed offsets (the same streaming shape as [`crate::SafetensorsWriter`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{GgmlType, MAGIC};
use crate::writer::SlotFile;
use crate::{Error, Result};

/// GGUF metadata value types (`gguf_type` in ggml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
#[repr(u32)]
pub enum MetaType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

/// Data alignment of the files we write (GGUF's default).
const ALIGN: u64 = 32;

/// Metadata and tensor directory of a GGUF file being planned. Keys and tensors keep insertion
/// order, so the same calls give the same bytes.
#[derive(Clone, Debug, Default)]
pub struct GgufBuilder {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, GgmlType)>,
}

fn string_bytes(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl GgufBuilder {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a key is set.
    pub fn has(&self, key: &str) -> bool {
        self.kv.iter().any(|(k, _, _)| k == key)
    }

    /// Sets `key` to an already-encoded value of GGUF type `ty` (as read from another file),
    /// replacing an earlier value of the key.
    pub fn raw(&mut self, key: &str, ty: u32, payload: &[u8]) {
        self.kv.retain(|(k, _, _)| k != key);
        self.kv.push((key.to_string(), ty, payload.to_vec()));
    }

    /// Replaces the value of a key already set with a `u32`, keeping its place in the file;
    /// sets it (last) otherwise.
    pub fn replace_u32(&mut self, key: &str, v: u32) {
        match self.kv.iter_mut().find(|(k, _, _)| k == key) {
            Some(entry) => {
                entry.1 = MetaType::U32 as u32;
                entry.2 = v.to_le_bytes().to_vec();
            }
            None => self.u32(key, v),
        }
    }

    /// A `u32` value.
    pub fn u32(&mut self, key: &str, v: u32) {
        self.raw(key, MetaType::U32 as u32, &v.to_le_bytes());
    }

    /// An `f32` value.
    pub fn f32(&mut self, key: &str, v: f32) {
        self.raw(key, MetaType::F32 as u32, &v.to_le_bytes());
    }

    /// A `bool` value.
    pub fn bool(&mut self, key: &str, v: bool) {
        self.raw(key, MetaType::Bool as u32, &[u8::from(v)]);
    }

    /// A string value.
    pub fn string(&mut self, key: &str, v: &str) {
        self.raw(key, MetaType::String as u32, &string_bytes(v));
    }

    fn array(&mut self, key: &str, inner: MetaType, n: usize, items: Vec<u8>) {
        let mut p = (inner as u32).to_le_bytes().to_vec();
        p.extend_from_slice(&(n as u64).to_le_bytes());
        p.extend(items);
        self.raw(key, MetaType::Array as u32, &p);
    }

    /// An array of strings.
    pub fn strings<S: AsRef<str>>(&mut self, key: &str, v: &[S]) {
        let items = v.iter().flat_map(|s| string_bytes(s.as_ref())).collect();
        self.array(key, MetaType::String, v.len(), items);
    }

    /// An array of `i32`.
    pub fn i32s(&mut self, key: &str, v: &[i32]) {
        self.array(key, MetaType::I32, v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect());
    }

    /// An array of `f32`.
    pub fn f32s(&mut self, key: &str, v: &[f32]) {
        self.array(key, MetaType::F32, v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect());
    }

    /// Plans a tensor: its name, ggml dims (innermost first) and type.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType) {
        self.tensors.push((name.to_string(), dims.to_vec(), ty));
    }

    /// The file's layout: header bytes and where each tensor's data goes.
    pub fn layout(&self) -> Result<GgufLayout> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.kv.len() as u64 + u64::from(!self.has("general.alignment"))).to_le_bytes());
        if !self.has("general.alignment") {
            h.extend(string_bytes("general.alignment"));
            h.extend_from_slice(&(MetaType::U32 as u32).to_le_bytes());
            h.extend_from_slice(&(ALIGN as u32).to_le_bytes());
        }
        for (k, ty, payload) in &self.kv {
            h.extend(string_bytes(k));
            h.extend_from_slice(&ty.to_le_bytes());
            h.extend_from_slice(payload);
        }
        let mut offset = 0u64;
        let mut slots = Vec::with_capacity(self.tensors.len());
        let mut seen = HashSet::with_capacity(self.tensors.len());
        for (name, dims, ty) in &self.tensors {
            let numel: u64 = dims.iter().product();
            let (be, bb) = ty.block();
            if dims.is_empty() || dims[0] % be as u64 != 0 {
                return Err(Error::WriteMismatch {
                    path: PathBuf::new(),
                    name: name.clone(),
                    reason: format!("row length {:?} is not a multiple of the {be}-element {} block", dims, ty.name()),
                });
            }
            let len = numel / be as u64 * bb as u64;
            h.extend(string_bytes(name));
            h.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&ty.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            if !seen.insert(name.as_str()) {
                return Err(Error::WriteMismatch {
                    path: PathBuf::new(),
                    name: name.clone(),
                    reason: "planned twice".into(),
                });
            }
            slots.push((name.clone(), offset, len));
            offset = (offset + len).div_ceil(ALIGN) * ALIGN;
        }
        let data_start = (h.len() as u64).div_ceil(ALIGN) * ALIGN;
        h.resize(data_start as usize, 0);
        let end = slots.last().map_or(0, |(_, o, l)| o + l);
        Ok(GgufLayout { header: h, slots, total: data_start + end })
    }
}

/// Where everything of a planned GGUF file goes.
#[derive(Clone, Debug)]
pub struct GgufLayout {
    header: Vec<u8>,
    /// (name, offset from the data start, bytes).
    slots: Vec<(String, u64, u64)>,
    total: u64,
}

impl GgufLayout {
    /// Size of the file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Bytes of metadata and tensor directory (with padding).
    pub fn header_bytes(&self) -> u64 {
        self.header.len() as u64
    }
}

/// Writes a GGUF file with a fixed [`GgufLayout`], one tensor at a time, in any order.
#[derive(Debug)]
pub struct GgufWriter {
    file: SlotFile,
}

impl GgufWriter {
    /// Creates `path` (truncating it), writes the header and sizes the file.
    pub fn create(path: &Path, layout: GgufLayout) -> Result<Self> {
        let data_start = layout.header.len() as u64;
        let slots = layout.slots.into_iter().map(|(name, offset, len)| (name, data_start + offset, len)).collect();
        Ok(Self { file: SlotFile::create(path, &layout.header, layout.total, slots)? })
    }

    /// Writes one planned tensor's bytes.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.file.write(name, bytes)
    }

    /// Writes part `part` of `parts` equal parts of one planned tensor (one expert of a stack:
    /// each expert's rows are a contiguous part).
    pub fn write_tensor_part(&mut self, name: &str, part: usize, parts: usize, bytes: &[u8]) -> Result<()> {
        self.file.write_part(name, part, parts, bytes)
    }

    /// Checks every tensor was written and flushes the file.
    pub fn finish(self) -> Result<()> {
        self.file.finish()
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp, clippy::many_single_char_names)]
mod tests {
    use super::*;
    use crate::gguf::{GgufFile, GgufValue, dequantize};

    #[test]
    fn test_written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut b = GgufBuilder::new();
        b.string("general.architecture", "llama");
        b.u32("llama.block_count", 2);
        b.f32("llama.rope.freq_base", 10000.0);
        b.strings("tokenizer.ggml.tokens", &["a", "bc"]);
        b.i32s("tokenizer.ggml.token_type", &[1, 3]);
        b.bool("tokenizer.ggml.add_bos_token", false);
        b.tensor("w", &[64, 2], GgmlType::Q8_0);
        b.tensor("n", &[3], GgmlType::F32);
        let layout = b.layout().unwrap();
        let mut w = GgufWriter::create(&path, layout).unwrap();
        let x: Vec<f32> = (0..128).map(|i| i as f32 / 64.0 - 1.0).collect();
        w.write_tensor("n", &[0u8; 12]).unwrap();
        assert!(w.write_tensor("w", &[0u8; 3]).is_err());
        w.write_tensor("w", &crate::ggml::quantize(GgmlType::Q8_0, &x).unwrap()).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let g = GgufFile::parse(&path, &bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("llama.block_count"), Some(&GgufValue::U64(2)));
        assert_eq!(g.raw["llama.block_count"].0, MetaType::U32 as u32);
        assert_eq!(g.raw["tokenizer.ggml.token_type"].0, MetaType::Array as u32);
        assert_eq!(g.get("general.alignment"), Some(&GgufValue::U64(32)));
        let t = &g.tensors[0];
        assert_eq!((t.name.as_str(), t.shape()), ("w", vec![2, 64]));
        let mut y = Vec::new();
        dequantize(t.ggml_type, &bytes[t.range.0..t.range.1], &mut y);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 0.01));
        // Copying raw values keeps their bytes.
        let (ty, (s, e)) = g.raw["tokenizer.ggml.tokens"];
        let mut b2 = GgufBuilder::new();
        b2.raw("tokenizer.ggml.tokens", ty, &bytes[s..e]);
        let mut b3 = GgufBuilder::new();
        b3.strings("tokenizer.ggml.tokens", &["a", "bc"]);
        assert_eq!(b2.layout().unwrap().header, b3.layout().unwrap().header);
    }

    #[test]
    fn test_stacked_tensor_written_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gguf");
        let mut b = GgufBuilder::new();
        b.tensor("exps", &[32, 2, 3], GgmlType::Q8_0);
        let mut w = GgufWriter::create(&path, b.layout().unwrap()).unwrap();
        let part = |e: usize| crate::ggml::quantize(GgmlType::Q8_0, &vec![e as f32; 64]).unwrap();
        assert!(w.write_tensor_part("exps", 3, 3, &part(0)).is_err());
        assert!(w.write_tensor_part("exps", 0, 3, &part(0)[1..]).is_err());
        w.write_tensor_part("exps", 2, 3, &part(2)).unwrap();
        w.write_tensor_part("exps", 0, 3, &part(0)).unwrap();
        assert!(w.write_tensor_part("exps", 0, 3, &part(0)).is_err(), "a part written twice");
        assert!(w.write_tensor("exps", &[part(0), part(1), part(2)].concat()).is_err());
        w.write_tensor_part("exps", 1, 3, &part(1)).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let g = GgufFile::parse(&path, &bytes).unwrap();
        let t = &g.tensors[0];
        let mut y = Vec::new();
        dequantize(t.ggml_type, &bytes[t.range.0..t.range.1], &mut y);
        // Q8_0 keeps 1 and 2 within its f16 scale.
        assert_eq!(y.chunks(64).map(|c| c[0].round()).collect::<Vec<_>>(), vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn test_unwritten_tensor_fails_finish() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = GgufBuilder::new();
        b.tensor("a", &[32], GgmlType::Q4_0);
        assert!(GgufWriter::create(&dir.path().join("x.gguf"), b.layout().unwrap()).unwrap().finish().is_err());
        let mut bad = GgufBuilder::new();
        bad.tensor("a", &[33], GgmlType::Q4_0);
        assert!(bad.layout().is_err());
    }
}
