//! Quantized parameters: schemes, the round-to-nearest codec for integers, FP8 and FP4, and the
//! reader of quantized tensors from a bundle.

pub mod fp4;
pub mod fp8;
pub mod load;
pub mod rtn;
pub mod scheme;

pub use load::{load_quantized, schemes_from_config};
pub use rtn::{QuantError, Quantized, quantize, quantize_ref};
pub use scheme::{Fp4Format, Fp8Strategy, QKind, QScheme};
