//! A BERT sequence classifier (encoder, mean pooling, a linear `classifier` head, cross-entropy)
//! cut into segments for the recompute engine: embeddings, one per encoder layer, pooling +
//! head + loss. Parameter names are the encoder's Hugging Face names plus `classifier.weight`
//! and `classifier.bias`, as `BertForSequenceClassification` names its head.

use candle::{DType, Result, Tensor};
use candle_ckpt::SegmentContext;

use crate::device::reduction_dtype;
use crate::layers::ops::padding_bias;
use crate::layers::{cross_entropy, Linear, WeightLayout};
use crate::models::bert::{mean_pool, Bert, BertLayer};
use crate::module::{ForwardContext, Module, ModuleBuilder, Stacked};
use crate::params::{ParamBuilder, Parameter, Parameters};

/// A tokenized, labelled batch: ids, token types and attention mask `[batch, t]` (integers;
/// mask 1 for tokens, 0 for padding) and labels `[batch]`.
#[derive(Debug, Clone)]
pub struct ClassificationBatch {
    /// Token ids.
    pub ids: Tensor,
    /// Token-type ids.
    pub token_types: Tensor,
    /// Attention mask.
    pub mask: Tensor,
    /// Class indices.
    pub labels: Tensor,
}

/// BERT + mean pooling + a linear head.
///
/// Segments: `0` the embeddings, `1..=num_hidden_layers` the layers `encoder.layer.{i}`, and
/// the last mean pooling, the head and the mean cross-entropy over the batch (F32). Dropout in
/// each segment draws from the segment's own generator, so recomputation replays it.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    encoder: Bert,
    head: Linear,
    params: Parameters,
}

crate::module_fields!(BertClassifier { encoder, head });

impl BertClassifier {
    /// The head's name prefix.
    pub const HEAD: &'static str = "classifier";

    /// `encoder` with a new `classifier` head of `num_labels` outputs, N(0, 0.02²) weights and
    /// zero bias drawn from `seed`, in the encoder's dtype.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for zero labels; allocation failure.
    pub fn new(encoder: Bert, num_labels: usize, seed: u64) -> crate::Result<Self> {
        if num_labels == 0 {
            return Err(crate::Error::config("num_labels", "must be at least 1"));
        }
        let device =
            encoder.parameters().iter().next().map_or(candle::Device::Cpu, |p| p.var.device().clone());
        let b = ModuleBuilder::new(ParamBuilder::new(encoder.dtype(), device, seed));
        let hidden = encoder.config().hidden_size;
        let head = Linear::build(&b.pp(Self::HEAD), hidden, num_labels, WeightLayout::OutIn, 0.02)?;
        let params = encoder.parameters().merged(&b.finish());
        Ok(Self { encoder, head, params })
    }

    /// The encoder.
    pub fn encoder(&self) -> &Bert {
        &self.encoder
    }

    /// Every parameter: the encoder's, then the head's.
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The logits `[batch, num_labels]` in F32, without dropout.
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than the encoder's positions.
    pub fn logits(&self, ids: &Tensor, token_types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden =
            self.encoder.forward(ids, Some(token_types), mask, &mut candle_ckpt::Rng::seeded(0), false)?;
        self.head_logits(&hidden, mask)
    }

    fn head_logits(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let pooled = mean_pool(hidden, mask)?.to_dtype(self.encoder.dtype())?;
        self.head.forward(&pooled)?.to_dtype(crate::device::reduction_dtype(self.encoder.dtype()))
    }
}

impl Stacked for BertClassifier {
    type Batch = ClassificationBatch;
    type Block = BertLayer;

    fn blocks(&self) -> &[BertLayer] {
        self.encoder.layers()
    }

    /// `encoder.layer` (segment names leave out a `bert.` prefix).
    fn block_path(&self) -> String {
        "encoder.layer".into()
    }

    fn embedding_name(&self) -> String {
        "embeddings".into()
    }

    fn first_input(&self, batch: &ClassificationBatch) -> Result<Tensor> {
        Ok(batch.ids.clone())
    }

    fn embed(&self, input: &Tensor, batch: &ClassificationBatch, ctx: &SegmentContext) -> Result<Tensor> {
        self.encoder.embed(input, Some(&batch.token_types), &mut ctx.rng(0), ctx.training)
    }

    fn block_context(&self, batch: &ClassificationBatch, ctx: &SegmentContext) -> Result<ForwardContext> {
        let bias = padding_bias(&batch.mask, reduction_dtype(self.encoder.dtype()))?;
        Ok(ForwardContext::new(ctx).with_key_padding(bias))
    }

    fn head(&self, x: &Tensor, batch: &ClassificationBatch, _: &SegmentContext) -> Result<Tensor> {
        let logits = self.head_logits(x, &batch.mask)?;
        cross_entropy(&logits, &batch.labels.to_dtype(DType::U32)?)
    }

    fn embedding_parameters(&self) -> Vec<Parameter> {
        self.encoder.embedding_parameters()
    }

    fn head_parameters(&self) -> Vec<Parameter> {
        self.head.parameters()
    }
}

crate::segmented_stack!(BertClassifier);
