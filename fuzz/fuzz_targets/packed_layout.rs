//! Any safetensors file read as a quantized bundle: loading the packed layout under every scheme
//! validates shapes and dtypes and never panics; what loads also dequantizes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcompress_passes::quant::{Fp4Format, Fp8Strategy, QScheme, load_quantized};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let dir = std::env::temp_dir().join(format!("mcompress-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("model.safetensors");
    if std::fs::write(&path, rest).is_err() {
        return;
    }
    let Ok(model) = mcompress_core::ModelSource::open(&path) else { return };
    // Selector: the top value range picks an FP8 layout, the next an FP4 one, the rest an
    // integer scheme.
    let scheme = if sel >= 0xf0 {
        let strategy = [Fp8Strategy::Tensor, Fp8Strategy::Channel, Fp8Strategy::Block][usize::from(sel % 3)];
        QScheme::fp8(strategy, sel & 8 != 0)
    } else if sel >= 0xe0 {
        QScheme::fp4(if sel & 1 == 0 { Fp4Format::Nv } else { Fp4Format::Mx })
    } else {
        QScheme::int(QScheme::BITS[usize::from(sel & 3)], usize::from(sel >> 3), sel & 4 == 0)
    };
    if let Ok(q) = load_quantized(&model, "w", scheme) {
        let _ = q.dequantize();
    }
});
