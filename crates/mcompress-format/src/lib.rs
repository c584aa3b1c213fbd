//! Stored formats of mcompress bundles, below everything that reads or writes them.
//!
//! What a parameter is on disk — a packed integer matrix with group scales and zero points,
//! an FP8 or FP4 matrix with its scales, a sparse-bitmask matrix — its codecs (quantize,
//! dequantize), its reader from a bundle ([`quant::load_quantized`], [`sparse::SparseTensor::load`])
//! and the compressed-tensors `quantization_config` that describes it ([`compressed_tensors`]).
//! The passes produce these types and the eval consumes them; neither depends on the other
//! for it.
#![deny(missing_docs)]

pub mod compressed_tensors;
pub mod quant;
pub mod results;
pub mod sparse;

use std::borrow::Cow;
use std::collections::BTreeMap;

use mcompress_core::{DType, TensorEntry};

pub use quant::{Fp4Format, Fp8Strategy, QKind, QScheme, Quantized};
pub use results::{ResultKind, Results};

/// Tensors by name: shape and f32 values.
pub type DenseTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// What a parameter is, without its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamMeta {
    /// A plain tensor.
    Dense {
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Vec<usize>,
    },
    /// An integer-quantized matrix in the packed layout.
    Quantized {
        /// Scheme.
        scheme: QScheme,
        /// Original shape.
        shape: Vec<usize>,
        /// Scale dtype.
        scale_dtype: DType,
    },
    /// A pruned matrix stored in sparse-bitmask form ([`sparse`]).
    Sparse {
        /// Value dtype.
        dtype: DType,
        /// `[rows, cols]`.
        shape: Vec<usize>,
        /// Kept values.
        nnz: usize,
    },
}

impl ParamMeta {
    /// Tensors this parameter is stored as, named after `name`.
    pub fn entries(&self, name: &str) -> Vec<TensorEntry> {
        match self {
            ParamMeta::Dense { dtype, shape } => {
                vec![TensorEntry { name: name.into(), dtype: *dtype, shape: shape.clone() }]
            }
            ParamMeta::Quantized { scheme, shape, scale_dtype } if scheme.is_fp8() => {
                // compressed-tensors' naive/float-quantized: the FP8 weight under its own name.
                let rows = shape[0];
                let cols: usize = shape[1..].iter().product();
                vec![
                    TensorEntry { name: name.into(), dtype: DType::F8_E4M3, shape: shape.clone() },
                    TensorEntry {
                        name: format!("{name}_scale"),
                        dtype: *scale_dtype,
                        shape: scheme.stored_scale_shape(rows, cols),
                    },
                ]
            }
            ParamMeta::Quantized { scheme, shape, scale_dtype } if scheme.is_fp4() => {
                // compressed-tensors' nvfp4/mxfp4-pack-quantized: two codes per byte, group
                // scales (FP8 or E8M0), NVFP4's global scale; no shape tensor.
                let rows = shape[0];
                let cols: usize = shape[1..].iter().product();
                let mut v = vec![
                    TensorEntry { name: format!("{name}_packed"), dtype: DType::U8, shape: vec![rows, cols / 2] },
                    TensorEntry {
                        name: format!("{name}_scale"),
                        dtype: *scale_dtype,
                        shape: vec![rows, scheme.groups(cols)],
                    },
                ];
                if matches!(scheme.kind, QKind::Fp4 { format: Fp4Format::Nv }) {
                    v.push(TensorEntry { name: format!("{name}_global_scale"), dtype: DType::F32, shape: vec![1] });
                }
                v
            }
            ParamMeta::Quantized { scheme, shape, scale_dtype } => {
                let rows = shape[0];
                let cols: usize = shape[1..].iter().product();
                let groups = scheme.groups(cols);
                let mut v = vec![
                    TensorEntry {
                        name: format!("{name}_packed"),
                        dtype: scheme.packed_dtype(),
                        shape: vec![rows, scheme.packed_cols(cols)],
                    },
                    TensorEntry { name: format!("{name}_scale"), dtype: *scale_dtype, shape: vec![rows, groups] },
                    TensorEntry { name: format!("{name}_shape"), dtype: DType::I64, shape: vec![shape.len()] },
                ];
                if !scheme.symmetric {
                    let zrows = scheme.packed_cols(rows);
                    v.push(TensorEntry {
                        name: format!("{name}_zero_point"),
                        dtype: scheme.packed_dtype(),
                        shape: vec![zrows, groups],
                    });
                }
                v
            }
            ParamMeta::Sparse { dtype, shape, nnz } => {
                let [c, b, s, o] = sparse::names(name);
                vec![
                    TensorEntry { name: c, dtype: *dtype, shape: vec![*nnz] },
                    TensorEntry { name: b, dtype: DType::U8, shape: vec![shape[0], shape[1].div_ceil(8)] },
                    TensorEntry { name: s, dtype: DType::I64, shape: vec![2, 1] },
                    TensorEntry { name: o, dtype: DType::I64, shape: vec![shape[0]] },
                ]
            }
        }
    }

    /// Shape of the parameter as the model sees it.
    pub fn shape(&self) -> &[usize] {
        match self {
            ParamMeta::Dense { shape, .. } | ParamMeta::Quantized { shape, .. } | ParamMeta::Sparse { shape, .. } => {
                shape
            }
        }
    }

    /// Element dtype of a dense or sparse parameter (`None` when quantized).
    pub fn float_dtype(&self) -> Option<DType> {
        match self {
            ParamMeta::Dense { dtype, .. } | ParamMeta::Sparse { dtype, .. } => Some(*dtype),
            ParamMeta::Quantized { .. } => None,
        }
    }
}

/// A parameter with its data. Dense data borrows from the input mapping until a pass rewrites it.
#[derive(Clone, Debug)]
pub enum Param<'a> {
    /// A plain tensor.
    Dense {
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Vec<usize>,
        /// Little-endian bytes.
        data: Cow<'a, [u8]>,
    },
    /// A quantized matrix.
    Quantized(Quantized),
    /// A pruned matrix in sparse-bitmask form.
    Sparse(sparse::SparseTensor),
}

impl<'a> Param<'a> {
    /// Dtype, shape and f32 values of a dense or sparse parameter (sparse ones expanded);
    /// `None` for a quantized one or a non-float dtype.
    pub fn dense_f32(&self) -> Option<(DType, Vec<usize>, Vec<f32>)> {
        match self {
            Param::Dense { dtype, shape, data } => {
                let mut out = vec![0f32; shape.iter().product()];
                dtype.decode_f32(data, &mut out).then(|| (*dtype, shape.clone(), out))
            }
            Param::Sparse(t) => Some((t.dtype, t.shape.clone(), t.to_dense())),
            Param::Quantized(_) => None,
        }
    }

    /// Metadata of this parameter.
    pub fn meta(&self) -> ParamMeta {
        match self {
            Param::Dense { dtype, shape, .. } => ParamMeta::Dense { dtype: *dtype, shape: shape.clone() },
            Param::Quantized(q) => {
                ParamMeta::Quantized { scheme: q.scheme, shape: q.shape.clone(), scale_dtype: q.scale_dtype }
            }
            Param::Sparse(t) => ParamMeta::Sparse { dtype: t.dtype, shape: t.shape.clone(), nnz: t.nnz() },
        }
    }

    /// The stored tensors with their bytes, in the order of [`ParamMeta::entries`].
    pub fn into_entries(self, name: &str) -> Vec<(TensorEntry, Cow<'a, [u8]>)> {
        let entries = self.meta().entries(name);
        match self {
            Param::Dense { data, .. } => entries.into_iter().zip([data]).collect(),
            Param::Quantized(q) if q.scheme.is_fp8() => {
                let scale = q.scale_dtype.encode_f32(&q.stored_scale()).expect("scale dtype is a float");
                entries.into_iter().zip([Cow::Owned(q.fp8_bytes()), Cow::Owned(scale)]).collect()
            }
            Param::Quantized(q) if q.scheme.is_fp4() => {
                let mut data = vec![Cow::Owned(q.fp4_bytes()), Cow::Owned(q.fp4_stored_scale())];
                data.extend(q.global_scale.map(|g| Cow::Owned(g.to_le_bytes().to_vec())));
                entries.into_iter().zip(data).collect()
            }
            Param::Quantized(q) => {
                let scale = q.scale_dtype.encode_f32(&q.scale).expect("scale dtype is a float");
                let shape: Vec<u8> = q.shape.iter().flat_map(|&d| (d as i64).to_le_bytes()).collect();
                let zero = q.packed_zero_point().map(|(_, _, z)| Cow::Owned(z));
                let mut data = vec![Cow::Owned(q.packed), Cow::Owned(scale), Cow::Owned(shape)];
                data.extend(zero);
                entries.into_iter().zip(data).collect()
            }
            Param::Sparse(t) => entries.into_iter().zip(t.into_parts().map(Cow::Owned)).collect(),
        }
    }
}

/// One tensor produced by a calibration.
#[derive(Clone, Debug)]
pub enum Calibrated {
    /// A quantized matrix.
    Quantized(Quantized),
    /// Rewritten dense values (same shape and dtype; e.g. a norm with AWQ's scales folded in).
    Dense(Vec<f32>),
    /// Pruned values and the mask of kept weights (Wanda, SparseGPT).
    Pruned {
        /// Values (zero where pruned).
        values: Vec<f32>,
        /// Kept positions.
        keep: Vec<bool>,
    },
}
