//! The CLIP tokenizer folders sd-scripts reads from `--tokenizer_cache_dir` instead of the
//! Hugging Face hub: `vocab.json` + `merges.txt` as transformers' `CLIPTokenizer` loads them,
//! built from the CLIP BPE file this repository ships (the same vocabulary for SD1's CLIP-L
//! and SDXL's bigG; sd-scripts sets bigG's pad id itself).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// OpenAI's CLIP BPE merges (`assets/tokenizer/`, MIT licence).
const BPE_GZ: &[u8] = include_bytes!("../../../../assets/tokenizer/bpe_simple_vocab_16e6.txt.gz");

/// CLIP keeps the first `49152 - 256 - 2` merges of the file (after its header line).
const MERGES: usize = 49152 - 256 - 2;

/// The hub ids sd-scripts asks for, as folder names under the cache dir (`/` -> `_`).
const FOLDERS: [&str; 2] = [
    "openai_clip-vit-large-patch14",
    "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
];

/// Writes both tokenizer folders under `cache_dir` unless they are complete already.
pub(crate) fn write_tokenizer_cache(cache_dir: &Path) -> Result<(), String> {
    let files = tokenizer_files()?;
    for folder in FOLDERS {
        let dir = cache_dir.join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        for (name, text) in &files {
            let path = dir.join(name);
            if path.is_file() {
                continue;
            }
            slider_atomic::write(&path, text.as_bytes())
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// (file name, content) of one tokenizer folder; `tokenizer_config.json` last, so a folder
/// sd-scripts finds is complete (it checks only that the folder exists).
fn tokenizer_files() -> Result<Vec<(&'static str, String)>, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| format!("decoding the embedded CLIP BPE file: {e}"))?;
    let merges: Vec<&str> = text.lines().skip(1).take(MERGES).collect();
    if merges.len() != MERGES {
        return Err(format!(
            "the embedded CLIP BPE file has {} merges, expected {MERGES}",
            merges.len()
        ));
    }
    let symbols = byte_symbols();
    let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    tokens.extend(symbols.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let vocab: BTreeMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id))
        .collect();
    let vocab = serde_json::to_string(&vocab).map_err(|e| e.to_string())?;
    let merges_txt = format!("#version: 0.2\n{}\n", merges.join("\n"));
    let special = r#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#;
    let config = r#"{"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#;
    Ok(vec![
        ("vocab.json", vocab),
        ("merges.txt", merges_txt),
        ("special_tokens_map.json", special.into()),
        ("tokenizer_config.json", config.into()),
    ])
}

/// GPT-2's reversible byte -> printable character map, in CLIP's order: the printable
/// bytes keep their code points, the others get 256, 257, ... in byte order.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut chars: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let others = 256 - chars.len() as u32;
    chars.extend(256..256 + others);
    chars.into_iter().filter_map(char::from_u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_is_clips() {
        let files = tokenizer_files().unwrap();
        let vocab: BTreeMap<String, usize> = serde_json::from_str(&files[0].1).unwrap();
        assert_eq!(vocab.len(), 49408);
        // Ids CLIP's tokenizer gives (checked against transformers' CLIPTokenizer).
        assert_eq!(vocab["!"], 0);
        assert_eq!(vocab["a</w>"], 320);
        assert_eq!(vocab["<|startoftext|>"], 49406);
        assert_eq!(vocab["<|endoftext|>"], 49407);
        assert_eq!(files[1].1.lines().count(), MERGES + 1);
    }

    #[test]
    fn folders_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_cache(dir.path()).unwrap();
        for folder in FOLDERS {
            for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
                assert!(
                    dir.path().join(folder).join(name).is_file(),
                    "{folder}/{name}"
                );
            }
        }
        write_tokenizer_cache(dir.path()).unwrap();
    }
}
