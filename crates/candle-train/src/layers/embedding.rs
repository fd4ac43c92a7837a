//! Token and position embeddings: a lookup table whose backward scatters the rows' gradients
//! back with an `index_add` in F32.

use candle::{Result, Tensor, Var};

use crate::device::reduction_dtype;
use crate::layers::custom_grad::custom2;
use crate::module::ModuleBuilder;
use crate::params::{ParamBuilder, Parameter};

/// A lookup table `[num_embeddings, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Parameter,
}

crate::module_fields!(Embedding { weight });

impl Embedding {
    /// Creates the table as parameter `name` ~ N(0, std²).
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        num_embeddings: usize,
        dim: usize,
        std: f64,
    ) -> crate::Result<Self> {
        Ok(Self { weight: pb.normal_param(name, (num_embeddings, dim), std)? })
    }

    /// Creates the table as parameter `weight` ~ N(0, std²) under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(b: &ModuleBuilder, num_embeddings: usize, dim: usize, std: f64) -> crate::Result<Self> {
        Ok(Self { weight: b.normal("weight", (num_embeddings, dim), std)? })
    }

    /// A table over an existing variable (shared, not copied), named `weight`.
    pub fn from_var(weight: Var) -> Self {
        Self { weight: Parameter::new("weight", weight) }
    }

    /// The table's handle (read it with [`Parameter::tensor`]).
    pub fn weight(&self) -> &Parameter {
        &self.weight
    }

    /// Looks up integer `ids` of any shape; the result has shape `[ids..., dim]`.
    ///
    /// # Errors
    /// On a non-integer or out-of-range id tensor.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        embedding(&self.weight.tensor()?, ids)
    }

    /// The tied output head: hidden states `h` (`[batch, t, dim]`) times the table
    /// transposed, the logits `[batch, t, num_embeddings]` (GPT-2's and a tied LLaMA's head).
    ///
    /// # Errors
    /// On a shape mismatch or a released table.
    pub fn tied_logits(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, c) = h.dims3()?;
        let logits = crate::layers::linear::matmul_transposed(&h.reshape((b * t, c))?, &self.weight)?;
        logits.reshape((b, t, self.weight.dims()[0]))
    }
}

/// Looks up integer `ids` of any shape in `table` `[num_embeddings, dim]` (the function behind
/// [`Embedding`], for a table held as a tensor); the result has shape `[ids..., dim]`.
///
/// # Errors
/// On a non-integer or out-of-range id tensor.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    let ids = ids.flatten_all()?;
    let value = table.detach().index_select(&ids, 0)?;
    // The gradient scatters rows into the table: accumulate repeated ids in F32.
    let rows = custom2("embedding", table, &ids, value, |table, ids, _, g| {
        let rd = reduction_dtype(table.dtype());
        let grad = Tensor::zeros(table.shape(), rd, table.device())?.index_add(ids, &g.to_dtype(rd)?, 0)?;
        Ok((Some(grad.to_dtype(table.dtype())?), None))
    })?;
    rows.reshape(dims)
}
