//! GGUF export: a file of the model's architecture (llama, qwen2, gemma3) that llama.cpp loads,
//! from the pipeline's output.
//!
//! - Names and layout: Hugging Face names map to llama.cpp's (`blk.N.attn_q.weight`, ...) through
//!   the architecture table ([`mcompress_core::arch`]); llama's Q and K rows are permuted back to
//!   llama.cpp's rotary layout, Gemma's norms stored as `1 + w`; dims are written innermost first.
//! - Types: [`TypePolicy`] applies a ggml type or a llama.cpp mix per tensor the way
//!   `llama-quantize` does (norms F32; the output matrix, or the tied token embedding, Q6_K;
//!   `attn_v`/`ffn_down` raised in the `_M` mixes; k-quants fall back to Q5_0/Q5_1/Q8_0 when a
//!   row is not a multiple of 256), or `policy = "fit"` chooses per tensor (see [`crate::fit`]).
//! - Metadata: a GGUF source's metadata is copied with its exact types (tokenizer included), then
//!   the architecture keys are set from config.json; other sources get the tokenizer from
//!   tokenizer.json (byte-level BPE).
//! - Data: each tensor streams from the pipeline ([`Sink`]) through ggml's reference quantizers
//!   ([`mcompress_core::ggml`]) to its planned offset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mcompress_core::arch::{DECODERS, Family, Geometry, Role};
use mcompress_core::gguf::{GgmlType, GgufBuilder, GgufLayout, GgufWriter};
use mcompress_core::{ModelSource, ggml};
use mcompress_passes::pipeline::Sink;
use mcompress_passes::{Param, ParamMeta};
use serde_json::Value;

/// How tensor types are chosen for a fixed `gguf-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TypePolicy {
    /// One ggml type for every matrix (output matrix raised to Q6_K as llama.cpp does).
    Uniform(GgmlType),
    /// llama.cpp's `Q4_K_M` / `Q5_K_M` (`base` Q4_K / Q5_K).
    KMedium(GgmlType),
    /// llama.cpp's `Q4_K_S` / `Q5_K_S`.
    KSmall(GgmlType),
}

impl TypePolicy {
    /// Parses a `gguf-type` value.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let u = s.to_ascii_uppercase();
        Some(match u.as_str() {
            "Q4_K_M" => TypePolicy::KMedium(GgmlType::Q4_K),
            "Q5_K_M" => TypePolicy::KMedium(GgmlType::Q5_K),
            "Q4_K_S" => TypePolicy::KSmall(GgmlType::Q4_K),
            "Q5_K_S" => TypePolicy::KSmall(GgmlType::Q5_K),
            _ => TypePolicy::Uniform(GgmlType::from_name(&u)?),
        })
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`) for this policy.
    pub(crate) fn ftype(self) -> u32 {
        match self {
            TypePolicy::Uniform(t) => ftype_of(t),
            TypePolicy::KMedium(GgmlType::Q5_K) => 17,
            TypePolicy::KMedium(_) => 15,
            TypePolicy::KSmall(GgmlType::Q5_K) => 16,
            TypePolicy::KSmall(_) => 14,
        }
    }

    /// The type of one tensor: `role` its place in the model, `dims` innermost first, `layer`
    /// its block, `output` whether it is the output matrix (or the embedding tied to it),
    /// `n_expert` the experts per block (0 for a dense model).
    pub(crate) fn choose(
        self,
        role: Role,
        dims: &[u64],
        layer: Option<usize>,
        (n_layer, n_expert): (usize, usize),
        output: bool,
    ) -> GgmlType {
        // Routers stay F32: convert_hf_to_gguf.py writes ffn_gate_inp in F32 and llama-quantize
        // never quantizes it.
        if dims.len() < 2 || role == Role::Router {
            return GgmlType::F32;
        }
        let base = match self {
            TypePolicy::Uniform(t) | TypePolicy::KMedium(t) | TypePolicy::KSmall(t) => t,
        };
        if matches!(base, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return base;
        }
        let more_bits = |i: usize| i < n_layer / 8 || i >= 7 * n_layer / 8 || (i - n_layer / 8) % 3 == 2;
        let ty = if output {
            if base == GgmlType::Q8_0 || !dims[0].is_multiple_of(256) { GgmlType::Q8_0 } else { GgmlType::Q6_K }
        } else if n_expert == 8 && matches!(role, Role::K | Role::V) {
            // llama-quantize: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB".
            GgmlType::Q8_0
        } else {
            match (self, layer) {
                (TypePolicy::KMedium(_), Some(i))
                    if matches!(role, Role::V | Role::Down | Role::ExpertDown) && more_bits(i) =>
                {
                    GgmlType::Q6_K
                }
                // llama-quantize raises a fused attn_qkv one step in the medium mixes.
                (TypePolicy::KMedium(GgmlType::Q4_K), Some(_)) if role == Role::Qkv => GgmlType::Q5_K,
                (TypePolicy::KMedium(GgmlType::Q5_K), Some(_)) if role == Role::Qkv => GgmlType::Q6_K,
                (TypePolicy::KSmall(GgmlType::Q4_K), Some(i)) if role == Role::V && i < 4 => GgmlType::Q5_K,
                (TypePolicy::KSmall(GgmlType::Q4_K), Some(i))
                    if matches!(role, Role::Down | Role::ExpertDown) && i < n_layer / 8 =>
                {
                    GgmlType::Q5_K
                }
                _ => base,
            }
        };
        fallback(ty, dims[0])
    }
}

/// llama.cpp's substitute when a row is not a whole number of `ty`'s blocks.
pub(crate) fn fallback(ty: GgmlType, row: u64) -> GgmlType {
    let fits = |t: GgmlType| row.is_multiple_of(t.block().0 as u64);
    if fits(ty) {
        return ty;
    }
    let alt = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if fits(alt) { alt } else { GgmlType::F16 }
}

/// `llama_ftype` of a single type.
pub(crate) fn ftype_of(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
    }
}

/// One exported tensor.
#[derive(Clone, Debug)]
pub(crate) struct TensorPlan {
    /// llama.cpp name.
    pub gguf: String,
    /// Its role in the model.
    pub role: Role,
    /// ggml dims, innermost first.
    pub dims: Vec<u64>,
    /// Head count to permute rows over (Q, K).
    pub heads: Option<usize>,
    /// Block index.
    pub layer: Option<usize>,
    /// The output matrix, or the token embedding tied to it.
    pub output: bool,
    /// Added to every value (Gemma's norms: GGUF stores `1 + w`).
    pub offset: f32,
    /// For one expert's matrix: (its index, the experts in the stack). GGUF stacks a block's
    /// experts into one 3-D tensor (`dims` are the stack's), each expert's rows one contiguous
    /// part of it.
    pub expert: Option<(usize, usize)>,
}

impl TensorPlan {
    /// Elements of this Hugging Face tensor: the GGUF tensor's, or one expert's share of its
    /// stack.
    pub(crate) fn elements(&self) -> u64 {
        self.dims.iter().product::<u64>() / self.expert.map_or(1, |(_, n)| n.max(1) as u64)
    }
}

/// Every tensor of the pipeline's output as it goes into a GGUF, by Hugging Face name.
pub(crate) fn tensor_plans(
    config: &Value,
    params: &BTreeMap<String, ParamMeta>,
) -> Result<BTreeMap<String, TensorPlan>, String> {
    let family = Family::of_config(config).ok_or_else(|| {
        format!(
            "GGUF export writes the decoder families {DECODERS}; this model_type is {:?}",
            mcompress_core::arch::model_type(config)
        )
    })?;
    let g = Geometry::from_config(config)?;
    let tied = !params.contains_key(&family.hf(Role::Output, 0));
    let mut out = BTreeMap::new();
    for (name, meta) in params {
        let slot = family
            .slot_hf(name)
            .ok_or_else(|| format!("tensor {name:?} has no llama.cpp name in a {} model", family.gguf_arch()))?;
        let (role, layer) = (slot.role, slot.layer);
        let gguf = family.gguf(role, layer.unwrap_or(0));
        let heads = family.gguf_permute_heads(role, g.heads, g.kv_heads);
        let mut dims: Vec<u64> = meta.shape().iter().rev().map(|&d| d as u64).collect();
        let expert = slot.expert.map(|e| (e, g.experts));
        if expert.is_some() {
            dims.push(g.experts as u64);
        }
        if let Some(h) = heads
            && (dims.len() != 2 || !dims[1].is_multiple_of((2 * h.max(1)) as u64))
        {
            return Err(format!("tensor {name:?} of shape {:?} cannot be permuted over {h} heads", meta.shape()));
        }
        let output = role == Role::Output || (tied && role == Role::Embed);
        out.insert(
            name.clone(),
            TensorPlan { gguf, role, dims, heads, layer, output, offset: family.gguf_offset(role), expert },
        );
    }
    Ok(out)
}

/// The file's metadata: a GGUF source's keys (exact types), then the llama keys from config.json,
/// and a tokenizer from tokenizer.json where the source had none.
pub(crate) fn metadata(model: &ModelSource, config: &Value, ftype: u32) -> Result<GgufBuilder, String> {
    let mut b = GgufBuilder::new();
    for (k, ty, payload) in model.gguf_raw_metadata() {
        if !matches!(k, "general.alignment" | "general.file_type" | "general.quantization_version") {
            b.raw(k, ty, payload);
        }
    }
    let c = config;
    let family = Family::of_config(c).ok_or_else(|| format!("GGUF export needs a decoder config.json ({DECODERS})"))?;
    let arch = family.gguf_arch();
    let key = |k: &str| format!("{arch}.{k}");
    b.string("general.architecture", arch);
    if !b.has("general.name") {
        let name = model.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        b.string("general.name", &name);
    }
    b.u32("general.file_type", ftype);
    b.u32("general.quantization_version", 2);
    let g = Geometry::from_config(c)?;
    let dim = |v: usize| u32::try_from(v).map_err(|_| format!("config.json: {v} does not fit a 32-bit GGUF key"));
    let (hidden, heads) = (dim(g.hidden)?, dim(g.heads)?);
    b.u32(&key("context_length"), dim(g.max_positions)?);
    b.u32(&key("embedding_length"), hidden);
    b.u32(&key("block_count"), dim(g.layers)?);
    b.u32(&key("feed_forward_length"), dim(g.intermediate)?);
    b.u32(&key("attention.head_count"), heads);
    b.u32(&key("attention.head_count_kv"), dim(g.kv_heads)?);
    let head_dim = dim(g.head_dim)?;
    b.u32(&key("rope.dimension_count"), head_dim);
    if head_dim * heads != hidden && family.gguf_query_spans_hidden() {
        // llama.cpp's phi3 graph reads the key part of attn_qkv at row embedding_length and
        // sizes the tensor from it: a Phi-3 whose query part is narrower would load wrongly.
        return Err(format!(
            "GGUF export of a {} with {heads} heads of {head_dim} (attention width {}, hidden size {hidden}): \
             llama.cpp's phi3 reads the fused attn_qkv as if the query part were hidden_size wide; \
             export safetensors instead (structured pruning of neurons and layers keeps Phi-3 GGUF-loadable)",
            family.model_type(),
            head_dim * heads,
        ));
    }
    if head_dim * heads != hidden || family == Family::Gemma3 {
        // A head width other than embedding_length / head_count (heads removed by structured
        // pruning, Gemma's 256): llama.cpp takes it from these.
        b.u32(&key("attention.key_length"), head_dim);
        b.u32(&key("attention.value_length"), head_dim);
    }
    if !g.gguf_layer_pattern_ok() {
        return Err("GGUF export of Gemma 3: llama.cpp assumes every sixth layer attends globally, and this \
                    model's layer_types (after layer removal) differ; export safetensors instead"
            .into());
    }
    if family.gguf_sliding_window()
        && let Some(w) = g.windows.iter().flatten().next()
    {
        b.u32(&key("attention.sliding_window"), dim(*w)?);
    }
    #[allow(clippy::cast_possible_truncation)]
    {
        b.f32(&key("rope.freq_base"), g.rope_theta as f32);
        b.f32(&key("attention.layer_norm_rms_epsilon"), g.eps as f32);
    }
    if family.gguf_arch() == "llama" {
        b.u32(&key("vocab_size"), dim(g.vocab)?);
    }
    if g.experts > 0 {
        b.u32(&key("expert_count"), dim(g.experts)?);
        b.u32(&key("expert_used_count"), dim(g.experts_used)?);
        if family == Family::Qwen3Moe {
            b.u32(&key("expert_feed_forward_length"), dim(g.intermediate)?);
        }
    }
    if !b.has("tokenizer.ggml.model") {
        let tok = model
            .aux_files()
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == "tokenizer.json"))
            .ok_or("GGUF export needs the model's tokenizer (tokenizer.json beside config.json)")?;
        let text = mcompress_core::fsutil::read_regular(tok, 1 << 28).map_err(|e| format!("{}: {e}", tok.display()))?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", tok.display()))?;
        bpe_tokenizer(&json, &text, c, &mut b).map_err(|e| format!("{}: {e}", tok.display()))?;
    }
    Ok(b)
}

/// llama.cpp's `gpt2` tokenizer keys from a byte-level BPE tokenizer.json (what
/// convert_hf_to_gguf.py writes for such models, `tokenizer.ggml.pre` by [`bpe_pre`]).
fn bpe_tokenizer(t: &Value, bytes: &[u8], config: &Value, b: &mut GgufBuilder) -> Result<(), String> {
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(format!(
            "tokenizer model {:?}: GGUF export converts byte-level BPE tokenizers only",
            model["type"].as_str().unwrap_or("?")
        ));
    }
    if !t["pre_tokenizer"].to_string().contains("ByteLevel") {
        return Err("not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer)".into());
    }
    let vocab = model["vocab"].as_object().ok_or("model.vocab is not an object")?;
    let added = t["added_tokens"].as_array().cloned().unwrap_or_default();
    let max_id = vocab
        .values()
        .filter_map(Value::as_u64)
        .chain(added.iter().filter_map(|a| a["id"].as_u64()))
        .max()
        .ok_or("empty vocabulary")?;
    let n = usize::try_from(max_id).map_err(|_| "vocabulary too large")? + 1;
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![5i32; n];
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or("vocab ids must be integers")? as usize;
        tokens[id].clone_from(tok);
        types[id] = 1;
    }
    for a in &added {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
        tokens[id as usize] = content.to_string();
        types[id as usize] = if a["special"].as_bool() == Some(true) { 3 } else { 4 };
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(p) => Some(p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    b.string("tokenizer.ggml.model", "gpt2");
    b.string("tokenizer.ggml.pre", bpe_pre(bytes)?);
    b.strings("tokenizer.ggml.tokens", &tokens);
    b.i32s("tokenizer.ggml.token_type", &types);
    b.strings("tokenizer.ggml.merges", &merges);
    for (key, cfg) in [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")] {
        if let Some(id) = config[cfg].as_u64().and_then(|v| u32::try_from(v).ok()) {
            b.u32(&format!("tokenizer.ggml.{key}_token_id"), id);
        }
    }
    Ok(())
}

/// llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, decided as llama.cpp's
/// converter decides it: the sha256 of the ids the tokenizer gives
/// [`arch::GGUF_BPE_CHECK_TEXT`](mcompress_core::arch::GGUF_BPE_CHECK_TEXT), looked up in
/// [`arch::GGUF_BPE_PRE`](mcompress_core::arch::GGUF_BPE_PRE). An unknown pre-tokenizer is an
/// error: under another name llama.cpp would split the text differently from the model's own
/// tokenizer, and every figure measured on it would be wrong.
fn bpe_pre(bytes: &[u8]) -> Result<&'static str, String> {
    use sha2::Digest;
    let tok = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| format!("cannot load the tokenizer: {e}"))?;
    let enc = tok
        .encode(mcompress_core::arch::GGUF_BPE_CHECK_TEXT, true)
        .map_err(|e| format!("cannot tokenize llama.cpp's check text: {e}"))?;
    let list = enc.get_ids().iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let hash = hex::encode(sha2::Sha256::digest(format!("[{list}]")));
    mcompress_core::arch::GGUF_BPE_PRE.iter().find(|(h, _)| *h == hash).map(|(_, name)| *name).ok_or_else(|| {
        let known: Vec<&str> = mcompress_core::arch::GGUF_BPE_PRE.iter().map(|(_, n)| *n).collect();
        format!(
            "byte-level BPE pre-tokenizer not recognised (llama.cpp's check hash {hash}; known: {}): llama.cpp \
             would split text differently from this tokenizer; export safetensors instead",
            known.join(", ")
        )
    })
}

/// The planned file: layout and each tensor's type.
pub(crate) struct Planned {
    pub layout: GgufLayout,
    pub types: BTreeMap<String, GgmlType>,
}

/// Adds the tensor directory to `meta` with the given types.
pub(crate) fn plan_file(
    mut meta: GgufBuilder,
    plans: &BTreeMap<String, TensorPlan>,
    types: BTreeMap<String, GgmlType>,
) -> Result<Planned, String> {
    // llama.cpp's own order: embeddings, blocks in order, then the head.
    let mut order: Vec<(&String, &TensorPlan)> = plans.iter().collect();
    order.sort_by_key(|(_, p)| {
        (p.layer.map_or(if p.role == Role::Embed { 0 } else { 2 }, |_| 1), p.layer, p.gguf.clone())
    });
    let mut stacked = std::collections::BTreeMap::new();
    for (name, p) in order {
        // A stack of experts is one tensor of one type, planned once.
        if p.expert.is_some() {
            match stacked.insert(p.gguf.clone(), types[name]) {
                Some(t) if t != types[name] => {
                    return Err(format!(
                        "{}: experts of one stack must share a type ({} and {})",
                        p.gguf,
                        t.name(),
                        types[name].name()
                    ));
                }
                Some(_) => continue,
                None => {}
            }
        }
        meta.tensor(&p.gguf, &p.dims, types[name]);
    }
    let layout = meta.layout().map_err(|e| e.to_string())?;
    Ok(Planned { layout, types })
}

/// A pipeline sink writing one GGUF file.
pub struct GgufSink {
    path: PathBuf,
    writer: Option<GgufWriter>,
    plans: BTreeMap<String, TensorPlan>,
    types: BTreeMap<String, GgmlType>,
}

impl GgufSink {
    pub(crate) fn create(path: &Path, planned: Planned, plans: BTreeMap<String, TensorPlan>) -> crate::Result<Self> {
        let writer = GgufWriter::create(path, planned.layout)?;
        Ok(Self { path: path.to_path_buf(), writer: Some(writer), plans, types: planned.types })
    }
}

/// Writes row `r` of a pipeline parameter as f32 (dequantized if a pass packed it); `false` for
/// a non-float tensor.
fn param_row(param: &Param<'_>, r: usize, out: &mut [f32]) -> bool {
    match param {
        Param::Dense { dtype, data, .. } => {
            let Some(bytes) = dtype.bytes_for(out.len()) else { return false };
            data.get(r * bytes..(r + 1) * bytes).is_some_and(|row| dtype.decode_f32(row, out))
        }
        Param::Quantized(q) => {
            q.dequantize_row(r, out);
            true
        }
        Param::Sparse(t) => {
            t.row_f32(r, out);
            true
        }
    }
}

/// The source row of GGUF row `r` of a Q/K matrix with `rows` rows permuted over `heads`
/// (llama.cpp's layout: `[head, half, 2]` from Hugging Face's `[head, 2, half]`).
fn permuted_source_row(r: usize, rows: usize, heads: usize) -> usize {
    let half = rows / heads / 2;
    let (h, rem) = (r / (2 * half), r % (2 * half));
    (h * 2 + rem % 2) * half + rem / 2
}

impl Sink for GgufSink {
    fn accept(&mut self, name: &str, param: &Param<'_>) -> mcompress_passes::Result<()> {
        let err = |m: String| mcompress_passes::Error::Export(format!("{}: tensor {name:?}: {m}", self.path.display()));
        let (Some(p), Some(&ty)) = (self.plans.get(name), self.types.get(name)) else {
            return Err(err("not in the planned GGUF".into()));
        };
        let cols = p.dims[0] as usize;
        // One expert's rows of a stack: its own matrix.
        let rows = if p.expert.is_some() { p.dims[1] as usize } else { p.dims[1..].iter().product::<u64>() as usize };
        let heads = p.heads.filter(|&h| h > 0 && rows.is_multiple_of(2 * h));
        if p.heads.is_some() && heads.is_none() {
            return Err(err(format!("{rows} rows cannot be permuted over {:?} heads", p.heads)));
        }
        let bad = std::sync::atomic::AtomicBool::new(false);
        // Rows are decoded, permuted and quantized in parallel batches, never the whole matrix.
        let bytes = ggml::quantize_rows(ty, rows, cols, &|r, buf| {
            let src = heads.map_or(r, |h| permuted_source_row(r, rows, h));
            if !param_row(param, src, buf) {
                bad.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if p.offset != 0.0 {
                for v in buf.iter_mut() {
                    *v += p.offset;
                }
            }
        })
        .ok_or_else(|| err(format!("rows of {cols} are not whole {} blocks", ty.name())))?;
        if bad.into_inner() {
            return Err(err("not a float tensor".into()));
        }
        let w = self.writer.as_mut().ok_or_else(|| err("writer already finished".into()))?;
        match p.expert {
            Some((e, n)) => w.write_tensor_part(&p.gguf, e, n, &bytes),
            None => w.write_tensor(&p.gguf, &bytes),
        }
        .map_err(mcompress_passes::Error::Core)
    }

    fn finish(&mut self) -> mcompress_passes::Result<()> {
        match self.writer.take() {
            Some(w) => w.finish().map_err(mcompress_passes::Error::Core),
            None => Ok(()),
        }
    }
}

/// The report's `gguf` object: file, policy, type per tensor and a per-type summary.
pub(crate) fn summary(
    policy: &str,
    plans: &BTreeMap<String, TensorPlan>,
    types: &BTreeMap<String, GgmlType>,
    bytes: u64,
    tries: Option<&Value>,
) -> Value {
    let mut by_type: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut tensors = serde_json::Map::new();
    for (name, p) in plans {
        let t = types[name];
        // One expert of a stack: its share of the stack's parameters; the stack counts once.
        let n = p.elements();
        let e = by_type.entry(t.name()).or_default();
        e.0 += u64::from(p.expert.is_none_or(|(i, _)| i == 0));
        e.1 += n;
        e.2 += ggml::nbytes(t, n as usize) as u64;
        tensors.insert(p.gguf.clone(), t.name().into());
    }
    let params: u64 = by_type.values().map(|v| v.1).sum();
    serde_json::json!({
        "file": "model.gguf",
        "bytes": bytes,
        "policy": policy,
        "bits_per_weight": crate::report::round6(by_type.values().map(|v| v.2).sum::<u64>() as f64 * 8.0 / params.max(1) as f64),
        "types": by_type.iter().map(|(t, (n, p, b))| (t.to_string(), serde_json::json!({"tensors": n, "params": p, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        "tensors": tensors,
        "fit": tries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_permuted_rows_follow_llama_cpp() {
        let (rows, cols, heads) = (12, 2, 3);
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let want = mcompress_core::gguf::permute_rows(&hf, rows, cols, heads).unwrap();
        for r in 0..rows {
            let s = permuted_source_row(r, rows, heads);
            assert_eq!(&want[r * cols..(r + 1) * cols], &hf[s * cols..(s + 1) * cols]);
        }
    }

    #[test]
    fn test_type_policy_follows_llama_quantize() {
        let p = TypePolicy::parse("q4_k_m").unwrap();
        let d = [2048u64, 2048];
        assert_eq!(p.choose(Role::V, &d, Some(0), (32, 0), false), GgmlType::Q6_K);
        assert_eq!(p.choose(Role::V, &d, Some(5), (32, 0), false), GgmlType::Q4_K);
        assert_eq!(p.choose(Role::Down, &d, Some(6), (32, 0), false), GgmlType::Q6_K);
        assert_eq!(p.choose(Role::Output, &d, None, (32, 0), true), GgmlType::Q6_K);
        assert_eq!(p.choose(Role::Q, &[576, 576], Some(5), (32, 0), false), GgmlType::Q5_0);
        assert_eq!(p.choose(Role::AttnNorm, &[576], Some(5), (32, 0), false), GgmlType::F32);
        assert_eq!(TypePolicy::parse("Q8_0").unwrap().choose(Role::Output, &d, None, (32, 0), true), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q6_K, 576), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q4_0, 100), GgmlType::F16);
        assert!(TypePolicy::parse("Q3_X").is_none());
    }
}
