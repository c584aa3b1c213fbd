//! Sparse-bitmask storage, compressed-tensors' `sparse-bitmask` format: a pruned matrix `X.weight`
//! of shape `[rows, cols]` is stored as
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `X.compressed` | the weight dtype | `[nnz]` | the kept values, row by row |
//! | `X.bitmask` | U8 | `[rows, ⌈cols/8⌉]` | 1 = kept; bit `c % 8` of byte `c / 8` (numpy `packbits(bitorder="little")`) |
//! | `X.shape` | I64 | `[2, 1]` | `rows, cols` |
//! | `X.row_offsets` | I64 | `[rows]` | index in `compressed` of each row's first value |
//!
//! The mask marks the weights the pruning kept (a kept weight that happens to be 0 is stored as a
//! 0), so `nnz` is known when the pass is planned and the file layout can be fixed before the
//! weights stream. compressed-tensors' decompressor (scatter `compressed` where the mask is set)
//! reads it unchanged. docs/quantized-layout.md has the full layout.

use mcompress_core::{DType, ModelSource};

/// A pruned matrix in sparse-bitmask form.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseTensor {
    /// Value dtype.
    pub dtype: DType,
    /// `[rows, cols]`.
    pub shape: Vec<usize>,
    /// Packed mask, `rows × ⌈cols/8⌉` bytes.
    pub bitmask: Vec<u8>,
    /// Kept values, `nnz` elements of `dtype`, little-endian.
    pub values: Vec<u8>,
    /// Start of each row in `values` (elements).
    pub row_offsets: Vec<i64>,
}

/// Names of the four stored tensors of matrix `name`: compressed, bitmask, shape, row_offsets.
pub fn names(name: &str) -> [String; 4] {
    let m = name.strip_suffix(".weight").unwrap_or(name);
    [format!("{m}.compressed"), format!("{m}.bitmask"), format!("{m}.shape"), format!("{m}.row_offsets")]
}

/// Whether bit `c` of row `r` is set in a packed mask with `bpr` bytes per row.
fn kept(bitmask: &[u8], bpr: usize, r: usize, c: usize) -> bool {
    bitmask[r * bpr + c / 8] & (1 << (c % 8)) != 0
}

/// Bytes the sparse form takes for a `rows × cols` matrix with `nnz` kept values.
pub fn stored_bytes(dtype: DType, rows: usize, cols: usize, nnz: usize) -> usize {
    dtype.bytes_for(nnz).unwrap_or(usize::MAX) + rows * cols.div_ceil(8) + 16 + rows * 8
}

impl SparseTensor {
    /// Packs `w` (`rows × cols` f32) keeping the positions where `keep` is true, values stored
    /// as `dtype`. `None` if `dtype` is not a float type or the lengths disagree.
    pub fn from_dense(dtype: DType, rows: usize, cols: usize, w: &[f32], keep: &[bool]) -> Option<Self> {
        if w.len() != rows * cols || keep.len() != w.len() || !dtype.is_float() {
            return None;
        }
        let bpr = cols.div_ceil(8);
        let mut bitmask = vec![0u8; rows * bpr];
        let mut kept = Vec::with_capacity(w.len() / 2);
        let mut row_offsets = Vec::with_capacity(rows);
        for r in 0..rows {
            row_offsets.push(kept.len() as i64);
            for c in 0..cols {
                if keep[r * cols + c] {
                    bitmask[r * bpr + c / 8] |= 1 << (c % 8);
                    kept.push(w[r * cols + c]);
                }
            }
        }
        let values = dtype.encode_f32(&kept)?;
        Some(SparseTensor { dtype, shape: vec![rows, cols], bitmask, values, row_offsets })
    }

    /// Kept values.
    pub fn nnz(&self) -> usize {
        self.values.len() / self.dtype.bytes_for(1).unwrap_or(1).max(1)
    }

    /// Row `r` as f32 into `out` (`cols` long).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let cols = self.shape[1];
        let bpr = cols.div_ceil(8);
        let esize = self.dtype.bytes_for(1).unwrap_or(4);
        let mut k = usize::try_from(self.row_offsets[r]).unwrap_or(0);
        let mut v = [0f32];
        for (c, o) in out[..cols].iter_mut().enumerate() {
            if kept(&self.bitmask, bpr, r, c) {
                let ok = self.values.get(k * esize..(k + 1) * esize).is_some_and(|b| self.dtype.decode_f32(b, &mut v));
                *o = if ok { v[0] } else { 0.0 };
                k += 1;
            } else {
                *o = 0.0;
            }
        }
    }

    /// The dense matrix as f32.
    pub fn to_dense(&self) -> Vec<f32> {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_mut(cols.max(1)).enumerate().take(rows) {
            self.row_f32(r, row);
        }
        out
    }

    /// The mask as booleans.
    pub fn keep(&self) -> Vec<bool> {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let bpr = cols.div_ceil(8);
        (0..rows * cols).map(|i| kept(&self.bitmask, bpr, i / cols, i % cols)).collect()
    }

    /// The stored tensors' bytes, in [`names`] order.
    pub fn into_parts(self) -> [Vec<u8>; 4] {
        let shape: Vec<u8> = self.shape.iter().flat_map(|&d| (d as i64).to_le_bytes()).collect();
        let offsets: Vec<u8> = self.row_offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        [self.values, self.bitmask, shape, offsets]
    }

    /// Reads matrix `name` stored in sparse-bitmask form from a model or bundle; `Ok(None)` if
    /// it is not stored that way. Every length and offset is checked.
    pub fn load(model: &ModelSource, name: &str) -> Result<Option<Self>, String> {
        let [cn, bn, sn, on] = names(name);
        let find = |n: &str| model.tensors().iter().find(|r| model.info(r).name == n).copied();
        let (Some(c), Some(b), Some(s)) = (find(&cn), find(&bn), find(&sn)) else { return Ok(None) };
        let sv = model.view(&s);
        if sv.dtype != DType::I64 || sv.data.len() != 16 {
            return Err(format!("{sn}: expected 2 int64 dims"));
        }
        let dims: Vec<usize> = sv
            .data
            .chunks_exact(8)
            .map(|d| i64::from_le_bytes(d.try_into().expect("8 bytes")).max(0) as usize)
            .collect();
        let (rows, cols) = (dims[0], dims[1]);
        let bv = model.view(&b);
        let bpr = cols.div_ceil(8);
        if bv.dtype != DType::U8 || Some(bv.data.len()) != rows.checked_mul(bpr) {
            return Err(format!("{bn}: expected {rows} x {bpr} uint8 for shape [{rows}, {cols}]"));
        }
        let bitmask = bv.data.to_vec();
        // Kept values per row (padding bits past `cols` are not counted): the row offsets and,
        // summed, the length `compressed` must have.
        let mut row_offsets = Vec::with_capacity(rows);
        let mut set = 0usize;
        for r in 0..rows {
            row_offsets.push(set as i64);
            set += (0..cols).filter(|&c| kept(&bitmask, bpr, r, c)).count();
        }
        let cv = model.view(&c);
        if !cv.dtype.is_float() || cv.dtype.bytes_for(set) != Some(cv.data.len()) {
            return Err(format!("{cn}: {} bytes of {} for {set} kept values", cv.data.len(), cv.dtype));
        }
        if let Some(o) = find(&on) {
            let ov = model.view(&o);
            let stored: Vec<i64> =
                ov.data.chunks_exact(8).map(|d| i64::from_le_bytes(d.try_into().expect("8 bytes"))).collect();
            if ov.dtype != DType::I64 || stored != row_offsets {
                return Err(format!("{on}: row offsets disagree with the bitmask"));
            }
        }
        Ok(Some(SparseTensor {
            dtype: cv.dtype,
            shape: vec![rows, cols],
            bitmask,
            values: cv.data.to_vec(),
            row_offsets,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn test_round_trip_and_numpy_bit_order() {
        let w: Vec<f32> = (0..3 * 10).map(|i| i as f32 - 7.0).collect();
        let keep: Vec<bool> = (0..30).map(|i| i % 3 != 0).collect();
        let s = SparseTensor::from_dense(DType::F32, 3, 10, &w, &keep).unwrap();
        assert_eq!(s.nnz(), 20);
        // Row 0 keeps columns 1, 2, 4, 5, 7, 8: little bit order within each byte.
        assert_eq!(s.bitmask[0], 0b1011_0110);
        assert_eq!(s.bitmask[1], 0b0000_0001);
        assert_eq!(s.row_offsets, vec![0, 6, 13]);
        let d = s.to_dense();
        for i in 0..30 {
            assert_eq!(d[i], if keep[i] { w[i] } else { 0.0 });
        }
        assert_eq!(s.keep(), keep);
        assert_eq!(stored_bytes(DType::F32, 3, 10, 20), 80 + 6 + 16 + 24);
        assert_eq!(names("a.b.weight")[0], "a.b.compressed");
    }
}
