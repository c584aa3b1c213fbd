//! Validated, memory-mapped safetensors reading.
//!
//! The header is parsed by us rather than by the `safetensors` crate so that each problem gets
//! its own error naming the file and tensor, and so that duplicate names are caught (a JSON map
//! silently keeps the last one). The checks follow the format spec: 8-byte little-endian header
//! length, a JSON object of `name -> {dtype, shape, data_offsets}` plus optional
//! `__metadata__`, and offsets that cover the data section exactly, with no overlap and no hole.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::{DType, Error, Result};

/// Largest header accepted (100 MB, the limit the reference implementation uses).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// One tensor's entry in a safetensors header, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for scalars).
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A tensor: metadata plus its bytes (borrowed from the mapping, or owned when decoded from a
/// quantized GGUF tensor).
#[derive(Clone, Debug)]
pub struct TensorView<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [usize],
    /// Little-endian element bytes.
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl TensorView<'_> {
    /// Converts float data (F32/F16/BF16/F64) to f32; `None` for other dtypes.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let mut out = vec![0f32; self.shape.iter().product()];
        self.dtype.decode_f32(&self.data, &mut out).then_some(out)
    }
}

/// A safetensors file, memory-mapped and validated at open.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl SafetensorsFile {
    /// Memory-maps and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        crate::fsutil::check_regular(path)?;
        let file = fs_err::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private. Changing the file underneath a running
            // process is outside our contract (as for every mmap-based reader); header
            // validation happens on the mapped bytes, so a torn file is caught, not trusted.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::MmapOptions::new().map(file.file()) }.map_err(|e| Error::io(path, e))?;
            Bytes::Mmap(map)
        };
        Self::from_parts(path.to_path_buf(), bytes)
    }

    /// Validates an in-memory buffer (tests and fuzzing); `path` is only used in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_parts(path.to_path_buf(), Bytes::Owned(bytes))
    }

    fn from_parts(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let (data_start, tensors, metadata) = parse(&path, &bytes)?;
        Ok(Self { path, bytes, data_start, tensors, metadata })
    }

    /// File path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.binary_search_by(|t| t.name.as_str().cmp(name)).ok().map(|i| &self.tensors[i])
    }

    /// `__metadata__` of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Bytes of the whole file.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the file is empty (never true for a validated file).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Borrowed view of one tensor of this file.
    pub fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        let (s, e) = info.data_offsets;
        TensorView {
            name: &info.name,
            dtype: info.dtype,
            shape: &info.shape,
            data: std::borrow::Cow::Borrowed(&self.bytes[self.data_start + s..self.data_start + e]),
        }
    }

    /// Tells the kernel the pages of a tensor are no longer needed, so streaming through a large
    /// model keeps resident memory at the tensors in flight rather than the whole file.
    pub fn release(&self, info: &TensorInfo) {
        if let Bytes::Mmap(map) = &self.bytes {
            let page = 4096;
            let start = (self.data_start + info.data_offsets.0).div_ceil(page) * page;
            let end = (self.data_start + info.data_offsets.1) / page * page;
            if end > start {
                // SAFETY: the mapping is private and read-only; MADV_DONTNEED on such a mapping
                // only drops clean pages, which are re-read from the file on the next access.
                // No reference into the range outlives this call in a way that could observe
                // different bytes: the file content is unchanged.
                #[allow(unsafe_code)]
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Header JSON object as an ordered list, so duplicates are visible.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

type Parsed = (usize, Vec<TensorInfo>, BTreeMap<String, String>);

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let p = || path.to_path_buf();
    let Some(prefix) = bytes.get(..8) else {
        return Err(Error::Truncated { path: p(), len: bytes.len() as u64 });
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(b);
    let available = bytes.len() as u64 - 8;
    if header_len > MAX_HEADER_SIZE {
        return Err(Error::HeaderTooLarge { path: p(), header_len, max: MAX_HEADER_SIZE });
    }
    if header_len > available {
        return Err(Error::HeaderPastEnd { path: p(), header_len, available });
    }
    let data_start = 8 + header_len as usize;
    let header = &bytes[8..data_start];
    let text =
        std::str::from_utf8(header).map_err(|e| Error::HeaderNotUtf8 { path: p(), valid_up_to: e.valid_up_to() })?;
    let entries: Entries = serde_json::from_str(text).map_err(|source| Error::HeaderNotJson { path: p(), source })?;
    let data_len = bytes.len() - data_start;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(Error::DuplicateTensor { path: p(), name });
        }
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|source| Error::HeaderNotJson { path: p(), source })?;
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value).map_err(|e| Error::HeaderNotJson {
            path: p(),
            source: de::Error::custom(format!("tensor {name:?}: {e}")),
        })?;
        let Ok(dtype) = DType::from_str(&raw.dtype) else {
            return Err(Error::UnknownDtype { path: p(), name, dtype: raw.dtype });
        };
        let (start, end) = raw.data_offsets;
        if start > end || end > data_len as u64 {
            return Err(Error::OffsetsOutOfBounds { path: p(), name, start, end, data_len });
        }
        let (start, end) = (start as usize, end as usize);
        let shape: Option<Vec<usize>> = raw.shape.iter().map(|&d| usize::try_from(d).ok()).collect();
        let numel = shape.as_ref().and_then(|s| s.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)));
        let expected = numel.and_then(|n| dtype.bytes_for(n));
        if expected != Some(end - start) {
            return Err(Error::ShapeMismatch {
                path: p(),
                name,
                dtype,
                shape: raw.shape.iter().map(|&d| d as usize).collect(),
                expected: expected.map_or_else(|| "an unrepresentable number of".into(), |e| e.to_string()),
                actual: end - start,
            });
        }
        tensors.push(TensorInfo { name, dtype, shape: shape.unwrap_or_default(), data_offsets: (start, end) });
    }

    // Offsets must tile the data section exactly: sorted by start, each begins where the last ended.
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.data_offsets.0, t.data_offsets.1));
    let mut cursor = 0usize;
    let mut prev: Option<&TensorInfo> = None;
    for t in &order {
        let (s, e) = t.data_offsets;
        if s < cursor {
            let first = prev.map(|p| p.name.clone()).unwrap_or_default();
            return Err(Error::OverlappingTensors { path: p(), first, second: t.name.clone() });
        }
        if s > cursor {
            return Err(Error::UncoveredData {
                path: p(),
                detail: format!("bytes [{cursor}, {s}) before tensor {:?} belong to no tensor", t.name),
            });
        }
        cursor = e;
        if e > s || prev.is_none() {
            prev = Some(t);
        }
    }
    if cursor != data_len {
        return Err(Error::UncoveredData {
            path: p(),
            detail: format!(
                "{} trailing bytes after the last tensor (offset {cursor} of {data_len})",
                data_len - cursor
            ),
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((data_start, tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn open(bytes: Vec<u8>) -> Result<SafetensorsFile> {
        SafetensorsFile::from_bytes(Path::new("m.safetensors"), bytes)
    }

    #[test]
    fn test_valid_file_reads() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut data = Vec::new();
        data.extend_from_slice(&1.0f32.to_le_bytes());
        data.extend_from_slice(&2.0f32.to_le_bytes());
        data.extend_from_slice(&half::f16::from_f32(3.0).to_le_bytes());
        data.extend_from_slice(&half::f16::from_f32(4.0).to_le_bytes());
        let f = open(file(h, &data)).unwrap();
        assert_eq!(f.tensors().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(f.metadata()["format"], "pt");
        assert_eq!(f.view(f.get("b").unwrap()).to_f32().unwrap(), [3.0, 4.0]);
    }

    #[test]
    fn test_truncated() {
        assert!(matches!(open(vec![1, 2, 3]), Err(Error::Truncated { .. })));
    }

    #[test]
    fn test_header_past_end() {
        let mut v = 1000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        let e = open(v).unwrap_err();
        assert!(matches!(e, Error::HeaderPastEnd { .. }), "{e}");
        assert!(e.to_string().contains("m.safetensors"));
    }

    #[test]
    fn test_header_too_large() {
        let v = u64::MAX.to_le_bytes().to_vec();
        assert!(matches!(open(v), Err(Error::HeaderTooLarge { .. })));
    }

    #[test]
    fn test_not_utf8() {
        assert!(open(file("{\u{0}\u{0}", &[])).is_err());
        let mut v = 2u64.to_le_bytes().to_vec();
        v.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(open(v), Err(Error::HeaderNotUtf8 { .. })));
    }

    #[test]
    fn test_not_json() {
        assert!(matches!(open(file("{nope", &[])), Err(Error::HeaderNotJson { .. })));
        assert!(matches!(open(file("[1,2]", &[])), Err(Error::HeaderNotJson { .. })));
        let h = r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,0]}}"#;
        assert!(matches!(open(file(h, &[])), Err(Error::HeaderNotJson { .. })));
    }

    #[test]
    fn test_duplicate_names() {
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let e = open(file(h, &[0, 0])).unwrap_err();
        assert!(matches!(e, Error::DuplicateTensor { ref name, .. } if name == "a"), "{e}");
    }

    #[test]
    fn test_unknown_dtype() {
        let h = r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::UnknownDtype { .. })));
    }

    #[test]
    fn test_shape_mismatch() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::ShapeMismatch { .. })));
        let h = r#"{"a":{"dtype":"F32","shape":[18446744073709551615, 2],"data_offsets":[0,4]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn test_offsets_out_of_bounds() {
        let h = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::OffsetsOutOfBounds { .. })));
        let h = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::OffsetsOutOfBounds { .. })));
    }

    #[test]
    fn test_overlap() {
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::OverlappingTensors { .. })));
    }

    #[test]
    fn test_gap_and_trailing_bytes() {
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::UncoveredData { .. })));
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(matches!(open(file(h, &[0; 4])), Err(Error::UncoveredData { .. })));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn test_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = open(bytes);
        }

        #[test]
        fn test_arbitrary_headers_never_panic(header in "\\{(\"[a-c]\":\\{\"dtype\":\"(F32|U8|F4|BF16)\",\"shape\":\\[[0-9]{0,3}(,[0-9]{1,2})?\\],\"data_offsets\":\\[[0-9]{1,2},[0-9]{1,2}\\]\\},?){0,3}\\}", data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = open(file(&header, &data));
        }
    }
}
