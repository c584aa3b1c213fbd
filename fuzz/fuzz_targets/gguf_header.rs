//! Any bytes as a GGUF file: parsing returns an error or tensors whose byte ranges lie inside
//! the file and dequantize without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcompress_core::gguf::{GgufFile, dequantize};

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = GgufFile::parse("fuzz.gguf".as_ref(), data) {
        let mut out = Vec::new();
        for t in &g.tensors {
            assert!(t.range.0 <= t.range.1 && t.range.1 <= data.len());
            dequantize(t.ggml_type, &data[t.range.0..t.range.1], &mut out);
            assert_eq!(out.len(), t.numel());
        }
    }
});
