//! Chat templates: the Jinja source a Hugging Face tokenizer ships (`chat_template` in
//! `tokenizer_config.json`, `tokenizer.chat_template` in a GGUF file), rendered with
//! `minijinja` and Python's string methods, and split into the spans the loss sees (the
//! assistant turns) and the spans it does not (everything else).

use minijinja::{context, Environment, Error, ErrorKind};

use super::records::Message;
use super::{DataError, Result};

/// A parsed chat template and the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Parses `source`; `bos_token` and `eos_token` are the strings templates see under those
    /// names (empty when the tokenizer has none).
    ///
    /// # Errors
    /// [`DataError::Template`] when the source does not parse.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // `message['content'].strip()`, `.startswith(...)`, `.split(...)`: Python's methods, as
        // Hugging Face's templates call them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| DataError::Template(describe(&e)))?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders `messages`, with the assistant's opening appended when `add_generation_prompt`.
    ///
    /// # Errors
    /// [`DataError::Template`] when rendering fails (including the template's own
    /// `raise_exception`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(|e| DataError::Template(describe(&e)))?;
        template
            .render(context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| DataError::Template(describe(&e)))
    }

    /// The rendered conversation as consecutive spans, each marked `true` when the loss sees
    /// it: for every assistant turn, what rendering it adds after the conversation up to it
    /// with the generation prompt (its content and its end-of-turn marker). Concatenated, the
    /// spans are exactly `render(messages, false)`.
    ///
    /// # Errors
    /// [`DataError::Template`] when rendering fails, or when the template does not render a
    /// conversation as an extension of its beginning (e.g. one that rewrites earlier assistant
    /// turns), so the assistant spans cannot be told apart.
    pub fn spans(&self, messages: &[Message]) -> Result<Vec<(String, bool)>> {
        let mut spans = Vec::new();
        let mut covered = String::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            let full = self.render(&messages[..=i], false)?;
            let rest = prefix.strip_prefix(covered.as_str()).ok_or_else(|| {
                DataError::Template(format!(
                    "the first {i} turns with the generation prompt do not render as an extension of the conversation up to the previous assistant turn, so assistant turns cannot be told apart"
                ))
            })?;
            let answer = full.strip_prefix(prefix.as_str()).ok_or_else(|| {
                DataError::Template(format!(
                    "the first {} turns do not render as the first {i} with the generation prompt followed by the assistant turn",
                    i + 1
                ))
            })?;
            if !rest.is_empty() {
                spans.push((rest.to_owned(), false));
            }
            spans.push((answer.to_owned(), true));
            covered = full;
        }
        let whole = self.render(messages, false)?;
        let tail = whole.strip_prefix(covered.as_str()).ok_or_else(|| {
            DataError::Template(
                "the whole conversation does not render as an extension of its assistant turns".into(),
            )
        })?;
        if !tail.is_empty() {
            spans.push((tail.to_owned(), false));
        }
        Ok(spans)
    }
}

/// An error with its source chain (minijinja puts the template line in the detail).
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text = format!("{text}: {detail}");
        }
    }
    if let Some(line) = e.line() {
        text = format!("{text} (template line {line})");
    }
    text
}
