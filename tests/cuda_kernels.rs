//! The fused CUDA optimizer kernels (crates/candle-train/kernels/optim.cu) checked without a
//! GPU: the file is compiled as host C++ with `kernels/emulate/` (g++, no FMA contraction; a
//! block's threads are real threads meeting at `__syncthreads`), run with the grids the Rust
//! launcher uses, and compared with the CPU kernels bit for bit: AdamW (and its BF16 copy),
//! SGD with and without momentum, first step and later, Nesterov, 8-bit AdamW (codes, scales,
//! parameters), and the FP64 sum of squares of the gradient norm. This checks the kernels'
//! arithmetic and synchronisation, not the PTX or the launch glue: tests/device_matrix.rs does
//! that on a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_fit::train::optim::adamw::Scalars;
use candle_fit::train::optim::quant::{code_values, Code};
use candle_fit::train::optim::{AdamW, AdamW8bit, Optimizer, OptimizerState, Sgd};
use candle_fit::train::{AdamWConfig, SgdConfig};

/// A deterministic pseudo-random sequence (SplitMix64) of values of varied magnitude.
fn varied(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * scale * 10f32.powi(((z >> 8) % 7) as i32 - 3)
        })
        .collect()
}

struct Emulator {
    driver: PathBuf,
    dir: PathBuf,
}

impl Emulator {
    fn build(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("candle-fit-cuda-emu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let emulate = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/candle-train/kernels/emulate");
        let driver = dir.join("driver");
        let out = Command::new("g++")
            .args(["-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-pthread", "-I"])
            .arg(&emulate)
            .arg(emulate.join("driver.cpp"))
            .arg("-o")
            .arg(&driver)
            .output()
            .map_err(|e| {
                anyhow::anyhow!("this test compiles the CUDA kernels with g++ (apt install g++): {e}")
            })?;
        anyhow::ensure!(out.status.success(), "g++ failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Ok(Self { driver, dir })
    }

    fn put<T: Copy>(&self, name: &str, values: &[T]) -> anyhow::Result<()> {
        // SAFETY: plain numbers (f32, u8) viewed as their bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        Ok(std::fs::write(self.dir.join(name), bytes)?)
    }

    fn get_f32(&self, name: &str) -> anyhow::Result<Vec<f32>> {
        let bytes = std::fs::read(self.dir.join(name))?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn get_u16(&self, name: &str) -> anyhow::Result<Vec<u16>> {
        let bytes = std::fs::read(self.dir.join(name))?;
        Ok(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect())
    }

    fn get_u8(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(self.dir.join(name))?)
    }

    fn run(&self, args: &[String]) -> anyhow::Result<()> {
        let out = Command::new(&self.driver).args(args).output()?;
        anyhow::ensure!(out.status.success(), "driver {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

fn scalars(s: &Scalars) -> [f32; 7] {
    [
        s.decay_factor,
        s.lerp_weight,
        s.beta2,
        s.one_minus_beta2,
        s.bias_correction2_sqrt,
        s.eps,
        s.neg_step_size,
    ]
}

#[test]
fn the_adamw_kernel_equals_the_cpu_kernel_bit_for_bit() -> anyhow::Result<()> {
    let emu = Emulator::build("adamw")?;
    // Three grid-stride blocks' worth and a tail; moments from earlier steps, step 3.
    let n = 2 * 256 + 77;
    let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let (p, g) = (varied(1, n, 1.0), varied(2, n, 0.1));
    let (m, v) = (varied(3, n, 0.01), varied(4, n, 1e-4).iter().map(|x| x.abs()).collect::<Vec<_>>());
    let mut flat = AdamW::new(config, &[n])?;
    let mut state = flat.state()?;
    state.step = 2;
    state.buffers.insert("exp_avg.0".into(), m.clone());
    state.buffers.insert("exp_avg_sq.0".into(), v.clone());
    flat.load_state(&state)?;
    flat.begin_step();
    let (lr, decay) = (3e-3, true);
    let mut want = p.clone();
    flat.update(0, &mut want, &g, lr, decay)?;
    let after = flat.state()?;

    for (name, values) in [("p", &p), ("g", &g), ("m", &m), ("v", &v)] {
        emu.put(name, values)?;
    }
    emu.put("s", &scalars(&Scalars::new(&config, 3, lr, decay)))?;
    emu.run(&["adamw".into(), emu.dir.display().to_string(), n.to_string()])?;
    assert_eq!(bits(&emu.get_f32("p.out")?), bits(&want), "parameters");
    assert_eq!(bits(&emu.get_f32("p32.out")?), bits(&want), "parameters (F32 variant)");
    assert_eq!(bits(&emu.get_f32("m.out")?), bits(&after.buffers["exp_avg.0"]), "first moment");
    assert_eq!(bits(&emu.get_f32("v.out")?), bits(&after.buffers["exp_avg_sq.0"]), "second moment");
    assert_eq!(emu.get_u16("copy.out")?, bf16_bits(&want), "the BF16 copy is the rounded parameter");
    assert_ne!(bits(&want), bits(&p), "the step moved the parameters");
    Ok(())
}

#[test]
fn the_sgd_kernel_equals_the_cpu_kernel_bit_for_bit() -> anyhow::Result<()> {
    let emu = Emulator::build("sgd")?;
    let n = 300;
    let (p, g, buf) = (varied(5, n, 1.0), varied(6, n, 0.1), varied(7, n, 0.1));
    let lr = 0.05;
    let cases = [
        (SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, dampening: 0.0 }, 1u64),
        (SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, dampening: 0.0 }, 5),
        (SgdConfig { momentum: 0.8, nesterov: false, weight_decay: 0.0, dampening: 0.1 }, 5),
        (SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.02, dampening: 0.0 }, 5),
    ];
    for (config, step) in cases {
        let mut flat = Sgd::new(config, &[n])?;
        let with_buffer = config.momentum > 0.0;
        let mut state = flat.state()?;
        state.step = step - 1;
        if with_buffer {
            state.buffers.insert("momentum.0".into(), buf.clone());
        }
        flat.load_state(&state)?;
        flat.begin_step();
        let mut want = p.clone();
        flat.update(0, &mut want, &g, lr, true)?;
        emu.put("p", &p)?;
        emu.put("g", &g)?;
        emu.put("buf", &buf)?;
        let s =
            [config.weight_decay as f32, -lr as f32, config.momentum as f32, (1.0 - config.dampening) as f32];
        emu.put("s", &s)?;
        let flags = [i32::from(config.nesterov), i32::from(step <= 1), i32::from(with_buffer)];
        let mut args = vec!["sgd".into(), emu.dir.display().to_string(), n.to_string()];
        args.extend(flags.iter().map(ToString::to_string));
        emu.run(&args)?;
        assert_eq!(bits(&emu.get_f32("p.out")?), bits(&want), "{config:?} step {step}: parameters");
        if with_buffer {
            let after = flat.state()?;
            assert_eq!(
                bits(&emu.get_f32("buf.out")?),
                bits(&after.buffers["momentum.0"]),
                "{config:?}: buffer"
            );
        }
        assert_eq!(emu.get_u16("copy.out")?, bf16_bits(&want), "{config:?}: BF16 copy");
    }
    Ok(())
}

#[test]
fn the_8bit_adamw_kernel_equals_the_cpu_kernel_bit_for_bit() -> anyhow::Result<()> {
    let emu = Emulator::build("adamw8bit")?;
    // Three quantization blocks, the last one partial.
    let n = 2 * 2048 + 905;
    let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let lr = 1e-3;
    let mut flat = AdamW8bit::new(config, &[n])?;
    let mut p = varied(8, n, 1.0);
    // Two steps on the CPU for realistic codes and scales.
    for step in 0..2 {
        flat.begin_step();
        flat.update(0, &mut p, &varied(20 + step, n, 0.1), lr, true)?;
    }
    let before: OptimizerState = flat.state()?;
    let g = varied(30, n, 0.1);
    flat.begin_step();
    let mut want = p.clone();
    flat.update(0, &mut want, &g, lr, true)?;
    let after = flat.state()?;

    emu.put("p", &p)?;
    emu.put("g", &g)?;
    emu.put("mc", &before.quantized["exp_avg.0.codes"])?;
    emu.put("vc", &before.quantized["exp_avg_sq.0.codes"])?;
    emu.put("ms", &before.buffers["exp_avg.0.scales"])?;
    emu.put("vs", &before.buffers["exp_avg_sq.0.scales"])?;
    emu.put("sc", code_values(Code::Signed))?;
    emu.put("uc", code_values(Code::Unsigned))?;
    emu.put("s", &scalars(&Scalars::new(&config, 3, lr, true)))?;
    emu.run(&["adamw8bit".into(), emu.dir.display().to_string(), n.to_string()])?;
    assert_eq!(bits(&emu.get_f32("p.out")?), bits(&want), "parameters");
    assert_eq!(emu.get_u8("mc.out")?, after.quantized["exp_avg.0.codes"], "first moment codes");
    assert_eq!(emu.get_u8("vc.out")?, after.quantized["exp_avg_sq.0.codes"], "second moment codes");
    assert_eq!(
        bits(&emu.get_f32("ms.out")?),
        bits(&after.buffers["exp_avg.0.scales"]),
        "first moment scales"
    );
    assert_eq!(bits(&emu.get_f32("vs.out")?), bits(&after.buffers["exp_avg_sq.0.scales"]), "second scales");
    assert_eq!(emu.get_u16("copy.out")?, bf16_bits(&want), "BF16 copy");
    assert_ne!(before.quantized["exp_avg.0.codes"], after.quantized["exp_avg.0.codes"], "the codes moved");
    Ok(())
}

#[test]
fn the_norm_kernel_sums_squares_in_fp64() -> anyhow::Result<()> {
    let emu = Emulator::build("sumsq")?;
    for n in [1usize, 255, 70_001] {
        let x = varied(9, n, 1.0);
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        emu.put("x", &x)?;
        emu.run(&["sumsq".into(), emu.dir.display().to_string(), n.to_string()])?;
        let bytes = std::fs::read(emu.dir.join("total.out"))?;
        let got = f64::from_le_bytes(bytes[..8].try_into()?);
        assert!((got - want).abs() <= 1e-13 * want, "{n}: {got} vs {want}");
    }
    Ok(())
}
