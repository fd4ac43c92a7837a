//! Dynamic loss scaling for FP16 training, with the semantics of PyTorch's `torch.amp.GradScaler`.
//!
//! The rules are those of PyTorch's `_amp_update_scale_` kernel: an overflow multiplies the
//! scale by `backoff_factor` and restarts the count of clean steps; `growth_interval` clean
//! steps in a row multiply it by `growth_factor`, unless that would make it infinite. Like
//! PyTorch, the scale is stored as a float32 value (kept here in an `f64` that is always exactly
//! representable as `f32`), and gradients are unscaled by the float32 rounding of the `f64`
//! reciprocal of the scale.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Hyper-parameters of a [`LossScaler`]. The defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerConfig {
    /// The scale at the first step, rounded to float32 as PyTorch stores it. By default, 65536
    /// (2^16).
    pub init_scale: f64,
    /// Multiplier applied after `growth_interval` steps in a row without overflow; must be
    /// finite and `> 1`. By default, 2.
    pub growth_factor: f64,
    /// Multiplier applied after an overflow; must lie in `(0, 1)`. By default, 0.5.
    pub backoff_factor: f64,
    /// Steps in a row without overflow before the scale grows; must be `> 0`. By default, 2000.
    pub growth_interval: u64,
    /// The smallest scale accepted: an overflow that would take the scale below it is an error
    /// rather than a silent skip (DeepSpeed's safety net; PyTorch has none). Must be finite,
    /// `> 0` and at most the initial scale. By default, 1.
    pub min_scale: f64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0,
        }
    }
}

impl LossScalerConfig {
    /// Checks every field's range (see each field's doc).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field: `init_scale` not finite and `> 0` (also after
    /// rounding to float32), `growth_factor` not finite and `> 1`, `backoff_factor` not in
    /// `(0, 1)`, `growth_interval` zero, `min_scale` not finite and `> 0` or above the initial
    /// scale.
    pub fn validate(&self) -> Result<()> {
        let init = self.init_scale;
        if !(init.is_finite() && init > 0.0) {
            return Err(Error::config("init_scale", format!("{init} is not a finite positive number")));
        }
        let stored = f32_scale(init);
        if !(stored.is_finite() && stored > 0.0) {
            return Err(Error::config(
                "init_scale",
                format!("{init} is not a finite positive number once rounded to float32 ({stored})"),
            ));
        }
        let growth = self.growth_factor;
        if !(growth.is_finite() && growth > 1.0) {
            return Err(Error::config("growth_factor", format!("{growth} is not a finite number above 1")));
        }
        let backoff = self.backoff_factor;
        if !(backoff > 0.0 && backoff < 1.0) {
            return Err(Error::config(
                "backoff_factor",
                format!("{backoff} is not strictly between 0 and 1"),
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::config("growth_interval", "must be at least 1 step"));
        }
        let min = self.min_scale;
        if !(min.is_finite() && min > 0.0) {
            return Err(Error::config("min_scale", format!("{min} is not a finite positive number")));
        }
        if min > stored {
            return Err(Error::config(
                "min_scale",
                format!("{min} exceeds the initial scale {stored} (init_scale rounded to float32)"),
            ));
        }
        Ok(())
    }
}

/// What the caller does with the optimizer step whose gradients were just checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDecision {
    /// The gradients were finite: step the optimizer and the learning-rate schedule.
    Step,
    /// The gradients held inf or NaN: leave the parameters, optimizer state and schedule as
    /// they are.
    Skip,
}

/// The saved state of a [`LossScaler`] (PyTorch's `GradScaler.state_dict()`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// The current scale (a float32 value).
    pub scale: f64,
    /// Steps in a row without overflow since the scale last changed.
    pub growth_tracker: u64,
    /// The hyper-parameters.
    pub config: LossScalerConfig,
}

/// A dynamic loss scaler: PyTorch's `torch.amp.GradScaler`, with a floor on the scale.
///
/// One optimizer step goes:
///
/// 1. multiply the loss by [`scale`](Self::scale) (for a Candle tensor, `loss.affine(scale, 0.0)`)
///    and run backward;
/// 2. [`unscale`](Self::unscale) the FP32 gradients, once, which also reports `found_inf`
///    (or unscale them yourself with [`inv_scale_f32`](Self::inv_scale_f32) and
///    [`unscale_slice`]);
/// 3. clip the gradients, if clipping, now that they are unscaled;
/// 4. with several data-parallel ranks, OR the `found_inf` flags of all ranks, so that every
///    rank takes the same decision;
/// 5. if `found_inf`, skip the optimizer and the learning-rate schedule, else step both;
/// 6. [`update`](Self::update) with the (reduced) `found_inf`, which returns the decision that
///    step 5 took.
///
/// The caller that does not scale keeps an `Option<LossScaler>` set to `None`.
///
/// ```
/// use candle_train::{LossScaler, LossScalerConfig, ScaleDecision};
/// # fn main() -> candle_train::Result<()> {
/// let config = LossScalerConfig { init_scale: 1024.0, growth_interval: 2, ..LossScalerConfig::default() };
/// let mut scaler = LossScaler::new(config)?;
/// let mut weights = vec![1.0f32, -2.0];
/// for step in 0..3 {
///     // Backward of the scaled loss `scale * sum(w^2) / 2`; step 1 overflows.
///     let scale = scaler.scale() as f32;
///     let mut grads: Vec<f32> = weights.iter().map(|w| w * scale).collect();
///     if step == 1 {
///         grads[0] = f32::INFINITY;
///     }
///     let found_inf = scaler.unscale(&mut [grads.as_mut_slice()])?;
///     // With several ranks: found_inf = OR of found_inf over the ranks.
///     if !found_inf {
///         weights.iter_mut().zip(&grads).for_each(|(w, g)| *w -= 0.5 * g);
///     }
///     let decision = scaler.update(found_inf)?;
///     assert_eq!(decision == ScaleDecision::Skip, found_inf);
/// }
/// assert_eq!(weights, [0.25, -0.5]);
/// assert_eq!(scaler.scale(), 512.0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LossScaler {
    config: LossScalerConfig,
    /// Always a float32 value, `>= config.min_scale`.
    scale: f64,
    /// Always `< config.growth_interval`.
    growth_tracker: u64,
    unscaled_this_step: bool,
}

impl LossScaler {
    /// A scaler at `config.init_scale` (rounded to float32).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the config is invalid (see [`LossScalerConfig::validate`]).
    pub fn new(config: LossScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, scale: f32_scale(config.init_scale), growth_tracker: 0, unscaled_this_step: false })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LossScalerConfig {
        &self.config
    }

    /// The multiplier for the loss (a float32 value).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps in a row without overflow since the scale last changed.
    pub fn growth_tracker(&self) -> u64 {
        self.growth_tracker
    }

    /// The multiplier that unscales gradients: the `f64` reciprocal of the scale rounded to
    /// `f32`, as PyTorch computes it (`scale.double().reciprocal().float()`).
    pub fn inv_scale_f32(&self) -> f32 {
        (1.0f64 / self.scale) as f32
    }

    /// Multiplies every element of `grads` by [`inv_scale_f32`](Self::inv_scale_f32) and returns
    /// `found_inf`: whether any element was inf or NaN before or after the multiplication. Every
    /// element is multiplied even when one is not finite, as PyTorch does.
    ///
    /// PyTorch only looks at the elements before the multiplication; looking after as well
    /// changes nothing while the scale is `>= 1`, and below 1 also catches a gradient that the
    /// unscaling itself overflows.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for the field `loss_scale` when called a second time before
    /// [`update`](Self::update) (the gradients would be divided by the scale twice); the
    /// gradients are then left untouched.
    pub fn unscale(&mut self, grads: &mut [&mut [f32]]) -> Result<bool> {
        self.mark_unscaled()?;
        let inv_scale = self.inv_scale_f32();
        let mut found_inf = false;
        for slice in grads.iter_mut() {
            found_inf |= unscale_slice(slice, inv_scale);
        }
        Ok(found_inf)
    }

    /// Records that this step's gradients were unscaled.
    fn mark_unscaled(&mut self) -> Result<()> {
        if self.unscaled_this_step {
            return Err(Error::config("loss_scale", "unscale called twice in one step without update"));
        }
        self.unscaled_this_step = true;
        Ok(())
    }

    /// Ends the step: PyTorch's `_amp_update_scale_`. With `found_inf` (OR-ed over the ranks),
    /// the scale is multiplied by `backoff_factor`, the tracker reset and the decision is
    /// [`ScaleDecision::Skip`]. Otherwise the tracker counts one more clean step and, on reaching
    /// `growth_interval`, is reset and the scale multiplied by `growth_factor` (left as it is if
    /// the product is infinite in float32); the decision is [`ScaleDecision::Step`]. New scales
    /// are rounded to float32. Allows [`unscale`](Self::unscale) again.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for the field `min_scale` when an overflow would take the scale
    /// below `min_scale`: the gradients overflow at every scale the run allows. The scale and
    /// the tracker are then left as they were.
    pub fn update(&mut self, found_inf: bool) -> Result<ScaleDecision> {
        self.unscaled_this_step = false;
        if found_inf {
            let new_scale = f32_scale(self.scale * self.config.backoff_factor);
            if new_scale < self.config.min_scale {
                return Err(Error::config(
                    "min_scale",
                    format!(
                        "loss scale {new_scale} fell below the minimum {}: gradients overflow at every scale",
                        self.config.min_scale
                    ),
                ));
            }
            self.scale = new_scale;
            self.growth_tracker = 0;
            Ok(ScaleDecision::Skip)
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.config.growth_interval {
                let new_scale = f32_scale(self.scale * self.config.growth_factor);
                if new_scale.is_finite() {
                    self.scale = new_scale;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
            Ok(ScaleDecision::Step)
        }
    }

    /// The state to save with a checkpoint.
    pub fn state(&self) -> LossScalerState {
        LossScalerState { scale: self.scale, growth_tracker: self.growth_tracker, config: self.config }
    }

    /// Restores saved state, config included (as PyTorch's `load_state_dict` does), and starts a
    /// fresh step (unscaling allowed).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the saved config is invalid, the saved scale is not a
    /// finite positive float32 value at least `min_scale`, or the saved tracker is not below
    /// `growth_interval`; the scaler is then left as it was.
    pub fn load_state(&mut self, state: &LossScalerState) -> Result<()> {
        state.config.validate()?;
        let scale = state.scale;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::config(
                "scale",
                format!("saved loss scale {scale} is not a finite positive number"),
            ));
        }
        if f32_scale(scale) != scale {
            return Err(Error::config("scale", format!("saved loss scale {scale} is not a float32 value")));
        }
        if scale < state.config.min_scale {
            return Err(Error::config(
                "scale",
                format!("saved loss scale {scale} is below the minimum {}", state.config.min_scale),
            ));
        }
        if state.growth_tracker >= state.config.growth_interval {
            return Err(Error::config(
                "growth_tracker",
                format!(
                    "saved tracker {} is not below the growth interval {}",
                    state.growth_tracker, state.config.growth_interval
                ),
            ));
        }
        self.config = state.config;
        self.scale = scale;
        self.growth_tracker = state.growth_tracker;
        self.unscaled_this_step = false;
        Ok(())
    }
}

/// Multiplies every element of `slice` by `inv_scale` and returns whether any element was inf or
/// NaN before or after the multiplication.
pub fn unscale_slice(slice: &mut [f32], inv_scale: f32) -> bool {
    let mut found_inf = false;
    for value in slice.iter_mut() {
        let unscaled = *value * inv_scale;
        found_inf |= !value.is_finite() | !unscaled.is_finite();
        *value = unscaled;
    }
    found_inf
}

/// `value` rounded to float32, as PyTorch stores the scale.
fn f32_scale(value: f64) -> f64 {
    value as f32 as f64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The rules of PyTorch's `_amp_update_scale_cpu_kernel`, transcribed line by line on a
    /// float32 scale, plus the `min_scale` floor (`None` when the floor is hit, state unchanged).
    fn reference_update(
        config: &LossScalerConfig,
        scale: &mut f32,
        tracker: &mut u64,
        found_inf: bool,
    ) -> Option<ScaleDecision> {
        if found_inf {
            let new_scale = (f64::from(*scale) * config.backoff_factor) as f32;
            if f64::from(new_scale) < config.min_scale {
                return None;
            }
            *scale = new_scale;
            *tracker = 0;
            Some(ScaleDecision::Skip)
        } else {
            let successful = *tracker + 1;
            if successful == config.growth_interval {
                let new_scale = (f64::from(*scale) * config.growth_factor) as f32;
                if new_scale.is_finite() {
                    *scale = new_scale;
                }
                *tracker = 0;
            } else {
                *tracker = successful;
            }
            Some(ScaleDecision::Step)
        }
    }

    fn is_invalid(result: Result<impl Sized>, name: &str) -> bool {
        matches!(result, Err(Error::InvalidConfig { field, .. }) if field == name)
    }

    #[test]
    fn defaults_are_pytorchs() -> Result<()> {
        let config = LossScalerConfig::default();
        assert_eq!(config.init_scale, 65536.0);
        assert_eq!(config.growth_factor, 2.0);
        assert_eq!(config.backoff_factor, 0.5);
        assert_eq!(config.growth_interval, 2000);
        assert_eq!(config.min_scale, 1.0);
        let scaler = LossScaler::new(config)?;
        assert_eq!(scaler.scale(), 65536.0);
        assert_eq!(scaler.growth_tracker(), 0);
        assert_eq!(scaler.inv_scale_f32(), 1.0 / 65536.0);
        Ok(())
    }

    #[test]
    fn invalid_configs_name_their_field() {
        let ok = LossScalerConfig::default();
        let cases = [
            ("init_scale", LossScalerConfig { init_scale: 0.0, ..ok }),
            ("init_scale", LossScalerConfig { init_scale: f64::INFINITY, ..ok }),
            ("init_scale", LossScalerConfig { init_scale: f64::NAN, ..ok }),
            ("init_scale", LossScalerConfig { init_scale: 1e39, ..ok }),
            ("init_scale", LossScalerConfig { init_scale: 1e-50, min_scale: 1e-60, ..ok }),
            ("growth_factor", LossScalerConfig { growth_factor: 1.0, ..ok }),
            ("growth_factor", LossScalerConfig { growth_factor: f64::NAN, ..ok }),
            ("growth_factor", LossScalerConfig { growth_factor: f64::INFINITY, ..ok }),
            ("backoff_factor", LossScalerConfig { backoff_factor: 0.0, ..ok }),
            ("backoff_factor", LossScalerConfig { backoff_factor: 1.0, ..ok }),
            ("backoff_factor", LossScalerConfig { backoff_factor: f64::NAN, ..ok }),
            ("growth_interval", LossScalerConfig { growth_interval: 0, ..ok }),
            ("min_scale", LossScalerConfig { min_scale: 0.0, ..ok }),
            ("min_scale", LossScalerConfig { min_scale: f64::NAN, ..ok }),
            ("min_scale", LossScalerConfig { min_scale: 65537.0, ..ok }),
        ];
        for (field, config) in cases {
            assert!(
                is_invalid(LossScaler::new(config), field),
                "{config:?} should be rejected for `{field}`"
            );
        }
        assert!(LossScaler::new(LossScalerConfig { min_scale: 65536.0, ..ok }).is_ok());
    }

    /// One step of the script: the true (unscaled) gradient, scaled in f32 as backward would.
    #[derive(Debug, Clone, Copy)]
    enum Grad {
        Finite,
        Inf,
        Nan,
        /// Finite, but overflows f32 once multiplied by the scale.
        OverflowsWhenScaled,
    }

    #[test]
    fn scripted_steps_follow_the_rules() -> Result<()> {
        use Grad::*;
        use ScaleDecision::*;
        let config = LossScalerConfig {
            init_scale: 8.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 3,
            min_scale: 0.25,
        };
        // (gradient, expected decision, scale after, tracker after)
        let script = [
            (Finite, Step, 8.0, 1),
            (Finite, Step, 8.0, 2),
            (Finite, Step, 16.0, 0),
            (Inf, Skip, 8.0, 0),
            (Nan, Skip, 4.0, 0),
            (Finite, Step, 4.0, 1),
            (Finite, Step, 4.0, 2),
            (OverflowsWhenScaled, Skip, 2.0, 0),
            (Finite, Step, 2.0, 1),
            (Finite, Step, 2.0, 2),
            (Finite, Step, 4.0, 0),
            (Finite, Step, 4.0, 1),
            (Inf, Skip, 2.0, 0),
            (Nan, Skip, 1.0, 0),
            (Finite, Step, 1.0, 1),
        ];
        let mut scaler = LossScaler::new(config)?;
        let (mut ref_scale, mut ref_tracker) = (8.0f32, 0u64);
        for (i, &(grad, decision, scale, tracker)) in script.iter().enumerate() {
            let true_grads = [0.5f32, -3.0, 1.25, 7.0];
            let s = scaler.scale() as f32;
            let mut grads: Vec<f32> = true_grads.iter().map(|g| g * s).collect();
            match grad {
                Finite => {}
                Inf => grads[1] = f32::NEG_INFINITY,
                Nan => grads[2] = f32::NAN,
                OverflowsWhenScaled => {
                    assert!(s >= 2.0, "step {i}: the scale must be large enough to overflow");
                    grads[3] = 3e38f32 * s;
                }
            }
            let found_inf = scaler.unscale(&mut [grads.as_mut_slice()])?;
            assert_eq!(found_inf, !matches!(grad, Finite), "step {i}");
            if !found_inf {
                // Power-of-two scales unscale exactly.
                assert_eq!(grads, true_grads, "step {i}");
            }
            let got = scaler.update(found_inf)?;
            let expected = reference_update(&config, &mut ref_scale, &mut ref_tracker, found_inf);
            assert_eq!(Some(got), expected, "step {i}: against the reference");
            assert_eq!(
                (scaler.scale(), scaler.growth_tracker()),
                (f64::from(ref_scale), ref_tracker),
                "step {i}"
            );
            assert_eq!(got, decision, "step {i}");
            assert_eq!((scaler.scale(), scaler.growth_tracker()), (scale, tracker), "step {i}");
        }
        Ok(())
    }

    #[test]
    fn growth_stops_at_the_float32_range() -> Result<()> {
        let config = LossScalerConfig { init_scale: 2e38, growth_interval: 1, ..LossScalerConfig::default() };
        let mut scaler = LossScaler::new(config)?;
        let before = scaler.scale();
        assert_eq!(before, f64::from(2e38f32));
        assert_eq!(scaler.update(false)?, ScaleDecision::Step);
        assert_eq!((scaler.scale(), scaler.growth_tracker()), (before, 0));
        Ok(())
    }

    #[test]
    fn unscale_multiplies_by_the_float32_of_the_f64_reciprocal() -> Result<()> {
        for init_scale in [3.0, 65536.0, 1000.0, 7.0e5, 1.1, 123_456.79] {
            let mut scaler = LossScaler::new(LossScalerConfig {
                init_scale,
                min_scale: 1.0,
                ..LossScalerConfig::default()
            })?;
            let inv = (1.0f64 / scaler.scale()) as f32;
            assert_eq!(scaler.inv_scale_f32().to_bits(), inv.to_bits());
            let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 1234.567 + 0.001 * i as f32).collect();
            let (mut a, mut b) = (values[..20].to_vec(), values[20..].to_vec());
            let found_inf = scaler.unscale(&mut [a.as_mut_slice(), b.as_mut_slice()])?;
            assert!(!found_inf);
            for (got, x) in a.iter().chain(&b).zip(&values) {
                assert_eq!(got.to_bits(), (x * inv).to_bits(), "{x} at scale {init_scale}");
            }
            scaler.update(found_inf)?;
        }
        Ok(())
    }

    #[test]
    fn unscale_finds_non_finite_values_anywhere() -> Result<()> {
        let mut scaler = LossScaler::new(LossScalerConfig::default())?;
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            for position in [0, 4, 9] {
                for slice_index in [0, 1, 2] {
                    let mut slices = [vec![1.0f32; 10], vec![2.0f32; 10], vec![3.0f32; 10]];
                    slices[slice_index][position] = bad;
                    let mut views: Vec<&mut [f32]> = slices.iter_mut().map(Vec::as_mut_slice).collect();
                    assert!(scaler.unscale(&mut views)?, "{bad} at {slice_index}/{position}");
                    scaler.update(true)?;
                    // Every other element is still unscaled.
                    assert_eq!(
                        slices[(slice_index + 1) % 3][position],
                        ((slice_index + 1) % 3 + 1) as f32 / 65536.0
                    );
                    scaler = LossScaler::new(LossScalerConfig::default())?;
                }
            }
        }
        assert!(!scaler.unscale(&mut [])?);
        let mut empty: [f32; 0] = [];
        assert!(!unscale_slice(&mut empty, 0.5));
        // A finite value that the unscaling overflows (scales below 1).
        let mut big = [3e38f32];
        assert!(unscale_slice(&mut big, 2.0));
        Ok(())
    }

    #[test]
    fn unscaling_twice_in_one_step_is_an_error() -> Result<()> {
        let mut scaler = LossScaler::new(LossScalerConfig::default())?;
        let mut grads = vec![65536.0f32; 4];
        assert!(!scaler.unscale(&mut [grads.as_mut_slice()])?);
        assert!(is_invalid(scaler.unscale(&mut [grads.as_mut_slice()]), "loss_scale"));
        assert_eq!(grads, [1.0; 4], "a refused unscale leaves the gradients alone");
        scaler.update(false)?;
        assert!(!scaler.unscale(&mut [grads.as_mut_slice()])?);
        scaler.update(false)?;
        // Update without unscale is allowed (found_inf computed elsewhere).
        scaler.update(true)?;
        Ok(())
    }

    #[test]
    fn overflow_at_the_minimum_scale_is_an_error() -> Result<()> {
        let config = LossScalerConfig { init_scale: 8.0, min_scale: 1.0, ..LossScalerConfig::default() };
        let mut scaler = LossScaler::new(config)?;
        for expected in [4.0, 2.0, 1.0] {
            let mut grads = [f32::INFINITY];
            assert!(scaler.unscale(&mut [grads.as_mut_slice()])?);
            assert_eq!(scaler.update(true)?, ScaleDecision::Skip);
            assert_eq!(scaler.scale(), expected);
        }
        let mut grads = [f32::NAN];
        assert!(scaler.unscale(&mut [grads.as_mut_slice()])?);
        let message = match scaler.update(true) {
            Err(e @ Error::InvalidConfig { field: "min_scale", .. }) => e.to_string(),
            other => format!("not a min_scale error: {other:?}"),
        };
        assert!(
            message.starts_with("invalid `min_scale`: loss scale 0.5 fell below the minimum 1"),
            "{message}"
        );
        assert_eq!((scaler.scale(), scaler.growth_tracker()), (1.0, 0), "state is left as it was");
        // The unscale flag is cleared even on error, and clean steps go on.
        let mut grads = [1.0f32];
        assert!(!scaler.unscale(&mut [grads.as_mut_slice()])?);
        assert_eq!(scaler.update(false)?, ScaleDecision::Step);
        Ok(())
    }

    #[test]
    fn state_round_trips_through_json() -> Result<()> {
        let config =
            LossScalerConfig { init_scale: 1024.0, growth_interval: 5, ..LossScalerConfig::default() };
        let mut scaler = LossScaler::new(config)?;
        for found_inf in [false, true, false, false] {
            scaler.update(found_inf)?;
        }
        let state = scaler.state();
        assert_eq!((state.scale, state.growth_tracker), (512.0, 2));
        let json = serde_json::to_string(&state).map_err(|e| Error::config("state", e.to_string()))?;
        let back: LossScalerState =
            serde_json::from_str(&json).map_err(|e| Error::config("state", e.to_string()))?;
        assert_eq!(back, state);

        let mut restored = LossScaler::new(LossScalerConfig::default())?;
        let mut grads = [1.0f32];
        restored.unscale(&mut [grads.as_mut_slice()])?;
        restored.load_state(&back)?;
        assert_eq!(restored.state(), state);
        for found_inf in [false, false, false, true, false] {
            restored.unscale(&mut [grads.as_mut_slice()])?;
            assert_eq!(restored.update(found_inf)?, scaler.update(found_inf)?);
            assert_eq!(restored.state(), scaler.state());
        }

        let bad = [
            ("scale", LossScalerState { scale: f64::NAN, ..state }),
            ("scale", LossScalerState { scale: 0.0, ..state }),
            ("scale", LossScalerState { scale: 0.5, ..state }),
            ("scale", LossScalerState { scale: 0.1, ..state }),
            ("growth_tracker", LossScalerState { growth_tracker: 5, ..state }),
            (
                "growth_interval",
                LossScalerState { config: LossScalerConfig { growth_interval: 0, ..config }, ..state },
            ),
        ];
        for (field, bad) in bad {
            let before = restored.state();
            assert!(is_invalid(restored.load_state(&bad), field), "{bad:?} should be rejected for `{field}`");
            assert_eq!(restored.state(), before);
        }
        Ok(())
    }

    fn configs() -> impl Strategy<Value = LossScalerConfig> {
        (
            prop_oneof![(-10i32..40).prop_map(|e| 2f64.powi(e)), 1e-3f64..3e38],
            prop_oneof![Just(2.0), 1.0001f64..16.0],
            prop_oneof![Just(0.5), 0.001f64..0.999],
            1u64..8,
            prop_oneof![Just(1.0), 1e-6f64..=1.0],
        )
            .prop_map(|(init_scale, growth_factor, backoff_factor, growth_interval, min_fraction)| {
                // At most the initial scale as stored: a fraction <= 1 of it.
                let min_scale = f64::from(init_scale as f32) * min_fraction;
                LossScalerConfig { init_scale, growth_factor, backoff_factor, growth_interval, min_scale }
            })
            .prop_filter("min_scale must be positive", |c| c.min_scale > 0.0 && c.min_scale.is_finite())
    }

    proptest! {
        #[test]
        fn scaler_matches_the_reference(
            config in configs(),
            overflows in proptest::collection::vec(proptest::bool::weighted(0.3), 0..200),
        ) {
            let mut scaler = LossScaler::new(config).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (mut ref_scale, mut ref_tracker) = (config.init_scale as f32, 0u64);
            for (i, &found_inf) in overflows.iter().enumerate() {
                let mut grads = [if found_inf { f32::NAN } else { 1.0 }];
                let found = scaler.unscale(&mut [grads.as_mut_slice()]).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(found, found_inf);
                let expected = reference_update(&config, &mut ref_scale, &mut ref_tracker, found_inf);
                match (scaler.update(found_inf), expected) {
                    (Ok(got), Some(expected)) => prop_assert_eq!(got, expected, "step {}", i),
                    (Err(Error::InvalidConfig { field: "min_scale", .. }), None) => {}
                    (got, expected) => prop_assert!(false, "step {}: got {:?}, expected {:?}", i, got, expected),
                }
                prop_assert_eq!(scaler.scale(), f64::from(ref_scale), "step {}", i);
                prop_assert_eq!(scaler.growth_tracker(), ref_tracker, "step {}", i);
                prop_assert!(scaler.scale() >= config.min_scale && scaler.scale().is_finite());
                prop_assert!(scaler.growth_tracker() < config.growth_interval);
            }
        }
    }
}
