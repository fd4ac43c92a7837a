//! The module layer models are built from: parameter handles created through a path builder
//! (names come from structure, `b.pp("h").pp(3).pp("attn")`, as candle-nn's `VarBuilder`
//! makes them), a walk over a module's parameters, and a generic segmented stack (embedding,
//! N blocks, head) that gives a model [`SegmentedModel`](candle_ckpt::SegmentedModel) without per-model bookkeeping.
//!
//! A forward's context ([`ForwardContext`], made from candle-ckpt's [`SegmentContext`]) carries
//! the training flag and the segment's replayable generator, so recompute draws the same
//! dropout masks.
//!
//! ```
//! use candle::{DType, Device};
//! use candle_train::layers::{LayerNorm, Linear, WeightLayout};
//! use candle_train::module::{Module, ModuleBuilder};
//! use candle_train::ParamBuilder;
//! # fn main() -> candle_train::Result<()> {
//! let b = ModuleBuilder::new(ParamBuilder::new(DType::F32, Device::Cpu, 0));
//! let block = b.pp("h").pp(0);
//! let ln = LayerNorm::build(&block.pp("ln_1"), 4, 1e-5)?;
//! let fc = Linear::build(&block.pp("mlp").pp("c_fc"), 4, 8, WeightLayout::InOut, 0.02)?;
//! let names: Vec<String> = ln.parameters().into_iter().chain(fc.parameters()).map(|p| p.name).collect();
//! assert_eq!(names, ["h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias"]);
//! assert_eq!(b.finish().len(), 4);
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::rc::Rc;

use candle::{DType, Device, Result, Shape, Tensor};
use candle_ckpt::{Rng, SegmentContext, SegmentParameter};

use crate::params::{ParamBuilder, Parameter, Parameters};

/// Creates parameters under a path: `pp` descends one level, `normal`/`constant` create the
/// parameter `{path}.{leaf}`. Clones share one [`ParamBuilder`] (its dtype, device, seeded
/// generator or given values, and the creation order).
#[derive(Debug, Clone)]
pub struct ModuleBuilder {
    inner: Rc<RefCell<ParamBuilder>>,
    path: String,
}

impl ModuleBuilder {
    /// A builder at the root path (`""`) over `pb`.
    pub fn new(pb: ParamBuilder) -> Self {
        Self { inner: Rc::new(RefCell::new(pb)), path: String::new() }
    }

    /// Runs `f` with a builder at `prefix` over `pb` (the path-string constructors, such as
    /// `Linear::new(pb, "h.0.attn.c_attn", ..)`, are written over it); `pb` keeps every
    /// parameter `f` created.
    ///
    /// # Errors
    /// What `f` returns.
    pub fn scoped<T>(
        pb: &mut ParamBuilder,
        prefix: &str,
        f: impl FnOnce(&ModuleBuilder) -> crate::Result<T>,
    ) -> crate::Result<T> {
        let placeholder = ParamBuilder::new(pb.dtype(), pb.device().clone(), 0);
        let b =
            Self { inner: Rc::new(RefCell::new(std::mem::replace(pb, placeholder))), path: prefix.into() };
        let result = f(&b);
        let placeholder = ParamBuilder::new(pb.dtype(), pb.device().clone(), 0);
        *pb = std::mem::replace(&mut *b.inner.borrow_mut(), placeholder);
        result
    }

    /// The builder one level down: `b.pp("h").pp(0)` creates parameters named `h.0.*`.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self { inner: Rc::clone(&self.inner), path: self.join(&name.to_string()) }
    }

    /// The path of this builder (`h.0.attn`; `""` at the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    fn join(&self, leaf: &str) -> String {
        if self.path.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.path)
        }
    }

    /// The parameter `{path}.{leaf}` with values from N(0, std²) (or the given value of that
    /// name, for a builder over [`ParamBuilder::from_values`]).
    ///
    /// # Errors
    /// As [`ParamBuilder::normal_param`].
    pub fn normal(&self, leaf: &str, shape: impl Into<Shape>, std: f64) -> crate::Result<Parameter> {
        self.inner.borrow_mut().normal_param(self.join(leaf), shape, std)
    }

    /// The parameter `{path}.{leaf}` filled with `value` (or given, as [`ModuleBuilder::normal`]).
    ///
    /// # Errors
    /// As [`ParamBuilder::constant_param`].
    pub fn constant(&self, leaf: &str, shape: impl Into<Shape>, value: f64) -> crate::Result<Parameter> {
        self.inner.borrow_mut().constant_param(self.join(leaf), shape, value)
    }

    /// The quantized weight `{path}.{leaf}` given to the builder
    /// ([`ParamBuilder::with_quantized`]), taken; `None` when there is none.
    pub fn take_quantized(&self, leaf: &str) -> Option<std::sync::Arc<crate::quant::QuantizedWeight>> {
        self.inner.borrow_mut().take_quantized(&self.join(leaf))
    }

    /// The names of the quantized weights given to the builder that no layer has taken.
    pub fn untaken_quantized(&self) -> Vec<String> {
        self.inner.borrow().untaken_quantized()
    }

    /// The dtype parameters are created in.
    pub fn dtype(&self) -> DType {
        self.inner.borrow().dtype()
    }

    /// The device parameters are created on.
    pub fn device(&self) -> Device {
        self.inner.borrow().device().clone()
    }

    /// Every parameter created so far through this builder or its clones, in creation order
    /// (taken: the builder starts over empty).
    pub fn finish(&self) -> Parameters {
        self.inner.borrow_mut().take_parameters()
    }
}

/// A layer or block that owns parameters.
pub trait Module {
    /// Calls `f` with each of the module's parameters, in creation order.
    fn visit_parameters(&self, f: &mut dyn FnMut(&Parameter));

    /// The module's parameters (handles sharing the variables), in creation order.
    fn parameters(&self) -> Vec<Parameter> {
        let mut out = Vec::new();
        self.visit_parameters(&mut |p| out.push(p.clone()));
        out
    }

    /// Calls `f` with each affine layer of the module, in creation order: the layers LoRA
    /// adapters attach to ([`crate::lora`]). By default none; [`crate::module_fields!`] visits the
    /// fields.
    fn visit_linears(&self, _f: &mut dyn FnMut(&crate::layers::Linear)) {}
}

/// The parameters of `modules`, in order: what a segment made of several modules reads
/// ([`Stacked::embedding_parameters`], [`Stacked::head_parameters`]).
pub fn parameters_of(modules: &[&dyn Module]) -> Vec<Parameter> {
    let mut out = Vec::new();
    for m in modules {
        m.visit_parameters(&mut |p| out.push(p.clone()));
    }
    out
}

/// What a module's forward may know about the step: whether the model is training (dropout
/// active), the generator its random layers draw from, in order, and for an encoder over a
/// padded batch the batch's key-padding bias. Made from the segment's [`SegmentContext`], so a
/// recomputed segment replays the same draws.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// Whether the model is training.
    pub training: bool,
    /// The segment's random stream 0 (dropout masks, drawn in the order layers run).
    pub rng: Rng,
    /// The additive key bias of a padded batch (`[batch, 1, 1, keys]`, from
    /// [`padding_bias`](crate::layers::ops::padding_bias)), for attention under
    /// [`AttentionMask::KeyPadding`](crate::layers::AttentionMask::KeyPadding).
    pub key_padding: Option<Tensor>,
}

impl ForwardContext {
    /// The context of a segment's forward (its stream 0), without a key-padding bias.
    pub fn new(ctx: &SegmentContext) -> Self {
        Self { training: ctx.training, rng: ctx.rng(0), key_padding: None }
    }

    /// The same context with the batch's key-padding bias.
    pub fn with_key_padding(self, bias: Tensor) -> Self {
        Self { key_padding: Some(bias), ..self }
    }

    /// Evaluation: no dropout.
    pub fn eval() -> Self {
        Self::new(&SegmentContext::eval())
    }
}

/// A module with one input and one output.
pub trait Forward: Module {
    /// Applies the module to `x`.
    ///
    /// # Errors
    /// On a shape mismatch, a released parameter, or any tensor error of its layers.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor>;
}

macro_rules! forward_without_context {
    ($($ty:ty),+) => {
        $(impl Forward for $ty {
            fn forward(&self, x: &Tensor, _: &mut ForwardContext) -> Result<Tensor> {
                <$ty>::forward(self, x)
            }
        })+
    };
}

forward_without_context!(
    crate::layers::Linear,
    crate::layers::Embedding,
    crate::layers::LayerNorm,
    crate::layers::RmsNorm,
    crate::layers::SwiGlu
);

impl Forward for crate::layers::Mlp {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor> {
        crate::layers::Mlp::forward(self, x, &mut ctx.rng, ctx.training)
    }
}

impl Forward for crate::layers::CausalSelfAttention {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor> {
        crate::layers::CausalSelfAttention::forward(self, x, &mut ctx.rng, ctx.training)
    }
}

impl Module for Parameter {
    fn visit_parameters(&self, f: &mut dyn FnMut(&Parameter)) {
        f(self);
    }
}

impl<M: Module> Module for Option<M> {
    fn visit_parameters(&self, f: &mut dyn FnMut(&Parameter)) {
        if let Some(m) = self {
            m.visit_parameters(f);
        }
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&crate::layers::Linear)) {
        if let Some(m) = self {
            m.visit_linears(f);
        }
    }
}

impl<M: Module> Module for [M] {
    fn visit_parameters(&self, f: &mut dyn FnMut(&Parameter)) {
        for m in self {
            m.visit_parameters(f);
        }
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&crate::layers::Linear)) {
        for m in self {
            m.visit_linears(f);
        }
    }
}

impl<M: Module> Module for Vec<M> {
    fn visit_parameters(&self, f: &mut dyn FnMut(&Parameter)) {
        self.as_slice().visit_parameters(f);
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&crate::layers::Linear)) {
        self.as_slice().visit_linears(f);
    }
}

/// Implements [`Module`] for a struct by visiting the listed fields in order.
#[macro_export]
macro_rules! module_fields {
    ($ty:ty { $($field:ident),+ $(,)? }) => {
        impl $crate::module::Module for $ty {
            fn visit_parameters(&self, f: &mut dyn FnMut(&$crate::Parameter)) {
                $($crate::module::Module::visit_parameters(&self.$field, f);)+
            }

            fn visit_linears(&self, f: &mut dyn FnMut(&$crate::layers::Linear)) {
                $($crate::module::Module::visit_linears(&self.$field, f);)+
            }
        }
    };
}

/// A model made of an embedding segment, a stack of identical blocks and a head segment that
/// returns the loss. [`crate::segmented_stack!`] derives [`SegmentedModel`] from it: segment 0
/// is the embedding, `1..=N` the blocks (named `{block_path}.{i}`, recomputable), the last the
/// head; each segment lists the parameters its modules walk.
///
/// [`SegmentedModel`]: candle_ckpt::SegmentedModel
pub trait Stacked {
    /// What a training step consumes.
    type Batch: ?Sized;
    /// One block of the stack.
    type Block: Forward;

    /// The blocks, in order.
    fn blocks(&self) -> &[Self::Block];

    /// The path the blocks were built under (`h`, `model.layers`, `encoder.layer`).
    fn block_path(&self) -> String;

    /// The name of the embedding segment. By default `embedding`.
    fn embedding_name(&self) -> String {
        "embedding".into()
    }

    /// The input of the embedding segment.
    ///
    /// # Errors
    /// When the batch cannot be turned into a tensor.
    fn first_input(&self, batch: &Self::Batch) -> Result<Tensor>;

    /// The embedding segment.
    ///
    /// # Errors
    /// Any tensor error of its layers.
    fn embed(&self, input: &Tensor, batch: &Self::Batch, ctx: &SegmentContext) -> Result<Tensor>;

    /// The context every block of this batch runs with. By default the segment's
    /// ([`ForwardContext::new`]); an encoder over padded batches adds the key-padding bias.
    ///
    /// # Errors
    /// When the batch's side inputs cannot be made.
    fn block_context(&self, _batch: &Self::Batch, ctx: &SegmentContext) -> Result<ForwardContext> {
        Ok(ForwardContext::new(ctx))
    }

    /// The head segment: the scalar loss.
    ///
    /// # Errors
    /// Any tensor error of its layers.
    fn head(&self, x: &Tensor, batch: &Self::Batch, ctx: &SegmentContext) -> Result<Tensor>;

    /// The parameters the embedding segment reads.
    fn embedding_parameters(&self) -> Vec<Parameter>;

    /// The parameters the head segment reads (a tied embedding included).
    fn head_parameters(&self) -> Vec<Parameter>;
}

/// The functions [`crate::segmented_stack!`] expands to.
pub mod stack {
    use super::*;

    /// Embedding, blocks, head.
    pub fn num_segments<M: Stacked + ?Sized>(model: &M) -> usize {
        model.blocks().len() + 2
    }

    /// `embedding`, `{block_path}.{i}`, `head`.
    pub fn segment_name<M: Stacked + ?Sized>(model: &M, index: usize) -> String {
        match index {
            0 => model.embedding_name(),
            i if i <= model.blocks().len() => format!("{}.{}", model.block_path(), i - 1),
            _ => "head".into(),
        }
    }

    /// Runs segment `index`.
    ///
    /// # Errors
    /// As the segment's method.
    pub fn forward_segment<M: Stacked + ?Sized>(
        model: &M,
        index: usize,
        input: &Tensor,
        batch: &M::Batch,
        ctx: &SegmentContext,
    ) -> Result<Tensor> {
        let blocks = model.blocks();
        match index {
            0 => model.embed(input, batch, ctx),
            i if i <= blocks.len() => blocks[i - 1].forward(input, &mut model.block_context(batch, ctx)?),
            _ => model.head(input, batch, ctx),
        }
    }

    /// The blocks applied in order to `x`, each with its segment's context under `ctx`
    /// (`ctx.for_segment(i + 1)`, as the engine runs block `i`): a model's whole-sequence
    /// forward outside the engine (logits for evaluation or generation).
    ///
    /// # Errors
    /// Any error of the blocks.
    pub fn forward_blocks<B: Forward>(blocks: &[B], x: Tensor, ctx: &SegmentContext) -> Result<Tensor> {
        blocks
            .iter()
            .enumerate()
            .try_fold(x, |h, (i, block)| block.forward(&h, &mut ForwardContext::new(&ctx.for_segment(i + 1))))
    }

    /// The parameters segment `index` reads.
    pub fn segment_parameters<M: Stacked + ?Sized>(model: &M, index: usize) -> Vec<SegmentParameter> {
        let blocks = model.blocks();
        let params = match index {
            0 => model.embedding_parameters(),
            i if i <= blocks.len() => blocks[i - 1].parameters(),
            i if i == blocks.len() + 1 => model.head_parameters(),
            _ => Vec::new(),
        };
        params.iter().map(Parameter::segment_parameter).collect()
    }
}

/// Implements [`candle_ckpt::SegmentedModel`] for a type that implements
/// [`Stacked`](crate::module::Stacked) (the orphan rule forbids a blanket impl).
#[macro_export]
macro_rules! segmented_stack {
    ($ty:ty) => {
        impl $crate::__ckpt::SegmentedModel for $ty {
            type Batch = <$ty as $crate::module::Stacked>::Batch;

            fn num_segments(&self) -> usize {
                $crate::module::stack::num_segments(self)
            }

            fn segment_name(&self, index: usize) -> String {
                $crate::module::stack::segment_name(self, index)
            }

            fn first_input(&self, batch: &Self::Batch) -> $crate::__candle::Result<$crate::__candle::Tensor> {
                $crate::module::Stacked::first_input(self, batch)
            }

            fn forward_segment(
                &self,
                index: usize,
                input: &$crate::__candle::Tensor,
                batch: &Self::Batch,
                ctx: &$crate::__ckpt::SegmentContext,
            ) -> $crate::__candle::Result<$crate::__candle::Tensor> {
                $crate::module::stack::forward_segment(self, index, input, batch, ctx)
            }

            fn segment_parameters(&self, index: usize) -> Vec<$crate::__ckpt::SegmentParameter> {
                $crate::module::stack::segment_parameters(self, index)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_path() -> crate::Result<()> {
        let b = ModuleBuilder::new(ParamBuilder::new(DType::F32, Device::Cpu, 0));
        let w = b.pp("model").pp("layers").pp(2).normal("weight", (2, 3), 0.1)?;
        let top = b.constant("scale", 1, 1.0)?;
        assert_eq!(w.name, "model.layers.2.weight");
        assert_eq!(top.name, "scale");
        let params = b.finish();
        assert_eq!(
            params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["model.layers.2.weight", "scale"]
        );
        assert_eq!(params.get("scale").map(Parameter::id), Some(top.id()));
        assert!(b.finish().is_empty(), "finish takes the parameters");
        Ok(())
    }

    /// Counts how many segments list each parameter, checking that a block segment lists only
    /// parameters under its own name and that every listed parameter is the model's.
    fn listings<M: candle_ckpt::SegmentedModel>(
        model: &M,
        params: &Parameters,
    ) -> std::collections::BTreeMap<String, usize> {
        let mut count: std::collections::BTreeMap<String, usize> =
            params.iter().map(|p| (p.name.clone(), 0)).collect();
        for s in 0..model.num_segments() {
            let segment = model.segment_name(s);
            for p in model.segment_parameters(s) {
                let own = params.get(&p.name).map(Parameter::id);
                assert_eq!(own, Some(p.id()), "{segment} lists {} not the model's", p.name);
                if model.is_block(s) {
                    assert!(p.name.contains(&format!("{segment}.")), "block {segment} lists {}", p.name);
                }
                *count.entry(p.name).or_default() += 1;
            }
        }
        count
    }

    /// Every model built on the module layer lists each parameter in exactly one segment (a
    /// tied embedding in the two that read it): a layer that forgot a field in its walk would
    /// leave a parameter no segment lists, unchecked by the engine and never reduced by ZeRO-2/3.
    #[test]
    fn stacked_models_list_every_parameter_in_the_segments_that_read_it() -> crate::Result<()> {
        use crate::models::{Bert, BertClassifier, BertConfig, Gpt, GptConfig, Llama, LlamaConfig};
        let (dtype, device) = (DType::F32, Device::Cpu);
        let expect = |count: std::collections::BTreeMap<String, usize>, tied: &str| {
            for (name, n) in count {
                assert_eq!(n, if name == tied { 2 } else { 1 }, "{name} is listed by {n} segments");
            }
        };
        let config = GptConfig { n_ctx: 8, n_embd: 8, n_layer: 2, n_head: 2, ..GptConfig::default() };
        let gpt = Gpt::new(config, dtype, &device, 0)?;
        expect(listings(&gpt, gpt.parameters()), "wte.weight");
        let llama = Llama::new(&LlamaConfig::tiny(), dtype, &device, 0)?;
        expect(listings(&llama, llama.parameters()), "");
        let tied = LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny() };
        let llama = Llama::new(&tied, dtype, &device, 0)?;
        expect(listings(&llama, llama.parameters()), "model.embed_tokens.weight");
        let classifier =
            BertClassifier::new(Bert::new(&BertConfig::tiny(), "bert.", dtype, &device, 0)?, 3, 1)?;
        let count = listings(&classifier, classifier.parameters());
        assert!(count.contains_key("bert.encoder.layer.1.attention.self.query.weight"), "{count:?}");
        assert!(count.contains_key("classifier.bias"), "{count:?}");
        expect(count, "");
        Ok(())
    }

    #[test]
    fn a_released_parameter_is_an_error_naming_it() -> crate::Result<()> {
        let b = ModuleBuilder::new(ParamBuilder::new(DType::F32, Device::Cpu, 0));
        let fc = crate::layers::Linear::build(&b.pp("fc"), 3, 2, crate::layers::WeightLayout::OutIn, 0.1)?;
        let x = Tensor::ones((1, 3), DType::F32, &Device::Cpu)?;
        fc.forward(&x)?;
        let params = b.finish();
        let weight = params.get("fc.weight").cloned().ok_or(crate::Error::config("fc", "missing"))?;
        weight.set_released(true);
        let err = fc.forward(&x).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("`fc.weight` is released"), "{err}");
        let path = std::env::temp_dir().join(format!("released-{}.safetensors", std::process::id()));
        let err = params.save_safetensors(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("`fc.weight` is released"), "{err}");
        weight.set_released(false);
        fc.forward(&x)?;
        Ok(())
    }
}
