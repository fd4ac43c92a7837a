//! Naming the cause of a missing gradient: Candle ops without a backward rule and what to use
//! instead.
//!
//! Candle computes candle-nn's fused kernels through `apply_op*_no_bwd`: the result is a
//! constant to autograd and leaves no trace in the graph (and the graph is not readable from
//! outside Candle: `Tensor::op` is crate-private), so the op cannot be observed. It is inferred
//! from the pattern of lost gradients ([`likely_cause`]): a norm layer's parameters without a
//! gradient are a fused norm's inputs, parameters cut off next to them lie upstream of it, and a
//! matrix whose gradient is zero on some rows or columns feeds attention through
//! `softmax_last_dim` or a fused rotary embedding. The inference is a likelihood, not a proof;
//! the parameters named are exact.

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

/// What the diagnosis knows of one parameter: its name, rank, and whether autograd gave it no
/// gradient at all (rather than zeros on some elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterInfo<'a> {
    /// The parameter's name.
    pub name: &'a str,
    /// Its rank.
    pub rank: usize,
    /// Whether it lost its whole gradient.
    pub absent: bool,
}

/// Why a parameter lost (all or part of) its gradient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikelyCause {
    /// The parameter is itself an input of the op (a fused norm's weight or bias); otherwise
    /// the op lies downstream, between the parameter and the loss.
    pub input_of_op: bool,
    /// The op kinds it most likely is, most likely first.
    pub ops: Vec<NoBackwardOp>,
}

fn ops(kinds: &[&str]) -> Vec<NoBackwardOp> {
    kinds.iter().filter_map(|kind| NO_BACKWARD_OPS.iter().find(|op| op.kind == *kind)).copied().collect()
}

fn prefix(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(prefix, _)| prefix)
}

/// The number of parameters of `name`'s layer when that layer is a norm (only 1-D parameters
/// under its prefix: weight, or weight and bias).
fn norm_layer_size(name: &str, rank: usize, all: &[ParameterInfo]) -> Option<usize> {
    let layer = prefix(name);
    let siblings: Vec<&ParameterInfo> = all.iter().filter(|p| prefix(p.name) == layer).collect();
    (rank <= 1 && siblings.iter().all(|p| p.rank <= 1)).then_some(siblings.len().max(1))
}

/// The likely cause for `all[index]`, judged from the pattern of lost gradients in `all` (a
/// segment's or a model's parameters): a norm layer's parameters without a gradient are the
/// inputs of a fused norm (`layer_norm` with a bias, else `rms_norm`); a parameter cut off
/// entirely, next to such norms, lies upstream of them; a matrix (or bias) with zeros on some
/// elements feeds attention through `softmax_last_dim` or a fused `rope`.
pub fn likely_cause(index: usize, all: &[ParameterInfo]) -> LikelyCause {
    let Some(p) = all.get(index) else {
        return LikelyCause { input_of_op: false, ops: NO_BACKWARD_OPS.to_vec() };
    };
    let norm_kind = |q: &ParameterInfo| match norm_layer_size(q.name, q.rank, all) {
        Some(size) if size >= 2 => Some("layer_norm"),
        Some(_) => Some("rms_norm"),
        None => None,
    };
    if p.absent {
        if let Some(kind) = norm_kind(p) {
            let kinds: &[&str] =
                if kind == "layer_norm" { &["layer_norm"] } else { &["rms_norm", "layer_norm"] };
            return LikelyCause { input_of_op: true, ops: ops(kinds) };
        }
        let mut norms: Vec<&str> = all.iter().filter(|q| q.absent).filter_map(norm_kind).collect();
        norms.dedup();
        if !norms.is_empty() {
            return LikelyCause { input_of_op: false, ops: ops(&norms) };
        }
        return LikelyCause {
            input_of_op: false,
            ops: ops(&["softmax_last_dim", "rope", "layer_norm", "rms_norm"]),
        };
    }
    LikelyCause { input_of_op: false, ops: ops(&["softmax_last_dim", "rope"]) }
}

/// Says what to use instead of each op.
pub fn describe(ops: &[NoBackwardOp]) -> String {
    ops.iter()
        .map(|op| format!("`{}` ({}; use {})", op.kind, op.candle, op.replacement))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Names the ops only (`layer_norm` or `rms_norm`).
pub fn kinds(ops: &[NoBackwardOp]) -> String {
    ops.iter().map(|op| format!("`{}`", op.kind)).collect::<Vec<_>>().join(" or ")
}

/// The cause of a parameter's missing gradient, for an error message.
pub fn explain(cause: &LikelyCause) -> String {
    if cause.input_of_op {
        format!(
            "it is an input of a fused op without a backward rule (Candle records none and drops the gradient \
             silently), most likely {}",
            describe(&cause.ops)
        )
    } else {
        format!(
            "an op without a backward rule lies between it and the loss (Candle records none and drops the \
             gradient silently), most likely {}",
            describe(&cause.ops)
        )
    }
}

/// The cause of `all[index]`'s missing gradient, for the engine's error.
pub fn no_gradient_cause(index: usize, all: &[ParameterInfo]) -> String {
    explain(&likely_cause(index, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_parameters_point_to_fused_norms_and_partial_matrices_to_attention() {
        let info = |name, rank, absent| ParameterInfo { name, rank, absent };
        let all = [
            info("wte.weight", 2, true),
            info("h.0.attn.qkv.weight", 2, false),
            info("h.0.attn.qkv.bias", 1, false),
            info("h.0.ln_1.weight", 1, true),
            info("h.0.ln_1.bias", 1, true),
            info("model.norm.weight", 1, true),
        ];
        let cause = |i| {
            let c = likely_cause(i, &all);
            (c.input_of_op, c.ops.iter().map(|op| op.kind).collect::<Vec<_>>())
        };
        assert_eq!(cause(3), (true, vec!["layer_norm"]));
        assert_eq!(cause(4), (true, vec!["layer_norm"]));
        assert_eq!(cause(5), (true, vec!["rms_norm", "layer_norm"]));
        assert_eq!(cause(0), (false, vec!["layer_norm", "rms_norm"]));
        assert_eq!(cause(1), (false, vec!["softmax_last_dim", "rope"]));
        // A qkv bias is not a norm: its layer has a matrix.
        assert_eq!(cause(2), (false, vec!["softmax_last_dim", "rope"]));
        let alone = [info("w", 2, true)];
        assert_eq!(likely_cause(0, &alone).ops.len(), 4);
        assert!(describe(&likely_cause(1, &all).ops).contains("candle_nn::ops::softmax(x, D::Minus1)"));
    }
}
