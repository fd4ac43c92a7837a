//! Rank discovery from the variables launchers set: torchrun's (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID`, `SLURM_JOB_NODELIST`), so existing launchers and schedulers start runs.
//!
//! The parsing is a pure function of a variable lookup ([`RankInfo::from_lookup`]), so it is
//! tested without touching the process environment.

use crate::error::{Error, Result};

/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher's variables a [`RankInfo`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `RANK` / `WORLD_SIZE` / `LOCAL_RANK` (torchrun, and anything imitating it).
    Torchrun,
    /// `SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID`.
    Slurm,
}

/// Where this process sits in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, in `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this node (picks the GPU).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous.
    pub master_addr: String,
    /// Port of rank 0's rendezvous.
    pub master_port: u16,
    /// The launcher the variables came from.
    pub launcher: Launcher,
}

impl RankInfo {
    /// Reads the process environment; `Ok(None)` when no launcher variable is set (a plain
    /// single-process run).
    ///
    /// # Errors
    /// As [`RankInfo::from_lookup`].
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `lookup`. torchrun's `RANK` wins over Slurm's variables
    /// (torchrun inside a Slurm allocation sets both). `MASTER_PORT` defaults to 29500; with
    /// Slurm, `MASTER_ADDR` defaults to the first host of `SLURM_JOB_NODELIST` (or
    /// `SLURM_NODELIST`); one process alone defaults it to `127.0.0.1`.
    ///
    /// # Errors
    /// [`Error::MissingEnv`] when a variable the others imply is absent (`WORLD_SIZE` with
    /// `RANK`, ...), [`Error::InvalidEnv`] for a value that is not a number, a rank not below
    /// the world size, a world size of 0, or a port out of range.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let get = |name: &'static str| lookup(name).filter(|v| !v.trim().is_empty());
        let (launcher, rank_var, world_var, local_var) = if get("RANK").is_some() {
            (Launcher::Torchrun, "RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else if get("SLURM_PROCID").is_some() {
            let world_var = if get("SLURM_NTASKS").is_some() { "SLURM_NTASKS" } else { "SLURM_NPROCS" };
            (Launcher::Slurm, "SLURM_PROCID", world_var, "SLURM_LOCALID")
        } else {
            return Ok(None);
        };
        let number = |name: &'static str| -> Result<usize> {
            let value = get(name).ok_or(Error::MissingEnv { name, because: rank_var })?;
            value.trim().parse::<usize>().map_err(|_| Error::InvalidEnv {
                name,
                value,
                reason: "not a non-negative integer",
            })
        };
        let rank = number(rank_var)?;
        let world_size = number(world_var)?;
        let local_rank = number(local_var)?;
        let invalid = |name: &'static str, value: usize, reason| Error::InvalidEnv {
            name,
            value: value.to_string(),
            reason,
        };
        if world_size == 0 {
            return Err(invalid(world_var, world_size, "the world size must be at least 1"));
        }
        if rank >= world_size {
            return Err(invalid(rank_var, rank, "the rank must be below the world size"));
        }
        if local_rank >= world_size {
            return Err(invalid(local_var, local_rank, "the local rank must be below the world size"));
        }
        let master_addr = match (get("MASTER_ADDR"), launcher) {
            (Some(addr), _) => addr.trim().to_string(),
            (None, Launcher::Slurm) => {
                let list = get("SLURM_JOB_NODELIST")
                    .or_else(|| get("SLURM_NODELIST"))
                    .ok_or(Error::MissingEnv { name: "MASTER_ADDR", because: rank_var })?;
                first_host(&list).ok_or(Error::InvalidEnv {
                    name: "SLURM_JOB_NODELIST",
                    value: list.clone(),
                    reason: "not a Slurm host list",
                })?
            }
            (None, Launcher::Torchrun) if world_size == 1 => "127.0.0.1".to_string(),
            (None, Launcher::Torchrun) => {
                return Err(Error::MissingEnv { name: "MASTER_ADDR", because: rank_var })
            }
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(value) => value.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or(Error::InvalidEnv {
                name: "MASTER_PORT",
                value,
                reason: "not a port number in 1..=65535",
            })?,
        };
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port, launcher }))
    }
}

/// The first host of a Slurm host list: `node[07-09,12],gpu3` gives `node07`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0usize;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    match entry.find('[') {
        None => (!entry.is_empty() && !entry.contains(']')).then(|| entry.to_string()),
        Some(open) => {
            let close = entry.find(']')?;
            let (prefix, ranges, suffix) = (&entry[..open], &entry[open + 1..close], &entry[close + 1..]);
            let first = ranges.split(',').next()?.split('-').next()?.trim();
            if prefix.is_empty() || first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(format!("{prefix}{first}{suffix}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Option<RankInfo>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RankInfo::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_give_the_rank() -> Result<()> {
        let info = read(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
            // torchrun inside Slurm: RANK wins.
            ("SLURM_PROCID", "0"),
        ])?;
        assert_eq!(
            info,
            Some(RankInfo {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                master_addr: "10.0.0.1".into(),
                master_port: 1234,
                launcher: Launcher::Torchrun,
            })
        );
        Ok(())
    }

    #[test]
    fn slurm_variables_give_the_rank_and_the_first_node_as_master() -> Result<()> {
        let info = read(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[007-008,010],login1"),
        ])?
        .expect("a slurm rank");
        assert_eq!((info.rank, info.world_size, info.local_rank), (3, 4, 1));
        assert_eq!(info.master_addr, "gpu007");
        assert_eq!(info.master_port, DEFAULT_MASTER_PORT);
        assert_eq!(info.launcher, Launcher::Slurm);
        Ok(())
    }

    #[test]
    fn no_launcher_means_a_single_process() -> Result<()> {
        assert_eq!(read(&[("PATH", "/bin")])?, None);
        Ok(())
    }

    #[test]
    fn inconsistent_variables_are_named() {
        let err = |vars: &[(&str, &str)]| read(vars).expect_err("invalid").to_string();
        assert!(err(&[("RANK", "0"), ("LOCAL_RANK", "0")]).contains("`WORLD_SIZE` is not set"));
        assert!(err(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h")])
            .contains("`RANK` = `4`"));
        assert!(
            err(&[("RANK", "x"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]).contains("not a non-negative")
        );
        assert!(err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]).contains("`MASTER_ADDR`"));
        assert!(err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000")
        ])
        .contains("MASTER_PORT"));
        assert!(err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "0"), ("SLURM_LOCALID", "0")])
            .contains("at least 1"));
    }

    #[test]
    fn slurm_host_lists_yield_their_first_host() {
        assert_eq!(first_host("node1"), Some("node1".into()));
        assert_eq!(first_host("node1,node2"), Some("node1".into()));
        assert_eq!(first_host("n[3-5]"), Some("n3".into()));
        assert_eq!(first_host("rack[09,11-12]-a,x"), Some("rack09-a".into()));
        assert_eq!(first_host(""), None);
        assert_eq!(first_host("[1-2]"), None);
        assert_eq!(first_host("n[a-b]"), None);
    }
}
