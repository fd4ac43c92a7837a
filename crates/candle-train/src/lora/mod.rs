//! LoRA: low-rank adapters on a frozen model (Hu et al. 2021, as Hugging Face PEFT implements
//! them). Each chosen affine layer computes `x W (+ b) + s B A dropout(x)` with `A` `[r, in]`
//! drawn Kaiming-uniform (PEFT's `kaiming_uniform_(a = sqrt(5))`: U(-1/sqrt(in), 1/sqrt(in))),
//! `B` `[out, r]` zero, and `s = alpha / r` (`alpha / sqrt(r)` under rsLoRA).
//!
//! [`LoraModel`] wraps any model built on the module layer ([`Module`] for the walk over its
//! affine layers, [`SegmentedModel`] for the engine): every parameter of the base is frozen
//! ([`Parameter::set_frozen`]: read as a constant, so no gradient is computed for it, while the
//! gradient of its input still flows), and the wrapper's [`TrainableModel::parameters`] are the
//! adapters only, so the updater (local or ZeRO) holds gradients, master weights and optimizer
//! state for them alone, and checkpoints hold only them. The segments list only adapters; the
//! dropout of a segment draws from the segment's own generator (stream [`LORA_STREAM`]), so a
//! recomputed segment replays its masks.
//!
//! Adapters are saved and loaded as PEFT's `adapter_config.json` + `adapter_model.safetensors`
//! ([`peft`]); [`LoraModel::merge`] folds them into the base weights.
//!
//! ```
//! use candle::{DType, Device};
//! use candle_train::lora::{LoraConfig, LoraModel};
//! use candle_train::{Llama, LlamaConfig, TrainableModel};
//! # fn main() -> candle_train::Result<()> {
//! let base = Llama::new(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 0)?;
//! let config = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::new(["q_proj", "v_proj"]) };
//! let model = LoraModel::new(base, config, 0)?;
//! assert_eq!(model.adapted_layers()[0], "model.layers.0.self_attn.q_proj");
//! assert_eq!(model.parameters().len(), 2 * 2 * 2); // 2 layers x (q, v) x (A, B)
//! # Ok(()) }
//! ```

mod adapter;
pub mod peft;

pub(crate) use adapter::Shared;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle::{DType, Device, Tensor, TensorId, Var};
use candle_ckpt::{Rng, SegmentContext, SegmentParameter, SegmentedModel};
use serde::{Deserialize, Serialize};

pub use adapter::LoraAdapter;

use crate::error::{Error, Result};
use crate::layers::{Dropout, Linear, WeightLayout};
use crate::module::Module;
use crate::params::{Parameter, Parameters};
use crate::quant::BaseQuantization;
use crate::trainer::{canonical_json, TrainableModel};

/// The random stream (of a segment's [`SegmentContext::rng`]) LoRA's dropout draws from;
/// distinct from stream 0, which the model's own dropout uses.
pub const LORA_STREAM: u64 = 0x4c6f_5241; // "LoRA"

/// The target that selects every affine layer except the output head (`lm_head`), as PEFT's
/// `all-linear`.
pub const ALL_LINEAR: &str = "all-linear";

/// Which layers get adapters and how they are shaped. Field names follow PEFT's `LoraConfig`
/// where they mean the same (`r` is `rank`, `lora_alpha` is `alpha`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The rank `r` of `B A`.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / rank` (`alpha / sqrt(rank)` under rsLoRA).
    pub alpha: f64,
    /// The dropout probability on the adapter's input (the base's input is not dropped).
    pub dropout: f32,
    /// Module name patterns: a layer is adapted when its path equals a pattern or ends with
    /// `.pattern` (`q_proj`, `self_attn.v_proj`, `c_attn`); [`ALL_LINEAR`] adapts every affine
    /// layer except `lm_head`. Each pattern must match at least one layer.
    pub targets: Vec<String>,
    /// rsLoRA: scale by `alpha / sqrt(rank)`.
    pub use_rslora: bool,
    /// QLoRA: the format the base's decoder-layer affine weights are held in
    /// ([`crate::quant`]); `None` for a dense base. [`LoraModel::new`] refuses a base that is
    /// not held so (load it with [`crate::Llama::quantize_base`] or
    /// [`crate::models::GgufFile::llama_quantized`]), so the run's settings (and its
    /// checkpoints) record what it trained over. Not a PEFT field: PEFT's files omit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_base: Option<BaseQuantization>,
}

impl LoraConfig {
    /// Rank 8, alpha 16, no dropout, no rsLoRA (PEFT's defaults apart from alpha, which PEFT
    /// sets to 8), on `targets`.
    pub fn new<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: targets.into_iter().map(Into::into).collect(),
            use_rslora: false,
            quantize_base: None,
        }
    }

    /// The factor the update `B A x` is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Checks the values on their own (the targets against a model in [`LoraModel::new`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field: a zero rank, a non-finite or non-positive
    /// alpha, a dropout outside `[0, 1)`, no target, an empty target.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("lora rank", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::config("lora alpha", format!("{} is not a positive number", self.alpha)));
        }
        Dropout::new(self.dropout).map_err(|_| {
            Error::config("lora dropout", format!("{} is not a probability in [0, 1)", self.dropout))
        })?;
        if self.targets.is_empty() {
            return Err(Error::config(
                "lora targets",
                "no target module (give names such as q_proj, or all-linear)",
            ));
        }
        if let Some(t) = self.targets.iter().find(|t| t.trim().is_empty() || t.trim() != t.as_str()) {
            return Err(Error::config("lora targets", format!("`{t}` is not a module name")));
        }
        Ok(())
    }

    /// Whether the layer at `path` is a target.
    pub fn targets_layer(&self, path: &str) -> bool {
        self.targets.iter().any(|t| target_matches(t, path))
    }
}

/// Whether `pattern` selects the layer at `path` (PEFT's rule for a list of names: equal, or a
/// suffix after a dot; `all-linear` selects every layer but `lm_head`).
pub fn target_matches(pattern: &str, path: &str) -> bool {
    if pattern == ALL_LINEAR {
        return path.rsplit('.').next() != Some("lm_head");
    }
    path == pattern || path.strip_suffix(pattern).is_some_and(|head| head.ends_with('.'))
}

/// A model whose affine layers chosen by a [`LoraConfig`] carry trainable adapters while every
/// base parameter is frozen. See the [module docs](self).
#[derive(Debug)]
pub struct LoraModel<M> {
    inner: M,
    config: LoraConfig,
    layers: Vec<Linear>,
    trainable: Parameters,
    trainable_ids: HashSet<TensorId>,
    shared: Arc<adapter::Shared>,
}

impl<M: Module> LoraModel<M> {
    /// Freezes every parameter of `inner` and attaches an adapter to each affine layer that
    /// `config` targets, `A` drawn from `seed`, in the layers' order.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an invalid config, a target pattern that matches no layer
    /// (naming it and the layers' names), a layer that already carries an adapter; a tensor
    /// error. On error `inner` is dropped with it.
    pub fn new(inner: M, config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut all = Vec::new();
        inner.visit_linears(&mut |l| all.push(l.clone()));
        for pattern in &config.targets {
            if !all.iter().any(|l| target_matches(pattern, l.path())) {
                let mut leaves: Vec<&str> =
                    all.iter().map(|l| l.path().rsplit('.').next().unwrap_or("")).collect();
                leaves.sort_unstable();
                leaves.dedup();
                return Err(Error::config(
                    "lora targets",
                    format!(
                        "`{pattern}` matches no linear module (the model's linear modules end in: {})",
                        leaves.join(", ")
                    ),
                ));
            }
        }
        if let Some(quantization) = config.quantize_base {
            check_quantized_base(&all, quantization)?;
        }
        let layers: Vec<Linear> = all.into_iter().filter(|l| config.targets_layer(l.path())).collect();
        for l in &layers {
            if l.adapter()?.is_some() {
                return Err(Error::config(
                    "lora targets",
                    format!("`{}` already carries an adapter", l.path()),
                ));
            }
        }
        let dropout = Dropout::new(config.dropout)?;
        let shared = Arc::new(adapter::Shared::default());
        let mut rng = Rng::seeded(seed);
        let mut handles = Vec::with_capacity(2 * layers.len());
        let mut adapters = Vec::with_capacity(layers.len());
        for l in &layers {
            let (in_features, out_features) = l.features();
            let (dtype, device) = (l.weight().dtype(), l.weight().device().clone());
            let adapter = new_adapter(
                l.path(),
                (in_features, out_features),
                (dtype, &device),
                &config,
                dropout,
                &mut rng,
                &shared,
            )?;
            handles.extend([adapter.a().clone(), adapter.b().clone()]);
            adapters.push(adapter);
        }
        inner.visit_parameters(&mut |p| p.set_frozen(true));
        for (l, adapter) in layers.iter().zip(adapters) {
            l.set_adapter(Some(adapter))?;
        }
        let trainable = Parameters::from_handles(handles)?;
        let trainable_ids = trainable.iter().map(Parameter::id).collect();
        Ok(Self { inner, config, layers, trainable, trainable_ids, shared })
    }

    /// The wrapped model (its adapted layers compute with their adapters).
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapters: `{path}.lora_A.weight`, `{path}.lora_B.weight` per adapted layer, in the
    /// layers' order.
    pub fn adapter_parameters(&self) -> &Parameters {
        &self.trainable
    }

    /// The paths of the adapted layers, in order.
    pub fn adapted_layers(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.path().to_string()).collect()
    }

    /// The adapted layers, in order.
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// Computes every adapted layer through its merged weight `W + s B A` (differentiable in
    /// `A` and `B`) instead of `x W + s B (A x)`: the slow, obviously-correct path tests
    /// compare with. Refused in a training forward with dropout.
    pub fn set_merged_reference(&self, merged: bool) {
        self.shared.merged_reference.store(merged, Ordering::Release);
    }

    /// Writes `W + s B A` into every adapted layer's weight (computed in F32, F64 for F64
    /// weights, stored in the weight's dtype), detaches the adapters, unfreezes the base and
    /// returns it: a plain model whose outputs are the adapted model's, to save as it saves.
    ///
    /// # Errors
    /// On a released parameter or a tensor error; nothing is written unless every merged
    /// weight was computed.
    pub fn merge(self) -> Result<M> {
        if let Some(l) = self.layers.iter().find(|l| l.quantized().is_some()) {
            return Err(Error::config(
                "lora merge",
                format!(
                    "`{}` is quantized: merging into a quantized base would quantize the update away; save the adapter and merge it into the dense base",
                    l.path()
                ),
            ));
        }
        let mut merged = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let Some(adapter) = l.adapter()? else { continue };
            let w = l.weight().tensor()?;
            let delta = adapter.delta_weight()?;
            let delta = match l.layout() {
                WeightLayout::OutIn => delta,
                WeightLayout::InOut => delta.t()?,
            };
            merged.push((w.to_dtype(delta.dtype())?.add(&delta)?.to_dtype(w.dtype())?, l));
        }
        for (value, l) in merged {
            l.weight().var()?.set(&value)?;
        }
        self.unload()
    }

    /// Detaches the adapters, unfreezes the base and returns it unchanged.
    ///
    /// # Errors
    /// When an adapter slot's lock is poisoned.
    pub fn unload(self) -> Result<M> {
        for l in &self.layers {
            l.set_adapter(None)?;
        }
        self.inner.visit_parameters(&mut |p| p.set_frozen(false));
        Ok(self.inner)
    }
}

/// Checks that the base's quantized layers are held as `quantization` says: at least one, and
/// each in that format (any GGML type for a GGUF file's own blocks).
fn check_quantized_base(layers: &[Linear], quantization: BaseQuantization) -> Result<()> {
    let quantized: Vec<_> =
        layers.iter().filter_map(|l| l.quantized().map(|q| (l.path(), q.format()))).collect();
    if quantized.is_empty() {
        return Err(Error::config(
            "lora quantize_base",
            format!(
                "`{quantization}` was asked for, but the base is dense: load it quantized (Llama::quantize_base, GgufFile::llama_quantized)"
            ),
        ));
    }
    for (path, format) in quantized {
        let matches = match quantization {
            BaseQuantization::Gguf => format != "nf4",
            other => format == other.name(),
        };
        if !matches {
            return Err(Error::config(
                "lora quantize_base",
                format!("`{path}` is held as {format}, not as `{quantization}`"),
            ));
        }
    }
    Ok(())
}

fn variable(t: Tensor, dtype: DType, device: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?)
}

/// A new adapter for the affine layer at `path` (`features` = (in, out)): `lora_A` `[r, in]`
/// drawn Kaiming-uniform from `rng` (U(-1/sqrt(in), 1/sqrt(in)), PEFT's), `lora_B` `[out, r]`
/// zero, both in `dtype` on `device`, named `{path}.lora_A.weight` / `{path}.lora_B.weight`.
pub(crate) fn new_adapter(
    path: &str,
    (in_features, out_features): (usize, usize),
    (dtype, device): (DType, &Device),
    config: &LoraConfig,
    dropout: Dropout,
    rng: &mut Rng,
    shared: &Arc<adapter::Shared>,
) -> Result<Arc<LoraAdapter>> {
    let bound = 1.0 / (in_features as f64).sqrt();
    let values: Vec<f64> =
        (0..config.rank * in_features).map(|_| (2.0 * rng.uniform_f64() - 1.0) * bound).collect();
    let a = variable(Tensor::from_vec(values, (config.rank, in_features), &Device::Cpu)?, dtype, device)?;
    let b = variable(Tensor::zeros((out_features, config.rank), DType::F64, &Device::Cpu)?, dtype, device)?;
    let a = Parameter::new(format!("{path}.lora_A.weight"), a);
    let b = Parameter::new(format!("{path}.lora_B.weight"), b);
    Ok(Arc::new(LoraAdapter::new(a, b, config.scale(), dropout, Arc::clone(shared))))
}

/// Clears the segment's dropout generator when the segment's forward ends (or fails).
struct DrawsGuard<'a>(&'a adapter::Shared);

impl Drop for DrawsGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut draws) = self.0.draws.lock() {
            *draws = None;
        }
    }
}

impl<M: SegmentedModel> SegmentedModel for LoraModel<M> {
    type Batch = M::Batch;

    fn num_segments(&self) -> usize {
        self.inner.num_segments()
    }

    fn segment_name(&self, index: usize) -> String {
        self.inner.segment_name(index)
    }

    fn first_input(&self, batch: &Self::Batch) -> candle::Result<Tensor> {
        self.inner.first_input(batch)
    }

    fn forward_segment(
        &self,
        index: usize,
        input: &Tensor,
        batch: &Self::Batch,
        ctx: &SegmentContext,
    ) -> candle::Result<Tensor> {
        {
            let mut draws =
                self.shared.draws.lock().map_err(|_| {
                    candle::Error::wrap(Error::Poisoned { what: "the LoRA dropout generator" })
                })?;
            *draws = ctx.training.then(|| ctx.rng(LORA_STREAM));
        }
        let _clear = DrawsGuard(&self.shared);
        self.inner.forward_segment(index, input, batch, ctx)
    }

    /// The adapters the segment's layers carry (the base is frozen: never listed).
    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        self.inner
            .segment_parameters(index)
            .into_iter()
            .filter(|p| self.trainable_ids.contains(&p.id()))
            .collect()
    }

    fn before_backward(&self, index: usize) -> candle::Result<()> {
        self.inner.before_backward(index)
    }

    fn is_block(&self, index: usize) -> bool {
        self.inner.is_block(index)
    }

    fn stateful_layer(&self, index: usize) -> Option<String> {
        self.inner.stateful_layer(index)
    }
}

impl<M: TrainableModel + Module> TrainableModel for LoraModel<M> {
    /// The adapters only.
    fn parameters(&self) -> &Parameters {
        &self.trainable
    }

    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    fn device(&self) -> Device {
        self.inner.device()
    }

    fn lora_config(&self) -> Option<&LoraConfig> {
        Some(&self.config)
    }

    /// The base's settings and the LoRA config.
    fn settings(&self) -> String {
        format!("{{\"base\":{},\"lora\":{}}}", self.inner.settings(), canonical_json("lora", &self.config))
    }

    /// The frozen base's bytes and the adapters'.
    fn resident_parameter_bytes(&self) -> usize {
        self.inner.resident_parameter_bytes() + self.trainable.size_in_bytes()
    }

    /// The base's resident parameters the segment reads (frozen here) and what the base itself holds
    /// outside its parameters (a quantized base's blocks).
    fn frozen_segment_bytes(&self, index: usize) -> usize {
        let frozen: usize = self
            .inner
            .segment_parameters(index)
            .iter()
            .filter(|p| !self.trainable_ids.contains(&p.id()))
            // A released parameter (sharded away) holds nothing here.
            .map(|p| p.var().map_or(0, |v| v.elem_count() * v.dtype().size_in_bytes()))
            .sum();
        frozen + self.inner.frozen_segment_bytes(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_name_components() {
        assert!(target_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(target_matches("self_attn.q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!target_matches("proj", "model.layers.0.self_attn.q_proj"));
        assert!(target_matches("c_proj", "h.1.mlp.c_proj"));
        assert!(target_matches(ALL_LINEAR, "h.1.mlp.c_proj"));
        assert!(!target_matches(ALL_LINEAR, "lm_head"));
    }

    #[test]
    fn configs_are_checked_field_by_field() {
        let ok = LoraConfig::new(["q_proj"]);
        assert!(ok.validate().is_ok());
        let err = |c: LoraConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(LoraConfig { rank: 0, ..ok.clone() }).contains("lora rank"));
        assert!(err(LoraConfig { alpha: f64::NAN, ..ok.clone() }).contains("lora alpha"));
        assert!(err(LoraConfig { dropout: 1.0, ..ok.clone() }).contains("lora dropout"));
        assert!(err(LoraConfig { targets: vec![], ..ok.clone() }).contains("no target"));
        assert!((LoraConfig { use_rslora: true, rank: 4, alpha: 8.0, ..ok }.scale() - 4.0).abs() < 1e-15);
    }

    /// BERT's encoder and classifier walk their affine layers too; the segments of the wrapped
    /// classifier list exactly the adapters.
    #[test]
    fn bert_classifier_takes_adapters() -> Result<()> {
        use crate::models::{Bert, BertClassifier, BertConfig};
        let bert = Bert::new(&BertConfig::tiny(), "bert.", DType::F32, &Device::Cpu, 0)?;
        let classifier = BertClassifier::new(bert, 3, 1)?;
        let model = LoraModel::new(classifier, LoraConfig::new(["query", "value", "classifier"]), 0)?;
        let layers = model.adapted_layers();
        assert_eq!(layers.first().map(String::as_str), Some("bert.encoder.layer.0.attention.self.query"));
        assert_eq!(layers.last().map(String::as_str), Some("classifier"));
        let listed: usize = (0..model.num_segments()).map(|s| model.segment_parameters(s).len()).sum();
        assert_eq!(listed, TrainableModel::parameters(&model).len());
        assert_eq!(listed, 2 * layers.len());
        Ok(())
    }

    #[test]
    fn a_pattern_that_matches_nothing_is_named() -> Result<()> {
        let base = crate::Llama::new(&crate::LlamaConfig::tiny(), DType::F32, &Device::Cpu, 0)?;
        let err = LoraModel::new(base, LoraConfig::new(["q_proj", "query"]), 0).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("`query` matches no linear module"), "{err}");
        assert!(err.contains("q_proj") && err.contains("down_proj"), "{err}");
        Ok(())
    }
}
