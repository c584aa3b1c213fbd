//! `mcompress inspect`: show the tensors, dtypes, shapes, parameters and bytes of a model, file or bundle.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::{Status, printable};

/// Arguments of `mcompress inspect` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A `.safetensors` file, a model directory or a bundle.
    path: PathBuf,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { path, json } = args;

    let i = mcompress_bundle::inspect(&path)?;
    if json {
        serde_json::to_writer_pretty(&mut out, &i)?;
        writeln!(out)?;
        return Ok(Status::Ok);
    }
    writeln!(out, "{} ({})", i.path.display(), i.kind)?;
    // Column width from the names, capped: a name of any length (untrusted) just overflows.
    let w = i.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).clamp(4, 120);
    writeln!(out, "{:w$}  {:6}  {:>14}  {:>12}  quantized", "name", "dtype", "shape", "bytes")?;
    for t in &i.tensors {
        let shape = format!("{:?}", t.shape);
        writeln!(
            out,
            "{:w$}  {:6}  {:>14}  {:>12}  {}",
            printable(&t.name),
            t.dtype,
            shape,
            t.bytes,
            t.quantized.as_deref().unwrap_or("-")
        )?;
    }
    writeln!(out, "\n{} tensors, {} parameters, {} bytes", i.tensors.len(), i.params, i.bytes)?;
    for (d, b) in &i.bytes_by_dtype {
        writeln!(out, "  {d:6} {b:>12} bytes")?;
    }
    Ok(Status::Ok)
}
