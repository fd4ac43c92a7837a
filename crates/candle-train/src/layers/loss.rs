//! Cross-entropy computed in F32 (F64 for F64 logits), whatever the logits' dtype, with a
//! hand-written backward so none of its intermediates stay in the graph.

use candle::{DType, Result, Tensor, D};

use crate::device::reduction_dtype;
use crate::layers::custom_grad::custom1;
use crate::layers::ops::{log_softmax_last_dim, softmax_last_dim};

/// The summed negative log-likelihood of integer `targets` under `logits` (`[n, classes]` and
/// `[n]`), in F32 (F64 for F64 logits).
///
/// # Errors
/// On a shape mismatch or a non-integer target tensor.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] {
        candle::bail!("cross_entropy: {n} rows of logits but targets of shape {:?}", targets.dims());
    }
    let rd = reduction_dtype(logits.dtype());
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let log_probs = log_softmax_last_dim(&logits.detach())?;
    let value = log_probs.gather(&targets, D::Minus1)?.sum_all()?.neg()?;
    drop(log_probs);
    // Only the logits (which Candle holds anyway) stay in the graph; the backward recomputes
    // softmax(logits) - onehot(targets) in F32.
    custom1("cross-entropy", logits, value, move |logits, _, g| {
        let probs = softmax_last_dim(logits)?;
        let ones = Tensor::ones(targets.shape(), rd, logits.device())?;
        let onehot = probs.zeros_like()?.scatter_add(&targets, &ones, D::Minus1)?;
        let grad = (probs - onehot)?.broadcast_mul(&g.to_dtype(rd)?)?;
        Ok(Some(grad.to_dtype(logits.dtype())?))
    })
}

/// The mean negative log-likelihood (nats per target) of `targets` under `logits`.
///
/// # Errors
/// As [`cross_entropy_sum`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n == 0 {
        candle::bail!("cross_entropy: no targets");
    }
    cross_entropy_sum(logits, targets)? / n as f64
}

/// Hugging Face's label for a position the loss does not count.
pub const IGNORE_INDEX: i64 = -100;

/// The summed negative log-likelihood over the counted positions of `targets` (`[n]`, `I64`
/// or `U32`; with `I64`, positions equal to [`IGNORE_INDEX`] count nothing and get a zero
/// gradient), and the number of counted positions. Dividing by the counted positions of the
/// whole global batch (not of one micro-batch) makes k micro-batches of uneven lengths give
/// the gradient of one large batch.
///
/// # Errors
/// On a shape mismatch, a target outside `0..classes` that is not [`IGNORE_INDEX`], or a
/// target tensor of another dtype.
pub fn cross_entropy_masked_sum(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    let (n, classes) = logits.dims2()?;
    if targets.dims() != [n] {
        candle::bail!("cross_entropy: {n} rows of logits but targets of shape {:?}", targets.dims());
    }
    let values: Vec<i64> = match targets.dtype() {
        DType::I64 => targets.to_vec1::<i64>()?,
        DType::U32 => targets.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        other => candle::bail!("cross_entropy: targets must be I64 or U32, not {other:?}"),
    };
    if let Some((i, bad)) =
        values.iter().enumerate().find(|(_, &t)| t != IGNORE_INDEX && !(0..classes as i64).contains(&t))
    {
        candle::bail!(
            "cross_entropy: target {bad} at position {i} is outside 0..{classes} and not {IGNORE_INDEX}"
        );
    }
    let counted = values.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let rd = reduction_dtype(logits.dtype());
    let device = logits.device();
    let mask: Vec<f64> = values.iter().map(|&t| f64::from(u8::from(t != IGNORE_INDEX))).collect();
    let mask = Tensor::from_vec(mask, (n, 1), device)?.to_dtype(rd)?;
    let safe: Vec<u32> = values.iter().map(|&t| if t == IGNORE_INDEX { 0 } else { t as u32 }).collect();
    let safe = Tensor::from_vec(safe, (n, 1), device)?;
    let log_probs = log_softmax_last_dim(&logits.detach())?;
    let value = log_probs.gather(&safe, D::Minus1)?.mul(&mask)?.sum_all()?.neg()?;
    drop(log_probs);
    let loss = custom1("masked cross-entropy", logits, value, move |logits, _, g| {
        let probs = softmax_last_dim(logits)?;
        let ones = Tensor::ones(safe.shape(), rd, logits.device())?;
        let onehot = probs.zeros_like()?.scatter_add(&safe, &ones, D::Minus1)?;
        let grad = (probs - onehot)?.broadcast_mul(&mask)?.broadcast_mul(&g.to_dtype(rd)?)?;
        Ok(Some(grad.to_dtype(logits.dtype())?))
    })?;
    Ok((loss, counted))
}
