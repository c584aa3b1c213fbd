//! `mcompress schema`: print the JSON schema of recipes, reports or manifests, generated from the code.

use std::io::Write;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress schema` (documented on the subcommand).
#[derive(clap::Args, Clone, Copy, Debug)]
pub(crate) struct Args {
    /// Which document.
    #[arg(value_enum)]
    kind: SchemaKind,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { kind } = args;

    let v = match kind {
        SchemaKind::Recipe => mcompress_passes::recipe_schema(),
        SchemaKind::Report => mcompress_bundle::report_schema(),
        SchemaKind::Manifest => mcompress_bundle::manifest_schema(),
    };
    serde_json::to_writer_pretty(&mut out, &v)?;
    writeln!(out)?;
    Ok(Status::Ok)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SchemaKind {
    /// recipe.toml (also `mcompress recipe schema`).
    Recipe,
    /// report.json.
    Report,
    /// manifest.json.
    Manifest,
}
