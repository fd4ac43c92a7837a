//! Naming the cause of a missing gradient: Candle ops without a backward rule and what to use
//! instead.
//!
//! Candle computes candle-nn's fused kernels through `apply_op*_no_bwd`: the result is a
//! constant to autograd and leaves no trace in the graph (and the graph is not readable from
//! outside Candle), so the op cannot be observed. It is inferred from the gradient's pattern:
//! a 1-D parameter without a gradient is the weight or bias of a fused norm; a matrix whose
//! gradient misses whole rows or columns feeds attention through `softmax_last_dim` or a fused
//! rotary embedding.

use candle::Var;

/// One Candle op without a backward rule and the differentiable drop-in to use instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoBackwardOp {
    /// The op's kind as named in errors: `softmax_last_dim`, `layer_norm`, `rms_norm`, `rope`.
    pub kind: &'static str,
    /// The Candle functions and layers that compute it without a backward rule.
    pub candle: &'static str,
    /// What to use instead.
    pub replacement: &'static str,
}

/// The Candle 0.11 ops that record no backward (their result is a constant to autograd).
pub const NO_BACKWARD_OPS: [NoBackwardOp; 4] = [
    NoBackwardOp {
        kind: "softmax_last_dim",
        candle: "candle_nn::ops::softmax_last_dim",
        replacement: "candle_nn::ops::softmax(x, D::Minus1) or candle_train::nn::softmax_last_dim",
    },
    NoBackwardOp {
        kind: "layer_norm",
        candle: "candle_nn::ops::layer_norm, candle_nn::LayerNorm (fused on contiguous input)",
        replacement: "candle_nn::ops::layer_norm_slow or candle_train::nn::layer_norm",
    },
    NoBackwardOp {
        kind: "rms_norm",
        candle: "candle_nn::ops::rms_norm, candle_nn::RmsNorm (fused on contiguous input)",
        replacement: "candle_nn::ops::rms_norm_slow or candle_train::nn::rms_norm",
    },
    NoBackwardOp {
        kind: "rope",
        candle: "candle_nn::rotary_emb::rope, rope_i, rope_thd",
        replacement: "candle_nn::rotary_emb::rope_slow / rope_i_slow, or candle_train::layers::Rotary",
    },
];

/// The op kinds a parameter that lost (all or part of) its gradient most likely sits before,
/// judged from its rank and whether a `.bias` of the same prefix lost its gradient too.
///
/// `missing` lists the names of the parameters without a gradient next to this one (the same
/// segment or model).
pub fn likely_ops(name: &str, rank: usize, missing: &[&str]) -> Vec<NoBackwardOp> {
    let kinds: &[&str] = if rank <= 1 {
        let prefix = name.rsplit_once('.').map_or("", |(prefix, _)| prefix);
        let with_bias = name.ends_with(".bias")
            || missing.iter().any(|other| other.strip_suffix(".bias") == Some(prefix));
        if with_bias {
            &["layer_norm"]
        } else {
            &["rms_norm", "layer_norm"]
        }
    } else {
        &["softmax_last_dim", "rope"]
    };
    NO_BACKWARD_OPS.iter().filter(|op| kinds.contains(&op.kind)).copied().collect()
}

/// Says what to use instead of each op.
pub fn describe(ops: &[NoBackwardOp]) -> String {
    ops.iter()
        .map(|op| format!("`{}` ({}; use {})", op.kind, op.candle, op.replacement))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The cause of a parameter's missing gradient, for an error message: the op without a
/// backward rule it most likely sits before, and the replacement.
pub fn no_gradient_cause(name: &str, var: &Var, missing: &[&str]) -> String {
    let ops = likely_ops(name, var.as_tensor().rank(), missing);
    format!(
        "an op without a backward rule lies between it and the loss (Candle records no backward for it and \
         silently drops the gradient), most likely {}",
        describe(&ops)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_norm_weight_with_its_bias_missing_points_to_layer_norm_and_a_matrix_to_attention() {
        let kinds = |name: &str, rank: usize, missing: &[&str]| -> Vec<&str> {
            likely_ops(name, rank, missing).iter().map(|op| op.kind).collect()
        };
        assert_eq!(kinds("h.0.ln_1.weight", 1, &["h.0.ln_1.weight", "h.0.ln_1.bias"]), ["layer_norm"]);
        assert_eq!(kinds("h.0.ln_1.bias", 1, &[]), ["layer_norm"]);
        assert_eq!(kinds("norm.weight", 1, &["norm.weight"]), ["layer_norm", "rms_norm"]);
        assert_eq!(kinds("attn.qkv.weight", 2, &[]), ["softmax_last_dim", "rope"]);
        assert!(describe(&likely_ops("x", 2, &[])).contains("candle_nn::ops::softmax(x, D::Minus1)"));
    }
}
