//! What each target ships: the safetensors payload and/or a GGUF file planned for it (fixed
//! types, or `policy = "fit"` with its retries).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mcompress_core::ModelSource;
use mcompress_core::arch::{Geometry, Role};
use mcompress_core::gguf::{GgmlType, GgufBuilder};
use mcompress_passes::pipeline;
use mcompress_passes::{ParamMeta, Pass};
use mcompress_recipe::{MaxSize, Policy, Recipe, TargetCalibration, TargetSection};
use serde_json::{Value, json};

use crate::gguf::{self, TensorPlan, TypePolicy};
use crate::targets::ResolvedTarget;
use crate::{Error, EvalOutcome, FileEntry, Gate, Result, fit};

/// Formats and GGUF settings of one target, validated before anything runs.
#[derive(Clone, Debug)]
pub struct Shipping {
    /// Ships the safetensors payload.
    pub safetensors: bool,
    /// Ships a GGUF, with these settings.
    pub gguf: Option<GgufSpec>,
}

/// A GGUF target's settings.
#[derive(Clone, Debug)]
pub struct GgufSpec {
    /// `gguf-type` (fixed policy).
    fixed: Option<TypePolicy>,
    /// What the report calls the policy (`Q4_K_M`, `fit`).
    label: String,
    fit_types: Vec<GgmlType>,
    tries: u32,
    calibration: Option<TargetCalibration>,
    /// Activation statistics from `calibration` (see [`GgufSpec::set_moments`]).
    moments: BTreeMap<String, Vec<f32>>,
}

impl GgufSpec {
    /// The fit policy's calibration text, whose activation statistics weigh each tensor's
    /// quantization error; `None`: unweighted.
    pub fn calibration(&self) -> Option<&TargetCalibration> {
        self.calibration.as_ref()
    }

    /// Hands the fit policy `E[x_c²]` of every input column of every linear layer, by weight
    /// name, measured on [`GgufSpec::calibration`].
    pub fn set_moments(&mut self, moments: BTreeMap<String, Vec<f32>>) {
        self.moments = moments;
    }
}

impl Shipping {
    /// Target `i`'s formats and GGUF settings, checked.
    pub fn of(recipe: &Recipe, i: usize, t: &TargetSection) -> Result<Self> {
        let err = |m: String| Error::Recipe(recipe.target_error(i, m));
        let formats = t.formats.clone().unwrap_or_else(|| vec!["safetensors".into()]);
        let mut safetensors = false;
        let mut want_gguf = false;
        for f in &formats {
            match f.as_str() {
                "safetensors" => safetensors = true,
                "gguf" => want_gguf = true,
                other => {
                    return Err(err(format!(
                        "formats: unknown format {other:?} (mcompress writes \"safetensors\" and \"gguf\")"
                    )));
                }
            }
        }
        if !safetensors && !want_gguf {
            return Err(err("formats: name at least one of \"safetensors\", \"gguf\"".into()));
        }
        let policy = t.policy.unwrap_or_default();
        if !want_gguf {
            if t.gguf_type.is_some() || policy == Policy::Fit {
                return Err(err(
                    "gguf-type and policy = \"fit\" choose GGUF tensor types: add \"gguf\" to this target's formats"
                        .into(),
                ));
            }
            return Ok(Shipping { safetensors, gguf: None });
        }
        let fixed = match (&t.gguf_type, policy) {
            (Some(_), Policy::Fit) => {
                return Err(err("gguf-type and policy = \"fit\" exclude each other (fit-types lists fit's choices)".into()));
            }
            (Some(s), Policy::Fixed) => Some(TypePolicy::parse(s).ok_or_else(|| {
                err(format!(
                    "gguf-type {s:?}: expected a ggml type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F16, BF16, F32) or a mix (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S)"
                ))
            })?),
            (None, Policy::Fixed) => Some(TypePolicy::Uniform(GgmlType::Q8_0)),
            (None, Policy::Fit) => None,
        };
        if policy == Policy::Fixed && (t.fit_types.is_some() || t.fit_tries.is_some() || t.calibration.is_some()) {
            return Err(err("fit-types, fit-tries and calibration belong to policy = \"fit\"".into()));
        }
        let fit_types = match &t.fit_types {
            Some(names) => names
                .iter()
                .map(|n| GgmlType::from_name(n).ok_or_else(|| err(format!("fit-types: unknown ggml type {n:?}"))))
                .collect::<Result<Vec<_>>>()?,
            None => vec![
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q5_0,
                GgmlType::Q5_1,
                GgmlType::Q8_0,
                GgmlType::Q4_K,
                GgmlType::Q5_K,
                GgmlType::Q6_K,
                GgmlType::F16,
            ],
        };
        if fit_types.is_empty() {
            return Err(err("fit-types: list at least one type".into()));
        }
        let tries = t.fit_tries.unwrap_or(3);
        if !(1..=10).contains(&tries) {
            return Err(err(format!("fit-tries = {tries}: expected 1 to 10")));
        }
        if policy == Policy::Fit {
            if t.max_size.is_none() {
                return Err(err(
                    "policy = \"fit\" needs max-size (a size, or \"auto\" with the target's memory)".into()
                ));
            }
            if safetensors {
                return Err(err(
                    "policy = \"fit\" sizes a GGUF-only bundle: use formats = [\"gguf\"] and ship safetensors from another target"
                        .into(),
                ));
            }
        }
        if let Some(c) = &t.calibration {
            if c.samples == Some(0) || c.seq_len.is_some_and(|n| n < 2) {
                return Err(err("calibration: samples must be at least 1 and seq-len at least 2".into()));
            }
            if !c.set.is_file() {
                return Err(err(format!("calibration.set {}: file does not exist", c.set.display())));
            }
        }
        let label = t
            .gguf_type
            .clone()
            .map_or_else(|| if fixed.is_some() { "Q8_0".into() } else { "fit".into() }, |s| s.to_ascii_uppercase());
        Ok(Shipping {
            safetensors,
            gguf: Some(GgufSpec {
                fixed,
                label,
                fit_types,
                tries,
                calibration: t.calibration.clone(),
                moments: BTreeMap::new(),
            }),
        })
    }
}

/// A target's finished files and evals, before its report.
pub struct Shipped {
    /// Staged bundle directory.
    pub dir: PathBuf,
    /// Deployable files with their hashes.
    pub files: BTreeMap<String, FileEntry>,
    /// Formats shipped (`safetensors`, `gguf`).
    pub formats: Vec<&'static str>,
    /// Bytes of the weight files.
    pub weights_bytes: u64,
    /// Weight dtypes checked against the target's `weight-dtypes` (safetensors only).
    pub dtypes: Vec<String>,
    /// Every weight dtype shipped, for the estimates.
    pub est_dtypes: Vec<String>,
    /// Bytes of the deployable files.
    pub bytes: u64,
    /// The report's `eval` object.
    pub eval_json: Option<Value>,
    /// The eval's `max-drop` gate.
    pub eval_gate: Option<Gate>,
    /// The report's `gguf` object.
    pub gguf_json: Option<Value>,
}

/// `policy = "fit"` state.
struct FitState {
    items: Vec<fit::Item>,
    chosen: Vec<usize>,
    /// Bytes the 2-D tensors may take.
    budget: u64,
    limit: u64,
    log: Vec<Value>,
}

/// A GGUF file being made for one target.
pub struct GgufTarget {
    /// The file's metadata (tokenizer and llama keys from the config as the passes leave it);
    /// `general.file_type` is set when the types are known.
    meta: GgufBuilder,
    name: String,
    spec: GgufSpec,
    plans: BTreeMap<String, TensorPlan>,
    types: BTreeMap<String, GgmlType>,
    fit: Option<FitState>,
}

/// Slack per tensor for alignment padding (GGUF aligns each tensor to 32 bytes).
const PAD: u64 = 32;

impl GgufTarget {
    /// Plans the file: every tensor's type (fit: solved under the budget).
    pub fn plan(
        recipe: &Recipe,
        index: usize,
        model: &ModelSource,
        params: &BTreeMap<String, ParamMeta>,
        passes: &[Box<dyn Pass>],
        spec: &GgufSpec,
        resolved: &ResolvedTarget,
    ) -> Result<Self> {
        let target = &recipe.targets[index];
        let err = |m: String| Error::Recipe(recipe.target_error(index, m));
        // The config as the passes leave it: head counts (Q/K permutation) and block count
        // follow structured pruning.
        let config = pipeline::output_config(model, passes).unwrap_or_default();
        let plans = gguf::tensor_plans(&config, params).map_err(|e| err(format!("gguf: {e}")))?;
        let geometry = Geometry::from_config(&config).map_err(|e| err(format!("gguf: {e}")))?;
        let (n_layer, family) = (geometry.layers, geometry.family);
        // Built once, before anything streams: metadata problems (missing config keys, an
        // unsupported tokenizer) are errors here.
        let meta = gguf::metadata(model, &config, 0).map_err(|e| err(format!("gguf: {e}")))?;
        let mut me = GgufTarget {
            meta,
            name: target.name.clone(),
            spec: spec.clone(),
            plans,
            types: BTreeMap::new(),
            fit: None,
        };
        if let Some(p) = spec.fixed {
            me.types = me
                .plans
                .iter()
                .map(|(n, tp)| {
                    (n.clone(), p.choose(tp.role, &tp.dims, tp.layer, (n_layer, geometry.experts), tp.output))
                })
                .collect();
            return Ok(me);
        }
        // policy = "fit".
        let limit = match target.max_size {
            Some(MaxSize::Bytes(b)) => b.0,
            _ => crate::targets::fit(resolved, 0, &[], &[], crate::targets::KvGeometry::from_config(Some(&config)))
                .weights_budget_bytes
                .ok_or_else(|| err("max-size = \"auto\" needs the target's memory".into()))?,
        };
        // `E[x²]` per input column from the target's calibration text (set by the orchestrator,
        // which runs the model; none: every column weighs the same).
        let moments = &spec.moments;
        // Header size does not depend on the types; 1-D tensors stay F32.
        let all_f32: BTreeMap<String, GgmlType> = me.plans.keys().map(|k| (k.clone(), GgmlType::F32)).collect();
        let header = gguf::plan_file(me.meta.clone(), &me.plans, all_f32).map_err(&err)?.layout.header_bytes();
        let mut fixed = header;
        let mut items: Vec<fit::Item> = Vec::new();
        // A GGUF stack of experts is one tensor of one type: its experts are one item, their
        // bytes and errors summed.
        let mut stacks: BTreeMap<String, usize> = BTreeMap::new();
        for r in model.tensors() {
            let v = model.view(r);
            let Some(tp) = me.plans.get(v.name) else { continue };
            let n: u64 = tp.dims.iter().product();
            // Vectors, and routers (llama.cpp keeps ffn_gate_inp in F32), stay F32.
            if tp.dims.len() < 2 || tp.role == Role::Router {
                fixed += n * 4 + PAD;
                continue;
            }
            let w = v.to_f32().ok_or_else(|| err(format!("tensor {:?} is not a float tensor", v.name)))?;
            model.release(r);
            let allowed: Vec<GgmlType> =
                spec.fit_types.iter().copied().filter(|ty| tp.dims[0] % ty.block().0 as u64 == 0).collect();
            if allowed.is_empty() {
                return Err(err(format!("fit-types: none divides the {}-element rows of {:?}", tp.dims[0], v.name)));
            }
            // The moments of the head's inputs are filed under its own name, also when the
            // embedding stands in for it.
            let head = tp.output.then(|| family.hf(Role::Output, 0));
            let key = head.as_deref().unwrap_or(v.name);
            let m = moments.get(key).filter(|m| m.len() == tp.dims[0] as usize);
            let errs = fit::errors(&w, tp.dims[0] as usize, m.map(Vec::as_slice), &allowed);
            // An expert's share of its stack (`n` counts the whole stack); a later expert of a
            // stack already listed adds its bytes and errors to the stack's item.
            let elems = tp.elements() as usize;
            if let Some(&i) = tp.expert.and(stacks.get(&tp.gguf)) {
                let item = &mut items[i];
                for (c, e) in item.choices.iter_mut().zip(errs) {
                    c.1 += mcompress_core::ggml::nbytes(c.0, elems) as u64;
                    c.2 += e;
                }
                item.members.push(v.name.to_string());
                continue;
            }
            if tp.expert.is_some() {
                stacks.insert(tp.gguf.clone(), items.len());
            }
            let choices = allowed
                .iter()
                .zip(errs)
                .map(|(&ty, e)| (ty, mcompress_core::ggml::nbytes(ty, elems) as u64 + PAD, e))
                .collect();
            items.push(fit::Item { name: v.name.to_string(), choices, weight: 1.0, members: Vec::new() });
        }
        let smallest: u64 = fixed + items.iter().map(|i| i.choices.iter().map(|c| c.1).min().unwrap_or(0)).sum::<u64>();
        let budget = limit.saturating_sub(fixed);
        let chosen = fit::solve(&items, budget).ok_or_else(|| {
            err(format!(
                "policy = \"fit\": max-size {} is below the smallest GGUF these fit-types allow ({})",
                mcompress_recipe::ByteSize(limit),
                mcompress_recipe::ByteSize(smallest)
            ))
        })?;
        me.types = me.plans.keys().map(|k| (k.clone(), GgmlType::F32)).collect();
        me.types.extend(fit::types_of(&items, &chosen));
        me.fit = Some(FitState { items, chosen, budget, limit, log: Vec::new() });
        Ok(me)
    }

    /// The metadata with `general.file_type` for the current types.
    fn metadata(&self) -> GgufBuilder {
        // Under fit, the type holding the most parameters names the file.
        let ftype = if let Some(p) = self.spec.fixed {
            p.ftype()
        } else {
            let mut by: BTreeMap<u32, u64> = BTreeMap::new();
            for (n, t) in &self.types {
                let p = &self.plans[n];
                if p.dims.len() >= 2 {
                    // One expert counts its share of its stack.
                    *by.entry(gguf::ftype_of(*t)).or_default() += p.elements();
                }
            }
            by.into_iter().max_by_key(|(f, p)| (*p, *f)).map_or(0, |(f, _)| f)
        };
        let mut meta = self.meta.clone();
        meta.replace_u32("general.file_type", ftype);
        meta
    }

    /// The pipeline sink writing this target's file at `path`.
    pub fn sink(&self, path: &Path) -> Result<gguf::GgufSink> {
        let planned = gguf::plan_file(self.metadata(), &self.plans, self.types.clone())
            .map_err(|e| Error::Export(format!("target {}: gguf: {e}", self.name)))?;
        gguf::GgufSink::create(path, planned, self.plans.clone())
    }

    /// Evaluates the written file; under `fit`, on a failed gate raises the most sensitive
    /// tensors, re-solves, rewrites the file and evaluates again (at most `fit-tries` in all).
    pub fn evaluate(
        &mut self,
        model: &ModelSource,
        passes: &[Box<dyn Pass>],
        file: &Path,
        eval: &mut dyn FnMut(&Path) -> Result<EvalOutcome>,
    ) -> Result<EvalOutcome> {
        for attempt in 1..=self.spec.tries {
            let (e, gate, w) = eval(file)?;
            let Some(fit) = &mut self.fit else { return Ok((e, gate, w)) };
            let bytes = fs_err::metadata(file).map_err(crate::io(file))?.len();
            let mut entry = json!({
                "try": attempt,
                "bytes": bytes,
                "types": type_counts(&self.plans, &self.types),
                "compressed": e.as_ref().map(|e| e["compressed"].clone()),
                "passed": gate.as_ref().is_none_or(|g| g.passed),
            });
            let failed = gate.as_ref().is_some_and(|g| !g.passed);
            if !failed || attempt == self.spec.tries {
                fit.log.push(entry);
                return Ok((e, gate, w));
            }
            let raised = fit::raise(&mut fit.items, &fit.chosen, 0.1, 4.0);
            let next = fit::solve(&fit.items, fit.budget).unwrap_or_else(|| fit.chosen.clone());
            entry["raised"] = json!(raised);
            if next == fit.chosen {
                entry["note"] = json!("no other choice within max-size: stopping");
                fit.log.push(entry);
                return Ok((e, gate, w));
            }
            fit.log.push(entry);
            fit.chosen = next;
            self.types.extend(fit::types_of(&fit.items, &fit.chosen));
            let mut sink = self.sink(file)?;
            pipeline::run(model, passes, None, &mut [&mut sink], false, &mut |_| {})?;
        }
        unreachable!("the loop returns on its last try")
    }

    /// The report's `gguf` object.
    pub fn summary(&self, bytes: u64) -> Value {
        let tries = self.fit.as_ref().map(|f| json!({"max_size": f.limit, "tries": f.log, "solver": "multiple-choice knapsack, dynamic programming over a 16384-cell byte grid (sizes rounded up)"}));
        gguf::summary(&self.spec.label, &self.plans, &self.types, bytes, tries.as_ref())
    }

    /// Weight dtype names for the fit check and estimates (`int4`, `int5`, `int6`, `int8`, floats).
    pub fn dtypes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .types
            .values()
            .map(|t| match t {
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => "int4".into(),
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => "int5".into(),
                GgmlType::Q6_K => "int6".into(),
                GgmlType::Q8_0 => "int8".into(),
                other => other.name().to_ascii_lowercase(),
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn type_counts(plans: &BTreeMap<String, TensorPlan>, types: &BTreeMap<String, GgmlType>) -> Value {
    let mut c: BTreeMap<&str, u64> = BTreeMap::new();
    for n in plans.keys() {
        *c.entry(types[n].name()).or_default() += 1;
    }
    json!(c)
}
