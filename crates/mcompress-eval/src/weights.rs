//! f32 weights by name, from a model source or a bundle.

use std::collections::BTreeMap;

use mcompress_core::ModelSource;
use mcompress_passes::quant::{load_quantized, schemes_from_config};

use crate::{Error, Result};

/// Named f32 tensors with shapes.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Every float tensor of a model, as f32.
pub fn from_model(model: &ModelSource) -> Weights {
    model
        .tensors()
        .iter()
        .filter_map(|r| {
            let v = model.view(r);
            v.to_f32().map(|data| (v.name.to_string(), (v.shape.to_vec(), data)))
        })
        .collect()
}

/// Every weight of a bundle as f32: dense tensors converted, quantized matrices dequantized
/// exactly as a reader of docs/quantized-layout.md would.
pub fn from_bundle(bundle: &ModelSource) -> Result<Weights> {
    let schemes = match bundle.config() {
        Some(c) => schemes_from_config(c)
            .map_err(|e| Error::Model(format!("{}: config.json: {e}", bundle.path().display())))?,
        None => BTreeMap::new(),
    };
    let mut out = from_model(bundle);
    for (module, scheme) in schemes {
        let name = format!("{module}.weight");
        let q = load_quantized(bundle, &name, scheme)
            .map_err(|e| Error::Model(format!("{}: {name}: {e}", bundle.path().display())))?;
        out.insert(name, (q.shape.clone(), q.dequantize()));
    }
    Ok(out)
}
