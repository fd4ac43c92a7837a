//! The trainable BERT encoder on the shipped all-MiniLM-L6-v2 weights: forward equivalence
//! with candle-transformers' inference `BertModel`, real gradients for every parameter,
//! tokenization, and save/reload under the original names.
//!
//! Tests that need the model package skip, printing the pip line that installs it.

use std::collections::{BTreeSet, HashMap};

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{
    forward_backward, plain_forward_backward, segment_infos, Decision, Recompute, RecomputePolicy, Rng,
    SegmentContext, SegmentedModel,
};
use candle_fit::pretrained::{EncodedBatch, MiniLmFiles};
use candle_fit::train::layers::{Linear, WeightLayout};
use candle_fit::train::models::{mean_pool, Bert, BertClassifier, BertConfig, ClassificationBatch};
use candle_fit::train::ParamBuilder;

fn files() -> Option<MiniLmFiles> {
    match MiniLmFiles::locate() {
        Ok(files) => Some(files),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

const TEXTS: [&str; 3] = [
    "It is a truth universally acknowledged.",
    "Hello world",
    "A single man in possession of a good fortune must be in want of a wife, they say.",
];

fn batch(files: &MiniLmFiles) -> anyhow::Result<EncodedBatch> {
    files.tokenizer(128)?.encode(&TEXTS, &Device::Cpu)
}

fn hidden(model: &Bert, batch: &EncodedBatch) -> anyhow::Result<Tensor> {
    Ok(model.forward(&batch.ids, Some(&batch.token_types), &batch.mask, &mut Rng::seeded(0), false)?)
}

/// `max |a - b| / max |b|`.
fn relative_error(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

#[test]
fn tokenizer_gives_bert_uncased_ids_and_pads_to_the_longest() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let batch = batch(&files)?;
    let ids = batch.ids.to_vec2::<u32>()?;
    let mask = batch.mask.to_vec2::<u32>()?;
    // [CLS] hello world [SEP], then padding (id 0, mask 0) up to the longest text.
    assert_eq!(&ids[1][..4], &[101, 7592, 2088, 102]);
    assert!(ids[1][4..].iter().all(|&id| id == 0));
    assert_eq!(mask[1].iter().sum::<u32>(), 4);
    assert_eq!(ids[2].len(), mask[2].iter().sum::<u32>() as usize, "the longest text is unpadded");
    Ok(())
}

/// Tolerance: the largest element-wise difference of the last hidden states (padding positions
/// included) is at most 1e-5 of the largest magnitude, in F32.
#[test]
fn minilm_forward_matches_candle_transformers_within_1e5_relative() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let batch = batch(&files)?;
    let ours = hidden(&files.encoder(DType::F32, &Device::Cpu)?, &batch)?;

    let config: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(&files.config)?)?;
    // SAFETY: the file is a read-only package file nobody modifies while the test runs.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, &Device::Cpu)?
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &config)?;
    let expected = reference.forward(&batch.ids, &batch.token_types, Some(&batch.mask))?;

    assert_eq!(ours.dims(), expected.dims());
    let error = relative_error(&ours, &expected)?;
    assert!(error <= 1e-5, "relative error {error:e} exceeds 1e-5");
    Ok(())
}

#[test]
fn every_minilm_parameter_receives_a_nonzero_gradient() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let batch = batch(&files)?;
    let model = files.encoder(DType::F32, &Device::Cpu)?;
    let pooled = mean_pool(&hidden(&model, &batch)?, &batch.mask)?;
    let target = Tensor::ones(pooled.dims(), DType::F32, &Device::Cpu)?;
    let loss = (pooled - target)?.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    assert_eq!(model.parameters().len(), 6 * 16 + 5);
    for p in model.parameters().iter() {
        let grad = grads.get_id(p.id());
        let norm = match grad {
            Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?,
            None => anyhow::bail!("`{}` received no gradient", p.name),
        };
        // Token types other than 0 and unused vocabulary rows get zero rows, but every tensor
        // as a whole gets a real gradient.
        assert!(norm > 0.0 && norm.is_finite(), "`{}` gradient norm² {norm}", p.name);
    }
    Ok(())
}

#[test]
fn saved_weights_keep_the_original_names_and_reload_to_identical_outputs() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let batch = batch(&files)?;
    let model = files.encoder(DType::F32, &Device::Cpu)?;
    // A "fine-tuned" change: shift every parameter by a different small amount.
    for (i, p) in model.parameters().iter().enumerate() {
        p.var()?.set(&(&p.tensor()? + 1e-3 * (i as f64 + 1.0))?)?;
    }
    let dir = std::env::temp_dir().join(format!("candle-fit-bert-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    model.parameters().save_safetensors(&path)?;

    let original: BTreeSet<String> = candle::safetensors::load(&files.weights, &Device::Cpu)?
        .into_keys()
        .filter(|name| name != "embeddings.position_ids" && !name.starts_with("pooler."))
        .collect();
    let saved: BTreeSet<String> = candle::safetensors::load(&path, &Device::Cpu)?.into_keys().collect();
    // Every encoder tensor under its original name; the file's position-id buffer and the
    // pooler (unused by mean pooling, not part of the encoder) are not written.
    assert_eq!(saved, original, "saved names must be the original Hugging Face names");

    let config = model.config().clone();
    let reloaded = Bert::from_safetensors(&config, "", &path, DType::F32, &Device::Cpu)?;
    let (a, b) = (hidden(&model, &batch)?, hidden(&reloaded, &batch)?);
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?,
        "bit-identical outputs"
    );
    let before = hidden(&files.encoder(DType::F32, &Device::Cpu)?, &batch)?;
    assert!(relative_error(&before, &b)? > 1e-4, "the reloaded weights are the changed ones");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A classifier (encoder + `classifier` head, as `BertForSequenceClassification` names it)
/// saved in one safetensors file reloads into a fresh encoder and a differently initialised
/// head with bit-identical logits.
#[test]
fn classifier_with_its_head_saves_and_reloads_to_identical_logits() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let batch = batch(&files)?;
    let logits = |encoder: &Bert, head: &Linear| -> anyhow::Result<Vec<f32>> {
        let pooled = mean_pool(&hidden(encoder, &batch)?, &batch.mask)?;
        Ok(head.forward(&pooled)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let encoder = files.encoder(DType::F32, &Device::Cpu)?;
    let mut pb = ParamBuilder::new(DType::F32, Device::Cpu, 1);
    let head = Linear::new(&mut pb, "classifier", 384, 4, WeightLayout::OutIn, 0.5)?;
    let head_params = pb.finish();
    for p in encoder.parameters().iter().take(3) {
        p.var()?.set(&(&p.tensor()? + 1e-3)?)?;
    }
    let dir = std::env::temp_dir().join(format!("candle-fit-classifier-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    encoder.parameters().merged(&head_params).save_safetensors(&path)?;
    let names: BTreeSet<String> = candle::safetensors::load(&path, &Device::Cpu)?.into_keys().collect();
    assert!(names.contains("classifier.weight") && names.contains("classifier.bias"));
    assert!(names.contains("encoder.layer.5.output.dense.weight"));

    let reloaded = Bert::from_safetensors(encoder.config(), "", &path, DType::F32, &Device::Cpu)?;
    let mut pb = ParamBuilder::new(DType::F32, Device::Cpu, 2);
    let fresh_head = Linear::new(&mut pb, "classifier", 384, 4, WeightLayout::OutIn, 0.5)?;
    let fresh_params = pb.finish();
    let before = logits(&reloaded, &fresh_head)?;
    fresh_params.load_safetensors(&path)?;
    let (a, b) = (logits(&encoder, &head)?, logits(&reloaded, &fresh_head)?);
    assert_eq!(a, b, "bit-identical logits");
    assert_ne!(before, b, "the head's values came from the file");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tiny_classification_batch() -> anyhow::Result<ClassificationBatch> {
    let ids = Tensor::new(&[[2u32, 5, 7, 1, 0, 0], [3, 9, 4, 6, 8, 10], [1, 1, 2, 0, 0, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &Device::Cpu)?;
    let token_types =
        Tensor::new(&[[0u32, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], &Device::Cpu)?;
    Ok(ClassificationBatch { ids, token_types, mask, labels: Tensor::new(&[0u32, 2, 1], &Device::Cpu)? })
}

fn classifier_gradients(
    model: &BertClassifier,
    batch: &ClassificationBatch,
    decisions: &[Decision],
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let ctx = SegmentContext::train(3, 1, 0);
    forward_backward(model, batch, ctx, decisions, 1.0, |g| {
        for p in g.gradients {
            out.insert(p.name, p.grad);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The classifier as a `SegmentedModel`, with dropout on: every recompute decision gives the
/// gradients of keeping every graph (F64, 1e-12 relative), and those equal one plain backward
/// over the whole graph (the dropout masks replay).
#[test]
fn bert_classifier_recompute_gives_the_gradients_of_no_recompute() -> anyhow::Result<()> {
    let config =
        BertConfig { hidden_dropout_prob: 0.1, attention_probs_dropout_prob: 0.1, ..BertConfig::tiny() };
    let encoder = Bert::new(&config, "", DType::F64, &Device::Cpu, 4)?;
    let model = BertClassifier::new(encoder, 3, 5)?;
    let batch = tiny_classification_batch()?;
    let n = model.num_segments();
    assert_eq!(n, config.num_hidden_layers + 2);
    let keep = classifier_gradients(&model, &batch, &vec![Decision::Keep; n])?;
    assert_eq!(keep.len(), model.parameters().len(), "every parameter has a gradient");
    let mut plain = HashMap::new();
    plain_forward_backward(&model, &batch, SegmentContext::train(3, 1, 0), 1.0, |g| {
        for p in g.gradients {
            plain.insert(p.name, p.grad);
        }
        Ok(())
    })?;
    let mut sets = vec![vec![Decision::Recompute; n]];
    sets.push(Recompute::All.decide(&segment_infos(&model))?);
    for decisions in sets {
        let got = classifier_gradients(&model, &batch, &decisions)?;
        for (name, reference) in keep.iter() {
            let error = relative_error(&got[name].to_dtype(DType::F32)?, &reference.to_dtype(DType::F32)?)?;
            assert!(error <= 1e-6, "{name} under {decisions:?}: {error:e}");
            let exact = (&got[name] - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(exact <= 1e-12 * scale, "{name}: {exact:e}");
        }
    }
    for (name, reference) in keep.iter() {
        let exact = (&plain[name] - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(exact <= 1e-12 * scale, "plain vs segmented {name}: {exact:e}");
    }
    let logits = model.logits(&batch.ids, &batch.token_types, &batch.mask)?;
    assert_eq!(logits.dims(), [3, 3]);
    Ok(())
}
