//! Calibrated passes on the eval runtime: GPTQ, AWQ, Wanda and SparseGPT observe the
//! runtime's block-by-block trace ([`Decoder::trace`]: every site's input, then a rewrite of the
//! block in place, the rewritten block feeding the next) as [`Observer`]s and return what they
//! computed, by tensor name, for [`Pass::provide`]. The algorithms know no architecture; the
//! runtime does.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use mcompress_core::ModelSource;
use mcompress_core::arch::{DECODERS, Family};
use mcompress_eval::calibrate::{Prior, WindowSpec, windows};
use mcompress_eval::decoder::{Block, Decoder, MixtureInput, Observer, Site, Streams, TraceStart};
use mcompress_eval::linear::Device;
use mcompress_eval::{Error, Result, weights};

use crate::quant::gptq;
use crate::quant::scheme::scale_dtype;
use crate::{Calibrated, Calibration, CalibrationMethod, ParamMeta, Pass, Plan, prune};

/// The windows a [`Calibration`] asks for.
pub fn window_spec(c: &Calibration) -> WindowSpec<'_> {
    WindowSpec { set: &c.set, samples: c.samples, seq_len: c.seq_len, seed: c.seed }
}

/// The windows a `[calibration]` table of a pass's settings asks for.
pub fn config_window_spec(c: &crate::quant::CalibrationConfig) -> WindowSpec<'_> {
    WindowSpec { set: &c.set, samples: c.samples, seq_len: c.seq_len, seed: c.seed }
}

/// Runs `pass`'s calibration on `model` (or on `prior`, the model after the recipe's earlier
/// passes): the tensors it produced, by name, for [`Pass::provide`], and the layers whose input
/// had no calibration row (experts no token was routed to), which GPTQ, Wanda and SparseGPT
/// rewrote without data (an identity Hessian: round-to-nearest, magnitude pruning). Decoder
/// families of [`Family`] only. The model streams block by block ([`Decoder::streamed`]): one
/// block's weights in f32 at a time, earlier passes applied per tensor as it is read, and the
/// windows' activations within `scratch`'s budget (the rest in its scratch file). The blocks'
/// matmuls and the Hessians run on `device` (on the CPU the results are the same at any thread
/// count; on wgpu they agree with the CPU's to float tolerance); the rest on the CPU.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &ModelSource,
    pass: &dyn Pass,
    cal: &Calibration,
    prior: Option<&Prior<'_>>,
    scratch: &mcompress_eval::spill::Scratch,
    checkpoint: Option<&Checkpoint>,
    device: &Device,
    progress: bool,
) -> Result<(crate::Results, Vec<String>)> {
    let config = prior.map_or_else(|| model.config().cloned().unwrap_or_default(), |p| p.config.clone());
    if Family::of_config(&config).is_none() {
        return Err(Error::Model(format!(
            "{}: calibration runs decoder models ({DECODERS}); this model_type is {:?}",
            model.path().display(),
            mcompress_core::arch::model_type(&config)
        )));
    }
    let windows = windows(model, window_spec(cal))?;
    let as_given = weights::ModelTensors::new(model);
    let source: &dyn weights::TensorSource = prior.map_or(&as_given, |p| p.tensors);
    // Each tensor's dtype in the input and its shape as the calibration sees it (after the
    // earlier passes).
    let shapes: BTreeMap<String, Vec<usize>> = source.shapes().into_iter().collect();
    let dtypes: BTreeMap<String, (mcompress_core::DType, Vec<usize>)> = model
        .tensors()
        .iter()
        .filter_map(|r| {
            let i = model.info(r);
            Some((i.name.clone(), (i.dtype, shapes.get(&i.name)?.clone())))
        })
        .collect();
    let keep_zeros = prior.is_some_and(|p| p.keep_zeros);
    let mut llama = Decoder::streamed(&config, source)?.with_scratch(scratch.clone()).on(device.clone());
    // Selected for quantization: the scale dtype its pass would give it.
    let selected = |name: &str| -> Option<(mcompress_core::DType, Vec<usize>)> {
        let (dtype, shape) = dtypes.get(name)?;
        let meta = ParamMeta::Dense { dtype: *dtype, shape: shape.clone() };
        matches!(pass.plan(name, &meta), Plan::Change(_)).then(|| (*dtype, shape.clone()))
    };
    let bar = if progress { ProgressBar::new(llama.layers() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("  calibrate {msg} [{bar:30}] {pos}/{len} blocks eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let tick = || bar.inc(1);
    // With a checkpoint, results go to its file as they are produced (and a resumed run starts
    // after its last saved block); without, past the memory budget into a scratch file.
    let hidden = llama.geometry().hidden;
    let (initial, unseen, start) = match checkpoint {
        Some(c) => c.open(&windows, hidden)?,
        None => (crate::Results::spilling(scratch.dir.clone(), scratch.budget), Vec::new(), None),
    };
    let saver = checkpoint.map(|c| Saver::new(c, llama.layers()));
    let out = match cal.method {
        CalibrationMethod::Gptq(opts, scheme) => {
            bar.set_message(format!("gptq, {} x {} tokens", cal.samples, cal.seq_len));
            let obs = Rewrite::new(
                initial,
                device.clone(),
                |name: &str| selected(name).is_some(),
                |name: &str, w: &[f32], _: (usize, usize), h: Vec<f64>| {
                    let Some((dtype, shape)) = selected(name) else { return Ok(None) };
                    // After pruning: the zeros stay zeros (their codes are the zero point).
                    let keep: Option<Vec<bool>> =
                        (keep_zeros && w.contains(&0.0)).then(|| w.iter().map(|v| *v != 0.0).collect());
                    let q = gptq::gptq_masked(&scheme, scale_dtype(dtype), &shape, w, h, &opts, keep.as_deref())
                        .map_err(|e| format!("{name}: {e}"))?;
                    let deq = q.dequantize();
                    Ok(Some((Calibrated::Quantized(q), deq)))
                },
            );
            let mut obs = Checkpointed::new(obs, saver, unseen);
            llama.trace_from(&windows, &mut obs, &tick, start)?;
            let mut obs = obs.inner;
            (obs.out, std::mem::take(&mut obs.unseen))
        }
        CalibrationMethod::Awq { grid, scheme } => {
            bar.set_message(format!("awq, {} x {} tokens", cal.samples, cal.seq_len));
            let obs = crate::quant::awq::Awq::new(
                scheme,
                grid,
                &selected,
                initial,
                (scratch.dir.clone(), scratch.budget / 3),
            );
            let mut obs = Checkpointed::new(obs, saver, unseen);
            llama.trace_from(&windows, &mut obs, &tick, start)?;
            obs.inner.into_results()
        }
        CalibrationMethod::Wanda(pattern) | CalibrationMethod::SparseGpt { pattern, .. } => {
            let sparsegpt = match cal.method {
                CalibrationMethod::SparseGpt { opts, .. } => Some(opts),
                _ => None,
            };
            bar.set_message(format!(
                "{}, {} x {} tokens",
                if sparsegpt.is_some() { "sparsegpt" } else { "wanda" },
                cal.samples,
                cal.seq_len
            ));
            // Each pruned layer feeds the next one's inputs (block by block, as GPTQ).
            let obs = Rewrite::new(
                initial,
                device.clone(),
                |name: &str| selected(name).is_some(),
                |name: &str, w: &[f32], (_, cols): (usize, usize), h: Vec<f64>| {
                    if selected(name).is_none() {
                        return Ok(None);
                    }
                    let fail = |e: String| format!("{name}: {e}");
                    let (pruned, keep) = if let Some(opts) = &sparsegpt {
                        prune::sparsegpt(w, cols, h, pattern, opts).map_err(fail)?
                    } else {
                        let diag: Vec<f64> = (0..cols).map(|i| h[i * cols + i]).collect();
                        let mut p = w.to_vec();
                        let keep = prune::wanda(&mut p, cols, &diag, pattern).map_err(fail)?;
                        (p, keep)
                    };
                    Ok(Some((Calibrated::Pruned { values: pruned.clone(), keep }, pruned)))
                },
            );
            let mut obs = Checkpointed::new(obs, saver, unseen);
            llama.trace_from(&windows, &mut obs, &tick, start)?;
            let mut obs = obs.inner;
            (obs.out, std::mem::take(&mut obs.unseen))
        }
    };
    bar.finish_and_clear();
    Ok(out)
}

/// Format tag of a calibration checkpoint's `state.json`.
pub const CHECKPOINT_FORMAT: &str = "mcompress-calibration-checkpoint/1";

/// A calibrated pass's checkpoint: every result in `results.bin` as it is produced, and, after a
/// block at most every `interval` (and after the last block), the windows' residual streams
/// entering the next block (`streams-<block>.bin`) with `state.json` naming them, each written
/// to a temporary name and renamed, so a kill at any point leaves the last complete checkpoint.
/// A resumed run reads it, cuts `results.bin` back to what the state recorded and runs the
/// remaining blocks: the same results, byte for byte, as an uninterrupted run.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The directory (absent, empty or a checkpoint: [`Checkpoint::problem`]).
    pub dir: std::path::PathBuf,
    /// What the checkpoint must have been made with (model, recipe passes up to this one): a
    /// checkpoint of anything else is refused on resume.
    pub fingerprint: String,
    /// Continue from the checkpoint if there is one (else start over).
    pub resume: bool,
    /// Stop after this many blocks run by this process, leaving a checkpoint (tests).
    pub stop_after: Option<usize>,
    /// Least time between two saves of the streams.
    pub interval: std::time::Duration,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    format: String,
    fingerprint: String,
    /// The last block finished.
    block: usize,
    /// The streams entering block `block + 1`.
    streams: String,
    results_len: u64,
    records: Vec<(String, mcompress_format::results::Record)>,
    unseen: Vec<String>,
}

fn is_checkpoint_file(name: &str) -> bool {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    base == "state.json"
        || base == "results.bin"
        || base
            .strip_prefix("streams-")
            .and_then(|b| b.strip_suffix(".bin"))
            .is_some_and(|n| n.parse::<usize>().is_ok())
}

impl Checkpoint {
    /// Why `dir` cannot hold a calibration checkpoint: something else in it (a checkpoint
    /// replaces the directory's contents), or not a directory. `None`: absent, empty or ours.
    pub fn problem(dir: &std::path::Path) -> Option<String> {
        mcompress_core::fsutil::own_dir_problem(dir, "calibration checkpoint", is_checkpoint_file)
    }

    /// The checkpoint's files (to remove once the bundles are written).
    pub fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| is_checkpoint_file(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect()
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Model(format!("calibration checkpoint {}: {what}: {e}", self.dir.display()))
    }

    /// The results store, the layers rewritten without data so far and where the trace starts:
    /// from the saved state when resuming (its fingerprint must match), else from nothing (the
    /// directory's checkpoint files removed).
    fn open(&self, windows: &[Vec<u32>], hidden: usize) -> Result<(crate::Results, Vec<String>, Option<TraceStart>)> {
        if let Some(p) = Checkpoint::problem(&self.dir) {
            return Err(self.err("unusable", p));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| self.err("creating it", e))?;
        let state_path = self.dir.join("state.json");
        let results_file = |truncate: bool| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(truncate)
                .read(true)
                .write(true)
                .open(self.dir.join("results.bin"))
                .map_err(|e| self.err("results.bin", e))
        };
        if self.resume && state_path.exists() {
            let bytes =
                mcompress_core::fsutil::read_regular(&state_path, 1 << 30).map_err(|e| self.err("state.json", e))?;
            let state: State = serde_json::from_slice(&bytes).map_err(|e| self.err("state.json", e))?;
            if state.format != CHECKPOINT_FORMAT || state.fingerprint != self.fingerprint {
                return Err(self.err(
                    "state.json",
                    "made with another model or other pass settings; run without --resume to start over",
                ));
            }
            let results = crate::Results::persistent(results_file(false)?, state.results_len, state.records)
                .map_err(|e| self.err("results.bin", e))?;
            let path = self.dir.join(&state.streams);
            let want: u64 = windows.iter().map(|w| (w.len() * hidden * 4) as u64).sum();
            let bytes = mcompress_core::fsutil::read_regular(&path, want).map_err(|e| self.err(&state.streams, e))?;
            if bytes.len() as u64 != want {
                return Err(self.err(&state.streams, format!("{} bytes, expected {want}", bytes.len())));
            }
            let mut at = 0;
            let streams = windows
                .iter()
                .map(|w| {
                    let n = w.len() * hidden * 4;
                    let v = bytes[at..at + n]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    at += n;
                    v
                })
                .collect();
            return Ok((results, state.unseen, Some(TraceStart { block: state.block + 1, streams })));
        }
        for f in Checkpoint::files(&self.dir) {
            std::fs::remove_file(&f).map_err(|e| self.err("clearing it", e))?;
        }
        let results =
            crate::Results::persistent(results_file(true)?, 0, Vec::new()).map_err(|e| self.err("results.bin", e))?;
        Ok((results, Vec::new(), None))
    }
}

/// Saves a [`Checkpoint`] after blocks.
struct Saver<'a> {
    ckpt: &'a Checkpoint,
    layers: usize,
    /// Blocks run by this process, and when the streams were last saved.
    run: usize,
    last: std::time::Instant,
}

impl<'a> Saver<'a> {
    fn new(ckpt: &'a Checkpoint, layers: usize) -> Self {
        Saver { ckpt, layers, run: 0, last: std::time::Instant::now() }
    }

    fn after_block(
        &mut self,
        layer: usize,
        streams: &dyn Streams,
        results: &crate::Results,
        unseen: &[String],
    ) -> Result<()> {
        self.run += 1;
        let stop = self.ckpt.stop_after.is_some_and(|n| self.run >= n);
        if !(stop || layer + 1 == self.layers || self.last.elapsed() >= self.ckpt.interval) {
            return Ok(());
        }
        let c = self.ckpt;
        let name = format!("streams-{layer}.bin");
        let tmp = c.dir.join(format!("{name}.tmp"));
        {
            use std::io::Write;
            let f = std::fs::File::create(&tmp).map_err(|e| c.err(&name, e))?;
            let mut w = std::io::BufWriter::new(f);
            for i in 0..streams.count() {
                let bytes: Vec<u8> = streams.window(i)?.iter().flat_map(|v| v.to_le_bytes()).collect();
                w.write_all(&bytes).map_err(|e| c.err(&name, e))?;
            }
            w.flush().map_err(|e| c.err(&name, e))?;
        }
        std::fs::rename(&tmp, c.dir.join(&name)).map_err(|e| c.err(&name, e))?;
        let (results_len, records) =
            results.records().ok_or_else(|| c.err("results", "held in memory, not in the checkpoint's file"))?;
        let state = State {
            format: CHECKPOINT_FORMAT.into(),
            fingerprint: c.fingerprint.clone(),
            block: layer,
            streams: name.clone(),
            results_len,
            records,
            unseen: unseen.to_vec(),
        };
        let json = serde_json::to_vec(&state).map_err(|e| c.err("state.json", e))?;
        let tmp = c.dir.join("state.json.tmp");
        std::fs::write(&tmp, json).map_err(|e| c.err("state.json", e))?;
        std::fs::rename(&tmp, c.dir.join("state.json")).map_err(|e| c.err("state.json", e))?;
        for f in Checkpoint::files(&c.dir) {
            let n = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if n.starts_with("streams-") && n != name {
                let _ = std::fs::remove_file(&f);
            }
        }
        self.last = std::time::Instant::now();
        if stop {
            return Err(Error::Model(format!(
                "stopped after {} block(s) as asked, checkpoint saved at block {layer} in {} (--resume continues)",
                self.run,
                c.dir.display()
            )));
        }
        Ok(())
    }
}

/// What a calibration observer has produced: its results and the layers it rewrote without
/// data.
trait Outputs {
    fn outputs(&mut self) -> (&crate::Results, &mut Vec<String>);
}

impl Outputs for Rewrite<'_> {
    fn outputs(&mut self) -> (&crate::Results, &mut Vec<String>) {
        (&self.out, &mut self.unseen)
    }
}

impl Outputs for crate::quant::awq::Awq<'_> {
    fn outputs(&mut self) -> (&crate::Results, &mut Vec<String>) {
        self.outputs_mut()
    }
}

/// An observer whose results are checkpointed after each block.
struct Checkpointed<'a, O> {
    inner: O,
    saver: Option<Saver<'a>>,
}

impl<'a, O: Observer + Outputs> Checkpointed<'a, O> {
    /// `inner`, continuing from the layers a resumed checkpoint rewrote without data.
    fn new(mut inner: O, saver: Option<Saver<'a>>, unseen: Vec<String>) -> Self {
        *inner.outputs().1 = unseen;
        Checkpointed { inner, saver }
    }
}

impl<O: Observer + Outputs> Observer for Checkpointed<'_, O> {
    fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
        self.inner.input(site, x)
    }

    fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
        self.inner.rewrite(site, block)
    }

    fn rewrites(&self, name: &str) -> bool {
        self.inner.rewrites(name)
    }

    fn mixture(&mut self, input: &MixtureInput<'_>, block: &mut Block<'_>) -> Result<()> {
        self.inner.mixture(input, block)
    }

    fn block_done(&mut self, layer: usize, block: &mut Block<'_>) -> Result<()> {
        self.inner.block_done(layer, block)
    }

    fn checkpoint(&mut self, layer: usize, streams: &dyn Streams) -> Result<()> {
        let Some(saver) = &mut self.saver else { return Ok(()) };
        let (results, unseen) = self.inner.outputs();
        saver.after_block(layer, streams, results, unseen)
    }
}

/// `Σ xᵀx` over the rows of every input seen, in f64 (each call's product in f32, on the
/// calibration's device: [`Device::gram`]).
struct Hessian {
    k: usize,
    h: Vec<f64>,
    rows: usize,
}

impl Hessian {
    fn new(k: usize) -> Self {
        Hessian { k, h: vec![0f64; k * k], rows: 0 }
    }

    /// The identity: what a layer whose input had no row is rewritten with (GPTQ becomes
    /// round-to-nearest, Wanda and SparseGPT magnitude pruning).
    fn identity(k: usize) -> Vec<f64> {
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        h
    }

    fn add(&mut self, x: &[f32], device: &Device) -> Result<()> {
        let k = self.k;
        let n = x.len() / k;
        if n == 0 {
            return Ok(());
        }
        self.rows += n;
        let g = device.gram(x, k)?;
        for (h, g) in self.h.iter_mut().zip(&g) {
            *h += f64::from(*g);
        }
        Ok(())
    }
}

/// What a Hessian-based method does to one layer: `(name, weights, (out, in), Σ xᵀx)` → the
/// result to hand back and the weights the trace continues with, or `None` to leave the layer.
type RewriteFn<'a> = dyn FnMut(&str, &[f32], (usize, usize), Vec<f64>) -> std::result::Result<Option<(Calibrated, Vec<f32>)>, String>
    + 'a;

/// GPTQ, Wanda and SparseGPT on the trace: the Hessian of each site's input, then each reading
/// layer rewritten in turn (the rewritten layer is what later sites and blocks see).
struct Rewrite<'a> {
    hessian: Option<Hessian>,
    /// Where the Hessians accumulate.
    device: Device,
    /// Whether the pass rewrites a tensor: a site none of whose readers it rewrites needs no
    /// Hessian (the trace still runs it, for what later blocks read).
    wants: Box<dyn Fn(&str) -> bool + 'a>,
    f: Box<RewriteFn<'a>>,
    out: crate::Results,
    /// Layers rewritten without data (their input had no row).
    unseen: Vec<String>,
}

impl<'a> Rewrite<'a> {
    fn new(
        out: crate::Results,
        device: Device,
        wants: impl Fn(&str) -> bool + 'a,
        f: impl FnMut(&str, &[f32], (usize, usize), Vec<f64>) -> std::result::Result<Option<(Calibrated, Vec<f32>)>, String>
        + 'a,
    ) -> Self {
        Rewrite { hessian: None, device, wants: Box::new(wants), f: Box::new(f), out, unseen: Vec::new() }
    }

    fn wanted(&self, site: &Site) -> bool {
        site.readers.iter().any(|r| (self.wants)(&site.name(*r)))
    }
}

impl Observer for Rewrite<'_> {
    fn rewrites(&self, name: &str) -> bool {
        (self.wants)(name)
    }

    fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
        if self.wanted(site) {
            self.hessian.get_or_insert_with(|| Hessian::new(site.width)).add(x, &self.device)?;
        }
        Ok(())
    }

    fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
        if !self.wanted(site) {
            return Ok(());
        }
        let hessian = self.hessian.take().unwrap_or_else(|| Hessian::new(site.width));
        let seen = hessian.rows > 0;
        let h = if seen { hessian.h } else { Hessian::identity(site.width) };
        for &role in site.readers {
            let name = block.name(role);
            let shape = block.shape(role)?;
            let Some(w) = block.dense(role)? else { continue };
            let Some((result, w)) = (self.f)(&name, w, shape, h.clone()).map_err(Error::Model)? else { continue };
            block.set_weights(role, w)?;
            if !seen {
                self.unseen.push(name.clone());
            }
            self.out.insert(name, result).map_err(|e| Error::Model(e.to_string()))?;
        }
        Ok(())
    }
}
