//! A prompt to the Qwen3 text encoder's token ids, as FLUX.2 [klein]'s pipeline makes
//! them: the prompt as the one user message of a chat, rendered with the tokenizer's
//! chat template (generation prompt on, thinking off), then tokenised and padded or
//! truncated to a fixed length.
//!
//! The reference calls `tokenizer.apply_chat_template([{"role": "user", "content":
//! prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False)` and
//! then `tokenizer(text, padding="max_length", truncation=True, max_length=512)`. Here:
//!
//! - the template is the Jinja text of `chat_template.jinja` when that file exists
//!   (newer transformers write it, and it then overrides the config), otherwise
//!   `chat_template` in `tokenizer_config.json` (a string, or a list of named
//!   templates of which `default` is used);
//! - it is rendered with minijinja set up as transformers sets up Jinja2: blocks
//!   trimmed and left-stripped, one trailing newline dropped, Python's string methods
//!   (`startswith`, `strip`, `split`, …), `raise_exception(message)`, a `tojson` filter
//!   that writes what Python's `json.dumps` writes (`", "` and `": "` separators,
//!   non-ASCII kept, optional `indent`, `separators`, `sort_keys`, `ensure_ascii`),
//!   `{% generation %}` blocks rendered as their content, and values printed as Python
//!   prints them (`None`, `True`, `['a', 1]`);
//! - its variables are `messages`, `add_generation_prompt`, `enable_thinking`, `tools`
//!   and `documents` (both `None`), and the special tokens transformers passes
//!   (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
//!   `mask_token`, `additional_special_tokens` and any `extra_special_tokens`, as
//!   strings, only those set);
//! - the text is encoded by `tokenizer.json` (whose added tokens recognise the special
//!   tokens the template wrote), with the special tokens its post-processor adds (none
//!   for Qwen's byte-level one), truncated then padded with the pad token to exactly
//!   the requested length on the sides `truncation_side` and `padding_side` name
//!   (default right), as transformers configures the same library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Rest};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use tokenizers::utils::padding::{pad_encodings, PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
};
use tokenizers::{PostProcessor, Tokenizer};

use crate::error::{read_json, Error, Result};

/// The name the template is registered under (it appears in render errors).
const TEMPLATE_NAME: &str = "chat_template";

/// The special-token attributes transformers passes to a chat template.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The chat-template prompt encoder of a diffusers `tokenizer/` directory.
pub struct ChatPrompt {
    tokenizer: Tokenizer,
    env: Environment<'static>,
    /// The special-token variables of the template.
    specials: BTreeMap<String, Value>,
    pad_token: Option<String>,
    pad_id: Option<u32>,
    pad_left: bool,
    truncate_left: bool,
    dir: PathBuf,
}

impl std::fmt::Debug for ChatPrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatPrompt")
            .field("dir", &self.dir)
            .field("pad_token", &self.pad_token)
            .field("pad_id", &self.pad_id)
            .field("pad_left", &self.pad_left)
            .field("truncate_left", &self.truncate_left)
            .finish()
    }
}

impl ChatPrompt {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (special tokens, sides, and the
    /// template unless `chat_template.jinja` is there) and, for configs older than
    /// `added_tokens_decoder`, `special_tokens_map.json`, and compiles the template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::MissingFile(json));
        }
        let mut tokenizer = Tokenizer::from_file(&json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
        // Truncation and padding are applied per call, at the caller's length.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
        tokenizer.with_padding(None);

        let config_path = dir.join("tokenizer_config.json");
        let config: Json = read_json(&config_path)?;
        let bad = |reason: String| Error::BadConfig {
            path: config_path.clone(),
            reason,
        };
        let map_path = dir.join("special_tokens_map.json");
        // transformers reads special_tokens_map.json over the config only for configs
        // written before `added_tokens_decoder` existed.
        let legacy_map = if config.get("added_tokens_decoder").is_none() && map_path.is_file() {
            Some(read_json::<Json>(&map_path)?)
        } else {
            None
        };
        let lookup = |key: &str| -> Option<&Json> {
            legacy_map
                .as_ref()
                .and_then(|m| m.get(key))
                .filter(|v| !v.is_null())
                .or_else(|| config.get(key).filter(|v| !v.is_null()))
        };

        let mut specials = BTreeMap::new();
        for key in SPECIAL_TOKENS {
            if let Some(v) = lookup(key) {
                let content = token_content(v).ok_or_else(|| {
                    bad(format!("`{key}` is neither a string nor a token object"))
                })?;
                if !content.is_empty() {
                    specials.insert(key.to_owned(), Value::from(content));
                }
            }
        }
        if let Some(list) = lookup("additional_special_tokens") {
            let tokens = list
                .as_array()
                .and_then(|a| a.iter().map(token_content).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("`additional_special_tokens` is not a list of tokens".into()))?;
            if !tokens.is_empty() {
                specials.insert("additional_special_tokens".to_owned(), Value::from(tokens));
            }
        }
        if let Some(extra) = config.get("extra_special_tokens").and_then(Json::as_object) {
            for (key, v) in extra {
                let content = token_content(v)
                    .ok_or_else(|| bad(format!("`extra_special_tokens.{key}` is not a token")))?;
                if !content.is_empty() {
                    specials.insert(key.clone(), Value::from(content));
                }
            }
        }

        let pad_token = specials
            .get("pad_token")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let pad_id = match &pad_token {
            Some(t) => Some(
                tokenizer
                    .token_to_id(t)
                    .ok_or_else(|| bad(format!("pad_token {t:?} is not in {}", json.display())))?,
            ),
            None => None,
        };
        let side = |key: &str| -> Result<bool> {
            match config.get(key) {
                None | Some(Json::Null) => Ok(false),
                Some(Json::String(s)) if s == "right" => Ok(false),
                Some(Json::String(s)) if s == "left" => Ok(true),
                Some(other) => Err(bad(format!(
                    "`{key}` is {other}, expected \"right\" or \"left\""
                ))),
            }
        };
        let (pad_left, truncate_left) = (side("padding_side")?, side("truncation_side")?);

        let (template, template_path) = read_template(dir, &config, &config_path)?;
        let env = environment(template).map_err(|e| Error::BadConfig {
            path: template_path,
            reason: format!("chat template: {e}"),
        })?;
        Ok(Self {
            tokenizer,
            env,
            specials,
            pad_token,
            pad_id,
            pad_left,
            truncate_left,
            dir: dir.to_owned(),
        })
    }

    /// The chat-template text for `prompt` as the one user message, with the
    /// generation prompt and thinking turned off (`enable_thinking=False`).
    pub fn render(&self, prompt: &str) -> Result<String> {
        let mut ctx = self.specials.clone();
        let message = Message {
            role: "user".to_owned(),
            content: prompt.to_owned(),
        };
        ctx.insert(
            "messages".into(),
            Value::from(vec![Value::from_object(message)]),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(true));
        ctx.insert("enable_thinking".into(), Value::from(false));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.template_error(e))?;
        template.render(ctx).map_err(|e| self.template_error(e))
    }

    /// `prompt` rendered ([`Self::render`]) and tokenised ([`Self::tokenize`]).
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        self.tokenize(&self.render(prompt)?, max_len)
    }

    /// Token ids and attention mask (`1` for a text token, `0` for padding) of `text`,
    /// exactly `max_len` long: the text's tokens (special tokens written in it are
    /// recognised) with the post-processor's special tokens, truncated, then padded
    /// with the pad token (required, as transformers requires it).
    pub fn tokenize(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let err = |e: tokenizers::Error| Error::Tokenizer(format!("{}: {e}", self.dir.display()));
        // transformers refuses `padding="max_length"` without a pad token, needed or not.
        let (Some(pad_id), Some(pad_token)) = (self.pad_id, &self.pad_token) else {
            return Err(Error::Tokenizer(format!(
                "{}: padding to {max_len} tokens needs a pad_token, and tokenizer_config.json \
                 has none",
                self.dir.display()
            )));
        };
        let raw = self.tokenizer.encode(text, false).map_err(err)?;
        let processor = self.tokenizer.get_post_processor();
        let added = processor.map_or(0, |p| p.added_tokens(false));
        if max_len < added {
            return Err(Error::Tokenizer(format!(
                "{}: a length of {max_len} leaves no room for the {added} special tokens the \
                 tokenizer adds",
                self.dir.display()
            )));
        }
        let direction = if self.truncate_left {
            TruncationDirection::Left
        } else {
            TruncationDirection::Right
        };
        let truncation = TruncationParams {
            max_length: max_len - added,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction,
        };
        let encoding = truncate_encodings(raw, None, &truncation).map_err(err)?.0;
        let encoding = match processor {
            Some(p) => p.process(encoding, None, true).map_err(err)?,
            None => encoding,
        };
        let mut encodings = [encoding];
        if encodings[0].len() < max_len {
            let padding = PaddingParams {
                strategy: PaddingStrategy::Fixed(max_len),
                direction: if self.pad_left {
                    PaddingDirection::Left
                } else {
                    PaddingDirection::Right
                },
                pad_to_multiple_of: None,
                pad_id,
                pad_type_id: 0,
                pad_token: pad_token.clone(),
            };
            pad_encodings(&mut encodings, &padding).map_err(err)?;
        }
        let [encoding] = encodings;
        Ok((
            encoding.get_ids().to_vec(),
            encoding.get_attention_mask().to_vec(),
        ))
    }

    /// The pad token's id, when the tokenizer has a pad token.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    fn template_error(&self, e: minijinja::Error) -> Error {
        Error::Tokenizer(format!(
            "{}: chat template: {}",
            self.dir.display(),
            describe(&e)
        ))
    }
}

/// One chat message, a map whose keys keep Python's insertion order (`role`, then
/// `content`) when iterated or written by `tojson`.
#[derive(Debug)]
struct Message {
    role: String,
    content: String,
}

impl Object for Message {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A minijinja error with its causes, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// A special token's text: a string, or the `content` of a serialised `AddedToken`.
fn token_content(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The template's text and the file it came from: `chat_template.jinja` over the
/// config's `chat_template` (a string, or named templates of which `default`).
fn read_template(dir: &Path, config: &Json, config_path: &Path) -> Result<(String, PathBuf)> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok((std::fs::read_to_string(&jinja)?, jinja));
    }
    let bad = |reason: &str| Error::BadConfig {
        path: config_path.to_owned(),
        reason: reason.to_owned(),
    };
    match config.get("chat_template") {
        Some(Json::String(s)) => Ok((s.clone(), config_path.to_owned())),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(|s| (s.to_owned(), config_path.to_owned()))
            .ok_or_else(|| bad("`chat_template` lists named templates but none named \"default\"")),
        None | Some(Json::Null) => Err(bad(
            "no `chat_template`, and no chat_template.jinja next to it",
        )),
        Some(_) => Err(bad("`chat_template` is neither a string nor a list")),
    }
}

/// A minijinja environment holding `template`, set up as transformers sets up Jinja2
/// for chat templates.
fn environment(template: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, state, value| {
        if value.is_undefined() || value.as_str().is_some() {
            minijinja::escape_formatter(out, state, value)
        } else {
            out.write_str(&py_str(value))
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "write failed"))
        }
    });
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, without_generation_tags(&template))?;
    Ok(env)
}

/// `template` with transformers' `{% generation %}` / `{% endgeneration %}` tags (which
/// mark the assistant's text for training masks and otherwise render their content)
/// turned into `{% if true %}` / `{% endif %}`, keeping their whitespace control.
fn without_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            rest = tag;
            break;
        };
        let inner = &tag[2..end];
        let body = inner.trim_start_matches(['-', '+']);
        let lead = &inner[..inner.len() - body.len()];
        let body = body.trim_end_matches(['-', '+']);
        let trail = &inner[lead.len() + body.len()..];
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lead} {r} {trail}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`: Python's `json.dumps` with those arguments, positional or named.
fn tojson(value: &Value, args: Rest<Value>) -> Result<String, minijinja::Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let mut given: BTreeMap<&str, Value> = BTreeMap::new();
    let mut positional = args.0;
    if positional.last().is_some_and(Value::is_kwargs) {
        let kwargs = positional.pop().unwrap_or_default();
        for key in kwargs.try_iter()? {
            let name = key.as_str().unwrap_or_default().to_owned();
            let Some(&known) = NAMES.iter().find(|&&n| n == name) else {
                return Err(minijinja::Error::new(
                    ErrorKind::TooManyArguments,
                    format!("tojson() got an unexpected keyword argument {name:?}"),
                ));
            };
            given.insert(known, kwargs.get_item(&key)?);
        }
    }
    if positional.len() > NAMES.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson() takes at most 4 arguments",
        ));
    }
    for (name, v) in NAMES.iter().zip(positional) {
        given.insert(name, v);
    }
    let arg = |name: &str| {
        given
            .get(name)
            .filter(|v| !v.is_none() && !v.is_undefined())
    };
    let ensure_ascii = arg("ensure_ascii").is_some_and(Value::is_true);
    let sort_keys = arg("sort_keys").is_some_and(Value::is_true);
    let indent = match arg("indent") {
        None => None,
        Some(v) if v.is_integer() => Some(" ".repeat(i64::try_from(v.clone())?.max(0) as usize)),
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match arg("separators") {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_owned(),
                    b.as_str().unwrap_or_default().to_owned(),
                ),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let dumper = Dumper {
        ensure_ascii,
        sort_keys,
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(out)
}

/// Python's `json.dumps` settings.
struct Dumper {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

impl Dumper {
    fn dump(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        use minijinja::value::ValueKind;
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&json_number(value)),
            ValueKind::String => {
                json_string(value.as_str().unwrap_or_default(), self.ensure_ascii, out)
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container('[', ']', items.len(), depth, out, |i, out| {
                    self.dump(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut pairs = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    pairs.push((json_key(&key)?, item));
                }
                if self.sort_keys {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container('{', '}', pairs.len(), depth, out, |i, out| {
                    json_string(&pairs[i].0, self.ensure_ascii, out);
                    out.push_str(&self.key_sep);
                    self.dump(&pairs[i].1, depth + 1, out)
                })?;
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: {} is not JSON serializable", value.kind()),
                ))
            }
        }
        Ok(())
    }

    fn container(
        &self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(indent);
                }
            }
        };
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            newline(out, depth + 1);
            item(i, out)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }
}

/// A map key as Python's `json.dumps` converts it.
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    use minijinja::value::ValueKind;
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number => json_number(key),
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
            ))
        }
    })
}

/// A number as `json.dumps` writes it (floats as Python's `repr`, non-finite ones as
/// `NaN` / `Infinity`).
fn json_number(v: &Value) -> String {
    match float_of(v) {
        Some(f) if f.is_nan() => "NaN".to_owned(),
        Some(f) if f.is_infinite() => (if f > 0.0 { "Infinity" } else { "-Infinity" }).to_owned(),
        Some(f) => py_float(f),
        None => v.to_string(),
    }
}

/// The value of a float (not an integer) number.
fn float_of(v: &Value) -> Option<f64> {
    if v.is_number() && !v.is_integer() {
        f64::try_from(v.clone()).ok()
    } else {
        None
    }
}

/// Python's `repr` of a finite float: the shortest round-tripping digits, positional
/// for exponents in `-4..16`, otherwise `d.ddde±XX`.
fn py_float(f: f64) -> String {
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let point = exp as usize + 1;
            let mut int = digits.clone();
            let frac = if digits.len() > point {
                int.truncate(point);
                digits[point..].to_owned()
            } else {
                int.push_str(&"0".repeat(point - digits.len()));
                "0".to_owned()
            };
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{rest}e{esign}{:02}", exp.abs())
    }
}

/// A string as `json.dumps` quotes it.
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `str(value)` in Python, as Jinja2 prints a value: `None`, `True`, `1.0`, and
/// containers as their `repr`.
fn py_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) => s.to_owned(),
        None => py_repr(value),
    }
}

/// Python's `repr` of a value (strings quoted as Python quotes them).
fn py_repr(value: &Value) -> String {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_owned(),
        ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).to_owned(),
        ValueKind::Number => match float_of(value) {
            Some(f) if f.is_nan() => "nan".to_owned(),
            Some(f) if f.is_infinite() => (if f > 0.0 { "inf" } else { "-inf" }).to_owned(),
            Some(f) => py_float(f),
            None => value.to_string(),
        },
        ValueKind::String => py_quote(value.as_str().unwrap_or_default()),
        ValueKind::Seq => match value.try_iter() {
            Ok(items) => format!(
                "[{}]",
                items.map(|v| py_repr(&v)).collect::<Vec<_>>().join(", ")
            ),
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => format!(
                "{{{}}}",
                keys.map(|k| {
                    let v = value.get_item(&k).unwrap_or_default();
                    format!("{}: {}", py_repr(&k), py_repr(&v))
                })
                .collect::<Vec<_>>()
                .join(", ")
            ),
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

/// A string literal as Python's `repr` writes it: single quotes unless the text has a
/// single quote and no double one.
fn py_quote(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    /// Special tokens of the test tokenizer and their ids (after the 256 byte tokens).
    const END_OF_TEXT: u32 = 256;
    const IM_START: u32 = 257;
    const IM_END: u32 = 258;

    /// A template written for these tests, exercising what transformers' Jinja setup
    /// does: trimmed and left-stripped blocks, Python string methods, special-token
    /// variables (no `bos_token` here), `{% generation %}`, Python-style printing,
    /// `tojson` and `raise_exception`.
    const TEMPLATE: &str = r#"{%- if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}
{{ bos_token if bos_token is defined else 'NOBOS' }}
{% for message in messages %}
    {% if message.content.startswith(' ') %}
    [lead]
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content.strip() }}|{{ message.content.split(' ')|length }}|{{ message.content.upper() }}|{{ message.content.rstrip().lstrip() }}<|im_end|>
{% endfor %}
{% generation %}
gen:{{ eos_token }}/{{ pad_token }}/{{ additional_special_tokens|join(',') }}
{% endgeneration %}
{{ tools }} {{ documents }} {{ enable_thinking }} {{ [1, 'a', "it's", none, 2.0, 1e20] }} {{ {'k': true} }}
{{ messages|tojson }} {{ messages[0]|tojson(indent=1) }} {{ messages|tojson(ensure_ascii=true) }}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

{% endif %}
{% endif %}
"#;

    /// A temporary tokenizer directory, removed on drop.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A byte-level tokenizer without merges (one token per byte of text, ids in the
    /// order of the byte alphabet) with three special tokens, and a config holding
    /// `config` (the template when it has none).
    fn tokenizer_dir(name: &str, config: Json, bos: bool) -> Dir {
        let dir = std::env::temp_dir().join(format!("remixd-chat-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let vocab: tokenizers::models::bpe::Vocab = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        assert_eq!(
            tok.add_special_tokens(specials.map(|t| AddedToken::from(t, true)))
                .unwrap(),
            3
        );
        if bos {
            // A post-processor that starts every sequence with <|im_start|>.
            let template = TemplateProcessing::builder()
                .try_single("<|im_start|> $A")
                .unwrap()
                .special_tokens(vec![("<|im_start|>", IM_START)])
                .build()
                .unwrap();
            tok.with_post_processor(Some(template));
        } else {
            tok.with_post_processor(Some(ByteLevel::new(false, false, true)));
        }
        tok.save(dir.join("tokenizer.json"), false).unwrap();
        let mut config = config;
        if config.get("chat_template").is_none() {
            config["chat_template"] = TEMPLATE.into();
        }
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        Dir(dir)
    }

    fn qwen_like_config() -> Json {
        serde_json::json!({
            "added_tokens_decoder": {},
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": {"content": "<|endoftext|>", "lstrip": false},
            "unk_token": null,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        })
    }

    /// What transformers 4.57.6's `apply_chat_template` renders from [`TEMPLATE`] for
    /// these prompts (same special tokens, `add_generation_prompt=True`,
    /// `enable_thinking=False`).
    #[test]
    fn renders_as_transformers_does() {
        let dir = tokenizer_dir("render", qwen_like_config(), false);
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        let tail = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
        let want = format!(
            "NOBOS\n    [lead]\n<|im_start|>user\nHello big world|5| HELLO BIG WORLD |Hello big \
             world<|im_end|>\ngen:<|im_end|>/<|endoftext|>/<|im_start|>,<|im_end|>\nNone None \
             False [1, 'a', \"it's\", None, 2.0, 1e+20] {{'k': True}}\n[{{\"role\": \"user\", \
             \"content\": \" Hello big world \"}}] {{\n \"role\": \"user\",\n \"content\": \" \
             Hello big world \"\n}} [{{\"role\": \"user\", \"content\": \" Hello big world \
             \"}}]\n{tail}"
        );
        assert_eq!(chat.render(" Hello big world ").unwrap(), want);
        let want = format!(
            "NOBOS\n<|im_start|>user\ncafé 東京 \"q\"|3|CAFÉ 東京 \"Q\"|café 東京 \
             \"q\"<|im_end|>\ngen:<|im_end|>/<|endoftext|>/<|im_start|>,<|im_end|>\nNone None \
             False [1, 'a', \"it's\", None, 2.0, 1e+20] {{'k': True}}\n[{{\"role\": \"user\", \
             \"content\": \"café 東京 \\\"q\\\"\"}}] {{\n \"role\": \"user\",\n \"content\": \
             \"café 東京 \\\"q\\\"\"\n}} [{{\"role\": \"user\", \"content\": \"caf\\u00e9 \
             \\u6771\\u4eac \\\"q\\\"\"}}]\n{tail}"
        );
        assert_eq!(chat.render("café 東京 \"q\"").unwrap(), want);
    }

    #[test]
    fn raise_exception_and_bad_templates_are_errors() {
        let config = serde_json::json!({
            "chat_template": "{{ raise_exception('only ' ~ messages[0].role ~ ' here') }}",
        });
        let dir = tokenizer_dir("raise", config, false);
        let err = ChatPrompt::from_dir(&dir.0)
            .unwrap()
            .render("x")
            .unwrap_err();
        assert!(err.to_string().contains("only user here"), "{err}");

        let config = serde_json::json!({"chat_template": "{% if %}"});
        let dir = tokenizer_dir("syntax", config, false);
        let err = ChatPrompt::from_dir(&dir.0).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("chat template"),
            "{err}"
        );

        let config = serde_json::json!({"chat_template": null});
        let dir = tokenizer_dir("none", config, false);
        let err = ChatPrompt::from_dir(&dir.0).unwrap_err().to_string();
        assert!(err.contains("no `chat_template`"), "{err}");
    }

    #[test]
    fn template_sources_in_transformers_order() {
        // A list of named templates: `default` is used.
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default {{ messages[0].content }}"},
        ]});
        let dir = tokenizer_dir("named", config, false);
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        assert_eq!(chat.render("p").unwrap(), "default p");
        // chat_template.jinja overrides the config, and keeps no trailing newline.
        std::fs::write(
            dir.0.join("chat_template.jinja"),
            "file {{ messages[0].content }}\n",
        )
        .unwrap();
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        assert_eq!(chat.render("p").unwrap(), "file p");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let env = environment(
            "{{ x|tojson }}\n{{ x|tojson(sort_keys=true, ensure_ascii=true) }}\n\
             {{ y|tojson(indent=2) }}\n{{ [1, 2]|tojson(separators=[',', ':']) }}\n\
             {{ 'a'|tojson(false, none) }}"
                .to_owned(),
        )
        .unwrap();
        let x = Value::from_object(OrderedMap(vec![
            ("name", Value::from("a\"b")),
            (
                "n",
                Value::from(vec![
                    Value::from(1),
                    Value::from(2.5),
                    Value::from(1e20),
                    Value::from(1e-7),
                    Value::from(0.1),
                    Value::from(()),
                    Value::from(true),
                ]),
            ),
            ("é", Value::from("東京\n\u{1}")),
        ]));
        let y = Value::from_object(OrderedMap(vec![
            (
                "a",
                Value::from(vec![Value::from(1), Value::from_object(OrderedMap(vec![]))]),
            ),
            ("b", Value::from(Vec::<Value>::new())),
        ]));
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(minijinja::context! { x, y })
            .unwrap();
        // Printed by Python 3 for the same values.
        let want = [
            r#"{"name": "a\"b", "n": [1, 2.5, 1e+20, 1e-07, 0.1, null, true], "é": "東京\n\u0001"}"#,
            r#"{"n": [1, 2.5, 1e+20, 1e-07, 0.1, null, true], "name": "a\"b", "\u00e9": "\u6771\u4eac\n\u0001"}"#,
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}",
            "[1,2]",
            "\"a\"",
        ]
        .join("\n");
        assert_eq!(out, want);
    }

    /// A map with keys in a given order, for the `tojson` test.
    #[derive(Debug)]
    struct OrderedMap(Vec<(&'static str, Value)>);

    impl Object for OrderedMap {
        fn repr(self: &Arc<Self>) -> ObjectRepr {
            ObjectRepr::Map
        }

        fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
            let key = key.as_str()?;
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        }

        fn enumerate(self: &Arc<Self>) -> Enumerator {
            Enumerator::Values(self.0.iter().map(|(k, _)| Value::from(*k)).collect())
        }
    }

    #[test]
    fn python_floats_print_as_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-0.0, "-0.0"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (-3e-300, "-3e-300"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            without_generation_tags("a{%- generation -%}b{% endgeneration %}{%+ if x %}"),
            "a{%- if true -%}b{% endif %}{%+ if x %}"
        );
        assert_eq!(without_generation_tags("{{ '%}' }} {%"), "{{ '%}' }} {%");
    }

    #[test]
    fn encodes_special_tokens_and_pads_to_the_length() {
        let config = serde_json::json!({
            "added_tokens_decoder": {},
            "eos_token": "<|im_end|>",
            "pad_token": {"content": "<|endoftext|>"},
            "chat_template": "<|im_start|>{{ messages[0].role }}\n{{ messages[0].content }}<|im_end|>\n",
        });
        let dir = tokenizer_dir("encode", config, false);
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        assert_eq!(chat.pad_id(), Some(END_OF_TEXT));
        let text = chat.render("hi").unwrap();
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>");
        let (ids, mask) = chat.encode("hi", 12).unwrap();
        // <|im_start|> u s e r \n h i <|im_end|>: special tokens are single ids, the
        // byte-level post-processor adds nothing.
        assert_eq!(ids.len(), 12);
        assert_eq!(ids[0], IM_START);
        assert_eq!(ids[8], IM_END);
        assert!(ids[1..8].iter().all(|&id| id < 256), "{ids:?}");
        assert_eq!(&ids[9..], &[END_OF_TEXT; 3]);
        assert_eq!(mask, [vec![1; 9], vec![0; 3]].concat());
        // Truncated to the length, from the right.
        let (short, mask) = chat.encode("hi", 4).unwrap();
        assert_eq!(short, ids[..4]);
        assert_eq!(mask, vec![1; 4]);
        // Exactly the length: no padding.
        assert_eq!(chat.encode("hi", 9).unwrap().0, ids[..9]);
    }

    #[test]
    fn sides_come_from_the_config() {
        let config = serde_json::json!({
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "truncation_side": "left",
            "chat_template": "{{ messages[0].content }}<|im_end|>",
        });
        let dir = tokenizer_dir("sides", config, false);
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        let (ids, mask) = chat.encode("abc", 6).unwrap();
        assert_eq!(&ids[..2], &[END_OF_TEXT; 2]);
        assert_eq!(ids[5], IM_END);
        assert_eq!(mask, vec![0, 0, 1, 1, 1, 1]);
        let (ids, _) = chat.encode("abc", 2).unwrap();
        assert_eq!(ids[1], IM_END, "the start is cut: {ids:?}");

        let config = serde_json::json!({"padding_side": "middle", "chat_template": "x"});
        let dir = tokenizer_dir("bad-side", config, false);
        let err = ChatPrompt::from_dir(&dir.0).unwrap_err().to_string();
        assert!(
            err.contains("padding_side") && err.contains("middle"),
            "{err}"
        );
    }

    #[test]
    fn post_processor_tokens_count_towards_the_length() {
        let config = serde_json::json!({
            "pad_token": "<|endoftext|>",
            "chat_template": "{{ messages[0].content }}",
        });
        let dir = tokenizer_dir("bos", config, true);
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        let (ids, mask) = chat.encode("abcdef", 4).unwrap();
        assert_eq!(ids[0], IM_START, "added by the post-processor");
        assert_eq!(ids.len(), 4);
        assert_eq!(mask, vec![1; 4]);
        let err = chat.encode("abc", 0).unwrap_err().to_string();
        assert!(err.contains("no room"), "{err}");
    }

    #[test]
    fn padding_needs_a_pad_token() {
        let config = serde_json::json!({"chat_template": "{{ messages[0].content }}"});
        let dir = tokenizer_dir("nopad", config, false);
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        assert_eq!(chat.pad_id(), None);
        for len in [2, 5] {
            let err = chat.encode("ab", len).unwrap_err().to_string();
            assert!(err.contains("needs a pad_token"), "{err}");
        }

        let config = serde_json::json!({"pad_token": "<nope>", "chat_template": "x"});
        let dir = tokenizer_dir("badpad", config, false);
        let err = ChatPrompt::from_dir(&dir.0).unwrap_err().to_string();
        assert!(err.contains("<nope>"), "{err}");
    }

    #[test]
    fn legacy_configs_read_the_special_tokens_map() {
        // Without `added_tokens_decoder`, special_tokens_map.json wins over the config.
        let config = serde_json::json!({
            "eos_token": "<|endoftext|>",
            "chat_template": "{{ eos_token }}|{{ pad_token }}",
        });
        let dir = tokenizer_dir("legacy", config, false);
        std::fs::write(
            dir.0.join("special_tokens_map.json"),
            r#"{"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_start|>"}"#,
        )
        .unwrap();
        let chat = ChatPrompt::from_dir(&dir.0).unwrap();
        assert_eq!(chat.render("x").unwrap(), "<|im_end|>|<|im_start|>");
        assert_eq!(chat.pad_id(), Some(IM_START));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("remixd-chat-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        match ChatPrompt::from_dir(&dir) {
            Err(Error::MissingFile(p)) => assert!(p.ends_with("tokenizer.json"), "{p:?}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
