//! LoRA adapters on a model written with this module's drop-in layers (see [`Lora`]).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle::{DType, Device, Shape, Tensor, Var};
use candle_ckpt::Rng;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::layers::Dropout;
use crate::lora::peft::{self, PeftInfo};
use crate::lora::{new_adapter, target_matches, LoraAdapter, LoraConfig, Shared};
use crate::params::Parameters;

thread_local! {
    /// The [`Lora`] whose [`Lora::build`] is running on this thread: the one
    /// [`super::linear`] asks for an adapter.
    static BUILDING: RefCell<Option<Arc<State>>> = const { RefCell::new(None) };
}

/// PEFT-style LoRA adapters for a model written the candle-nn way with this module's layers
/// ([`super::linear`], [`super::linear_no_bias`], [`super::linear_b`]): the model's own code
/// is unchanged; it is built through [`Lora::build`], whose `VarBuilder` hands out the base
/// `VarMap`'s variables as constants (frozen: Candle computes no gradient for them, while
/// input gradients still flow) and whose linear layers at a targeted path (the `VarBuilder`
/// prefix, matched as [`LoraConfig::targets`] says: `q_proj`, `attn.q_proj`, `all-linear`)
/// carry a [`LoraAdapter`] computing `x Wᵀ (+ b) + s B A dropout(x)`. The adapters are the
/// only variables in the graph: [`Lora::parameters`] (for this crate's updaters) or
/// [`Lora::vars`] (for a candle-nn optimizer).
///
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_train::lora::LoraConfig;
/// use candle_train::nn::{linear, Linear, Lora, VarBuilder, VarMap};
///
/// struct Mlp { up: Linear, down: Linear }
/// impl Mlp {
///     fn new(vb: VarBuilder) -> candle::Result<Self> {
///         Ok(Self { up: linear(4, 8, vb.pp("up"))?, down: linear(8, 4, vb.pp("down"))? })
///     }
///     fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
///         self.down.forward(&self.up.forward(x)?.relu()?)
///     }
/// }
/// # fn main() -> candle_train::Result<()> {
/// let base = VarMap::new(); // or loaded: base.load("model.safetensors")
/// let lora = Lora::new(LoraConfig { rank: 2, alpha: 4.0, ..LoraConfig::new(["up"]) }, 0)?;
/// let model = lora.build(&base, DType::F32, &Device::Cpu, Mlp::new)?;
/// assert_eq!(lora.adapted_layers(), ["up"]);
/// let loss = model.forward(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?)?.sqr()?.sum_all()?;
/// let grads = loss.backward()?;
/// assert!(grads.get(lora.vars()[0].as_tensor()).is_some()); // up.lora_A.weight
/// assert!(base.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_none()));
/// # Ok(()) }
/// ```
///
/// Limits: adapters attach only to layers made by this module's `linear*` constructors inside
/// `build` (a `Linear::new` over tensors the model fetched itself gets none); a layer at a
/// targeted path whose weight is a trainable variable (fetched through another `VarBuilder`
/// inside `build`) is refused; two layers at one path share the base weight (candle-nn's rule)
/// and so share one adapter; the base must be dense (no QLoRA here); dropout draws only after
/// [`Lora::set_dropout_seed`].
#[derive(Debug, Clone)]
pub struct Lora {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    config: LoraConfig,
    dropout: Dropout,
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    rng: Rng,
    built: bool,
    /// Every linear layer's path seen by the running build (for the unmatched-target error).
    linears: Vec<String>,
    adapters: Vec<(String, Arc<LoraAdapter>)>,
    /// A PEFT weights file to load when the build ends ([`Lora::from_peft`]).
    pending: Option<(PathBuf, PeftInfo)>,
}

impl State {
    fn lock(&self) -> candle::Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| candle::Error::wrap(Error::Poisoned { what: "the candle-nn LoRA adapters" }))
    }
}

/// Restores the thread's previous build when a build ends (or its closure panics).
struct Restore(Option<Arc<State>>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        BUILDING.with(|b| *b.borrow_mut() = previous);
    }
}

/// A `VarMap` whose variables are handed out as constants: the frozen base.
struct FrozenVarMap(VarMap);

impl SimpleBackend for FrozenVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle::Result<Tensor> {
        Ok(self.0.get(shape, name, init, dtype, device)?.detach())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> candle::Result<Tensor> {
        candle::bail!("`{name}`: get_unchecked does not make sense for a VarMap, use get")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.data().lock().is_ok_and(|data| data.contains_key(name))
    }
}

impl Lora {
    /// Adapters shaped as `config` says, each `A` drawn from `seed` in the order the build
    /// creates the layers.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an invalid config or one with `quantize_base` (the
    /// drop-in layers hold dense weights).
    pub fn new(config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        if let Some(q) = config.quantize_base {
            return Err(Error::config(
                "lora quantize_base",
                format!("`{q}`: the candle-nn drop-in layers hold dense weights (QLoRA needs the module layer's LoraModel)"),
            ));
        }
        let dropout = Dropout::new(config.dropout)?;
        let inner = Inner {
            rng: Rng::seeded(seed),
            built: false,
            linears: Vec::new(),
            adapters: Vec::new(),
            pending: None,
        };
        Ok(Self {
            state: Arc::new(State { config, dropout, shared: Arc::default(), inner: Mutex::new(inner) }),
        })
    }

    /// Reads a PEFT folder's `adapter_config.json` ([`peft::read_config`]); the next
    /// [`Lora::build`] loads `adapter_model.safetensors` into the adapters it creates.
    /// `module_prefix` is what stands between `base_model.model.` and this model's paths.
    ///
    /// # Errors
    /// As [`peft::read_config`] and [`Lora::new`]; a config with `fan_in_fan_out` (these layers
    /// hold `[out, in]` weights).
    pub fn from_peft(dir: &Path, module_prefix: &str) -> Result<(Self, PeftInfo)> {
        let path = dir.join(peft::CONFIG_FILE);
        let (config, fan_in_fan_out, mut info) = peft::read_config(&path)?;
        if fan_in_fan_out {
            return Err(Error::MalformedState {
                path,
                reason: "`fan_in_fan_out` is true, but candle-nn linear layers hold [out, in] weights".into(),
            });
        }
        info.module_prefix = module_prefix.to_string();
        let lora = Self::new(config, 0)?;
        lora.state.lock()?.pending = Some((dir.join(peft::WEIGHTS_FILE), info.clone()));
        Ok((lora, info))
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.state.config
    }

    /// Runs `build` (the model's constructor, `Mlp::new`) with a `VarBuilder` over `base` that
    /// hands out its variables (creating missing ones, as candle-nn does) as constants, and
    /// attaches an adapter to every [`super::linear`] layer at a targeted path. Then loads the
    /// pending PEFT weights, if any ([`Lora::from_peft`]).
    ///
    /// # Errors
    /// A second build of the same `Lora` (also after a failed one: make a new `Lora`);
    /// `build`'s error; [`Error::InvalidConfig`] for a
    /// target pattern that matches no linear layer (listing the layers' names) or a targeted
    /// layer whose weight is a trainable variable; as [`Lora::load_peft_weights`].
    pub fn build<T>(
        &self,
        base: &VarMap,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle::Result<T>,
    ) -> Result<T> {
        {
            let mut inner = self.state.lock()?;
            if inner.built {
                return Err(Error::config(
                    "lora build",
                    "this Lora already built a model (its adapters belong to it): make a new Lora",
                ));
            }
            inner.built = true;
        }
        let vb = VarBuilder::from_backend(Box::new(FrozenVarMap(base.clone())), dtype, device.clone());
        let model = {
            let previous = BUILDING.with(|b| b.borrow_mut().replace(Arc::clone(&self.state)));
            let _restore = Restore(previous);
            build(vb)?
        };
        let pending = {
            let inner = self.state.lock()?;
            for pattern in &self.state.config.targets {
                if !inner.linears.iter().any(|path| target_matches(pattern, path)) {
                    let mut names = inner.linears.clone();
                    names.sort_unstable();
                    names.dedup();
                    return Err(Error::config(
                        "lora targets",
                        format!(
                            "`{pattern}` matches no linear layer the build made (its linear layers: {})",
                            if names.is_empty() { "none".to_string() } else { names.join(", ") }
                        ),
                    ));
                }
            }
            inner.pending.clone()
        };
        if let Some((path, info)) = pending {
            self.load_peft_weights(&path, &info)?;
        }
        Ok(model)
    }

    /// The paths of the adapted layers, in the order the build made them (empty if a thread
    /// panicked holding the adapters' lock).
    pub fn adapted_layers(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|inner| inner.adapters.iter().map(|(p, _)| p.clone()).collect())
            .unwrap_or_default()
    }

    /// The adapters, `{path}.lora_A.weight` and `{path}.lora_B.weight` per adapted layer in
    /// order, sharing their variables (what the updater trains).
    ///
    /// # Errors
    /// A poisoned lock.
    pub fn parameters(&self) -> Result<Parameters> {
        let inner = self.state.lock()?;
        Parameters::from_handles(inner.adapters.iter().flat_map(|(_, a)| [a.a().clone(), a.b().clone()]))
    }

    /// The adapters' variables in [`Lora::parameters`]' order (for `candle_nn::AdamW::new`);
    /// empty if a thread panicked holding the adapters' lock.
    pub fn vars(&self) -> Vec<Var> {
        self.parameters()
            .map(|params| params.iter().filter_map(|p| p.var().ok().cloned()).collect())
            .unwrap_or_default()
    }

    /// `Some(seed)`: the adapters' dropout (when the config's is above 0) draws its masks, in
    /// forward order, from a generator seeded by `seed` (set a fresh seed before each training
    /// forward); `None`: no dropout (evaluation, the default).
    ///
    /// # Errors
    /// A poisoned lock.
    pub fn set_dropout_seed(&self, seed: Option<u64>) -> Result<()> {
        let mut draws = self
            .state
            .shared
            .draws
            .lock()
            .map_err(|_| Error::Poisoned { what: "the LoRA dropout generator" })?;
        *draws = seed.map(Rng::seeded);
        Ok(())
    }

    /// Writes PEFT's `adapter_config.json` and `adapter_model.safetensors` into `dir` (tensors
    /// named `base_model.model.{module_prefix}{path}.lora_A.weight`, ...).
    ///
    /// # Errors
    /// On I/O or serialization failure.
    pub fn save_peft(&self, dir: &Path, info: &PeftInfo) -> Result<()> {
        peft::write_files(dir, &self.state.config, false, &self.parameters()?, info)
    }

    /// Loads the adapters' values from a PEFT weights file (after the build): each must be
    /// present with its shape, and the file must hold no other tensor; nothing changes unless
    /// everything matches.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::MalformedState`] naming a tensor no adapter has;
    /// [`Error::StateMismatch`] naming a missing or misshapen one.
    pub fn load_peft_weights(&self, path: &Path, info: &PeftInfo) -> Result<()> {
        peft::load_values(path, &self.parameters()?, info)
    }

    /// Writes `W + s B A` into each adapted layer's `{path}.weight` in `base` (computed in F32,
    /// F64 for F64 weights, stored in the weight's dtype). The model this `Lora` built reads
    /// `base`'s storage and would now add the update twice: build the merged model without
    /// LoRA (`VarBuilder::from_varmap(base, ..)`) and drop this one.
    ///
    /// # Errors
    /// A weight missing from `base`; a tensor error. Nothing is written unless every merged
    /// weight was computed.
    pub fn merge_into(self, base: &VarMap) -> Result<()> {
        let inner = self.state.lock()?;
        let data = base.data().lock().map_err(|_| Error::Poisoned { what: "the base VarMap" })?;
        let mut merged = Vec::with_capacity(inner.adapters.len());
        for (path, adapter) in &inner.adapters {
            let name = format!("{path}.weight");
            let var = data.get(&name).ok_or_else(|| {
                Error::config("lora merge", format!("the base VarMap holds no `{name}` (a different base?)"))
            })?;
            let w = var.as_tensor();
            let delta = adapter.delta_weight()?;
            merged.push((var.clone(), w.to_dtype(delta.dtype())?.add(&delta)?.to_dtype(w.dtype())?));
        }
        for (var, value) in merged {
            var.set(&value)?;
        }
        Ok(())
    }
}

/// The adapter of the linear layer at `path` with `weight` `[out, in]`, when a [`Lora::build`]
/// runs on this thread and targets it (created on first use; a second layer at the path
/// shares it); `None` otherwise.
pub(super) fn adapter_for(path: &str, weight: &Tensor) -> candle::Result<Option<Arc<LoraAdapter>>> {
    let Some(state) = BUILDING.with(|b| b.borrow().clone()) else { return Ok(None) };
    let mut inner = state.lock()?;
    inner.linears.push(path.to_string());
    if !state.config.targets_layer(path) {
        return Ok(None);
    }
    if weight.is_variable() {
        candle::bail!(
            "`{path}` is a LoRA target, but its weight is a trainable variable: build it through the VarBuilder Lora::build passes (its base is frozen)"
        );
    }
    if let Some((_, adapter)) = inner.adapters.iter().find(|(p, _)| p == path) {
        return Ok(Some(Arc::clone(adapter)));
    }
    let (out_features, in_features) = weight.dims2()?;
    let adapter = new_adapter(
        path,
        (in_features, out_features),
        (weight.dtype(), weight.device()),
        &state.config,
        state.dropout,
        &mut inner.rng,
        &state.shared,
    )
    .map_err(candle::Error::wrap)?;
    inner.adapters.push((path.to_string(), Arc::clone(&adapter)));
    Ok(Some(adapter))
}
