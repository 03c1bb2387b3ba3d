//! The CLIP byte-level BPE tokenizer, read from a diffusers `tokenizer/` directory.
//!
//! Built on the `tokenizers` crate: a normaliser (control characters dropped, NFC,
//! whitespace runs collapsed, lowercase), CJK ideographs split apart, CLIP's split
//! pattern, the byte-to-unicode mapping, BPE with the `</w>` end-of-word suffix, then start and end tokens,
//! truncation and padding to `model_max_length`. The result equals the reference
//! tokenizer's `padding="max_length", truncation=True` output.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};

/// CLIP's pre-tokenisation pattern: the two special tokens, English contractions, runs
/// of letters, single digits, and runs of anything else that is not whitespace.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Characters the reference drops before anything else: the replacement character and
/// Unicode "other" categories (control, format, unassigned, private use, surrogate),
/// except tab, newline and carriage return, which count as whitespace.
const DROPPED_CHARS: &str = r"[^\P{C}\t\n\r]|\x{FFFD}";

/// CJK ideographs, which the reference separates from their neighbours with spaces.
const CJK_CHARS: &str = r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]";

/// The number of merges the reference reads from `merges.txt` at most
/// (its 49152-entry vocabulary less the 256 byte tokens and the two special tokens).
const MAX_MERGES: usize = 49152 - 256 - 2;

/// Sequence length when the tokenizer config does not give a usable one (CLIP's context).
const DEFAULT_MAX_LENGTH: usize = 77;

/// A CLIP tokenizer producing fixed-length id sequences for the text encoder.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// The special tokens and length limit, from `tokenizer_config.json` and
/// `special_tokens_map.json`.
struct SpecialTokens {
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
    max_length: usize,
}

impl SpecialTokens {
    fn read(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        // The reference reads `special_tokens_map.json` over the config only for configs
        // written before `added_tokens_decoder` existed; newer configs are authoritative.
        let config_first = config.get("added_tokens_decoder").is_some();
        let lookup = |key: &str, default: &str| -> Result<AddedToken> {
            let (first, second) = if config_first {
                (&config, &map)
            } else {
                (&map, &config)
            };
            let value = first
                .get(key)
                .filter(|v| !v.is_null())
                .or_else(|| second.get(key).filter(|v| !v.is_null()));
            match value {
                None => Ok(AddedToken::from(default, true).normalized(false)),
                Some(v) => added_token(key, v),
            }
        };
        let max_length = match config.get("model_max_length").and_then(Value::as_u64) {
            // The reference stores a huge sentinel when the length is unknown.
            Some(n) if n > 0 && n <= 1 << 20 => n as usize,
            _ => DEFAULT_MAX_LENGTH,
        };
        Ok(Self {
            bos: lookup("bos_token", "<|startoftext|>")?,
            eos: lookup("eos_token", "<|endoftext|>")?,
            unk: lookup("unk_token", "<|endoftext|>")?,
            pad: lookup("pad_token", "<|endoftext|>")?,
            max_length,
        })
    }
}

/// Reads a JSON object, or an empty one when the file is absent.
fn read_optional_json(path: &Path) -> Result<Value> {
    if !path.exists() {
        return Ok(Value::Object(Default::default()));
    }
    crate::error::read_json(path)
}

/// A special token given either as a plain string or as a serialised `AddedToken`.
fn added_token(key: &str, value: &Value) -> Result<AddedToken> {
    match value {
        Value::String(s) => Ok(AddedToken::from(s.as_str(), true).normalized(false)),
        Value::Object(o) => {
            let content = o.get("content").and_then(Value::as_str).ok_or_else(|| {
                Error::Tokenizer(format!("{key}: token object without `content`"))
            })?;
            let flag = |name: &str| o.get(name).and_then(Value::as_bool).unwrap_or(false);
            Ok(AddedToken::from(content, true)
                .lstrip(flag("lstrip"))
                .rstrip(flag("rstrip"))
                .single_word(flag("single_word"))
                .normalized(false))
        }
        other => Err(Error::Tokenizer(format!("{key}: unexpected value {other}"))),
    }
}

fn tok_err(what: &str) -> impl FnOnce(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{what}: {e}"))
}

impl ClipTokenizer {
    /// Loads the tokenizer from a diffusers `tokenizer/` directory: `vocab.json` and
    /// `merges.txt` when present, otherwise `tokenizer.json`; special tokens and
    /// `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json`
    /// (defaults: CLIP's tokens, `<|endoftext|>` padding, 77 ids).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let special = SpecialTokens::read(dir)?;
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let json = dir.join("tokenizer.json");
        let mut inner = if vocab.exists() && merges.exists() {
            build_from_vocab(&vocab, &merges, &special)?
        } else if json.exists() {
            Tokenizer::from_file(&json).map_err(tok_err(&json.display().to_string()))?
        } else {
            return Err(Error::MissingFile(vocab));
        };
        let id = |t: &AddedToken, inner: &Tokenizer| {
            inner.token_to_id(&t.content).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: special token {:?} is not in the vocabulary",
                    dir.display(),
                    t.content
                ))
            })
        };
        let (bos_id, eos_id, pad_id) = (
            id(&special.bos, &inner)?,
            id(&special.eos, &inner)?,
            id(&special.pad, &inner)?,
        );
        // The reference splits every special token out of the text before BPE (so the
        // SD 2.x pad token "!" in a prompt becomes the pad id, not the "!</w>" token).
        inner
            .add_special_tokens([
                special.bos.clone(),
                special.eos.clone(),
                special.unk.clone(),
                special.pad.clone(),
            ])
            .map_err(tok_err("special tokens"))?;
        inner
            .with_post_processor(Some(
                RobertaProcessing::new(
                    (special.eos.content.clone(), eos_id),
                    (special.bos.content.clone(), bos_id),
                )
                .trim_offsets(false)
                .add_prefix_space(false),
            ))
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: special.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err("truncation"))?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(special.max_length),
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                pad_id,
                pad_type_id: 0,
                pad_token: special.pad.content.clone(),
            }));
        Ok(Self {
            inner,
            max_length: special.max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// Encodes one prompt as exactly [`Self::model_max_length`] ids: the start token,
    /// the text's tokens (truncated to fit), the end token, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(tok_err("encode"))?;
        let ids = encoding.get_ids().to_vec();
        if ids.len() != self.max_length {
            return Err(Error::Tokenizer(format!(
                "encoded {} ids, expected {}",
                ids.len(),
                self.max_length
            )));
        }
        Ok(ids)
    }

    /// The fixed length of every encoded sequence.
    pub fn model_max_length(&self) -> usize {
        self.max_length
    }

    /// The start-of-text id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The end-of-text id (the text encoder's pooled output is read at its position).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// Builds the tokenizer pipeline from `vocab.json` and `merges.txt`.
fn build_from_vocab(vocab: &Path, merges: &Path, special: &SpecialTokens) -> Result<Tokenizer> {
    let vocab: std::collections::HashMap<String, u32> = crate::error::read_json(vocab)?;
    let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
    let merges = read_merges(merges)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(special.unk.content.clone())
        .end_of_word_suffix("</w>".to_owned())
        .fuse_unk(false)
        .build()
        .map_err(tok_err("BPE"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let regex = |p: &str, what: &str| -> Result<Replace> {
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(p.to_owned()),
            " ",
        )
        .map_err(tok_err(what))
    };
    let drop_chars = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(DROPPED_CHARS.to_owned()),
        "",
    )
    .map_err(tok_err("normaliser"))?;
    tokenizer
        .with_normalizer(Some(NormSequence::new(vec![
            drop_chars.into(),
            NFC.into(),
            regex(r"\s+", "normaliser")?.into(),
            Lowercase.into(),
        ])))
        .map_err(tok_err("normaliser"))?;
    let split = |p: &str, behavior, invert| {
        Split::new(SplitPattern::Regex(p.to_owned()), behavior, invert)
            .map_err(tok_err("pre-tokeniser"))
    };
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        split(CJK_CHARS, SplitDelimiterBehavior::Isolated, false)?.into(),
        split(CLIP_PATTERN, SplitDelimiterBehavior::Removed, true)?.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// Reads merges as the reference does: the first line is a version header, and at most
/// [`MAX_MERGES`] pairs follow.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile(path.to_owned()),
        _ => Error::Io(e),
    })?;
    text.trim()
        .split('\n')
        .skip(1)
        .take(MAX_MERGES)
        .enumerate()
        .map(|(i, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_owned(), b.to_owned())),
                _ => Err(Error::BadConfig {
                    path: path.to_owned(),
                    reason: format!("line {}: expected two tokens, got {line:?}", i + 2),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(model: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(model)
            .join("tokenizer")
    }

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("remixd-diffusion-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tokenizer_json_alone_gives_the_same_ids() {
        let texts = [
            "a photo of a cat!",
            "Hello, World! 東京 café",
            "",
            &"many words ".repeat(60),
        ];
        for model in ["tiny-sd1", "tiny-sd2"] {
            let from_vocab = ClipTokenizer::from_dir(&fixture(model)).unwrap();
            let dir = scratch_dir(&format!("tokjson-{model}"));
            for f in ["tokenizer_config.json", "special_tokens_map.json"] {
                std::fs::copy(fixture(model).join(f), dir.join(f)).unwrap();
            }
            from_vocab
                .inner
                .save(dir.join("tokenizer.json"), false)
                .unwrap();
            let from_json = ClipTokenizer::from_dir(&dir).unwrap();
            for text in texts {
                let ids = from_json.encode(text).unwrap();
                assert_eq!(ids, from_vocab.encode(text).unwrap(), "{model}: {text:?}");
                assert_eq!(ids.len(), 77);
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn defaults_without_config_files() {
        let dir = scratch_dir("tok-defaults");
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(fixture("tiny-sd1").join(f), dir.join(f)).unwrap();
        }
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.model_max_length(), DEFAULT_MAX_LENGTH);
        // CLIP's defaults: padding with the end token.
        assert_eq!(tok.pad_id(), tok.eos_id());
        let ids = tok.encode("a cat").unwrap();
        assert_eq!(ids[0], tok.bos_id());
        assert_eq!(*ids.last().unwrap(), tok.eos_id());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_vocabulary_is_a_missing_file() {
        let dir = scratch_dir("tok-empty");
        match ClipTokenizer::from_dir(&dir) {
            Err(Error::MissingFile(p)) => assert!(p.ends_with("vocab.json"), "{p:?}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
