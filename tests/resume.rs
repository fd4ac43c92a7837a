//! Kill-and-resume: a real `candle-fit train` process killed with SIGKILL at random steps and
//! resumed from its checkpoints ends with parameters bit-identical to the uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_fit::train::checkpoint::{list_checkpoints, LOCK_FILE};

const STEPS: u64 = 150;

fn args(run_dir: &Path, save: &Path) -> Vec<String> {
    let fixed =
        "train --steps 150 --layers 2 --width 32 --heads 2 --context 32 --seq-len 32 --micro-batch 4 \
                 --accumulation-steps 2 --dropout 0.1 --eval-interval 0 --eval-windows 4 --quiet \
                 --checkpoint-every 1 --keep-checkpoints 2";
    let mut args: Vec<String> = fixed.split_whitespace().map(String::from).collect();
    args.extend(["--checkpoint-dir".into(), run_dir.display().to_string()]);
    args.extend(["--save".into(), save.display().to_string()]);
    args
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-resume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// xorshift64*: a few random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn newest_step(run_dir: &Path) -> u64 {
    list_checkpoints(run_dir).ok().and_then(|l| l.last().map(|(s, _)| *s)).unwrap_or(0)
}

#[test]
fn a_run_killed_at_random_steps_and_resumed_equals_the_uninterrupted_run() {
    let exe = env!("CARGO_BIN_EXE_candle-fit");
    let dir = scratch("kill");
    let (reference_dir, reference) = (dir.join("reference"), dir.join("reference.safetensors"));
    let status = Command::new(exe).args(args(&reference_dir, &reference)).stdout(Stdio::null()).status();
    assert!(status.is_ok_and(|s| s.success()), "the uninterrupted run failed");

    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    let mut rng = Rng(seed);
    let (run_dir, result) = (dir.join("killed"), dir.join("killed.safetensors"));
    let mut resumed_from = Vec::new();
    let mut kill_steps = Vec::new();
    for _ in 0..3 {
        // Kill once the newest checkpoint reaches a random step, after a random delay of up to
        // 3 ms (so some kills land while a checkpoint is being written).
        let target = newest_step(&run_dir) + 1 + rng.below(STEPS / 4);
        let mut a = args(&run_dir, &result);
        if newest_step(&run_dir) > 0 {
            a.extend(["--resume".into(), run_dir.display().to_string()]);
        }
        let mut child = Command::new(exe).args(&a).stdout(Stdio::null()).spawn().expect("spawn");
        let started = Instant::now();
        while newest_step(&run_dir) < target && started.elapsed() < Duration::from_secs(60) {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        kill_steps.push(newest_step(&run_dir));
    }
    eprintln!("killed after checkpoints {kill_steps:?} (seed {seed})");
    // Resume to the end.
    let mut a = args(&run_dir, &result);
    a.extend(["--resume".into(), run_dir.display().to_string()]);
    let output = Command::new(exe).args(&a).output().expect("resume");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "resume failed: {}", String::from_utf8_lossy(&output.stderr));
    if let Some(line) = stdout.lines().find(|l| l.starts_with("resumed")) {
        resumed_from.push(line.to_string());
    }
    assert!(
        kill_steps.iter().any(|&s| s > 0 && s < STEPS),
        "no kill landed mid-run (newest checkpoints after the kills: {kill_steps:?}; seed {seed})"
    );
    assert!(!resumed_from.is_empty(), "the last run did not resume: {stdout}");
    let same = std::fs::read(&reference).ok() == std::fs::read(&result).ok();
    assert!(
        same,
        "parameters differ from the uninterrupted run (kills after checkpoints {kill_steps:?}, seed {seed})"
    );
    // No torn checkpoint directories are left behind, and only the newest two are kept.
    let names: Vec<String> = std::fs::read_dir(&run_dir)
        .expect("run dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(list_checkpoints(&run_dir).map(|l| l.len()).ok(), Some(2), "{names:?}");
    // (and the run's lock file, which holds no lock once its process is gone).
    assert!(names.iter().all(|n| n.starts_with("step-") || n == LOCK_FILE), "{names:?}");
    for (_, ckpt) in list_checkpoints(&run_dir).unwrap_or_default() {
        let complete = candle_fit::train::checkpoint::Checkpoint::open(&ckpt).and_then(|c| c.verify());
        assert!(complete.is_ok(), "{}: {complete:?}", ckpt.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
