//! Cross-entropy computed in F32 (F64 for F64 logits), whatever the logits' dtype.

use candle::{DType, Result, Tensor, D};

use crate::layers::ops::log_softmax_last_dim;

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
    let log_probs = log_softmax_last_dim(logits)?;
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    log_probs.gather(&targets, D::Minus1)?.sum_all()?.neg()
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
