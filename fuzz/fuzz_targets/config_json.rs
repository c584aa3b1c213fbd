//! Any bytes as a model's or bundle's config.json: its `quantization_config` is read into schemes
//! (what `dequantize`, the eval and `verify --conformance` do first) and a decoder's geometry is
//! parsed by the architecture module (what `run`, `recipe check`, the eval and GGUF export do),
//! its expected tensor list built and checked, with errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = mcompress_passes::quant::schemes_from_config(&v);
        if let Ok(g) = mcompress_core::arch::Geometry::from_config(&v) {
            // Bounded work only: a geometry of 2^24 layers (or 4096 experts in each) would list
            // hundreds of millions of names.
            let _ = (g.active_share(), g.expert_share());
            if g.layers * g.experts.max(1) <= 256 {
                let exp = g.expected();
                let _ = g.check_tensors(exp.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())));
            }
        }
    }
});
