//! `mcompress dequantize`: a bundle back to a dense safetensors file, for runtimes that do not
//! read the packed layout and for checking a bundle against the original weights.

use std::collections::BTreeMap;
use std::path::Path;

use mcompress_core::{DType, ModelSource, SafetensorsLayout, SafetensorsWriter, TensorEntry};
use mcompress_passes::quant::{load_quantized, schemes_from_config};

use crate::{Error, Result};

/// Writes every tensor of the model or bundle at `src` to `out`, with quantized matrices
/// dequantized to `dtype` (a float type) under their original names and shapes. Other tensors
/// are copied unchanged; pruned matrices stored sparse-bitmask are expanded to dense (in their
/// dtype). Returns the number of matrices dequantized or expanded.
pub fn dequantize(src: &Path, out: &Path, dtype: DType) -> Result<usize> {
    let model = ModelSource::open(src)?;
    let bad = |reason: String| Error::BadBundle { path: src.to_path_buf(), reason };
    let schemes = match model.config() {
        Some(c) => schemes_from_config(c).map_err(|e| bad(format!("config.json: {e}")))?,
        None => BTreeMap::new(),
    };
    let names: std::collections::BTreeSet<String> =
        model.tensors().iter().map(|r| model.info(r).name.clone()).collect();
    let mut quantized = BTreeMap::new();
    for (module, scheme) in &schemes {
        let name = if scheme.is_fp8() || names.contains(&format!("{module}.weight_packed")) {
            format!("{module}.weight")
        } else {
            module.clone()
        };
        let q = load_quantized(&model, &name, *scheme).map_err(|e| bad(format!("{name}: {e}")))?;
        quantized.insert(name, q);
    }
    // Pruned matrices stored sparse-bitmask (`X.compressed`, `X.bitmask`, `X.shape`, `X.row_offsets`).
    let mut sparse = BTreeMap::new();
    for r in model.tensors() {
        if let Some(m) = model.info(r).name.strip_suffix(".bitmask") {
            let name = format!("{m}.weight");
            if let Some(t) =
                mcompress_passes::sparse::SparseTensor::load(&model, &name).map_err(|e| bad(format!("{name}: {e}")))?
            {
                sparse.insert(name, t);
            }
        }
    }
    let sparse_parts: std::collections::BTreeSet<String> =
        sparse.keys().flat_map(|n| mcompress_passes::sparse::names(n)).collect();
    let part_of_quantized = |n: &str| {
        sparse_parts.contains(n)
            || quantized.contains_key(n)
            || ["_packed", "_scale", "_zero_point", "_shape", "_global_scale"]
                .iter()
                .any(|s| n.strip_suffix(s).is_some_and(|b| quantized.contains_key(b)))
    };
    let mut entries = Vec::new();
    for r in model.tensors() {
        let i = model.info(r);
        if !part_of_quantized(&i.name) {
            entries.push(TensorEntry { name: i.name.clone(), dtype: i.dtype, shape: i.shape.clone() });
        }
    }
    for (name, q) in &quantized {
        entries.push(TensorEntry { name: name.clone(), dtype, shape: q.shape.clone() });
    }
    for (name, t) in &sparse {
        entries.push(TensorEntry { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() });
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = out.with_extension("safetensors.tmp");
    let mut w = SafetensorsWriter::create(&tmp, SafetensorsLayout::new(entries, &meta)?)?;
    for r in model.tensors() {
        let v = model.view(r);
        if !part_of_quantized(v.name) {
            w.write_tensor(v.name, &v.data)?;
        }
    }
    for (name, q) in &quantized {
        let bytes =
            dtype.encode_f32(&q.dequantize()).ok_or_else(|| bad(format!("--dtype {dtype} is not a float type")))?;
        w.write_tensor(name, &bytes)?;
    }
    for (name, t) in &sparse {
        let bytes = t.dtype.encode_f32(&t.to_dense()).ok_or_else(|| bad(format!("{name}: not a float tensor")))?;
        w.write_tensor(name, &bytes)?;
    }
    w.finish()?;
    fs_err::rename(&tmp, out).map_err(crate::io(out))?;
    Ok(quantized.len() + sparse.len())
}
