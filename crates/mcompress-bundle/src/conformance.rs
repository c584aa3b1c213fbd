//! Conformance: a bundle checked the way its runtime will read it, before it is called done.
//!
//! For safetensors bundles these are the rules compressed-tensors (and so transformers and
//! vLLM) apply when they load a checkpoint (`../shared/DEPLOY-FORMATS.md`, compressed-tensors
//! 0.20.1 `PackedQuantizationCompressor`): the `quantization_config` keys, each config group's
//! format and arguments, and for every quantized module exactly the tensors, dtypes and shapes
//! the decompressor reads — nothing missing, nothing left over, no group that leaves a short last
//! group. Sentence-transformers bundles must carry the module directories `modules.json` names.
//! A GGUF is loaded by our reader (header, metadata, every tensor's type and extent).
//!
//! `mcompress run` applies it to every bundle it writes (a failure is the `conformance` gate,
//! exit 1); `mcompress verify --conformance BUNDLE` runs it alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use mcompress_core::{DType, ModelSource};
use serde_json::Value;

/// Quantization formats this checker knows the layout of.
const PACK_QUANTIZED: &str = "pack-quantized";
/// FP8: W8A8 (`float-quantized`) and weight-only (`naive-quantized`).
const FP8_FORMATS: [&str; 2] = ["float-quantized", "naive-quantized"];
/// FP4 E2M1: NVFP4 and MXFP4 weight-only.
const FP4_FORMATS: [&str; 2] = ["nvfp4-pack-quantized", "mxfp4-pack-quantized"];

/// Checks the bundle (or model directory) at `dir`: one line per problem, empty when it conforms.
pub fn check(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let has_st = dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file();
    if has_st {
        match ModelSource::open(dir) {
            Ok(model) => check_safetensors(&model, &mut problems),
            Err(e) => problems.push(format!("safetensors: does not load: {e}")),
        }
    }
    let gguf = dir.join("model.gguf");
    if gguf.is_file()
        && let Err(e) = ModelSource::open(&gguf)
    {
        problems.push(format!("model.gguf: does not load: {e}"));
    }
    if !has_st && !gguf.is_file() {
        problems.push("no model.safetensors, model.safetensors.index.json or model.gguf".into());
    }
    check_modules(dir, &mut problems);
    problems
}

/// Every sentence-transformers module with files (Pooling, Dense) has its directory.
fn check_modules(dir: &Path, problems: &mut Vec<String>) {
    let Ok(text) = crate::read_json_file(&dir.join("modules.json")) else { return };
    let Ok(Value::Array(modules)) = serde_json::from_slice::<Value>(&text) else {
        problems.push("modules.json: not a JSON list".into());
        return;
    };
    for m in &modules {
        let (path, kind) = (m["path"].as_str().unwrap_or_default(), m["type"].as_str().unwrap_or_default());
        if path.is_empty() || kind.ends_with(".Normalize") {
            continue;
        }
        if !dir.join(path).join("config.json").is_file() {
            problems.push(format!("modules.json names {kind} at {path}/ but {path}/config.json is missing"));
        }
    }
}

fn check_safetensors(model: &ModelSource, problems: &mut Vec<String>) {
    let tensors: BTreeMap<&str, (DType, &[usize])> = model
        .tensors()
        .iter()
        .map(|r| {
            let i = model.info(r);
            (i.name.as_str(), (i.dtype, i.shape.as_slice()))
        })
        .collect();
    let config = model.config().cloned().unwrap_or(Value::Null);
    if config.is_null() {
        problems.push("config.json: missing".into());
    }
    if let Some(d) = config.get("torch_dtype")
        && !matches!(d.as_str(), Some("float32" | "float16" | "bfloat16"))
    {
        problems.push(format!("config.json: torch_dtype {d} is not float32, float16 or bfloat16"));
    }
    // Tensors that only a quantized or sparse layout explains.
    let layout_parts: Vec<&str> = tensors
        .keys()
        .copied()
        .filter(|n| {
            [".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_global_scale"]
                .iter()
                .any(|s| n.ends_with(s))
        })
        .collect();
    for n in tensors.keys() {
        if n.ends_with(".bitmask") || n.ends_with(".row_offsets") || n.ends_with(".compressed") {
            problems.push(format!(
                "tensor {n}: sparse-bitmask storage, which no runtime loads any more (transformers loads random weights)"
            ));
        }
    }
    let Some(qc) = config.get("quantization_config") else {
        if let Some(n) = layout_parts.first() {
            problems.push(format!("tensor {n} is a quantized layout but config.json has no quantization_config"));
        }
        return;
    };
    let mut p = |m: String| problems.push(format!("quantization_config: {m}"));
    if qc["quant_method"] != "compressed-tensors" {
        p(format!("quant_method is {}, expected \"compressed-tensors\"", qc["quant_method"]));
    }
    if qc["quantization_status"] != "compressed" {
        p(format!(
            "quantization_status is {}, expected \"compressed\" (transformers treats anything else as not compressed)",
            qc["quantization_status"]
        ));
    }
    if !qc["version"].is_string() {
        p("version is missing".into());
    }
    if !qc["sparsity_config"].is_null() && qc["sparsity_config"].as_object().is_none_or(|o| !o.is_empty()) {
        p("sparsity_config must be empty: sparse checkpoints are no longer loaded".into());
    }
    let Some(groups) = qc["config_groups"].as_object() else {
        p("config_groups is missing or not an object".into());
        return;
    };
    let top = qc["format"].as_str().unwrap_or_default().to_string();
    let module_names: BTreeSet<&str> =
        tensors.keys().filter_map(|n| n.strip_suffix(".weight").or_else(|| n.strip_suffix(".weight_packed"))).collect();
    let ignore: BTreeSet<&str> =
        qc["ignore"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut formats = BTreeSet::new();
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let mut group_problems = Vec::new();
    for (gname, g) in groups {
        let gp = |m: String| format!("config_groups.{gname}: {m}");
        let format = g["format"].as_str().map_or_else(|| top.clone(), str::to_string);
        formats.insert(format.clone());
        let w = &g["weights"];
        if FP8_FORMATS.contains(&format.as_str()) {
            let strategy = w["strategy"].as_str().unwrap_or_default().to_string();
            if w["type"] != "float" || w["num_bits"] != 8 {
                group_problems.push(gp(format!("{format} weights must be 8-bit float (FP8 E4M3)")));
                continue;
            }
            let dynamic = !g["input_activations"].is_null();
            if (format == "float-quantized") != dynamic {
                group_problems.push(gp(format!(
                    "format {format} with input_activations {}: W8A8 is float-quantized, weight-only FP8 naive-quantized",
                    g["input_activations"]
                )));
            }
            for m in group_modules(g, &module_names, &ignore, &mut group_problems, &gp) {
                if let Some(other) = claimed.insert(m.to_string(), gname.clone()) {
                    group_problems.push(gp(format!("module {m} is also a target of {other}")));
                }
                group_problems.extend(check_fp8_module(&tensors, m, &strategy, w).into_iter().map(&gp));
            }
            continue;
        }
        if FP4_FORMATS.contains(&format.as_str()) {
            let nv = format == FP4_FORMATS[0];
            let (strategy, group) = if nv { ("tensor_group", 16) } else { ("group", 32) };
            if w["type"] != "float" || w["num_bits"] != 4 || w["strategy"] != strategy || w["group_size"] != group {
                group_problems.push(gp(format!(
                    "{format} weights must be 4-bit float, strategy {strategy}, group_size {group}; found {} {} bits, {} {}",
                    w["type"], w["num_bits"], w["strategy"], w["group_size"]
                )));
                continue;
            }
            if !g["input_activations"].is_null() {
                group_problems.push(gp(format!("{format} with input_activations: only weight-only FP4 is written")));
            }
            for m in group_modules(g, &module_names, &ignore, &mut group_problems, &gp) {
                if let Some(other) = claimed.insert(m.to_string(), gname.clone()) {
                    group_problems.push(gp(format!("module {m} is also a target of {other}")));
                }
                group_problems.extend(check_fp4_module(&tensors, m, nv).into_iter().map(&gp));
            }
            continue;
        }
        if format != PACK_QUANTIZED {
            group_problems.push(gp(format!(
                "format {format:?} is not one this tool writes or checks ({PACK_QUANTIZED}, {}, {})",
                FP8_FORMATS.join(", "),
                FP4_FORMATS.join(", ")
            )));
            continue;
        }
        let bits = w["num_bits"].as_u64().filter(|b| (1..=8).contains(b));
        let Some(bits) = bits else {
            group_problems.push(gp(format!("weights.num_bits {} is not 1..8", w["num_bits"])));
            continue;
        };
        if w["type"] != "int" {
            group_problems
                .push(gp(format!("weights.type {} is not \"int\" (pack-quantized holds integers)", w["type"])));
        }
        let strategy = w["strategy"].as_str().unwrap_or_default();
        let group_size = match (strategy, w["group_size"].as_u64()) {
            ("channel", _) => 0,
            ("group", Some(g)) if g > 0 => g as usize,
            _ => {
                group_problems.push(gp(format!(
                    "weights.strategy {} with group_size {} is not channel or group with a positive size",
                    w["strategy"], w["group_size"]
                )));
                continue;
            }
        };
        let symmetric = w["symmetric"].as_bool().unwrap_or(true);
        for m in group_modules(g, &module_names, &ignore, &mut group_problems, &gp) {
            if let Some(other) = claimed.insert(m.to_string(), gname.clone()) {
                group_problems.push(gp(format!("module {m} is also a target of {other}")));
            }
            group_problems
                .extend(check_packed_module(&tensors, m, bits as u32, group_size, symmetric).into_iter().map(&gp));
        }
    }
    let expected_top =
        if formats.len() > 1 { "mixed-precision".to_string() } else { formats.first().cloned().unwrap_or_default() };
    if top != expected_top {
        p(format!("format is {top:?}, expected {expected_top:?} for groups of formats {formats:?}"));
    }
    for m in group_problems {
        p(m);
    }
    // Every packed tensor belongs to a quantized module of some group.
    for n in layout_parts {
        let module = n.rsplit_once(".weight_").map_or(n, |(m, _)| m);
        if !claimed.contains_key(module) {
            p(format!("tensor {n} belongs to no config group (a runtime would not read it)"));
        }
    }
    // A quantized tied embedding cannot be looked up as the output head.
    if mcompress_core::arch::ties_word_embeddings(&config) {
        // The decoder families name their embedding in the architecture table; other models by
        // the usual spelling.
        let family = mcompress_core::arch::Family::of_config(&config);
        let is_embedding = |m: &str| match family {
            Some(f) => f.hf(mcompress_core::arch::Role::Embed, 0).strip_suffix(".weight") == Some(m),
            None => mcompress_core::arch::is_embedding_name(m),
        };
        for m in claimed.keys() {
            if is_embedding(m) {
                p(format!("module {m} is quantized but tied to the output head (tie_word_embeddings)"));
            }
        }
    }
}

/// The modules a config group's `targets` name (exact module names or `re:` regexes), less
/// `ignore`.
fn group_modules<'a>(
    g: &Value,
    module_names: &BTreeSet<&'a str>,
    ignore: &BTreeSet<&str>,
    problems: &mut Vec<String>,
    gp: &dyn Fn(String) -> String,
) -> Vec<&'a str> {
    let Some(targets) = g["targets"].as_array() else {
        problems.push(gp("targets is not a list".into()));
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in targets {
        let Some(t) = t.as_str() else { continue };
        if let Some(re) = t.strip_prefix("re:") {
            match regex::Regex::new(&format!("^(?:{re})$")) {
                Ok(re) => out.extend(module_names.iter().copied().filter(|m| re.is_match(m))),
                Err(e) => problems.push(gp(format!("target {t:?} is not a valid regex: {e}"))),
            }
        } else if let Some(m) = module_names.get(t) {
            out.push(*m);
        } else {
            problems.push(gp(format!("target {t:?} names no module of the checkpoint")));
        }
    }
    out.retain(|m| !ignore.contains(m));
    out
}

/// The tensors compressed-tensors' naive/float-quantized decompressor reads for an FP8 `module`.
fn check_fp8_module(
    tensors: &BTreeMap<&str, (DType, &[usize])>,
    module: &str,
    strategy: &str,
    w: &Value,
) -> Vec<String> {
    let mut out = Vec::new();
    let get = |s: &str| tensors.get(format!("{module}.{s}").as_str()).copied();
    let Some((dt, shape)) = get("weight") else {
        out.push(format!("module {module}: weight is missing"));
        return out;
    };
    if dt != DType::F8_E4M3 || shape.len() != 2 {
        out.push(format!("module {module}: weight is {dt} {shape:?}, expected F8_E4M3 [out, in]"));
        return out;
    }
    let (rows, cols) = (shape[0], shape[1]);
    let want = match strategy {
        "tensor" => vec![1],
        "channel" => vec![rows, 1],
        "block" => {
            let b = w["block_structure"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>());
            match b.as_deref() {
                Some(&[br, bc]) if br > 0 && bc > 0 => vec![rows.div_ceil(br as usize), cols.div_ceil(bc as usize)],
                _ => {
                    out.push(format!("module {module}: block strategy without a [rows, cols] block_structure"));
                    return out;
                }
            }
        }
        s => {
            out.push(format!("module {module}: FP8 weights strategy {s:?} is not tensor, channel or block"));
            return out;
        }
    };
    match get("weight_scale") {
        None => out.push(format!("module {module}: weight_scale is missing")),
        Some((sdt, s)) if !sdt.is_float() || s != want.as_slice() => {
            out.push(format!("module {module}: weight_scale is {sdt} {s:?}, expected a float {want:?}"));
        }
        Some(_) => {}
    }
    for extra in ["weight_packed", "weight_shape", "weight_zero_point"] {
        if get(extra).is_some() {
            out.push(format!("module {module}: FP8 weights carry no {extra}"));
        }
    }
    out
}

/// The tensors compressed-tensors' NVFP4 / MXFP4 decompressor reads for `module`.
fn check_fp4_module(tensors: &BTreeMap<&str, (DType, &[usize])>, module: &str, nv: bool) -> Vec<String> {
    let mut out = Vec::new();
    let get = |s: &str| tensors.get(format!("{module}.{s}").as_str()).copied();
    if get("weight").is_some() {
        out.push(format!("module {module}: holds a dense weight as well as the quantized one"));
    }
    let Some((pdt, pshape)) = get("weight_packed") else {
        out.push(format!("module {module}: weight_packed is missing"));
        return out;
    };
    if pdt != DType::U8 || pshape.len() != 2 {
        out.push(format!("module {module}: weight_packed is {pdt} {pshape:?}, expected U8 [out, in / 2]"));
        return out;
    }
    let (rows, cols) = (pshape[0], pshape[1] * 2);
    let group = if nv { 16 } else { 32 };
    if !cols.is_multiple_of(group) {
        out.push(format!("module {module}: {cols} input columns are not a multiple of the group size {group}"));
    }
    let (want_dt, want) = (if nv { DType::F8_E4M3 } else { DType::U8 }, [rows, cols / group]);
    match get("weight_scale") {
        None => out.push(format!("module {module}: weight_scale is missing")),
        Some((sdt, s)) if sdt != want_dt || s != want => {
            out.push(format!("module {module}: weight_scale is {sdt} {s:?}, expected {want_dt} {want:?}"));
        }
        Some(_) => {}
    }
    match (nv, get("weight_global_scale")) {
        (true, None) => out.push(format!("module {module}: weight_global_scale is missing")),
        (true, Some((gdt, g))) if gdt != DType::F32 || g != [1] => {
            out.push(format!("module {module}: weight_global_scale is {gdt} {g:?}, expected F32 [1]"));
        }
        (false, Some(_)) => out.push(format!("module {module}: MXFP4 weights carry no weight_global_scale")),
        _ => {}
    }
    for extra in ["weight_shape", "weight_zero_point"] {
        if get(extra).is_some() {
            out.push(format!("module {module}: FP4 weights carry no {extra}"));
        }
    }
    out
}

/// The tensors compressed-tensors' pack-quantized decompressor reads for `module`.
fn check_packed_module(
    tensors: &BTreeMap<&str, (DType, &[usize])>,
    module: &str,
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let get = |s: &str| tensors.get(format!("{module}.{s}").as_str()).copied();
    if get("weight").is_some() {
        out.push(format!("module {module}: holds a dense weight as well as the quantized one"));
    }
    let Some((sdt, shape_t)) = get("weight_shape") else {
        out.push(format!("module {module}: weight_shape is missing"));
        return out;
    };
    if !matches!(sdt, DType::I64 | DType::I32) || shape_t != [2] {
        out.push(format!("module {module}: weight_shape is {sdt} {shape_t:?}, expected an integer [2]"));
        return out;
    }
    let Some((pdt, pshape)) = get("weight_packed") else {
        out.push(format!("module {module}: weight_packed is missing"));
        return out;
    };
    if pdt != DType::I32 || pshape.len() != 2 {
        out.push(format!("module {module}: weight_packed is {pdt} {pshape:?}, expected I32 [out, words]"));
        return out;
    }
    let rows = pshape[0];
    // The logical input width is the scale's groups × group size (grouped) or bounded by the
    // packed words (channel); the exact value is checked by the loader against weight_shape.
    let Some((scdt, scale)) = get("weight_scale") else {
        out.push(format!("module {module}: weight_scale is missing"));
        return out;
    };
    if !scdt.is_float() {
        out.push(format!("module {module}: weight_scale is {scdt}, expected a float dtype"));
    }
    let groups = if group_size == 0 { 1 } else { scale.get(1).copied().unwrap_or(0) };
    if scale.len() != 2 || scale[0] != rows || (group_size == 0 && scale[1] != 1) || groups == 0 {
        out.push(format!(
            "module {module}: weight_scale is {scale:?}, expected [{rows}, {}]",
            if group_size == 0 { "1".to_string() } else { "in / group_size".to_string() }
        ));
        return out;
    }
    let words = pshape[1];
    let cols_hi = words * 32 / bits as usize;
    let cols_lo = ((words.saturating_sub(1)) * 32 / bits as usize) + 1;
    if group_size > 0 {
        let cols = groups * group_size;
        if (cols * bits as usize).div_ceil(32) != words {
            out.push(format!(
                "module {module}: {groups} groups of {group_size} columns need {} packed words per row, found {words} \
                 (a group size that does not divide the columns is rejected by every runtime)",
                (cols * bits as usize).div_ceil(32)
            ));
        }
    } else if cols_lo > cols_hi {
        out.push(format!("module {module}: weight_packed has no columns"));
    }
    if !symmetric {
        match get("weight_zero_point") {
            None => out.push(format!("module {module}: asymmetric but weight_zero_point is missing")),
            Some((zdt, z)) => {
                let zrows = (rows * bits as usize).div_ceil(32);
                if zdt != DType::I32 || z != [zrows, groups] {
                    out.push(format!(
                        "module {module}: weight_zero_point is {zdt} {z:?}, expected I32 [{zrows}, {groups}] (packed along dim 0)"
                    ));
                }
            }
        }
    } else if get("weight_zero_point").is_some() {
        out.push(format!("module {module}: symmetric but holds a weight_zero_point"));
    }
    out
}
