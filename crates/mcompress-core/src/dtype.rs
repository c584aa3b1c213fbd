use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Every element type the safetensors format defines, spelled as in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[allow(non_camel_case_types, missing_docs)]
pub enum DType {
    BOOL,
    F4,
    F6_E2M3,
    F6_E3M2,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    F8_E4M3FNUZ,
    F8_E5M2FNUZ,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl DType {
    /// All dtypes, in the order the safetensors crate declares them.
    pub const ALL: [DType; 22] = [
        DType::BOOL,
        DType::F4,
        DType::F6_E2M3,
        DType::F6_E3M2,
        DType::U8,
        DType::I8,
        DType::F8_E5M2,
        DType::F8_E4M3,
        DType::F8_E8M0,
        DType::F8_E4M3FNUZ,
        DType::F8_E5M2FNUZ,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::C64,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// Bits per element.
    pub fn bits(self) -> usize {
        match self {
            DType::F4 => 4,
            DType::F6_E2M3 | DType::F6_E3M2 => 6,
            DType::BOOL
            | DType::U8
            | DType::I8
            | DType::F8_E5M2
            | DType::F8_E4M3
            | DType::F8_E8M0
            | DType::F8_E4M3FNUZ
            | DType::F8_E5M2FNUZ => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
        }
    }

    /// Alignment used to order tensors in a written file: wider types first keep every tensor
    /// naturally aligned (the same rule the reference safetensors serializer uses).
    pub fn alignment(self) -> usize {
        self.bits().div_ceil(8)
    }

    /// Header spelling (`"F32"`, `"BF16"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::BOOL => "BOOL",
            DType::F4 => "F4",
            DType::F6_E2M3 => "F6_E2M3",
            DType::F6_E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8_E5M2 => "F8_E5M2",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E8M0 => "F8_E8M0",
            DType::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            DType::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Floating-point dtypes that convert to f32 without ambiguity and that quantizers accept.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// Bytes needed for `numel` elements, or `None` on overflow or a sub-byte remainder.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        let bits = numel.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Decodes little-endian `bytes` of this dtype into `out` as f32. Returns `false` when this
    /// dtype does not convert (non-float types) or the lengths do not agree.
    #[inline(always)]
    #[allow(clippy::inline_always)] // inlined into callers compiled for wider vector units
    pub fn decode_f32(self, bytes: &[u8], out: &mut [f32]) -> bool {
        let w = match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => self.bits() / 8,
            _ => return false,
        };
        if bytes.len() != out.len() * w {
            return false;
        }
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                // bf16 is the top half of an f32: a shift, which the compiler vectorises.
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
            DType::F64 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    *o = f64::from_le_bytes(b) as f32;
                }
            }
            _ => unreachable!("checked above"),
        }
        true
    }

    /// Encodes f32 values as little-endian bytes of this float dtype (round to nearest even).
    /// Returns `None` for non-float dtypes.
    pub fn encode_f32(self, values: &[f32]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(values.len() * self.bits() / 8);
        match self {
            DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            DType::F64 => values.iter().for_each(|v| out.extend_from_slice(&f64::from(*v).to_le_bytes())),
            _ => return None,
        }
        Some(out)
    }

    /// Rounds an f32 to the nearest value representable in this float dtype.
    pub fn round_f32(self, v: f32) -> f32 {
        match self {
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
            _ => v,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        DType::ALL.iter().copied().find(|d| d.as_str() == s).ok_or(())
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn test_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.as_str().parse::<DType>(), Ok(d));
        }
        assert!("F33".parse::<DType>().is_err());
    }

    #[test]
    fn test_sub_byte_lengths() {
        assert_eq!(DType::F4.bytes_for(3), None);
        assert_eq!(DType::F4.bytes_for(4), Some(2));
        assert_eq!(DType::F6_E2M3.bytes_for(4), Some(3));
        assert_eq!(DType::F32.bytes_for(usize::MAX), None);
    }

    #[test]
    fn test_float_round_trip() {
        let v = [0.0f32, 1.5, -2.25, 65504.0];
        for d in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let bytes = d.encode_f32(&v).unwrap();
            let mut back = [0f32; 4];
            assert!(d.decode_f32(&bytes, &mut back));
            for (a, b) in v.iter().zip(back) {
                assert_eq!(d.round_f32(*a), b, "{d}");
            }
        }
        assert!(!DType::I8.decode_f32(&[0], &mut [0.0]));
    }
}
