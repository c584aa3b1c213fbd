//! Round-to-nearest quantization kernels: a plain reference ([`quantize_ref`]) and the fast,
//! row-parallel one ([`quantize`]). Both produce the same bytes; a property test holds them to it.

use mcompress_core::DType;
use rayon::prelude::*;

use super::scheme::{QScheme, dequant_value, group_params, quant_value, scale_and_zero, scale_dtype};

/// A quantized tensor in the packed layout of [`super::scheme`].
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// Scheme.
    pub scheme: QScheme,
    /// Original shape.
    pub shape: Vec<usize>,
    /// Rows (`shape[0]`).
    pub rows: usize,
    /// Columns (product of the remaining dims).
    pub cols: usize,
    /// Packed codes, little-endian `I8` or `I32` bytes, `rows × packed_row_bytes`.
    pub packed: Vec<u8>,
    /// Scales `rows × groups`, already rounded to `scale_dtype`.
    pub scale: Vec<f32>,
    /// Storage dtype of the scales.
    pub scale_dtype: DType,
    /// Zero points `rows × groups` (asymmetric only).
    pub zero_point: Option<Vec<i8>>,
    /// NVFP4's per-tensor global scale `G` (the effective scales in `scale` are `s / G`).
    pub global_scale: Option<f32>,
    /// Σ (w - dequant(w))², for the relative RMSE.
    pub err2: f64,
    /// Σ w².
    pub ref2: f64,
}

/// Why a tensor could not be quantized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// NaN or infinity in a row.
    NonFinite {
        /// First offending row.
        row: usize,
    },
    /// The dtype is not F16/BF16/F32/F64, or the bytes do not match the shape.
    BadInput(String),
}

impl Quantized {
    /// A quantized matrix from its packed codes and `rows × groups` scales (rows and columns
    /// from `shape`), with no zero points, no global scale and no error figures: the fields that
    /// apply are set after.
    pub fn from_parts(scheme: QScheme, shape: &[usize], packed: Vec<u8>, scale: Vec<f32>, scale_dtype: DType) -> Self {
        let (rows, cols) = dims(shape);
        Quantized {
            scheme,
            shape: shape.to_vec(),
            rows,
            cols,
            packed,
            scale,
            scale_dtype,
            zero_point: None,
            global_scale: None,
            err2: 0.0,
            ref2: 0.0,
        }
    }

    /// Relative RMSE of the dequantized tensor: sqrt(Σ err² / Σ w²).
    pub fn rel_rmse(&self) -> f64 {
        if self.ref2 > 0.0 {
            (self.err2 / self.ref2).sqrt()
        } else if self.err2 > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }

    /// Code at (row, col), unpacked and signed.
    pub fn code(&self, r: usize, c: usize) -> i32 {
        let s = &self.scheme;
        let rb = s.packed_row_bytes(self.cols);
        unpack_code(&self.packed[r * rb..(r + 1) * rb], c, s.bits) - s.offset()
    }

    /// Dequantizes row `r` into `out` (`cols` values): the same values as [`Self::dequantize`],
    /// decoded a packed word at a time. Fused kernels use it to keep one row, never the matrix,
    /// in f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let s = &self.scheme;
        let (groups, gl) = (s.groups(self.cols), s.group_len(self.cols));
        let row = &self.packed[r * s.packed_row_bytes(self.cols)..][..s.packed_row_bytes(self.cols)];
        let out = &mut out[..self.cols];
        let (bits, mask, off) = (u32::from(s.bits), (1u32 << s.bits) - 1, s.offset());
        if s.is_float() {
            if s.is_fp8() {
                for (o, &b) in out.iter_mut().zip(row) {
                    *o = super::fp8::e4m3_to_f32(b);
                }
            } else {
                for (pair, &b) in out.chunks_mut(2).zip(row) {
                    pair[0] = super::fp4::e2m1_to_f32(b);
                    if let Some(hi) = pair.get_mut(1) {
                        *hi = super::fp4::e2m1_to_f32(b >> 4);
                    }
                }
            }
            for (g, vals) in out.chunks_mut(gl).enumerate() {
                let scale = self.scale[r * groups + g];
                for v in vals {
                    *v *= scale;
                }
            }
            return;
        }
        if 32 % bits == 0 {
            // Codes never straddle a word: decode a word at a time.
            let pf = (32 / bits) as usize;
            for (chunk, word) in out.chunks_mut(pf).zip(row.chunks_exact(4)) {
                let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                for (i, o) in chunk.iter_mut().enumerate() {
                    *o = (((w >> (i as u32 * bits)) & mask) as i32 - off) as f32;
                }
            }
        } else {
            for (c, o) in out.iter_mut().enumerate() {
                *o = (unpack_code(row, c, s.bits) - off) as f32;
            }
        }
        for (g, vals) in out.chunks_mut(gl).enumerate() {
            let gi = r * groups + g;
            let zp = self.zero_point.as_ref().map_or(0, |z| i32::from(z[gi]));
            let scale = self.scale[gi];
            for v in vals {
                *v = dequant_value(*v as i32, scale, zp);
            }
        }
    }

    /// Dequantizes to f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        if self.scheme.is_float() {
            let mut out = vec![0f32; self.rows * self.cols];
            for (r, row) in out.chunks_mut(self.cols).enumerate() {
                self.dequantize_row(r, row);
            }
            return out;
        }
        let groups = self.scheme.groups(self.cols);
        let gl = self.scheme.group_len(self.cols);
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let g = r * groups + c / gl;
                let zp = self.zero_point.as_ref().map_or(0, |z| i32::from(z[g]));
                out.push(dequant_value(self.code(r, c), self.scale[g], zp));
            }
        }
        out
    }

    /// Zero points packed the way they are stored: offset and densely packed along dim 0 (down
    /// each group's column), `I32 [ceil(rows · bits / 32), groups]` (compressed-tensors
    /// `pack_to_int32(zero_point, bits, packed_dim=0)`).
    pub fn packed_zero_point(&self) -> Option<(Vec<usize>, DType, Vec<u8>)> {
        let zp = self.zero_point.as_ref()?;
        let s = &self.scheme;
        let groups = s.groups(self.cols);
        let prow = s.packed_cols(self.rows);
        let mut words = vec![0u32; prow * groups];
        let mut column = vec![0u8; prow * 4];
        let mut codes = vec![0i8; self.rows];
        for g in 0..groups {
            for (r, c) in codes.iter_mut().enumerate() {
                *c = zp[r * groups + g];
            }
            column.fill(0);
            pack_dense(s.bits, &codes, &mut column);
            for (i, w) in column.chunks_exact(4).enumerate() {
                words[i * groups + g] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            }
        }
        Some((vec![prow, groups], DType::I32, words.iter().flat_map(|w| w.to_le_bytes()).collect()))
    }
}

impl Quantized {
    /// FP8 codes as stored: `rows × cols` bytes (the row padding of the packed form dropped).
    pub fn fp8_bytes(&self) -> Vec<u8> {
        let rb = self.scheme.packed_row_bytes(self.cols);
        self.packed.chunks(rb.max(1)).flat_map(|r| &r[..self.cols]).copied().collect()
    }

    /// The scales as stored ([`QScheme::stored_scale_shape`]): one per tensor, row or block for
    /// FP8 (the expanded `rows × groups` form folded back), `rows × groups` for integers.
    pub fn stored_scale(&self) -> Vec<f32> {
        let s = &self.scheme;
        let groups = s.groups(self.cols);
        match s.kind {
            super::scheme::QKind::Fp8 { strategy: super::scheme::Fp8Strategy::Tensor, .. } => vec![self.scale[0]],
            super::scheme::QKind::Fp8 { strategy: super::scheme::Fp8Strategy::Block, .. } => (0..self.rows)
                .step_by(super::fp8::FP8_BLOCK)
                .flat_map(|r| self.scale[r * groups..(r + 1) * groups].iter().copied())
                .collect(),
            _ => self.scale.clone(),
        }
    }
}

/// FP8 or FP4 codes of `w` (`rows × cols`, row-major) under `rows × groups` scales: the packed
/// rows, Σ (w − w')² and Σ w² (for the relative RMSE).
pub(super) fn float_codes(s: &QScheme, w: &[f32], scale: &[f32], rows: usize, cols: usize) -> (Vec<u8>, f64, f64) {
    let (groups, gl, rb) = (s.groups(cols), s.group_len(cols), s.packed_row_bytes(cols));
    let mut packed = vec![0u8; rows * rb];
    let (mut err2, mut ref2) = (0f64, 0f64);
    for (r, (row, out)) in w.chunks(cols).zip(packed.chunks_mut(rb.max(1))).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            let (code, v) = s.float_round(x, scale[r * groups + c / gl]);
            s.put_float_code(out, c, code);
            let d = f64::from(x - v);
            err2 += d * d;
            ref2 += f64::from(x) * f64::from(x);
        }
    }
    (packed, err2, ref2)
}

/// Unsigned code `c` of a densely packed row (little-endian `u32` words as bytes): bits
/// `c·bits .. (c+1)·bits` of the row's bit stream.
#[inline]
pub fn unpack_code(row: &[u8], c: usize, bits: u8) -> i32 {
    let bit = c * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    // A code of ≤ 8 bits spans at most two bytes.
    let lo = u32::from(row[byte]);
    let hi = row.get(byte + 1).map_or(0, |&b| u32::from(b));
    (((lo | (hi << 8)) >> shift) & ((1u32 << bits) - 1)) as i32
}

/// Packs signed codes densely (see [`super::scheme`]) into `out`, which must be zeroed and hold
/// `ceil(codes.len() · bits / 32)` little-endian words.
pub fn pack_dense(bits: u8, codes: &[i8], out: &mut [u8]) {
    let off = 1i32 << (bits - 1);
    for (c, &q) in codes.iter().enumerate() {
        let u = ((i32::from(q) + off) as u32) & ((1u32 << bits) - 1);
        let bit = c * bits as usize;
        let (byte, shift) = (bit / 8, bit % 8);
        let v = u << shift;
        out[byte] |= v as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (v >> 8) as u8;
        }
    }
}

fn dims(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    let cols = shape.iter().skip(1).product::<usize>();
    (rows, cols)
}

pub(super) fn check_input(dtype: DType, shape: &[usize], data: &[u8]) -> Result<(usize, usize), QuantError> {
    if !dtype.is_float() {
        return Err(QuantError::BadInput(format!("dtype {dtype} is not a float type")));
    }
    if shape.len() < 2 {
        return Err(QuantError::BadInput(format!("rank {} (needs a matrix)", shape.len())));
    }
    let (rows, cols) = dims(shape);
    if rows == 0 || cols == 0 {
        return Err(QuantError::BadInput("empty tensor".into()));
    }
    if dtype.bytes_for(rows * cols) != Some(data.len()) {
        return Err(QuantError::BadInput("data length does not match shape".into()));
    }
    Ok((rows, cols))
}

/// Reference implementation: element by element, no parallelism, no tricks.
pub fn quantize_ref(s: &QScheme, dtype: DType, shape: &[usize], data: &[u8]) -> Result<Quantized, QuantError> {
    if s.is_fp8() {
        return super::fp8::quantize_fp8(s, dtype, shape, data);
    }
    if s.is_fp4() {
        return super::fp4::quantize_fp4(s, dtype, shape, data);
    }
    let (rows, cols) = check_input(dtype, shape, data)?;
    let mut w = vec![0f32; rows * cols];
    dtype.decode_f32(data, &mut w);
    let sdt = scale_dtype(dtype);
    let (qmin, qmax) = s.qrange();
    let groups = s.groups(cols);
    let gl = s.group_len(cols);
    let mut codes = vec![0i32; rows * cols];
    let mut scale = vec![0f32; rows * groups];
    let mut zero = vec![0i8; rows * groups];
    let (mut err2, mut ref2) = (0f64, 0f64);
    for r in 0..rows {
        let (mut e_row, mut r_row) = (0f64, 0f64);
        for g in 0..groups {
            let lo = g * gl;
            let hi = ((g + 1) * gl).min(cols);
            let vals = &w[r * cols + lo..r * cols + hi];
            let (sc, zp) = group_params(s, vals, sdt).ok_or(QuantError::NonFinite { row: r })?;
            scale[r * groups + g] = sc;
            zero[r * groups + g] = zp as i8;
            for (c, &x) in (lo..hi).zip(vals) {
                let q = quant_value(x, sc, zp, qmin, qmax);
                codes[r * cols + c] = q;
                let d = f64::from(x - dequant_value(q, sc, zp));
                e_row += d * d;
                r_row += f64::from(x) * f64::from(x);
            }
        }
        err2 += e_row;
        ref2 += r_row;
    }
    Ok(Quantized::from_codes(s, shape, &codes, scale, (!s.symmetric).then_some(zero), sdt, err2, ref2))
}

impl Quantized {
    /// Packs signed codes (`rows × cols`, row-major, each in the scheme's range) with their
    /// scales and zero points (`rows × groups`) into the documented layout. For quantizers that
    /// choose codes their own way (GPTQ) and share the layout, names and readers.
    #[allow(clippy::too_many_arguments)]
    pub fn from_codes(
        s: &QScheme,
        shape: &[usize],
        codes: &[i32],
        scale: Vec<f32>,
        zero_point: Option<Vec<i8>>,
        scale_dtype: DType,
        err2: f64,
        ref2: f64,
    ) -> Quantized {
        let (rows, cols) = dims(shape);
        let rb = s.packed_row_bytes(cols);
        let mut packed = vec![0u8; rows * rb];
        let mut row8 = vec![0i8; cols];
        for (row, out) in codes.chunks(cols.max(1)).zip(packed.chunks_exact_mut(rb.max(1))) {
            for (d, &q) in row8.iter_mut().zip(row) {
                *d = q as i8;
            }
            pack_row(s, &row8, out);
        }
        Quantized { zero_point, err2, ref2, ..Quantized::from_parts(*s, shape, packed, scale, scale_dtype) }
    }
}

/// Rows handled by one parallel task: about 256 KiB of f32 input, at least one row.
fn rows_per_task(cols: usize) -> usize {
    ((1 << 16) / cols.max(1)).max(1)
}

/// Fast implementation: rows split into fixed-size tasks across rayon's pool; each task decodes
/// its rows into a scratch buffer, finds group ranges and writes codes straight into the packed
/// output. Task boundaries depend only on the shape, and per-task error sums are added in task
/// order, so the output is identical at any thread count.
pub fn quantize(s: &QScheme, dtype: DType, shape: &[usize], data: &[u8]) -> Result<Quantized, QuantError> {
    if s.is_fp8() {
        return super::fp8::quantize_fp8(s, dtype, shape, data);
    }
    if s.is_fp4() {
        return super::fp4::quantize_fp4(s, dtype, shape, data);
    }
    let (rows, cols) = check_input(dtype, shape, data)?;
    let sdt = scale_dtype(dtype);
    let groups = s.groups(cols);
    let row_bytes = s.packed_row_bytes(cols);
    let in_row = data.len() / rows.max(1);
    let per = rows_per_task(cols);
    let mut packed = vec![0u8; rows * row_bytes];
    let mut scale = vec![0f32; rows * groups];
    let mut zero = vec![0i8; if s.symmetric { 0 } else { rows * groups }];
    let zero_chunks: Vec<&mut [i8]> = if s.symmetric {
        (0..rows.div_ceil(per)).map(|_| <&mut [i8]>::default()).collect()
    } else {
        zero.chunks_mut(per * groups).collect()
    };
    let sums: Vec<Result<(f64, f64), QuantError>> = packed
        .par_chunks_mut(per * row_bytes)
        .zip(scale.par_chunks_mut(per * groups))
        .zip(zero_chunks.into_par_iter())
        .enumerate()
        .map(|(t, ((out, sc), zp))| {
            let r0 = t * per;
            let rows_here = out.len() / row_bytes.max(1);
            let src = &data[r0 * in_row..(r0 + rows_here) * in_row];
            quantize_task(s, dtype, sdt, src, out, sc, zp, cols).map_err(|row| QuantError::NonFinite { row: r0 + row })
        })
        .collect();
    let (mut err2, mut ref2) = (0f64, 0f64);
    for r in sums {
        let (e, w) = r?;
        err2 += e;
        ref2 += w;
    }
    let zero_point = (!s.symmetric).then_some(zero);
    Ok(Quantized { zero_point, err2, ref2, ..Quantized::from_parts(*s, shape, packed, scale, sdt) })
}

/// Lanes of the vectorised loops. Independent accumulators per lane let the compiler keep
/// min/max and error sums in vector registers; the order of additions is fixed, so results do
/// not depend on threads.
const LANES: usize = 8;

/// 1.5 · 2^23: adding it to |v| < 2^22 rounds v to an integer (half to even), stored in the low
/// mantissa bits.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

/// (min(v, 0), max(v, 0)) of a group, or `None` if it holds NaN or infinity.
#[inline(always)]
#[allow(clippy::inline_always)] // must inline into the AVX2 copy of `quantize_task`
fn group_range(vals: &[f32]) -> Option<(f32, f32)> {
    let mut lo = [0f32; LANES];
    let mut hi = [0f32; LANES];
    let mut poison = [0f32; LANES];
    let chunks = vals.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
            poison[i] += c[i] * 0.0;
        }
    }
    for (i, &v) in tail.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        poison[i] += v * 0.0;
    }
    if poison.iter().any(|p| p.is_nan()) {
        return None;
    }
    Some((lo.iter().copied().fold(0f32, f32::min), hi.iter().copied().fold(0f32, f32::max)))
}

/// Quantizes a run of rows (one parallel task): decode, quantize, pack. Compiled for AVX2 as
/// well as baseline x86-64 and picked at run time; every operation is exact IEEE arithmetic in a
/// fixed order, so both versions produce identical bytes. `Err(row)` names a row with NaN/inf.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
#[allow(clippy::too_many_arguments)]
fn quantize_task(
    s: &QScheme,
    dtype: DType,
    sdt: DType,
    src: &[u8],
    out: &mut [u8],
    scales: &mut [f32],
    zps: &mut [i8],
    cols: usize,
) -> Result<(f64, f64), usize> {
    let row_bytes = s.packed_row_bytes(cols);
    let groups = s.groups(cols);
    let in_row = src.len() / (out.len() / row_bytes.max(1)).max(1);
    let mut buf = vec![0f32; cols];
    let mut codes = vec![0i8; cols];
    let mut rounded = vec![0f32; s.group_len(cols).min(cols)];
    let (mut e, mut w2) = (0f64, 0f64);
    for (i, (row, o)) in src.chunks_exact(in_row).zip(out.chunks_exact_mut(row_bytes)).enumerate() {
        dtype.decode_f32(row, &mut buf);
        let zrow = if zps.is_empty() { None } else { Some(&mut zps[i * groups..(i + 1) * groups]) };
        let (re, rw) =
            quantize_row(s, sdt, &buf, &mut codes, &mut rounded, &mut scales[i * groups..(i + 1) * groups], zrow)
                .ok_or(i)?;
        e += re;
        w2 += rw;
        pack_row(s, &codes, o);
    }
    Ok((e, w2))
}

/// Quantizes one row; returns (Σ err², Σ w²) or `None` on NaN/inf.
#[inline(always)]
#[allow(clippy::inline_always)] // must inline into the AVX2 copy of `quantize_task`
fn quantize_row(
    s: &QScheme,
    sdt: DType,
    row: &[f32],
    codes: &mut [i8],
    rounded: &mut [f32],
    scales: &mut [f32],
    mut zps: Option<&mut [i8]>,
) -> Option<(f64, f64)> {
    let (qmin, qmax) = s.qrange();
    let gl = s.group_len(row.len());
    let (mut e, mut w2) = (0f64, 0f64);
    for (g, (vals, out)) in row.chunks(gl).zip(codes.chunks_mut(gl)).enumerate() {
        let (lo, hi) = group_range(vals)?;
        let (sc, zp) = scale_and_zero(s, lo, hi, sdt);
        scales[g] = sc;
        if let Some(z) = zps.as_deref_mut() {
            z[g] = zp as i8;
        }
        let mut ge = [0f32; LANES];
        let mut gw = [0f32; LANES];
        if sc == 0.0 {
            // An all-zero group: every code is the zero point and dequantizes to 0.
            out.fill(zp as i8);
            for (i, &x) in vals.iter().enumerate() {
                ge[i % LANES] += x * x;
                gw[i % LANES] += x * x;
            }
        } else {
            // Clamping x/scale to [qmin - zp, qmax - zp] before rounding equals clamping the
            // rounded code (the bounds are integers). Adding 1.5·2^23 then rounds half to even in
            // the FPU and leaves the integer in the low mantissa bits: no libm call and no
            // saturating float-to-int conversion, so the loop stays in vector registers.
            let (lo_c, hi_c) = ((qmin - zp) as f32, (qmax - zp) as f32);
            // Three simple passes over the group, each a straight vector loop: rounded values
            // (compare-and-select clamps; `f32::clamp`'s assertion would keep it scalar), codes
            // from their mantissa bits, then the error sums.
            let r = &mut rounded[..vals.len()];
            for (t, &x) in r.iter_mut().zip(vals) {
                let v = x / sc;
                let v = if v < lo_c { lo_c } else { v };
                let v = if v > hi_c { hi_c } else { v };
                *t = v + MAGIC;
            }
            for (o, t) in out.iter_mut().zip(r.iter()) {
                *o = ((t.to_bits() as i32).wrapping_sub(MAGIC_BITS) + zp) as i8;
            }
            let (vc, vtail) = vals.as_chunks::<LANES>();
            let (rc, rtail) = r.as_chunks::<LANES>();
            for (c, t) in vc.iter().zip(rc) {
                for i in 0..LANES {
                    let d = c[i] - (t[i] - MAGIC) * sc;
                    ge[i] += d * d;
                    gw[i] += c[i] * c[i];
                }
            }
            for (i, (&x, &t)) in vtail.iter().zip(rtail).enumerate() {
                let d = x - (t - MAGIC) * sc;
                ge[i] += d * d;
                gw[i] += x * x;
            }
        }
        e += ge.iter().map(|&v| f64::from(v)).sum::<f64>();
        w2 += gw.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    Some((e, w2))
}

#[inline(always)]
#[allow(clippy::inline_always)] // must inline into the AVX2 copy of `quantize_task`
fn pack_row(s: &QScheme, codes: &[i8], out: &mut [u8]) {
    match s.bits {
        8 => pack_words::<8>(codes, out),
        4 => pack_words::<4>(codes, out),
        2 => pack_words::<2>(codes, out),
        b => {
            out.fill(0);
            pack_dense(b, codes, out);
        }
    }
}

/// Packs `32 / B` codes per little-endian u32, lowest first. A constant `B` turns the shifts
/// into immediates, which the compiler unrolls and vectorises.
#[inline(always)]
#[allow(clippy::inline_always)] // must inline into the AVX2 copy of `quantize_task`
fn pack_words<const B: usize>(codes: &[i8], out: &mut [u8]) {
    let pf = 32 / B;
    let off = 1i32 << (B - 1);
    let pack = |chunk: &[i8]| {
        let mut word = 0u32;
        for (i, &q) in chunk.iter().enumerate() {
            word |= ((i32::from(q) + off) as u32) << (i * B);
        }
        word
    };
    let mut full = codes.chunks_exact(pf);
    let mut words = out.chunks_exact_mut(4);
    for (chunk, o) in (&mut full).zip(&mut words) {
        o.copy_from_slice(&pack(chunk).to_le_bytes());
    }
    if let Some(o) = words.next() {
        o.copy_from_slice(&pack(full.remainder()).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(dtype: DType, v: &[f32]) -> Vec<u8> {
        dtype.encode_f32(v).unwrap()
    }

    fn arb_scheme() -> impl Strategy<Value = QScheme> {
        (
            prop::sample::select(QScheme::BITS.to_vec()),
            prop::sample::select(vec![0usize, 1, 3, 8, 16, 32, 128]),
            any::<bool>(),
        )
            .prop_map(|(bits, group_size, symmetric)| QScheme::int(bits, group_size, symmetric))
    }

    fn arb_shape() -> impl Strategy<Value = Vec<usize>> {
        (1usize..24, 1usize..150).prop_map(|(r, c)| vec![r, c])
    }

    fn arb_dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(vec![DType::F32, DType::F16, DType::BF16])
    }

    const INT8_MAX_REL_RMSE: f64 = 0.05;

    /// Largest error of one value, in steps (`scale`) of its group. Symmetric absmax RTN never
    /// clamps, so every value is within half a step. Asymmetric grids are shifted by the rounded
    /// zero point (up to half a step), so the ends of the range may clamp: at most one step.
    fn max_error_steps(s: &QScheme) -> f32 {
        if s.symmetric { 0.5 } else { 1.0 }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn test_fast_matches_reference(s in arb_scheme(), shape in arb_shape(), dtype in arb_dtype(), seed in any::<u64>()) {
            let n = shape[0] * shape[1];
            let v = pseudo_normal(seed, n);
            let b = bytes(dtype, &v);
            let fast = quantize(&s, dtype, &shape, &b).unwrap();
            let slow = quantize_ref(&s, dtype, &shape, &b).unwrap();
            prop_assert_eq!(&fast.packed, &slow.packed);
            prop_assert_eq!(&fast.scale, &slow.scale);
            prop_assert_eq!(&fast.zero_point, &slow.zero_point);
            prop_assert!((fast.rel_rmse() - slow.rel_rmse()).abs() <= 1e-4 * slow.rel_rmse().max(1e-3));
        }

        #[test]
        fn test_dequantize_row_matches_dequantize(s in arb_scheme(), shape in arb_shape(), seed in any::<u64>()) {
            let v = pseudo_normal(seed, shape[0] * shape[1]);
            let q = quantize(&s, DType::F32, &shape, &bytes(DType::F32, &v)).unwrap();
            let deq = q.dequantize();
            let mut row = vec![0f32; shape[1]];
            for (r, want) in deq.chunks(shape[1]).enumerate() {
                q.dequantize_row(r, &mut row);
                prop_assert_eq!(&row[..], want, "{} row {}", s.label(), r);
            }
        }

        #[test]
        fn test_error_within_scheme_bound(s in arb_scheme(), shape in arb_shape(), seed in any::<u64>()) {
            let v = pseudo_normal(seed, shape[0] * shape[1]);
            let q = quantize(&s, DType::F32, &shape, &bytes(DType::F32, &v)).unwrap();
            let deq = q.dequantize();
            let gl = s.group_len(shape[1]);
            let (mut err, mut bound) = (0f64, 0f64);
            for (i, (a, b)) in v.iter().zip(&deq).enumerate() {
                let g = (i / shape[1]) * s.groups(shape[1]) + (i % shape[1]) / gl;
                let limit = q.scale[g] * max_error_steps(&s);
                prop_assert!((a - b).abs() <= limit * (1.0 + 1e-5) + 1e-7, "{}: value {a} -> {b}, step {}", s.label(), q.scale[g]);
                err += f64::from(a - b).powi(2);
                bound += f64::from(limit).powi(2);
            }
            let sig: f64 = v.iter().map(|a| f64::from(*a).powi(2)).sum();
            let rel = (err / sig).sqrt();
            prop_assert!(rel <= (bound / sig).sqrt() * (1.0 + 1e-5) + 1e-9);
            prop_assert!((rel - q.rel_rmse()).abs() < 1e-3);
            // 8 bits: a step is at most 1/127 of the group's absmax; with these rows' crest factor
            // (outliers at 4x, absmax/rms up to ~13) that is under 5 % relative RMSE.
            if s.bits == 8 {
                prop_assert!(rel < INT8_MAX_REL_RMSE, "{} rel rmse {rel}", s.label());
            }
        }

        #[test]
        fn test_requantizing_dequantized_is_stable(s in arb_scheme(), shape in arb_shape(), seed in any::<u64>()) {
            // Symmetric absmax RTN: the dequantized tensor has the same absmax per group, so the
            // same scales, and so the same codes.
            let s = QScheme { symmetric: true, ..s };
            let v = pseudo_normal(seed, shape[0] * shape[1]);
            let q1 = quantize(&s, DType::F32, &shape, &bytes(DType::F32, &v)).unwrap();
            let q2 = quantize(&s, DType::F32, &shape, &bytes(DType::F32, &q1.dequantize())).unwrap();
            prop_assert_eq!(q1.packed, q2.packed);
        }

        #[test]
        fn test_packed_lengths(s in arb_scheme(), shape in arb_shape()) {
            let v = pseudo_normal(1, shape[0] * shape[1]);
            let q = quantize(&s, DType::F32, &shape, &bytes(DType::F32, &v)).unwrap();
            prop_assert_eq!(q.packed.len(), shape[0] * (shape[1] * s.bits as usize).div_ceil(32) * 4);
            prop_assert_eq!(q.scale.len(), shape[0] * s.groups(shape[1]));
            if let Some((zshape, _, zbytes)) = q.packed_zero_point() {
                prop_assert_eq!(zshape[0], (shape[0] * s.bits as usize).div_ceil(32));
                prop_assert_eq!(zbytes.len(), zshape[0] * zshape[1] * 4);
            }
        }

        #[test]
        fn test_constant_and_zero_rows_are_finite(s in arb_scheme(), c in prop::sample::select(vec![0.0f32, 1.0, -3.5, 1e-30, 6e4]), shape in arb_shape()) {
            let v = vec![c; shape[0] * shape[1]];
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let q = quantize(&s, dtype, &shape, &bytes(dtype, &v)).unwrap();
                prop_assert!(q.scale.iter().all(|x| x.is_finite()));
                prop_assert!(q.dequantize().iter().all(|x| x.is_finite()));
                prop_assert!(q.rel_rmse().is_finite());
            }
        }
    }

    /// Deterministic roughly normal values (sum of uniforms) with a few outliers.
    pub(crate) fn pseudo_normal(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..n)
            .map(|i| {
                let v = (0..4).map(|_| next()).sum::<f32>() - 2.0;
                if i % 97 == 5 { v * 4.0 } else { v }
            })
            .collect()
    }

    #[test]
    fn test_pack_layout_matches_compressed_tensors() {
        // Codes -8..7 of one row, int4 symmetric has range [-7, 7]; use asymmetric to reach -8.
        let s = QScheme::int(4, 0, false);
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let q = quantize_ref(&s, DType::F32, &[1, 8], &bytes(DType::F32, &v)).unwrap();
        // lo = 0, hi = 7, scale = 7/15, zp = -8: codes are -8 + round(x / scale).
        let word = u32::from_le_bytes(q.packed[..4].try_into().unwrap());
        for (i, x) in v.iter().enumerate() {
            let code = ((word >> (4 * i)) & 0xf) as i32 - 8;
            assert_eq!(code, q.code(0, i));
            assert_eq!(code, (x / q.scale[0]).round_ties_even() as i32 - 8);
        }
        assert_eq!(q.zero_point.as_ref().unwrap()[0], -8);
    }

    #[test]
    fn test_nan_is_reported_with_row() {
        let mut v = vec![1.0f32; 12];
        v[7] = f32::NAN;
        let s = QScheme::int(8, 0, true);
        assert_eq!(
            quantize(&s, DType::F32, &[3, 4], &bytes(DType::F32, &v)).unwrap_err(),
            QuantError::NonFinite { row: 1 }
        );
        v[7] = f32::INFINITY;
        assert_eq!(
            quantize_ref(&s, DType::F32, &[3, 4], &bytes(DType::F32, &v)).unwrap_err(),
            QuantError::NonFinite { row: 1 }
        );
    }
}
