//! Reading the packed layout back: the inverse of [`super::Quantized`]'s stored form, with every
//! shape and dtype checked (bundles are untrusted input).

use std::collections::BTreeMap;

use mcompress_core::{DType, ModelSource, TensorView};

use super::{QScheme, Quantized};

/// Quantization schemes by module name, read from a config.json `quantization_config`.
pub fn schemes_from_config(config: &serde_json::Value) -> Result<BTreeMap<String, QScheme>, String> {
    let mut out = BTreeMap::new();
    let Some(groups) = config.pointer("/quantization_config/config_groups") else {
        return Ok(out);
    };
    let groups = groups.as_object().ok_or("quantization_config.config_groups must be an object")?;
    for (gname, g) in groups {
        let w = &g["weights"];
        if w["type"] == "float" {
            let scheme = if w["num_bits"] == 4 { fp4_scheme(gname, g)? } else { fp8_scheme(gname, g)? };
            for t in g["targets"].as_array().ok_or_else(|| format!("config_groups.{gname}.targets must be a list"))? {
                let t = t.as_str().ok_or_else(|| format!("config_groups.{gname}.targets must hold strings"))?;
                out.insert(t.to_string(), scheme);
            }
            continue;
        }
        let bits = w["num_bits"].as_u64().and_then(|b| u8::try_from(b).ok()).filter(|b| QScheme::BITS.contains(b));
        let bits = bits.ok_or_else(|| format!("config_groups.{gname}.weights.num_bits must be 2, 3, 4 or 8"))?;
        let group_size = match &w["group_size"] {
            serde_json::Value::Null => 0,
            v => v
                .as_u64()
                .ok_or_else(|| format!("config_groups.{gname}.weights.group_size must be a number or null"))?
                as usize,
        };
        let symmetric = w["symmetric"]
            .as_bool()
            .ok_or_else(|| format!("config_groups.{gname}.weights.symmetric must be a boolean"))?;
        let targets = g["targets"].as_array().ok_or_else(|| format!("config_groups.{gname}.targets must be a list"))?;
        for t in targets {
            let t = t.as_str().ok_or_else(|| format!("config_groups.{gname}.targets must hold strings"))?;
            out.insert(t.to_string(), QScheme::int(bits, group_size, symmetric));
        }
    }
    Ok(out)
}

/// An FP8 config group's scheme: 8-bit float weights per tensor, channel or 128 × 128 block,
/// with or without dynamic per-token FP8 activations.
fn fp8_scheme(gname: &str, g: &serde_json::Value) -> Result<QScheme, String> {
    let w = &g["weights"];
    if w["num_bits"] != 8 {
        return Err(format!(
            "config_groups.{gname}.weights: float weights of {} bits are not read (FP8 only)",
            w["num_bits"]
        ));
    }
    let strategy = match w["strategy"].as_str() {
        Some("tensor") => super::Fp8Strategy::Tensor,
        Some("channel") => super::Fp8Strategy::Channel,
        Some("block") if w["block_structure"] == serde_json::json!([128, 128]) => super::Fp8Strategy::Block,
        _ => {
            return Err(format!(
                "config_groups.{gname}.weights: FP8 strategy {} (block_structure {}) is not read; tensor, channel or 128×128 blocks are",
                w["strategy"], w["block_structure"]
            ));
        }
    };
    let a = &g["input_activations"];
    let dynamic_act = if a.is_null() {
        false
    } else if a["type"] == "float" && a["num_bits"] == 8 && a["dynamic"] == true && a["strategy"] == "token" {
        true
    } else {
        return Err(format!(
            "config_groups.{gname}.input_activations: only dynamic per-token FP8 activations are read"
        ));
    };
    Ok(QScheme::fp8(strategy, dynamic_act))
}

/// An FP4 config group's scheme: NVFP4 (`tensor_group`, groups of 16) or MXFP4 (`group`,
/// groups of 32), weight-only.
fn fp4_scheme(gname: &str, g: &serde_json::Value) -> Result<QScheme, String> {
    let w = &g["weights"];
    let format = match (w["strategy"].as_str(), w["group_size"].as_u64()) {
        (Some("tensor_group"), Some(16)) => super::Fp4Format::Nv,
        (Some("group"), Some(32)) => super::Fp4Format::Mx,
        _ => {
            return Err(format!(
                "config_groups.{gname}.weights: FP4 with strategy {} and group_size {} is not read; \
                 NVFP4 (tensor_group, 16) and MXFP4 (group, 32) are",
                w["strategy"], w["group_size"]
            ));
        }
    };
    if !g["input_activations"].is_null() {
        return Err(format!(
            "config_groups.{gname}.input_activations: FP4 activations are not read (weight-only FP4 is)"
        ));
    }
    Ok(QScheme::fp4(format))
}

/// Loads an NVFP4 or MXFP4 weight (`<name>_packed` U8, `<name>_scale`, NVFP4's
/// `<name>_global_scale`).
fn load_fp4(model: &ModelSource, name: &str, scheme: QScheme) -> Result<Quantized, String> {
    let p = tensor(model, &format!("{name}_packed"))?;
    if p.dtype != DType::U8 || p.shape.len() != 2 || p.shape.contains(&0) {
        return Err(format!("tensor {name}_packed is {} {:?}, expected U8 [rows, cols / 2]", p.dtype, p.shape));
    }
    let (rows, cols) = (p.shape[0], p.shape[1] * 2);
    if !scheme.divides(cols) {
        return Err(format!(
            "tensor {name}_packed: {cols} columns are not a multiple of the group size {}",
            scheme.group_size
        ));
    }
    let groups = scheme.groups(cols);
    let nv = matches!(scheme.kind, super::QKind::Fp4 { format: super::Fp4Format::Nv });
    let s = tensor(model, &format!("{name}_scale"))?;
    expect(&s, scheme.scale_dtype_for(DType::F32), &[rows, groups])?;
    let global = if nv {
        let g = tensor(model, &format!("{name}_global_scale"))?;
        expect(&g, DType::F32, &[1])?;
        let v = f32::from_le_bytes(g.data[..4].try_into().expect("4 bytes"));
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("tensor {name}_global_scale is {v}, expected a positive finite number"));
        }
        Some(v)
    } else {
        None
    };
    if nv && let Some(i) = s.data.iter().position(|&b| b & 0x7f == 0x7f) {
        return Err(format!("tensor {name}_scale: element {i} is an FP8 NaN"));
    }
    if !nv && let Some(i) = s.data.iter().position(|&b| b == 0xff) {
        return Err(format!("tensor {name}_scale: element {i} is the E8M0 NaN (255)"));
    }
    let scale = super::fp4::fp4_scales(&s.data, global);
    let rb = scheme.packed_row_bytes(cols);
    let mut packed = vec![0u8; rows * rb];
    for (dst, src) in packed.chunks_mut(rb).zip(p.data.chunks(cols / 2)) {
        dst[..cols / 2].copy_from_slice(src);
    }
    Ok(Quantized { global_scale: global, ..Quantized::from_parts(scheme, &[rows, cols], packed, scale, s.dtype) })
}

/// Loads an FP8 weight (`<name>` float8_e4m3fn, `<name>_scale`).
fn load_fp8(model: &ModelSource, name: &str, scheme: QScheme) -> Result<Quantized, String> {
    let w = tensor(model, name)?;
    if w.dtype != DType::F8_E4M3 || w.shape.len() < 2 || w.shape.contains(&0) {
        return Err(format!("tensor {name} is {} {:?}, expected F8_E4M3 of rank ≥ 2", w.dtype, w.shape));
    }
    let shape = w.shape.to_vec();
    let rows = shape[0];
    let cols = shape[1..]
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("{name}: shape overflows"))?;
    let s = tensor(model, &format!("{name}_scale"))?;
    let want = scheme.stored_scale_shape(rows, cols);
    if !s.dtype.is_float() || s.shape != want.as_slice() {
        return Err(format!("tensor {name}_scale is {} {:?}, expected a float {want:?}", s.dtype, s.shape));
    }
    let mut stored = vec![0f32; want.iter().product()];
    s.dtype.decode_f32(&s.data, &mut stored);
    let groups = scheme.groups(cols);
    let mut scale = vec![0f32; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            scale[r * groups + g] = match scheme.kind {
                super::QKind::Fp8 { strategy: super::Fp8Strategy::Tensor, .. } => stored[0],
                super::QKind::Fp8 { strategy: super::Fp8Strategy::Block, .. } => {
                    stored[(r / super::fp8::FP8_BLOCK) * groups + g]
                }
                _ => stored[r],
            };
        }
    }
    if let Some(i) = w.data.iter().position(|&b| b & 0x7f == 0x7f) {
        return Err(format!("tensor {name}: element {i} is an FP8 NaN"));
    }
    let rb = scheme.packed_row_bytes(cols);
    let mut packed = vec![0u8; rows * rb];
    for (dst, src) in packed.chunks_mut(rb).zip(w.data.chunks(cols)) {
        dst[..cols].copy_from_slice(src);
    }
    Ok(Quantized::from_parts(scheme, &shape, packed, scale, s.dtype))
}

fn tensor<'a>(model: &'a ModelSource, name: &str) -> Result<TensorView<'a>, String> {
    let r = model
        .tensors()
        .iter()
        .find(|r| model.info(r).name == name)
        .ok_or_else(|| format!("tensor {name:?} is missing"))?;
    Ok(model.view(r))
}

fn expect(v: &TensorView<'_>, dtype: DType, shape: &[usize]) -> Result<(), String> {
    if v.dtype != dtype || v.shape != shape {
        return Err(format!("tensor {:?} is {} {:?}, expected {dtype} {shape:?}", v.name, v.dtype, v.shape));
    }
    Ok(())
}

/// Loads the quantized parameter stored under `name` (`<name>_packed`, ...).
pub fn load_quantized(model: &ModelSource, name: &str, scheme: QScheme) -> Result<Quantized, String> {
    if scheme.is_fp8() {
        return load_fp8(model, name, scheme);
    }
    if scheme.is_fp4() {
        return load_fp4(model, name, scheme);
    }
    let shape_t = tensor(model, &format!("{name}_shape"))?;
    if shape_t.dtype != DType::I64 || shape_t.shape.len() != 1 || shape_t.shape[0] < 2 {
        return Err(format!("tensor {name}_shape must be I64 [rank ≥ 2]"));
    }
    let shape: Vec<usize> = shape_t
        .data
        .chunks_exact(8)
        .map(|c| usize::try_from(i64::from_le_bytes(c.try_into().expect("8 bytes"))).ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("tensor {name}_shape holds a non-positive dimension"))?;
    let rows = shape[0];
    let cols = shape[1..]
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("{name}_shape overflows"))?;
    rows.checked_mul(cols).ok_or_else(|| format!("{name}_shape overflows"))?;
    let groups = scheme.groups(cols);
    let packed = tensor(model, &format!("{name}_packed"))?;
    expect(&packed, scheme.packed_dtype(), &[rows, scheme.packed_cols(cols)])?;
    let scale_t = tensor(model, &format!("{name}_scale"))?;
    if !scale_t.dtype.is_float() || scale_t.shape != [rows, groups] {
        return Err(format!(
            "tensor {name}_scale is {} {:?}, expected a float [{rows}, {groups}]",
            scale_t.dtype, scale_t.shape
        ));
    }
    let mut scale = vec![0f32; rows * groups];
    scale_t.dtype.decode_f32(&scale_t.data, &mut scale);
    let zero_point = if scheme.symmetric {
        None
    } else {
        let z = tensor(model, &format!("{name}_zero_point"))?;
        let prow = scheme.packed_cols(rows);
        expect(&z, DType::I32, &[prow, groups])?;
        // Packed down each group's column: gather the column's words into one bit stream.
        let mut zp = vec![0i8; rows * groups];
        let mut column = vec![0u8; prow * 4];
        for g in 0..groups {
            for (i, w) in column.chunks_exact_mut(4).enumerate() {
                w.copy_from_slice(&z.data[(i * groups + g) * 4..][..4]);
            }
            for r in 0..rows {
                zp[r * groups + g] = (super::rtn::unpack_code(&column, r, scheme.bits) - scheme.offset()) as i8;
            }
        }
        Some(zp)
    };
    Ok(Quantized { zero_point, ..Quantized::from_parts(scheme, &shape, packed.data.to_vec(), scale, scale_t.dtype) })
}
