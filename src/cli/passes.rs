//! `mcompress passes`: list the passes a recipe can use, or show one pass's documentation.

use std::io::Write;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress passes` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Show the full documentation of this pass.
    name: Option<String>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { name, json } = args;

    let passes = mcompress_passes::PASSES;
    if let Some(name) = name {
        let Some(p) = mcompress_passes::lookup(&name) else {
            let valid: Vec<_> = passes.iter().map(|p| p.name).collect();
            anyhow::bail!("unknown pass {name:?}; valid passes: {}", valid.join(", "));
        };
        writeln!(out, "# {}\n\n{}\n\n{}", p.name, p.summary, p.docs.trim_end())?;
        return Ok(Status::Ok);
    }
    if json {
        let v: Vec<_> = passes.iter().map(|p| serde_json::json!({"name": p.name, "summary": p.summary, "status": p.status, "docs": p.docs, "schema": (p.schema)()})).collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(Status::Ok);
    }
    for p in passes {
        writeln!(out, "{:14} {}", p.name, p.summary)?;
    }
    writeln!(out, "\n`mcompress passes NAME` shows a pass's documentation.")?;
    Ok(Status::Ok)
}
