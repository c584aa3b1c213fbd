//! compressed-tensors' `quantization_config`: written into a bundle's config.json for what the
//! passes quantized (and read back by [`crate::quant::schemes_from_config`]).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::ParamMeta;

/// The compressed-tensors release whose format the bundles follow and are tested against
/// (written as `quantization_config.version`, as compressed-tensors writes its own version).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.20.1";

/// The compressed-tensors `quantization_config` for config.json, or `None` if nothing is
/// quantized. One config group per scheme, listing its modules by exact name; matrices named
/// `*.weight` that stayed dense are listed under `ignore`. Laid out as compressed-tensors'
/// `ModelCompressor.update_config` writes it: weight-only integer schemes of every width are
/// `pack-quantized` (int32 words); a model whose groups use different formats says
/// `mixed-precision` at the top and the format in each group.
pub fn quantization_config(params: &BTreeMap<String, ParamMeta>) -> Option<Value> {
    let mut groups: BTreeMap<crate::QScheme, Vec<String>> = BTreeMap::new();
    let mut ignore = Vec::new();
    for (name, meta) in params {
        let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
        match meta {
            ParamMeta::Quantized { scheme, .. } => groups.entry(*scheme).or_default().push(module),
            ParamMeta::Dense { shape, .. } | ParamMeta::Sparse { shape, .. }
                if shape.len() >= 2 && name.ends_with(".weight") =>
            {
                ignore.push(module);
            }
            ParamMeta::Dense { .. } | ParamMeta::Sparse { .. } => {}
        }
    }
    if groups.is_empty() {
        return None;
    }
    let format_of = |s: &crate::QScheme| match s.kind {
        crate::QKind::Int => "pack-quantized",
        crate::QKind::Fp8 { dynamic_act: true, .. } => "float-quantized",
        crate::QKind::Fp8 { dynamic_act: false, .. } => "naive-quantized",
        crate::QKind::Fp4 { format: crate::Fp4Format::Nv } => "nvfp4-pack-quantized",
        crate::QKind::Fp4 { format: crate::Fp4Format::Mx } => "mxfp4-pack-quantized",
    };
    let formats: std::collections::BTreeSet<_> = groups.keys().map(format_of).collect();
    let config_groups: serde_json::Map<String, Value> = groups
        .iter()
        .enumerate()
        .map(|(i, (s, modules))| (format!("group_{i}"), config_group(s, modules, format_of(s))))
        .collect();
    Some(json!({
        "version": COMPRESSED_TENSORS_VERSION,
        "quant_method": "compressed-tensors",
        "format": if formats.len() == 1 { formats.first().copied().unwrap_or_default() } else { "mixed-precision" },
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": Value::Null,
        "global_compression_ratio": Value::Null,
        "sparsity_config": {},
        "transform_config": {},
    }))
}

/// One compressed-tensors config group: its targets, format and QuantizationArgs.
fn config_group(s: &crate::QScheme, modules: &[String], format: &str) -> Value {
    let (weights, input) = match s.kind {
        crate::QKind::Int => (
            json!({
                "num_bits": s.bits,
                "type": "int",
                "symmetric": s.symmetric,
                "strategy": if s.group_size == 0 { "channel" } else { "group" },
                "group_size": if s.group_size == 0 { Value::Null } else { json!(s.group_size) },
                "dynamic": false,
                "observer": "minmax",
                "actorder": Value::Null,
            }),
            Value::Null,
        ),
        crate::QKind::Fp8 { strategy, dynamic_act } => {
            let (name, block) = match strategy {
                crate::Fp8Strategy::Tensor => ("tensor", Value::Null),
                crate::Fp8Strategy::Channel => ("channel", Value::Null),
                crate::Fp8Strategy::Block => {
                    ("block", json!([crate::quant::fp8::FP8_BLOCK, crate::quant::fp8::FP8_BLOCK]))
                }
            };
            let input = if dynamic_act {
                json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "token",
                       "group_size": Value::Null, "dynamic": true, "observer": Value::Null})
            } else {
                Value::Null
            };
            (
                json!({
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": true,
                    "strategy": name,
                    "group_size": Value::Null,
                    "block_structure": block,
                    "dynamic": false,
                    "observer": "minmax",
                }),
                input,
            )
        }
        // The NVFP4A16 / MXFP4A16 presets as compressed-tensors serializes them.
        crate::QKind::Fp4 { format } => {
            let (strategy, scale_dtype) = match format {
                crate::Fp4Format::Nv => ("tensor_group", "torch.float8_e4m3fn"),
                crate::Fp4Format::Mx => ("group", "torch.uint8"),
            };
            (
                json!({
                    "num_bits": 4,
                    "type": "float",
                    "symmetric": true,
                    "strategy": strategy,
                    "group_size": s.group_size,
                    "dynamic": false,
                    "observer": "minmax",
                    "scale_dtype": scale_dtype,
                    "zp_dtype": scale_dtype,
                }),
                Value::Null,
            )
        }
    };
    json!({
        "targets": modules,
        "format": format,
        "weights": weights,
        "input_activations": input,
        "output_activations": Value::Null,
    })
}
