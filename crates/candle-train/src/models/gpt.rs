//! A GPT-2-style decoder with Hugging Face GPT-2 parameter names, cut into segments:
//! embedding, one per block, head + loss.

use candle::{DType, Device, Result, Tensor};
use candle_ckpt::SegmentContext;
use serde::{Deserialize, Serialize};

use crate::device::reduction_dtype;
use crate::layers::ops::residual_add;
use crate::layers::{token_cross_entropy, CausalSelfAttention, Dropout, Embedding, LayerNorm, Mlp};
use crate::module::{parameters_of, Forward, ForwardContext, ModuleBuilder, Stacked};
use crate::params::{ParamBuilder, Parameter, Parameters};

/// The shape of a GPT.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Vocabulary size (256 for byte tokens).
    pub vocab_size: usize,
    /// Context length: the longest sequence the model accepts (`n_positions`).
    pub n_ctx: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; must divide `n_embd`.
    pub n_head: usize,
    /// Dropout probability on embeddings, attention probabilities and residual branches.
    pub dropout: f32,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for GptConfig {
    /// The default model trained by the CLI: 4 layers, width 128, 4 heads, context 128, byte
    /// vocabulary (about 0.84 M parameters).
    fn default() -> Self {
        Self {
            vocab_size: 256,
            n_ctx: 128,
            n_embd: 128,
            n_layer: 4,
            n_head: 4,
            dropout: 0.0,
            layer_norm_eps: 1e-5,
        }
    }
}

impl GptConfig {
    /// Checks that every field is usable.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> crate::Result<()> {
        super::check_positive(&[
            ("vocab_size", self.vocab_size),
            ("n_ctx", self.n_ctx),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ])?;
        if self.n_embd % self.n_head != 0 {
            return Err(crate::Error::config(
                "n_head",
                format!("{} heads do not divide the width {}", self.n_head, self.n_embd),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(crate::Error::config("dropout", format!("{} is not in [0, 1)", self.dropout)));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(crate::Error::config("layer_norm_eps", "must be positive"));
        }
        if self.checked_num_parameters().is_none_or(|n| n > MAX_PARAMETERS) {
            return Err(crate::Error::config(
                "n_layer",
                format!(
                    "{} layers of width {} (vocabulary {}, context {}) are more than {MAX_PARAMETERS} parameters",
                    self.n_layer, self.n_embd, self.vocab_size, self.n_ctx
                ),
            ));
        }
        Ok(())
    }

    /// The element count of every parameter, in the model's order (`wte`, `wpe`, each block's
    /// `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, weight then
    /// bias, then `ln_f`).
    pub fn parameter_sizes(&self) -> Vec<usize> {
        let c = self.n_embd;
        let mut sizes = vec![self.vocab_size * c, self.n_ctx * c];
        for _ in 0..self.n_layer {
            sizes.extend([c, c, c * 3 * c, 3 * c, c * c, c, c, c, c * 4 * c, 4 * c, 4 * c * c, c]);
        }
        sizes.extend([c, c]);
        sizes
    }

    /// The number of scalar parameters (embeddings tied with the output head).
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// [`GptConfig::num_parameters`] with overflow-checked arithmetic (`None` on overflow).
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let c = self.n_embd;
        let cc = c.checked_mul(c)?;
        // Per block: 2 norms (weight + bias), attention in (3c x c + 3c) and out (c x c + c),
        // MLP in (4c x c + 4c) and out (c x 4c + c): 12 c^2 + 13 c.
        let block = cc.checked_mul(12)?.checked_add(c.checked_mul(13)?)?;
        self.vocab_size
            .checked_mul(c)?
            .checked_add(self.n_ctx.checked_mul(c)?)?
            .checked_add(self.n_layer.checked_mul(block)?)?
            .checked_add(c.checked_mul(2)?)
    }
}

/// The most parameters a [`GptConfig`] may have (2^40, about 10^12: 4 TiB of FP32 weights
/// alone, beyond any machine this trains on); more is refused before anything is allocated.
pub const MAX_PARAMETERS: usize = 1 << 40;

/// A batch of token sequences and their next-token targets, both `[batch, seq]`: inputs
/// `U32`; targets `U32` (every position counts) or `I64` with
/// [`crate::layers::IGNORE_INDEX`] (-100) where the loss does not count (prompts, padding).
/// The head's loss is the mean over the counted positions
/// ([`crate::layers::token_cross_entropy`]).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Input token ids.
    pub inputs: Tensor,
    /// Target token ids (the inputs shifted by one), or -100 where nothing is counted.
    pub targets: Tensor,
}

impl TokenBatch {
    /// The mean next-token cross-entropy of `logits` (`[batch, seq, vocab]`) against the
    /// targets, over the counted positions: a language model's head loss.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn loss(&self, logits: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        token_cross_entropy(&logits.reshape((b * t, v))?, &self.targets.flatten_all()?)
    }
}

/// One transformer block `h.{i}`: pre-norm attention and MLP, each added to the residual.
#[derive(Debug, Clone)]
pub struct GptBlock {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
    /// The matmuls' dtype (the parameters'); the residual stream stays in F32 under a half type.
    dtype: DType,
}

crate::module_fields!(GptBlock { ln_1, attn, ln_2, mlp });

impl GptBlock {
    fn build(
        b: &ModuleBuilder,
        config: &GptConfig,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        let (c, eps) = (config.n_embd, config.layer_norm_eps);
        Ok(Self {
            ln_1: LayerNorm::build(&b.pp("ln_1"), c, eps)?,
            attn: CausalSelfAttention::build(&b.pp("attn"), c, config.n_head, dropout, std, proj_std)?,
            ln_2: LayerNorm::build(&b.pp("ln_2"), c, eps)?,
            mlp: Mlp::build(&b.pp("mlp"), c, 4 * c, dropout, std, proj_std)?,
            dtype: b.dtype(),
        })
    }
}

impl GptBlock {
    /// The block (without dropout) on the new positions `x` over `cache` (this block's keys
    /// and values), which it extends.
    fn forward_cached(&self, x: &Tensor, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let attn = self.attn.forward_cached(&self.ln_1.forward_as(x, self.dtype)?, cache)?;
        let x = residual_add(x, &attn)?;
        let mlp = Forward::forward(
            &self.mlp,
            &self.ln_2.forward_as(&x, self.dtype)?,
            &mut ForwardContext::new(&SegmentContext::eval()),
        )?;
        residual_add(&x, &mlp)
    }
}

impl Forward for GptBlock {
    /// The block on the residual stream `x`: pre-norm attention, then the MLP, each added.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor> {
        // Each half (norm, layers) as one op where it can be (see `forward_normed`).
        let attn = self.attn.forward_normed(x, &self.ln_1, self.dtype, &mut ctx.rng, ctx.training)?;
        let x = residual_add(x, &attn)?;
        let mlp = self.mlp.forward_normed(&x, &self.ln_2, self.dtype, &mut ctx.rng, ctx.training)?;
        residual_add(&x, &mlp)
    }
}

/// A GPT-2-style decoder-only transformer with tied input/output embeddings.
///
/// Segments ([`Stacked`]): `0` embedding (`wte`, `wpe`), `1..=n_layer` the blocks `h.{i}`, and
/// the last the final norm `ln_f`, the tied head and the cross-entropy loss (computed in F32).
#[derive(Debug, Clone)]
pub struct Gpt {
    config: GptConfig,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<GptBlock>,
    ln_f: LayerNorm,
    dropout: Dropout,
    params: Parameters,
    dtype: DType,
    /// Where a model loaded from a Hugging Face folder came from (its name prefix and config),
    /// so that [`Gpt::save_pretrained`] writes them back.
    pub(crate) source: Option<crate::models::gpt2::Gpt2Source>,
}

impl Gpt {
    /// Builds the model in `dtype` on `device`, initialised as GPT-2 (N(0, 0.02), residual
    /// projections scaled by `1/sqrt(2 n_layer)`) from `seed`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a bad config; a Candle error on allocation failure.
    pub fn new(config: GptConfig, dtype: DType, device: &Device, seed: u64) -> crate::Result<Self> {
        Self::build(config, ParamBuilder::new(dtype, device.clone(), seed), "")
    }

    /// The model over `pb` (drawn or given values), parameter names starting with `prefix`
    /// (`""`, or `transformer.` for a `GPT2LMHeadModel` checkpoint).
    pub(crate) fn build(config: GptConfig, pb: ParamBuilder, prefix: &str) -> crate::Result<Self> {
        config.validate()?;
        let dtype = pb.dtype();
        let root = ModuleBuilder::new(pb);
        let b = match prefix.trim_end_matches('.') {
            "" => root.clone(),
            path => root.pp(path),
        };
        let std = 0.02;
        let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
        let dropout = Dropout::new(config.dropout)?;
        let c = config.n_embd;
        let wte = Embedding::build(&b.pp("wte"), config.vocab_size, c, std)?;
        let wpe = Embedding::build(&b.pp("wpe"), config.n_ctx, c, 0.01)?;
        let blocks = (0..config.n_layer)
            .map(|i| GptBlock::build(&b.pp("h").pp(i), &config, dropout, std, proj_std))
            .collect::<crate::Result<_>>()?;
        let ln_f = LayerNorm::build(&b.pp("ln_f"), c, config.layer_norm_eps)?;
        Ok(Self { config, wte, wpe, blocks, ln_f, dropout, params: root.finish(), dtype, source: None })
    }

    /// The model's shape.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The dtype of the parameters (and the matmuls).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// All parameters, in creation order, named as Hugging Face GPT-2 names them.
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The logits `[batch, seq, vocab]` for `inputs` `[batch, seq]`, without dropout.
    ///
    /// # Errors
    /// On a sequence longer than the context or a tensor error.
    pub fn logits(&self, inputs: &Tensor) -> Result<Tensor> {
        let ctx = SegmentContext::eval();
        let h = self.embed_tokens(inputs, &ctx)?;
        self.head_logits(&crate::module::stack::forward_blocks(&self.blocks, h, &ctx)?)
    }

    /// The logits `[batch, t, vocab]` of the new token ids `ids` `[batch, t]` after the
    /// positions in `cache`, which it extends (without dropout): the whole prompt over an empty
    /// cache, then one token per call. Equal to the last rows of [`Gpt::logits`] on the whole
    /// sequence, up to the summation order of the attention.
    ///
    /// # Errors
    /// Several new tokens over a non-empty cache, a sequence longer than the context, or a
    /// tensor error.
    pub fn logits_cached(&self, ids: &Tensor, cache: &mut crate::models::KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            *cache = crate::models::KvCache::default();
            cache.layers = vec![None; self.blocks.len()];
        }
        let mut h = self.embed_at(ids, cache.len, &SegmentContext::eval())?;
        for (block, block_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            h = block.forward_cached(&h, block_cache)?;
        }
        cache.len += ids.dim(1)?;
        self.head_logits(&h)
    }

    /// The dtype of the residual stream: F32 when the parameters are in a half type (as under
    /// PyTorch autocast, where embeddings and residual adds stay FP32 and only the matmuls'
    /// inputs are cast), else the parameters' dtype.
    pub fn residual_dtype(&self) -> DType {
        reduction_dtype(self.dtype)
    }

    fn embed_tokens(&self, inputs: &Tensor, ctx: &SegmentContext) -> Result<Tensor> {
        self.embed_at(inputs, 0, ctx)
    }

    /// The embeddings of `inputs` at positions `offset..offset + t`.
    fn embed_at(&self, inputs: &Tensor, offset: usize, ctx: &SegmentContext) -> Result<Tensor> {
        let (_, t) = inputs.dims2()?;
        if offset + t > self.config.n_ctx {
            candle::bail!(
                "sequence length {} exceeds the model's context length {}",
                offset + t,
                self.config.n_ctx
            );
        }
        let rd = self.residual_dtype();
        let positions = Tensor::arange(offset as u32, (offset + t) as u32, inputs.device())?;
        let tokens = self.wte.forward(inputs)?.to_dtype(rd)?;
        let h = tokens.broadcast_add(&self.wpe.forward(&positions)?.to_dtype(rd)?)?;
        self.dropout.forward(&h, &mut ctx.rng(0), ctx.training)
    }

    fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        self.wte.tied_logits(&self.ln_f.forward_as(h, self.dtype)?)
    }
}

impl Stacked for Gpt {
    type Batch = TokenBatch;
    type Block = GptBlock;

    fn blocks(&self) -> &[GptBlock] {
        &self.blocks
    }

    fn block_path(&self) -> String {
        "h".into()
    }

    fn first_input(&self, batch: &TokenBatch) -> Result<Tensor> {
        Ok(batch.inputs.clone())
    }

    fn embed(&self, input: &Tensor, _: &TokenBatch, ctx: &SegmentContext) -> Result<Tensor> {
        self.embed_tokens(input, ctx)
    }

    fn head(&self, x: &Tensor, batch: &TokenBatch, _: &SegmentContext) -> Result<Tensor> {
        batch.loss(&self.head_logits(x)?)
    }

    fn embedding_parameters(&self) -> Vec<Parameter> {
        parameters_of(&[&self.wte, &self.wpe])
    }

    fn head_parameters(&self) -> Vec<Parameter> {
        parameters_of(&[&self.ln_f, &self.wte])
    }
}

crate::segmented_stack!(Gpt);

crate::module_fields!(Gpt { wte, wpe, blocks, ln_f });

impl crate::serve::Snapshot for Gpt {
    /// A copy with its own variables (same names, values, dtype and Hugging Face source).
    fn snapshot(&self) -> crate::Result<Self> {
        let tensors = self.params.detached_values()?;
        let device = self.params.device();
        let prefix = self.source.as_ref().map_or("", |s| s.prefix.as_str());
        let mut copy =
            Self::build(self.config, ParamBuilder::from_values(self.dtype, device, tensors), prefix)?;
        copy.source.clone_from(&self.source);
        Ok(copy)
    }
}
