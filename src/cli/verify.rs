//! `mcompress verify`: re-hash a bundle against its manifest (and its signature), or check that
//! it loads as its runtime reads it (`--conformance`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress verify` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Bundle directory.
    bundle: PathBuf,
    /// Also check `manifest.sig` with this Ed25519 public key (SPKI PEM).
    #[arg(long, value_name = "PUB")]
    key: Option<PathBuf>,
    /// Instead of the manifest, check that the bundle loads as its runtime reads it: the
    /// compressed-tensors layout (config groups, tensors, dtypes, shapes), config.json,
    /// sentence-transformers modules, and the GGUF through our reader. Works on any model
    /// directory; the same check `run` applies to every bundle it writes.
    #[arg(long, conflicts_with = "key")]
    conformance: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    if args.conformance {
        return conformance(&args.bundle, args.json, out);
    }
    let Args { bundle, key, json, .. } = args;
    let key = key.map(|k| mcompress_bundle::load_verifying_key(&k)).transpose()?;
    let (manifest, mut problems) = mcompress_bundle::verify(&bundle)?;
    if let Some(key) = &key
        && let Some(reason) = mcompress_bundle::check_signature(&bundle, key)?
    {
        problems.insert(0, mcompress_bundle::Problem::Signature { reason });
    }
    let files = manifest.as_ref().map(|m| m.files.len());
    let status = manifest.as_ref().map(|m| m.status.clone());
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"bundle": bundle, "ok": problems.is_empty(), "files": files, "status": status, "problems": problems}),
        )?;
        writeln!(out)?;
    } else if problems.is_empty() {
        writeln!(
            out,
            "ok: {} files match {} (bundle status: {})",
            files.unwrap_or_default(),
            bundle.join("manifest.json").display(),
            status.unwrap_or_default()
        )?;
    } else {
        for p in &problems {
            writeln!(out, "FAIL {p}")?;
        }
        writeln!(out, "{}: {} problem(s)", bundle.display(), problems.len())?;
    }
    Ok(if problems.is_empty() { Status::Ok } else { Status::GateFailed })
}

/// `--conformance`: the bundle as its runtime reads it.
fn conformance(bundle: &std::path::Path, json: bool, mut out: impl Write) -> Result<Status> {
    anyhow::ensure!(bundle.is_dir(), "{}: not a directory", bundle.display());
    let problems = mcompress_bundle::conformance::check(bundle);
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"bundle": bundle, "ok": problems.is_empty(), "problems": problems}),
        )?;
        writeln!(out)?;
    } else if problems.is_empty() {
        writeln!(out, "ok: {} conforms (compressed-tensors layout, config, files)", bundle.display())?;
    } else {
        for p in &problems {
            writeln!(out, "FAIL {p}")?;
        }
        writeln!(out, "{}: {} conformance problem(s)", bundle.display(), problems.len())?;
    }
    Ok(if problems.is_empty() { Status::Ok } else { Status::GateFailed })
}
