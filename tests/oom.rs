//! Memory limit, out-of-memory recovery and the micro-batch search, measured with the
//! counting allocator this test binary installs: recovering from an out-of-memory error (or
//! choosing the micro-batch up front) gives the same trajectory, bit for bit, as running the
//! smaller micro-batch from the start. For the GPT on bytes, a LLaMA on masked token examples
//! of uneven lengths and a BERT classifier on labelled sequences (the Trainer's recovery is the
//! same for any model and data).

use std::sync::Mutex;

use candle::{DType, Device};
use candle_fit::datasets::{ClassificationDataset, TokenDataset};
use candle_fit::train::memory::CountingAllocator;
use candle_fit::train::models::{Bert, BertClassifier, BertConfig, Llama, LlamaConfig};
use candle_fit::train::{
    Corpus, DataSource, Error, Gpt, GptConfig, LocalUpdater, OptimizerConfig, TrainReport, TrainableModel,
    Trainer, TrainerConfig,
};

mod common;

/// Memory is process-wide: the tests of this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..100_000].to_vec(),
        0.1,
    )?)
}

struct Run {
    micro_batch: usize,
    accumulation_steps: usize,
    max_memory: Option<usize>,
    recovery: bool,
    search: bool,
}

impl Run {
    fn new(micro_batch: usize, accumulation_steps: usize) -> Self {
        Self { micro_batch, accumulation_steps, max_memory: None, recovery: true, search: false }
    }

    /// Trains `model` 3 steps on `data`; returns every parameter's f32 bits and the report.
    fn go<M, D>(
        &self,
        model: &M,
        data: &D,
        seq_len: usize,
    ) -> candle_fit::train::Result<(Vec<Vec<u32>>, TrainReport)>
    where
        M: TrainableModel,
        M::Batch: Sized,
        D: DataSource<Batch = M::Batch>,
    {
        let mut updater =
            LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(Default::default()))?;
        let trainer = Trainer::new(
            TrainerConfig::builder()
                .micro_batch(self.micro_batch)
                .accumulation_steps(self.accumulation_steps)
                .steps(3)
                .seq_len(seq_len)
                .eval_windows(2)
                .eval_interval(0)
                .max_memory(self.max_memory)
                .oom_recovery(self.recovery)
                .find_micro_batch(self.search)
                .build()?,
        );
        let report = trainer.fit(model, data, &mut updater)?;
        let bits = model
            .parameters()
            .iter()
            .map(|p| Ok(p.tensor()?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect()))
            .collect::<candle_fit::train::Result<_>>()?;
        Ok((bits, report))
    }
}

fn gpt() -> candle_fit::train::Result<Gpt> {
    let config =
        GptConfig { n_ctx: 64, n_embd: 32, n_layer: 2, n_head: 2, dropout: 0.1, ..GptConfig::default() };
    Gpt::new(config, DType::F32, &Device::Cpu, 4)
}

fn llama() -> candle_fit::train::Result<Llama> {
    // Wide enough that micro-batch 16 needs megabytes more than 8: the limit between them stays
    // clear of the run-to-run spread of the matmul's scratch buffers (at width 64 a loaded
    // machine once saw a second recovery).
    let config =
        LlamaConfig { vocab_size: 64, hidden_size: 256, intermediate_size: 512, ..LlamaConfig::tiny() };
    Llama::new(&config, DType::F32, &Device::Cpu, 4)
}

#[test]
fn out_of_memory_recovery_and_the_micro_batch_search_keep_the_trajectory() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    keeps_the_trajectory(gpt, &corpus()?, 64, true)
}

#[test]
fn a_llama_on_masked_tokens_recovers_from_out_of_memory_on_the_same_trajectory() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let data =
        TokenDataset::new("synthetic", common::masked_examples(64, 1), common::masked_examples(4, 2), 0)?;
    // Recovery only: on this model the micro-batch search's trials measure about 5 MB more than
    // the run's own steps (after the trial of 16 fails, the trial of 8 peaks above the run's
    // micro-batch-8 step: 42.2 MB against 32.5 MB), so no limit separates 8 from 16 for both.
    // An open question for the search (what a failed trial leaves behind), not for recovery.
    keeps_the_trajectory(llama, &data, 13, false)
}

fn classifier() -> candle_fit::train::Result<BertClassifier> {
    let config = BertConfig {
        vocab_size: 50,
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_hidden_layers: 2,
        max_position_embeddings: 64,
        hidden_dropout_prob: 0.1,
        ..BertConfig::tiny()
    };
    BertClassifier::new(Bert::new(&config, "", DType::F32, &Device::Cpu, 4)?, 3, 4)
}

#[test]
fn a_bert_classifier_recovers_from_out_of_memory_on_the_same_trajectory() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let samples: Vec<(Vec<u32>, u32)> = (0..80u32)
        .map(|i| ((0..40 + i as usize % 9).map(|k| (i * 7 + k as u32 * 3) % 50).collect(), i % 3))
        .collect();
    let (train, validation) = samples.split_at(72);
    let data = ClassificationDataset::new("synthetic", train.to_vec(), validation.to_vec(), 3, 0)?;
    keeps_the_trajectory(classifier, &data, 48, true)
}

/// The run we want is micro-batch 8 x 2; 16 x 1 does not fit under a limit between their
/// peaks. Recovery (and, with `search`, the micro-batch search) ends on the 8 x 2 run's
/// parameters, bit for bit.
fn keeps_the_trajectory<M, D>(
    make: impl Fn() -> candle_fit::train::Result<M>,
    data: &D,
    seq_len: usize,
    search: bool,
) -> anyhow::Result<()>
where
    M: TrainableModel,
    M::Batch: Sized,
    D: DataSource<Batch = M::Batch>,
{
    // The run we want: micro-batch 8 x 2. And the peak of 16 x 1, which will not fit.
    let (reference, r8) = Run::new(8, 2).go(&make()?, data, seq_len)?;
    let (_, r16) = Run::new(16, 1).go(&make()?, data, seq_len)?;
    let (p8, p16) = (r8.memory.peak, r16.memory.peak);
    println!("peaks: micro-batch 8 {p8} B, 16 {p16} B");
    assert!(p16 > p8 + (1 << 20), "micro-batch 16 should need over 1 MiB more than 8: {p16} vs {p8}");
    let limit = p8 + (p16 - p8) / 2;

    // Without recovery: a typed error naming the limit and where it was hit.
    let err =
        Run { max_memory: Some(limit), recovery: false, ..Run::new(16, 1) }.go(&make()?, data, seq_len).err();
    match &err {
        Some(Error::OutOfMemory { device, needed, limit: l, at }) => {
            assert_eq!((device.as_str(), *l), ("cpu", limit));
            assert!(*needed > limit, "{needed} <= {limit}");
            assert!(at.starts_with("forward of") || at.starts_with("backward of"), "{at}");
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }

    // With recovery: step 1 is retried as 8 x 2, and the whole run equals the 8 x 2 run.
    let (recovered, report) =
        Run { max_memory: Some(limit), ..Run::new(16, 1) }.go(&make()?, data, seq_len)?;
    assert_eq!(report.oom_recoveries.len(), 1, "{:?}", report.oom_recoveries);
    let r = &report.oom_recoveries[0];
    assert_eq!((r.step, r.from, r.to), (1, 16, 8));
    assert_eq!((report.micro_batch, report.accumulation_steps), (8, 2));
    assert!(report.memory.peak <= limit, "{} > {limit}", report.memory.peak);
    assert!(recovered == reference, "the recovered run's parameters differ from the 8 x 2 run's");

    if !search {
        return Ok(());
    }
    // The search measures 16 (too big), then 8 (fits), and trains with 8 x 2 from the start.
    let (searched, report) =
        Run { max_memory: Some(limit), search: true, ..Run::new(16, 1) }.go(&make()?, data, seq_len)?;
    let search = report.micro_batch_search.as_ref().expect("a search ran");
    let tried: Vec<(usize, bool)> = search.trials.iter().map(|t| (t.micro_batch, t.fits)).collect();
    assert_eq!(tried, [(16, false), (8, true)]);
    assert!(search.trials[1].peak_bytes <= limit && search.trials[0].peak_bytes > limit);
    assert_eq!((search.micro_batch, search.accumulation_steps), (8, 2));
    assert!(report.oom_recoveries.is_empty());
    assert!(searched == reference, "the searched run's parameters differ from the 8 x 2 run's");

    // A limit below what even one sequence needs: the search says so.
    let tiny =
        Run { max_memory: Some(p8 / 4), search: true, ..Run::new(16, 1) }.go(&make()?, data, seq_len).err();
    assert!(matches!(tiny, Some(Error::OutOfMemory { .. })), "{tiny:?}");
    Ok(())
}
