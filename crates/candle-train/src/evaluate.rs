//! Evaluation as a seam: an [`Evaluator`] turns a model and the validation batches into named
//! metrics (`loss`, `perplexity`, `accuracy`, ...). The Trainer runs one at the start, every
//! `eval_interval` steps and at the end.

use std::collections::BTreeMap;

use candle::{DType, Tensor, D};
use candle_ckpt::{forward, SegmentContext, SegmentedModel};

use crate::error::{Error, Result};
use crate::models::BertClassifier;
use crate::source::Counted;

/// Named metrics of one evaluation (`loss` in nats per counted unit, `perplexity`,
/// `accuracy` in 0..=1, ...), in name order.
pub type Metrics = BTreeMap<String, f64>;

/// The name of the loss metric, which the Trainer reports as `val_loss`.
pub const LOSS: &str = "loss";

/// Computes named metrics of a model on validation batches, without dropout.
pub trait Evaluator<M: SegmentedModel + ?Sized> {
    /// The metrics of `model` on `batches`.
    ///
    /// # Errors
    /// A model or device error.
    fn evaluate(&self, model: &M, batches: &[Counted<M::Batch>]) -> Result<Metrics>
    where
        M::Batch: Sized;
}

/// Any `Fn(&M, &[Counted<Batch>]) -> Result<Metrics>` is an evaluator.
impl<M, F> Evaluator<M> for F
where
    M: SegmentedModel,
    M::Batch: Sized,
    F: Fn(&M, &[Counted<M::Batch>]) -> Result<Metrics>,
{
    fn evaluate(&self, model: &M, batches: &[Counted<M::Batch>]) -> Result<Metrics> {
        self(model, batches)
    }
}

/// The mean loss over all counted units of the validation set (each batch's mean loss, the
/// model's last segment's output, weighted by its count) and its exponential, `perplexity`.
/// The default evaluator.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossEvaluator;

/// The count-weighted mean loss of `batches` (NaN when they count nothing).
///
/// # Errors
/// A model error.
pub fn mean_loss<M>(model: &M, batches: &[Counted<M::Batch>]) -> Result<f64>
where
    M: SegmentedModel,
    M::Batch: Sized,
{
    let (mut total, mut count) = (0.0, 0usize);
    for Counted { batch, count: n } in batches {
        if *n == 0 {
            continue;
        }
        let loss = forward(model, batch, SegmentContext::eval())?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += loss * *n as f64;
        count += n;
    }
    Ok(if count == 0 { f64::NAN } else { total / count as f64 })
}

impl<M: SegmentedModel> Evaluator<M> for LossEvaluator {
    fn evaluate(&self, model: &M, batches: &[Counted<M::Batch>]) -> Result<Metrics>
    where
        M::Batch: Sized,
    {
        let loss = mean_loss(model, batches)?;
        Ok(Metrics::from([(LOSS.to_string(), loss), ("perplexity".to_string(), loss.exp())]))
    }
}

/// The fraction of `predicted` (`[n, classes]` logits) whose arg-max equals `labels` (`[n]`),
/// as (correct, n).
///
/// # Errors
/// On a shape mismatch.
pub fn correct_predictions(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let (n, _) = logits.dims2()?;
    if labels.dims() != [n] {
        return Err(Error::config(
            "labels",
            format!("{n} rows of logits but labels of shape {:?}", labels.dims()),
        ));
    }
    let predicted = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    let correct = predicted.eq(&labels.to_dtype(DType::U32)?)?.to_dtype(DType::F32)?.sum_all()?;
    Ok((correct.to_scalar::<f32>()? as usize, n))
}

/// Loss, perplexity and `accuracy` (arg-max of the head's logits against the labels) of a
/// [`BertClassifier`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifierEvaluator;

impl Evaluator<BertClassifier> for ClassifierEvaluator {
    fn evaluate(
        &self,
        model: &BertClassifier,
        batches: &[Counted<crate::models::ClassificationBatch>],
    ) -> Result<Metrics> {
        let mut metrics = LossEvaluator.evaluate(model, batches)?;
        let (mut correct, mut total) = (0, 0);
        for Counted { batch, .. } in batches {
            let logits = model.logits(&batch.ids, &batch.token_types, &batch.mask)?;
            let (c, n) = correct_predictions(&logits, &batch.labels)?;
            correct += c;
            total += n;
        }
        let accuracy = if total == 0 { f64::NAN } else { correct as f64 / total as f64 };
        metrics.insert("accuracy".to_string(), accuracy);
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn accuracy_counts_argmax_matches() -> Result<()> {
        let logits = Tensor::new(&[[0.1f32, 0.9], [2.0, -1.0], [0.0, 3.0]], &Device::Cpu)?;
        let labels = Tensor::new(&[1u32, 1, 1], &Device::Cpu)?;
        assert_eq!(correct_predictions(&logits, &labels)?, (2, 3));
        assert!(correct_predictions(&logits, &Tensor::new(&[1u32], &Device::Cpu)?).is_err());
        Ok(())
    }
}
