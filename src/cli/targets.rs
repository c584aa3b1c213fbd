//! `mcompress targets`: list the built-in target catalog (hardware, bandwidth, compute, prices, sources).

use std::io::Write;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress targets` (documented on the subcommand).
#[derive(clap::Args, Clone, Copy, Debug)]
pub(crate) struct Args {
    /// JSON output (the full catalog with sources).
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { json } = args;

    let c = mcompress_bundle::targets::catalog();
    if json {
        serde_json::to_writer_pretty(&mut out, c)?;
        writeln!(out)?;
        return Ok(Status::Ok);
    }
    writeln!(out, "{:22} {:>8} {:>9} {:>10} {:>9} {:>11}  name", "id", "memory", "GB/s", "f16 TF/s", "$/h", "own $/h")?;
    for p in c {
        let f16 = p.tflops.get("f16").or(p.tflops.get("f32")).copied().unwrap_or(0.0);
        let money = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        writeln!(
            out,
            "{:22} {:>6.0}Gi {:>9.1} {:>10.1} {:>9} {:>11}  {}",
            p.id,
            p.memory_gib,
            p.bandwidth_gbs,
            f16,
            money(p.price_per_hour),
            money(p.self_hosted_per_hour),
            p.name
        )?;
    }
    writeln!(out, "\nSources: `mcompress targets --json`; estimate model: docs/targets.md")?;
    Ok(Status::Ok)
}
