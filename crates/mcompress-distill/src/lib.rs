//! Knowledge distillation for mcompress: trains the student (the model as the recipe's earlier
//! passes leave it) against the teacher (the model before the pipeline, or a named one) with
//! burn's autodiff, on burn's CPU backend (flex) or on a GPU through wgpu.
//!
//! - **Loss**: temperature-scaled KL divergence of the teacher's and the student's logits
//!   (`T² · KL(softmax(t/T) ‖ softmax(s/T))`, mean over rows/tokens), plus `hidden-weight` × the
//!   mean squared error of the last hidden state. BERT has no logits: its loss is
//!   `1 − cos` of the mean-pooled sentence embeddings plus the hidden term.
//! - **Masks**: when an earlier pass pruned, the zeros of every trained matrix are a mask kept
//!   fixed: each update is multiplied by it, so a 2:4 matrix leaves the training 2:4.
//! - **Optimizer**: burn's AdamW per tensor, linear warm-up then constant learning rate.
//! - **Batches** are a function of `(seed, step)` only, so a run resumed from a checkpoint sees
//!   the batches the uninterrupted run would have seen, and on the CPU produces the same bits.
//! - **Checkpoints** every `checkpoint-every` steps: the trained tensors, AdamW's moments and
//!   the loss history, written to a temporary directory and renamed into place.

mod checkpoint;
mod data;
mod nets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use burn::optim::{AdamW, AdamWConfig, AdamWState, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use mcompress_core::{DType, ModelSource};
use mcompress_eval::calibrate::Prior;
use mcompress_passes::DenseTensors;
use mcompress_passes::distill::{Distillation, TrainDevice};
use mcompress_passes::{Calibrated, ParamMeta, Pass, Plan};

use nets::{Arch, Batch, Net, Out};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model or its config cannot be trained.
    #[error("{0}")]
    Model(String),
    /// The training set is missing or unusable.
    #[error("{0}")]
    Set(String),
    /// The device could not be opened.
    #[error("{0}")]
    Device(String),
    /// A checkpoint could not be written or read.
    #[error("{0}")]
    Checkpoint(String),
    /// The training diverged or failed.
    #[error("{0}")]
    Train(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// How a distillation runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Show a progress bar with the loss.
    pub progress: bool,
    /// Continue from the checkpoint in `checkpoint_dir` if there is one.
    pub resume: bool,
    /// Where checkpoints go.
    pub checkpoint_dir: PathBuf,
    /// Leave wall-clock figures out of the outcome (reproducible bundles).
    pub reproducible: bool,
    /// Stop after this many steps in this process (a test's way to interrupt a run).
    pub stop_after: Option<usize>,
}

/// What the training produced: the trained tensors by name, for [`Pass::provide`], and what
/// it measured, for the report.
#[derive(Debug)]
pub struct Trained {
    /// Trained values.
    pub tensors: BTreeMap<String, Calibrated>,
    /// Steps, losses, device and speed.
    pub outcome: serde_json::Value,
}

/// Opens the training device: burn's flex CPU backend, or wgpu on Vulkan, Metal or DX12 (never
/// a silent fallback to OpenGL), with autodiff. Returns the device and its description.
pub fn open_device(kind: TrainDevice) -> Result<(Device, String)> {
    match kind {
        TrainDevice::Cpu => Ok((Device::flex().autodiff(), "cpu (burn flex)".into())),
        TrainDevice::Wgpu => wgpu_device(),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<(Device, String)> {
    use burn::tensor::wgpu::WgpuBackend;
    static DEVICE: std::sync::OnceLock<std::result::Result<(Device, String), String>> = std::sync::OnceLock::new();
    let r = DEVICE.get_or_init(|| {
        let mut errors = Vec::new();
        for (api, name) in [(WgpuBackend::Vulkan, "vulkan"), (WgpuBackend::Metal, "metal"), (WgpuBackend::Dx12, "dx12")]
        {
            match Device::wgpu_options().graphics_api(api).init() {
                Ok(d) => {
                    let adapter = d.identity().map_or_else(|| "unknown adapter".to_string(), |i| i.name);
                    return Ok((d, format!("wgpu {name} ({adapter})")));
                }
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(format!("no wgpu adapter on Vulkan, Metal or DX12 ({})", errors.join("; ")))
    });
    match r {
        Ok((d, s)) => Ok((d.clone().autodiff(), s.clone())),
        Err(e) => Err(Error::Device(e.clone())),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<(Device, String)> {
    Err(Error::Device("device = \"wgpu\": this mcompress was built without the wgpu feature".into()))
}

/// One trained tensor: its name, the parameter, its fixed mask, AdamW's state.
struct Trainable {
    name: String,
    param: Tensor<2>,
    mask: Option<Tensor<2>>,
    state: Option<AdamWState<2>>,
}

/// Runs the distillation `d` of `pass` on `model` (or on `prior`, the model after the recipe's
/// earlier passes).
pub fn run(
    model: &ModelSource,
    pass: &dyn Pass,
    d: &Distillation,
    prior: Option<Prior<'_>>,
    opts: &Options,
) -> Result<Trained> {
    let c = &d.config;
    let (student_config, student_tensors, keep_zeros) = match prior {
        Some(p) => {
            // Training holds the whole student: every tensor, after the earlier passes.
            let names: Vec<String> = p.tensors.shapes().into_iter().map(|(n, _)| n).collect();
            let tensors = p.tensors.load(&names).map_err(|e| Error::Model(e.to_string()))?.into_dense();
            (p.config, tensors, p.keep_zeros)
        }
        None => (
            model.config().cloned().unwrap_or_default(),
            mcompress_passes::pipeline::transformed_f32(model, &[]).map_err(|e| Error::Model(e.to_string()))?,
            false,
        ),
    };
    let teacher_source;
    let teacher_model = match &c.teacher {
        Some(path) => {
            teacher_source = ModelSource::open(path).map_err(|e| Error::Model(format!("teacher: {e}")))?;
            &teacher_source
        }
        None => model,
    };
    let teacher_config = teacher_model.config().cloned().unwrap_or_default();
    let teacher_tensors: DenseTensors = mcompress_passes::pipeline::transformed_f32(teacher_model, &[])
        .map_err(|e| Error::Model(format!("teacher: {e}")))?;

    let student_arch = Arch::from_config(&student_config)?;
    let teacher_arch = Arch::from_config(&teacher_config).map_err(|e| Error::Model(format!("teacher: {e}")))?;
    if std::mem::discriminant(&student_arch) != std::mem::discriminant(&teacher_arch) {
        return Err(Error::Model("teacher and student are different architectures".into()));
    }
    let (device, device_name) = open_device(d.device)?;
    let data = data::Data::load(model, &student_arch, &student_config, c)?;

    // Which tensors train: those the pass plans to change.
    let names: Vec<String> = student_tensors
        .iter()
        .filter(|(n, (shape, _))| {
            matches!(pass.plan(n, &ParamMeta::Dense { dtype: DType::F32, shape: shape.clone() }), Plan::Change(_))
                && shape.len() <= 2
        })
        .map(|(n, _)| n.clone())
        .collect();
    if names.is_empty() {
        return Err(Error::Model("no tensor selected for training (targets / ignore)".into()));
    }
    let trained_params: usize = names.iter().map(|n| student_tensors[n].1.len()).sum();
    // The teacher runs without autodiff (its outputs are constants to the student's graph);
    // batches live there too.
    let inner = device.clone().inner();
    let teacher =
        Net::load(teacher_arch, &teacher_tensors, &inner).map_err(|e| Error::Model(format!("teacher: {e}")))?;
    drop(teacher_tensors);
    let mut student =
        Net::load(student_arch, &student_tensors, &inner).map_err(|e| Error::Model(format!("student: {e}")))?;
    let mut trainables: Vec<Trainable> = names
        .iter()
        .map(|n| {
            let (shape, values) = &student_tensors[n];
            let mask = (keep_zeros && shape.len() == 2 && values.contains(&0.0)).then(|| {
                let m: Vec<f32> = values.iter().map(|v| if *v == 0.0 { 0.0 } else { 1.0 }).collect();
                Tensor::<2>::from_data(TensorData::new(m, [shape[0], shape[1]]), &inner)
            });
            Trainable { name: n.clone(), param: student.w[n].clone(), mask, state: None }
        })
        .collect();
    let masked = trainables.iter().filter(|t| t.mask.is_some()).count();
    drop(student_tensors);

    let fingerprint = checkpoint::fingerprint(c, &names);
    let mut losses: Vec<f64> = Vec::with_capacity(c.steps);
    let mut start = 0;
    let mut resumed_from = None;
    let mut initial = None;
    if opts.resume
        && let Some(ck) = checkpoint::load(&opts.checkpoint_dir, &fingerprint, &inner)?
    {
        start = ck.step;
        losses = ck.losses;
        resumed_from = Some(ck.step);
        initial = ck.loss_before;
        for t in &mut trainables {
            let (p, state) = ck.tensors.get(&t.name).cloned().ok_or_else(|| {
                Error::Checkpoint(format!("{}: {} missing from the checkpoint", opts.checkpoint_dir.display(), t.name))
            })?;
            t.param = p;
            t.state = state;
        }
    }
    for t in &mut trainables {
        t.param = t.param.clone().inner().autodiff().require_grad();
        student.w.insert(t.name.clone(), t.param.clone());
    }

    let optim: AdamW = AdamWConfig::new().with_weight_decay(c.weight_decay as f32).with_epsilon(1e-8).build();
    let bar = if opts.progress {
        let b = ProgressBar::new(c.steps as u64);
        b.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ({per_sec}, eta {eta})")
                .expect("template")
                .progress_chars("=> "),
        );
        b.set_prefix(format!("distill on {device_name}"));
        b.set_position(start as u64);
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let end = opts.stop_after.map_or(c.steps, |s| (start + s).min(c.steps));
    if start == 0 {
        initial = Some(loss_only(&teacher, &student, &data, c, 0, &inner)?);
    }
    for step in start..end {
        let batch = data.batch(step, c, &inner);
        let t_out = teacher.forward(&batch)?;
        let s_out = student.forward(&batch)?;
        let loss = loss(&t_out, &s_out, &batch, c)?;
        let value = f64::from(loss.clone().into_scalar::<f32>());
        if !value.is_finite() {
            return Err(Error::Train(format!("step {}: loss is {value} (lower lr)", step + 1)));
        }
        let grads = loss.backward();
        let lr = if c.warmup > 0 && step < c.warmup { c.lr * (step + 1) as f64 / c.warmup as f64 } else { c.lr };
        for t in &mut trainables {
            let Some(g) = t.param.grad(&grads) else { continue };
            let (updated, state) = optim.step(lr, t.param.clone().inner(), g, t.state.take());
            let updated = match &t.mask {
                Some(m) => updated * m.clone(),
                None => updated,
            };
            t.state = state;
            t.param = updated.autodiff().require_grad();
            student.w.insert(t.name.clone(), t.param.clone());
        }
        losses.push(value);
        bar.set_message(format!("loss {value:.4}"));
        bar.inc(1);
        let done = step + 1;
        if c.checkpoint_every > 0 && (done % c.checkpoint_every == 0 || done == end) {
            checkpoint::save(&opts.checkpoint_dir, &fingerprint, done, &losses, initial, &trainables)?;
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let steps_run = end - start;
    if end < c.steps {
        return Err(Error::Train(format!(
            "stopped after step {end} of {}: resume with `mcompress run --resume`",
            c.steps
        )));
    }
    let final_loss = loss_only(&teacher, &student, &data, c, 0, &inner)?;

    let mut tensors = BTreeMap::new();
    for t in &trainables {
        let v: Vec<f32> = t
            .param
            .clone()
            .inner()
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::Train(format!("{}: reading back: {e:?}", t.name)))?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::Train(format!("{}: non-finite weights after training (lower lr)", t.name)));
        }
        tensors.insert(t.name.clone(), Calibrated::Dense(v));
    }
    let mean = |s: &[f64]| if s.is_empty() { None } else { Some(s.iter().sum::<f64>() / s.len() as f64) };
    let k = (losses.len() / 10).max(1);
    let timing = |v: f64| if opts.reproducible { serde_json::Value::Null } else { v.into() };
    let outcome = serde_json::json!({
        "device": device_name,
        "steps": c.steps,
        "trained_tensors": trainables.len(),
        "trained_params": trained_params,
        "masked_tensors": masked,
        "samples_seen": c.steps * c.batch,
        "loss_on_first_batch_before": initial,
        "loss_on_first_batch_after": final_loss,
        "loss_first_steps": mean(&losses[..k.min(losses.len())]),
        "loss_last_steps": mean(&losses[losses.len().saturating_sub(k)..]),
        "losses": losses.iter().map(|l| (l * 1e6).round() / 1e6).collect::<Vec<_>>(),
        "resumed_from": if opts.reproducible { None } else { resumed_from },
        "seconds": timing(seconds),
        "steps_per_second": timing(if seconds > 0.0 { steps_run as f64 / seconds } else { 0.0 }),
    });
    Ok(Trained { tensors, outcome })
}

/// The loss on step `step`'s batch without training (before/after figures).
fn loss_only(
    teacher: &Net,
    student: &Net,
    data: &data::Data,
    c: &mcompress_passes::distill::DistillConfig,
    step: usize,
    device: &Device,
) -> Result<f64> {
    let batch = data.batch(step, c, device);
    let l = loss(&teacher.forward(&batch)?, &student.forward(&batch)?, &batch, c)?;
    Ok(f64::from(l.detach().into_scalar::<f32>()))
}

/// The distillation loss (a scalar tensor).
#[allow(clippy::many_single_char_names)]
fn loss(t: &Out, s: &Out, batch: &Batch, c: &mcompress_passes::distill::DistillConfig) -> Result<Tensor<1>> {
    use burn::tensor::activation::{log_softmax, softmax};
    let mut total: Option<Tensor<1>> = None;
    let mut add = |x: Tensor<1>| {
        total = Some(match total.take() {
            Some(a) => a + x,
            None => x,
        });
    };
    match batch {
        Batch::Tokens { mask, b, t: len, .. } if t.logits.is_none() => {
            // BERT: 1 − cos of mean-pooled embeddings, masked by the attention mask.
            let h = t.hidden.dims()[1];
            let m = mask.clone().reshape([b * len, 1]);
            let pool = |x: &Tensor<2>| (x.clone() * m.clone()).reshape([*b, *len, h]).sum_dim(1).reshape([*b, h]);
            let (pt, ps) = (pool(&t.hidden.clone().detach()), pool(&s.hidden));
            let dot = (pt.clone() * ps.clone()).sum_dim(1);
            let norms = (pt.square().sum_dim(1) * ps.square().sum_dim(1)).sqrt().add_scalar(1e-12);
            add((dot / norms).mean().neg().add_scalar(1.0));
            if c.hidden_weight > 0.0 {
                let n = (mask.clone().sum().into_scalar::<f32>() as f64 * h as f64).max(1.0);
                let diff = (s.hidden.clone() - t.hidden.clone().detach()) * m;
                add(diff.square().sum().div_scalar(n).mul_scalar(c.hidden_weight));
            }
        }
        _ => {
            let (Some(tl), Some(sl)) = (&t.logits, &s.logits) else {
                return Err(Error::Model("this model has no logits to distil".into()));
            };
            let temp = c.temperature;
            let pt = softmax(tl.clone().detach().div_scalar(temp), 1);
            let log_pt = log_softmax(tl.clone().detach().div_scalar(temp), 1);
            let log_ps = log_softmax(sl.clone().div_scalar(temp), 1);
            let kl = (pt * (log_pt - log_ps)).sum_dim(1).mean();
            add(kl.mul_scalar(temp * temp));
            if c.hidden_weight > 0.0 && !matches!(batch, Batch::Rows(_)) {
                let mse = (s.hidden.clone() - t.hidden.clone().detach()).square().mean();
                add(mse.mul_scalar(c.hidden_weight));
            }
        }
    }
    total.ok_or_else(|| Error::Train("empty loss".into()))
}
