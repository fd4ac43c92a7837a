//! Attention: one scaled-dot-product attention with a mask type (causal, key padding) and
//! grouped-query key/value heads, and GPT-2's causal self-attention built on it (fused
//! `c_attn`, then `c_proj`). Scores' softmax runs in F32; the matmuls run in the compute dtype.

use candle::{Result, Tensor};
use candle_ckpt::Rng;

use crate::layers::custom_grad::{custom1, custom3};
use crate::layers::dropout::Dropout;
use crate::layers::fused::matmul as mm;
use crate::layers::layer_norm::{DetachedNorm, LayerNorm};
use crate::layers::linear::{Linear, WeightLayout};
use crate::layers::mlp::{block_tokens, split_norm, AffineParts};
use crate::layers::ops::{causal_softmax, masked_softmax};
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// Which keys a query attends to.
#[derive(Debug, Clone, Copy)]
pub enum AttentionMask<'a> {
    /// Query position `t` sees key positions `<= t` (decoders).
    Causal,
    /// Every key except padding: `bias` (`[batch, 1, 1, keys]`, from
    /// [`padding_bias`](crate::layers::ops::padding_bias)) is added to the scaled scores.
    KeyPadding(&'a Tensor),
}

/// Dropout on the attention probabilities: the layer, the generator its mask is drawn from, and
/// whether the model is training.
pub type ProbsDropout<'a, 'r> = (&'a Dropout, &'r mut Rng, bool);

/// `softmax(q kᵀ / √d + mask) v` for queries `q` `[batch, heads, t, d]` and keys and values
/// `[batch, kv_heads, keys, d]`, `kv_heads` dividing `heads`: query head `h` uses key/value
/// head `h / (heads / kv_heads)`, as Hugging Face's `repeat_kv` arranges them, without copying
/// keys or values per group (a group's queries are stacked along the sequence axis). The
/// softmax runs in F32 (F64 for F64 scores); `dropout`, when given, applies to the
/// probabilities. Returns `[batch, t, heads * d]`, heads concatenated.
///
/// # Errors
/// On a shape mismatch (`kv_heads` not dividing `heads`, a causal mask over `keys != t`).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttentionMask<'_>,
    dropout: Option<ProbsDropout<'_, '_>>,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, keys, _) = k.dims4()?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle::bail!("attention: {kv_heads} key/value heads do not divide {heads} query heads");
    }
    let group = heads / kv_heads;
    let grouped = |x: &Tensor, rows: usize, cols: usize| -> Result<Tensor> {
        if group == 1 {
            Ok(x.clone())
        } else {
            x.reshape((b, kv_heads, group * rows, cols))
        }
    };
    let scores = grouped(q, t, d)?.matmul(&k.t()?)?;
    let scores = if group == 1 { scores } else { scores.reshape((b, heads, t, keys))? };
    let scale = 1.0 / (d as f64).sqrt();
    let probs = match mask {
        AttentionMask::Causal => causal_softmax(&scores, scale)?,
        AttentionMask::KeyPadding(bias) => masked_softmax(&scores, scale, bias)?,
    };
    let probs = match dropout {
        Some((layer, rng, training)) => layer.forward(&probs, rng, training)?,
        None => probs,
    };
    let y = grouped(&probs, t, keys)?.matmul(v)?;
    let y = if group == 1 { y } else { y.reshape((b, heads, t, d))? };
    y.transpose(1, 2)?.reshape((b, t, heads * d))
}

/// Causal multi-head attention from GPT-2's fused projection: `qkv` (`[batch, t, 3 c]`, queries,
/// keys and values side by side, each `heads` heads of `c / heads`) to the heads' merged output
/// `[batch, t, c]`, as one op with a hand-written backward. The values and the gradient of `qkv`
/// are the unfused path's (split heads, [`scaled_dot_product_attention`] under a causal mask)
/// bit for bit: the same matmuls on the same layouts, the same softmax and softmax backward,
/// and copies where Candle's backward adds a gradient to zeros.
///
/// Why: Candle's backward gives every intermediate tensor a zero gradient and then adds into it
/// (`zeros_like` + `add`). Unfused, a block's attention has about fifteen such tensors (the
/// three head splits' views and copies, the scores, the probabilities, the merged output), the
/// scores and probabilities `[batch, heads, t, t]` among them; on the CPU in BF16 that add
/// converts through a called (not inlined) AVX-512 BF16 intrinsic and was a fifth of the step.
/// Here only `qkv` gets one, and the graph keeps `qkv`, the probabilities and the output
/// (unfused it also keeps two copies of each of q, k and v, the scores and a copy of the
/// output): the peak is lower. The heads are split again in the backward (three copies of a
/// third of `qkv` each) instead of being kept.
///
/// # Errors
/// When `qkv`'s last dimension is not `3 * heads * d`; on a tensor error.
pub fn causal_attention_qkv(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let attention = QkvAttention::of(qkv.dims(), heads)?;
    let (value, probs) = attention.forward(&qkv.detach())?;
    custom1("causal-attention", qkv, value, move |qkv, _, g| attention.backward(qkv, &probs, g).map(Some))
}

/// GPT-2's attention sub-block `c_proj(causal_attention_qkv(c_attn(x), heads))` as one op (`x`
/// `[batch, t, c]`; `attn` = `(W, b, layout)` of `c_attn`, `W` `[c, 3c]` in its layout; `proj`
/// likewise): the values and the gradients of `x` and the four parameters of the three ops bit
/// for bit ([`linear`](crate::layers::linear::linear)'s products and bias gradients,
/// [`causal_attention_qkv`]'s attention). `qkv` and the heads' merged output are kept by the
/// op instead of being nodes of the graph, so Candle's backward does not give them a zero
/// gradient and add into it (four activations' worth of zeroing and adding per block, BF16 adds
/// through a called conversion on the CPU); the memory kept is the same. `c_attn`'s bias and
/// `c_proj`'s parameters reach the graph through a
/// [`parameter_token`](crate::layers::mlp::parameter_token).
///
/// # Errors
/// When `c_attn`'s output width is not `3 * heads * d`; on a shape or dtype mismatch.
pub fn causal_attention_block(
    x: &Tensor,
    attn: AffineParts<'_>,
    proj: AffineParts<'_>,
    heads: usize,
) -> Result<Tensor> {
    attention_block(x, None, attn, proj, heads)
}

/// [`causal_attention_block`] on `x`, or with `norm` (a layer norm of `x` computed outside the
/// graph, and its backward) on its result: then the layer norm is part of the op (its result
/// kept by the op, not a node of the graph), its parameters reach the graph through a second
/// [`parameter_token`](crate::layers::mlp::parameter_token), and the op's input is `x` itself
/// (a residual stream).
fn attention_block(
    x: &Tensor,
    norm: Option<(Tensor, DetachedNorm)>,
    attn: AffineParts<'_>,
    proj: AffineParts<'_>,
    heads: usize,
) -> Result<Tensor> {
    use crate::layers::linear::{affine_value, biased_affine_grads};
    let ((wa, ba, la), (wp, bp, lp)) = (attn, proj);
    let (batch, t, c) = x.dims3()?;
    let rows = batch * t;
    let (normed, norm) = split_norm(x, norm);
    let normed = normed.reshape((rows, c))?;
    let qkv = affine_value(&normed, wa, Some(ba), la)?;
    let qkv = qkv.reshape((batch, t, qkv.dim(1)?))?;
    let attention = QkvAttention::of(qkv.dims(), heads)?;
    let (merged, probs) = attention.forward(&qkv)?;
    let merged = merged.reshape((rows, c))?;
    let y = affine_value(&merged, wp, Some(bp), lp)?;
    let out = y.dim(1)?;
    let y = y.reshape((batch, t, out))?;
    let (token, tokens) = block_tokens("causal-attention-block", [ba, wp, bp], norm)?;
    let (wp_const, ba_dtype, bp_dtype) = (wp.detach(), ba.dtype(), bp.dtype());
    custom3("causal-attention-block", x, wa, &token, y, move |x, wa, token, _, g| {
        let g = g.reshape((rows, out))?;
        let (grad_merged, grad_wp, grad_bp) = biased_affine_grads(&merged, &wp_const, &g, lp, bp_dtype)?;
        let grad_qkv = attention.backward(&qkv, &probs, &grad_merged.reshape((batch, t, c))?)?;
        drop(grad_merged);
        let grad_qkv = grad_qkv.reshape((rows, grad_qkv.elem_count() / rows.max(1)))?;
        let (grad_normed, grad_wa, grad_ba) = biased_affine_grads(&normed, wa, &grad_qkv, la, ba_dtype)?;
        let grad_x = tokens.finish(x, grad_normed.reshape((batch, t, c))?, [grad_ba, grad_wp, grad_bp])?;
        Ok((Some(grad_x), Some(grad_wa), Some(token.zeros_like()?)))
    })
}

/// The shape of [`causal_attention_qkv`]'s computation: `qkv` `[b, t, 3 c]`, `heads` heads of
/// `d = c / heads`.
#[derive(Clone, Copy)]
struct QkvAttention {
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    scale: f64,
}

impl QkvAttention {
    fn of(dims: &[usize], heads: usize) -> Result<Self> {
        let &[b, t, width] = dims else {
            candle::bail!("causal_attention_qkv: expected [batch, t, 3 c], got {dims:?}");
        };
        if heads == 0 || width % (3 * heads) != 0 {
            candle::bail!("causal_attention_qkv: a last dimension of {width} is not 3 x {heads} heads");
        }
        let c = width / 3;
        Ok(Self { b, t, c, heads, scale: 1.0 / ((c / heads) as f64).sqrt() })
    }

    /// Head `i` (0 queries, 1 keys, 2 values) of `qkv` as contiguous `[b, heads, t, d]`.
    fn split(&self, qkv: &Tensor, i: usize) -> Result<Tensor> {
        split_heads(&qkv.narrow(2, i * self.c, self.c)?, self.heads)
    }

    /// The merged output `[b, t, c]` and the probabilities, from a `qkv` outside the graph.
    fn forward(&self, qkv: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k) = (self.split(qkv, 0)?, self.split(qkv, 1)?);
        let scores = mm(&q, &k.t()?)?;
        drop((q, k));
        let probs = causal_softmax(&scores, self.scale)?;
        drop(scores);
        let y = mm(&probs, &self.split(qkv, 2)?)?;
        Ok((y.transpose(1, 2)?.reshape((self.b, self.t, self.c))?, probs))
    }

    /// The gradient of `qkv` from the output's `g`, as Candle differentiates the unfused ops:
    /// `scores = q kᵀ`, `y = probs v`.
    fn backward(&self, qkv: &Tensor, probs: &Tensor, g: &Tensor) -> Result<Tensor> {
        let gy = split_heads(g, self.heads)?;
        let v = self.split(qkv, 2)?;
        let grad_probs = mm(&gy, &v.t()?)?;
        let grad_v = mm(&probs.t()?, &gy)?;
        drop((v, gy));
        let grad_scores = crate::layers::ops::softmax_backward(probs, &grad_probs, self.scale)?;
        drop(grad_probs);
        let (q, k) = (self.split(qkv, 0)?, self.split(qkv, 1)?);
        let grad_q = mm(&grad_scores, &k)?;
        let grad_k = mm(&q.t()?, &grad_scores)?.t()?;
        drop((q, k, grad_scores));
        // `[batch, t, 3, heads, d]` from the three `[batch, heads, t, d]` gradients.
        let [gq, gk, gv] = [grad_q, grad_k, grad_v].map(|p| p.transpose(1, 2));
        Tensor::stack(&[gq?, gk?, gv?], 2)?.reshape((self.b, self.t, 3 * self.c))
    }
}

/// Splits `[batch, t, heads * d]` into contiguous heads `[batch, heads, t, d]`.
///
/// # Errors
/// On a shape mismatch.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.reshape((b, t, heads, width / heads.max(1)))?.transpose(1, 2)?.contiguous()
}

/// Causal self-attention with `n_head` heads over width `n_embd`.
#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    attn_dropout: Dropout,
    resid_dropout: Dropout,
}

crate::module_fields!(CausalSelfAttention { c_attn, c_proj });

impl CausalSelfAttention {
    /// Creates `{prefix}.c_attn` (`[n_embd, 3 n_embd]`) and `{prefix}.c_proj`; `proj_std` is
    /// the output projection's initial std (GPT-2 scales it by `1/sqrt(2 n_layer)`).
    ///
    /// # Errors
    /// When `n_embd` is not divisible by `n_head`, or on allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        n_embd: usize,
        n_head: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, n_embd, n_head, dropout, std, proj_std))
    }

    /// As [`CausalSelfAttention::new`], under `b`'s path.
    ///
    /// # Errors
    /// When `n_embd` is not divisible by `n_head`, or on allocation failure.
    pub fn build(
        b: &ModuleBuilder,
        n_embd: usize,
        n_head: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(crate::Error::config(
                "n_head",
                format!("{n_head} heads do not divide the width {n_embd}"),
            ));
        }
        let c_attn = Linear::build(&b.pp("c_attn"), n_embd, 3 * n_embd, WeightLayout::InOut, std)?;
        let c_proj = Linear::build(&b.pp("c_proj"), n_embd, n_embd, WeightLayout::InOut, proj_std)?;
        Ok(Self { c_attn, c_proj, n_head, attn_dropout: dropout, resid_dropout: dropout })
    }

    /// Attends over `x` of shape `[batch, seq, n_embd]`; position `t` sees positions `<= t`.
    /// Draws the two dropout masks from `rng`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor, rng: &mut Rng, training: bool) -> Result<Tensor> {
        if !training || self.attn_dropout.p() == 0.0 {
            // No dropout on the probabilities (the identity, `rng` untouched): one op from the
            // fused projection to the heads' merged output.
            if let (Some(a), Some(p)) = (self.c_attn.plain_affine(x)?, self.c_proj.plain_affine(x)?) {
                if !training || self.resid_dropout.p() == 0.0 {
                    // The whole sub-block as one op (dropout on its output is the identity).
                    return causal_attention_block(x, (&a.0, &a.1, a.2), (&p.0, &p.1, p.2), self.n_head);
                }
            }
            let y = causal_attention_qkv(&self.c_attn.forward(x)?, self.n_head)?;
            return self.resid_dropout.forward(&self.c_proj.forward(&y)?, rng, training);
        }
        let (q, k, v) = self.heads(x)?;
        let dropout = (&self.attn_dropout, &mut *rng, training);
        let y = scaled_dot_product_attention(&q, &k, &v, AttentionMask::Causal, Some(dropout))?;
        self.resid_dropout.forward(&self.c_proj.forward(&y)?, rng, training)
    }

    /// `self.forward(norm.forward_as(x, dtype))` (a pre-norm block's attention on the residual
    /// stream `x`), with the layer norm, `c_attn`, the attention and `c_proj` as one op on the
    /// CPU when no dropout applies and the layers are plain (see [`causal_attention_block`]):
    /// the same values and gradients.
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
        let no_dropout = !training || (self.attn_dropout.p() == 0.0 && self.resid_dropout.p() == 0.0);
        if no_dropout && x.rank() == 3 {
            if let (Some(a), Some(p)) = (self.c_attn.plain_affine(x)?, self.c_proj.plain_affine(x)?) {
                if let Some(normed) = norm.detached(x, dtype)? {
                    return attention_block(
                        x,
                        Some(normed),
                        (&a.0, &a.1, a.2),
                        (&p.0, &p.1, p.2),
                        self.n_head,
                    );
                }
            }
        }
        self.forward(&norm.forward_as(x, dtype)?, rng, training)
    }

    /// Attends (without dropout) from the new positions `x` over them and the keys and values
    /// in `cache` (this layer's, `[batch, n_head, seen, d]`), which it extends: the whole
    /// prompt in one causal pass over an empty cache, then one token at a time.
    ///
    /// # Errors
    /// Several new tokens over a non-empty cache; a shape mismatch.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let y = cached_attention(self.heads(x)?, cache)?;
        self.c_proj.forward(&y)
    }

    /// Queries, keys and values `[batch, n_head, t, d]` of `x` through `c_attn`.
    fn heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = x.dim(2)?;
        let qkv = self.c_attn.forward(x)?;
        let split = |i: usize| split_heads(&qkv.narrow(2, i * c, c)?, self.n_head);
        Ok((split(0)?, split(1)?, split(2)?))
    }
}

/// Attention of the new positions' queries `q` over their keys and values appended to
/// `cache` (which then holds them): a causal pass over an empty cache, else one new token that
/// sees every cached position. Returns `[batch, t, heads * d]`.
///
/// # Errors
/// Several new tokens over a non-empty cache; a shape mismatch.
pub(crate) fn cached_attention(
    (q, k, v): (Tensor, Tensor, Tensor),
    cache: &mut Option<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let offset = cache.as_ref().map_or(Ok(0), |(k, _)| k.dim(2))?;
    let t = q.dim(2)?;
    if offset > 0 && t != 1 {
        candle::bail!("attention: {t} new tokens over a cache of {offset}; decode one at a time");
    }
    let (k, v) = match cache.take() {
        None => (k, v),
        Some((past_k, past_v)) => (Tensor::cat(&[&past_k, &k], 2)?, Tensor::cat(&[&past_v, &v], 2)?),
    };
    let y = if offset == 0 {
        scaled_dot_product_attention(&q, &k, &v, AttentionMask::Causal, None)?
    } else {
        let (b, _, keys, _) = k.dims4()?;
        let visible = Tensor::zeros((b, 1, 1, keys), crate::device::reduction_dtype(q.dtype()), q.device())?;
        scaled_dot_product_attention(&q, &k, &v, AttentionMask::KeyPadding(&visible), None)?
    };
    *cache = Some((k, v));
    Ok(y)
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, IndexOp, D};

    use super::*;
    use crate::layers::ops::padding_bias;

    fn seeded(rng: &mut Rng, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.normal_f64()).collect::<Vec<f64>>(), shape, &Device::Cpu)
    }

    /// The obviously-correct path: each query head against its key/value head, one at a time,
    /// masked with -inf before an explicit softmax.
    fn slow(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, keep: Option<&[Vec<u32>]>) -> Result<Tensor> {
        let (b, heads, t, d) = q.dims4()?;
        let (kv_heads, keys) = (k.dim(1)?, k.dim(2)?);
        let mut rows = Vec::new();
        for batch in 0..b {
            let mut per_head = Vec::new();
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let scores = (q.i((batch, h))?.matmul(&k.i((batch, kv))?.t()?)? / (d as f64).sqrt())?;
                let mut mask = vec![0f64; t * keys];
                for i in 0..t {
                    for j in 0..keys {
                        let padded = keep.is_some_and(|keep| keep[batch][j] == 0);
                        if (causal && j > i) || padded {
                            mask[i * keys + j] = f64::NEG_INFINITY;
                        }
                    }
                }
                let scores = (scores + Tensor::from_vec(mask, (t, keys), &Device::Cpu)?)?;
                let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
                let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
                per_head.push(probs.matmul(&v.i((batch, kv))?)?);
            }
            rows.push(Tensor::cat(&per_head, 1)?);
        }
        Tensor::stack(&rows, 0)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// [`causal_attention_qkv`] against the unfused ops it replaces (split heads, causal
    /// attention, heads merged): the same values and the same gradient of `qkv` bit for bit in
    /// F64, F32 and BF16 (the same matmuls and softmax; copies where Candle adds to zeros), and
    /// in F64 the gradient agrees with central differences of the loss.
    #[test]
    fn fused_causal_attention_equals_the_unfused_ops() -> Result<()> {
        let mut rng = Rng::seeded(11);
        let (b, t, heads, d) = (2, 5, 3, 4);
        let c = heads * d;
        let base = seeded(&mut rng, &[b, t, 3 * c])?;
        let weights = seeded(&mut rng, &[b, t, c])?;
        let unfused = |x: &Tensor| -> Result<Tensor> {
            let split = |i: usize| split_heads(&x.narrow(2, i * c, c)?, heads);
            scaled_dot_product_attention(&split(0)?, &split(1)?, &split(2)?, AttentionMask::Causal, None)
        };
        let loss = |y: &Tensor| (y.to_dtype(DType::F64)? * &weights)?.sum_all();
        let gradient = |y: &Tensor, x: &candle::Var| -> Result<Tensor> {
            let grads = loss(y)?.backward()?;
            grads.get(x.as_tensor()).cloned().ok_or_else(|| candle::Error::Msg("no gradient".into()))
        };
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let qkv = candle::Var::from_tensor(&base.to_dtype(dtype)?)?;
            let fused = causal_attention_qkv(qkv.as_tensor(), heads)?;
            let reference = unfused(qkv.as_tensor())?;
            assert_eq!((fused.dtype(), fused.dims()), (dtype, reference.dims()));
            let wide = |x: &Tensor| x.to_dtype(DType::F64);
            assert_eq!(max_difference(&wide(&fused)?, &wide(&reference)?)?, 0.0, "{dtype:?} values");
            let (g_fused, g_reference) = (gradient(&fused, &qkv)?, gradient(&reference, &qkv)?);
            assert_eq!(g_fused.dtype(), dtype);
            // Not all zero (a test that could not fail otherwise).
            assert!(wide(&g_fused)?.abs()?.max_all()?.to_scalar::<f64>()? > 1e-3);
            let diff = max_difference(&wide(&g_fused)?, &wide(&g_reference)?)?;
            assert_eq!(diff, 0.0, "{dtype:?} gradient");
        }
        // Central differences in F64 at every coordinate.
        let qkv = candle::Var::from_tensor(&base)?;
        let analytic = gradient(&causal_attention_qkv(qkv.as_tensor(), heads)?, &qkv)?;
        crate::layers::assert_finite_differences(&[base], &[analytic], |args| {
            loss(&causal_attention_qkv(&args[0], heads)?)?.to_scalar::<f64>()
        })?;
        Ok(())
    }

    /// [`causal_attention_block`] against the three ops it replaces (`linear`,
    /// [`causal_attention_qkv`], `linear`): the same values and gradients of `x` and the four
    /// parameters bit for bit in F64, F32 and BF16, for both weight layouts of `c_attn`; in F64
    /// against central differences.
    #[test]
    fn the_attention_block_equals_its_three_ops() -> Result<()> {
        use crate::layers::linear::linear;
        let mut rng = Rng::seeded(12);
        let (b, t, heads, d) = (2, 5, 3, 4);
        let c = heads * d;
        let x0 = seeded(&mut rng, &[b, t, c])?;
        let wa_in_out = (seeded(&mut rng, &[c, 3 * c])? * 0.3)?;
        let ba0 = seeded(&mut rng, &[3 * c])?;
        let wp0 = (seeded(&mut rng, &[c, c])? * 0.3)?;
        let bp0 = seeded(&mut rng, &[c])?;
        let weights = seeded(&mut rng, &[b, t, c])?;
        let loss = |y: &Tensor| (y.to_dtype(DType::F64)? * &weights)?.sum_all();
        let lp = WeightLayout::InOut;
        for la in [WeightLayout::InOut, WeightLayout::OutIn] {
            let wa0 = match la {
                WeightLayout::InOut => wa_in_out.clone(),
                WeightLayout::OutIn => wa_in_out.t()?.contiguous()?,
            };
            let args = [x0.clone(), wa0, ba0.clone(), wp0.clone(), bp0.clone()];
            for dtype in [DType::F64, DType::F32, DType::BF16] {
                let vars = args
                    .iter()
                    .map(|a| candle::Var::from_tensor(&a.to_dtype(dtype)?))
                    .collect::<Result<Vec<_>>>()?;
                let [x, wa, ba, wp, bp] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
                let fused = causal_attention_block(x, (wa, ba, la), (wp, bp, lp), heads)?;
                let merged = causal_attention_qkv(&linear(x, wa, Some(ba), la)?, heads)?;
                let reference = linear(&merged, wp, Some(bp), lp)?;
                assert_eq!(fused.dtype(), dtype);
                let what = format!("{dtype:?} {la:?}");
                crate::layers::assert_same_values_and_gradients(&fused, &reference, &vars, loss, &what)?;
            }
            let vars = args.iter().map(candle::Var::from_tensor).collect::<Result<Vec<_>>>()?;
            let [x, wa, ba, wp, bp] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor());
            let y = causal_attention_block(x, (wa, ba, la), (wp, bp, lp), heads)?;
            let analytic = crate::layers::gradients(&loss(&y)?, &vars)?;
            crate::layers::assert_finite_differences(&args, &analytic, |a| {
                loss(&causal_attention_block(&a[0], (&a[1], &a[2], la), (&a[3], &a[4], lp), heads)?)?
                    .to_scalar::<f64>()
            })?;
        }
        Ok(())
    }

    /// The attention block with its layer norm inside (the residual stream `x` in F32 or F64,
    /// the norm's result and the layers in F64, F32 and BF16) against the layer norm op followed
    /// by [`causal_attention_block`]: the same values and gradients of `x`, the norm's weight and
    /// bias and the four layer parameters bit for bit; in F64 against central differences.
    #[test]
    fn the_attention_block_with_its_norm_equals_the_norm_then_the_block() -> Result<()> {
        use crate::layers::layer_norm::layer_norm;
        let mut rng = Rng::seeded(13);
        let (b, t, heads, d) = (2, 4, 2, 3);
        let c = heads * d;
        let x0 = seeded(&mut rng, &[b, t, c])?;
        let lw0 = seeded(&mut rng, &[c])?.affine(0.2, 1.0)?;
        let lb0 = (seeded(&mut rng, &[c])? * 0.2)?;
        let params0 = [
            (seeded(&mut rng, &[c, 3 * c])? * 0.3)?,
            seeded(&mut rng, &[3 * c])?,
            (seeded(&mut rng, &[c, c])? * 0.3)?,
            seeded(&mut rng, &[c])?,
        ];
        let weights = seeded(&mut rng, &[b, t, c])?;
        let loss = |y: &Tensor| (y.to_dtype(DType::F64)? * &weights)?.sum_all();
        let l = WeightLayout::InOut;
        let eps = 1e-5;
        // The arguments: x, the norm's weight and bias, then c_attn's and c_proj's.
        let run = |a: &[Tensor], dtype: DType, fused: bool| -> Result<Tensor> {
            let (x, lw, lb) = (&a[0], &a[1], &a[2]);
            let (attn, proj) = ((&a[3], &a[4], l), (&a[5], &a[6], l));
            if fused {
                let (value, backward) =
                    crate::layers::fused::layer_norm_detached(x, lw, lb, eps, dtype)?.expect("applies");
                let norm = DetachedNorm::from_parts(lw.clone(), lb.clone(), backward);
                attention_block(x, Some((value, norm)), attn, proj, heads)
            } else {
                causal_attention_block(&layer_norm(x, lw, lb, eps, dtype)?, attn, proj, heads)
            }
        };
        let args: Vec<Tensor> =
            [x0.clone(), lw0.clone(), lb0.clone()].into_iter().chain(params0.iter().cloned()).collect();
        for (x_dtype, dtype) in
            [(DType::F64, DType::F64), (DType::F32, DType::F32), (DType::F32, DType::BF16)]
        {
            let vars = args
                .iter()
                .enumerate()
                .map(|(i, a)| candle::Var::from_tensor(&a.to_dtype(if i < 3 { x_dtype } else { dtype })?))
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
        let vars = args.iter().map(candle::Var::from_tensor).collect::<Result<Vec<_>>>()?;
        let a: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let analytic = crate::layers::gradients(&loss(&run(&a, DType::F64, true)?)?, &vars)?;
        crate::layers::assert_finite_differences(&args, &analytic, |a| {
            loss(&run(a, DType::F64, true)?)?.to_scalar::<f64>()
        })
    }

    /// Grouped-query heads (4 query heads over 2 and over 1 key/value heads, and plain
    /// multi-head) under a causal mask, and a key-padding mask, equal the head-by-head
    /// reference in F64; padded keys get exactly zero weight.
    #[test]
    fn attention_equals_the_head_by_head_reference() -> Result<()> {
        let mut rng = Rng::seeded(5);
        let (b, heads, t, d) = (2, 4, 5, 3);
        let q = seeded(&mut rng, &[b, heads, t, d])?;
        for kv_heads in [4, 2, 1] {
            let k = seeded(&mut rng, &[b, kv_heads, t, d])?;
            let v = seeded(&mut rng, &[b, kv_heads, t, d])?;
            let fast = scaled_dot_product_attention(&q, &k, &v, AttentionMask::Causal, None)?;
            let diff = max_difference(&fast, &slow(&q, &k, &v, true, None)?)?;
            assert!(diff <= 1e-12, "causal, {kv_heads} key/value heads: {diff:e}");
        }
        let (k, v) = (seeded(&mut rng, &[b, heads, t, d])?, seeded(&mut rng, &[b, heads, t, d])?);
        let keep = vec![vec![1u32, 1, 1, 0, 0], vec![1, 1, 1, 1, 1]];
        let mask = Tensor::new(keep.clone(), &Device::Cpu)?;
        let bias = padding_bias(&mask, DType::F64)?;
        let fast = scaled_dot_product_attention(&q, &k, &v, AttentionMask::KeyPadding(&bias), None)?;
        let diff = max_difference(&fast, &slow(&q, &k, &v, false, Some(&keep))?)?;
        assert!(diff <= 1e-12, "key padding: {diff:e}");
        // Changing a padded key's value changes nothing.
        let v2 =
            v.slice_assign(&[0..1, 0..heads, 3..5, 0..d], &(seeded(&mut rng, &[1, heads, 2, d])? * 100.0)?)?;
        let moved = scaled_dot_product_attention(&q, &k, &v2, AttentionMask::KeyPadding(&bias), None)?;
        assert_eq!(max_difference(&fast, &moved)?, 0.0);
        Ok(())
    }
}
