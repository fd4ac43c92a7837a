//! Records read from JSONL and CSV files: bounded reads, one format per file, every record
//! validated before anything is tokenized.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{DataError, Result};

/// The largest data file read (1 GiB): a larger file, or one that never ends (a FIFO, a
/// device), is refused rather than read until memory runs out.
pub const MAX_DATA_FILE_BYTES: u64 = 1 << 30;

/// What a file's records hold (see the module documentation for the keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"text"}`: language modelling on every token.
    Text,
    /// `{"prompt", "completion"}`: the loss on the completion only.
    PromptCompletion,
    /// `{"messages": [{"role", "content"}, ...]}`: the loss on the assistant turns only.
    Chat,
    /// `{"text", "label"}` (JSONL), or CSV with `text` and `label` columns.
    Classification,
}

impl Format {
    /// The keys a record of this format must have.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Format::Text => &["text"],
            Format::PromptCompletion => &["prompt", "completion"],
            Format::Chat => &["messages"],
            Format::Classification => &["text", "label"],
        }
    }

    /// The format a record's keys say, the most specific first (`messages`, then `prompt` and
    /// `completion`, then `text` with `label`, then `text`).
    fn detect(object: &serde_json::Map<String, Value>) -> Option<Self> {
        [Format::Chat, Format::PromptCompletion, Format::Classification, Format::Text]
            .into_iter()
            .find(|f| f.keys().iter().all(|k| object.contains_key(*k)))
    }

    /// Parses `text`, `prompt-completion`, `chat` or `classification`.
    ///
    /// # Errors
    /// An unknown name, listing the known ones.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "text" => Ok(Format::Text),
            "prompt-completion" => Ok(Format::PromptCompletion),
            "chat" => Ok(Format::Chat),
            "classification" => Ok(Format::Classification),
            other => Err(format!(
                "unknown data format `{other}`: expected text, prompt-completion, chat or classification"
            )),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt-completion",
            Format::Chat => "chat",
            Format::Classification => "classification",
        })
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or another role the chat template knows.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

/// One validated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Text to model.
    Text(String),
    /// A prompt (not trained on) and its completion (trained on).
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// A conversation with at least one assistant turn.
    Chat(Vec<Message>),
    /// A text and its label (an integer label is kept in its decimal form).
    Labelled {
        /// The text.
        text: String,
        /// The label's name.
        label: String,
    },
}

/// A file's records, each with the line it starts on.
#[derive(Debug, Clone)]
pub struct Records {
    /// The file.
    pub path: PathBuf,
    /// The format every record has.
    pub format: Format,
    /// (line, record), in file order.
    pub records: Vec<(usize, Record)>,
}

/// Reads a data file: `.csv` as CSV (classification only), anything else as JSONL. With
/// `format` given, every record must have that format; otherwise the first record decides and
/// every later one must agree.
///
/// # Errors
/// [`DataError::File`] for a file that is not regular, larger than [`MAX_DATA_FILE_BYTES`],
/// not UTF-8, or without records; [`DataError::Record`] naming line and field for a malformed
/// record; [`DataError::Io`] when reading fails.
pub fn read_records(path: &Path, format: Option<Format>) -> Result<Records> {
    let bytes = read_bounded(path)?;
    read_records_from(path, &bytes, format)
}

/// [`read_records`] over bytes already in memory (`path` names them in errors and decides
/// CSV by its extension).
///
/// # Errors
/// As [`read_records`].
pub fn read_records_from(path: &Path, bytes: &[u8], format: Option<Format>) -> Result<Records> {
    let file_error = |reason: String| DataError::File { path: path.to_path_buf(), reason };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        file_error(format!("not UTF-8 text (line {line})"))
    })?;
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let records = if is_csv {
        if format.is_some_and(|f| f != Format::Classification) {
            return Err(file_error(format!(
                "CSV files hold classification records (`text`, `label`), not {}",
                format.unwrap_or(Format::Classification)
            )));
        }
        Records { path: path.to_path_buf(), format: Format::Classification, records: read_csv(path, text)? }
    } else {
        read_jsonl(path, text, format)?
    };
    if records.records.is_empty() {
        return Err(file_error("no records".into()));
    }
    Ok(records)
}

/// The file's bytes, refusing what is not a regular file or is too large before reading it,
/// and never reading more than the limit even if the file grows meanwhile.
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            reason: "not a regular file (a FIFO or device would be read without end)".into(),
        });
    }
    let too_large = || DataError::File {
        path: path.to_path_buf(),
        reason: format!("larger than the {} MiB a data file may have", MAX_DATA_FILE_BYTES >> 20),
    };
    if metadata.len() > MAX_DATA_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_DATA_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_DATA_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

fn read_jsonl(path: &Path, text: &str, format: Option<Format>) -> Result<Records> {
    let mut decided = format;
    let mut records = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        let line_no = index + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::Record { path: path.to_path_buf(), line: line_no, reason };
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(bad(format!("a record must be a JSON object, not {}", kind(&value))));
        };
        // Asked for: the format's keys must be there (others are ignored). Detected: every
        // record must look like the first, so a file mixing formats is refused, not half-read.
        let format = match (format, decided) {
            (Some(f), _) => f,
            (None, seen) => {
                let f = Format::detect(&object).ok_or_else(|| {
                    bad(format!(
                        "cannot tell the format from the keys {:?}: expected `text`, `prompt` + `completion`, `messages`, or `text` + `label`",
                        object.keys().collect::<Vec<_>>()
                    ))
                })?;
                match seen {
                    Some(first) if first != f => {
                        return Err(bad(format!("a {f} record in a file whose first record is {first}")))
                    }
                    _ => decided = Some(f),
                }
                f
            }
        };
        records.push((line_no, parse_record(&object, format).map_err(bad)?));
    }
    Ok(Records { path: path.to_path_buf(), format: decided.unwrap_or(Format::Text), records })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(
    object: &serde_json::Map<String, Value>,
    key: &str,
    format: Format,
) -> std::result::Result<String, String> {
    match object.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("field `{key}` is empty")),
        Some(other) => Err(format!("field `{key}` must be a string, not {}", kind(other))),
        None => Err(format!("field `{key}` is missing (a {format} record needs {:?})", format.keys())),
    }
}

fn parse_record(
    object: &serde_json::Map<String, Value>,
    format: Format,
) -> std::result::Result<Record, String> {
    Ok(match format {
        Format::Text => Record::Text(string_field(object, "text", format)?),
        Format::PromptCompletion => Record::PromptCompletion {
            prompt: string_field(object, "prompt", format)?,
            completion: string_field(object, "completion", format)?,
        },
        Format::Classification => Record::Labelled {
            text: string_field(object, "text", format)?,
            label: match object.get("label") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) if n.as_u64().is_some() => n.to_string(),
                Some(other) => {
                    return Err(format!(
                        "field `label` must be a non-empty string or a non-negative integer, not {}",
                        if other.is_string() { "an empty string" } else { kind(other) }
                    ))
                }
                None => {
                    return Err(
                        "field `label` is missing (a classification record needs [\"text\", \"label\"])"
                            .into(),
                    )
                }
            },
        },
        Format::Chat => {
            let turns = match object.get("messages") {
                Some(messages) => parse_messages(messages)?,
                None => return Err("field `messages` is missing".into()),
            };
            if !turns.iter().any(|m| m.role == "assistant") {
                return Err("`messages` has no `assistant` turn: nothing to train on".into());
            }
            Record::Chat(turns)
        }
    })
}

/// The turns of a `messages` array (`[{"role", "content"}, ...]`, at least one, every role a
/// non-empty string, every content a string).
///
/// # Errors
/// A message naming the first bad element and field (`messages[1].content`).
fn parse_messages(messages: &Value) -> std::result::Result<Vec<Message>, String> {
    let messages = match messages {
        Value::Array(m) if !m.is_empty() => m,
        Value::Array(_) => return Err("field `messages` is empty".into()),
        other => return Err(format!("field `messages` must be an array, not {}", kind(other))),
    };
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!("`messages[{i}]` must be an object, not {}", kind(m)));
        };
        let field = |key: &str| -> std::result::Result<String, String> {
            match m.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("`messages[{i}].{key}` must be a string, not {}", kind(other))),
                None => Err(format!("`messages[{i}].{key}` is missing")),
            }
        };
        let role = field("role")?;
        if role.is_empty() {
            return Err(format!("`messages[{i}].role` is empty"));
        }
        turns.push(Message { role, content: field("content")? });
    }
    Ok(turns)
}

/// The conversation in a JSON file, for `candle-fit generate --messages`: an array of chat
/// messages `[{"role": "user", "content": "..."}, ...]`, or an object holding one under
/// `messages` (a chat record of a training file). Read bounded, as data files are.
///
/// # Errors
/// [`DataError::Io`] / [`DataError::File`] naming the file when it cannot be read, is not JSON,
/// or a message is malformed (naming the element and field: `messages[1].content is missing`).
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let bytes = read_bounded(path)?;
    let file_error = |reason: String| DataError::File { path: path.to_path_buf(), reason };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| file_error(format!("not JSON: {e}")))?;
    let messages = match &value {
        Value::Object(object) => object.get("messages").ok_or_else(|| {
            file_error("an object without field `messages` (expected [{\"role\", \"content\"}, ...])".into())
        })?,
        other => other,
    };
    parse_messages(messages).map_err(file_error)
}

fn read_csv(path: &Path, text: &str) -> Result<Vec<(usize, Record)>> {
    let file_error = |reason: String| DataError::File { path: path.to_path_buf(), reason };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| file_error(format!("CSV header: {e}")))?.clone();
    let column = |name: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| {
            file_error(format!(
                "the CSV header has no `{name}` column (found {:?}; classification needs `text` and `label`)",
                headers.iter().collect::<Vec<_>>()
            ))
        })
    };
    let (text_col, label_col) = (column("text")?, column("label")?);
    let mut records = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            DataError::Record { path: path.to_path_buf(), line, reason: format!("CSV: {e}") }
        })?;
        let line = row.position().map_or(0, |p| p.line() as usize);
        let bad = |reason: String| DataError::Record { path: path.to_path_buf(), line, reason };
        let get = |col: usize, name: &str| -> Result<String> {
            match row.get(col) {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(bad(format!("field `{name}` is empty"))),
            }
        };
        records
            .push((line, Record::Labelled { text: get(text_col, "text")?, label: get(label_col, "label")? }));
    }
    Ok(records)
}

/// Class names and their indices: the order a model's `id2label` gives, or the sorted set of a
/// training file's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl LabelMap {
    /// From class names in index order.
    ///
    /// # Errors
    /// An empty list, an empty name or a name given twice.
    pub fn from_names(names: Vec<String>) -> std::result::Result<Self, String> {
        if names.is_empty() {
            return Err("a label map needs at least one label".into());
        }
        let mut index = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(format!("label {i} has an empty name"));
            }
            if index.insert(name.clone(), i).is_some() {
                return Err(format!("label `{name}` is given twice"));
            }
        }
        Ok(Self { names, index })
    }

    /// The sorted set of the labels in classification records (integer labels sort as
    /// numbers, so `2` comes before `10`).
    ///
    /// # Errors
    /// [`DataError::File`] when the records are not classification records.
    pub fn from_records(records: &Records) -> Result<Self> {
        let mut set = BTreeSet::new();
        for (_, r) in &records.records {
            match r {
                Record::Labelled { label, .. } => set.insert(label.clone()),
                _ => {
                    return Err(DataError::File {
                        path: records.path.clone(),
                        reason: format!("a label map needs classification records, not {}", records.format),
                    })
                }
            };
        }
        let mut names: Vec<String> = set.into_iter().collect();
        if names.iter().all(|n| n.parse::<u64>().is_ok()) {
            names.sort_by_key(|n| n.parse::<u64>().unwrap_or(u64::MAX));
        }
        Self::from_names(names).map_err(|reason| DataError::File { path: records.path.clone(), reason })
    }

    /// The class names in index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Never true (a map has at least one label).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The index of `label`, if it is one of the classes.
    pub fn get(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// Each classification record's text and class index.
    ///
    /// # Errors
    /// [`DataError::Record`] naming the line of a label outside the map (and listing the map's
    /// labels), or of a record that is not a classification record.
    pub fn resolve<'a>(&self, records: &'a Records) -> Result<Vec<(&'a str, usize)>> {
        records
            .records
            .iter()
            .map(|(line, r)| {
                let bad =
                    |reason: String| DataError::Record { path: records.path.clone(), line: *line, reason };
                match r {
                    Record::Labelled { text, label } => {
                        self.get(label).map(|i| (text.as_str(), i)).ok_or_else(|| {
                            bad(format!(
                                "field `label`: `{label}` is not one of the {} labels {:?}",
                                self.len(),
                                self.names
                            ))
                        })
                    }
                    _ => Err(bad(format!("not a classification record ({} file)", records.format))),
                }
            })
            .collect()
    }
}
