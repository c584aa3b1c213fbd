//! Any bytes as a bundle's config.json: its `quantization_config` is read into schemes (what
//! `dequantize`, the eval and `verify --conformance` do first) with errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = mcompress_passes::quant::schemes_from_config(&v);
    }
});
