//! The transformer feed-forward block: `c_fc`, GELU (tanh approximation, GPT-2's
//! `gelu_new`), `c_proj`, dropout.

use candle::{Result, Tensor};
use candle_ckpt::Rng;

use crate::layers::dropout::Dropout;
use crate::layers::layer_norm::{DetachedNorm, LayerNorm};
use crate::layers::linear::{Linear, WeightLayout};
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// `dropout(c_proj(gelu(c_fc(x))))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    dropout: Dropout,
}

crate::module_fields!(Mlp { c_fc, c_proj });

impl Mlp {
    /// Creates `{prefix}.c_fc` (`[n_embd, hidden]`) and `{prefix}.c_proj` (`[hidden, n_embd]`).
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        n_embd: usize,
        hidden: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, n_embd, hidden, dropout, std, proj_std))
    }

    /// As [`Mlp::new`], under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(
        b: &ModuleBuilder,
        n_embd: usize,
        hidden: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        let c_fc = Linear::build(&b.pp("c_fc"), n_embd, hidden, WeightLayout::InOut, std)?;
        let c_proj = Linear::build(&b.pp("c_proj"), hidden, n_embd, WeightLayout::InOut, proj_std)?;
        Ok(Self { c_fc, c_proj, dropout })
    }

    /// `self.forward(norm.forward_as(x, dtype))` (a pre-norm block's MLP on the residual stream
    /// `x`), with the layer norm and both layers as one op on the CPU when no dropout applies
    /// and the layers are plain (see [`gelu_mlp`]): the same values and gradients.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward_normed(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        dtype: candle::DType,
        rng: &mut Rng,
        training: bool,
    ) -> Result<Tensor> {
        if !training || self.dropout.p() == 0.0 {
            if let (Some(fc), Some(proj)) = (self.c_fc.plain_affine(x)?, self.c_proj.plain_affine(x)?) {
                if let Some(normed) = norm.detached(x, dtype)? {
                    return mlp_block(x, Some(normed), (&fc.0, &fc.1, fc.2), (&proj.0, &proj.1, proj.2));
                }
            }
        }
        self.forward(&norm.forward_as(x, dtype)?, rng, training)
    }

    /// Applies the block to `x` of shape `[..., n_embd]`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor, rng: &mut Rng, training: bool) -> Result<Tensor> {
        if !training || self.dropout.p() == 0.0 {
            // Dropout is the identity (`rng` untouched): the block as two ops, when both layers
            // are plain.
            if let (Some(fc), Some(proj)) = (self.c_fc.plain_affine(x)?, self.c_proj.plain_affine(x)?) {
                return gelu_mlp(x, (&fc.0, &fc.1, fc.2), (&proj.0, &proj.1, proj.2));
            }
        }
        // `gelu_tanh(c_fc(x))` as one op.
        let h = self.c_fc.forward_gelu(x)?;
        self.dropout.forward(&self.c_proj.forward(&h)?, rng, training)
    }
}

/// A linear layer's weight, bias and weight layout.
pub type AffineParts<'a> = (&'a Tensor, &'a Tensor, WeightLayout);

/// `gelu_tanh(x W1 + b1) W2 + b2` over the last dimension of `x` (`fc` = `(W1, b1, layout)`,
/// `proj` likewise): the values and the gradients of `x`, `W1`, `b1`, `W2` and `b2` of
/// [`linear_gelu`](crate::layers::linear::linear_gelu) followed by
/// [`linear`](crate::layers::linear::linear), bit for bit, with the hidden activation
/// (`[rows, hidden]`, four times the width in GPT) kept by the op instead of being a node of the
/// graph: Candle's backward gives every node a zero gradient and adds into it (for BF16 on the
/// CPU through a called conversion), which for this tensor was the largest such add of a block.
/// The memory kept is the same (the pre-activation and the activation); the backward's peak is
/// lower (no zero gradient and sum for the activation).
///
/// A Candle op has at most three inputs, so `W2`, `b2` and `b1` reach the graph through a
/// one-element *parameter token* ([`parameter_token`]) that the block's op takes as its third
/// input beside `x` and `W1`: the block's backward computes all five gradients, returns those of
/// `x` and `W1`, and leaves the other three for the token's backward, which Candle runs after
/// it (the token is upstream of the block).
///
/// # Errors
/// On a shape or dtype mismatch.
pub fn gelu_mlp(x: &Tensor, fc: AffineParts<'_>, proj: AffineParts<'_>) -> Result<Tensor> {
    mlp_block(x, None, fc, proj)
}

/// [`gelu_mlp`] on `x`, or with `norm` (a layer norm of `x` computed outside the graph, and
/// its backward) on its result: then the layer norm is part of the op, its parameters reach the
/// graph through a second [`parameter_token`], and the op's input is `x` itself.
fn mlp_block(
    x: &Tensor,
    norm: Option<(Tensor, DetachedNorm)>,
    fc: AffineParts<'_>,
    proj: AffineParts<'_>,
) -> Result<Tensor> {
    use crate::layers::custom_grad::custom3;
    use crate::layers::fused::{gelu_tanh, gelu_tanh_grad};
    use crate::layers::linear::{affine_value, biased_affine_grads};
    let ((w1, b1, l1), (w2, b2, l2)) = (fc, proj);
    let dims = x.dims().to_vec();
    let Some((&c, lead)) = dims.split_last() else {
        candle::bail!("gelu_mlp: input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let (normed, norm) = split_norm(x, norm);
    let normed = normed.reshape((rows, c))?;
    let pre = affine_value(&normed, w1, Some(b1), l1)?;
    let h = gelu_tanh(&pre)?;
    let y = affine_value(&h, w2, Some(b2), l2)?;
    let out = y.dim(1)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out);
    let y = y.reshape(out_dims)?;
    let (token, tokens) = block_tokens("gelu-mlp", [w2, b2, b1], norm)?;
    let (w2_const, b2_dtype, b1_dtype) = (w2.detach(), b2.dtype(), b1.dtype());
    custom3("gelu-mlp", x, w1, &token, y, move |x_full, w1, token, _, g| {
        let g = g.reshape((rows, out))?;
        let (grad_h, grad_w2, grad_b2) = biased_affine_grads(&h, &w2_const, &g, l2, b2_dtype)?;
        let grad_pre = gelu_tanh_grad(&pre, &grad_h)?;
        drop(grad_h);
        let (grad_normed, grad_w1, grad_b1) = biased_affine_grads(&normed, w1, &grad_pre, l1, b1_dtype)?;
        let grad_x =
            tokens.finish(x_full, grad_normed.reshape(x_full.shape())?, [grad_w2, grad_b2, grad_b1])?;
        Ok((Some(grad_x), Some(grad_w1), Some(token.zeros_like()?)))
    })
}

/// A fused block's input to its first layer (the layer norm's result, or `x` itself outside
/// the graph) and the norm's backward.
pub(crate) fn split_norm(x: &Tensor, norm: Option<(Tensor, DetachedNorm)>) -> (Tensor, Option<DetachedNorm>) {
    match norm {
        Some((value, norm)) => (value, Some(norm)),
        None => (x.detach(), None),
    }
}

/// The parameter tokens of a fused block ([`block_tokens`]).
pub(crate) struct BlockTokens {
    params: TokenSlot,
    norm: Option<(DetachedNorm, TokenSlot)>,
    token_dtype: candle::DType,
    device: candle::Device,
}

/// The token a fused block takes as its third input: a [`parameter_token`] over `params`, or,
/// when the block starts with a layer norm (`norm`), a token over the norm's weight and bias
/// and that one.
///
/// # Errors
/// On a tensor error.
pub(crate) fn block_tokens(
    name: &'static str,
    params: [&Tensor; 3],
    norm: Option<DetachedNorm>,
) -> Result<(Tensor, BlockTokens)> {
    let (inner, slot) = parameter_token(name, params)?;
    let (token_dtype, device) = (inner.dtype(), inner.device().clone());
    let (token, norm) = match norm {
        Some(n) => {
            let (token, norm_slot) = parameter_token(name, [&n.weight, &n.bias, &inner])?;
            (token, Some((n, norm_slot)))
        }
        None => (inner, None),
    };
    Ok((token, BlockTokens { params: slot, norm, token_dtype, device }))
}

impl BlockTokens {
    /// Stores `grads` (the token's three parameters') and returns the gradient of the block's
    /// input `x` from its first layer's input gradient: through the layer norm's backward
    /// (whose parameter gradients go to their token), or `grad_normed` itself.
    ///
    /// # Errors
    /// On a tensor error; a poisoned lock.
    pub(crate) fn finish(&self, x: &Tensor, grad_normed: Tensor, grads: [Tensor; 3]) -> Result<Tensor> {
        self.params.put(grads)?;
        match &self.norm {
            Some((norm, slot)) => {
                let (grad_x, grad_w, grad_b) = norm.grads(x, &grad_normed)?;
                slot.put([grad_w, grad_b, Tensor::zeros(1, self.token_dtype, &self.device)?])?;
                Ok(grad_x)
            }
            None => Ok(grad_normed),
        }
    }
}

/// The gradients a fused op computes for parameters it takes through a token, until the
/// token's backward hands them to Candle.
pub struct TokenSlot {
    name: &'static str,
    grads: std::sync::Arc<std::sync::Mutex<Option<[Tensor; 3]>>>,
}

impl TokenSlot {
    /// Stores the three parameters' gradients (in the token's order) for the token's backward.
    ///
    /// # Errors
    /// A poisoned lock.
    pub fn put(&self, grads: [Tensor; 3]) -> Result<()> {
        let mut slot =
            self.grads.lock().map_err(|_| candle::Error::Msg(format!("{}: poisoned lock", self.name)))?;
        *slot = Some(grads);
        Ok(())
    }
}

/// A one-element tensor (zero, in the parameters' dtype) whose op has `params` as its inputs,
/// for a fused op that needs more than Candle's three inputs: the fused op takes the token as
/// an input, and in its backward computes the parameters' gradients, stores them in the
/// returned [`TokenSlot`] and returns a zero gradient for the token. Candle then runs the
/// token's backward (it is upstream of the fused op), which hands the stored gradients over.
/// A token whose slot was not filled fails its backward, naming `name`.
///
/// # Errors
/// On a tensor error.
pub fn parameter_token(name: &'static str, params: [&Tensor; 3]) -> Result<(Tensor, TokenSlot)> {
    let grads: std::sync::Arc<std::sync::Mutex<Option<[Tensor; 3]>>> = std::sync::Arc::default();
    let taken = std::sync::Arc::clone(&grads);
    let [a, b, c] = params;
    let zero = Tensor::zeros(1, a.dtype(), a.device())?;
    let token = crate::layers::custom_grad::custom3(name, a, b, c, zero, move |_, _, _, _, _| {
        let stored = taken.lock().map_err(|_| candle::Error::Msg(format!("{name}: poisoned lock")))?.take();
        let [ga, gb, gc] = stored
            .ok_or_else(|| candle::Error::Msg(format!("{name}: the fused op left no parameter gradients")))?;
        Ok((Some(ga), Some(gb), Some(gc)))
    })?;
    Ok((token, TokenSlot { name, grads }))
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Var};

    use super::*;
    use crate::layers::linear::{linear, linear_gelu};

    fn seeded(rng: &mut Rng, shape: &[usize], scale: f64) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.normal_f64() * scale).collect::<Vec<f64>>(), shape, &Device::Cpu)
    }

    /// A parameter token whose fused op forgot to store the gradients fails the backward with
    /// its name, instead of giving the parameters no (or a zero) gradient.
    #[test]
    fn an_unfilled_parameter_token_is_an_error() -> Result<()> {
        let p = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu)?)?;
        let (token, _slot) = parameter_token("test-token", [p.as_tensor(), p.as_tensor(), p.as_tensor()])?;
        let x = Var::from_tensor(&Tensor::ones(2, DType::F32, &Device::Cpu)?)?;
        let y = crate::layers::custom_grad::custom2(
            "forgets",
            x.as_tensor(),
            &token,
            x.as_tensor().detach(),
            |_, t, _, g| Ok((Some(g.clone()), Some(t.zeros_like()?))),
        )?;
        let err = y.sum_all()?.backward().expect_err("the token's backward must fail");
        assert!(err.to_string().contains("test-token"), "{err}");
        Ok(())
    }

    /// The MLP block with its layer norm inside against the layer norm op followed by
    /// [`gelu_mlp`]: the same values and gradients of the residual stream, the norm's weight and
    /// bias and the four layer parameters bit for bit (F64; F32 stream into F32 and BF16); in
    /// F64 against central differences.
    #[test]
    fn the_block_with_its_norm_equals_the_norm_then_the_block() -> Result<()> {
        use crate::layers::layer_norm::layer_norm;
        let mut rng = Rng::seeded(22);
        let (b, t, c, hidden) = (2, 3, 4, 6);
        let args0 = [
            seeded(&mut rng, &[b, t, c], 1.0)?,
            seeded(&mut rng, &[c], 0.2)?.affine(1.0, 1.0)?,
            seeded(&mut rng, &[c], 0.2)?,
            seeded(&mut rng, &[c, hidden], 0.5)?,
            seeded(&mut rng, &[hidden], 0.5)?,
            seeded(&mut rng, &[hidden, c], 0.5)?,
            seeded(&mut rng, &[c], 0.5)?,
        ];
        let weights = seeded(&mut rng, &[b, t, c], 1.0)?;
        let loss = |y: &Tensor| (y.to_dtype(DType::F64)? * &weights)?.sum_all();
        let l = WeightLayout::InOut;
        let run = |a: &[Tensor], dtype: DType, fused: bool| -> Result<Tensor> {
            let (fc, proj) = ((&a[3], &a[4], l), (&a[5], &a[6], l));
            if fused {
                let (value, backward) =
                    crate::layers::fused::layer_norm_detached(&a[0], &a[1], &a[2], 1e-5, dtype)?
                        .expect("applies");
                let norm = DetachedNorm::from_parts(a[1].clone(), a[2].clone(), backward);
                mlp_block(&a[0], Some((value, norm)), fc, proj)
            } else {
                gelu_mlp(&layer_norm(&a[0], &a[1], &a[2], 1e-5, dtype)?, fc, proj)
            }
        };
        for (x_dtype, dtype) in
            [(DType::F64, DType::F64), (DType::F32, DType::F32), (DType::F32, DType::BF16)]
        {
            let vars = args0
                .iter()
                .enumerate()
                .map(|(i, a)| Var::from_tensor(&a.to_dtype(if i < 3 { x_dtype } else { dtype })?))
                .collect::<Result<Vec<_>>>()?;
            let a: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let (fused, reference) = (run(&a, dtype, true)?, run(&a, dtype, false)?);
            crate::layers::assert_same_values_and_gradients(
                &fused,
                &reference,
                &vars,
                loss,
                &format!("{dtype:?}"),
            )?;
        }
        let vars = args0.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
        let a: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let analytic = crate::layers::gradients(&loss(&run(&a, DType::F64, true)?)?, &vars)?;
        crate::layers::assert_finite_differences(&args0, &analytic, |a| {
            loss(&run(a, DType::F64, true)?)?.to_scalar::<f64>()
        })
    }

    /// [`gelu_mlp`] against the two layers it replaces (`linear_gelu`, then `linear`): the same
    /// values and the same gradients of the input, both weights and both biases bit for bit in
    /// F64, F32 and BF16, for both weight layouts; in F64 against central differences.
    #[test]
    fn the_fused_block_equals_its_two_layers() -> Result<()> {
        let mut rng = Rng::seeded(21);
        let (b, t, c, hidden) = (2, 3, 4, 7);
        let x0 = seeded(&mut rng, &[b, t, c], 1.0)?;
        let w1 = seeded(&mut rng, &[c, hidden], 0.5)?;
        let b1 = seeded(&mut rng, &[hidden], 0.5)?;
        let w2 = seeded(&mut rng, &[hidden, c], 0.5)?;
        let b2 = seeded(&mut rng, &[c], 0.5)?;
        let weights = seeded(&mut rng, &[b, t, c], 1.0)?;
        let loss = |y: &Tensor| (y.to_dtype(DType::F64)? * &weights)?.sum_all();
        for (l1, l2) in
            [(WeightLayout::InOut, WeightLayout::InOut), (WeightLayout::OutIn, WeightLayout::InOut)]
        {
            let w1 = if l1 == WeightLayout::OutIn { w1.t()?.contiguous()? } else { w1.clone() };
            let args = [x0.clone(), w1, b1.clone(), w2.clone(), b2.clone()];
            for dtype in [DType::F64, DType::F32, DType::BF16] {
                let vars =
                    args.iter().map(|a| Var::from_tensor(&a.to_dtype(dtype)?)).collect::<Result<Vec<_>>>()?;
                let [x, w1, b1, w2, b2] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
                let fused = gelu_mlp(x, (w1, b1, l1), (w2, b2, l2))?;
                let reference = linear(&linear_gelu(x, w1, b1, l1)?, w2, Some(b2), l2)?;
                assert_eq!(fused.dtype(), dtype);
                let what = format!("{dtype:?} {l1:?}");
                crate::layers::assert_same_values_and_gradients(&fused, &reference, &vars, loss, &what)?;
            }
            let vars = args.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
            let [x, w1, b1, w2, b2] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
            let analytic =
                crate::layers::gradients(&loss(&gelu_mlp(x, (w1, b1, l1), (w2, b2, l2))?)?, &vars)?;
            crate::layers::assert_finite_differences(&args, &analytic, |a| {
                loss(&gelu_mlp(&a[0], (&a[1], &a[2], l1), (&a[3], &a[4], l2))?)?.to_scalar::<f64>()
            })?;
        }
        Ok(())
    }
}
