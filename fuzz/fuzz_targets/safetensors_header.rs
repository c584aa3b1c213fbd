//! Any bytes as a safetensors file: validation must return an error or a file whose every tensor
//! view is in bounds and converts without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcompress_core::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors".as_ref(), data.to_vec()) {
        for t in f.tensors() {
            let v = f.view(t);
            assert_eq!(v.data.len(), t.nbytes());
            let _ = v.to_f32();
        }
    }
});
