//! Property tests of configuration validation: any combination of settings either builds a
//! config that satisfies every invariant the Trainer relies on, or is refused with an
//! `InvalidConfig` naming a field; exactly the invalid combinations are refused; nothing panics.

use candle_fit::train::{Error, TrainerConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Settings {
    micro_batch: usize,
    accumulation_steps: usize,
    steps: usize,
    seq_len: usize,
    lr: f64,
    warmup_steps: usize,
    max_grad_norm: Option<f64>,
    eval_windows: usize,
    max_consecutive_skips: usize,
    checkpoint: Option<(usize, usize)>,
    max_memory: Option<usize>,
    find_micro_batch: bool,
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), 1usize..64, Just(usize::MAX / 2), Just(usize::MAX)]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        1e-6f64..10.0,
    ]
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        (size(), size(), size(), size(), number(), 0usize..500),
        (
            prop::option::of(number()),
            size(),
            size(),
            prop::option::of((size(), size())),
            prop::option::of(prop_oneof![Just(0usize), 1usize..1 << 40]),
            any::<bool>(),
        ),
    )
        .prop_map(|((micro_batch, accumulation_steps, steps, seq_len, lr, warmup_steps), rest)| {
            let (
                max_grad_norm,
                eval_windows,
                max_consecutive_skips,
                checkpoint,
                max_memory,
                find_micro_batch,
            ) = rest;
            Settings {
                micro_batch,
                accumulation_steps,
                steps,
                seq_len,
                lr,
                warmup_steps,
                max_grad_norm,
                eval_windows,
                max_consecutive_skips,
                checkpoint,
                max_memory,
                find_micro_batch,
            }
        })
}

/// Validity, written independently of the builder.
fn valid(s: &Settings) -> bool {
    let positive =
        [s.micro_batch, s.accumulation_steps, s.steps, s.seq_len, s.eval_windows, s.max_consecutive_skips]
            .iter()
            .all(|&n| n >= 1);
    positive
        && s.micro_batch.checked_mul(s.accumulation_steps).is_some()
        && s.lr.is_finite()
        && s.lr >= 0.0
        && s.max_grad_norm.is_none_or(|m| m.is_finite() && m > 0.0)
        && s.checkpoint.is_none_or(|(every, keep)| every >= 1 && keep >= 1)
        && s.max_memory != Some(0)
        && (!s.find_micro_batch || s.max_memory.is_some())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn exactly_the_invalid_settings_are_refused(s in settings()) {
        let mut builder = TrainerConfig::builder()
            .micro_batch(s.micro_batch)
            .accumulation_steps(s.accumulation_steps)
            .steps(s.steps)
            .seq_len(s.seq_len)
            .lr(s.lr)
            .warmup_steps(s.warmup_steps)
            .max_grad_norm(s.max_grad_norm)
            .eval_windows(s.eval_windows)
            .max_consecutive_skips(s.max_consecutive_skips)
            .max_memory(s.max_memory)
            .find_micro_batch(s.find_micro_batch);
        if let Some((every, keep)) = s.checkpoint {
            builder = builder.checkpoint("runs/x", every, keep);
        }
        match builder.build() {
            Ok(c) => {
                prop_assert!(valid(&s), "accepted invalid settings {s:?}");
                prop_assert_eq!(c.global_batch(), s.micro_batch * s.accumulation_steps);
                prop_assert!(c.schedule.validate().is_ok());
                prop_assert!(c.schedule.lr(0).is_finite());
                prop_assert!(c.find_micro_batch <= c.max_memory.is_some());
                if let Some(ck) = &c.checkpoint {
                    prop_assert!(ck.every >= 1 && ck.keep >= 1);
                }
            }
            Err(Error::InvalidConfig { field, reason }) => {
                prop_assert!(!valid(&s), "refused valid settings {s:?}: `{field}` {reason}");
                prop_assert!(!field.is_empty() && !reason.is_empty());
            }
            Err(other) => prop_assert!(false, "not an InvalidConfig: {other}"),
        }
    }
}
