//! `mcompress compare`: compare two runs (report.json files or bundle dirs) and fail on regressions: exit 1 when a

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress compare` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The baseline (e.g. main's report).
    old: PathBuf,
    /// The candidate.
    new: PathBuf,
    /// Largest allowed bundle growth: "5%" or a size ("10MiB").
    #[arg(long, value_parser = parse_threshold)]
    max_size_growth: Option<mcompress_bundle::compare::Threshold>,
    /// Largest allowed drop of the eval metric: "0.5%" or absolute ("0.01").
    #[arg(long, value_parser = parse_threshold)]
    max_accuracy_drop: Option<mcompress_bundle::compare::Threshold>,
    /// Largest allowed latency growth: "10%" or absolute ms (measured eval p50, else the
    /// estimated time per decoded token on each target).
    #[arg(long, value_parser = parse_threshold)]
    max_latency_growth: Option<mcompress_bundle::compare::Threshold>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { old, new, max_size_growth, max_accuracy_drop, max_latency_growth, json } = args;

    let limits = mcompress_bundle::compare::Limits { max_size_growth, max_accuracy_drop, max_latency_growth };
    let c = mcompress_bundle::compare::compare(&old, &new, &limits)?;
    if json {
        serde_json::to_writer_pretty(&mut out, &c)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", c.to_markdown())?;
    }
    Ok(if c.passed { Status::Ok } else { Status::GateFailed })
}

fn parse_threshold(s: &str) -> Result<mcompress_bundle::compare::Threshold, String> {
    mcompress_bundle::compare::Threshold::parse(s)
        .ok_or_else(|| format!("{s:?}: expected a percentage (\"5%\"), a number or a size (\"10MiB\")"))
}
