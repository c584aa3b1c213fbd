//! The target catalog, fitting a bundle to a target's memory, and per-target estimates of speed
//! and cost. The estimate model is documented in docs/targets.md and written into every report.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use mcompress_passes::ParamMeta;
use mcompress_recipe::{MaxSize, Recipe, TargetSection};
use serde::{Deserialize, Serialize};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Fraction of peak bandwidth decode reaches (weights and KV streamed once per step).
pub const BANDWIDTH_EFFICIENCY: f64 = 0.8;
/// Fraction of peak matmul throughput reached.
pub const COMPUTE_EFFICIENCY: f64 = 0.5;
/// Default context for the KV cache.
pub const DEFAULT_CONTEXT: u32 = 2048;

/// The estimate model, as written into reports.
pub const ESTIMATE_MODEL: &str = "decode step (B sequences): time = max(bytes / (0.8 × bandwidth), B × 2 × params / (0.5 × peak)); \
(a mixture of E experts, k per token: params counts the experts a token runs, bytes the experts a step reads, 1 − (1 − k/E)^B of them); \
bytes = weight bytes + B × KV cache at half the context; peak = the target's f16 (bf16, else f32) TFLOP/s for weight-only \
quantized or 16-bit weights, f32 TFLOP/s for f32 weights; tokens/s = B / time. Prefill: 0.5 × peak / (2 × params) tokens/s. \
$/1M tokens = $/hour / (3600 × decode tokens/s) × 1e6. Fit: weights ≤ memory − overhead − KV cache at full context.";

/// A catalog entry.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TargetProfile {
    /// Catalog id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// `cpu`, `gpu`, `edge`, `apple`.
    pub kind: String,
    /// Memory in GiB.
    pub memory_gib: f64,
    /// Peak bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Peak dense TFLOP/s per dtype.
    pub tflops: BTreeMap<String, f64>,
    /// Reserved for runtime and activations, GiB.
    pub overhead_gib: f64,
    /// Weight dtypes run natively.
    pub weight_dtypes: Vec<String>,
    /// Formats loaded.
    pub formats: Vec<String>,
    /// Managed $/hour.
    pub price_per_hour: Option<f64>,
    /// Self-hosted $/hour.
    pub self_hosted_per_hour: Option<f64>,
    /// Sources of the figures.
    pub sources: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Catalog {
    target: Vec<TargetProfile>,
}

/// The catalog source, embedded in the binary.
pub const CATALOG_TOML: &str = include_str!("../catalog/targets.toml");

/// The built-in catalog.
pub fn catalog() -> &'static [TargetProfile] {
    static C: OnceLock<Vec<TargetProfile>> = OnceLock::new();
    C.get_or_init(|| toml::from_str::<Catalog>(CATALOG_TOML).expect("embedded catalog is valid (tested)").target)
}

/// A recipe target with its profile applied and overrides merged.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct ResolvedTarget {
    /// Target name.
    pub name: String,
    /// Catalog profile id.
    pub profile: Option<String>,
    /// Hardware name.
    pub hardware: Option<String>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Bandwidth GB/s.
    pub bandwidth_gbs: Option<f64>,
    /// Peak TFLOP/s per dtype.
    pub tflops: BTreeMap<String, f64>,
    /// Overhead bytes.
    pub overhead_bytes: u64,
    /// Weight dtypes run natively (`None`: not stated, assume all).
    pub weight_dtypes: Option<Vec<String>>,
    /// Formats loaded (`None`: not stated).
    pub formats: Option<Vec<String>>,
    /// Managed $/hour.
    pub price_per_hour: Option<f64>,
    /// Self-hosted $/hour.
    pub self_hosted_per_hour: Option<f64>,
    /// KV-cache context.
    pub context: u32,
    /// Concurrent sequences.
    pub batch: u32,
    /// Size limit.
    pub max_size: Option<MaxSize>,
}

/// Resolves every recipe target against the catalog; errors name the target and field.
pub fn resolve(recipe: &Recipe) -> Result<Vec<ResolvedTarget>, mcompress_recipe::Error> {
    recipe.targets.iter().enumerate().map(|(i, t)| resolve_one(recipe, i, t)).collect()
}

fn resolve_one(recipe: &Recipe, i: usize, t: &TargetSection) -> Result<ResolvedTarget, mcompress_recipe::Error> {
    let profile = match &t.profile {
        Some(id) => Some(catalog().iter().find(|p| &p.id == id).ok_or_else(|| {
            let ids: Vec<&str> = catalog().iter().map(|p| p.id.as_str()).collect();
            recipe.target_error(i, format!("profile {id:?} is not in the catalog; known: {}", ids.join(", ")))
        })?),
        None => None,
    };
    for (field, v) in [
        ("bandwidth-gbs", t.bandwidth_gbs),
        ("price-per-hour", t.price_per_hour),
        ("self-hosted-per-hour", t.self_hosted_per_hour),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(recipe.target_error(i, format!("{field} must be a non-negative number")));
        }
    }
    if t.context == Some(0) || t.batch == Some(0) {
        return Err(recipe.target_error(i, "context and batch must be at least 1"));
    }
    let memory_bytes = t.memory.map(|m| m.0).or_else(|| profile.map(|p| (p.memory_gib * GIB) as u64));
    if t.max_size == Some(MaxSize::Auto) && memory_bytes.is_none() {
        return Err(recipe.target_error(i, "max-size = \"auto\" needs a `profile` or a `memory` to size against"));
    }
    let mut tflops = profile.map(|p| p.tflops.clone()).unwrap_or_default();
    tflops.extend(t.tflops.clone().unwrap_or_default());
    Ok(ResolvedTarget {
        name: t.name.clone(),
        profile: t.profile.clone(),
        hardware: profile.map(|p| p.name.clone()),
        memory_bytes,
        bandwidth_gbs: t.bandwidth_gbs.or(profile.map(|p| p.bandwidth_gbs)),
        tflops,
        overhead_bytes: t.overhead.map(|o| o.0).or_else(|| profile.map(|p| (p.overhead_gib * GIB) as u64)).unwrap_or(0),
        weight_dtypes: t.weight_dtypes.clone().or_else(|| profile.map(|p| p.weight_dtypes.clone())),
        formats: t.formats.clone().or_else(|| profile.map(|p| p.formats.clone())),
        price_per_hour: t.price_per_hour.or(profile.and_then(|p| p.price_per_hour)),
        self_hosted_per_hour: t.self_hosted_per_hour.or(profile.and_then(|p| p.self_hosted_per_hour)),
        context: t.context.unwrap_or(DEFAULT_CONTEXT),
        batch: t.batch.unwrap_or(1),
        max_size: t.max_size,
    })
}

/// KV-cache geometry from a decoder's config.json.
#[derive(Clone, Copy, Debug, Serialize, schemars::JsonSchema)]
pub struct KvGeometry {
    /// Layers.
    pub layers: u64,
    /// KV heads.
    pub kv_heads: u64,
    /// Head dimension.
    pub head_dim: u64,
    /// Bytes per element (2: f16).
    pub bytes: u64,
    /// Layers that attend within a sliding window, whose cache holds at most `window` tokens
    /// (Gemma 3's local layers, Qwen2's sliding ones; vLLM, llama.cpp and transformers all cap
    /// them). 0 when every layer attends over the whole context.
    pub sliding_layers: u64,
    /// The sliding window, in tokens (0: none).
    pub window: u64,
    /// A mixture of experts, for the speed estimate: (experts per block, experts per token,
    /// share of all parameters that are experts'). `None` for a dense model.
    #[serde(skip)]
    #[schemars(skip)]
    pub experts: Option<(u64, u64, f64)>,
}

impl KvGeometry {
    /// From config.json; `None` for models without a KV cache (encoders, MLPs).
    pub fn from_config(config: Option<&serde_json::Value>) -> Option<Self> {
        let c = config?;
        // The families mcompress runs: their geometry as the architecture module reads it.
        if let Ok(g) = mcompress_core::arch::Geometry::from_config(c) {
            // A window llama.cpp does not apply (a Mistral's) is not counted on: its GGUF caches
            // the whole context.
            let capped = g.gguf_window_lost().is_none();
            let windows: Vec<usize> = g.windows.iter().flatten().copied().filter(|_| capped).collect();
            return Some(KvGeometry {
                layers: g.layers as u64,
                kv_heads: g.kv_heads as u64,
                head_dim: g.head_dim as u64,
                bytes: 2,
                sliding_layers: windows.len() as u64,
                window: windows.iter().max().copied().unwrap_or(0) as u64,
                experts: (g.experts > 0).then(|| (g.experts as u64, g.experts_used as u64, g.expert_share())),
            });
        }
        // Another causal LM (an estimate from the usual config keys; mcompress does not run it).
        let decoder = c["architectures"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.ends_with("ForCausalLM"))));
        if !decoder {
            return None;
        }
        let get = |k: &str| c[k].as_u64();
        let layers = get("num_hidden_layers").or(get("n_layer"))?;
        let heads = get("num_attention_heads").or(get("n_head"))?;
        let hidden = get("hidden_size").or(get("n_embd"))?;
        let kv_heads = get("num_key_value_heads").unwrap_or(heads);
        let head_dim = get("head_dim").unwrap_or(hidden / heads.max(1));
        Some(KvGeometry { layers, kv_heads, head_dim, bytes: 2, sliding_layers: 0, window: 0, experts: None })
    }

    /// Bytes for `tokens` tokens of one sequence: K and V per layer, a sliding layer holding at
    /// most its window.
    pub fn bytes_for(&self, tokens: u64) -> u64 {
        let sliding = self.sliding_layers.min(self.layers);
        let cached = (self.layers - sliding) * tokens + sliding * tokens.min(self.window);
        2 * self.kv_heads * self.head_dim * self.bytes * cached
    }
}

/// Whether and how a bundle fits a target.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Fit {
    /// Fits in memory and its dtypes/formats run there.
    pub fits: bool,
    /// Why not (empty when it fits).
    pub reasons: Vec<String>,
    /// Target memory.
    pub memory_bytes: Option<u64>,
    /// Reserved for the runtime.
    pub overhead_bytes: u64,
    /// KV cache at full context × batch.
    pub kv_cache_bytes: u64,
    /// Memory left for weights.
    pub weights_budget_bytes: Option<u64>,
    /// Weights + KV cache + overhead.
    pub memory_use_bytes: u64,
}

/// Estimated speed and cost on a target.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Estimates {
    /// Decode tokens/s for the whole batch.
    pub decode_tokens_per_s: f64,
    /// `memory` or `compute`: which bound sets decode speed.
    pub decode_bound: &'static str,
    /// Prefill tokens/s.
    pub prefill_tokens_per_s: f64,
    /// Peak TFLOP/s used and its dtype.
    pub compute_dtype: String,
    /// $ per 1M decoded tokens on a managed endpoint.
    pub usd_per_million_tokens_managed: Option<f64>,
    /// $ per 1M decoded tokens self-hosted.
    pub usd_per_million_tokens_self_hosted: Option<f64>,
}

/// Dtype names of the stored weights: `int8`/`int4`/... for quantized matrices, float names else.
pub fn weight_dtypes(params: &BTreeMap<String, ParamMeta>) -> Vec<String> {
    let mut set = std::collections::BTreeSet::new();
    for m in params.values() {
        match m {
            ParamMeta::Quantized { scheme, .. } => {
                set.insert(match scheme.kind {
                    mcompress_passes::QKind::Fp8 { .. } => "fp8".to_string(),
                    mcompress_passes::QKind::Fp4 { .. } => scheme.label(),
                    mcompress_passes::QKind::Int => format!("int{}", scheme.bits),
                });
            }
            ParamMeta::Dense { dtype, .. } | ParamMeta::Sparse { dtype, .. } if dtype.is_float() => {
                set.insert(dtype.as_str().to_ascii_lowercase());
            }
            ParamMeta::Dense { .. } | ParamMeta::Sparse { .. } => {}
        }
    }
    set.into_iter().collect()
}

impl ResolvedTarget {
    /// The weight dtypes among `dtypes` this hardware does not run natively, `None` when it runs
    /// them all (or states none).
    pub fn foreign_dtypes<'a>(&self, dtypes: &'a [String]) -> Option<Vec<&'a str>> {
        let supported = self.weight_dtypes.as_ref()?;
        let missing: Vec<&str> = dtypes.iter().filter(|d| !supported.contains(d)).map(String::as_str).collect();
        (!missing.is_empty()).then_some(missing)
    }
}

/// Fits the bundle to a target.
pub fn fit(t: &ResolvedTarget, weights_bytes: u64, dtypes: &[String], formats: &[&str], kv: Option<KvGeometry>) -> Fit {
    let kv_cache_bytes = kv.map_or(0, |g| g.bytes_for(u64::from(t.context)) * u64::from(t.batch));
    let budget = t.memory_bytes.map(|m| m.saturating_sub(t.overhead_bytes + kv_cache_bytes));
    let mut reasons = Vec::new();
    if let (Some(b), Some(m)) = (budget, t.memory_bytes)
        && weights_bytes > b
    {
        reasons.push(format!(
            "weights {:.2} GiB exceed {:.2} GiB = memory {:.2} GiB − overhead {:.2} GiB − KV cache {:.2} GiB",
            weights_bytes as f64 / GIB,
            b as f64 / GIB,
            m as f64 / GIB,
            t.overhead_bytes as f64 / GIB,
            kv_cache_bytes as f64 / GIB
        ));
    }
    if let Some(missing) = t.foreign_dtypes(dtypes) {
        reasons.push(format!(
            "weight dtypes {} do not run natively here (supported: {})",
            missing.join(", "),
            t.weight_dtypes.as_deref().unwrap_or_default().join(", ")
        ));
    }
    if let Some(supported) = &t.formats
        && !formats.iter().any(|f| supported.iter().any(|s| s == f))
    {
        reasons.push(format!(
            "bundle formats {} are not loaded here (supported: {})",
            formats.join(", "),
            supported.join(", ")
        ));
    }
    Fit {
        fits: reasons.is_empty(),
        reasons,
        memory_bytes: t.memory_bytes,
        overhead_bytes: t.overhead_bytes,
        kv_cache_bytes,
        weights_budget_bytes: budget,
        memory_use_bytes: weights_bytes + kv_cache_bytes + t.overhead_bytes,
    }
}

/// Estimates decode/prefill speed and cost. `None` without bandwidth or compute figures.
pub fn estimate(
    t: &ResolvedTarget,
    weights_bytes: u64,
    params: u64,
    dtypes: &[String],
    kv: Option<KvGeometry>,
) -> Option<Estimates> {
    let bw = t.bandwidth_gbs? * 1e9 * BANDWIDTH_EFFICIENCY;
    let only_f32 = dtypes.iter().all(|d| d == "f32" || d == "f64");
    let order: &[&str] = if only_f32 { &["f32"] } else { &["f16", "bf16", "f32"] };
    let (dt, peak) = order.iter().find_map(|d| t.tflops.get(*d).map(|v| ((*d).to_string(), *v)))?;
    let compute = peak * 1e12 * COMPUTE_EFFICIENCY;
    if bw <= 0.0 || compute <= 0.0 {
        return None;
    }
    let b = f64::from(t.batch);
    let kv_half = kv.map_or(0, |g| g.bytes_for(u64::from(t.context) / 2)) as f64;
    // A mixture multiplies by the experts a token is routed to, and a step of B tokens reads the
    // experts any of them reaches (expected share 1 − (1 − k/E)^B, routing taken as uniform).
    let (active, read) = match kv.and_then(|g| g.experts) {
        Some((e, k, share)) if e > 0 => {
            let used = k as f64 / e as f64;
            (1.0 - share * (1.0 - used), 1.0 - share * (1.0 - used).powf(b))
        }
        _ => (1.0, 1.0),
    };
    let flops_per_token = 2.0 * params as f64 * active;
    let t_mem = (weights_bytes as f64 * read + b * kv_half) / bw;
    let t_comp = b * flops_per_token / compute;
    let decode = b / t_mem.max(t_comp);
    let cost = |price: Option<f64>| price.map(|p| round4(p / (3600.0 * decode) * 1e6));
    Some(Estimates {
        decode_tokens_per_s: round4(decode),
        decode_bound: if t_mem >= t_comp { "memory" } else { "compute" },
        prefill_tokens_per_s: round4(compute / flops_per_token),
        compute_dtype: dt,
        usd_per_million_tokens_managed: cost(t.price_per_hour),
        usd_per_million_tokens_self_hosted: cost(t.self_hosted_per_hour),
    })
}

fn round4(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    // Four significant digits: stable, readable numbers in reports.
    let mag = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * mag).round() / mag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_catalog_parses_and_cites_sources() {
        let c = catalog();
        assert!(c.len() >= 14, "{}", c.len());
        let mut ids: Vec<&str> = c.iter().map(|p| p.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), c.len(), "unique ids");
        for p in c {
            assert!(!p.sources.is_empty(), "{} cites sources", p.id);
            assert!(p.memory_gib > 0.0 && p.bandwidth_gbs > 0.0, "{}", p.id);
            assert!(p.price_per_hour.is_some() || p.self_hosted_per_hour.is_some(), "{} has a price", p.id);
        }
    }

    #[test]
    fn test_memory_bound_decode_on_l4() {
        let recipe = Recipe::parse(
            "r.toml".as_ref(),
            "[model]\npath = \"m\"\n[[target]]\nname = \"l4\"\nprofile = \"l4-24gb\"\n".into(),
        )
        .unwrap();
        let t = &resolve(&recipe).unwrap()[0];
        // A 7B int4 model: 3.5 GB of weights, 300 GB/s × 0.8 → 68.6 tokens/s, memory bound.
        let e = estimate(t, 3_500_000_000, 7_000_000_000, &["int4".into()], None).unwrap();
        assert_eq!(e.decode_bound, "memory");
        assert!((e.decode_tokens_per_s - 68.57).abs() < 0.01, "{}", e.decode_tokens_per_s);
        // $0.805/h at 68.57 tokens/s.
        assert!((e.usd_per_million_tokens_managed.unwrap() - 3.261).abs() < 0.01);
    }

    #[test]
    fn test_mixture_reads_and_runs_only_its_routed_experts() {
        let recipe = Recipe::parse(
            "r.toml".as_ref(),
            "[model]\npath = \"m\"\n[[target]]\nname = \"l4\"\nprofile = \"l4-24gb\"\n".into(),
        )
        .unwrap();
        let t = &resolve(&recipe).unwrap()[0];
        let dense = estimate(t, 3_500_000_000, 7_000_000_000, &["int4".into()], None).unwrap();
        // 8 experts, 2 per token, 80 % of the weights experts': one sequence reads 20 % + 80 % / 4.
        let kv = KvGeometry {
            layers: 1,
            kv_heads: 0,
            head_dim: 0,
            bytes: 2,
            sliding_layers: 0,
            window: 0,
            experts: Some((8, 2, 0.8)),
        };
        let moe = estimate(t, 3_500_000_000, 7_000_000_000, &["int4".into()], Some(kv)).unwrap();
        assert!((moe.decode_tokens_per_s / dense.decode_tokens_per_s - 2.5).abs() < 1e-3, "{moe:?}");
        assert!((moe.prefill_tokens_per_s / dense.prefill_tokens_per_s - 2.5).abs() < 1e-3, "{moe:?}");
    }

    #[test]
    fn test_kv_cache_counts_against_memory() {
        let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "hidden_size": 4096});
        let kv = KvGeometry::from_config(Some(&cfg)).unwrap();
        // Llama-3-8B geometry: 128 KiB per token.
        assert_eq!(kv.bytes_for(1), 2 * 32 * 8 * 128 * 2);
        let recipe = Recipe::parse("r.toml".as_ref(), "[model]\npath = \"m\"\n[[target]]\nname = \"t4\"\nprofile = \"t4-16gb\"\ncontext = 65536\nmax-size = \"auto\"\n".into()).unwrap();
        let t = &resolve(&recipe).unwrap()[0];
        let f = fit(t, 8 << 30, &["int8".into()], &["safetensors"], Some(kv));
        assert!(!f.fits);
        assert_eq!(f.kv_cache_bytes, 8 << 30);
        assert!(f.reasons[0].contains("KV cache 8.00 GiB"), "{:?}", f.reasons);
        let f = fit(t, 4 << 30, &["bf16".into()], &["safetensors"], Some(kv));
        assert!(f.reasons.iter().any(|r| r.contains("bf16 do not run natively")), "{:?}", f.reasons);
    }

    #[test]
    fn test_sliding_layers_cache_at_most_their_window() {
        // Gemma 3 270M's shape: 18 layers, every sixth global, the others over 512 tokens.
        let gemma = serde_json::json!({"model_type": "gemma3_text", "hidden_size": 640, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 18, "intermediate_size": 2048,
            "vocab_size": 262_144, "sliding_window": 512});
        let kv = KvGeometry::from_config(Some(&gemma)).unwrap();
        assert_eq!((kv.sliding_layers, kv.window), (15, 512));
        let per_token_layer = 2 * 256 * 2;
        assert_eq!(kv.bytes_for(32_768), per_token_layer * (3 * 32_768 + 15 * 512));
        assert_eq!(kv.bytes_for(100), per_token_layer * 18 * 100);
        // A Mistral's window is not applied by llama.cpp: the whole context is cached.
        let mistral = serde_json::json!({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "sliding_window": 16,
            "max_position_embeddings": 1024});
        assert_eq!(KvGeometry::from_config(Some(&mistral)).unwrap().sliding_layers, 0);
    }

    #[test]
    fn test_unknown_profile_lists_catalog() {
        let recipe = Recipe::parse(
            "r.toml".as_ref(),
            "[model]\npath = \"m\"\n[[target]]\nname = \"x\"\nprofile = \"tpu\"\n".into(),
        )
        .unwrap();
        let e = resolve(&recipe).unwrap_err().to_string();
        assert!(
            e.starts_with("r.toml:3:1: target[0] x: profile \"tpu\" is not in the catalog; known: x86-laptop-32gb"),
            "{e}"
        );
        let recipe = Recipe::parse(
            "r.toml".as_ref(),
            "[model]\npath = \"m\"\n[[target]]\nname = \"x\"\nmax-size = \"auto\"\n".into(),
        )
        .unwrap();
        assert!(resolve(&recipe).unwrap_err().to_string().contains("needs a `profile` or a `memory`"));
    }
}
