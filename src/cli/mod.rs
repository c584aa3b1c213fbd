//! Command-line interface: clap definitions, commands, exit codes.
//!
//! Exit codes: 0 ok, 1 a gate failed (or `verify` found a difference), 2 bad input or any error.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod compare;
mod dequantize;
mod inspect;
mod keygen;
mod passes;
mod recipe;
mod run;
mod schema;
mod targets;
mod verify;

#[derive(Parser, Debug)]
#[command(
    name = "mcompress",
    version,
    about = "Compress a model per recipe.toml, verify it, and write one deployment bundle per target."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a recipe: passes, gates, and one bundle per target.
    Run(run::Args),
    /// Show the tensors, dtypes, shapes, parameters and bytes of a model, file or bundle.
    Inspect(inspect::Args),
    /// Re-hash a bundle against its manifest; exit 1 on any difference.
    Verify(verify::Args),
    /// Generate an Ed25519 key pair for signing bundles: KEY (secret) and KEY.pub.
    Keygen(keygen::Args),
    /// Write a bundle's weights as a dense safetensors file (quantized matrices dequantized).
    Dequantize(dequantize::Args),
    /// List the passes a recipe can use, or show one pass's documentation.
    Passes(passes::Args),
    /// Compare two runs (report.json files or bundle dirs) and fail on regressions: exit 1 when a
    /// limit is exceeded, 2 on bad input. Prints a Markdown table (for a CI job summary) or JSON.
    Compare(compare::Args),
    /// List the built-in target catalog (hardware, bandwidth, compute, prices, sources).
    Targets(targets::Args),
    /// Print the JSON schema of recipes, reports or manifests, generated from the code.
    Schema(schema::Args),
    /// Recipe utilities.
    Recipe {
        #[command(subcommand)]
        command: recipe::RecipeCommand,
    },
}

/// Exit status of a command that ran to completion.
pub(crate) enum Status {
    Ok,
    GateFailed,
}

pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli) {
        Ok(Status::Ok) => ExitCode::SUCCESS,
        Ok(Status::GateFailed) => ExitCode::from(1),
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    let _ = write!(msg, "\n  caused by: {c}");
                }
            }
            #[allow(clippy::print_stderr)]
            {
                eprintln!("{msg}");
            }
            ExitCode::from(2)
        }
    }
}

/// A name from an untrusted file as one terminal line: control characters (newlines, escape
/// sequences) escaped.
pub(crate) fn printable(name: &str) -> String {
    if !name.chars().any(char::is_control) {
        return name.to_string();
    }
    name.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn dispatch(cli: Cli) -> Result<Status> {
    let out = std::io::stdout().lock();
    match cli.command {
        Command::Run(a) => run::exec(a, out),
        Command::Inspect(a) => inspect::exec(a, out),
        Command::Verify(a) => verify::exec(a, out),
        Command::Keygen(a) => keygen::exec(a, out),
        Command::Dequantize(a) => dequantize::exec(a, out),
        Command::Passes(a) => passes::exec(a, out),
        Command::Compare(a) => compare::exec(a, out),
        Command::Targets(a) => targets::exec(a, out),
        Command::Schema(a) => schema::exec(a, out),
        Command::Recipe { command } => recipe::exec(command, out),
    }
}
