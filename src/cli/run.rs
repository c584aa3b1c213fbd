//! `mcompress run`: run a recipe: passes, gates, and one bundle per target.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use mcompress_passes::pipeline::Progress;
use mcompress_run::{RunOptions, RunSummary};

use super::Status;

/// Arguments of `mcompress run` (documented on the subcommand).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
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
    /// Backend of the eval and of calibrated passes (their blocks' matmuls and Hessians),
    /// overriding `[eval] backend`: auto (a hardware GPU if there is one, else the CPU), wgpu
    /// (any wgpu adapter, Mesa's llvmpipe included) or cpu (calibration bit-reproducible).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Continue `distill` and calibrated (GPTQ, AWQ, Wanda, SparseGPT) passes from their last
    /// checkpoint (same model and settings required).
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
    /// Activations a calibrated pass (GPTQ, AWQ, Wanda, SparseGPT) keeps in memory, as
    /// "512MiB", "4GB" or bytes; past it they go to an unlinked scratch file in the output
    /// directory (same results, more disk reads). Default 1GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    calibration_memory: Option<u64>,
    /// Stop each calibrated pass after N blocks of this process, leaving a checkpoint, and fail
    /// (exit 2); `--resume` continues. For testing interrupted runs.
    #[arg(long, value_name = "N", hide = true)]
    calibrate_stop_after: Option<usize>,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    mcompress_recipe::ByteSize::parse(s)
        .map(|b| b.0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 512MiB, 4GB, 1073741824)"))
}

pub(crate) fn exec(args: Args, mut out: impl Write) -> Result<Status> {
    let Args {
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
        calibration_memory,
        calibrate_stop_after,
    } = args;

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
        calibration_memory,
        calibrate_stop_after,
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

/// Most worker threads `--threads` may ask for (each is a real OS thread with its own stack).
const MAX_THREADS: usize = 1024;

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
