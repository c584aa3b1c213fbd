//! `mcompress`: compress a model per a recipe, verify, and bundle it per target.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
