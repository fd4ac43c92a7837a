//! Named trainable parameters: creation with a seeded initialiser, lookup, and safetensors
//! save/load under the model's own (Hugging Face) names.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle::{DType, Device, Shape, Tensor, TensorId, Var};
use candle_ckpt::{Residency, Rng, SegmentParameter};

use crate::error::{Error, Result};
use crate::io::write_atomic;

/// One named parameter: the handle layers read their weights through.
///
/// Clones share the variable and its residency: ZeRO stage 3 marks a parameter released
/// ([`Parameter::set_released`]) before it frees its storage, and every read of its values
/// through the handle ([`Parameter::tensor`], [`Parameter::var`], the layers' forwards,
/// [`Parameters::save_safetensors`]) is then an error naming the parameter instead of a read of
/// freed memory.
///
/// The variable is private, so safe code reaches its values only through those checked
/// accessors; its metadata ([`Parameter::id`], [`Parameter::shape`], [`Parameter::dtype`],
/// [`Parameter::device`], ...) never touches the storage and is always readable. What the
/// check cannot see is a value taken while the parameter was resident and kept past its
/// release (a tensor from [`Parameter::tensor`] or a clone of [`Parameter::var`]'s variable):
/// they share the storage, so code that may run while a model is sharded takes values through
/// the handle when it uses them, never earlier.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// The full name (`h.0.attn.c_attn.weight`).
    pub name: String,
    /// Its value, in the model's compute dtype (private: see the type's docs).
    var: Var,
    /// Whether the storage is released (shared by every clone of this handle and its
    /// [`SegmentParameter`]s).
    residency: Residency,
    /// Whether the parameter is frozen (shared by every clone of this handle).
    frozen: Arc<AtomicBool>,
}

impl Parameter {
    /// A resident parameter over `var` (shared, not copied).
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        Self { name: name.into(), var, residency: Residency::new(), frozen: Arc::new(AtomicBool::new(false)) }
    }

    /// The parameter's stable id: its variable's, which stays the same through release and
    /// gather (ZeRO stage 3 swaps the storage, never the variable).
    pub fn id(&self) -> TensorId {
        self.var.as_tensor().id()
    }

    /// The shape (metadata: readable while released).
    pub fn shape(&self) -> &Shape {
        self.var.shape()
    }

    /// The dimensions (metadata: readable while released).
    pub fn dims(&self) -> &[usize] {
        self.var.dims()
    }

    /// The number of dimensions (metadata: readable while released).
    pub fn rank(&self) -> usize {
        self.var.rank()
    }

    /// The number of elements (metadata: readable while released).
    pub fn elem_count(&self) -> usize {
        self.var.elem_count()
    }

    /// The dtype (metadata: readable while released).
    pub fn dtype(&self) -> DType {
        self.var.dtype()
    }

    /// The device (metadata: readable while released).
    pub fn device(&self) -> &Device {
        self.var.device()
    }

    /// The variable, to read its values or set them (`var()?.set(..)`).
    ///
    /// # Errors
    /// [`Error::ParameterReleased`] naming the parameter when it is released: its storage is
    /// freed until it is gathered.
    pub fn var(&self) -> Result<&Var> {
        if self.is_released() {
            return Err(Error::ParameterReleased { name: self.name.clone() });
        }
        Ok(&self.var)
    }

    /// The variable, whatever the parameter's residency: for the code that swaps a released
    /// parameter's storage (ZeRO stage 3's release and gather).
    ///
    /// # Safety
    /// While the parameter is released its storage does not cover its layout, and Candle's
    /// kernels read storage through raw pointers: reading its values (any op on the variable
    /// or a tensor cloned from it, `Var::set`, `to_vec`, ...) is undefined behaviour. The
    /// caller may read the variable's metadata (id, shape, dtype, device) and may replace its
    /// storage wholesale with an in-place op that does not read the old buffer (swapping it
    /// for a buffer covering the layout before calling `set_released(false)`, or for an empty
    /// one after calling `set_released(true)`); it must not keep the reference, or a clone of
    /// the variable, past that.
    pub unsafe fn var_unchecked(&self) -> &Var {
        &self.var
    }

    /// The value, for computing with. A frozen parameter's value is a constant (the variable's
    /// storage, shared, detached from autograd): no gradient is computed for it, while the
    /// gradients of the inputs it multiplies still flow.
    ///
    /// # Errors
    /// [`crate::Error::ParameterReleased`] (wrapped in a Candle error, as layers return Candle
    /// results) when the parameter is released: its storage is freed until it is gathered.
    pub fn tensor(&self) -> candle::Result<Tensor> {
        let var = self.var().map_err(candle::Error::wrap)?;
        if self.is_frozen() {
            return Ok(var.as_tensor().detach());
        }
        Ok(var.as_tensor().clone())
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
        self.residency.is_released()
    }

    /// Marks the parameter released (before its storage is freed) or resident (after its
    /// values are back). Only code that owns the storage swap (ZeRO stage 3) calls it.
    pub fn set_released(&self, released: bool) {
        self.residency.set_released(released);
    }

    /// The parameter as the recompute engine lists it (sharing the variable and the
    /// residency: its [`SegmentParameter::var`] refuses it while released).
    pub fn segment_parameter(&self) -> SegmentParameter {
        SegmentParameter::with_residency(self.name.clone(), self.var.clone(), self.residency.clone())
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
        // Through `var()`: a released parameter is the typed error, not a wrapped one.
        self.iter().map(|p| Ok((p.name.clone(), p.var()?.as_tensor().detach()))).collect()
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
        self.list.iter().map(Parameter::elem_count).sum()
    }

    /// The total bytes the parameters occupy in their dtype.
    pub fn size_in_bytes(&self) -> usize {
        self.list.iter().map(|p| p.elem_count() * p.dtype().size_in_bytes()).sum()
    }

    /// Saves every parameter to a safetensors file under its name, atomically.
    ///
    /// # Errors
    /// On serialization or I/O failure; [`Error::ParameterReleased`] naming a released
    /// parameter.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors = self
            .list
            .iter()
            .map(|p| Ok((p.name.clone(), p.var()?.as_tensor().clone())))
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(tensors, None)
            .map_err(|e| Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })?;
        write_atomic(path, &bytes)
    }

    /// Loads every parameter from a safetensors file, by name. Each tensor must exist and have
    /// the parameter's shape; it is converted to the parameter's dtype.
    ///
    /// # Errors
    /// [`Error::ParameterReleased`] naming a released parameter (before the file is read),
    /// [`Error::Io`] if the file cannot be read, [`Error::MalformedState`] if it is not
    /// safetensors, [`Error::StateMismatch`] naming the first missing or misshapen tensor.
    /// Nothing is modified unless every tensor matches.
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        self.list.iter().try_for_each(|p| p.var().map(drop))?;
        let loaded = crate::io::read_safetensors(path, &self.device())?;
        for (var, value) in self.values_by_name(&loaded, str::to_string)? {
            var.set(&value)?;
        }
        Ok(())
    }

    /// Each parameter's variable with its new value: the tensor of `loaded` under
    /// `key(name)`, checked against the parameter's shape and converted to its dtype and
    /// device. Checks everything before the caller sets anything.
    ///
    /// # Errors
    /// [`Error::ParameterReleased`] naming a released parameter; [`Error::StateMismatch`]
    /// naming (by key) the first missing or misshapen tensor.
    pub(crate) fn values_by_name(
        &self,
        loaded: &HashMap<String, Tensor>,
        key: impl Fn(&str) -> String,
    ) -> Result<Vec<(&Var, Tensor)>> {
        let mut values = Vec::with_capacity(self.list.len());
        for p in &self.list {
            let name = key(&p.name);
            let Some(t) = loaded.get(&name) else {
                return Err(Error::StateMismatch {
                    name,
                    expected: format!("a tensor of shape {:?}", p.dims()),
                    found: "nothing".into(),
                });
            };
            if t.dims() != p.dims() {
                return Err(Error::StateMismatch {
                    name,
                    expected: format!("shape {:?}", p.dims()),
                    found: format!("shape {:?}", t.dims()),
                });
            }
            values.push((p.var()?, t.to_dtype(p.dtype())?.to_device(p.device())?));
        }
        Ok(values)
    }

    /// The device of the first parameter (the CPU when there are none).
    pub fn device(&self) -> Device {
        self.list.first().map_or(Device::Cpu, |p| p.device().clone())
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
    /// Quantized weights by name, which affine layers take instead of creating a parameter.
    quantized: HashMap<String, std::sync::Arc<crate::quant::QuantizedWeight>>,
}

impl ParamBuilder {
    /// A builder whose random values come from `seed`.
    pub fn new(dtype: DType, device: Device, seed: u64) -> Self {
        Self {
            dtype,
            device,
            rng: Rng::seeded(seed),
            params: Parameters::default(),
            values: None,
            quantized: HashMap::new(),
        }
    }

    /// Gives affine layers quantized weights by name (QLoRA's frozen base, [`crate::quant`]):
    /// a layer whose `{path}.weight` is among them holds it instead of a parameter.
    pub fn with_quantized(self, weights: impl IntoIterator<Item = crate::quant::QuantizedWeight>) -> Self {
        self.with_shared_quantized(weights.into_iter().map(std::sync::Arc::new))
    }

    /// Gives affine layers quantized weights shared with another model (as
    /// [`ParamBuilder::with_quantized`], the same immutable blocks, not copied: a snapshot's or
    /// an in-process rank's replica of a QLoRA base).
    pub fn with_shared_quantized(
        mut self,
        weights: impl IntoIterator<Item = std::sync::Arc<crate::quant::QuantizedWeight>>,
    ) -> Self {
        for w in weights {
            self.quantized.insert(w.name().to_string(), w);
        }
        self
    }

    /// The quantized weight given for `name`, taken (`None` when there is none).
    pub fn take_quantized(&mut self, name: &str) -> Option<std::sync::Arc<crate::quant::QuantizedWeight>> {
        self.quantized.remove(name)
    }

    /// The names of the quantized weights no layer has taken yet, sorted.
    pub fn untaken_quantized(&self) -> Vec<String> {
        let mut names: Vec<String> = self.quantized.keys().cloned().collect();
        names.sort();
        names
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
