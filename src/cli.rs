//! Command-line interface: clap definitions, commands, exit codes.
//!
//! Exit codes: 0 ok, 1 a gate failed (or `verify` found a difference), 2 bad input or any error.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mcompress_passes::pipeline::Progress;
use mcompress_run::{RunOptions, RunSummary};

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
    Run {
        /// The recipe file.
        recipe: PathBuf,
        /// Output directory (overrides `[output] dir`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Worker threads (default: all cores). Output does not depend on it.
        #[arg(long)]
        threads: Option<usize>,
        /// Print the run summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
        /// Leave wall-clock timings out of reports so reruns give byte-identical bundles
        /// (also enabled by the SOURCE_DATE_EPOCH environment variable).
        #[arg(long)]
        reproducible: bool,
        /// Run only this target of the recipe (fan a CI matrix out over targets).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Sign each bundle's manifest with this Ed25519 secret key (PKCS#8 PEM from `keygen`).
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
        /// Eval backend, overriding `[eval] backend`: auto (a hardware GPU if there is one, else
        /// the CPU), wgpu (any wgpu adapter, Mesa's llvmpipe included) or cpu.
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Continue `distill` passes from their last checkpoint (same settings required).
        #[arg(long)]
        resume: bool,
        /// Train `distill` passes on this device, overriding their `device`: cpu (burn's CPU
        /// backend, bit-reproducible) or wgpu (a GPU through Vulkan, Metal or DX12).
        #[arg(long, value_enum, value_name = "DEVICE")]
        distill_device: Option<DistillDeviceArg>,
        /// Stop each `distill` pass after N steps of this process, leaving a checkpoint, and
        /// fail (exit 2); `--resume` continues. For testing interrupted runs.
        #[arg(long, value_name = "N", hide = true)]
        distill_stop_after: Option<usize>,
    },
    /// Show the tensors, dtypes, shapes, parameters and bytes of a model, file or bundle.
    Inspect {
        /// A `.safetensors` file, a model directory or a bundle.
        path: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash a bundle against its manifest; exit 1 on any difference.
    Verify {
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
    },
    /// Generate an Ed25519 key pair for signing bundles: KEY (secret) and KEY.pub.
    Keygen {
        /// Secret key file to create.
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
    },
    /// Write a bundle's weights as a dense safetensors file (quantized matrices dequantized).
    Dequantize {
        /// Bundle directory (or model).
        bundle: PathBuf,
        /// Output `.safetensors` file.
        #[arg(long)]
        out: PathBuf,
        /// Float type of the dequantized matrices: f32, f16 or bf16.
        #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
        dtype: String,
    },
    /// List the passes a recipe can use, or show one pass's documentation.
    Passes {
        /// Show the full documentation of this pass.
        name: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Compare two runs (report.json files or bundle dirs) and fail on regressions: exit 1 when a
    /// limit is exceeded, 2 on bad input. Prints a Markdown table (for a CI job summary) or JSON.
    Compare {
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
    },
    /// List the built-in target catalog (hardware, bandwidth, compute, prices, sources).
    Targets {
        /// JSON output (the full catalog with sources).
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON schema of recipes, reports or manifests, generated from the code.
    Schema {
        /// Which document.
        #[arg(value_enum)]
        kind: SchemaKind,
    },
    /// Recipe utilities.
    Recipe {
        #[command(subcommand)]
        command: RecipeCommand,
    },
}

#[derive(Subcommand, Debug)]
enum RecipeCommand {
    /// Print the recipe JSON schema, generated from the code.
    Schema,
    /// Validate a recipe without running it: syntax, every pass config, targets and profiles,
    /// model path and eval set existence. Exit 0 ok, 2 with the first problem.
    Check {
        /// The recipe file.
        recipe: PathBuf,
    },
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

/// Exit status of a command that ran to completion.
enum Status {
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

/// Most worker threads `--threads` may ask for (each is a real OS thread with its own stack).
const MAX_THREADS: usize = 1024;

/// A name from an untrusted file as one terminal line: control characters (newlines, escape
/// sequences) escaped.
fn printable(name: &str) -> String {
    if !name.chars().any(char::is_control) {
        return name.to_string();
    }
    name.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn dispatch(cli: Cli) -> Result<Status> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Run {
            recipe,
            out: out_dir,
            threads,
            json,
            quiet,
            reproducible,
            target,
            sign,
            backend,
            resume,
            distill_device,
            distill_stop_after,
        } => {
            if let Some(n) = threads {
                anyhow::ensure!((1..=MAX_THREADS).contains(&n), "--threads {n}: must be between 1 and {MAX_THREADS}");
                rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("configuring the thread pool")?;
            }
            let reproducible = reproducible || std::env::var_os("SOURCE_DATE_EPOCH").is_some();
            let mut loaded = mcompress_recipe::Recipe::load(&recipe)?;
            if let Some(name) = &target {
                loaded.select_target(name)?;
            }
            let sign = sign.map(|k| mcompress_bundle::load_signing_key(&k)).transpose()?;
            let backend = backend.map(|b| match b {
                BackendArg::Auto => mcompress_recipe::Backend::Auto,
                BackendArg::Wgpu => mcompress_recipe::Backend::Wgpu,
                BackendArg::Cpu => mcompress_recipe::Backend::Cpu,
            });
            let progress = !quiet && !json;
            let opts = RunOptions {
                out: out_dir,
                reproducible,
                sign,
                backend,
                progress,
                resume,
                distill_device: distill_device.map(|d| match d {
                    DistillDeviceArg::Cpu => mcompress_passes::distill::TrainDevice::Cpu,
                    DistillDeviceArg::Wgpu => mcompress_passes::distill::TrainDevice::Wgpu,
                }),
                distill_stop_after,
            };
            let mut progress = ProgressOut::new(quiet || json);
            let summary = mcompress_run::run(&loaded, &opts, &mut |p| progress.update(p))?;
            progress.finish();
            for w in &summary.warnings {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("warning: {w}");
                }
            }
            if json {
                serde_json::to_writer_pretty(&mut out, &summary)?;
                writeln!(out)?;
            } else {
                print_summary(&mut out, &summary)?;
            }
            Ok(if summary.targets.iter().all(|t| t.passed) { Status::Ok } else { Status::GateFailed })
        }
        Command::Inspect { path, json } => {
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
        Command::Keygen { out: path } => {
            let public = mcompress_bundle::keygen(&path)?;
            writeln!(out, "wrote {} (secret, mode 0600) and {} (public)", path.display(), public.display())?;
            Ok(Status::Ok)
        }
        Command::Verify { bundle, conformance: true, json, .. } => {
            anyhow::ensure!(bundle.is_dir(), "{}: not a directory", bundle.display());
            let problems = mcompress_bundle::conformance::check(&bundle);
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
        Command::Verify { bundle, key, json, .. } => {
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
        Command::Dequantize { bundle, out: path, dtype } => {
            let dtype = match dtype.as_str() {
                "f16" => mcompress_core::DType::F16,
                "bf16" => mcompress_core::DType::BF16,
                _ => mcompress_core::DType::F32,
            };
            let n = mcompress_bundle::dequantize(&bundle, &path, dtype)?;
            writeln!(out, "wrote {} ({n} matrices dequantized to {dtype})", path.display())?;
            Ok(Status::Ok)
        }
        Command::Passes { name, json } => {
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
        Command::Compare { old, new, max_size_growth, max_accuracy_drop, max_latency_growth, json } => {
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
        Command::Targets { json } => {
            let c = mcompress_bundle::targets::catalog();
            if json {
                serde_json::to_writer_pretty(&mut out, c)?;
                writeln!(out)?;
                return Ok(Status::Ok);
            }
            writeln!(
                out,
                "{:22} {:>8} {:>9} {:>10} {:>9} {:>11}  name",
                "id", "memory", "GB/s", "f16 TF/s", "$/h", "own $/h"
            )?;
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
        Command::Schema { kind } => {
            let v = match kind {
                SchemaKind::Recipe => mcompress_passes::recipe_schema(),
                SchemaKind::Report => mcompress_bundle::report_schema(),
                SchemaKind::Manifest => mcompress_bundle::manifest_schema(),
            };
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
            Ok(Status::Ok)
        }
        Command::Recipe { command: RecipeCommand::Check { recipe } } => {
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
        Command::Recipe { command: RecipeCommand::Schema } => {
            serde_json::to_writer_pretty(&mut out, &mcompress_passes::recipe_schema())?;
            writeln!(out)?;
            Ok(Status::Ok)
        }
    }
}

fn parse_threshold(s: &str) -> Result<mcompress_bundle::compare::Threshold, String> {
    mcompress_bundle::compare::Threshold::parse(s)
        .ok_or_else(|| format!("{s:?}: expected a percentage (\"5%\"), a number or a size (\"10MiB\")"))
}

fn print_summary(out: &mut impl Write, s: &RunSummary) -> Result<()> {
    for t in &s.targets {
        writeln!(
            out,
            "{} {}  {}  {} bytes ({} than {} bytes of weights)",
            if t.passed { "PASS" } else { "FAIL" },
            t.name,
            t.dir.display(),
            t.bundle_bytes,
            {
                let r = s.model_bytes as f64 / t.bundle_bytes.max(1) as f64;
                if r >= 1.0 { format!("{r:.2}x smaller") } else { format!("{:.2}x larger", 1.0 / r) }
            },
            s.model_bytes
        )?;
        for g in t.gates.iter().filter(|g| !g.passed) {
            writeln!(out, "  gate {} failed: {}", g.name, g.detail)?;
        }
    }
    Ok(())
}

/// `--backend` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BackendArg {
    Auto,
    Wgpu,
    Cpu,
}

/// `--distill-device` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DistillDeviceArg {
    Cpu,
    Wgpu,
}

/// Progress on stderr: a bar on a terminal, a few plain lines otherwise.
struct ProgressOut {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    next_tenth: u64,
    started: std::time::Instant,
}

impl ProgressOut {
    fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} tensors  {msg}  {elapsed}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        });
        Self { bar, plain: !quiet && !tty, next_tenth: 1, started: std::time::Instant::now() }
    }

    fn update(&mut self, p: Progress) {
        let rate = p.bytes_done as f64 / self.started.elapsed().as_secs_f64().max(1e-9) / 1e6;
        if let Some(b) = &self.bar {
            b.set_length(p.tensors_total as u64);
            b.set_position(p.tensors_done as u64);
            b.set_message(format!(
                "{:.1}/{:.1} MB  {rate:.0} MB/s",
                p.bytes_done as f64 / 1e6,
                p.bytes_total as f64 / 1e6
            ));
            if p.tensors_total > 0 && p.tensors_done == p.tensors_total {
                // Passes done: clear the line for the eval's bars.
                b.finish_and_clear();
            }
        } else if self.plain && p.bytes_total > 0 && p.bytes_done * 10 >= self.next_tenth * p.bytes_total {
            self.next_tenth = p.bytes_done * 10 / p.bytes_total + 1;
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "{}/{} tensors, {:.1}/{:.1} MB, {rate:.0} MB/s",
                    p.tensors_done,
                    p.tensors_total,
                    p.bytes_done as f64 / 1e6,
                    p.bytes_total as f64 / 1e6
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
