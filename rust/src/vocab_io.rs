//! Reading and writing vocabularies: tiktoken rank files and sftfast's own tokenizer file.
//!
//! tiktoken rank file: one token per line, `<base64 of the token bytes> <rank>`; empty lines
//! are skipped (as tiktoken's `load_tiktoken_bpe` does).
//!
//! sftfast tokenizer file (`Tokenizer.save` / `Tokenizer.load`), plain UTF-8 text:
//!
//! ```text
//! {"format": "sftfast-tokenizer", "version": 1, "pattern": "...", "special_tokens": [["<|bos|>", 65536], ...]}
//! <base64 token> <rank>        one line per mergeable token, in rank order
//! ...
//! ```
//!
//! Line 1 is one JSON object (the split pattern and the special tokens with their ids);
//! every following line is exactly a tiktoken rank-file line, so `tail -n +2 file` is a
//! valid `.tiktoken` file.

use crate::bpe::{CoreBPE, Rank};
use crate::error::{Error, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustc_hash::FxHashMap;
use std::io::Write;
use std::path::Path;

pub const FORMAT_NAME: &str = "sftfast-tokenizer";
pub const FORMAT_VERSION: u64 = 1;
/// Ranks index dense tables; a rank file with larger ones is malformed (and would allocate
/// gigabytes).
const MAX_RANK: Rank = 1 << 30;

/// Parses tiktoken rank-file lines starting at 1-based line number `first_line`.
/// `path` only labels errors.
pub fn parse_rank_lines(
    data: &[u8],
    path: &str,
    first_line: usize,
) -> Result<FxHashMap<Vec<u8>, Rank>> {
    let err = |line: usize, reason: String| Error::RankFile {
        path: path.to_string(),
        line,
        reason,
    };
    let mut ranks: FxHashMap<Vec<u8>, Rank> = FxHashMap::default();
    ranks.reserve(data.len() / 12);
    let mut seen_rank: Vec<u64> = Vec::new(); // bitset of ranks already given
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line_no = first_line + i;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        let mut fields = line
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|f| !f.is_empty());
        let (token, rank) = match (fields.next(), fields.next(), fields.next()) {
            (Some(t), Some(r), None) => (t, r),
            _ => {
                return Err(err(
                    line_no,
                    format!(
                        "expected `<base64 token> <rank>`, got {:?}",
                        String::from_utf8_lossy(&line[..line.len().min(80)])
                    ),
                ))
            }
        };
        let bytes = B64.decode(token).map_err(|e| {
            err(
                line_no,
                format!(
                    "token {:?} is not valid base64: {e}",
                    String::from_utf8_lossy(token)
                ),
            )
        })?;
        if bytes.is_empty() {
            return Err(err(line_no, "empty token".into()));
        }
        let rank_str = std::str::from_utf8(rank).unwrap_or("");
        let rank: Rank = rank_str
            .parse()
            .ok()
            .filter(|&r: &Rank| r < MAX_RANK)
            .ok_or_else(|| {
                err(
                    line_no,
                    format!(
                        "rank {:?} is not an integer in 0..{}",
                        String::from_utf8_lossy(rank),
                        MAX_RANK
                    ),
                )
            })?;
        let (word, bit) = ((rank / 64) as usize, rank % 64);
        if word >= seen_rank.len() {
            seen_rank.resize(word + 1, 0);
        }
        if seen_rank[word] & (1 << bit) != 0 {
            return Err(err(line_no, format!("rank {rank} appears twice")));
        }
        seen_rank[word] |= 1 << bit;
        if ranks.insert(bytes, rank).is_some() {
            return Err(err(
                line_no,
                format!("token {:?} appears twice", String::from_utf8_lossy(token)),
            ));
        }
    }
    Ok(ranks)
}

/// Reads a tiktoken rank file.
pub fn load_tiktoken_file(path: &Path) -> Result<FxHashMap<Vec<u8>, Rank>> {
    let data = std::fs::read(path).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })?;
    parse_rank_lines(&data, &path.display().to_string(), 1)
}

/// Writes rank lines (`<base64> <rank>\n`) in rank order.
fn write_rank_lines(bpe: &CoreBPE, out: &mut Vec<u8>) {
    for (bytes, rank) in bpe.ranks_in_order() {
        out.extend_from_slice(B64.encode(bytes).as_bytes());
        out.push(b' ');
        out.extend_from_slice(rank.to_string().as_bytes());
        out.push(b'\n');
    }
}

/// The sftfast tokenizer file for `bpe`, as bytes.
pub fn to_tokenizer_file(bpe: &CoreBPE) -> Vec<u8> {
    let header = serde_json::json!({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "pattern": bpe.pattern(),
        "special_tokens": bpe.specials().iter().map(|(n, id)| serde_json::json!([n, id])).collect::<Vec<_>>(),
        // checked on load: a file cut short at a line boundary, or with a line lost, would
        // otherwise load and encode differently without a word
        "n_ranks": bpe.ranks_in_order().count(), // the lines below (ranks may have holes)
    });
    let mut out = serde_json::to_vec(&header).expect("a JSON value always serializes");
    out.push(b'\n');
    write_rank_lines(bpe, &mut out);
    out
}

/// Writes the tokenizer file atomically (temporary file in the same directory, then rename).
pub fn save_tokenizer(bpe: &CoreBPE, path: &Path) -> Result<()> {
    let data = to_tokenizer_file(bpe);
    let io_err = |e: std::io::Error| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Other(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// Parses a tokenizer file's bytes; `path` only labels errors.
pub fn parse_tokenizer_file(data: &[u8], path: &str) -> Result<CoreBPE> {
    let err = |line: usize, reason: String| Error::RankFile {
        path: path.to_string(),
        line,
        reason,
    };
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let header: serde_json::Value = serde_json::from_slice(&data[..split])
        .map_err(|e| err(1, format!("the header is not a JSON object: {e}")))?;
    if header.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
        return Err(err(
            1,
            format!("not an sftfast tokenizer file (no \"format\": \"{FORMAT_NAME}\")"),
        ));
    }
    match header.get("version").and_then(|v| v.as_u64()) {
        Some(FORMAT_VERSION) => {}
        v => {
            return Err(err(
                1,
                format!("unsupported version {v:?} (this build reads version {FORMAT_VERSION})"),
            ))
        }
    }
    let pattern = header
        .get("pattern")
        .and_then(|v| v.as_str())
        .ok_or_else(|| err(1, "\"pattern\" must be a string".into()))?;
    let mut specials = Vec::new();
    let list = header
        .get("special_tokens")
        .and_then(|v| v.as_array())
        .ok_or_else(|| {
            err(
                1,
                "\"special_tokens\" must be a list of [name, id] pairs".into(),
            )
        })?;
    for (i, item) in list.iter().enumerate() {
        let pair = item.as_array().filter(|a| a.len() == 2);
        let name = pair.and_then(|a| a[0].as_str());
        let id = pair
            .and_then(|a| a[1].as_u64())
            .filter(|&id| id < Rank::MAX as u64);
        match (name, id) {
            (Some(name), Some(id)) => specials.push((name.to_string(), id as Rank)),
            _ => {
                return Err(err(
                    1,
                    format!("special_tokens[{i}] must be [name, id], got {item}"),
                ))
            }
        }
    }
    let rest = if split < data.len() {
        &data[split + 1..]
    } else {
        &[][..]
    };
    let ranks = parse_rank_lines(rest, path, 2)?;
    // files written before the count was recorded have none: nothing to compare
    if let Some(expected) = header.get("n_ranks") {
        if expected.as_u64() != Some(ranks.len() as u64) {
            return Err(err(
                1,
                format!(
                    "the header says {expected} rank lines but the file holds {}: it was cut short or edited",
                    ranks.len()
                ),
            ));
        }
    }
    CoreBPE::new(ranks, pattern, specials)
}

pub fn load_tokenizer(path: &Path) -> Result<CoreBPE> {
    let data = std::fs::read(path).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })?;
    parse_tokenizer_file(&data, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::NANOCHAT_PATTERN;

    #[test]
    fn a_cut_or_edited_file_is_refused() {
        let ranks: FxHashMap<Vec<u8>, Rank> = (0..=255u8).map(|b| (vec![b], b as Rank)).collect();
        let bpe = CoreBPE::new(ranks, NANOCHAT_PATTERN, vec![("<|bos|>".into(), 256)]).unwrap();
        let file = to_tokenizer_file(&bpe);
        assert_eq!(parse_tokenizer_file(&file, "t").unwrap().n_ranks(), 256);
        let text = String::from_utf8(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for damaged in [
            lines[..200].join("\n"),
            [&lines[..50], &lines[51..]].concat().join("\n"),
        ] {
            let e = parse_tokenizer_file(damaged.as_bytes(), "t")
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("cut short or edited"), "{e}");
        }
    }

    fn line_of(e: Error) -> usize {
        match e {
            Error::RankFile { line, .. } => line,
            other => panic!("expected a RankFile error, got {other}"),
        }
    }

    #[test]
    fn rank_file_errors_name_the_line() {
        assert_eq!(
            parse_rank_lines(b"YQ== 0\nYg== 1\n", "f", 1).unwrap().len(),
            2
        );
        // (file contents, first line number, line the error must name)
        let bad: [(&[u8], usize, usize); 7] = [
            (b"YQ== 0\n\nYg==\n", 1, 3),
            (b"YQ== 0\n!!!! 1\n", 1, 2),
            (b"YQ== 0\nYg== 3000000000\n", 1, 2),
            (b"YQ== x\n", 1, 1),
            (b"YQ== 0\nYg== 0\n", 1, 2),
            (b"YQ== 0\nYQ== 1\n", 1, 2),
            (b"YQ== 0 1\n", 5, 5),
        ];
        for (text, first, line) in bad {
            assert_eq!(
                line_of(parse_rank_lines(text, "f", first).unwrap_err()),
                line
            );
        }
        let msg = parse_rank_lines(b"YQ== -3\n", "vocab.tiktoken", 1)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("vocab.tiktoken:1:"), "{msg}");
    }

    #[test]
    fn tokenizer_file_round_trip() {
        let mut ranks: FxHashMap<Vec<u8>, Rank> = (0u32..256).map(|b| (vec![b as u8], b)).collect();
        ranks.insert(b"ab".to_vec(), 256);
        let bpe = CoreBPE::new(ranks, NANOCHAT_PATTERN, vec![("<|bos|>".into(), 257)]).unwrap();
        let data = to_tokenizer_file(&bpe);
        let back = parse_tokenizer_file(&data, "t").unwrap();
        assert_eq!(back.pattern(), NANOCHAT_PATTERN);
        assert_eq!(back.specials(), bpe.specials());
        assert_eq!(back.encoder(), bpe.encoder());
        let bad = String::from_utf8(data)
            .unwrap()
            .replacen("YWI= 256", "YWI= zz", 1);
        assert_eq!(
            line_of(parse_tokenizer_file(bad.as_bytes(), "t").err().unwrap()),
            2 + 256
        );
        assert_eq!(
            line_of(parse_tokenizer_file(b"{}\n", "t").err().unwrap()),
            1
        );
    }
}
