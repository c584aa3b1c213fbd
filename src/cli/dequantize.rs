//! `mcompress dequantize`: write a bundle's weights as a dense safetensors file (quantized matrices dequantized).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress dequantize` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Bundle directory (or model).
    bundle: PathBuf,
    /// Output `.safetensors` file.
    #[arg(long)]
    out: PathBuf,
    /// Float type of the dequantized matrices: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { bundle, out: path, dtype } = args;

    let dtype = match dtype.as_str() {
        "f16" => mcompress_core::DType::F16,
        "bf16" => mcompress_core::DType::BF16,
        _ => mcompress_core::DType::F32,
    };
    let n = mcompress_bundle::dequantize(&bundle, &path, dtype)?;
    writeln!(out, "wrote {} ({n} matrices dequantized to {dtype})", path.display())?;
    Ok(Status::Ok)
}
