//! The GPT: Hugging Face GPT-2 names and shapes, segments, context checks, weight round trip.

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::SegmentedModel;
use candle_fit::train::{Gpt, GptConfig};

fn config() -> GptConfig {
    GptConfig { n_ctx: 8, n_embd: 12, n_layer: 2, n_head: 3, ..GptConfig::default() }
}

#[test]
fn parameters_carry_gpt2_names_and_shapes() -> anyhow::Result<()> {
    let model = Gpt::new(config(), DType::F32, &Device::Cpu, 0)?;
    let shapes: Vec<(String, Vec<usize>)> =
        model.parameters().iter().map(|p| (p.name.clone(), p.dims().to_vec())).collect();
    let expected_block = |i: usize| {
        vec![
            (format!("h.{i}.ln_1.weight"), vec![12]),
            (format!("h.{i}.ln_1.bias"), vec![12]),
            (format!("h.{i}.attn.c_attn.weight"), vec![12, 36]),
            (format!("h.{i}.attn.c_attn.bias"), vec![36]),
            (format!("h.{i}.attn.c_proj.weight"), vec![12, 12]),
            (format!("h.{i}.attn.c_proj.bias"), vec![12]),
            (format!("h.{i}.ln_2.weight"), vec![12]),
            (format!("h.{i}.ln_2.bias"), vec![12]),
            (format!("h.{i}.mlp.c_fc.weight"), vec![12, 48]),
            (format!("h.{i}.mlp.c_fc.bias"), vec![48]),
            (format!("h.{i}.mlp.c_proj.weight"), vec![48, 12]),
            (format!("h.{i}.mlp.c_proj.bias"), vec![12]),
        ]
    };
    let mut expected =
        vec![("wte.weight".to_string(), vec![256, 12]), ("wpe.weight".to_string(), vec![8, 12])];
    expected.extend(expected_block(0));
    expected.extend(expected_block(1));
    expected.push(("ln_f.weight".into(), vec![12]));
    expected.push(("ln_f.bias".into(), vec![12]));
    assert_eq!(shapes, expected);
    assert_eq!(model.parameters().num_elements(), config().num_parameters());
    let sizes: Vec<usize> = model.parameters().iter().map(|p| p.elem_count()).collect();
    assert_eq!(sizes, config().parameter_sizes());
    Ok(())
}

#[test]
fn segments_are_embedding_blocks_and_head() -> anyhow::Result<()> {
    let model = Gpt::new(config(), DType::F32, &Device::Cpu, 0)?;
    let names: Vec<String> = (0..model.num_segments()).map(|i| model.segment_name(i)).collect();
    assert_eq!(names, ["embedding", "h.0", "h.1", "head"]);
    let head: Vec<String> = model.segment_parameters(3).into_iter().map(|p| p.name).collect();
    assert_eq!(head, ["ln_f.weight", "ln_f.bias", "wte.weight"]);
    Ok(())
}

#[test]
fn builds_in_every_float_dtype_and_refuses_long_sequences() -> anyhow::Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let model = Gpt::new(config(), dtype, &Device::Cpu, 0)?;
        assert!(model.parameters().iter().all(|p| p.dtype() == dtype));
        let logits = model.logits(&Tensor::zeros((2, 8), DType::U32, &Device::Cpu)?)?;
        assert_eq!(logits.dims(), [2, 8, 256]);
    }
    let model = Gpt::new(config(), DType::F32, &Device::Cpu, 0)?;
    let err = model.logits(&Tensor::zeros((1, 9), DType::U32, &Device::Cpu)?).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("sequence length 9 exceeds the model's context length 8"));
    let bad = GptConfig { n_head: 5, ..config() };
    assert!(Gpt::new(bad, DType::F32, &Device::Cpu, 0).is_err());
    Ok(())
}

#[test]
fn weights_round_trip_through_safetensors_and_bad_files_change_nothing() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-gpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("w.safetensors");
    let a = Gpt::new(config(), DType::F32, &Device::Cpu, 1)?;
    let b = Gpt::new(config(), DType::F32, &Device::Cpu, 2)?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
    a.parameters().save_safetensors(&path)?;
    b.parameters().load_safetensors(&path)?;
    let diff = (a.logits(&ids)? - b.logits(&ids)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);

    // A file from a wider model: a clear error and b is untouched.
    let wide = Gpt::new(GptConfig { n_embd: 24, ..config() }, DType::F32, &Device::Cpu, 3)?;
    wide.parameters().save_safetensors(&path)?;
    let before = b.logits(&ids)?;
    let err = b.parameters().load_safetensors(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("state mismatch for `wte.weight`: expected shape [256, 12], found shape [256, 24]"),
        "{err}"
    );
    std::fs::write(&path, b"not a safetensors file")?;
    assert!(b.parameters().load_safetensors(&path).is_err());
    let after = b.logits(&ids)?;
    assert_eq!((before - after)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
