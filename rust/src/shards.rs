//! Preprocessed, memory-mapped shards of rendered conversations (issue 4, SPEC 4/7/9).
//!
//! A shard is a directory:
//!
//! | file            | contents                                                        |
//! |-----------------|-----------------------------------------------------------------|
//! | `ids.u32`       | token ids of every conversation, concatenated, little-endian u32 |
//! | `mask.u8`       | loss mask, one byte (0/1) per token, aligned with `ids.u32`      |
//! | `offsets.u64`   | n+1 little-endian u64: conversation i is tokens `[off[i], off[i+1])` |
//! | `manifest.json` | format version, counts, per-source stats, plus what the caller adds (tokenizer fingerprint, renderer version, source hashes, cache key) |
//! | `bad_records.txt` | only with `OnError::Skip`: one `location: reason` line per skipped record |
//!
//! Everything is written under a temporary sibling directory and renamed into place
//! only after every file is flushed and synced, the manifest last: a crash leaves a
//! `.NAME.tmp-*` directory, never a directory named NAME that looks whole.
//!
//! Performance notes (2-core x86_64 VM, cl100k, 41.6 MB of JSONL; docs/BENCHMARKS.md):
//! - Input is read in chunks of lines (4,096 lines or 16 MiB), read straight into one
//!   buffer per chunk; each chunk is parsed and rendered in parallel with rayon
//!   (`par_iter().map().collect()` keeps order), then appended sequentially. Peak RSS of a
//!   build measured 77.7 / 78.6 / 79.4 MiB for 1x / 10x / 40x input.
//! - Measured: 13 M tokens per CPU-second on one thread vs 1 M for json + tiktoken + Python
//!   rendering. `perf`: BPE encoding ~35% (rank lookups), JSON -> `Value` ~3%, shard writes
//!   ~1%. With the fancy-regex pre-split (before the hand-written scanners) the same
//!   pipeline did 0.39 M tokens/s, and `regex_automata` pool `get_slow` showed up because
//!   the regex is used from rayon threads that did not create it.
//! - Not done, on purpose: deserializing straight into `chat::Conversation` (skipping
//!   `serde_json::Value`) would save part of the ~3%; overlapping the append of chunk k
//!   with rendering chunk k+1 would save the ~1% of writes. Neither is worth the code yet.
//! - Truncation is detected by rendering to `max_tokens + 1` (`chat::render_into` stops
//!   encoding at its limit), so long conversations cost only what is kept.
//! - The mask is one byte per token, not packed bits: it costs 1/5 of the shard but
//!   lets NumPy / the packer read it as a zero-copy view with no unpacking.
//! - Writes go through 1 MiB `BufWriter`s; the u32 to little-endian conversion is a plain
//!   loop into a reused byte buffer (a memcpy on little-endian hosts).

use crate::bpe::CoreBPE;
use crate::chat::{self, ChatTokens, Conversation};
use crate::error::{Error, Result};
use crate::pack::MAX_ID;
use memmap2::Mmap;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FORMAT_VERSION: u64 = 1;
pub const IDS_FILE: &str = "ids.u32";
pub const MASK_FILE: &str = "mask.u8";
pub const OFFSETS_FILE: &str = "offsets.u64";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const REPORT_FILE: &str = "bad_records.txt";

/// What to do with a record that does not parse or render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Stop at the first bad record (in input order) with its location and reason.
    Fail,
    /// Write `location: reason` to the report file, count it, go on.
    Skip,
}

impl std::str::FromStr for OnError {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            _ => Err(Error::Other(format!(
                "on_error must be 'fail' or 'skip', got {s:?}"
            ))),
        }
    }
}

/// One rendered conversation: ids and mask (same length, already truncated), and whether
/// truncation cut it (so truncation is counted, never silent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub truncated: bool,
}

/// How a record's position prints: `file:line` for line-based inputs (JSONL),
/// `name[index]` for indexed ones (JSON arrays, datasets, mixtures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocKind {
    Line,
    Index,
}

pub fn format_location(label: &str, kind: LocKind, pos: u64) -> String {
    match kind {
        LocKind::Line => format!("{label}:{pos}"),
        LocKind::Index => format!("{label}[{pos}]"),
    }
}

/// Per-source counts, written into the manifest.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SourceStats {
    pub name: String,
    /// Conversations of this source occupy `[first, first + conversations)` in the shard.
    pub first: u64,
    pub conversations: u64,
    pub tokens: u64,
    pub supervised_tokens: u64,
    pub truncated: u64,
    pub skipped: u64,
}

/// What one call to `process` did (for progress bars).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub records: u64,
    pub conversations: u64,
    pub tokens: u64,
    pub skipped: u64,
}

// ---------------------------------------------------------------------------------------
// Writer

fn le_u32_bytes(src: &[u32], buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(src.len() * 4);
    for &x in src {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

fn create_buffered(path: &Path) -> Result<BufWriter<File>> {
    let f = File::create(path).map_err(|e| io_err(path, e))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

/// Appends conversations to a temporary directory; `finish` makes it the shard.
pub struct ShardWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    ids: BufWriter<File>,
    mask: BufWriter<File>,
    offsets: BufWriter<File>,
    report: Option<BufWriter<File>>,
    n_tokens: u64,
    n_conversations: u64,
    scratch: Vec<u8>,
    finished: bool,
}

impl ShardWriter {
    /// Starts a shard that will become `final_dir`. The temporary directory is a sibling
    /// (same filesystem, so the final rename is atomic).
    pub fn create(final_dir: &Path) -> Result<Self> {
        let name = final_dir
            .file_name()
            .ok_or_else(|| {
                Error::Other(format!(
                    "{}: output path has no directory name",
                    final_dir.display()
                ))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match final_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp_dir = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
        fs::create_dir(&tmp_dir).map_err(|e| io_err(&tmp_dir, e))?;
        let mut offsets = create_buffered(&tmp_dir.join(OFFSETS_FILE))?;
        offsets.write_all(&0u64.to_le_bytes())?;
        Ok(Self {
            final_dir: final_dir.to_path_buf(),
            ids: create_buffered(&tmp_dir.join(IDS_FILE))?,
            mask: create_buffered(&tmp_dir.join(MASK_FILE))?,
            offsets,
            report: None,
            tmp_dir,
            n_tokens: 0,
            n_conversations: 0,
            scratch: Vec::new(),
            finished: false,
        })
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }

    pub fn n_conversations(&self) -> u64 {
        self.n_conversations
    }

    pub fn push(&mut self, ids: &[u32], mask: &[u8]) -> Result<()> {
        if ids.len() != mask.len() {
            return Err(Error::Other(format!(
                "conversation {}: {} ids but {} mask values",
                self.n_conversations,
                ids.len(),
                mask.len()
            )));
        }
        le_u32_bytes(ids, &mut self.scratch);
        self.ids.write_all(&self.scratch)?;
        self.mask.write_all(mask)?;
        self.n_tokens += ids.len() as u64;
        self.n_conversations += 1;
        self.offsets.write_all(&self.n_tokens.to_le_bytes())?;
        Ok(())
    }

    /// Records a skipped record in `bad_records.txt` (created on first use); `line` is the
    /// error, which starts with the record's location.
    pub fn report_bad(&mut self, line: &str) -> Result<()> {
        if self.report.is_none() {
            self.report = Some(create_buffered(&self.tmp_dir.join(REPORT_FILE))?);
        }
        let w = self.report.as_mut().expect("report was just created");
        // One line per record: newlines inside a reason would break that.
        writeln!(w, "{}", line.replace('\n', "\\n"))?;
        Ok(())
    }

    /// Flushes and syncs every file, writes the manifest (last), and renames the
    /// temporary directory to the final name, replacing an existing shard there.
    pub fn finish(mut self, manifest: &Value) -> Result<PathBuf> {
        for w in [&mut self.ids, &mut self.mask, &mut self.offsets] {
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        if let Some(w) = self.report.as_mut() {
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        let manifest_path = self.tmp_dir.join(MANIFEST_FILE);
        {
            let mut f = File::create(&manifest_path).map_err(|e| io_err(&manifest_path, e))?;
            let text =
                serde_json::to_string_pretty(manifest).map_err(|e| Error::Other(e.to_string()))?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        // An existing shard (stale or invalidated) is moved aside first, then removed, so
        // the name always points at a whole shard or at nothing.
        let mut old = None;
        if self.final_dir.exists() {
            let mut aside = self.tmp_dir.clone().into_os_string();
            aside.push(".old");
            let aside = PathBuf::from(aside);
            fs::rename(&self.final_dir, &aside).map_err(|e| io_err(&self.final_dir, e))?;
            old = Some(aside);
        }
        if let Err(e) = fs::rename(&self.tmp_dir, &self.final_dir) {
            // Someone else put a directory there meanwhile (two runs racing): put ours back
            // where it was, if the name is free again, and report.
            if let Some(old) = &old {
                let _ = fs::rename(old, &self.final_dir);
            }
            return Err(io_err(&self.final_dir, e));
        }
        if let Some(parent) = self.final_dir.parent() {
            if let Ok(d) = File::open(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            }) {
                let _ = d.sync_all();
            }
        }
        self.finished = true;
        if let Some(old) = old {
            fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
        }
        Ok(self.final_dir.clone())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading inputs

/// Streams a JSONL file in chunks of whole lines; remembers line numbers (1-based).
pub struct JsonlReader {
    path: String,
    reader: BufReader<File>,
    next_line: u64,
    bytes_read: u64,
    total_bytes: u64,
    done: bool,
}

/// A chunk of raw records: one byte buffer and, per record, its position and byte range.
#[derive(Default)]
pub struct Chunk {
    pub buf: Vec<u8>,
    pub records: Vec<(u64, usize, usize)>,
}

impl Chunk {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.records.clear();
    }
    pub fn push(&mut self, pos: u64, bytes: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        self.records.push((pos, start, self.buf.len()));
    }
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl JsonlReader {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| io_err(path, e))?;
        let total_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.display().to_string(),
            reader: BufReader::with_capacity(1 << 20, f),
            next_line: 1,
            bytes_read: 0,
            total_bytes,
            done: false,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Fills `chunk` with up to `max_records` non-blank lines or about `max_bytes` bytes.
    /// Returns false once the file is exhausted and nothing was read.
    pub fn read_chunk(
        &mut self,
        chunk: &mut Chunk,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<bool> {
        chunk.clear();
        while !self.done && chunk.len() < max_records && chunk.buf.len() < max_bytes {
            // Lines are read straight into the chunk's buffer (no per-line allocation).
            let start = chunk.buf.len();
            let n = self.reader.read_until(b'\n', &mut chunk.buf).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("{}:{}: {e}", self.path, self.next_line),
                ))
            })?;
            if n == 0 {
                self.done = true;
                break;
            }
            self.bytes_read += n as u64;
            // A UTF-8 byte-order mark (written by some Windows tools) is not part of the record.
            if self.next_line == 1 && chunk.buf[start..].starts_with(UTF8_BOM) {
                chunk.buf.drain(start..start + UTF8_BOM.len());
            }
            // Lines end as Python's text mode ends them (the training loader reads JSONL that
            // way, as nanochat does): at "\n", "\r\n" or a lone "\r", so both count the same
            // lines and read the same records.
            let end = chunk.buf.len();
            let mut line_start = start;
            let mut kept = start; // records are compacted over the blank lines dropped
            while line_start < end {
                let line_end = line_end(&chunk.buf[line_start..end]) + line_start;
                let pos = self.next_line;
                self.next_line += 1;
                // Blank lines are not records (a trailing newline, spacing between records).
                // A record is its line without the terminator, so that a parse error's
                // position is in the line ("line 1 column 65"), never past it ("line 2").
                let text_end = line_start + text_len(&chunk.buf[line_start..line_end]);
                if !is_blank(&chunk.buf[line_start..text_end]) {
                    chunk.buf.copy_within(line_start..text_end, kept);
                    chunk
                        .records
                        .push((pos, kept, kept + text_end - line_start));
                    kept += text_end - line_start;
                }
                line_start = line_end;
            }
            chunk.buf.truncate(kept);
        }
        Ok(!chunk.is_empty())
    }
}

/// Length of the first line of `bytes`, its terminator included: up to the first "\n", or
/// a "\r" not followed by "\n", or all of it.
fn line_end(bytes: &[u8]) -> usize {
    match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
        None => bytes.len(),
        Some(at) if bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n') => at + 2,
        Some(at) => at + 1,
    }
}

/// The length of a line without its terminator ("\n", "\r\n" or "\r").
fn text_len(line: &[u8]) -> usize {
    let mut n = line.len();
    if n > 0 && line[n - 1] == b'\n' {
        n -= 1;
    }
    if n > 0 && line[n - 1] == b'\r' {
        n -= 1;
    }
    n
}

/// Whether a line holds only whitespace as Python's `str.strip()` sees it (Unicode white
/// space and the separators U+001C-U+001F): the loader skips such lines, so prep does too.
fn is_blank(line: &[u8]) -> bool {
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return true; // the usual case, without decoding
    }
    match std::str::from_utf8(line) {
        Ok(text) => text
            .chars()
            .all(|c| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)),
        Err(_) => false,
    }
}

const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

/// Splits a JSON document (an array of conversations, or one conversation) into records
/// positioned by index. The whole file is parsed: JSON arrays do not stream.
pub fn read_json_file(path: &Path) -> Result<Vec<Value>> {
    let mut text = Vec::new();
    File::open(path)
        .map_err(|e| io_err(path, e))?
        .read_to_end(&mut text)?;
    let body = text.strip_prefix(UTF8_BOM).unwrap_or(&text);
    let value: Value = chat::parse_json(body).map_err(|e| Error::Record {
        location: format!("{}:{}", path.display(), e.line()),
        reason: chat::json_error_reason(&e),
    })?;
    Ok(match value {
        Value::Array(items) => {
            // An array whose items are messages (objects with "role") is one conversation.
            let is_messages = !items.is_empty() && items.iter().all(|m| m.get("role").is_some());
            if is_messages {
                vec![Value::Array(items)]
            } else {
                items
            }
        }
        other => vec![other],
    })
}

// ---------------------------------------------------------------------------------------
// The pipeline: records -> parallel render -> ordered append

/// Renders one raw record (JSON bytes) or says why it cannot be rendered.
/// `location` names the record in errors (`file:line`, `name[index]`).
pub trait RecordRenderer: Sync {
    fn render_bytes(&self, bytes: &[u8], location: &str) -> Result<Rendered>;
    fn render_value(&self, value: &Value, location: &str) -> Result<Rendered>;
}

/// The production renderer: JSON -> `chat::Conversation` -> ids and mask (SPEC 2).
pub struct ChatRenderer {
    bpe: Arc<CoreBPE>,
    tokens: ChatTokens,
    max_tokens: usize,
}

impl ChatRenderer {
    pub fn new(bpe: Arc<CoreBPE>, max_tokens: usize) -> Result<Self> {
        if max_tokens == 0 {
            return Err(Error::Other("max_tokens must be at least 1".into()));
        }
        let tokens = ChatTokens::from_bpe(&bpe)?;
        Ok(Self {
            bpe,
            tokens,
            max_tokens,
        })
    }
}

/// Renders a validated conversation, truncated to `max_tokens`, noting whether it was cut.
pub fn render_truncating(
    bpe: &CoreBPE,
    tokens: &ChatTokens,
    conv: &Conversation,
    max_tokens: usize,
) -> Rendered {
    // One token past the limit tells truncation apart from an exact fit; `render_into`
    // stops encoding there, so long conversations cost only what is kept.
    let mut ids = Vec::with_capacity(256);
    let mut mask = Vec::with_capacity(256);
    chat::render_into(
        bpe,
        tokens,
        conv,
        max_tokens.saturating_add(1),
        &mut ids,
        &mut mask,
    );
    let truncated = ids.len() > max_tokens;
    ids.truncate(max_tokens);
    mask.truncate(max_tokens);
    Rendered {
        ids,
        mask,
        truncated,
    }
}

impl RecordRenderer for ChatRenderer {
    fn render_bytes(&self, bytes: &[u8], location: &str) -> Result<Rendered> {
        let value: Value = chat::parse_json(bytes).map_err(|e| Error::Conversation {
            location: location.to_string(),
            message: "-".into(),
            reason: chat::json_error_reason(&e),
        })?;
        self.render_value(&value, location)
    }

    fn render_value(&self, value: &Value, location: &str) -> Result<Rendered> {
        let conv = chat::parse_json_conversation(value, location)?;
        check_training_record(value, location)?;
        Ok(render_truncating(
            &self.bpe,
            &self.tokens,
            &conv,
            self.max_tokens,
        ))
    }
}

/// What the training loader's JSONL reader (sftfast.tasks.CustomJSON) also refuses, on top of
/// the renderer's rules, so that prep and the loader train on the same records: a message or
/// part field that rendering would drop (`"weight": 0` means "do not train on this turn" in
/// some formats; dropping it silently would train on it), other than a message's `name` or a
/// null; and a conversation without an assistant message (nothing to learn). `value` has
/// passed `chat::parse_json_conversation`.
fn check_training_record(value: &Value, location: &str) -> Result<()> {
    let messages = match value {
        Value::Object(obj) => obj.get("messages").and_then(Value::as_array),
        Value::Array(a) => Some(a),
        _ => None,
    };
    let messages = messages.map(Vec::as_slice).unwrap_or_default();
    let dropped = |obj: &Map<String, Value>,
                   rendered: [&str; 2],
                   ignored: &[&str]|
     -> Vec<String> {
        obj.iter()
            .filter(|(k, v)| {
                !rendered.contains(&k.as_str()) && !ignored.contains(&k.as_str()) && !v.is_null()
            })
            .map(|(k, _)| format!("{k:?}"))
            .collect()
    };
    let mut has_assistant = false;
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else { continue };
        let extra = dropped(obj, ["role", "content"], &["name"]);
        if !extra.is_empty() {
            return Err(chat::conv_err(
                location,
                i,
                format!("field(s) {} are not rendered (only \"role\" and \"content\" are; \"name\" is ignored): refusing to drop them", extra.join(", ")),
            ));
        }
        has_assistant |= obj.get("role").and_then(Value::as_str) == Some("assistant");
        for (j, part) in obj
            .get("content")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let extra = part
                .as_object()
                .map(|p| dropped(p, ["type", "text"], &[]))
                .unwrap_or_default();
            if !extra.is_empty() {
                return Err(chat::conv_err(
                    location,
                    i,
                    format!("part {j}: field(s) {} are not rendered (only \"type\" and \"text\" are): refusing to drop them", extra.join(", ")),
                ));
            }
        }
    }
    if !has_assistant {
        return Err(chat::conv_err(
            location,
            "-",
            "no assistant message: nothing to train on",
        ));
    }
    Ok(())
}

/// Bumped whenever the renderer's output changes on purpose; part of every shard's cache key.
/// (The probe below catches changes nobody remembered to version.)
pub const RENDERER_VERSION: &str = "sftfast-chat-2"; // 2: prep refuses what the loader refuses

/// Bytes that change whenever rendering changes: the renderer version plus the ids and masks
/// of a fixed set of probe conversations covering every rule of SPEC 2 (system merge, parts,
/// tool output, special-token text, truncation). Hash it for the shard key.
pub fn renderer_probe(bpe: &CoreBPE) -> Result<Vec<u8>> {
    const PROBES: [&str; 4] = [
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12/60?"},
            {"role": "assistant", "content": [{"type": "python", "text": "12/60"}, {"type": "python_output", "text": "0.2"},
            {"type": "text", "text": "The answer is 0.2"}]}]}"#,
        r#"[{"role": "user", "content": "hi <|bos|> there"}, {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok\n\n  done"}]"#,
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a long one that is cut"}, {"role": "assistant", "content": "yes"}]}"#,
    ];
    let tokens = ChatTokens::from_bpe(bpe)?;
    let mut out = RENDERER_VERSION.as_bytes().to_vec();
    for (i, probe) in PROBES.iter().enumerate() {
        let max_tokens = if i == 3 { 5 } else { 1 << 20 };
        let value: Value = serde_json::from_str(probe)
            .map_err(|e| Error::Other(format!("renderer probe {i}: {e}")))?;
        let conv = chat::parse_json_conversation(&value, "renderer probe")?;
        let r = render_truncating(bpe, &tokens, &conv, max_tokens);
        out.extend_from_slice(&(r.ids.len() as u64).to_le_bytes());
        for id in &r.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&r.mask);
        out.push(r.truncated as u8);
    }
    Ok(out)
}

/// Builds one shard from any number of sources, each a stream of records.
pub struct Preprocessor<R: RecordRenderer> {
    renderer: R,
    on_error: OnError,
    writer: Option<ShardWriter>,
    pool: rayon::ThreadPool,
    sources: Vec<SourceStats>,
    max_tokens: usize,
}

impl<R: RecordRenderer> Preprocessor<R> {
    pub fn new(
        out_dir: &Path,
        renderer: R,
        max_tokens: usize,
        on_error: OnError,
        num_threads: usize,
    ) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .thread_name(|i| format!("sftfast-prep-{i}"))
            .build()
            .map_err(|e| Error::Other(format!("cannot start {num_threads} threads: {e}")))?;
        Ok(Self {
            renderer,
            on_error,
            writer: Some(ShardWriter::create(out_dir)?),
            pool,
            sources: Vec::new(),
            max_tokens,
        })
    }

    pub fn num_threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn sources(&self) -> &[SourceStats] {
        &self.sources
    }

    fn writer(&mut self) -> Result<&mut ShardWriter> {
        self.writer
            .as_mut()
            .ok_or_else(|| Error::Other("the shard was already finished or aborted".into()))
    }

    pub fn n_conversations(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.n_conversations())
    }

    pub fn begin_source(&mut self, name: &str) -> Result<()> {
        let first = self.writer()?.n_conversations();
        self.sources.push(SourceStats {
            name: name.to_string(),
            first,
            ..Default::default()
        });
        Ok(())
    }

    /// Appends rendered results in order; the first error stops (Fail) or is reported (Skip).
    fn append(&mut self, label: &str, results: Vec<Result<Rendered>>) -> Result<BatchStats> {
        if self.sources.is_empty() {
            self.begin_source(label)?;
        }
        let on_error = self.on_error;
        let mut batch = BatchStats::default();
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| Error::Other("the shard was already finished".into()))?;
        let stats = self.sources.last_mut().expect("a source was begun");
        for result in results {
            batch.records += 1;
            match result {
                Ok(r) => {
                    writer.push(&r.ids, &r.mask)?;
                    let n = r.ids.len() as u64;
                    stats.conversations += 1;
                    stats.tokens += n;
                    stats.supervised_tokens += r.mask.iter().map(|&m| (m != 0) as u64).sum::<u64>();
                    if r.truncated {
                        stats.truncated += 1;
                    }
                    batch.conversations += 1;
                    batch.tokens += n;
                }
                Err(err) => match on_error {
                    OnError::Fail => return Err(err),
                    OnError::Skip => {
                        writer.report_bad(&err.to_string())?;
                        stats.skipped += 1;
                        batch.skipped += 1;
                    }
                },
            }
        }
        Ok(batch)
    }

    /// Parses and renders a chunk of raw JSON records in parallel, then appends in order.
    pub fn process_chunk(
        &mut self,
        label: &str,
        kind: LocKind,
        chunk: &Chunk,
    ) -> Result<BatchStats> {
        let renderer = &self.renderer;
        let results: Vec<_> = self.pool.install(|| {
            chunk
                .records
                .par_iter()
                .with_min_len(8)
                .map(|&(pos, s, e)| {
                    renderer.render_bytes(&chunk.buf[s..e], &format_location(label, kind, pos))
                })
                .collect()
        });
        self.append(label, results)
    }

    /// Renders already-parsed records (JSON files), positioned by `first_pos + i`.
    pub fn process_values(
        &mut self,
        label: &str,
        kind: LocKind,
        first_pos: u64,
        values: &[Value],
    ) -> Result<BatchStats> {
        let renderer = &self.renderer;
        let results: Vec<_> = self.pool.install(|| {
            values
                .par_iter()
                .enumerate()
                .with_min_len(8)
                .map(|(i, v)| {
                    renderer.render_value(v, &format_location(label, kind, first_pos + i as u64))
                })
                .collect()
        });
        self.append(label, results)
    }

    /// Streams a whole JSONL file (positions are line numbers).
    pub fn process_jsonl(&mut self, path: &Path) -> Result<BatchStats> {
        let mut reader = JsonlReader::open(path)?;
        let label = reader.path().to_string();
        let mut chunk = Chunk::default();
        let mut total = BatchStats::default();
        while reader.read_chunk(&mut chunk, DEFAULT_CHUNK_RECORDS, DEFAULT_CHUNK_BYTES)? {
            let b = self.process_chunk(&label, LocKind::Line, &chunk)?;
            total.records += b.records;
            total.conversations += b.conversations;
            total.tokens += b.tokens;
            total.skipped += b.skipped;
        }
        Ok(total)
    }

    /// The manifest's own part: format, files, counts, per-source stats.
    pub fn core_manifest(&self) -> Value {
        let (n_conv, n_tok) = self
            .writer
            .as_ref()
            .map_or((0, 0), |w| (w.n_conversations(), w.n_tokens()));
        let sum = |f: fn(&SourceStats) -> u64| self.sources.iter().map(f).sum::<u64>();
        serde_json::json!({
            "format": "sftfast-shard",
            "format_version": FORMAT_VERSION,
            "files": {
                "ids": {"name": IDS_FILE, "dtype": "<u4"},
                "mask": {"name": MASK_FILE, "dtype": "|u1"},
                "offsets": {"name": OFFSETS_FILE, "dtype": "<u8"},
            },
            "max_tokens": self.max_tokens,
            "on_error": match self.on_error { OnError::Fail => "fail", OnError::Skip => "skip" },
            "num_conversations": n_conv,
            "num_tokens": n_tok,
            "num_supervised_tokens": sum(|s| s.supervised_tokens),
            "num_truncated": sum(|s| s.truncated),
            "num_skipped": sum(|s| s.skipped),
            "bad_records": if sum(|s| s.skipped) > 0 { Value::from(REPORT_FILE) } else { Value::Null },
            "sources": self.sources,
        })
    }

    /// Writes the manifest (core part merged with `extra`, which wins on conflicts only for
    /// keys the core does not own) and renames the shard into place.
    pub fn finish(&mut self, extra: &Map<String, Value>) -> Result<(PathBuf, Value)> {
        let mut manifest = self.core_manifest();
        let obj = manifest
            .as_object_mut()
            .expect("core manifest is an object");
        for (k, v) in extra {
            if !obj.contains_key(k) {
                obj.insert(k.clone(), v.clone());
            }
        }
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::Other("the shard was already finished".into()))?;
        let dir = writer.finish(&manifest)?;
        Ok((dir, manifest))
    }

    /// Drops the temporary directory; nothing is left behind.
    pub fn abort(&mut self) {
        self.writer.take();
    }
}

pub const DEFAULT_CHUNK_RECORDS: usize = 4096;
pub const DEFAULT_CHUNK_BYTES: usize = 16 << 20;

// ---------------------------------------------------------------------------------------
// Reading shards

/// A shard opened by memory map; `get(i)` borrows straight from the mapped files.
pub struct Shard {
    dir: PathBuf,
    ids: Mmap,
    mask: Mmap,
    offsets: Mmap,
    manifest: Value,
    len: usize,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: shards are immutable once renamed into place (writers only ever create new
    // directories); mapping a file someone truncates underneath us is the usual mmap caveat.
    unsafe { Mmap::map(&f) }.map_err(|e| io_err(path, e))
}

fn bad_shard(dir: &Path, why: String) -> Error {
    Error::Shard(format!(
        "{}: not a valid sftfast shard: {why}",
        dir.display()
    ))
}

impl Shard {
    pub fn open(dir: &Path) -> Result<Self> {
        if cfg!(target_endian = "big") {
            return Err(Error::Other(
                "shards are little-endian; big-endian hosts are not supported".into(),
            ));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read(&manifest_path).map_err(|e| io_err(&manifest_path, e))?;
        let manifest: Value = serde_json::from_slice(&text)
            .map_err(|e| bad_shard(dir, format!("{MANIFEST_FILE}: {e}")))?;
        let version = manifest.get("format_version").and_then(Value::as_u64);
        if version != Some(FORMAT_VERSION) {
            return Err(bad_shard(
                dir,
                match version {
                    Some(v) => format!("format_version {v}, this build reads {FORMAT_VERSION}"),
                    None => format!(
                        "format_version missing or not a number, this build reads {FORMAT_VERSION}"
                    ),
                },
            ));
        }
        let ids = map_file(&dir.join(IDS_FILE))?;
        let mask = map_file(&dir.join(MASK_FILE))?;
        let offsets = map_file(&dir.join(OFFSETS_FILE))?;
        if ids.len() % 4 != 0 || offsets.len() % 8 != 0 || offsets.is_empty() {
            return Err(bad_shard(
                dir,
                "file sizes are not whole u32 / u64 arrays".into(),
            ));
        }
        let n_tokens = ids.len() / 4;
        if mask.len() != n_tokens {
            return Err(bad_shard(
                dir,
                format!("{n_tokens} ids but {} mask bytes", mask.len()),
            ));
        }
        let len = offsets.len() / 8 - 1;
        let shard = Self {
            dir: dir.to_path_buf(),
            ids,
            mask,
            offsets,
            manifest,
            len,
        };
        let expect = |key: &str| shard.manifest.get(key).and_then(Value::as_u64);
        if expect("num_conversations") != Some(len as u64)
            || expect("num_tokens") != Some(n_tokens as u64)
        {
            return Err(bad_shard(
                dir,
                "manifest counts do not match the files".into(),
            ));
        }
        let offs = shard.offsets();
        if offs[0] != 0 || offs[len] != n_tokens as u64 || offs.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad_shard(
                dir,
                "offsets are not a non-decreasing index of the ids".into(),
            ));
        }
        shard.check_content()?;
        Ok(shard)
    }

    /// What the sizes cannot show, checked once here so that no corrupted token reaches a
    /// batch (an id past the vocabulary fails deep inside the model's embedding, or reads out
    /// of bounds on a GPU): every conversation has tokens, every mask byte is 0 or 1 and their
    /// sum is the manifest's supervised count, every id (and the padding `<|bos|>`) is below
    /// the tokenizer's vocabulary size (at most int32's maximum). One vectorised pass over the
    /// maps (~7 ms per 10 M tokens, page-cached); positions are looked up only on the error path.
    fn check_content(&self) -> Result<()> {
        let offs = self.offsets();
        let tokenizer = |key: &str| {
            self.manifest
                .pointer(&format!("/tokenizer/{key}"))
                .and_then(Value::as_u64)
        };
        let id_limit = tokenizer("n_vocab").map_or(MAX_ID as u64 + 1, |v| v.min(MAX_ID as u64 + 1));
        let at = |pos: usize| {
            let conv = offs.partition_point(|&o| o <= pos as u64) - 1;
            format!("conversation {conv}, token {}", pos as u64 - offs[conv])
        };
        if let Some(i) = offs.windows(2).position(|w| w[0] == w[1]) {
            return Err(bad_shard(
                &self.dir,
                format!("conversation {i} has no tokens"),
            ));
        }
        if let Some(bos) = tokenizer("bos_id") {
            if bos >= id_limit {
                return Err(bad_shard(
                    &self.dir,
                    format!(
                        "the manifest's bos_id {bos} is not below the vocabulary size {id_limit}"
                    ),
                ));
            }
        }
        let mask = self.all_mask();
        let (mask_or, ones) = mask
            .iter()
            .fold((0u8, 0u64), |(a, n), &m| (a | m, n + m as u64));
        if mask_or > 1 {
            let k = mask.iter().position(|&m| m > 1).unwrap_or(0);
            return Err(bad_shard(
                &self.dir,
                format!("{}: mask byte {} (must be 0 or 1)", at(k), mask[k]),
            ));
        }
        if let Some(want) = self
            .manifest
            .get("num_supervised_tokens")
            .and_then(Value::as_u64)
        {
            if want != ones {
                return Err(bad_shard(
                    &self.dir,
                    format!("{MASK_FILE} has {ones} supervised tokens, the manifest says {want}"),
                ));
            }
        }
        let ids = self.all_ids();
        if ids
            .iter()
            .copied()
            .max()
            .is_some_and(|m| m as u64 >= id_limit)
        {
            let k = ids.iter().position(|&x| x as u64 >= id_limit).unwrap_or(0);
            return Err(bad_shard(
                &self.dir,
                format!(
                    "{}: id {} is not below the vocabulary size {id_limit}",
                    at(k),
                    ids[k]
                ),
            ));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn manifest(&self) -> &Value {
        &self.manifest
    }
    pub fn n_tokens(&self) -> usize {
        self.ids.len() / 4
    }

    pub fn offsets(&self) -> &[u64] {
        // SAFETY: mmaps are page-aligned, the length is a multiple of 8 (checked in open),
        // and the host is little-endian (checked in open).
        unsafe {
            std::slice::from_raw_parts(self.offsets.as_ptr() as *const u64, self.offsets.len() / 8)
        }
    }

    pub fn all_ids(&self) -> &[u32] {
        // SAFETY: as in `offsets`.
        unsafe { std::slice::from_raw_parts(self.ids.as_ptr() as *const u32, self.ids.len() / 4) }
    }

    pub fn all_mask(&self) -> &[u8] {
        &self.mask
    }

    /// Conversation i: (ids, mask), borrowed from the maps.
    pub fn get(&self, i: usize) -> Result<(&[u32], &[u8])> {
        if i >= self.len {
            return Err(Error::Shard(format!(
                "conversation index {i} out of range (shard has {})",
                self.len
            )));
        }
        let offs = self.offsets();
        let (s, e) = (offs[i] as usize, offs[i + 1] as usize);
        Ok((&self.all_ids()[s..e], &self.mask[s..e]))
    }

    /// Length in tokens of every conversation.
    pub fn lengths(&self) -> Vec<u32> {
        self.offsets()
            .windows(2)
            .map(|w| (w[1] - w[0]) as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy renderer for format tests: a record is a JSON array of small ints; negative
    /// numbers are masked, the value "bad" is an error, and output is truncated at 5.
    struct Toy;
    impl RecordRenderer for Toy {
        fn render_bytes(&self, bytes: &[u8], location: &str) -> Result<Rendered> {
            let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::Record {
                location: location.into(),
                reason: format!("invalid JSON: {e}"),
            })?;
            self.render_value(&v, location)
        }
        fn render_value(&self, v: &Value, location: &str) -> Result<Rendered> {
            let bad = |reason: &str| Error::Record {
                location: location.into(),
                reason: reason.into(),
            };
            let arr = v.as_array().ok_or_else(|| bad("not an array"))?;
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            for x in arr {
                let x = x.as_i64().ok_or_else(|| bad("not an int"))?;
                ids.push(x.unsigned_abs() as u32);
                mask.push((x < 0) as u8);
            }
            let truncated = ids.len() > 5;
            ids.truncate(5);
            mask.truncate(5);
            Ok(Rendered {
                ids,
                mask,
                truncated,
            })
        }
    }

    /// A fresh directory, removed with everything in it when the test drops it.
    fn tmp(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("sftfast-shards-test-{name}-"))
            .tempdir()
            .unwrap()
    }

    /// A whole Toy shard of two records, `first` and [4, 5], that opens: (its directory,
    /// the shard's path, its manifest). Tests then damage one file at a time.
    fn toy_shard(
        name: &str,
        first: [i64; 3],
        extra: &Map<String, Value>,
    ) -> (tempfile::TempDir, PathBuf, Value) {
        let dir = tmp(name);
        let out = dir.path().join("shard");
        let mut p = Preprocessor::new(&out, Toy, 5, OnError::Fail, 1).unwrap();
        let records = [serde_json::json!(first), serde_json::json!([4, 5])];
        p.process_values("x", LocKind::Index, 0, &records).unwrap();
        let (_, manifest) = p.finish(extra).unwrap();
        assert!(Shard::open(&out).is_ok());
        (dir, out, manifest)
    }

    fn leftovers(parent: &Path) -> Vec<String> {
        fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn jsonl_round_trip_with_truncation_and_blank_lines() {
        let dir = tmp("rt");
        let d = dir.path();
        let input = d.join("in.jsonl");
        fs::write(&input, "[1,-2,3]\n\n[4]\n[1,2,3,4,5,6,7]\n").unwrap();
        let out = d.join("shard");
        let mut p = Preprocessor::new(&out, Toy, 5, OnError::Fail, 2).unwrap();
        p.begin_source("in").unwrap();
        let b = p.process_jsonl(&input).unwrap();
        assert_eq!(
            b,
            BatchStats {
                records: 3,
                conversations: 3,
                tokens: 9,
                skipped: 0
            }
        );
        let (_, m) = p.finish(&Map::new()).unwrap();
        assert_eq!(m["num_truncated"], 1);
        assert_eq!(m["num_supervised_tokens"], 1);
        let s = Shard::open(&out).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(0).unwrap(), (&[1u32, 2, 3][..], &[0u8, 1, 0][..]));
        assert_eq!(s.get(1).unwrap(), (&[4u32][..], &[0u8][..]));
        assert_eq!(s.get(2).unwrap().0, &[1u32, 2, 3, 4, 5]);
        assert_eq!(s.lengths(), vec![3, 1, 5]);
        assert!(s.get(3).is_err());
        assert!(leftovers(d).is_empty());
    }

    #[test]
    fn fail_names_first_bad_line_and_leaves_nothing() {
        let dir = tmp("fail");
        let d = dir.path();
        let input = d.join("in.jsonl");
        // Bad lines 2 and 4: the error must name line 2 even though chunks render in parallel.
        let mut text = String::from("[1]\n{\"x\": 1}\n[2]\nnot json\n");
        for _ in 0..5000 {
            text.push_str("[3,4]\n");
        }
        fs::write(&input, text).unwrap();
        let out = d.join("shard");
        let mut p = Preprocessor::new(&out, Toy, 5, OnError::Fail, 2).unwrap();
        let err = p.process_jsonl(&input).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:2: not an array", input.display())),
            "{err}"
        );
        drop(p);
        assert!(!out.exists());
        assert!(leftovers(d).is_empty());
    }

    #[test]
    fn skip_reports_every_bad_record() {
        let dir = tmp("skip");
        let d = dir.path();
        let input = d.join("in.jsonl");
        fs::write(&input, "[1]\n{\"x\": 1}\n[2]\nnot json\n[5]\n").unwrap();
        let out = d.join("shard");
        let mut p = Preprocessor::new(&out, Toy, 5, OnError::Skip, 1).unwrap();
        let b = p.process_jsonl(&input).unwrap();
        assert_eq!((b.conversations, b.skipped), (3, 2));
        let (_, m) = p.finish(&Map::new()).unwrap();
        assert_eq!(m["num_skipped"], 2);
        let report = fs::read_to_string(out.join(REPORT_FILE)).unwrap();
        let lines: Vec<_> = report.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&format!("{}:2: not an array", input.display())));
        assert!(lines[1].starts_with(&format!("{}:4: invalid JSON", input.display())));
        assert_eq!(Shard::open(&out).unwrap().len(), 3);
    }

    #[test]
    fn values_sources_and_replacement() {
        let dir = tmp("values");
        let d = dir.path();
        let out = d.join("shard");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("stale"), "x").unwrap();
        let mut p = Preprocessor::new(&out, Toy, 5, OnError::Skip, 2).unwrap();
        p.begin_source("a").unwrap();
        let vals: Vec<Value> = vec![serde_json::json!([1, 2]), serde_json::json!("no")];
        p.process_values("a.json", LocKind::Index, 0, &vals)
            .unwrap();
        p.begin_source("b").unwrap();
        p.process_values("b", LocKind::Index, 10, &[serde_json::json!([-7])])
            .unwrap();
        let mut extra = Map::new();
        extra.insert("key".into(), Value::from("abc"));
        extra.insert("num_tokens".into(), Value::from(999)); // core-owned: ignored
        let (_, m) = p.finish(&extra).unwrap();
        assert_eq!(m["key"], "abc");
        assert_eq!(m["num_tokens"], 3);
        assert_eq!(m["sources"][0]["conversations"], 1);
        assert_eq!(m["sources"][0]["skipped"], 1);
        assert_eq!(m["sources"][1]["first"], 1);
        assert!(!out.join("stale").exists());
        let report = fs::read_to_string(out.join(REPORT_FILE)).unwrap();
        assert!(report.starts_with("a.json[1]: not an array"), "{report}");
        assert!(leftovers(d).is_empty());
    }

    #[test]
    fn open_rejects_inconsistent_files() {
        let dir = tmp("bad");
        let d = dir.path();
        let out = d.join("shard");
        let mut p = Preprocessor::new(&out, Toy, 5, OnError::Fail, 1).unwrap();
        p.process_values("x", LocKind::Index, 0, &[serde_json::json!([1, 2, 3])])
            .unwrap();
        p.finish(&Map::new()).unwrap();
        fs::write(out.join(MASK_FILE), [0u8, 1]).unwrap();
        let err = Shard::open(&out).err().unwrap().to_string();
        assert!(err.contains("3 ids but 2 mask bytes"), "{err}");
        assert!(Shard::open(&d.join("missing")).is_err());
    }

    #[test]
    fn open_checks_the_contents() {
        let mut extra = Map::new();
        extra.insert(
            "tokenizer".into(),
            serde_json::json!({"n_vocab": 10, "bos_id": 1}),
        );
        let (_dir, out, manifest) = toy_shard("content", [1, -2, 3], &extra);
        let open_err = |ids: &[u32], mask: &[u8], manifest: &Value| {
            let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
            fs::write(out.join(IDS_FILE), bytes).unwrap();
            fs::write(out.join(MASK_FILE), mask).unwrap();
            fs::write(out.join(MANIFEST_FILE), manifest.to_string()).unwrap();
            Shard::open(&out)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let good_ids = [1u32, 2, 3, 4, 5];
        let good_mask = [0u8, 1, 0, 0, 0];
        // an id past the vocabulary, named by conversation and position
        let err = open_err(&[1, 2, 3, 4, 10], &good_mask, &manifest);
        assert!(
            err.contains("conversation 1, token 1: id 10 is not below the vocabulary size 10"),
            "{err}"
        );
        // a mask byte other than 0/1; a flipped 0/1 byte changes the supervised count
        let err = open_err(&good_ids, &[0, 1, 0, 2, 0], &manifest);
        assert!(
            err.contains("conversation 1, token 0: mask byte 2"),
            "{err}"
        );
        let err = open_err(&good_ids, &[0, 1, 1, 0, 0], &manifest);
        assert!(
            err.contains("2 supervised tokens, the manifest says 1"),
            "{err}"
        );
        // the padding id must be a token too
        let mut m = manifest.clone();
        m["tokenizer"]["bos_id"] = Value::from(10);
        let err = open_err(&good_ids, &good_mask, &m);
        assert!(
            err.contains("bos_id 10 is not below the vocabulary size 10"),
            "{err}"
        );
        // without a recorded vocabulary the ids must still fit int32
        let mut m = manifest.clone();
        m.as_object_mut().unwrap().remove("tokenizer");
        assert_eq!(open_err(&good_ids, &good_mask, &m), "");
        let err = open_err(&[1, 2, 3, 4, 1 << 31], &good_mask, &m);
        assert!(
            err.contains("id 2147483648 is not below the vocabulary size 2147483648"),
            "{err}"
        );
        // an empty conversation (offsets 0, 3, 3 + a third one)
        let offs: Vec<u8> = [0u64, 3, 3, 5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        fs::write(out.join(OFFSETS_FILE), offs).unwrap();
        m["num_conversations"] = Value::from(3);
        let err = open_err(&good_ids, &good_mask, &m);
        assert!(err.contains("conversation 1 has no tokens"), "{err}");
    }

    #[test]
    fn json_file_array_or_single() {
        let dir = tmp("json");
        let d = dir.path();
        let a = d.join("a.json");
        fs::write(&a, r#"[{"messages": []}, {"messages": []}]"#).unwrap();
        assert_eq!(read_json_file(&a).unwrap().len(), 2);
        fs::write(&a, r#"[{"role": "user", "content": "hi"}]"#).unwrap();
        assert_eq!(read_json_file(&a).unwrap().len(), 1);
        fs::write(&a, "{\n\"messages\": [}").unwrap();
        let err = read_json_file(&a).unwrap_err().to_string();
        assert!(err.contains("a.json:2"), "{err}");
    }

    #[test]
    fn lines_end_and_blank_lines_are_skipped_as_python_text_mode_reads_them() {
        let dir = tmp("lines");
        let d = dir.path();
        let j = d.join("a.jsonl");
        // LF, CRLF, lone CR (twice on one LF-line), a last line without a terminator;
        // blank lines of ASCII and Unicode white space (NBSP, U+2028, U+001F) are not records
        let text = "a\nb\r\nc\rd\re\n \t\n\u{a0}\u{2028}\x1f\n\x0b\r\nf";
        fs::write(&j, text).unwrap();
        let mut reader = JsonlReader::open(&j).unwrap();
        let mut chunk = Chunk::default();
        assert!(reader.read_chunk(&mut chunk, 100, 1 << 20).unwrap());
        let records: Vec<(u64, &[u8])> = chunk
            .records
            .iter()
            .map(|&(pos, a, b)| (pos, &chunk.buf[a..b]))
            .collect();
        assert_eq!(
            records,
            vec![
                (1, &b"a"[..]),
                (2, &b"b"[..]),
                (3, &b"c"[..]),
                (4, &b"d"[..]),
                (5, &b"e"[..]),
                (9, &b"f"[..]),
            ]
        );
    }

    #[test]
    fn a_leading_byte_order_mark_is_not_part_of_the_first_record() {
        let dir = tmp("bom");
        let d = dir.path();
        let a = d.join("a.json");
        fs::write(&a, b"\xef\xbb\xbf[{\"messages\": []}]").unwrap();
        assert_eq!(read_json_file(&a).unwrap().len(), 1);
        let j = d.join("a.jsonl");
        fs::write(&j, b"\xef\xbb\xbf{\"messages\": []}\n{\"messages\": []}\n").unwrap();
        let mut reader = JsonlReader::open(&j).unwrap();
        let mut chunk = Chunk::default();
        assert!(reader.read_chunk(&mut chunk, 10, 1 << 20).unwrap());
        let records: Vec<&[u8]> = chunk
            .records
            .iter()
            .map(|&(_, a, b)| &chunk.buf[a..b])
            .collect();
        assert_eq!(
            records,
            vec![&b"{\"messages\": []}"[..], &b"{\"messages\": []}"[..]]
        );
    }

    #[test]
    fn a_record_error_points_into_its_line_and_names_deep_nesting() {
        // The record's terminator was part of it: a cut record said "line 2 column 0" when its
        // line ended in "\n" and "line 1 column 17" when it did not.
        let r = ChatRenderer::new(byte_bpe(256), 64).unwrap();
        for terminator in ["\n", "\r\n", "\r", ""] {
            let dir = tmp("cut");
            let d = dir.path();
            let j = d.join("a.jsonl");
            fs::write(&j, format!("{{\"messages\": [{{{terminator}")).unwrap();
            let mut reader = JsonlReader::open(&j).unwrap();
            let mut chunk = Chunk::default();
            assert!(reader.read_chunk(&mut chunk, 10, 1 << 20).unwrap());
            let (_, a, b) = chunk.records[0];
            let err = r
                .render_bytes(&chunk.buf[a..b], "a.jsonl:1")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("invalid JSON: EOF while parsing an object at line 1 column 15"),
                "{err}"
            );
        }
        // serde_json's nesting limit is not a syntax error
        let deep = format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"x\": {}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let err = r
            .render_bytes(deep.as_bytes(), "a.jsonl:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested deeper than 128 levels"), "{err}");
        assert!(!err.contains("invalid JSON"), "{err}");
    }

    fn byte_bpe(special_base: u32) -> Arc<CoreBPE> {
        use crate::bpe::SPECIAL_TOKENS;
        let ranks = (0u32..256).map(|b| (vec![b as u8], b)).collect();
        let specials = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), special_base + i as u32))
            .collect();
        Arc::new(CoreBPE::new(ranks, crate::pretokenize::NANOCHAT_PATTERN, specials).unwrap())
    }

    #[test]
    fn chat_renderer_matches_chat_render_and_counts_truncation() {
        let bpe = byte_bpe(256);
        let line = br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "x": 1}"#;
        let value: Value = serde_json::from_slice(line).unwrap();
        let conv = chat::parse_json_conversation(&value, "t").unwrap();
        let (ids, mask) = chat::render(&bpe, &conv, 1 << 20).unwrap();
        let n = ids.len(); // bos us h i ue as y o ae = 9
        assert_eq!(n, 9);
        let exact = ChatRenderer::new(bpe.clone(), n)
            .unwrap()
            .render_bytes(line, "t:1")
            .unwrap();
        assert_eq!(
            (exact.ids, exact.mask, exact.truncated),
            (ids.clone(), mask.clone(), false)
        );
        let cut = ChatRenderer::new(bpe.clone(), n - 1)
            .unwrap()
            .render_bytes(line, "t:1")
            .unwrap();
        assert_eq!(
            (&cut.ids[..], &cut.mask[..], cut.truncated),
            (&ids[..n - 1], &mask[..n - 1], true)
        );
        let err = ChatRenderer::new(bpe.clone(), 8)
            .unwrap()
            .render_bytes(b"{oops", "f.jsonl:3")
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("f.jsonl:3: message -: invalid JSON"),
            "{err}"
        );
        let err = ChatRenderer::new(bpe.clone(), 8)
            .unwrap()
            .render_bytes(
                br#"{"messages": [{"role": "user", "content": 5}]}"#,
                "f.jsonl:4",
            )
            .unwrap_err();
        assert!(
            err.to_string().starts_with("f.jsonl:4: message 0:"),
            "{err}"
        );
        assert!(ChatRenderer::new(bpe, 0).is_err());
    }

    #[test]
    fn renderer_probe_is_stable_and_sees_the_tokens() {
        let a = renderer_probe(&byte_bpe(256)).unwrap();
        assert_eq!(a, renderer_probe(&byte_bpe(256)).unwrap());
        assert!(a.starts_with(RENDERER_VERSION.as_bytes()));
        assert_ne!(a, renderer_probe(&byte_bpe(300)).unwrap());
    }

    #[test]
    fn chat_pipeline_end_to_end() {
        let dir = tmp("chat");
        let d = dir.path();
        let input = d.join("c.jsonl");
        let good = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}]}"#;
        fs::write(
            &input,
            format!("{good}\n[{{\"role\": \"assistant\", \"content\": \"x\"}}]\n{good}\n"),
        )
        .unwrap();
        let out = d.join("shard");
        let renderer = ChatRenderer::new(byte_bpe(256), 2048).unwrap();
        let mut p = Preprocessor::new(&out, renderer, 2048, OnError::Skip, 2).unwrap();
        p.process_jsonl(&input).unwrap();
        p.finish(&Map::new()).unwrap();
        let s = Shard::open(&out).unwrap();
        assert_eq!(s.len(), 2);
        let bpe = byte_bpe(256);
        let conv = chat::parse_json_line(good, "x").unwrap();
        let (ids, mask) = chat::render(&bpe, &conv, 2048).unwrap();
        assert_eq!(s.get(1).unwrap(), (&ids[..], &mask[..]));
        let report = fs::read_to_string(out.join(REPORT_FILE)).unwrap();
        assert!(
            report.starts_with(&format!("{}:2: message 0:", input.display())),
            "{report}"
        );
    }

    /// Offsets must start at 0 (else conversation 0 silently loses tokens), and the manifest's
    /// num_tokens must match the ids.
    #[test]
    fn open_checks_the_first_offset_and_the_manifest_counts() {
        let (_dir, out, manifest) = toy_shard("offsets-start", [1, 2, 3], &Map::new());
        let open_err = || {
            Shard::open(&out)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // offsets 1, 3, 5: non-decreasing and ending at n_tokens, but not starting at 0
        let good_offsets = fs::read(out.join(OFFSETS_FILE)).unwrap();
        let offs: Vec<u8> = [1u64, 3, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        fs::write(out.join(OFFSETS_FILE), offs).unwrap();
        let err = open_err();
        assert!(
            err.contains("offsets are not a non-decreasing index of the ids"),
            "{err}"
        );
        fs::write(out.join(OFFSETS_FILE), good_offsets).unwrap();
        // the manifest's counts against the files, each on its own
        for (key, wrong) in [("num_tokens", 4u64), ("num_conversations", 3)] {
            let mut m = manifest.clone();
            m[key] = Value::from(wrong);
            fs::write(out.join(MANIFEST_FILE), m.to_string()).unwrap();
            let err = open_err();
            assert!(
                err.contains("manifest counts do not match the files"),
                "{key}: {err}"
            );
        }
        fs::write(out.join(MANIFEST_FILE), manifest.to_string()).unwrap();
        assert!(Shard::open(&out).is_ok());
    }

    /// Null fields (json.loads' None for an absent value) are accepted, as the loader accepts
    /// them; a field of a *part* that rendering would drop (e.g. "weight": 0) is refused, as
    /// message-level ones are.
    #[test]
    fn training_records_accept_null_fields_and_refuse_dropped_part_fields() {
        let r = ChatRenderer::new(byte_bpe(256), 64).unwrap();
        r.render_bytes(
            br#"{"messages": [{"role": "user", "content": "q", "weight": null},
                {"role": "assistant", "content": [{"type": "text", "text": "a", "weight": null}]}]}"#,
            "f:1",
        )
        .unwrap();
        let err = r
            .render_bytes(
                br#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content":
                    [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "weight": 0}]}]}"#,
                "f:2",
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("f:2: message 1: part 1: field(s) \"weight\" are not rendered"),
            "{err}"
        );
    }
}
