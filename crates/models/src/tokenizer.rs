//! CLIP's byte-level BPE tokenizer, as open_clip's `SimpleTokenizer` does it: text cleanup
//! (the parts of `ftfy.fix_text` that change ordinary prompts, HTML entities, whitespace),
//! lowercasing, CLIP's split pattern, byte-to-unicode mapping, BPE merges, then start/end
//! tokens, truncation and padding to 77. The vocabulary ships in `assets/tokenizer/`.
//!
//! Not reproduced from ftfy: repairing mojibake (text decoded with the wrong encoding). Prompts
//! typed by people do not contain it; such text tokenizes as the characters it shows.

use std::collections::HashMap;
use std::io::Read;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// `<start_of_text>`.
pub const START_TOKEN: u32 = 49406;
/// `<end_of_text>`.
pub const END_TOKEN: u32 = 49407;
/// CLIP's context length.
pub const CONTEXT_LENGTH: usize = 77;

const VOCAB_GZ: &[u8] = include_bytes!("../../../assets/tokenizer/bpe_simple_vocab_16e6.txt.gz");
/// Merges used: the file's lines 1..=48894 (line 0 is a version header).
const MERGES: usize = 49152 - 256 - 2;

/// What fills the sequence after the end token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The end token again: the Hugging Face tokenizer of SD1's and SDXL's CLIP-L.
    EndToken,
    /// Zeros: open_clip, SDXL's bigG.
    Zero,
}

impl Padding {
    fn id(self) -> u32 {
        match self {
            Padding::EndToken => END_TOKEN,
            Padding::Zero => 0,
        }
    }
}

/// The number of ids the tokenizer gives (the end token is the last): a text encoder needs a
/// token embedding at least this long.
pub const VOCAB_SIZE: usize = END_TOKEN as usize + 1;

/// Why the tokenizer could not be built, or cannot feed a text encoder.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The embedded vocabulary did not decompress.
    #[error("the embedded CLIP vocabulary is corrupt: {0}")]
    Vocabulary(String),
    /// A text encoder whose token embedding is shorter than the tokenizer's ids.
    #[error(
        "the {part} text encoder has {vocab} token embeddings, but the CLIP tokenizer's ids go \
         up to {}: the checkpoint's text encoder is cut down or damaged",
        VOCAB_SIZE - 1
    )]
    TooFewTokens { part: &'static str, vocab: usize },
}

/// Checks, before any id reaches it, that a text encoder of `vocab` token embeddings takes
/// every id the tokenizer gives.
pub fn check_vocab(part: &'static str, vocab: usize) -> Result<(), TokenizerError> {
    if vocab < VOCAB_SIZE {
        return Err(TokenizerError::TooFewTokens { part, vocab });
    }
    Ok(())
}

/// CLIP's BPE tokenizer.
pub struct Tokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: Vec<char>,
    pattern: Regex,
}

impl Tokenizer {
    /// The CLIP tokenizer with the embedded vocabulary.
    pub fn clip() -> Result<Self, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCAB_GZ)
            .read_to_string(&mut text)
            .map_err(|e| TokenizerError::Vocabulary(e.to_string()))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(MERGES)
            .filter_map(|line| {
                let (a, b) = line.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            })
            .collect();
        if merges.len() != MERGES {
            return Err(TokenizerError::Vocabulary(format!(
                "{} merges, expected {MERGES}",
                merges.len()
            )));
        }
        let byte_encoder = bytes_to_unicode();
        let mut vocab: Vec<String> = byte_order()
            .iter()
            .map(|&b| byte_encoder[b as usize].to_string())
            .collect();
        let with_end: Vec<String> = vocab.iter().map(|v| format!("{v}</w>")).collect();
        vocab.extend(with_end);
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        let mut encoder: HashMap<String, u32> = HashMap::with_capacity(vocab.len() + 2);
        for (i, v) in vocab.into_iter().enumerate() {
            encoder.insert(v, i as u32);
        }
        encoder.insert("<start_of_text>".into(), START_TOKEN);
        encoder.insert("<end_of_text>".into(), END_TOKEN);
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m, i))
            .collect();
        let pattern = Regex::new(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| TokenizerError::Vocabulary(e.to_string()))?;
        Ok(Self {
            encoder,
            ranks,
            byte_encoder,
            pattern,
        })
    }

    /// Token ids of `text` without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text = clean(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&text) {
            let token = m.as_str();
            if let Some(&id) = self.encoder.get(token)
                && (id == START_TOKEN || id == END_TOKEN)
            {
                ids.push(id);
                continue;
            }
            let mapped: String = token
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            for piece in self.bpe(&mapped) {
                if let Some(&id) = self.encoder.get(&piece) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// `[start] + ids + [end]`, truncated to `CONTEXT_LENGTH` (the last kept token replaced by
    /// the end token) and padded.
    pub fn tokenize(&self, text: &str, padding: Padding) -> Vec<u32> {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(START_TOKEN);
        ids.extend(self.encode(text));
        ids.push(END_TOKEN);
        if ids.len() > CONTEXT_LENGTH {
            ids.truncate(CONTEXT_LENGTH);
            ids[CONTEXT_LENGTH - 1] = END_TOKEN;
        }
        ids.resize(CONTEXT_LENGTH, padding.id());
        ids
    }

    fn bpe(&self, token: &str) -> Vec<String> {
        let chars: Vec<char> = token.chars().collect();
        let Some((last, head)) = chars.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<String> = head.iter().map(|c| c.to_string()).collect();
        word.push(format!("{last}</w>"));
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w))
                })
                .min_by_key(|(r, _)| *r)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else {
                break;
            };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }
}

/// The byte order of CLIP's first 256 vocabulary entries: printable bytes first.
fn byte_order() -> Vec<u8> {
    let mut bs: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    for b in 0..=255u8 {
        if !bs.contains(&b) {
            bs.push(b);
        }
    }
    bs
}

/// GPT-2/CLIP's reversible byte -> printable character map, indexed by byte.
fn bytes_to_unicode() -> Vec<char> {
    let printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        map[b as usize] = if printable.contains(&b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\u{FFFD}')
        };
    }
    map
}

/// open_clip's cleanup: `ftfy.fix_text` (the parts that apply to typed text), HTML unescaping
/// twice, whitespace collapsed and trimmed, lowercased.
fn clean(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = unescape_html(&unescape_html(&fixed));
    let collapsed = unescaped.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.to_lowercase()
}

/// ftfy's default fixes that change typed text: line breaks, curly quotes, Latin ligatures,
/// full-width characters, control characters, NFC.
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => out.push('"'),
            '\u{FB00}' => out.push_str("ff"),
            '\u{FB01}' => out.push_str("fi"),
            '\u{FB02}' => out.push_str("fl"),
            '\u{FB03}' => out.push_str("ffi"),
            '\u{FB04}' => out.push_str("ffl"),
            '\u{FB06}' => out.push_str("st"),
            '\u{3000}' => out.push(' '),
            '\u{FF01}'..='\u{FF5E}' => {
                out.push(char::from_u32(c as u32 - 0xFEE0).unwrap_or(c));
            }
            c if is_removed_control(c) => {}
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

/// Control characters ftfy removes (it keeps tab, newline, form feed and carriage return).
fn is_removed_control(c: char) -> bool {
    matches!(
        c as u32,
        0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC
    )
}

/// Python's `html.unescape` for the entities prompts use: numeric references and the common
/// named ones.
fn unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let end = rest[1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '#'))
            .map(|e| e + 1)
            .unwrap_or(rest.len());
        let name = &rest[1..end];
        let has_semicolon = rest[end..].starts_with(';');
        let decoded = decode_entity(name);
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + usize::from(has_semicolon)..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return char::from_u32(code);
    }
    Some(match name {
        "amp" | "AMP" => '&',
        "lt" | "LT" => '<',
        "gt" | "GT" => '>',
        "quot" | "QUOT" => '"',
        "apos" => '\'',
        "nbsp" => '\u{A0}',
        "copy" => '\u{A9}',
        "reg" => '\u{AE}',
        "hellip" => '\u{2026}',
        "mdash" => '\u{2014}',
        "ndash" => '\u{2013}',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_text_encoder_must_take_every_id_the_tokenizer_gives() {
        assert!(check_vocab("CLIP-L", VOCAB_SIZE).is_ok());
        let err = check_vocab("CLIP-L", 1000).unwrap_err().to_string();
        assert!(err.contains("has 1000 token embeddings"), "{err}");
        assert!(err.contains("go up to 49407"), "{err}");
    }

    use super::*;

    /// (prompt, ids between start and end) computed with open_clip 3.3's tokenizer.
    #[test]
    fn small_cases() {
        let t = Tokenizer::clip().unwrap();
        for (prompt, want) in [
            ("a photo of a cat", vec![320u32, 1125, 539, 320, 2368]),
            ("", vec![]),
            ("  A   PHOTO\n", vec![320, 1125]),
        ] {
            assert_eq!(t.encode(prompt), want, "{prompt:?}");
        }
    }

    #[test]
    fn padding_and_truncation() {
        let t = Tokenizer::clip().unwrap();
        let short = t.tokenize("a photo of a cat", Padding::EndToken);
        assert_eq!(short.len(), CONTEXT_LENGTH);
        assert_eq!(
            &short[..7],
            &[START_TOKEN, 320, 1125, 539, 320, 2368, END_TOKEN]
        );
        assert!(short[7..].iter().all(|&id| id == END_TOKEN));
        let zero = t.tokenize("a photo of a cat", Padding::Zero);
        assert!(zero[7..].iter().all(|&id| id == 0));
        let long = t.tokenize(&"cat ".repeat(200), Padding::Zero);
        assert_eq!(long.len(), CONTEXT_LENGTH);
        assert_eq!(long[0], START_TOKEN);
        assert_eq!(long[CONTEXT_LENGTH - 1], END_TOKEN);
        assert!(long[1..CONTEXT_LENGTH - 1].iter().all(|&id| id == 2368));
    }
}
