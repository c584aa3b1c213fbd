//! GGUF (v2/v3) reading and (v3) writing: header, metadata, tensor infos, alignment, and dequantization of
//! F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q4_K, Q5_K, Q6_K to f32. Every length and offset is checked
//! against the file: untrusted bytes give an [`Error::InvalidModel`] naming the file and what is
//! wrong, never a panic. Spec: ggml's docs/gguf.md; block layouts: ggml-common.h.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};

use crate::{Error, Result};

mod write;
pub use write::{GgufBuilder, GgufLayout, GgufWriter, MetaType};

const MAGIC: &[u8; 4] = b"GGUF";
/// Caps on counts declared in the header, far above real files, so a corrupt count cannot make
/// us allocate gigabytes before the bounds checks catch it.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
/// Elements of all metadata arrays together (8 Mi: a 262k-token vocabulary with its scores, types
/// and merges is about 1 Mi), so a file cannot make the parsed metadata tens of times its size.
const MAX_ARRAY: u64 = 1 << 23;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// array.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// As an unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::U64(v) => Some(*v),
            GgufValue::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    /// As a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::F64(v) => Some(*v),
            GgufValue::U64(v) => Some(*v as f64),
            GgufValue::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// Every type, cheapest first by bits per weight.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_K,
        GgmlType::Q5_1,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];

    /// ggml's type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The type named `name` as ggml spells it (`"Q4_K"`), case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Bits per weight, block overhead included.
    pub fn bits_per_weight(self) -> f64 {
        let (e, b) = self.block();
        (b * 8) as f64 / e as f64
    }

    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }

    /// Name as ggml spells it.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }
}

/// One tensor's entry.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    /// Name in the file (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dims, innermost first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    /// Type.
    pub ggml_type: GgmlType,
    /// Absolute byte range in the file.
    pub range: (usize, usize),
}

impl GgufTensor {
    /// Row-major shape (outermost first), as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    /// Elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// A parsed GGUF file (metadata and tensor directory; data stays in `bytes`).
#[derive(Debug)]
pub struct GgufFile {
    /// GGUF version.
    pub version: u32,
    /// Metadata.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Each metadata value as stored: its GGUF type id and the byte range of its encoding (after
    /// the type id), so a writer can copy it with its exact type.
    pub raw: BTreeMap<String, (u32, (usize, usize))>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor>,
}

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    /// Metadata array elements read so far (bounded by [`MAX_ARRAY`]).
    elems: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::InvalidModel { path: self.path.to_path_buf(), reason: format!("GGUF: {what} (at byte {})", self.pos) }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err(format!("truncated while reading {what}")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| self.err(format!("{what}: length {n} too large")))?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<GgufValue> {
        let w = |c: &mut Self, n| c.take(n, key).map(<[u8]>::to_vec);
        Ok(match ty {
            0 => GgufValue::U64(u64::from(w(self, 1)?[0])),
            1 => GgufValue::I64(i64::from(w(self, 1)?[0] as i8)),
            2 => GgufValue::U64(u64::from(u16::from_le_bytes(w(self, 2)?.try_into().expect("2")))),
            3 => GgufValue::I64(i64::from(i16::from_le_bytes(w(self, 2)?.try_into().expect("2")))),
            4 => GgufValue::U64(u64::from(self.u32(key)?)),
            5 => GgufValue::I64(i64::from(self.u32(key)? as i32)),
            6 => GgufValue::F64(f64::from(f32::from_bits(self.u32(key)?))),
            7 => match w(self, 1)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("{key}: bool byte {b}"))),
            },
            8 => GgufValue::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("{key}: arrays nested too deep")));
                }
                let inner = self.u32(key)?;
                let n = self.u64(key)?;
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(self.err(format!("{key}: array length {n} exceeds the file")));
                }
                self.elems = self.elems.saturating_add(n);
                if self.elems > MAX_ARRAY {
                    return Err(self.err(format!(
                        "{key}: metadata arrays hold more than {MAX_ARRAY} elements in total (the limit of this reader)"
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(inner, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(self.u64(key)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(key)?)),
            t => return Err(self.err(format!("{key}: unknown metadata type {t}"))),
        })
    }
}

impl GgufFile {
    /// Parses and validates `bytes` (the whole file); `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor { path, bytes, pos: 0, elems: 0 };
        if c.take(4, "magic")? != MAGIC {
            return Err(c.err("not a GGUF file (magic is not \"GGUF\")"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported version {version} (2 and 3 are read)")));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
            return Err(c.err(format!("implausible counts: {n_tensors} tensors, {n_kv} metadata entries")));
        }
        let mut metadata = BTreeMap::new();
        let mut raw = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let start = c.pos;
            let v = c.value(ty, &key, 0)?;
            raw.insert(key.clone(), (ty, (start, c.pos)));
            if metadata.insert(key.clone(), v).is_some() {
                return Err(c.err(format!("duplicate metadata key {key:?}")));
            }
        }
        let align = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| c.err("general.alignment must be a power of two"))?,
            None => 32,
        } as usize;
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&name)?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(c.err(format!("tensor {name:?}: {nd} dimensions (ggml tensors have 1 to {MAX_DIMS})")));
            }
            let dims = (0..nd).map(|_| c.u64(&name)).collect::<Result<Vec<u64>>>()?;
            let ty_id = c.u32(&name)?;
            let ggml_type = GgmlType::from_id(ty_id).ok_or_else(|| {
                c.err(format!(
                    "tensor {name:?}: ggml type {ty_id} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"
                ))
            })?;
            let offset = c.u64(&name)?;
            infos.push((name, dims, ggml_type, offset));
        }
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(infos.len());
        let mut seen = std::collections::BTreeSet::new();
        for (name, dims, ggml_type, offset) in infos {
            let bad = |m: String| Error::InvalidModel {
                path: path.to_path_buf(),
                reason: format!("GGUF: tensor {name:?}: {m}"),
            };
            if !seen.insert(name.clone()) {
                return Err(bad("duplicate tensor name".into()));
            }
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
            let (be, bb) = ggml_type.block();
            if dims[0] % be as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {}-element {} block",
                    dims[0],
                    be,
                    ggml_type.name()
                )));
            }
            let nbytes = (numel / be as u64).checked_mul(bb as u64).ok_or_else(|| bad("size overflows".into()))?;
            if offset % align as u64 != 0 {
                return Err(bad(format!("offset {offset} is not aligned to {align}")));
            }
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            let (Some(start), Some(end)) = (start, end) else { return Err(bad("offset overflows".into())) };
            if end > bytes.len() as u64 {
                return Err(bad(format!("data [{start}, {end}) runs past the end of the {}-byte file", bytes.len())));
            }
            tensors.push(GgufTensor { name, dims, ggml_type, range: (start as usize, end as usize) });
        }
        let mut by_start: Vec<&GgufTensor> = tensors.iter().collect();
        by_start.sort_by_key(|t| t.range.0);
        for w in by_start.windows(2) {
            if w[1].range.0 < w[0].range.1 {
                return Err(Error::InvalidModel {
                    path: path.to_path_buf(),
                    reason: format!("GGUF: tensors {:?} and {:?} overlap", w[0].name, w[1].name),
                });
            }
        }
        Ok(GgufFile { version, metadata, raw, tensors })
    }

    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}

#[allow(clippy::many_single_char_names)] // ggml's names: d, q, l, y, ...
/// Dequantizes one tensor's bytes to f32 (ggml's reference formulas, f32 arithmetic in the same
/// order as ggml and gguf-py so results match bit for bit).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut Vec<f32>) {
    out.clear();
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => out.extend(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(h)),
        GgmlType::BF16 => out.extend(data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = h(b);
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(18) {
                let d = h(b);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| f32::from((q & 0x0f) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(20) {
                let (d, m) = (h(b), h(&b[2..]));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let q51 = ty == GgmlType::Q5_1;
            let step = if q51 { 24 } else { 22 };
            for b in data.chunks_exact(step) {
                let d = h(b);
                let (m, rest) = if q51 { (h(&b[2..]), &b[4..]) } else { (0.0, &b[2..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..];
                let val = |j: usize, hi: bool| {
                    let (nib, bit) = if hi {
                        (qs[j] >> 4, (qh >> (j + 12)) & 0x10)
                    } else {
                        (qs[j] & 0x0f, ((qh >> j) << 4) & 0x10)
                    };
                    let q = i32::from(nib) | bit as i32;
                    if q51 { q as f32 * d + m } else { (q - 16) as f32 * d }
                };
                out.extend((0..16).map(|j| val(j, false)));
                out.extend((0..16).map(|j| val(j, true)));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // Super-blocks of 256: f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins,
            // (Q5_K: 32 bytes of high bits), 128 bytes of low nibbles; 8 sub-blocks of 32.
            let q5 = ty == GgmlType::Q5_K;
            for b in data.chunks_exact(if q5 { 176 } else { 144 }) {
                let (d, dmin) = (h(b), h(&b[2..]));
                let scales = &b[4..16];
                let (qh, ql) = if q5 { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for j in 0..4 {
                    let q = &ql[32 * j..32 * j + 32];
                    for half in 0..2 {
                        let (sc, m) = k_scale_min(2 * j + half, scales);
                        let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
                        let bit = 1u8 << (2 * j + half);
                        out.extend((0..32).map(|l| {
                            let nib = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                            let hi = if q5 && qh[l] & bit != 0 { 16 } else { 0 };
                            d1 * f32::from(nib + hi) - m1
                        }));
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            // 128 bytes low nibbles, 64 bytes 2-bit highs, 16 i8 scales, f16 d (last).
            for b in data.chunks_exact(210) {
                let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
                let d = h(&b[208..]);
                let start = out.len();
                out.resize(start + 256, 0.0);
                let y = &mut out[start..];
                for n in 0..2 {
                    let (ql, qh, sc, y) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &mut y[128 * n..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| f32::from(((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32);
                        let s = |k: usize| d * f32::from(sc[is + k] as i8);
                        y[l] = s(0) * q(ql[l] & 0x0f, 0);
                        y[l + 32] = s(2) * q(ql[l + 32] & 0x0f, 2);
                        y[l + 64] = s(4) * q(ql[l] >> 4, 4);
                        y[l + 96] = s(6) * q(ql[l + 32] >> 4, 6);
                    }
                }
            }
        }
    }
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// llama.cpp stores Q and K projections permuted for its rotary layout
/// (convert_hf_to_gguf.py `LlamaModel.permute`); this is the inverse, giving the Hugging Face
/// `rotate_half` layout. `w` is row-major `[rows, cols]`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || w.len() != rows * cols {
        return None;
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    // w viewed as [n_head, half, 2, cols] → swap axes 1 and 2 → [n_head, 2, half, cols].
    for h in 0..n_head {
        for i in 0..half {
            for two in 0..2 {
                let src = ((h * half + i) * 2 + two) * cols;
                let dst = ((h * 2 + two) * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Some(out)
}

/// llama.cpp's permutation of Q/K rows (`convert_hf_to_gguf.py` `LlamaModel.permute`), the
/// inverse of [`unpermute_rows`]: Hugging Face `rotate_half` layout in, GGUF layout out.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || w.len() != rows * cols {
        return None;
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    // w viewed as [n_head, 2, half, cols] → swap axes 1 and 2 → [n_head, half, 2, cols].
    for h in 0..n_head {
        for two in 0..2 {
            for i in 0..half {
                let src = ((h * 2 + two) * half + i) * cols;
                let dst = ((h * half + i) * 2 + two) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    fn s(v: &mut Vec<u8>, t: &str) {
        v.extend_from_slice(&(t.len() as u64).to_le_bytes());
        v.extend_from_slice(t.as_bytes());
    }

    /// A tiny GGUF with one Q8_0 tensor of 32 elements.
    fn tiny(offset: u64, ty: u32) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
        s(&mut v, "general.architecture");
        v.extend_from_slice(&8u32.to_le_bytes());
        s(&mut v, "llama");
        s(&mut v, "w");
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&32u64.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        while !v.len().is_multiple_of(32) {
            v.push(0);
        }
        v.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        v.extend((0..32).map(|i: i32| (i - 16) as i8 as u8));
        v
    }

    #[test]
    fn test_reads_and_dequantizes_q8_0() {
        let v = tiny(0, 8);
        let g = GgufFile::parse(Path::new("t.gguf"), &v).unwrap();
        assert_eq!(g.get("general.architecture").unwrap().as_str(), Some("llama"));
        let t = &g.tensors[0];
        let mut out = Vec::new();
        dequantize(t.ggml_type, &v[t.range.0..t.range.1], &mut out);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
    }

    #[test]
    fn test_malformed_files_are_errors() {
        let p = Path::new("t.gguf");
        assert!(GgufFile::parse(p, b"GGML").unwrap_err().to_string().contains("not a GGUF file"));
        let v = tiny(0, 8);
        for cut in [3, 7, 20, 40, v.len() - 1] {
            assert!(GgufFile::parse(p, &v[..cut]).is_err(), "cut at {cut}");
        }
        assert!(GgufFile::parse(p, &tiny(32, 8)).unwrap_err().to_string().contains("past the end"));
        assert!(GgufFile::parse(p, &tiny(3, 8)).unwrap_err().to_string().contains("not aligned"));
        assert!(GgufFile::parse(p, &tiny(0, 10)).unwrap_err().to_string().contains("not supported"));
    }

    proptest::proptest! {
        #[test]
        fn test_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut v = b"GGUF\x03\0\0\0".to_vec();
            v.extend(bytes);
            let _ = GgufFile::parse(Path::new("f.gguf"), &v);
        }
    }

    #[test]
    fn test_unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
        let (rows, cols, heads) = (8, 3, 2);
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let half = rows / heads / 2;
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for two in 0..2 {
                for i in 0..half {
                    let src = ((h * 2 + two) * half + i) * cols;
                    let dst = ((h * half + i) * 2 + two) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, heads).unwrap(), hf);
        assert_eq!(permute_rows(&hf, rows, cols, heads).unwrap(), gguf);
        assert!(unpermute_rows(&gguf, rows, cols, 3).is_none());
    }
}
