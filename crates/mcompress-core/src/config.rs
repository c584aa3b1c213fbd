//! Values read from a model's config.json (untrusted): dimensions within bounds, scales finite.
//! The eval runtimes and distillation read geometry through these, so a zero or absurd value is a
//! named error everywhere instead of a panic somewhere.

use serde_json::Value;

/// Largest dimension, layer count, head count, context or vocabulary accepted from a config.
pub const MAX_DIM: u64 = 1 << 24;

/// `config[key]` as a dimension: a positive integer of at most [`MAX_DIM`]. The error names the
/// key (`config.json: hidden_size = 0: …`).
pub fn dim(config: &Value, key: &str) -> Result<usize, String> {
    match config[key].as_u64() {
        None => Err(format!("config.json: {key} missing or not a non-negative integer")),
        Some(v) if v == 0 || v > MAX_DIM => Err(format!("config.json: {key} = {v}: must be between 1 and {MAX_DIM}")),
        Some(v) => Ok(v as usize),
    }
}

/// An MLP's `input_scale`: 1 when absent, else a number finite in f32.
pub fn input_scale(config: &Value) -> Result<f32, String> {
    match &config["input_scale"] {
        Value::Null => Ok(1.0),
        v => v
            .as_f64()
            .filter(|x| x.is_finite() && (x.abs() as f32).is_finite())
            .map(|x| x as f32)
            .ok_or_else(|| format!("config.json: input_scale {v} is not a finite number")),
    }
}
