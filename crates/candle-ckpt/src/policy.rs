//! Recompute policies: which segments keep their graph and which are recomputed. A policy
//! only returns decisions; the engine acts on them, so policies are tested without running a
//! model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::engine::Decision;

/// What a policy knows about one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment's name.
    pub name: String,
    /// Whether it is a repeated block (policies recompute only blocks; the embedding and the
    /// loss segment are always kept).
    pub is_block: bool,
    /// Bytes its kept graph holds for the current batch shape, when known (measured or
    /// estimated).
    pub activation_bytes: Option<usize>,
    /// Bytes its input holds (what a recomputed segment keeps instead), when known.
    pub input_bytes: Option<usize>,
}

/// Decides, per segment, keep or recompute.
pub trait RecomputePolicy: fmt::Debug + Send + Sync {
    /// One decision per segment.
    ///
    /// # Errors
    /// When the policy needs information `segments` lacks (sizes, for a byte budget).
    fn decide(&self, segments: &[SegmentInfo]) -> candle::Result<Vec<Decision>>;

    /// Whether [`RecomputePolicy::decide`] needs `activation_bytes`. By default, no.
    fn needs_sizes(&self) -> bool {
        false
    }
}

/// The built-in policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Recompute {
    /// Keep every graph (no recomputation): the most memory, no extra compute.
    Never,
    /// Recompute every block: one block's graph alive at a time during backward, one extra
    /// forward of every block.
    All,
    /// Recompute every k-th block (blocks k-1, 2k-1, ...); `EveryK(1)` is `All`.
    EveryK(usize),
    /// Keep about `sqrt(n)` evenly spaced blocks of `n`, recompute the others: activation
    /// memory O(sqrt(n)) blocks as in Chen et al. (2016).
    Sqrt,
    /// Recompute the fewest blocks (largest first) so that the graphs kept in forward fit in
    /// this many bytes. Needs per-segment sizes.
    Budget(usize),
}

impl Default for Recompute {
    /// By default, no recomputation.
    fn default() -> Self {
        Recompute::Never
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recompute::Never => write!(f, "never"),
            Recompute::All => write!(f, "all"),
            Recompute::EveryK(k) => write!(f, "every:{k}"),
            Recompute::Sqrt => write!(f, "sqrt"),
            Recompute::Budget(bytes) => write!(f, "budget:{bytes}"),
        }
    }
}

/// Why a recompute policy string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseRecomputeError(String);

impl fmt::Display for ParseRecomputeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown recompute policy `{}`: expected never, all, every:K (K >= 1), sqrt or budget:BYTES",
            self.0
        )
    }
}

impl std::error::Error for ParseRecomputeError {}

impl FromStr for Recompute {
    type Err = ParseRecomputeError;

    /// Parses `never`, `all`, `every:K`, `sqrt` or `budget:BYTES` (BYTES may end in K, M or
    /// G for KiB, MiB, GiB).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRecomputeError(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "never" | "none" => return Ok(Recompute::Never),
            "all" | "every" => return Ok(Recompute::All),
            "sqrt" => return Ok(Recompute::Sqrt),
            _ => {}
        }
        if let Some(k) = lower.strip_prefix("every:") {
            return match k.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Recompute::EveryK(k)),
                _ => Err(err()),
            };
        }
        if let Some(bytes) = lower.strip_prefix("budget:") {
            return parse_bytes(bytes).map(Recompute::Budget).ok_or_else(err);
        }
        Err(err())
    }
}

/// Parses a byte count: digits, optionally followed by `K`, `M` or `G` (KiB, MiB, GiB; also
/// `KB`/`KiB`..., any case). `None` when malformed or too large.
pub fn parse_bytes(s: &str) -> Option<usize> {
    let lower = s.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => lower.split_at(i),
        None => (lower.as_str(), ""),
    };
    let multiplier: usize = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(multiplier)
}

impl RecomputePolicy for Recompute {
    fn decide(&self, segments: &[SegmentInfo]) -> candle::Result<Vec<Decision>> {
        let blocks: Vec<usize> =
            segments.iter().enumerate().filter(|(_, s)| s.is_block).map(|(i, _)| i).collect();
        let mut decisions = vec![Decision::Keep; segments.len()];
        let mut recompute = |i: usize| decisions[i] = Decision::Recompute;
        match *self {
            Recompute::Never => {}
            Recompute::All => blocks.iter().for_each(|&i| recompute(i)),
            Recompute::EveryK(k) => {
                if k == 0 {
                    candle::bail!("recompute every:0 is not a policy: K must be at least 1");
                }
                blocks.iter().enumerate().filter(|(j, _)| (j + 1) % k == 0).for_each(|(_, &i)| recompute(i));
            }
            Recompute::Sqrt => {
                let n = blocks.len();
                let kept = (n as f64).sqrt().ceil() as usize;
                // Kept blocks at evenly spaced positions j * n / kept.
                let keep: Vec<usize> = (0..kept).map(|j| j * n / kept.max(1)).collect();
                blocks.iter().enumerate().filter(|(j, _)| !keep.contains(j)).for_each(|(_, &i)| recompute(i));
            }
            Recompute::Budget(budget) => {
                let mut sizes = Vec::with_capacity(segments.len());
                for s in segments {
                    let Some(bytes) = s.activation_bytes else {
                        candle::bail!(
                            "the byte-budget recompute policy needs the activation size of segment `{}`, which is unknown",
                            s.name
                        );
                    };
                    sizes.push(bytes);
                }
                let mut kept: usize = sizes.iter().sum();
                // Largest savings first: the fewest recomputed blocks that fit.
                let mut order = blocks.clone();
                let saving = |i: usize| sizes[i].saturating_sub(segments[i].input_bytes.unwrap_or(0));
                order.sort_by_key(|&i| std::cmp::Reverse(saving(i)));
                for i in order {
                    if kept <= budget {
                        break;
                    }
                    kept -= saving(i);
                    recompute(i);
                }
            }
        }
        Ok(decisions)
    }

    fn needs_sizes(&self) -> bool {
        matches!(self, Recompute::Budget(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Keep as K, Recompute as R};

    fn model(blocks: usize, sizes: Option<&[usize]>) -> Vec<SegmentInfo> {
        (0..blocks + 2)
            .map(|i| SegmentInfo {
                name: format!("s{i}"),
                is_block: i > 0 && i <= blocks,
                activation_bytes: sizes.map(|s| s[i]),
                input_bytes: sizes.map(|_| 1),
            })
            .collect()
    }

    fn decide(policy: &str, segments: &[SegmentInfo]) -> candle::Result<Vec<Decision>> {
        let policy: Recompute =
            policy.parse().map_err(|e: ParseRecomputeError| candle::Error::Msg(e.to_string()))?;
        policy.decide(segments)
    }

    #[test]
    fn simple_policies_recompute_the_blocks_they_name() -> candle::Result<()> {
        let m = model(6, None);
        assert_eq!(decide("never", &m)?, [K, K, K, K, K, K, K, K]);
        assert_eq!(decide("all", &m)?, [K, R, R, R, R, R, R, K]);
        assert_eq!(decide("every:2", &m)?, [K, K, R, K, R, K, R, K]);
        assert_eq!(decide("every:3", &m)?, [K, K, K, R, K, K, R, K]);
        assert_eq!(decide("every:1", &m)?, decide("all", &m)?);
        // sqrt(6) -> 3 kept blocks at 0, 2, 4.
        assert_eq!(decide("sqrt", &m)?, [K, K, R, K, R, K, R, K]);
        let m = model(16, None);
        let kept = decide("sqrt", &m)?.iter().filter(|d| **d == K).count();
        assert_eq!(kept, 4 + 2, "sqrt(16) blocks plus embedding and head");
        Ok(())
    }

    #[test]
    fn budget_recomputes_the_fewest_largest_blocks_that_fit() -> candle::Result<()> {
        let sizes = [5, 10, 40, 20, 30, 5];
        let m = model(4, Some(&sizes));
        assert_eq!(decide("budget:1000", &m)?, [K, K, K, K, K, K]);
        // Total 110; recompute 40 (saves 39) -> 71; then 30 (saves 29) -> 42 <= 50.
        assert_eq!(decide("budget:50", &m)?, [K, K, R, K, R, K]);
        assert_eq!(decide("budget:0", &m)?, [K, R, R, R, R, K]);
        let err = decide("budget:50", &model(4, None)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("needs the activation size of segment `s0`"), "{err}");
        Ok(())
    }

    #[test]
    fn policy_strings_parse_and_print_back() {
        for s in ["never", "all", "every:4", "sqrt", "budget:1024"] {
            let p: Result<Recompute, _> = s.parse();
            assert_eq!(p.map(|p| p.to_string()).ok().as_deref(), Some(s));
        }
        assert_eq!("budget:2M".parse::<Recompute>().ok(), Some(Recompute::Budget(2 << 20)));
        for bad in ["every:0", "every:x", "budget:", "budget:12Q", "sometimes"] {
            let err = bad.parse::<Recompute>().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with(&format!("unknown recompute policy `{bad}`")), "{err}");
        }
    }
}
