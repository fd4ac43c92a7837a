//! Token and position embeddings (a lookup table with a real backward: `index_select`,
//! whose gradient is an `index_add`).

use candle::{Result, Tensor, Var};

use crate::params::ParamBuilder;

/// A lookup table `[num_embeddings, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Var,
}

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
        Ok(Self { weight: pb.normal(name, (num_embeddings, dim), std)? })
    }

    /// The table.
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// Looks up integer `ids` of any shape; the result has shape `[ids..., dim]`.
    ///
    /// # Errors
    /// On a non-integer or out-of-range id tensor.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        let table = self.weight.as_tensor();
        dims.push(table.dim(1)?);
        table.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
    }
}
