//! Byte sizes written as `"10MiB"`, `"1.5GB"` or a plain number of bytes.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, JsonSchema)]
#[schemars(with = "String")]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"10MiB"`, `"1.5 GB"`, `"512k"`, `"123"`: binary (KiB, MiB, GiB, TiB) and decimal
    /// (kB/KB, MB, GB, TB) units; `B` optional.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num.parse().ok()?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return None,
        };
        let v = (num * mult).round();
        (v.is_finite() && (0.0..1.8e19).contains(&v)).then_some(ByteSize(v as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 1024.0 * 1024.0 * 1024.0 {
            write!(f, "{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
        } else if b >= 1024.0 * 1024.0 {
            write!(f, "{:.2} MiB", b / (1024.0 * 1024.0))
        } else if b >= 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            I(u64),
        }
        match Raw::deserialize(d)? {
            Raw::I(v) => Ok(ByteSize(v)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "max-size {s:?}: expected a size like \"10MiB\", \"1.5GB\" or a number of bytes"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_units() {
        assert_eq!(ByteSize::parse("10MiB"), Some(ByteSize(10 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("1.5 GB"), Some(ByteSize(1_500_000_000)));
        assert_eq!(ByteSize::parse("512"), Some(ByteSize(512)));
        assert_eq!(ByteSize::parse("2kib"), Some(ByteSize(2048)));
        assert_eq!(ByteSize::parse("ten"), None);
        assert_eq!(ByteSize::parse("1 parsec"), None);
        assert_eq!(ByteSize::parse(""), None);
    }
}
