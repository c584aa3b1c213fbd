//! What a decoder model is, in one place: the families mcompress reads (llama, Mistral, Qwen2,
//! Gemma 3, Phi-3, Mixtral, Qwen3-MoE),
//! their geometry parsed once from config.json, the table of tensor roles with each family's
//! Hugging Face and GGUF names (read both ways), the `{arch}.*` GGUF keys, whether GGUF stores
//! Q/K rows permuted or norms offset, and a completeness check that accounts for every tensor.
//!
//! Adding a family is a row in [`Family`]'s tables and, where its forward pass differs, the
//! switches in [`Geometry`] (see docs/architecture.md). Modelled on llama.cpp's `llm_arch`
//! tensor tables and candle's per-family `Config`.

use serde_json::Value;

use crate::config::{MAX_DIM, dim};

/// A decoder family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Llama (SmolLM2, Llama 2/3): RMSNorm, SwiGLU, rotary, grouped-query attention.
    Llama,
    /// Mistral: llama's tensors and forward pass with sliding-window attention on every layer
    /// (`sliding_window`; transformers' default 4096 when the key is absent, none when null).
    /// llama.cpp converts it as a llama (no window).
    Mistral,
    /// Qwen2 / Qwen2.5: llama with biases on q, k and v.
    Qwen2,
    /// Gemma 3 (text): (1+w) RMSNorm before and after attention and MLP, q/k norms, GeGLU,
    /// embeddings scaled by √hidden, sliding-window layers with their own rope base.
    Gemma3,
    /// Phi-3 / Phi-3.5 mini: llama's forward pass with q/k/v fused into `qkv_proj` and gate/up
    /// into `gate_up_proj` (gate rows first), NeoX rotary as Hugging Face stores it.
    Phi3,
    /// Mixtral: Mistral's attention with a mixture-of-experts MLP — a router
    /// (`block_sparse_moe.gate`) picks `num_experts_per_tok` of `num_local_experts` SwiGLU experts
    /// per token (softmax, top-k, renormalized), each stored as `experts.{e}.w1/w2/w3` (gate, down,
    /// up). llama.cpp converts it as a llama with `ffn_*_exps` tensors stacking the experts.
    Mixtral,
    /// Qwen3-MoE: Qwen3's attention (per-head RMSNorm of queries and keys, no biases, NeoX
    /// rotary) with a mixture of experts in every block (`mlp.gate`, `mlp.experts.{e}.gate_proj/
    /// up_proj/down_proj`, `moe_intermediate_size` wide; top-k weights renormalized only with
    /// `norm_topk_prob`). llama.cpp's `qwen3moe`.
    Qwen3Moe,
}

/// What a tensor is, independent of how a family spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)] // the names say it
pub enum Role {
    Embed,
    Output,
    OutputNorm,
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    PostAttnNorm,
    FfnNorm,
    PostFfnNorm,
    Gate,
    Up,
    Down,
    /// q, k and v rows stacked in one matrix (Phi-3's `qkv_proj`).
    Qkv,
    /// gate then up rows stacked in one matrix (Phi-3's `gate_up_proj`).
    GateUp,
    /// A mixture of experts' router, `[experts, hidden]`.
    Router,
    /// One expert's gate (Mixtral's `w1`), `[intermediate, hidden]`.
    ExpertGate,
    /// One expert's up (Mixtral's `w3`), `[intermediate, hidden]`.
    ExpertUp,
    /// One expert's down (Mixtral's `w2`), `[hidden, intermediate]`.
    ExpertDown,
}

impl Role {
    /// Whether the role is one tensor per block (`model.layers.{i}.…`).
    pub fn per_layer(self) -> bool {
        !matches!(self, Role::Embed | Role::Output | Role::OutputNorm)
    }

    /// Whether the role is one tensor per expert of a block (`….experts.{e}.…`); GGUF stacks a
    /// block's experts into one 3-D tensor of the role.
    pub fn per_expert(self) -> bool {
        matches!(self, Role::ExpertGate | Role::ExpertUp | Role::ExpertDown)
    }

    /// Whether the tensor is a norm's gain vector.
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            Role::OutputNorm
                | Role::AttnNorm
                | Role::QNorm
                | Role::KNorm
                | Role::PostAttnNorm
                | Role::FfnNorm
                | Role::PostFfnNorm
        )
    }
}

/// (role, Hugging Face name after `model.layers.{i}.` or in full, GGUF name after `blk.{i}.` or in full).
/// A per-expert role's Hugging Face name has `{e}` where the expert index goes; its GGUF name is
/// the stacked tensor's.
type Row = (Role, &'static str, &'static str);

/// Where a tensor name sits in a model: its role, block and expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    /// What the tensor is.
    pub role: Role,
    /// Its block, for per-block roles.
    pub layer: Option<usize>,
    /// Its expert, for per-expert roles (`None` in a GGUF name: the stack of every expert).
    pub expert: Option<usize>,
}

const COMMON: &[Row] = &[
    (Role::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    (Role::Output, "lm_head.weight", "output.weight"),
    (Role::OutputNorm, "model.norm.weight", "output_norm.weight"),
    (Role::AttnNorm, "input_layernorm.weight", "attn_norm.weight"),
];

/// q/k/v as three matrices (every family but Phi-3).
const QKV: &[Row] = &[
    (Role::Q, "self_attn.q_proj.weight", "attn_q.weight"),
    (Role::K, "self_attn.k_proj.weight", "attn_k.weight"),
    (Role::V, "self_attn.v_proj.weight", "attn_v.weight"),
];

/// q/k/v fused (Phi-3).
const QKV_FUSED: &[Row] = &[(Role::Qkv, "self_attn.qkv_proj.weight", "attn_qkv.weight")];

const O: &[Row] = &[(Role::O, "self_attn.o_proj.weight", "attn_output.weight")];

/// gate and up as two matrices.
const GATE_UP: &[Row] =
    &[(Role::Gate, "mlp.gate_proj.weight", "ffn_gate.weight"), (Role::Up, "mlp.up_proj.weight", "ffn_up.weight")];

/// gate and up fused (Phi-3; llama.cpp's `ffn_up` holds both, gate first).
const GATE_UP_FUSED: &[Row] = &[(Role::GateUp, "mlp.gate_up_proj.weight", "ffn_up.weight")];

const DOWN: &[Row] = &[(Role::Down, "mlp.down_proj.weight", "ffn_down.weight")];

const LLAMA: &[Row] = &[(Role::FfnNorm, "post_attention_layernorm.weight", "ffn_norm.weight")];

const PHI3: &[Row] = LLAMA;

/// Qwen3-MoE: q/k norms and the mixture of experts in place of gate/up/down.
const QWEN3_MOE: &[Row] = &[
    (Role::QNorm, "self_attn.q_norm.weight", "attn_q_norm.weight"),
    (Role::KNorm, "self_attn.k_norm.weight", "attn_k_norm.weight"),
    (Role::FfnNorm, "post_attention_layernorm.weight", "ffn_norm.weight"),
    (Role::Router, "mlp.gate.weight", "ffn_gate_inp.weight"),
    (Role::ExpertGate, "mlp.experts.{e}.gate_proj.weight", "ffn_gate_exps.weight"),
    (Role::ExpertUp, "mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight"),
    (Role::ExpertDown, "mlp.experts.{e}.down_proj.weight", "ffn_down_exps.weight"),
];

/// Mixtral's mixture of experts in place of gate/up/down.
const MIXTRAL_MOE: &[Row] = &[
    (Role::FfnNorm, "post_attention_layernorm.weight", "ffn_norm.weight"),
    (Role::Router, "block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    (Role::ExpertGate, "block_sparse_moe.experts.{e}.w1.weight", "ffn_gate_exps.weight"),
    (Role::ExpertDown, "block_sparse_moe.experts.{e}.w2.weight", "ffn_down_exps.weight"),
    (Role::ExpertUp, "block_sparse_moe.experts.{e}.w3.weight", "ffn_up_exps.weight"),
];

const QWEN2: &[Row] = &[
    (Role::FfnNorm, "post_attention_layernorm.weight", "ffn_norm.weight"),
    (Role::QBias, "self_attn.q_proj.bias", "attn_q.bias"),
    (Role::KBias, "self_attn.k_proj.bias", "attn_k.bias"),
    (Role::VBias, "self_attn.v_proj.bias", "attn_v.bias"),
];

const GEMMA3: &[Row] = &[
    (Role::QNorm, "self_attn.q_norm.weight", "attn_q_norm.weight"),
    (Role::KNorm, "self_attn.k_norm.weight", "attn_k_norm.weight"),
    (Role::PostAttnNorm, "post_attention_layernorm.weight", "post_attention_norm.weight"),
    (Role::FfnNorm, "pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    (Role::PostFfnNorm, "post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

/// Gemma 3 attends globally in every sixth layer and over a sliding window in the others
/// (transformers' default `sliding_window_pattern`; what llama.cpp's gemma3 loader assumes).
const GEMMA3_GLOBAL_EVERY: u64 = 6;

/// Whether Gemma 3 layer `i` slides, for a pattern of one global layer in `every`.
fn gemma3_slides(i: u64, every: u64) -> bool {
    !(i + 1).is_multiple_of(every)
}

/// The decoder `model_type`s mcompress reads, for messages (one per [`Family::ALL`], checked by a
/// test).
pub const DECODERS: &str = "llama, mistral, qwen2, gemma3_text, phi3, mixtral, qwen3_moe";

/// The text llama.cpp's converter (convert_hf_to_gguf.py, `get_vocab_base_pre`) tokenizes to tell
/// byte-level BPE pre-tokenizers apart: the sha256 of the token ids, written as Python writes a
/// list (`[1, 2, 3]`), names the pre-tokenizer ([`GGUF_BPE_PRE`]).
pub const GGUF_BPE_CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= \u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// llama.cpp's `tokenizer.ggml.pre` by the check hash of [`GGUF_BPE_CHECK_TEXT`] (the entries of
/// convert_hf_to_gguf.py for decoder families' byte-level BPE tokenizers). A tokenizer not in
/// the table has no pre-tokenizer llama.cpp is known to split its text with.
pub const GGUF_BPE_PRE: &[(&str, &str)] = &[
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"), // SmolLM, SmolLM2
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"), // Llama 3
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),  // Qwen1.5, Qwen2, Qwen2.5
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"), // Mistral Nemo
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
];

/// The most experts per block a config may claim (DeepSeek-V3 and Qwen3-MoE have 256 and 128).
pub const MAX_EXPERTS: usize = 4096;

/// Hugging Face prefix of block tensors.
const HF_LAYER: &str = "model.layers.";
/// GGUF prefix of block tensors.
const GGUF_LAYER: &str = "blk.";

impl Family {
    /// Every family. Llama comes before Mistral, which shares its GGUF architecture: a GGUF
    /// `llama` reads as Llama.
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Gemma3,
        Family::Phi3,
        Family::Mixtral,
        Family::Qwen3Moe,
    ];

    /// The family of a config.json `model_type`.
    pub fn from_model_type(t: &str) -> Option<Family> {
        Some(match t {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "mixtral" => Family::Mixtral,
            "qwen3_moe" => Family::Qwen3Moe,
            _ => return None,
        })
    }

    /// The family of a config.json, by `model_type`.
    pub fn of_config(config: &Value) -> Option<Family> {
        config["model_type"].as_str().and_then(Family::from_model_type)
    }

    /// The family of a GGUF `general.architecture`.
    pub fn from_gguf(arch: &str) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.gguf_arch() == arch)
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
            Family::Mixtral => "mixtral",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// transformers' class (config.json `architectures`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// GGUF `general.architecture`, the prefix of its `{arch}.*` keys (Mistral and Mixtral:
    /// `llama`, as llama.cpp's converter writes them).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral | Family::Mixtral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
            Family::Qwen3Moe => "qwen3moe",
        }
    }

    /// Whether q/k/v and gate/up are fused matrices ([`Role::Qkv`], [`Role::GateUp`]): the
    /// eval runs each as one layer and calibration treats it as one; structured pruning and
    /// distillation, which work on units inside a projection, refuse the family.
    pub fn fuses_projections(self) -> bool {
        self == Family::Phi3
    }

    /// The linear layers that read the normed stream in front of attention, in order (q, k, v;
    /// or the fused `qkv_proj`).
    pub fn attn_readers(self) -> &'static [Role] {
        if self.fuses_projections() { &[Role::Qkv] } else { &[Role::Q, Role::K, Role::V] }
    }

    /// The linear layers that read the normed stream in front of the MLP, in order (gate, up;
    /// or the fused `gate_up_proj`; or a mixture's router and every expert's gate and up).
    pub fn mlp_readers(self) -> &'static [Role] {
        if self.is_moe() {
            &[Role::Router, Role::ExpertGate, Role::ExpertUp]
        } else if self.fuses_projections() {
            &[Role::GateUp]
        } else {
            &[Role::Gate, Role::Up]
        }
    }

    /// Whether the MLP is a mixture of experts ([`Role::Router`], per-expert roles).
    pub fn is_moe(self) -> bool {
        matches!(self, Family::Mixtral | Family::Qwen3Moe)
    }

    /// Whether llama.cpp's converter permutes Q and K rows for its rotary layout (llama and
    /// Mistral; Qwen2 and Gemma use the NeoX layout, stored as Hugging Face stores it).
    pub fn permutes_qk(self) -> bool {
        matches!(self, Family::Llama | Family::Mistral | Family::Mixtral)
    }

    /// Whether llama.cpp's architecture for the family attends within a sliding window (Qwen2,
    /// Gemma 3: `{arch}.attention.sliding_window`); a Mistral GGUF is a llama, which attends over
    /// the whole context.
    pub fn gguf_sliding_window(self) -> bool {
        matches!(self, Family::Qwen2 | Family::Gemma3)
    }

    /// What GGUF adds to every norm gain: Gemma stores `1 + w` (its RMSNorm multiplies by
    /// `1 + w`; llama.cpp's by the stored value), the others store `w`.
    pub fn gguf_norm_offset(self) -> f32 {
        if self == Family::Gemma3 { 1.0 } else { 0.0 }
    }

    /// The head count llama.cpp's converter permutes this role's rows over (Q: heads, K: KV
    /// heads; llama only), or `None`.
    pub fn gguf_permute_heads(self, role: Role, heads: usize, kv_heads: usize) -> Option<usize> {
        match role {
            Role::Q if self.permutes_qk() => Some(heads),
            Role::K if self.permutes_qk() => Some(kv_heads),
            _ => None,
        }
    }

    /// What GGUF adds to every value of a tensor of this role ([`Family::gguf_norm_offset`] for
    /// norms, else 0).
    pub fn gguf_offset(self, role: Role) -> f32 {
        if role.is_norm() { self.gguf_norm_offset() } else { 0.0 }
    }

    /// Whether the forward pass multiplies the embeddings by √hidden (Gemma).
    pub fn scales_embeddings(self) -> bool {
        self == Family::Gemma3
    }

    /// Whether the MLP gates with tanh-approximated GELU (Gemma's GeGLU) rather than SiLU.
    pub fn gelu_mlp(self) -> bool {
        self == Family::Gemma3
    }

    /// Whether llama.cpp's graph for this family's GGUF reads the fused `attn_qkv` as if its
    /// query part were `embedding_length` wide (phi3: the key part starts at row `hidden_size`):
    /// such a GGUF needs `heads × head_dim = hidden`, so attention heads cannot be removed.
    pub fn gguf_query_spans_hidden(self) -> bool {
        self.fuses_projections()
    }

    /// Whether transformers' config class for the family refuses a `hidden_size` that is not a
    /// multiple of `num_attention_heads` (LlamaConfig, Gemma3TextConfig in transformers 5.25,
    /// even with `head_dim` set); Qwen2Config does not check.
    pub fn hf_needs_heads_dividing_hidden(self) -> bool {
        matches!(self, Family::Llama | Family::Gemma3)
    }

    fn rows(self) -> impl Iterator<Item = &'static Row> {
        let (own, mlp): (&[Row], &[Row]) = match self {
            Family::Llama | Family::Mistral => (LLAMA, GATE_UP),
            Family::Qwen2 => (QWEN2, GATE_UP),
            Family::Gemma3 => (GEMMA3, GATE_UP),
            Family::Phi3 => (PHI3, GATE_UP_FUSED),
            Family::Mixtral => (MIXTRAL_MOE, &[]),
            Family::Qwen3Moe => (QWEN3_MOE, &[]),
        };
        let qkv = if self.fuses_projections() { QKV_FUSED } else { QKV };
        let down = if self.is_moe() { &[][..] } else { DOWN };
        COMMON.iter().chain(qkv).chain(O).chain(mlp).chain(down).chain(own)
    }

    /// The linear layers of a block, in forward order (fused ones for a family that fuses; a
    /// mixture's router, then each expert's gate, up and down).
    pub fn linear_roles(self) -> impl Iterator<Item = Role> {
        let (attn, mlp) = (self.attn_readers(), self.mlp_readers());
        let down = if self.is_moe() { &[Role::ExpertDown] } else { &[Role::Down] };
        attn.iter().chain(&[Role::O]).chain(mlp).chain(down).copied()
    }

    /// Roles this family has (whether optional or not).
    pub fn roles(self) -> impl Iterator<Item = Role> {
        self.rows().map(|r| r.0)
    }

    /// Whether the family has this role.
    pub fn has(self, role: Role) -> bool {
        self.rows().any(|r| r.0 == role)
    }

    /// The Hugging Face name of a role (`layer` for per-block roles).
    ///
    /// # Panics
    /// A role the family does not have, or a per-block role without a layer (programming errors).
    pub fn hf(self, role: Role, layer: usize) -> String {
        assert!(!role.per_expert(), "{role:?} needs an expert index (Family::hf_expert)");
        let row = self.rows().find(|r| r.0 == role).unwrap_or_else(|| panic!("{self:?} has no {role:?}"));
        if role.per_layer() { format!("{HF_LAYER}{layer}.{}", row.1) } else { row.1.to_string() }
    }

    /// The Hugging Face name of expert `expert`'s tensor of a per-expert role in block `layer`.
    ///
    /// # Panics
    /// A role the family does not have (a programming error).
    pub fn hf_expert(self, role: Role, layer: usize, expert: usize) -> String {
        let row = self.rows().find(|r| r.0 == role).unwrap_or_else(|| panic!("{self:?} has no {role:?}"));
        format!("{HF_LAYER}{layer}.{}", row.1.replace("{e}", &expert.to_string()))
    }

    /// The Hugging Face name of a [`Slot`] (an expert's tensor for per-expert roles).
    ///
    /// # Panics
    /// A role the family does not have, or a slot without the block or expert its role needs.
    pub fn hf_slot(self, slot: Slot) -> String {
        if slot.role.per_expert() {
            self.hf_expert(slot.role, slot.layer.unwrap_or(0), slot.expert.expect("per-expert slot"))
        } else {
            self.hf(slot.role, slot.layer.unwrap_or(0))
        }
    }

    /// The role and block of a Hugging Face tensor name (an expert's tensor reads as its role).
    pub fn parse_hf(self, name: &str) -> Option<(Role, Option<usize>)> {
        self.slot_hf(name).map(|s| (s.role, s.layer))
    }

    /// Where a Hugging Face tensor name sits: role, block, expert.
    pub fn slot_hf(self, name: &str) -> Option<Slot> {
        parse(self.rows().map(|r| (r.0, r.1)), HF_LAYER, name)
    }

    /// The role and block of a GGUF tensor name (a stacked expert tensor reads as its role).
    pub fn parse_gguf(self, name: &str) -> Option<(Role, Option<usize>)> {
        parse(self.rows().map(|r| (r.0, r.2)), GGUF_LAYER, name).map(|s| (s.role, s.layer))
    }

    /// The GGUF name of a role (`layer` for per-block roles).
    ///
    /// # Panics
    /// A role the family does not have (a programming error).
    pub fn gguf(self, role: Role, layer: usize) -> String {
        let row = self.rows().find(|r| r.0 == role).unwrap_or_else(|| panic!("{self:?} has no {role:?}"));
        if role.per_layer() { format!("{GGUF_LAYER}{layer}.{}", row.2) } else { row.2.to_string() }
    }

    /// The GGUF name of a Hugging Face tensor name (an expert's tensor: the stack it goes into).
    pub fn gguf_name(self, hf: &str) -> Option<String> {
        let (role, layer) = self.parse_hf(hf)?;
        Some(self.gguf(role, layer.unwrap_or(0)))
    }

    /// The Hugging Face name of a GGUF tensor name (`None` for a stack of experts, which is many).
    pub fn hf_name(self, gguf: &str) -> Option<String> {
        let (role, layer) = self.parse_gguf(gguf)?;
        (!role.per_expert()).then(|| self.hf(role, layer.unwrap_or(0)))
    }
}

/// A canonical decimal index ("07" would alias "7").
fn index(s: &str) -> Option<usize> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse(rows: impl Iterator<Item = (Role, &'static str)>, prefix: &str, name: &str) -> Option<Slot> {
    let layered = name.strip_prefix(prefix).and_then(|rest| {
        let (l, rest) = rest.split_once('.')?;
        Some((index(l)?, rest))
    });
    for (role, n) in rows {
        if role.per_layer() {
            let Some((l, rest)) = layered else { continue };
            let layer = Some(l);
            if let Some((head, tail)) = n.split_once("{e}") {
                if let Some(e) = rest.strip_prefix(head).and_then(|r| r.strip_suffix(tail)).and_then(index) {
                    return Some(Slot { role, layer, expert: Some(e) });
                }
            } else if rest == n {
                return Some(Slot { role, layer, expert: None });
            }
        } else if name == n {
            return Some(Slot { role, layer: None, expert: None });
        }
    }
    None
}

/// Geometry and forward-pass switches of a decoder, parsed once from config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// Family.
    pub family: Family,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Blocks.
    pub layers: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Rotary base of full-attention layers.
    pub rope_theta: f64,
    /// Rotary base of sliding-window layers (Gemma 3's `rope_local_base_freq`).
    pub rope_local_theta: f64,
    /// Per block: the sliding window it attends over, `None` for full attention.
    pub windows: Vec<Option<usize>>,
    /// Attention score scale (`1/√head_dim`, Gemma's `query_pre_attn_scalar^-½`).
    pub attn_scale: f64,
    /// Whether lm_head is the embedding matrix.
    pub tied: bool,
    /// Context length.
    pub max_positions: usize,
    /// Experts per block of a mixture ([`Family::is_moe`]), 0 for a dense MLP.
    pub experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`), 0 for a dense MLP.
    pub experts_used: usize,
    /// Whether the chosen experts' softmax weights are renormalized to sum to 1 (Mixtral always;
    /// Qwen3-MoE with `norm_topk_prob`).
    pub norm_topk: bool,
}

impl Geometry {
    /// Parses and checks config.json. Errors name the key.
    pub fn from_config(config: &Value) -> Result<Geometry, String> {
        let model_type = config["model_type"].as_str().unwrap_or("");
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            format!("config.json: model_type {model_type:?} is not a decoder family mcompress reads ({DECODERS})")
        })?;
        let u = |k: &str| dim(config, k);
        let uo = |k: &str| if config[k].is_null() { Ok(None) } else { dim(config, k).map(Some) };
        let f = |k: &str, default: f64| match &config[k] {
            Value::Null => Ok(default),
            v => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("config.json: {k} = {v}: must be a positive finite number")),
        };
        let (hidden, heads, layers) = (u("hidden_size")?, u("num_attention_heads")?, u("num_hidden_layers")?);
        let kv_heads = uo("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match uo("head_dim")? {
            Some(d) => d,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(format!("config.json: {heads} heads do not divide hidden_size {hidden} (and no head_dim)"));
            }
        };
        if !heads.is_multiple_of(kv_heads) || head_dim % 2 != 0 {
            return Err(format!(
                "config.json: num_attention_heads {heads} / num_key_value_heads {kv_heads} / head_dim {head_dim}: \
                 the heads must be a multiple of the KV heads and head_dim even"
            ));
        }
        let rope_theta = rope(config, "full_attention", "rope_theta")?.unwrap_or(match family {
            Family::Llama | Family::Mistral | Family::Phi3 | Family::Qwen3Moe => 10_000.0,
            Family::Qwen2 | Family::Gemma3 | Family::Mixtral => 1_000_000.0,
        });
        if family == Family::Qwen3Moe {
            if config["attention_bias"].as_bool() == Some(true) {
                return Err(
                    "config.json: attention_bias = true: q/k/v biases in a qwen3_moe are not implemented".into()
                );
            }
            let dense = config["mlp_only_layers"].as_array().is_some_and(|a| !a.is_empty());
            if dense || config["decoder_sparse_step"].as_u64().is_some_and(|s| s != 1) {
                return Err(
                    "config.json: mlp_only_layers / decoder_sparse_step: dense MLP blocks between the mixtures \
                            are not implemented (every block must be a mixture)"
                        .into(),
                );
            }
        }
        // MixtralConfig's defaults: 8 experts, 2 per token; Qwen3MoeConfig's: 128 and 8
        // (`num_experts`, which transformers 5 also writes as `num_local_experts`).
        let (experts, experts_used) = if family.is_moe() {
            let qwen = family == Family::Qwen3Moe;
            let e = match uo("num_local_experts")? {
                Some(e) => e,
                None => uo("num_experts")?.unwrap_or(if qwen { 128 } else { 8 }),
            };
            let k = uo("num_experts_per_tok")?.unwrap_or(if qwen { 8 } else { 2 });
            if k > e || e > MAX_EXPERTS {
                return Err(format!(
                    "config.json: num_experts_per_tok {k} / num_local_experts {e}: at most {MAX_EXPERTS} experts, \
                     and no more used per token than there are"
                ));
            }
            (e, k)
        } else {
            (0, 0)
        };
        if family == Family::Phi3
            && let Some(p) = config["partial_rotary_factor"].as_f64()
            && (p - 1.0).abs() > f64::EPSILON
        {
            return Err(format!(
                "config.json: partial_rotary_factor = {p}: partial rotary embeddings are not implemented"
            ));
        }
        let rope_local_theta = rope(config, "sliding_attention", "rope_local_base_freq")?.unwrap_or(10_000.0);
        let eps = f(
            "rms_norm_eps",
            if matches!(family, Family::Gemma3 | Family::Mistral | Family::Qwen3Moe) { 1e-6 } else { 1e-5 },
        )?;
        let norm_topk = match family {
            Family::Qwen3Moe => match &config["norm_topk_prob"] {
                Value::Null => false,
                Value::Bool(b) => *b,
                v => return Err(format!("config.json: norm_topk_prob = {v}: must be true or false")),
            },
            _ => true,
        };
        let windows = windows(config, family, layers)?;
        let attn_scale = match family {
            Family::Gemma3 => 1.0 / f("query_pre_attn_scalar", 256.0)?.sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let tied = match &config["tie_word_embeddings"] {
            Value::Bool(b) => *b,
            Value::Null => family == Family::Gemma3,
            v => return Err(format!("config.json: tie_word_embeddings = {v}: must be true or false")),
        };
        for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if !config[k].is_null() {
                return Err(format!("config.json: {k} is set; logit soft-capping (Gemma 2) is not implemented"));
            }
        }
        if family != Family::Gemma3 && !config["rope_scaling"].is_null() {
            return Err("config.json: rope_scaling is set; scaled rotary embeddings are not implemented".into());
        }
        Ok(Geometry {
            family,
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate: if family == Family::Qwen3Moe {
                uo("moe_intermediate_size")?.unwrap_or(768)
            } else {
                u("intermediate_size")?
            },
            layers,
            vocab: u("vocab_size")?,
            eps,
            rope_theta,
            rope_local_theta,
            windows,
            attn_scale,
            tied,
            // transformers' defaults where the key is absent: MistralConfig 4096 × 32.
            max_positions: uo("max_position_embeddings")?.unwrap_or(match family {
                Family::Mistral | Family::Mixtral => 131_072,
                Family::Phi3 => 4096,
                Family::Qwen3Moe => 32_768,
                _ => 2048,
            }),
            experts,
            experts_used,
            norm_topk,
        })
    }

    /// The rotary base of layer `layer`: Gemma 3's sliding layers rotate with the local base,
    /// every other layer (Qwen2's sliding ones included) with the global one.
    pub fn layer_rope_theta(&self, layer: usize) -> f64 {
        if self.family == Family::Gemma3 && self.windows[layer].is_some() {
            self.rope_local_theta
        } else {
            self.rope_theta
        }
    }

    /// What the embeddings are multiplied by (√hidden for Gemma, else 1).
    #[allow(clippy::cast_possible_truncation)]
    pub fn embed_scale(&self) -> f32 {
        if self.family.scales_embeddings() { (self.hidden as f32).sqrt() } else { 1.0 }
    }

    /// Whether a GGUF can say this model's layer pattern: llama.cpp's gemma3 loader fixes it
    /// (every sixth layer global), so a Gemma whose `layer_types` differ (layers removed) cannot
    /// be written as GGUF. Other families have no pattern to lose.
    pub fn gguf_layer_pattern_ok(&self) -> bool {
        self.family != Family::Gemma3
            || (0u64..).zip(&self.windows).all(|(i, w)| w.is_some() == gemma3_slides(i, GEMMA3_GLOBAL_EVERY))
    }

    /// The sliding window a GGUF of this model loses: llama.cpp runs a Mistral as a llama, over
    /// the whole context, so beyond the window its outputs differ from transformers'. `None`
    /// when the GGUF architecture keeps the window or no window is shorter than the context.
    pub fn gguf_window_lost(&self) -> Option<usize> {
        if self.family.gguf_sliding_window() {
            return None;
        }
        self.windows.iter().flatten().copied().filter(|&w| w < self.max_positions).min()
    }

    /// The shape a tensor of this role must have.
    pub fn shape(&self, role: Role) -> Vec<usize> {
        let (h, q, kv, i) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate);
        match role {
            Role::Embed | Role::Output => vec![self.vocab, h],
            Role::OutputNorm | Role::AttnNorm | Role::PostAttnNorm | Role::FfnNorm | Role::PostFfnNorm => vec![h],
            Role::Q => vec![q, h],
            Role::K | Role::V => vec![kv, h],
            Role::O => vec![h, q],
            Role::QBias => vec![q],
            Role::KBias | Role::VBias => vec![kv],
            Role::QNorm | Role::KNorm => vec![self.head_dim],
            Role::Gate | Role::Up | Role::ExpertGate | Role::ExpertUp => vec![i, h],
            Role::Down | Role::ExpertDown => vec![h, i],
            Role::Qkv => vec![q + 2 * kv, h],
            Role::GateUp => vec![2 * i, h],
            Role::Router => vec![self.experts, h],
        }
    }

    /// The share of all parameters that are experts' (0 for a dense model).
    pub fn expert_share(&self) -> f64 {
        let (total, one_expert) = self.param_split();
        if total == 0.0 { 0.0 } else { one_expert * self.experts as f64 / total }
    }

    /// Parameters per token the forward pass multiplies by (every expert counted for a dense
    /// MLP; only `experts_used` of `experts` for a mixture), as a share of all: 1 for a dense
    /// model.
    pub fn active_share(&self) -> f64 {
        let (total, one_expert) = self.param_split();
        let idle = self.experts.saturating_sub(self.experts_used) as f64 * one_expert;
        if total == 0.0 { 1.0 } else { (total - idle) / total }
    }

    /// (all parameters, the parameters of one expert over every block), counted from the shapes
    /// without listing tensors (an untrusted config may claim 2^24 layers).
    fn param_split(&self) -> (f64, f64) {
        let size = |r: Role| self.shape(r).iter().product::<usize>() as f64;
        let (layers, experts) = (self.layers as f64, self.experts as f64);
        let total: f64 = self
            .family
            .roles()
            .filter(|r| !(*r == Role::Output && self.tied))
            .map(|r| {
                if r.per_expert() {
                    size(r) * layers * experts
                } else if r.per_layer() {
                    size(r) * layers
                } else {
                    size(r)
                }
            })
            .sum();
        let one_expert = if self.experts == 0 {
            0.0
        } else {
            [Role::ExpertGate, Role::ExpertUp, Role::ExpertDown].into_iter().map(size).sum::<f64>() * layers
        };
        (total, one_expert)
    }

    /// Every tensor the model must have, by Hugging Face name, with its shape (lm_head only when
    /// untied).
    pub fn expected(&self) -> Vec<(String, Role, Vec<usize>)> {
        let mut out = Vec::new();
        for role in self.family.roles() {
            if role == Role::Output && self.tied {
                continue;
            }
            if role.per_expert() {
                for l in 0..self.layers {
                    out.extend((0..self.experts).map(|e| (self.family.hf_expert(role, l, e), role, self.shape(role))));
                }
            } else if role.per_layer() {
                out.extend((0..self.layers).map(|l| (self.family.hf(role, l), role, self.shape(role))));
            } else {
                out.push((self.family.hf(role, 0), role, self.shape(role)));
            }
        }
        out
    }

    /// The completeness check: `tensors` (name, shape) are exactly the model's — every expected
    /// tensor present with its shape, nothing unaccounted for. The output matrix is optional
    /// either way: a tied model may carry an lm_head anyway (some exporters write it; it is then
    /// used), and a model without one reads the embedding as its head (what mcompress has always
    /// done for configs that omit `tie_word_embeddings`).
    ///
    /// # Errors
    /// The first missing, misshapen or unknown tensor, named.
    pub fn check_tensors<'a>(&self, tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<(), String> {
        // Work bounded by the tensors given, not by the config's layer count (an untrusted
        // config.json may claim 2^24 layers).
        let f = self.family;
        let mut seen = std::collections::HashSet::new();
        for (name, shape) in tensors {
            let unknown = || {
                format!(
                    "tensor {name} is not part of a {} model with this config.json (a tensor the eval would ignore)",
                    f.model_type()
                )
            };
            let slot = f.slot_hf(name).ok_or_else(unknown)?;
            if slot.layer.is_some_and(|l| l >= self.layers) || slot.expert.is_some_and(|e| e >= self.experts) {
                return Err(unknown());
            }
            let want = self.shape(slot.role);
            if shape != want.as_slice() {
                return Err(format!("tensor {name} has shape {shape:?}, expected {want:?}"));
            }
            seen.insert(slot);
        }
        // The output matrix is optional (see above); every other role must be there.
        let globals: Vec<Role> = f.roles().filter(|r| !r.per_layer() && *r != Role::Output).collect();
        let slot = |role, layer, expert| Slot { role, layer, expert };
        if let Some(r) = globals.iter().find(|r| !seen.contains(&slot(**r, None, None))) {
            return Err(format!("tensor {} missing", f.hf(*r, 0)));
        }
        // Per block: each per-block role once, each per-expert role once per expert.
        let per_block: Vec<Slot> = f
            .roles()
            .filter(|r| r.per_layer())
            .flat_map(|r| {
                let experts = if r.per_expert() { (0..self.experts).map(Some).collect() } else { vec![None] };
                experts.into_iter().map(move |e| slot(r, None, e))
            })
            .collect();
        let present = seen.iter().filter(|s| s.layer.is_some()).count();
        if present < per_block.len() * self.layers {
            // The first gap lies within the first `present + 1` slots.
            for l in 0..self.layers {
                if let Some(s) = per_block.iter().map(|s| Slot { layer: Some(l), ..*s }).find(|s| !seen.contains(s)) {
                    return Err(format!("tensor {} missing", f.hf_slot(s)));
                }
            }
        }
        Ok(())
    }
}

/// A rope base from `rope_parameters[kind].rope_theta` (transformers 5) or the legacy key.
fn rope(config: &Value, kind: &str, legacy: &str) -> Result<Option<f64>, String> {
    let params = &config["rope_parameters"];
    let v = if params[kind].is_object() {
        &params[kind]["rope_theta"]
    } else if params.is_object() && legacy == "rope_theta" {
        &params["rope_theta"]
    } else {
        &config[legacy]
    };
    for p in [&params[kind], params] {
        if let Some(t) = p["rope_type"].as_str()
            && t != "default"
        {
            return Err(format!("config.json: rope_type {t:?}: scaled rotary embeddings are not implemented"));
        }
    }
    match v {
        Value::Null => Ok(None),
        v => v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .map(Some)
            .ok_or_else(|| format!("config.json: {legacy} = {v}: must be a positive finite number")),
    }
}

/// Per block: the sliding window, from `layer_types` (or Gemma 3's every-sixth-layer-global
/// pattern, or Qwen2's `use_sliding_window`).
fn windows(config: &Value, family: Family, layers: usize) -> Result<Vec<Option<usize>>, String> {
    let window = match &config["sliding_window"] {
        // MistralConfig's default when the key is absent (an explicit null means none;
        // MixtralConfig's default is none).
        Value::Null if family == Family::Mistral && config.get("sliding_window").is_none() => Some(4096),
        Value::Null => None,
        v => Some(
            v.as_u64()
                .filter(|&w| w > 0 && w <= MAX_DIM)
                .ok_or_else(|| format!("config.json: sliding_window = {v}: must be between 1 and {MAX_DIM}"))?
                as usize,
        ),
    };
    // MistralModel, MixtralModel and Phi3Model window every layer when sliding_window is set,
    // whatever layer_types says.
    let sliding: Vec<bool> = if matches!(family, Family::Mistral | Family::Phi3 | Family::Mixtral) {
        vec![window.is_some(); layers]
    } else if let Some(types) = config["layer_types"].as_array() {
        if types.len() != layers {
            return Err(format!("config.json: layer_types has {} entries for {layers} layers", types.len()));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!("config.json: layer_types entry {t}: sliding_attention or full_attention")),
            })
            .collect::<Result<_, _>>()?
    } else {
        match family {
            Family::Gemma3 => {
                let every = config["sliding_window_pattern"].as_u64().map_or(GEMMA3_GLOBAL_EVERY, |p| p.max(1));
                (0..layers as u64).map(|i| gemma3_slides(i, every)).collect()
            }
            Family::Qwen2 | Family::Qwen3Moe if config["use_sliding_window"].as_bool() == Some(true) => {
                let max = config["max_window_layers"].as_u64().unwrap_or(layers as u64) as usize;
                (0..layers).map(|i| i >= max).collect()
            }
            _ => vec![false; layers],
        }
    };
    if sliding.iter().any(|&s| s) && window.is_none() {
        return Err("config.json: sliding-window layers but no sliding_window".into());
    }
    Ok(sliding.into_iter().map(|s| if s { window } else { None }).collect())
}

/// config.json for a decoder GGUF, from its `{arch}.*` metadata (the fields transformers' config
/// class for the family reads). `has_output`: the file carries its own output matrix.
///
/// # Errors
/// A missing or out-of-range key, named.
#[allow(clippy::many_single_char_names)] // g: the file; u, f: its integer and float readers
pub fn gguf_config(g: &crate::gguf::GgufFile, family: Family, has_output: bool) -> Result<Value, String> {
    use crate::gguf::GgufValue;
    let a = family.gguf_arch();
    let key = |k: &str| format!("{a}.{k}");
    let u = |k: &str| {
        let k = key(k);
        let v = g.get(&k).and_then(GgufValue::as_u64).ok_or_else(|| format!("GGUF: missing or non-integer {k}"))?;
        if v == 0 || v > MAX_DIM {
            return Err(format!("GGUF: {k} = {v}: must be between 1 and {MAX_DIM}"));
        }
        Ok(v)
    };
    let uo = |k: &str| g.get(&key(k)).map(|_| u(k)).transpose();
    let f = |k: &str| {
        let k = key(k);
        match g.get(&k).and_then(GgufValue::as_f64) {
            Some(v) if !(v.is_finite() && v > 0.0) => Err(format!("GGUF: {k} = {v}: must be a positive finite number")),
            v => Ok(v),
        }
    };
    let vocab = match g.get(&key("vocab_size")).and_then(GgufValue::as_u64) {
        Some(v) => v,
        None => g.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).map_or(0, |a| a.len() as u64),
    };
    // A file without a vocabulary (tensors only) still opens for inspect and dequantize; a
    // model that runs needs one, which `Geometry::from_config` checks.
    if vocab > MAX_DIM {
        return Err(format!("GGUF: vocabulary of {vocab} tokens: at most {MAX_DIM}"));
    }
    let n_head = u("attention.head_count")?;
    let n_kv = uo("attention.head_count_kv")?.unwrap_or(n_head);
    let hidden = u("embedding_length")?;
    let layers = u("block_count")?;
    let token = |k: &str| g.get(&format!("tokenizer.ggml.{k}_token_id")).and_then(GgufValue::as_u64);
    let theta = f("rope.freq_base")?.unwrap_or(if family.gguf_arch() == "llama" { 10_000.0 } else { 1_000_000.0 });
    let eps = f("attention.layer_norm_rms_epsilon")?.unwrap_or(if family == Family::Gemma3 { 1e-6 } else { 1e-5 });
    // Key order as mcompress has always written a llama config (bundles stay byte-identical).
    let mut config = serde_json::json!({
        "architectures": [family.hf_class()],
        "model_type": family.model_type(),
        "hidden_size": hidden,
        "intermediate_size": u("feed_forward_length")?,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": uo("context_length")?.unwrap_or(2048),
        "vocab_size": vocab,
    });
    if family != Family::Gemma3 {
        config["hidden_act"] = "silu".into();
    }
    config["tie_word_embeddings"] = (!has_output).into();
    config["bos_token_id"] = token("bos").into();
    config["eos_token_id"] = token("eos").into();
    config["torch_dtype"] = "float32".into();
    // A head width other than embedding_length / head_count (heads pruned away, or Gemma's 256).
    let key_length = uo("attention.key_length")?;
    match family {
        Family::Llama | Family::Mistral | Family::Qwen2 | Family::Phi3 | Family::Mixtral | Family::Qwen3Moe => {
            if family == Family::Phi3 {
                // Phi3Config's own defaults (pad 32000, a 2047 window in some checkpoints) are
                // not the file's: say what the GGUF says.
                config["sliding_window"] = Value::Null;
                config["pad_token_id"] = token("padding").into();
            }
            if family == Family::Mistral {
                // Never read from a GGUF (llama.cpp writes Mistral as llama): no window.
                config["sliding_window"] = Value::Null;
            }
            if family.is_moe() {
                config["num_local_experts"] = u("expert_count")?.into();
                config["num_experts_per_tok"] = u("expert_used_count")?.into();
                config["sliding_window"] = Value::Null;
            }
            if family == Family::Qwen3Moe {
                // llama.cpp's qwen3moe renormalizes the chosen experts' weights.
                config["moe_intermediate_size"] = u("expert_feed_forward_length")?.into();
                config["norm_topk_prob"] = true.into();
                config["use_sliding_window"] = false.into();
            }
            if family == Family::Qwen2 {
                config["use_sliding_window"] = false.into();
            }
            if let Some(hd) = key_length {
                config["head_dim"] = hd.into();
            }
        }
        Family::Gemma3 => {
            // llama.cpp's gemma3 loader fixes what the GGUF does not say: every sixth layer is
            // global, local layers rotate with base 10 000, scores scale by 1/√head_dim (all
            // sizes but 27B, whose query_pre_attn_scalar is hidden/heads).
            let hd = key_length.unwrap_or(hidden / n_head);
            let window = uo("attention.sliding_window")?.unwrap_or(4096);
            config["hidden_activation"] = "gelu_pytorch_tanh".into();
            config["head_dim"] = hd.into();
            config["query_pre_attn_scalar"] = hd.into();
            config["sliding_window"] = window.into();
            config["layer_types"] = (0..layers)
                .map(|i| if gemma3_slides(i, GEMMA3_GLOBAL_EVERY) { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>()
                .into();
            config["rope_local_base_freq"] = 10_000.0.into();
            config["rope_scaling"] = Value::Null;
            config["final_logit_softcapping"] = Value::Null;
            config["attn_logit_softcapping"] = Value::Null;
            config["pad_token_id"] = token("padding").into();
        }
    }
    Ok(config)
}

/// What kind of model a config.json describes: a decoder family, a BERT encoder, or mcompress's
/// plain MLP classifier (`model_type = "mlp"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// A decoder of one of the [`Family`]s.
    Decoder(Family),
    /// transformers' `BertModel` (sentence-transformers encoders such as all-MiniLM-L6-v2).
    Bert,
    /// Linear layers named by `layer_names`, ReLU between them.
    Mlp,
}

impl ModelKind {
    /// The kind of a config.json, by `model_type`; `None` for any other.
    pub fn of_config(config: &Value) -> Option<ModelKind> {
        match model_type(config) {
            "bert" => Some(ModelKind::Bert),
            "mlp" => Some(ModelKind::Mlp),
            t => Family::from_model_type(t).map(ModelKind::Decoder),
        }
    }

    /// Name prefix of block `i`'s tensors and of the blocks' index (`model.layers.` /
    /// `encoder.layer.`); `None` for an MLP, whose layers are named by its config.
    pub fn blocks_prefix(self) -> Option<&'static str> {
        match self {
            ModelKind::Decoder(_) => Some(HF_LAYER),
            ModelKind::Bert => Some(BERT_LAYER),
            ModelKind::Mlp => None,
        }
    }
}

/// Whether config.json ties the input embedding to the output head (`tie_word_embeddings`;
/// absent: Gemma 3 ties, as its transformers config defaults to, other models do not).
pub fn ties_word_embeddings(config: &Value) -> bool {
    match &config["tie_word_embeddings"] {
        Value::Bool(b) => *b,
        _ => Family::of_config(config) == Some(Family::Gemma3),
    }
}

/// Whether a tensor name is an embedding table in any model the tool reads, by the spellings
/// of transformers' models (`model.embed_tokens.weight`, `embeddings.word_embeddings.weight`,
/// GPT-2's `wte`/`wpe`). Passes decide default targets by name before a config is consulted:
/// embeddings are left alone (a tied input embedding cannot be quantized in place, and vLLM
/// loads no quantized embedding).
pub fn is_embedding_name(name: &str) -> bool {
    name.contains("embed") || name.ends_with("wte.weight") || name.ends_with("wpe.weight")
}

/// Whether a tensor name is a mixture of experts' router (Mixtral's `block_sparse_moe.gate`,
/// Qwen-MoE's `mlp.gate`). Passes leave routers alone by default, as llm-compressor's recipes
/// ignore them and llama.cpp keeps `ffn_gate_inp` in F32: a few thousand parameters per block
/// that decide which experts run.
pub fn is_router_name(name: &str) -> bool {
    name.ends_with(".block_sparse_moe.gate.weight") || name.ends_with(".mlp.gate.weight")
}

/// Whether a tensor name is a decoder's output head (`lm_head.weight`) by transformers' spelling.
pub fn is_output_head_name(name: &str) -> bool {
    name.starts_with("lm_head")
}

/// Whether a tensor name is a normalization layer's (`…norm…`, `LayerNorm`), by transformers'
/// spellings.
pub fn is_norm_name(name: &str) -> bool {
    name.to_ascii_lowercase().contains("norm")
}

/// config.json's `model_type` (empty when absent), for dispatch and messages.
pub fn model_type(config: &Value) -> &str {
    config["model_type"].as_str().unwrap_or("")
}

/// Prefix of BERT's encoder blocks.
const BERT_LAYER: &str = "encoder.layer.";

/// A tensor's role in a BERT encoder (transformers' `BertModel` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BertRole {
    /// `embeddings.word_embeddings`.
    WordEmbed,
    /// `embeddings.position_embeddings`.
    PosEmbed,
    /// `embeddings.token_type_embeddings`.
    TypeEmbed,
    /// `embeddings.LayerNorm`.
    EmbedNorm,
    /// Attention query projection.
    Query,
    /// Attention key projection.
    Key,
    /// Attention value projection.
    Value,
    /// Attention output projection.
    AttnOut,
    /// LayerNorm after attention.
    AttnNorm,
    /// Feed-forward up projection (`intermediate.dense`).
    Inter,
    /// Feed-forward down projection (`output.dense`).
    Out,
    /// LayerNorm after the feed-forward block.
    OutNorm,
}

impl BertRole {
    /// The embedding tables.
    pub const EMBEDDINGS: [BertRole; 3] = [BertRole::WordEmbed, BertRole::PosEmbed, BertRole::TypeEmbed];
    /// The linear layers of a block.
    pub const LINEAR: [BertRole; 6] =
        [BertRole::Query, BertRole::Key, BertRole::Value, BertRole::AttnOut, BertRole::Inter, BertRole::Out];

    /// The module's name (append `.weight` or `.bias`); `layer` is ignored for the embeddings.
    pub fn module(self, layer: usize) -> String {
        let local = match self {
            BertRole::WordEmbed => return "embeddings.word_embeddings".into(),
            BertRole::PosEmbed => return "embeddings.position_embeddings".into(),
            BertRole::TypeEmbed => return "embeddings.token_type_embeddings".into(),
            BertRole::EmbedNorm => return "embeddings.LayerNorm".into(),
            BertRole::Query => "attention.self.query",
            BertRole::Key => "attention.self.key",
            BertRole::Value => "attention.self.value",
            BertRole::AttnOut => "attention.output.dense",
            BertRole::AttnNorm => "attention.output.LayerNorm",
            BertRole::Inter => "intermediate.dense",
            BertRole::Out => "output.dense",
            BertRole::OutNorm => "output.LayerNorm",
        };
        format!("{BERT_LAYER}{layer}.{local}")
    }

    /// The module's weight.
    pub fn weight(self, layer: usize) -> String {
        format!("{}.weight", self.module(layer))
    }

    /// The module's bias.
    pub fn bias(self, layer: usize) -> String {
        format!("{}.bias", self.module(layer))
    }
}

/// A BERT encoder's geometry, parsed once from config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct BertGeometry {
    /// Hidden width.
    pub hidden: usize,
    /// Attention heads (before `pruned_heads`).
    pub heads: usize,
    /// Encoder blocks.
    pub layers: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Position table length.
    pub max_positions: usize,
    /// Token-type table length (2 when absent).
    pub type_vocab: usize,
    /// LayerNorm epsilon (1e-12 when absent).
    pub eps: f64,
}

impl BertGeometry {
    /// Reads and checks the geometry; errors name the key.
    pub fn from_config(config: &Value) -> Result<BertGeometry, String> {
        let (hidden, heads) = (dim(config, "hidden_size")?, dim(config, "num_attention_heads")?);
        if hidden % heads != 0 {
            return Err(format!("config.json: hidden_size {hidden} not divisible by {heads} heads"));
        }
        if config["hidden_act"].as_str().is_some_and(|a| a != "gelu") {
            return Err(format!("config.json: hidden_act {} is not supported (gelu is)", config["hidden_act"]));
        }
        let type_vocab = match &config["type_vocab_size"] {
            Value::Null => 2,
            _ => dim(config, "type_vocab_size")?,
        };
        Ok(BertGeometry {
            hidden,
            heads,
            layers: dim(config, "num_hidden_layers")?,
            intermediate: dim(config, "intermediate_size")?,
            vocab: dim(config, "vocab_size")?,
            max_positions: dim(config, "max_position_embeddings")?,
            type_vocab,
            eps: config["layer_norm_eps"].as_f64().filter(|e| e.is_finite() && *e > 0.0).unwrap_or(1e-12),
        })
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// mcompress's MLP classifier (`model_type = "mlp"`): linear layers in order, ReLU between.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpGeometry {
    /// Module names of the linear layers, input to output (each has `.weight` and `.bias`).
    pub layers: Vec<String>,
    /// Input features (`input_size`; 0 when absent: read from the first layer).
    pub input_size: usize,
    /// Output classes (`num_labels`; 0 when absent: read from the last layer).
    pub num_labels: usize,
    /// What inputs are multiplied by before the first layer (`input_scale`, 1 when absent).
    pub input_scale: f32,
}

impl MlpGeometry {
    /// Reads and checks `layer_names`, `hidden_act`, `input_size`, `num_labels`, `input_scale`.
    pub fn from_config(config: &Value) -> Result<MlpGeometry, String> {
        if config["hidden_act"].as_str().is_some_and(|a| a != "relu") {
            return Err(format!("config.json: hidden_act {} is not supported (relu is)", config["hidden_act"]));
        }
        let layers = config["layer_names"]
            .as_array()
            .ok_or_else(|| "config.json: layer_names missing".to_string())?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "config.json: layer_names must be strings".to_string())?;
        let opt = |k: &str| if config[k].is_null() { Ok(0) } else { dim(config, k) };
        Ok(MlpGeometry {
            layers,
            input_size: opt("input_size")?,
            num_labels: opt("num_labels")?,
            input_scale: crate::config::input_scale(config)?,
        })
    }
}

impl ModelKind {
    /// Blocks (layers) of the model: `num_hidden_layers` for decoders and BERT, the linear
    /// layers of an MLP.
    pub fn blocks(self, config: &Value) -> Result<usize, String> {
        match self {
            ModelKind::Decoder(_) | ModelKind::Bert => dim(config, "num_hidden_layers"),
            ModelKind::Mlp => Ok(MlpGeometry::from_config(config)?.layers.len()),
        }
    }
}

/// config.json after whole blocks were removed: `num_hidden_layers` is the count kept, and the
/// per-layer keys follow their layers (`layer_types`, Gemma 3's sliding and full layers; BERT's
/// `pruned_heads`, keyed by layer). `kept`: original indices of the kept blocks, in order.
pub fn config_keeping_layers(config: &Value, kept: &[usize]) -> Value {
    let mut c = config.clone();
    if let Some(obj) = c.as_object_mut() {
        obj.insert("num_hidden_layers".into(), kept.len().into());
        if let Some(Value::Array(types)) = obj.get("layer_types").cloned() {
            let kept: Vec<Value> = kept.iter().filter_map(|&i| types.get(i).cloned()).collect();
            obj.insert("layer_types".into(), kept.into());
        }
        if let Some(Value::Object(ph)) = obj.get("pruned_heads").cloned() {
            let renumbered: serde_json::Map<String, Value> = ph
                .into_iter()
                .filter_map(|(k, v)| {
                    let old: usize = k.parse().ok()?;
                    let new = kept.iter().position(|&x| x == old)?;
                    Some((new.to_string(), v))
                })
                .collect();
            obj.insert("pruned_heads".into(), Value::Object(renumbered));
        }
    }
    c
}

/// config.json after feed-forward neurons were removed: `intermediate_size` (decoders, BERT:
/// one width for every block, `widths[0]`) or `hidden_sizes` (MLP: one per hidden layer).
pub fn set_ffn_widths(config: &mut Value, widths: &[usize]) {
    let Some(obj) = config.as_object_mut() else { return };
    // A Qwen3-MoE's experts are `moe_intermediate_size` wide (its `intermediate_size` is the
    // dense MLP's, which no block of a mixture we load has).
    let key = if obj.contains_key("moe_intermediate_size") { "moe_intermediate_size" } else { "intermediate_size" };
    if obj.contains_key(key)
        && let Some(w) = widths.first()
    {
        obj.insert(key.into(), (*w).into());
    }
    if obj.contains_key("hidden_sizes") {
        obj.insert("hidden_sizes".into(), widths.to_vec().into());
    }
}

/// config.json of a decoder whose attention heads were removed: head counts and an explicit
/// `head_dim` (no longer `hidden / heads`).
pub fn set_decoder_heads(config: &mut Value, heads: usize, kv_heads: usize, head_dim: usize) {
    let Some(obj) = config.as_object_mut() else { return };
    obj.insert("num_attention_heads".into(), heads.into());
    obj.insert("num_key_value_heads".into(), kv_heads.into());
    obj.insert("head_dim".into(), head_dim.into());
}

/// config.json of a BERT whose attention heads were removed: transformers' `pruned_heads`
/// (original head indices by layer), which `BertModel` prunes before loading the weights.
/// `gone`: per layer, every head removed so far (earlier prunings included), sorted.
pub fn set_bert_pruned_heads(config: &mut Value, gone: &[Vec<usize>]) {
    let Some(obj) = config.as_object_mut() else { return };
    let mut ph = obj.get("pruned_heads").and_then(Value::as_object).cloned().unwrap_or_default();
    for (layer, g) in gone.iter().enumerate() {
        if !g.is_empty() {
            ph.insert(layer.to_string(), g.clone().into());
        }
    }
    obj.insert("pruned_heads".into(), Value::Object(ph));
}

/// BERT: Layer `layer`'s entries of config.json's `pruned_heads` (transformers' convention: original
/// head indices by layer, the key a decimal string), checked and deduplicated.
///
/// # Errors
/// A malformed entry or a head index out of range.
pub fn bert_pruned_heads(config: &serde_json::Value, layer: usize, heads: usize) -> Result<Vec<usize>, String> {
    let entry = &config["pruned_heads"][layer.to_string()];
    if entry.is_null() {
        return Ok(Vec::new());
    }
    let list = entry.as_array().ok_or_else(|| format!("config.json: pruned_heads[\"{layer}\"] is not a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for v in list {
        match v.as_u64() {
            Some(h) if (h as usize) < heads => out.push(h as usize),
            _ => return Err(format!("config.json: pruned_heads[\"{layer}\"]: {v} is not a head index below {heads}")),
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.len() >= heads {
        return Err(format!("config.json: pruned_heads[\"{layer}\"] removes every head"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mistral_windows_follow_transformers_defaults() {
        let mut c = serde_json::json!({"model_type": "mistral", "hidden_size": 8, "num_attention_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 10,
            "layer_types": ["full_attention", "full_attention"]});
        // Absent: MistralConfig's 4096, on every layer (MistralModel ignores layer_types).
        let g = Geometry::from_config(&c).unwrap();
        assert_eq!(g.windows, vec![Some(4096), Some(4096)]);
        assert_eq!((g.eps, g.rope_theta, g.max_positions), (1e-6, 10_000.0, 131_072));
        assert_eq!(g.gguf_window_lost(), Some(4096));
        c["sliding_window"] = Value::Null;
        assert_eq!(Geometry::from_config(&c).unwrap().windows, vec![None, None]);
        c["sliding_window"] = 64.into();
        c["max_position_embeddings"] = 64.into();
        let g = Geometry::from_config(&c).unwrap();
        assert_eq!((g.windows[1], g.gguf_window_lost()), (Some(64), None));
    }

    #[test]
    fn test_decoders_lists_every_family() {
        let names: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
        assert_eq!(DECODERS, names.join(", "));
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
        }
        // A GGUF `llama` is a llama; a Mistral is written as one.
        assert_eq!(Family::from_gguf("llama"), Some(Family::Llama));
        assert_eq!(Family::Mistral.gguf_arch(), "llama");
    }

    #[test]
    fn test_names_round_trip_for_every_role_and_family() {
        for f in Family::ALL {
            for role in f.roles() {
                if role.per_expert() {
                    // Many Hugging Face tensors, one GGUF stack.
                    let hf = f.hf_expert(role, 3, 5);
                    let g = f.gguf_name(&hf).unwrap();
                    assert_eq!((f.hf_name(&g), f.parse_gguf(&g)), (None, Some((role, Some(3)))));
                    assert_eq!(f.slot_hf(&hf), Some(Slot { role, layer: Some(3), expert: Some(5) }));
                    continue;
                }
                let hf = f.hf(role, 3);
                let g = f.gguf_name(&hf).unwrap();
                assert_eq!(f.hf_name(&g).as_deref(), Some(hf.as_str()), "{f:?} {role:?}");
                assert_eq!(f.parse_hf(&hf), Some((role, role.per_layer().then_some(3))));
            }
        }
        assert_eq!(
            Family::Gemma3.gguf_name("model.layers.0.pre_feedforward_layernorm.weight").unwrap(),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(
            Family::Llama.gguf_name("model.layers.0.post_attention_layernorm.weight").unwrap(),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(Family::Llama.parse_hf("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(Family::Llama.parse_hf("model.layers.07.self_attn.q_proj.weight"), None);
        assert_eq!(Family::Llama.parse_hf("model.layers.+7.self_attn.q_proj.weight"), None);
        let m = Family::Mixtral;
        assert_eq!(
            m.gguf_name("model.layers.2.block_sparse_moe.experts.7.w2.weight").unwrap(),
            "blk.2.ffn_down_exps.weight"
        );
        assert_eq!(m.gguf_name("model.layers.2.block_sparse_moe.gate.weight").unwrap(), "blk.2.ffn_gate_inp.weight");
        assert_eq!(m.slot_hf("model.layers.2.block_sparse_moe.experts.07.w2.weight"), None);
        assert_eq!(m.slot_hf("model.layers.2.block_sparse_moe.experts..w2.weight"), None);
        assert_eq!(m.parse_hf("model.layers.2.mlp.down_proj.weight"), None);
    }

    #[test]
    fn test_mixtral_geometry_completeness_and_active_share() {
        let c = serde_json::json!({"model_type": "mixtral", "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 10,
            "num_local_experts": 4, "num_experts_per_tok": 2});
        let g = Geometry::from_config(&c).unwrap();
        assert_eq!((g.experts, g.experts_used, g.rope_theta, g.windows.clone()), (4, 2, 1e6, vec![None, None]));
        assert_eq!(g.shape(Role::Router), vec![4, 8]);
        let exp = g.expected();
        // Per block: norms 2, q k v o 4, router 1, 4 experts × 3.
        assert_eq!(exp.len(), 3 + 2 * (2 + 4 + 1 + 12) - 1 + 1);
        let names: Vec<(&str, &[usize])> = exp.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())).collect();
        g.check_tensors(names.iter().copied()).unwrap();
        let missing: Vec<_> = names
            .iter()
            .copied()
            .filter(|(n, _)| *n != "model.layers.1.block_sparse_moe.experts.3.w3.weight")
            .collect();
        assert_eq!(
            g.check_tensors(missing).unwrap_err(),
            "tensor model.layers.1.block_sparse_moe.experts.3.w3.weight missing"
        );
        let mut extra = names.clone();
        extra.push(("model.layers.0.block_sparse_moe.experts.4.w1.weight", &[16, 8]));
        assert!(g.check_tensors(extra).unwrap_err().contains("experts.4.w1"));
        // Experts: 2 blocks × 4 × 3 × 128 = 3072; per block norms 16, q k v o 192, router 32;
        // embedding, lm_head (untied) and final norm 168: 3720 in all.
        let total = 3072.0 + 2.0 * 240.0 + 168.0;
        assert!((g.expert_share() - 3072.0 / total).abs() < 1e-12, "{} {total}", g.expert_share());
        assert!((g.active_share() - (total - 1536.0) / total).abs() < 1e-12);
        let mut bad = c.clone();
        bad["num_experts_per_tok"] = 5.into();
        assert!(Geometry::from_config(&bad).unwrap_err().contains("num_experts_per_tok"));
    }

    #[test]
    fn test_geometry_and_completeness() {
        let c = serde_json::json!({"model_type": "qwen2", "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 10,
            "tie_word_embeddings": true});
        let g = Geometry::from_config(&c).unwrap();
        assert_eq!((g.head_dim, g.rope_theta), (4, 1e6));
        let exp = g.expected();
        let names: Vec<(&str, &[usize])> = exp.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())).collect();
        g.check_tensors(names.iter().copied()).unwrap();
        let short = &names[1..];
        assert!(g.check_tensors(short.iter().copied()).unwrap_err().contains("missing"));
        let mut extra = names.clone();
        extra.push(("model.layers.0.mlp.extra.weight", &[1]));
        assert!(g.check_tensors(extra).unwrap_err().contains("model.layers.0.mlp.extra.weight"));
        let gemma = serde_json::json!({"model_type": "gemma3_text", "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 7, "intermediate_size": 16, "vocab_size": 10,
            "head_dim": 16, "sliding_window": 4});
        let g = Geometry::from_config(&gemma).unwrap();
        assert_eq!(g.windows, vec![Some(4), Some(4), Some(4), Some(4), Some(4), None, Some(4)]);
        assert!(g.tied);
        assert!((g.attn_scale - 1.0 / 16.0).abs() < 1e-12);
    }

    #[test]
    fn test_model_kinds_and_bert_names() {
        let kind = |t: &str| ModelKind::of_config(&serde_json::json!({ "model_type": t }));
        assert_eq!(kind("bert"), Some(ModelKind::Bert));
        assert_eq!(kind("mlp"), Some(ModelKind::Mlp));
        assert_eq!(kind("qwen2"), Some(ModelKind::Decoder(Family::Qwen2)));
        assert_eq!(kind("gpt2"), None);
        assert_eq!(ModelKind::Bert.blocks_prefix(), Some("encoder.layer."));
        assert_eq!(ModelKind::Decoder(Family::Llama).blocks_prefix(), Some("model.layers."));
        // transformers' BertModel state-dict names (all-MiniLM-L6-v2's safetensors).
        assert_eq!(BertRole::Query.weight(2), "encoder.layer.2.attention.self.query.weight");
        assert_eq!(BertRole::AttnNorm.bias(0), "encoder.layer.0.attention.output.LayerNorm.bias");
        assert_eq!(BertRole::Inter.weight(5), "encoder.layer.5.intermediate.dense.weight");
        assert_eq!(BertRole::Out.weight(5), "encoder.layer.5.output.dense.weight");
        assert_eq!(BertRole::WordEmbed.weight(9), "embeddings.word_embeddings.weight");
        assert_eq!(BertRole::EmbedNorm.module(0), "embeddings.LayerNorm");
    }

    #[test]
    fn test_bert_and_mlp_geometry_refuse_what_they_cannot_run() {
        let mut c = serde_json::json!({
            "model_type": "bert", "hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 6,
            "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512, "hidden_act": "gelu"
        });
        let g = BertGeometry::from_config(&c).unwrap();
        assert_eq!((g.head_dim(), g.type_vocab, g.eps), (32, 2, 1e-12));
        c["num_attention_heads"] = 7.into();
        assert!(BertGeometry::from_config(&c).unwrap_err().contains("not divisible by 7 heads"));
        c["num_attention_heads"] = 12.into();
        c["hidden_act"] = "relu".into();
        assert!(BertGeometry::from_config(&c).unwrap_err().contains("hidden_act"));
        let m = serde_json::json!({"model_type": "mlp", "layer_names": ["a", "b"], "input_size": 64});
        let g = MlpGeometry::from_config(&m).unwrap();
        assert_eq!((g.layers.len(), g.input_size, g.num_labels, g.input_scale), (2, 64, 0, 1.0));
        assert!(MlpGeometry::from_config(&serde_json::json!({"layer_names": [1]})).is_err());
        assert_eq!(ModelKind::Mlp.blocks(&m), Ok(2));
    }

    #[test]
    fn test_config_edits_follow_the_kept_layers_and_units() {
        let c = serde_json::json!({
            "num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"],
            "pruned_heads": {"1": [0], "3": [2]}, "intermediate_size": 100
        });
        let k = config_keeping_layers(&c, &[1, 2]);
        assert_eq!(k["num_hidden_layers"], 2);
        assert_eq!(k["layer_types"], serde_json::json!(["b", "c"]));
        assert_eq!(k["pruned_heads"], serde_json::json!({"0": [0]}));
        let mut k = k;
        set_ffn_widths(&mut k, &[75, 75]);
        assert_eq!(k["intermediate_size"], 75);
        assert!(k.get("hidden_sizes").is_none());
        set_bert_pruned_heads(&mut k, &[vec![0, 3], vec![]]);
        assert_eq!(k["pruned_heads"], serde_json::json!({"0": [0, 3]}));
        set_decoder_heads(&mut k, 6, 2, 64);
        assert_eq!((k["num_attention_heads"].as_u64(), k["num_key_value_heads"].as_u64()), (Some(6), Some(2)));
        // Gemma 3 ties by default; llama only when it says so.
        assert!(ties_word_embeddings(&serde_json::json!({"model_type": "gemma3_text"})));
        assert!(!ties_word_embeddings(&serde_json::json!({"model_type": "llama"})));
        assert!(ties_word_embeddings(&serde_json::json!({"model_type": "llama", "tie_word_embeddings": true})));
    }
}
