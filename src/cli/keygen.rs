//! `mcompress keygen`: generate an Ed25519 key pair for signing bundles: KEY (secret) and KEY.pub.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::Status;

/// Arguments of `mcompress keygen` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Secret key file to create.
    #[arg(long, value_name = "KEY")]
    out: PathBuf,
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args { out: path } = args;

    let public = mcompress_bundle::keygen(&path)?;
    writeln!(out, "wrote {} (secret, mode 0600) and {} (public)", path.display(), public.display())?;
    Ok(Status::Ok)
}
