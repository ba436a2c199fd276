//! Python bindings of preprocessed shards (issue 4): the builder `python -m sftfast.prep`
//! drives chunk by chunk (so it can show progress), a JSONL reader, a validating shard
//! reader, and the two byte strings the shard cache key hashes.

use crate::bpe::CoreBPE;
use crate::error::Error;
use crate::pack::check_rendered;
use crate::py::data::{check_len, parse_on_error, PyRenderedChunk};
use crate::py::errors::ConversationError;
use crate::py::tokenizer::PyCoreTokenizer;
use crate::shards::{
    self, BatchStats, ChatRenderer, Chunk, JsonlReader, LocKind, OnError, Preprocessor, Shard,
};
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use std::path::PathBuf;

type Counts = (u64, u64, u64, u64);
type Arrays<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u8>>);

fn counts(b: BatchStats) -> Counts {
    (b.records, b.conversations, b.tokens, b.skipped)
}

/// Streams a JSONL file in chunks of whole lines (positions are 1-based line numbers).
#[pyclass(name = "JsonlReader", module = "sftfast._core")]
pub struct PyJsonlReader {
    inner: JsonlReader,
    chunk: Chunk,
}

#[pymethods]
impl PyJsonlReader {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(Self {
            inner: JsonlReader::open(&path)?,
            chunk: Chunk::default(),
        })
    }
    #[getter]
    fn path(&self) -> &str {
        self.inner.path()
    }
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.inner.bytes_read()
    }
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }
    #[getter]
    fn done(&self) -> bool {
        self.inner.is_done()
    }
}

/// Builds one shard directory: records go in, rendered in parallel (GIL released), and are
/// appended in input order to a temporary directory that `finish` renames into place.
/// Dropping (or `abort`) without `finish` removes the temporary directory.
#[pyclass(name = "ShardBuilder", module = "sftfast._core")]
pub struct PyShardBuilder {
    inner: Option<Preprocessor<ChatRenderer>>,
}

impl PyShardBuilder {
    fn get(&mut self) -> PyResult<&mut Preprocessor<ChatRenderer>> {
        self.inner.as_mut().ok_or_else(|| {
            Error::Other("this ShardBuilder was already finished or aborted".into()).into()
        })
    }

    /// Runs `f` without the GIL; an error aborts the build (nothing half-written remains).
    fn run<T: Send>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut Preprocessor<ChatRenderer>) -> crate::error::Result<T> + Send,
    ) -> PyResult<T> {
        let p = self.get()?;
        match py.detach(|| f(p)) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.inner = None;
                Err(e.into())
            }
        }
    }
}

#[pymethods]
impl PyShardBuilder {
    #[new]
    #[pyo3(signature = (out_dir, tokenizer, max_tokens, on_error = "fail", num_threads = 0))]
    fn new(
        py: Python<'_>,
        out_dir: PathBuf,
        tokenizer: &PyCoreTokenizer,
        max_tokens: usize,
        on_error: &str,
        num_threads: usize,
    ) -> PyResult<Self> {
        let on_error: OnError = on_error.parse()?;
        let renderer = ChatRenderer::new(tokenizer.inner.clone(), max_tokens)?;
        let inner =
            py.detach(|| Preprocessor::new(&out_dir, renderer, max_tokens, on_error, num_threads))?;
        Ok(Self { inner: Some(inner) })
    }

    /// Starts a new source: the records fed after this are counted under `name`.
    fn begin_source(&mut self, name: &str) -> PyResult<()> {
        Ok(self.get()?.begin_source(name)?)
    }

    /// Reads, renders and appends the next chunk of `reader`.
    /// Returns (records, conversations, tokens, skipped), or None once the file is exhausted.
    #[pyo3(signature = (reader, max_records = shards::DEFAULT_CHUNK_RECORDS, max_bytes = shards::DEFAULT_CHUNK_BYTES))]
    fn feed_jsonl(
        &mut self,
        py: Python<'_>,
        reader: &mut PyJsonlReader,
        max_records: usize,
        max_bytes: usize,
    ) -> PyResult<Option<Counts>> {
        let PyJsonlReader { inner, chunk } = reader;
        self.run(py, |p| {
            if !inner.read_chunk(chunk, max_records.max(1), max_bytes.max(1))? {
                return Ok(None);
            }
            let label = inner.path().to_string();
            Ok(Some(counts(p.process_chunk(
                &label,
                LocKind::Line,
                chunk,
            )?)))
        })
    }

    /// Renders and appends records given as JSON strings; record i is named `label[first_index + i]`.
    fn feed_json_strings(
        &mut self,
        py: Python<'_>,
        label: &str,
        first_index: u64,
        records: Vec<String>,
    ) -> PyResult<Counts> {
        self.run(py, |p| {
            let mut chunk = Chunk::default();
            for (i, r) in records.iter().enumerate() {
                chunk.push(first_index + i as u64, r.as_bytes());
            }
            Ok(counts(p.process_chunk(label, LocKind::Index, &chunk)?))
        })
    }

    /// A JSON file: an array of conversations (or one conversation); records are `path[i]`.
    fn feed_json_file(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<Counts> {
        self.run(py, |p| {
            let values = shards::read_json_file(&path)?;
            Ok(counts(p.process_values(
                &path.display().to_string(),
                LocKind::Index,
                0,
                &values,
            )?))
        })
    }

    /// Writes the manifest (this builder's counts merged with `extra_json`, an object) and
    /// renames the shard into place. Returns the manifest as JSON.
    fn finish(&mut self, py: Python<'_>, extra_json: &str) -> PyResult<String> {
        let extra: serde_json::Value = serde_json::from_str(extra_json)
            .map_err(|e| Error::Other(format!("extra manifest fields are not JSON: {e}")))?;
        let extra = extra
            .as_object()
            .cloned()
            .ok_or_else(|| Error::Other("extra manifest fields must be a JSON object".into()))?;
        let manifest = self.run(py, |p| p.finish(&extra).map(|(_, m)| m))?;
        self.inner = None;
        Ok(serde_json::to_string(&manifest).expect("a Value always serializes"))
    }

    /// Removes the temporary directory; the builder cannot be used afterwards.
    fn abort(&mut self) {
        if let Some(mut p) = self.inner.take() {
            p.abort();
        }
    }

    #[getter]
    fn conversations(&self) -> u64 {
        self.inner.as_ref().map_or(0, |p| p.n_conversations())
    }

    #[getter]
    fn num_threads(&self) -> usize {
        self.inner.as_ref().map_or(0, |p| p.num_threads())
    }

    /// The manifest's counts so far, as JSON.
    fn stats_json(&self) -> PyResult<String> {
        let p = self.inner.as_ref().ok_or_else(|| {
            PyErr::from(Error::Other(
                "this ShardBuilder was already finished or aborted".into(),
            ))
        })?;
        Ok(p.core_manifest().to_string())
    }
}

/// A shard opened by memory map, validated (sizes, offsets, manifest counts) on open.
#[pyclass(name = "ShardReader", module = "sftfast._core", frozen)]
pub struct PyShardReader {
    inner: Shard,
}

#[pymethods]
impl PyShardReader {
    #[new]
    fn new(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        Ok(Self {
            inner: py.detach(|| Shard::open(&dir))?,
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Conversation i as (ids uint32, mask uint8) arrays (copies).
    fn get<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Arrays<'py>> {
        let (ids, mask) = self.inner.get(i)?;
        Ok((
            ids.to_vec().into_pyarray(py),
            mask.to_vec().into_pyarray(py),
        ))
    }

    /// Conversations `indices` as a RenderedChunk for the loader, copied out of the map with the
    /// GIL released: a shard source skips the Python `[i]` (and its two array views) per
    /// conversation. Each is checked as `Packer.feed` checks it; a bad one (only a corrupt
    /// shard has one) is named `names[k]` (default: its index), skipped with on_error="skip",
    /// else raised as ConversationError. An index out of range raises ShardError.
    #[pyo3(signature = (indices, names=None, on_error="fail"))]
    fn rendered_chunk(
        &self,
        py: Python<'_>,
        indices: Vec<u64>,
        names: Option<Vec<u64>>,
        on_error: &str,
    ) -> PyResult<PyRenderedChunk> {
        let skip = parse_on_error(on_error)?;
        check_len("names", names.as_deref(), indices.len(), "indices")?;
        let n = indices.len();
        let (items, errors) = py.detach(|| -> Result<_, Error> {
            let (mut items, mut errors) = (Vec::with_capacity(n), Vec::new());
            for (k, &i) in indices.iter().enumerate() {
                let (ids, mask) = self.inner.get(usize::try_from(i).unwrap_or(usize::MAX))?;
                match check_rendered(ids, mask) {
                    Ok(()) => items.push((k, ids.to_vec(), mask.to_vec())),
                    Err(why) => {
                        // Open checked every token; this catches files changed since then.
                        let shard = self.inner.dir().display();
                        let msg = match names.as_ref().map(|v| v[k]) {
                            Some(name) if name != i => {
                                format!("conversation {name}: {shard}: conversation {i}: {why}")
                            }
                            _ => format!("conversation {i}: {shard}: {why}"),
                        };
                        errors.push((k, msg));
                    }
                }
            }
            Ok((items, errors))
        })?;
        if let (false, Some((_, msg))) = (skip, errors.first()) {
            return Err(ConversationError::new_err(msg.clone()));
        }
        Ok(PyRenderedChunk::unfed(items, errors, n))
    }

    /// Length in tokens of every conversation.
    fn lengths<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        self.inner.lengths().into_pyarray(py)
    }

    #[getter]
    fn n_tokens(&self) -> usize {
        self.inner.n_tokens()
    }

    #[getter]
    fn manifest_json(&self) -> String {
        self.inner.manifest().to_string()
    }
}

/// Canonical bytes of a tokenizer (pattern, ranks in rank order, specials): hash them for a
/// fingerprint that changes whenever encoding could.
fn identity_bytes(bpe: &CoreBPE) -> Vec<u8> {
    let mut ranks: Vec<(&Vec<u8>, u32)> = bpe.encoder().iter().map(|(b, &r)| (b, r)).collect();
    ranks.sort_unstable_by_key(|&(_, r)| r);
    let mut out = Vec::with_capacity(ranks.len() * 12 + 256);
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    put(&mut out, b"sftfast-tokenizer-identity-1");
    put(&mut out, bpe.pattern().as_bytes());
    out.extend_from_slice(&(ranks.len() as u64).to_le_bytes());
    for (bytes, rank) in ranks {
        out.extend_from_slice(&rank.to_le_bytes());
        put(&mut out, bytes);
    }
    out.extend_from_slice(&(bpe.specials().len() as u64).to_le_bytes());
    for (name, id) in bpe.specials() {
        out.extend_from_slice(&id.to_le_bytes());
        put(&mut out, name.as_bytes());
    }
    out
}

/// Canonical bytes of the tokenizer (pattern, ranks, specials), for its fingerprint.
#[pyfunction]
fn tokenizer_identity<'py>(
    py: Python<'py>,
    tokenizer: &PyCoreTokenizer,
) -> Bound<'py, pyo3::types::PyBytes> {
    let bpe = &tokenizer.inner;
    let bytes = py.detach(|| identity_bytes(bpe));
    pyo3::types::PyBytes::new(py, &bytes)
}

/// The renderer's version and its output on fixed probe conversations, for the shard key.
#[pyfunction]
fn renderer_probe<'py>(
    py: Python<'py>,
    tokenizer: &PyCoreTokenizer,
) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let bytes = shards::renderer_probe(&tokenizer.inner)?;
    Ok(pyo3::types::PyBytes::new(py, &bytes))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyJsonlReader>()?;
    m.add_class::<PyShardBuilder>()?;
    m.add_class::<PyShardReader>()?;
    m.add_function(wrap_pyfunction!(tokenizer_identity, m)?)?;
    m.add_function(wrap_pyfunction!(renderer_probe, m)?)?;
    m.add("SHARD_FORMAT_VERSION", shards::FORMAT_VERSION)?;
    m.add("RENDERER_VERSION", shards::RENDERER_VERSION)?;
    m.add(
        "SHARD_FILES",
        (
            shards::IDS_FILE,
            shards::MASK_FILE,
            shards::OFFSETS_FILE,
            shards::MANIFEST_FILE,
            shards::REPORT_FILE,
        ),
    )?;
    Ok(())
}
