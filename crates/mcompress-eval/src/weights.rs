//! Weights by name, from a model source or a bundle: dense tensors as f32, quantized matrices
//! kept in their packed layout for the fused kernels.

use std::collections::BTreeMap;
use std::sync::Arc;

use mcompress_core::ModelSource;
use mcompress_format::quant::{Quantized, load_quantized, schemes_from_config};

use crate::linear::Matrix;
use crate::{Error, Result};

/// Named tensors: dense f32 with shapes, and packed quantized matrices.
#[derive(Clone, Debug, Default)]
pub struct Weights {
    dense: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    packed: BTreeMap<String, Arc<Quantized>>,
}

impl Weights {
    /// Dense f32 tensors by name, with their shapes.
    pub fn from_dense(dense: BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Self {
        Weights { dense, packed: BTreeMap::new() }
    }
}

/// A model's float tensors one at a time, as f32: what a decoder streamed block by block reads
/// ([`crate::decoder::Decoder::streamed`]), so that only the block in flight is held in f32.
pub trait TensorSource: Sync {
    /// Every float tensor's name and shape (what the completeness check reads).
    fn shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// The named tensors as f32 (each one's input pages released once read). A name the source
    /// does not have is left out (the caller's shape check names it).
    ///
    /// # Errors
    /// A tensor that cannot be produced (an earlier pass failed on it), named.
    fn load(&self, names: &[String]) -> Result<Weights>;
}

/// The float tensors of a model file as they are.
pub struct ModelTensors<'a> {
    model: &'a ModelSource,
    refs: BTreeMap<String, mcompress_core::TensorRef>,
}

impl<'a> ModelTensors<'a> {
    /// Every float tensor of `model` (integer tensors are left out, as [`from_model`] does).
    pub fn new(model: &'a ModelSource) -> Self {
        let refs = model
            .tensors()
            .iter()
            .filter(|r| model.info(r).dtype.is_float())
            .map(|r| (model.info(r).name.clone(), *r))
            .collect();
        ModelTensors { model, refs }
    }
}

impl TensorSource for ModelTensors<'_> {
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.refs.iter().map(|(n, r)| (n.clone(), self.model.info(r).shape.clone())).collect()
    }

    fn load(&self, names: &[String]) -> Result<Weights> {
        let mut dense = BTreeMap::new();
        for name in names {
            let Some(r) = self.refs.get(name) else { continue };
            let v = self.model.view(r);
            if let Some(data) = v.to_f32() {
                dense.insert(name.clone(), (v.shape.to_vec(), data));
            }
            drop(v);
            self.model.release(r);
        }
        Ok(Weights { dense, packed: BTreeMap::new() })
    }
}

/// Every float tensor of a model, as f32.
pub fn from_model(model: &ModelSource) -> Weights {
    let dense = model
        .tensors()
        .iter()
        .filter_map(|r| {
            let v = model.view(r);
            v.to_f32().map(|data| (v.name.to_string(), (v.shape.to_vec(), data)))
        })
        .collect();
    Weights { dense, packed: BTreeMap::new() }
}

/// Every weight of a bundle: dense tensors as f32, quantized matrices (`<module>.weight`) read
/// through the documented packed layout and kept packed.
pub fn from_bundle(bundle: &ModelSource) -> Result<Weights> {
    let schemes = match bundle.config() {
        Some(c) => schemes_from_config(c)
            .map_err(|e| Error::Model(format!("{}: config.json: {e}", bundle.path().display())))?,
        None => BTreeMap::new(),
    };
    let mut out = from_model(bundle);
    // Pruned matrices in sparse-bitmask form (`X.compressed`, `X.bitmask`, ...), expanded.
    let sparse: Vec<String> = bundle
        .tensors()
        .iter()
        .filter_map(|r| bundle.info(r).name.strip_suffix(".bitmask").map(|m| format!("{m}.weight")))
        .collect();
    for name in sparse {
        let t = mcompress_format::sparse::SparseTensor::load(bundle, &name)
            .map_err(|e| Error::Model(format!("{}: {name}: {e}", bundle.path().display())))?;
        if let Some(t) = t {
            for part in mcompress_format::sparse::names(&name) {
                out.dense.remove(&part);
            }
            out.dense.insert(name, (t.shape.clone(), t.to_dense()));
        }
    }
    for (module, scheme) in schemes {
        let name = format!("{module}.weight");
        let q = load_quantized(bundle, &name, scheme)
            .map_err(|e| Error::Model(format!("{}: {name}: {e}", bundle.path().display())))?;
        // The stored parts (`<name>` in FP8, `<name>_packed`, `_scale`, `_zero_point`,
        // `_global_scale`, `_shape`) are this one weight now.
        let parts = format!("{name}_");
        out.dense.retain(|n, _| *n != name && !n.starts_with(&parts));
        out.packed.insert(name, Arc::new(q));
    }
    Ok(out)
}

impl Weights {
    /// The dense tensors, by name (what a training pass takes over).
    pub fn into_dense(self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        self.dense
    }

    /// Whether a tensor of this name exists (dense or packed).
    pub fn contains(&self, name: &str) -> bool {
        self.dense.contains_key(name) || self.packed.contains_key(name)
    }

    /// Names of the packed (quantized) matrices.
    pub fn packed_names(&self) -> impl Iterator<Item = &str> {
        self.packed.keys().map(String::as_str)
    }

    /// Every tensor's name and shape (dense and packed), for the completeness check.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.dense
            .iter()
            .map(|(n, (s, _))| (n.as_str(), s.as_slice()))
            .chain(self.packed.iter().map(|(n, q)| (n.as_str(), q.shape.as_slice())))
    }

    /// `(out, inp)` of a two-dimensional tensor.
    pub fn shape2(&self, name: &str) -> Option<(usize, usize)> {
        let shape = self.packed.get(name).map(|q| &q.shape).or_else(|| self.dense.get(name).map(|d| &d.0))?;
        match shape.as_slice() {
            &[out, inp] => Some((out, inp)),
            _ => None,
        }
    }

    /// A tensor as f32 with its shape checked (a packed matrix is dequantized).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        if let Some(q) = self.packed.get(name) {
            check_shape(name, &q.shape, shape)?;
            return Ok(q.dequantize());
        }
        let (s, d) = self.dense.get(name).ok_or_else(|| format!("tensor {name} missing"))?;
        check_shape(name, s, shape)?;
        Ok(d.clone())
    }

    /// A `[out, inp]` matrix, packed if it is stored packed.
    pub fn matrix(&self, name: &str, out: usize, inp: usize) -> Result<Matrix, String> {
        if let Some(q) = self.packed.get(name) {
            check_shape(name, &q.shape, &[out, inp])?;
            return Ok(Matrix::Packed(Arc::clone(q)));
        }
        self.get(name, &[out, inp]).map(Matrix::Dense)
    }
}

fn check_shape(name: &str, have: &[usize], want: &[usize]) -> Result<(), String> {
    if have == want { Ok(()) } else { Err(format!("tensor {name} has shape {have:?}, expected {want:?}")) }
}
