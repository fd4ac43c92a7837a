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
/// gradient), and the number of counted positions as a scalar tensor in the reduction dtype.
/// Everything stays on the logits' device (the mask is computed with tensor ops; nothing is
/// read back). Dividing by the counted positions of the whole global batch (not of one
/// micro-batch) makes k micro-batches of uneven lengths give the gradient of one large batch.
///
/// A target outside `0..classes` that is not [`IGNORE_INDEX`] is an error of the gather on
/// the CPU; validate labels where they are made (the datasets do).
///
/// # Errors
/// On a shape mismatch or a target tensor of another dtype.
pub fn cross_entropy_masked_sum(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] {
        candle::bail!("cross_entropy: {n} rows of logits but targets of shape {:?}", targets.dims());
    }
    let rd = reduction_dtype(logits.dtype());
    let (mask, safe) = match targets.dtype() {
        DType::I64 => {
            let counted = targets.ne(IGNORE_INDEX)?;
            let safe = counted.where_cond(targets, &targets.zeros_like()?)?.to_dtype(DType::U32)?;
            (counted.to_dtype(rd)?, safe)
        }
        DType::U32 => (Tensor::ones(n, rd, logits.device())?, targets.clone()),
        other => candle::bail!("cross_entropy: targets must be I64 or U32, not {other:?}"),
    };
    let count = mask.sum_all()?;
    let mask = mask.unsqueeze(1)?;
    let safe = safe.unsqueeze(1)?;
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
    Ok((loss, count))
}

/// The loss of a token batch's head: for `U32` targets the mean over every position
/// ([`cross_entropy`], unchanged), for `I64` targets the mean over the positions that are not
/// [`IGNORE_INDEX`] (0 when none counts, so a fully masked micro-batch adds nothing). The
/// Trainer weights each micro-batch's mean by its counted positions
/// ([`crate::source::DataSource::count`]), so the step's loss is the mean over the global
/// batch's counted tokens.
///
/// # Errors
/// As [`cross_entropy`] and [`cross_entropy_masked_sum`].
pub fn token_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if targets.dtype() != DType::I64 {
        return cross_entropy(logits, targets);
    }
    let (sum, count) = cross_entropy_masked_sum(logits, targets)?;
    sum.broadcast_div(&count.maximum(1.0)?)
}
