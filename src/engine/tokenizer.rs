//! CLIP's byte-level BPE tokenizer, built from `tokenizer/vocab.json` and `merges.txt` as real
//! Stable Diffusion repos ship them (they have no `tokenizer.json`).
//!
//! The normalisation and pre-tokenisation mirror transformers' `CLIPTokenizerFast`: NFC,
//! whitespace collapsed, lower case, CLIP's word regex, then byte-level BPE with `</w>` ends.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::error::{EngineError, Result};

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's word pattern (transformers' `CLIPTokenizer.pat`).
const CLIP_WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt turned into exactly `max_length` token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// How many of the prompt's tokens were cut to fit (0 when it fit).
    pub dropped_tokens: usize,
}

#[derive(Debug)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    start_id: u32,
    end_id: u32,
    pad_id: u32,
    max_length: usize,
}

/// The files a tokenizer is built from.
pub struct TokenizerFiles<'a> {
    pub vocab: &'a Path,
    pub merges: &'a Path,
    /// `special_tokens_map.json` and `tokenizer_config.json`, read for `pad_token`.
    pub special_tokens: &'a [&'a Path],
}

impl ClipTokenizer {
    /// Builds the tokenizer; `max_length` is the text encoder's position count (77).
    pub fn load(files: &TokenizerFiles, max_length: usize) -> Result<Self> {
        let folder = files
            .vocab
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let fail = |reason: String| EngineError::Tokenizer {
            folder: folder.clone(),
            reason,
        };
        let path_str = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| fail(format!("{} is not valid UTF-8", p.display())))
        };
        let bpe = BPE::from_file(&path_str(files.vocab)?, &path_str(files.merges)?)
            .unk_token(END_OF_TEXT.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let pad_token =
            read_pad_token(files.special_tokens).unwrap_or_else(|| END_OF_TEXT.to_string());
        Self::from_bpe(bpe, &pad_token, max_length, folder)
    }

    /// The CLIP tokenizer that ships with the program (single-file checkpoints have none),
    /// padding with `pad_token` (SD 2.x pads with `!`, SD 1.x with `<|endoftext|>`).
    pub fn bundled(pad_token: &str, max_length: usize) -> Result<Self> {
        let folder = PathBuf::from("assets/clip-tokenizer");
        let fail = |reason: String| EngineError::Tokenizer {
            folder: folder.clone(),
            reason,
        };
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_slice(crate::model_files::BUNDLED_VOCAB)
                .map_err(|e| fail(e.to_string()))?;
        let merges = std::str::from_utf8(crate::model_files::BUNDLED_MERGES)
            .map_err(|e| fail(e.to_string()))?
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| fail(format!("bad merge line `{line}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(END_OF_TEXT.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Self::from_bpe(bpe, pad_token, max_length, folder)
    }

    fn from_bpe(bpe: BPE, pad_token: &str, max_length: usize, folder: PathBuf) -> Result<Self> {
        let fail = |reason: String| EngineError::Tokenizer {
            folder: folder.clone(),
            reason,
        };
        let pad_token = pad_token.to_owned();
        let mut inner = Tokenizer::new(bpe);
        let collapse_whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| fail(e.to_string()))?;
        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            collapse_whitespace.into(),
            Lowercase.into(),
        ])));
        let words = Split::new(
            SplitPattern::Regex(CLIP_WORD_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| fail(e.to_string()))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            words.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        inner.add_special_tokens(&[
            AddedToken::from(START_OF_TEXT, true),
            AddedToken::from(END_OF_TEXT, true),
        ]);

        // transformers treats the pad token as a special token that splits any text it occurs
        // in: with SD 2.x's pad token "!", "wow!!" tokenizes as "wow", "!", "!". Match it.
        if pad_token != START_OF_TEXT && pad_token != END_OF_TEXT {
            inner.add_special_tokens(&[AddedToken::from(pad_token.as_str(), true)]);
        }

        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| fail(format!("the vocabulary has no `{token}` token")))
        };
        let start_id = id(START_OF_TEXT)?;
        let end_id = id(END_OF_TEXT)?;
        let pad_id = id(&pad_token)?;
        if max_length < 2 {
            return Err(fail(format!(
                "max length {max_length} leaves no room for a prompt"
            )));
        }
        Ok(Self {
            inner,
            start_id,
            end_id,
            pad_id,
            max_length,
        })
    }

    /// The prompt's ids with start and end tokens, truncated and padded to `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let encoding = self
            .inner
            .encode(prompt, false)
            .map_err(|e| EngineError::Tokenizer {
                folder: PathBuf::new(),
                reason: e.to_string(),
            })?;
        let words = encoding.get_ids();
        let room = self.max_length - 2;
        let kept = words.len().min(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.start_id);
        ids.extend_from_slice(&words[..kept]);
        ids.push(self.end_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt {
            ids,
            dropped_tokens: words.len() - kept,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// `pad_token` from the first file that names one: a string or `{"content": ...}`.
fn read_pad_token(files: &[&Path]) -> Option<String> {
    files.iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        match json.get("pad_token")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
            _ => None,
        }
    })
}
