//! `mcompress inspect`: tensors, dtypes, shapes, parameters and bytes of a model or bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mcompress_core::{DType, ModelSource};
use serde::Serialize;

use crate::Result;

/// One logical tensor: a plain tensor, or a quantized matrix with its packed parts folded in.
#[derive(Clone, Debug, Serialize)]
pub struct InspectedTensor {
    /// Name (the original weight name for quantized matrices).
    pub name: String,
    /// Stored dtype (`I32`/`I8` codes for quantized ones).
    pub dtype: String,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Bytes stored, all parts included.
    pub bytes: u64,
    /// Quantization label (`int4-g128-sym`) for quantized matrices.
    pub quantized: Option<String>,
}

/// Result of [`inspect`].
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// Path inspected.
    pub path: PathBuf,
    /// `bundle`, `model-dir`, `safetensors` or `gguf`.
    pub kind: &'static str,
    /// Logical tensors, sorted by name.
    pub tensors: Vec<InspectedTensor>,
    /// Logical parameters.
    pub params: u64,
    /// Weight bytes.
    pub bytes: u64,
    /// Bytes per stored dtype.
    pub bytes_by_dtype: BTreeMap<String, u64>,
}

/// (name, dtype, shape, bytes, values of an `I64 *_shape` tensor).
type Stored = (String, String, Vec<usize>, u64, Option<Vec<i64>>);

/// Inspects a `.safetensors` file, a model directory or a bundle.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let model = ModelSource::open(path)?;
    let kind = if path.extension().is_some_and(|e| e == "gguf") {
        "gguf"
    } else if path.join("manifest.json").is_file() {
        "bundle"
    } else if path.is_dir() {
        "model-dir"
    } else {
        "safetensors"
    };
    // module -> scheme label, from config.json's quantization_config.
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(groups) =
        model.config().and_then(|c| c.pointer("/quantization_config/config_groups")).and_then(|g| g.as_object())
    {
        for g in groups.values() {
            let w = &g["weights"];
            let label = format!(
                "int{}-{}-{}",
                w["num_bits"],
                w["group_size"].as_u64().map_or_else(|| "channel".to_string(), |n| format!("g{n}")),
                if w["symmetric"].as_bool().unwrap_or(true) { "sym" } else { "asym" }
            );
            for t in g["targets"].as_array().into_iter().flatten().filter_map(|t| t.as_str()) {
                labels.insert(t.to_string(), label.clone());
            }
        }
    }
    let mut by_name: BTreeMap<String, InspectedTensor> = BTreeMap::new();
    let mut bytes_by_dtype = BTreeMap::new();
    let mut stored: Vec<Stored> = Vec::new();
    for r in model.tensors() {
        let info = model.info(r);
        let (dtype, bytes) = model.stored(r);
        *bytes_by_dtype.entry(dtype.clone()).or_insert(0) += bytes;
        // Only the small `*_shape` tensors are read; everything else comes from headers.
        let is_shape = info.name.ends_with("_shape") || info.name.rsplit('.').next() == Some("shape");
        let shape_vals = (info.dtype == DType::I64 && is_shape).then(|| {
            model.view(r).data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
        });
        stored.push((info.name.clone(), dtype, info.shape.clone(), bytes, shape_vals));
    }
    let names: std::collections::BTreeSet<&str> = stored.iter().map(|s| s.0.as_str()).collect();
    for (name, dtype, shape, bytes, _) in &stored {
        // Sparse-bitmask parts fold into `<module>.weight`; packed parts into their base name.
        let sparse = [".compressed", ".bitmask", ".shape", ".row_offsets"].iter().find_map(|suf| {
            name.strip_suffix(suf)
                .filter(|m| {
                    names.contains(format!("{m}.bitmask").as_str())
                        && names.contains(format!("{m}.compressed").as_str())
                })
                .map(|m| (format!("{m}.weight"), *suf))
        });
        let (base, part) = sparse.unwrap_or_else(|| {
            ["_packed", "_scale", "_zero_point", "_shape"]
                .iter()
                .find_map(|suf| {
                    name.strip_suffix(suf)
                        .filter(|b| names.contains(format!("{b}_packed").as_str()))
                        .map(|b| (b.to_string(), *suf))
                })
                .unwrap_or_else(|| (name.clone(), ""))
        });
        let entry = by_name.entry(base.clone()).or_insert_with(|| InspectedTensor {
            name: base.clone(),
            dtype: dtype.clone(),
            shape: shape.clone(),
            bytes: 0,
            quantized: None,
        });
        entry.bytes += bytes;
        match part {
            "_packed" => {
                entry.dtype.clone_from(dtype);
                let module = base.strip_suffix(".weight").unwrap_or(&base);
                entry.quantized = Some(labels.get(module).cloned().unwrap_or_else(|| "quantized".into()));
            }
            ".compressed" => {
                entry.dtype.clone_from(dtype);
                entry.quantized = Some("sparse-bitmask".into());
            }
            "_shape" | ".shape" => {
                if let Some(vals) = stored.iter().find(|s| &s.0 == name).and_then(|s| s.4.clone()) {
                    entry.shape = vals.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
                }
            }
            _ => {}
        }
    }
    let tensors: Vec<InspectedTensor> = by_name.into_values().collect();
    let params = tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    Ok(Inspection { path: path.into(), kind, tensors, params, bytes: model.weight_bytes(), bytes_by_dtype })
}
