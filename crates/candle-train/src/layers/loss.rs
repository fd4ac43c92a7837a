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
