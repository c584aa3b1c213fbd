//! `mcompress recipe`: check a recipe as `run` would before any work, or print its schema.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::Status;

#[derive(Subcommand, Debug)]
pub(crate) enum RecipeCommand {
    /// Print the recipe JSON schema, generated from the code.
    Schema,
    /// Validate a recipe without running it: syntax, every pass config, targets and profiles,
    /// model path and eval set existence. Exit 0 ok, 2 with the first problem.
    Check {
        /// The recipe file.
        recipe: PathBuf,
    },
}

pub(crate) fn exec(command: RecipeCommand, mut out: impl Write) -> Result<Status> {
    match command {
        RecipeCommand::Check { recipe } => {
            let loaded = mcompress_recipe::Recipe::load(&recipe)?;
            // The plan `run` starts from: every check it makes before reading a weight.
            let plan = mcompress_run::Plan::new(&loaded, None)?;
            for w in &plan.warnings {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("warning: {w}");
                }
            }
            writeln!(
                out,
                "ok: {} ({} passes, {} targets, eval: {})",
                recipe.display(),
                plan.passes.len(),
                plan.resolved.len(),
                loaded.eval.as_ref().map_or("none".to_string(), |e| format!("{:?}", e.metric).to_lowercase())
            )?;
            Ok(Status::Ok)
        }
        RecipeCommand::Schema => {
            serde_json::to_writer_pretty(&mut out, &mcompress_passes::recipe_schema())?;
            writeln!(out)?;
            Ok(Status::Ok)
        }
    }
}
