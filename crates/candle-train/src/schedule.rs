//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A learning rate as a function of the optimizer step (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The same rate at every step.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// Linear warm-up from `peak_lr / warmup_steps` to `peak_lr` over `warmup_steps`, then a
    /// cosine decay to `min_lr` at `total_steps` (held there after).
    WarmupCosine {
        /// The rate reached after warm-up.
        peak_lr: f64,
        /// The rate at the end.
        min_lr: f64,
        /// Steps of linear warm-up.
        warmup_steps: u64,
        /// Steps of the whole run.
        total_steps: u64,
    },
}

impl LrSchedule {
    /// Checks that rates are finite and non-negative and the steps make sense.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(field, format!("{v} is not a finite non-negative rate")))
            }
        };
        match *self {
            LrSchedule::Constant { lr } => check("lr", lr),
            LrSchedule::WarmupCosine { peak_lr, min_lr, warmup_steps, total_steps } => {
                check("lr", peak_lr)?;
                check("min_lr", min_lr)?;
                if min_lr > peak_lr {
                    return Err(Error::config("min_lr", format!("{min_lr} exceeds the peak rate {peak_lr}")));
                }
                if warmup_steps > total_steps {
                    return Err(Error::config(
                        "warmup_steps",
                        format!("{warmup_steps} exceeds the {total_steps} steps of the run"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The rate at optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupCosine { peak_lr, min_lr, warmup_steps, total_steps } => {
                if step < warmup_steps {
                    return peak_lr * (step + 1) as f64 / warmup_steps as f64;
                }
                let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
                let progress = ((step - warmup_steps) as f64 / decay_steps as f64).min(1.0);
                min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_hits_its_endpoints() {
        let s = LrSchedule::WarmupCosine { peak_lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 110 };
        assert!((s.lr(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr(9) - 1e-3).abs() < 1e-15);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr(110) - 1e-4).abs() < 1e-15);
        assert!((s.lr(500) - 1e-4).abs() < 1e-15);
        assert!((1..110).all(|t| s.lr(t) <= s.lr(t - 1) || t < 10));
    }

    #[test]
    fn bad_schedules_are_rejected() {
        let bad = LrSchedule::WarmupCosine { peak_lr: 1e-3, min_lr: 1e-2, warmup_steps: 0, total_steps: 10 };
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig { field: "min_lr", .. })));
        assert!(LrSchedule::Constant { lr: f64::NAN }.validate().is_err());
    }
}
