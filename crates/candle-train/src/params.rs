//! Named trainable parameters: creation with a seeded initialiser, lookup, and safetensors
//! save/load under the model's own (Hugging Face) names.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle::{DType, Device, Shape, Tensor, TensorId, Var};
use candle_ckpt::{Rng, SegmentParameter};

use crate::error::{Error, Result};
use crate::io::write_atomic;

/// One named parameter: the handle layers read their weights through.
///
/// Clones share the variable and its residency: ZeRO stage 3 marks a parameter released
/// ([`Parameter::set_released`]) before it frees its storage, and every read through the handle
/// ([`Parameter::tensor`], the layers' forwards, [`Parameters::save_safetensors`]) is then an
/// error naming the parameter instead of a read of freed memory.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// The full name (`h.0.attn.c_attn.weight`).
    pub name: String,
    /// Its value, in the model's compute dtype. Reading it directly bypasses the residency
    /// check: code that may run while the parameter is sharded reads [`Parameter::tensor`].
    pub var: Var,
    /// Whether the storage is released (shared by every clone of this handle).
    released: Arc<AtomicBool>,
    /// Whether the parameter is frozen (shared by every clone of this handle).
    frozen: Arc<AtomicBool>,
}

impl Parameter {
    /// A resident parameter over `var` (shared, not copied).
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        Self {
            name: name.into(),
            var,
            released: Arc::new(AtomicBool::new(false)),
            frozen: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The parameter's stable id: its variable's, which stays the same through release and
    /// gather (ZeRO stage 3 swaps the storage, never the variable).
    pub fn id(&self) -> TensorId {
        self.var.as_tensor().id()
    }

    /// The value, for computing with. A frozen parameter's value is a constant (the variable's
    /// storage, shared, detached from autograd): no gradient is computed for it, while the
    /// gradients of the inputs it multiplies still flow.
    ///
    /// # Errors
    /// [`crate::Error::ParameterReleased`] (wrapped in a Candle error, as layers return Candle
    /// results) when the parameter is released: its storage is freed until it is gathered.
    pub fn tensor(&self) -> candle::Result<Tensor> {
        if self.is_released() {
            return Err(candle::Error::wrap(crate::Error::ParameterReleased { name: self.name.clone() }));
        }
        if self.is_frozen() {
            return Ok(self.var.as_tensor().detach());
        }
        Ok(self.var.as_tensor().clone())
    }

    /// Whether the parameter is frozen: read as a constant, so it receives no gradient (a LoRA
    /// base weight).
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Freezes the parameter (reads through [`Parameter::tensor`] become constants) or makes it
    /// trainable again. Whoever freezes it also leaves it out of the [`Parameters`] the updater
    /// steps.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }

    /// Whether the parameter's storage is released now (ZeRO stage 3, between its segment's
    /// uses).
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Marks the parameter released (before its storage is freed) or resident (after its
    /// values are back). Only code that owns the storage swap (ZeRO stage 3) calls it.
    pub fn set_released(&self, released: bool) {
        self.released.store(released, Ordering::Release);
    }

    /// The parameter as the recompute engine lists it.
    pub fn segment_parameter(&self) -> SegmentParameter {
        SegmentParameter { name: self.name.clone(), var: self.var.clone() }
    }
}

/// The ordered set of a model's parameters. Order is creation order and is stable: the
/// optimizer's state and flat buffers follow it.
#[derive(Debug, Clone, Default)]
pub struct Parameters {
    list: Vec<Parameter>,
}

impl Parameters {
    /// Every parameter's current value, detached, by name (what a deep copy is built from:
    /// [`crate::serve::Snapshot`]).
    ///
    /// # Errors
    /// [`crate::Error::ParameterReleased`] for a parameter whose values are not resident.
    pub fn detached_values(&self) -> crate::Result<std::collections::HashMap<String, Tensor>> {
        self.iter().map(|p| Ok((p.name.clone(), p.tensor()?.detach()))).collect()
    }

    /// All parameters, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Parameter> {
        self.list.iter()
    }

    /// The number of parameter tensors.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Parameter> {
        self.list.iter().find(|p| p.name == name)
    }

    /// The total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.list.iter().map(|p| p.var.elem_count()).sum()
    }

    /// The total bytes the parameters occupy in their dtype.
    pub fn size_in_bytes(&self) -> usize {
        self.list.iter().map(|p| p.var.elem_count() * p.var.dtype().size_in_bytes()).sum()
    }

    /// Saves every parameter to a safetensors file under its name, atomically.
    ///
    /// # Errors
    /// On serialization or I/O failure; [`Error::ParameterReleased`] naming a released
    /// parameter.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors =
            self.list.iter().map(|p| Ok((p.name.clone(), p.tensor()?))).collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(tensors, None)
            .map_err(|e| Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })?;
        write_atomic(path, &bytes)
    }

    /// Loads every parameter from a safetensors file, by name. Each tensor must exist and have
    /// the parameter's shape; it is converted to the parameter's dtype.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::MalformedState`] if it is not
    /// safetensors, [`Error::StateMismatch`] naming the first missing or misshapen tensor,
    /// [`Error::ParameterReleased`] naming a released parameter.
    /// Nothing is modified unless every tensor matches.
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        if let Some(p) = self.list.iter().find(|p| p.is_released()) {
            return Err(Error::ParameterReleased { name: p.name.clone() });
        }
        let bytes = crate::io::read_bounded(path, crate::io::MAX_STATE_BYTES)?;
        let device = self.list.first().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
        let loaded: HashMap<String, Tensor> = candle::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })?;
        let mut values = Vec::with_capacity(self.list.len());
        for p in &self.list {
            let Some(t) = loaded.get(&p.name) else {
                return Err(Error::StateMismatch {
                    name: p.name.clone(),
                    expected: format!("a tensor of shape {:?}", p.var.dims()),
                    found: "nothing".into(),
                });
            };
            if t.dims() != p.var.dims() {
                return Err(Error::StateMismatch {
                    name: p.name.clone(),
                    expected: format!("shape {:?}", p.var.dims()),
                    found: format!("shape {:?}", t.dims()),
                });
            }
            values.push(t.to_dtype(p.var.dtype())?);
        }
        for (p, value) in self.list.iter().zip(values) {
            p.var.set(&value)?;
        }
        Ok(())
    }

    /// Parameters over existing handles, in the given order, sharing them (their variables and
    /// residency): what a wrapper that trains only some of a model's parameters hands the
    /// updater.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] when a name repeats.
    pub fn from_handles(handles: impl IntoIterator<Item = Parameter>) -> Result<Self> {
        let mut list: Vec<Parameter> = Vec::new();
        for p in handles {
            if list.iter().any(|q| q.name == p.name) {
                return Err(Error::StateMismatch {
                    name: p.name,
                    expected: "one parameter of that name".into(),
                    found: "two".into(),
                });
            }
            list.push(p);
        }
        Ok(Self { list })
    }

    /// Parameters over existing variables, in the given order, sharing them (no copy): the
    /// updater writes the same storage the caller holds.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] when a name repeats.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, Var)>) -> Result<Self> {
        let mut list: Vec<Parameter> = Vec::new();
        for (name, var) in vars {
            if list.iter().any(|p| p.name == name) {
                return Err(Error::StateMismatch {
                    name,
                    expected: "one parameter of that name".into(),
                    found: "two".into(),
                });
            }
            list.push(Parameter::new(name, var));
        }
        Ok(Self { list })
    }

    /// The variables of a candle-nn `VarMap`, shared (no copy), ordered by name (a `VarMap`
    /// keeps no order; names give a stable one for optimizer state and checkpoints).
    ///
    /// # Errors
    /// When the map's lock is poisoned.
    pub fn from_var_map(map: &candle_nn::VarMap) -> Result<Self> {
        let data = map.data().lock().map_err(|_| {
            Error::Candle(candle::Error::Msg(
                "the VarMap's lock is poisoned (a thread panicked holding it)".into(),
            ))
        })?;
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(name, var)| (name.clone(), var.clone())).collect();
        drop(data);
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_vars(vars)
    }

    /// The parameters whose names start with `prefix` followed by `.` (or equal it), as the
    /// recompute engine lists them: the parameters of one layer or block of a model built
    /// with a `VarBuilder` (`vb.pp("h").pp(0)` names them `h.0.*`).
    pub fn segment_parameters_under(&self, prefix: &str) -> Vec<SegmentParameter> {
        self.list
            .iter()
            .filter(|p| {
                p.name == prefix || p.name.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.'))
            })
            .map(Parameter::segment_parameter)
            .collect()
    }

    /// These parameters followed by `other`'s (an encoder and its task head trained together).
    pub fn merged(&self, other: &Parameters) -> Parameters {
        Parameters { list: self.list.iter().chain(other.list.iter()).cloned().collect() }
    }

    /// The parameters as the recompute engine lists them.
    pub fn segment_parameters<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<SegmentParameter> {
        names.into_iter().filter_map(|name| self.get(name).map(Parameter::segment_parameter)).collect()
    }
}

/// Creates parameters in a dtype on a device, with values drawn from a seeded generator, and
/// records them in creation order.
#[derive(Debug)]
pub struct ParamBuilder {
    dtype: DType,
    device: Device,
    rng: Rng,
    params: Parameters,
    /// When set, parameters take these values by name instead of drawing them.
    values: Option<HashMap<String, Tensor>>,
}

impl ParamBuilder {
    /// A builder whose random values come from `seed`.
    pub fn new(dtype: DType, device: Device, seed: u64) -> Self {
        Self { dtype, device, rng: Rng::seeded(seed), params: Parameters::default(), values: None }
    }

    /// A builder whose parameters take their values from `values` by name (a loaded
    /// checkpoint), converted to `dtype` and moved to `device`, instead of being drawn: no
    /// random initialisation runs. Tensors no parameter asks for are ignored.
    ///
    /// Every later [`ParamBuilder::normal`] or [`ParamBuilder::constant`] fails with
    /// [`Error::StateMismatch`] when `values` has no tensor of that name or its shape differs.
    pub fn from_values(dtype: DType, device: Device, values: HashMap<String, Tensor>) -> Self {
        Self { values: Some(values), ..Self::new(dtype, device, 0) }
    }

    /// The value given for `name` (removed from the map), checked against `shape`; `None` when
    /// this builder draws its values.
    fn given(&mut self, name: &str, shape: &Shape) -> Result<Option<Tensor>> {
        let Some(values) = self.values.as_mut() else { return Ok(None) };
        let Some(t) = values.remove(name) else {
            return Err(Error::StateMismatch {
                name: name.to_string(),
                expected: format!("a tensor of shape {:?}", shape.dims()),
                found: "nothing".into(),
            });
        };
        if t.dims() != shape.dims() {
            return Err(Error::StateMismatch {
                name: name.to_string(),
                expected: format!("shape {:?}", shape.dims()),
                found: format!("shape {:?}", t.dims()),
            });
        }
        Ok(Some(t))
    }

    fn push_tensor(&mut self, name: String, t: Tensor) -> Result<Parameter> {
        let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
        // `Var::from_tensor` copies a non-variable's storage (contiguously): the parameter never
        // shares memory with the caller's tensor.
        let param = Parameter::new(name, Var::from_tensor(&t.detach())?);
        self.params.list.push(param.clone());
        Ok(param)
    }

    /// The dtype parameters are created in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device parameters are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn push(&mut self, name: String, values: Vec<f64>, shape: Shape) -> Result<Parameter> {
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(self.dtype)?;
        let param = Parameter::new(name, Var::from_tensor(&t.to_device(&self.device)?)?);
        self.params.list.push(param.clone());
        Ok(param)
    }

    /// A parameter with values from N(0, std²).
    ///
    /// # Errors
    /// On a tensor allocation failure.
    pub fn normal(&mut self, name: impl Into<String>, shape: impl Into<Shape>, std: f64) -> Result<Var> {
        Ok(self.normal_param(name, shape, std)?.var)
    }

    /// A parameter filled with `value`.
    ///
    /// # Errors
    /// On a tensor allocation failure.
    pub fn constant(&mut self, name: impl Into<String>, shape: impl Into<Shape>, value: f64) -> Result<Var> {
        Ok(self.constant_param(name, shape, value)?.var)
    }

    /// As [`ParamBuilder::normal`], returning the parameter's handle.
    ///
    /// # Errors
    /// On a tensor allocation failure; [`Error::StateMismatch`] for a missing or misshapen given
    /// value.
    pub fn normal_param(
        &mut self,
        name: impl Into<String>,
        shape: impl Into<Shape>,
        std: f64,
    ) -> Result<Parameter> {
        let (name, shape) = (name.into(), shape.into());
        if let Some(t) = self.given(&name, &shape)? {
            return self.push_tensor(name, t);
        }
        let values = (0..shape.elem_count()).map(|_| self.rng.normal_f64() * std).collect();
        self.push(name, values, shape)
    }

    /// As [`ParamBuilder::constant`], returning the parameter's handle.
    ///
    /// # Errors
    /// On a tensor allocation failure; [`Error::StateMismatch`] for a missing or misshapen given
    /// value.
    pub fn constant_param(
        &mut self,
        name: impl Into<String>,
        shape: impl Into<Shape>,
        value: f64,
    ) -> Result<Parameter> {
        let (name, shape) = (name.into(), shape.into());
        if let Some(t) = self.given(&name, &shape)? {
            return self.push_tensor(name, t);
        }
        let values = vec![value; shape.elem_count()];
        self.push(name, values, shape)
    }

    /// The parameters created so far, taken (the builder keeps creating into an empty list).
    pub fn take_parameters(&mut self) -> Parameters {
        std::mem::take(&mut self.params)
    }

    /// The parameters created so far.
    pub fn finish(self) -> Parameters {
        self.params
    }
}
