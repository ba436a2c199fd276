//! Python bindings of rendering and packing (issue 3).
//!
//! Conversations are walked straight from Python dicts/lists into `chat::Conversation` (no JSON
//! round-trip) with the GIL held; rendering and packing then run with the GIL released
//! (`py.detach`), `render_batch` in parallel on rayon.

use crate::bpe::Rank;
use crate::chat::{self, ChatTokens, Content, Conversation, Message, Part, PartKind, Role};
use crate::pack::{BatchInfo, BatchOut, Mode, Packer};
use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use rayon::prelude::*;

use super::tokenizer::PyCoreTokenizer;

use crate::chat::conv_err;

fn py_type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `obj[key]` for a dict (fast path) or any mapping; None when the key is absent. Keys are
/// interned strings (`intern!`): their hash is cached, so a lookup hashes nothing.
fn get<'py>(
    obj: &Bound<'py, PyAny>,
    key: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Ok(d) = obj.cast::<PyDict>() {
        return d.get_item(key);
    }
    match obj.get_item(key) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyError>(obj.py()) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_mapping(obj: &Bound<'_, PyAny>) -> bool {
    obj.is_instance_of::<PyDict>() || obj.cast::<pyo3::types::PyMapping>().is_ok()
}

fn string(obj: &Bound<'_, PyAny>) -> Option<String> {
    let s = obj.cast::<PyString>().ok()?;
    match s.to_str() {
        Ok(text) => Some(text.to_owned()),
        // A str with lone surrogates is not UTF-8. Do what tiktoken's encode does: round-trip
        // through UTF-16 with "surrogatepass", which joins pairs and turns lone ones into U+FFFD.
        Err(_) => {
            let fixed = s
                .call_method1("encode", ("utf-16", "surrogatepass"))
                .and_then(|b| b.call_method1("decode", ("utf-16", "replace")))
                .ok()?;
            fixed
                .cast::<PyString>()
                .ok()?
                .to_str()
                .ok()
                .map(str::to_owned)
        }
    }
}

/// A Python conversation (`{"messages": [...]}`) -> validated Conversation. Errors name
/// `location` and the message index, as `chat::parse_json_conversation` does.
pub fn conversation_from_py(obj: &Bound<'_, PyAny>, location: &str) -> PyResult<Conversation> {
    if !is_mapping(obj) {
        return Err(conv_err(
            location,
            "-",
            format!(
                "a conversation must be a dict with \"messages\", got {}",
                py_type_name(obj)
            ),
        )
        .into());
    }
    let messages = match get(obj, intern!(obj.py(), "messages"))? {
        Some(m) => m,
        None => return Err(conv_err(location, "-", "missing field \"messages\"").into()),
    };
    // a list or tuple, as the reference: other objects with a length (bytes, range, sets) are
    // not a message list, and walking them would blame their items instead
    if !(messages.is_instance_of::<PyList>() || messages.is_instance_of::<PyTuple>()) {
        return Err(conv_err(
            location,
            "-",
            format!(
                "\"messages\" must be a list, got {}",
                py_type_name(&messages)
            ),
        )
        .into());
    }
    let n = messages.len()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let m = messages.get_item(i)?;
        if !is_mapping(&m) {
            return Err(conv_err(
                location,
                i,
                format!("a message must be a dict, got {}", py_type_name(&m)),
            )
            .into());
        }
        let role = match get(&m, intern!(obj.py(), "role"))? {
            None => return Err(conv_err(location, i, "missing field \"role\"").into()),
            Some(r) => match string(&r) {
                Some(s) => Role::parse(&s)
                    .ok_or_else(|| conv_err(location, i, format!("unknown role {s:?}")))?,
                None => {
                    return Err(conv_err(
                        location,
                        i,
                        format!("\"role\" must be a string, got {}", py_type_name(&r)),
                    )
                    .into())
                }
            },
        };
        let content = match get(&m, intern!(obj.py(), "content"))? {
            None => return Err(conv_err(location, i, "missing field \"content\"").into()),
            Some(c) => {
                if let Some(s) = string(&c) {
                    Content::Text(s)
                } else if role == Role::Assistant
                    && (c.is_instance_of::<PyList>() || c.is_instance_of::<PyTuple>())
                {
                    let np = c.len()?;
                    let mut parts = Vec::with_capacity(np);
                    for j in 0..np {
                        let p = c.get_item(j)?;
                        if !is_mapping(&p) {
                            return Err(conv_err(
                                location,
                                i,
                                format!("part {j} must be a dict, got {}", py_type_name(&p)),
                            )
                            .into());
                        }
                        let kind = match get(&p, intern!(obj.py(), "type"))? {
                            None => return Err(conv_err(location, i, format!("part {j}: missing field \"type\"")).into()),
                            Some(t) => match string(&t) {
                                Some(s) => PartKind::parse(&s).ok_or_else(|| {
                                    conv_err(location, i, format!("part {j}: unknown part type {s:?} (expected text, python or python_output)"))
                                })?,
                                None => {
                                    return Err(conv_err(location, i, format!("part {j}: \"type\" must be a string, got {}", py_type_name(&t))).into())
                                }
                            },
                        };
                        let text = match get(&p, intern!(obj.py(), "text"))? {
                            None => {
                                return Err(conv_err(
                                    location,
                                    i,
                                    format!("part {j}: missing field \"text\""),
                                )
                                .into())
                            }
                            Some(t) => string(&t).ok_or_else(|| {
                                conv_err(
                                    location,
                                    i,
                                    format!(
                                        "part {j}: \"text\" must be a string, got {}",
                                        py_type_name(&t)
                                    ),
                                )
                            })?,
                        };
                        parts.push(Part { kind, text });
                    }
                    Content::Parts(parts)
                } else {
                    return Err(
                        chat::wrong_content_type(location, i, role, &py_type_name(&c)).into(),
                    );
                }
            }
        };
        out.push(Message { role, content });
    }
    Ok(Conversation::new(out, location)?)
}

fn ids_mask_to_py<'py>(
    py: Python<'py>,
    ids: &[Rank],
    mask: &[u8],
) -> PyResult<Bound<'py, PyTuple>> {
    let ids = PyList::new(py, ids)?;
    let mask = PyList::new(py, mask.iter().map(|&m| m as u32))?;
    PyTuple::new(py, [ids.into_any(), mask.into_any()])
}

fn location_of(indices: &Option<Vec<i64>>, i: usize) -> String {
    match indices {
        Some(ix) => format!("conversation {}", ix[i]),
        None => format!("conversation {i}"),
    }
}

/// Parsed conversations with their positions, and (position, error) of the bad ones.
type Parsed = (Vec<(usize, Conversation)>, Vec<(usize, PyErr)>);

/// Walks `conversations` (GIL held): Ok ones, plus (index, error) of the bad ones.
fn parse_many(
    conversations: &Bound<'_, PyAny>,
    indices: &Option<Vec<i64>>,
    skip: bool,
) -> PyResult<Parsed> {
    let n = conversations.len()?;
    check_len("indices", indices.as_deref(), n, "conversations")?;
    let mut ok = Vec::with_capacity(n);
    let mut bad = Vec::new();
    for i in 0..n {
        let obj = conversations.get_item(i)?;
        match conversation_from_py(&obj, &location_of(indices, i)) {
            Ok(c) => ok.push((i, c)),
            Err(e)
                if skip
                    && e.is_instance_of::<super::errors::ConversationError>(conversations.py()) =>
            {
                bad.push((i, e))
            }
            Err(e) => return Err(e),
        }
    }
    Ok((ok, bad))
}

/// ValueError unless the optional list `name` has one entry for each of the `n` `items`.
pub(crate) fn check_len<T>(name: &str, list: Option<&[T]>, n: usize, items: &str) -> PyResult<()> {
    match list {
        Some(l) if l.len() != n => Err(PyValueError::new_err(format!(
            "{name} has {} entries for {n} {items}",
            l.len()
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn parse_on_error(on_error: &str) -> PyResult<bool> {
    match on_error {
        "fail" => Ok(false),
        "skip" => Ok(true),
        _ => Err(PyValueError::new_err(format!(
            "on_error must be \"fail\" or \"skip\", got {on_error:?}"
        ))),
    }
}

/// Runs `f` on sftfast's pool of `num_threads` (None: all CPUs), the fork-safe pools of
/// `crate::parallel` that encode_batch uses too.
fn with_threads<T: Send>(num_threads: Option<usize>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    if num_threads == Some(0) {
        return Err(PyValueError::new_err("num_threads must be at least 1"));
    }
    Ok(crate::parallel::install(num_threads, f)?)
}

fn render_all(
    tok: &PyCoreTokenizer,
    convs: &[(usize, Conversation)],
    max_tokens: usize,
    num_threads: Option<usize>,
) -> PyResult<Vec<(Vec<Rank>, Vec<u8>)>> {
    let bpe = &*tok.inner;
    let tokens = ChatTokens::from_bpe(bpe)?;
    let one = |c: &Conversation| {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        chat::render_into(bpe, &tokens, c, max_tokens, &mut ids, &mut mask);
        (ids, mask)
    };
    if num_threads == Some(1) || convs.len() <= 1 {
        return Ok(convs.iter().map(|(_, c)| one(c)).collect());
    }
    with_threads(num_threads, || {
        convs.par_iter().map(|(_, c)| one(c)).collect()
    })
}

/// Conversations rendered and held in Rust (no Python lists of tokens): what
/// `Tokenizer.render_chunk` returns and `Packer.feed_rendered` consumes. The loader renders the
/// next chunk on a helper thread while the packer works through the current one.
#[pyclass(name = "RenderedChunk", module = "sftfast._core")]
pub struct PyRenderedChunk {
    /// (position in the chunk, ids, mask) of the conversations that rendered, in order.
    items: Vec<RenderedItem>,
    /// (position, message) of the bad ones (on_error="skip").
    errors: Vec<(usize, String)>,
    /// Conversations given, good and bad.
    len: usize,
    /// Set once the items have moved into a packer: a chunk feeds once.
    fed: bool,
}

/// A rendered conversation held in a chunk: (its position in the chunk, ids, mask).
pub(crate) type RenderedItem = (usize, Vec<Rank>, Vec<u8>);

/// A chunk's contents as little-endian bytes, each written straight into a new Python bytes
/// object: the index (position and length of each rendered conversation, u64 pairs), the ids
/// (u32) and the masks (u8). What pickling sends from a loader worker process to the packer's
/// process: written at memory speed, no Python object per token.
fn chunk_to_bytes<'py>(
    py: Python<'py>,
    items: &[RenderedItem],
) -> PyResult<(
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
)> {
    let tokens: usize = items.iter().map(|(_, ids, _)| ids.len()).sum();
    let index = PyBytes::new_with(py, 16 * items.len(), |buf| {
        for (entry, (pos, ids, _)) in buf.chunks_exact_mut(16).zip(items) {
            entry[..8].copy_from_slice(&(*pos as u64).to_le_bytes());
            entry[8..].copy_from_slice(&(ids.len() as u64).to_le_bytes());
        }
        Ok(())
    })?;
    let ids = PyBytes::new_with(py, 4 * tokens, |buf| {
        py.detach(|| {
            let mut out = buf.chunks_exact_mut(4);
            for id in items.iter().flat_map(|(_, ids, _)| ids) {
                out.next()
                    .expect("sized for every token")
                    .copy_from_slice(&id.to_le_bytes());
            }
        });
        Ok(())
    })?;
    let mask = PyBytes::new_with(py, tokens, |buf| {
        let mut start = 0;
        for (_, _, m) in items {
            buf[start..start + m.len()].copy_from_slice(m);
            start += m.len();
        }
        Ok(())
    })?;
    Ok((index, ids, mask))
}

/// Inverse of `chunk_to_bytes`, checking that the parts agree (a chunk of `len` conversations).
fn chunk_from_bytes(
    len: usize,
    index: &[u8],
    ids: &[u8],
    mask: &[u8],
) -> Result<Vec<RenderedItem>, String> {
    if index.len() % 16 != 0 || ids.len() % 4 != 0 || ids.len() / 4 != mask.len() {
        return Err(format!(
            "index of {} bytes, ids of {} bytes, mask of {} bytes do not fit together",
            index.len(),
            ids.len(),
            mask.len()
        ));
    }
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize;
    let mut items = Vec::with_capacity(index.len() / 16);
    let (mut start, mut last_pos) = (0usize, None);
    for entry in index.chunks_exact(16) {
        let (pos, n) = (u64_at(&entry[..8]), u64_at(&entry[8..]));
        if pos >= len || last_pos.is_some_and(|p| pos <= p) {
            return Err(format!(
                "position {pos} out of order or outside a chunk of {len}"
            ));
        }
        let end = start
            .checked_add(n)
            .filter(|&e| e <= mask.len())
            .ok_or_else(|| format!("lengths add up to more than the {} tokens", mask.len()))?;
        let conv_ids = ids[4 * start..4 * end]
            .chunks_exact(4)
            .map(|b| Rank::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        items.push((pos, conv_ids, mask[start..end].to_vec()));
        (start, last_pos) = (end, Some(pos));
    }
    if start != mask.len() {
        return Err(format!(
            "lengths add up to {start} of the {} tokens",
            mask.len()
        ));
    }
    Ok(items)
}

/// Rebuilds a pickled RenderedChunk (see `RenderedChunk.__reduce__`).
#[pyfunction]
fn _rendered_chunk_from_state(
    py: Python<'_>,
    len: usize,
    fed: bool,
    index: &Bound<'_, PyBytes>,
    ids: &Bound<'_, PyBytes>,
    mask: &Bound<'_, PyBytes>,
    errors: Vec<(usize, String)>,
) -> PyResult<PyRenderedChunk> {
    let (index, ids, mask) = (index.as_bytes(), ids.as_bytes(), mask.as_bytes());
    let items = py
        .detach(|| chunk_from_bytes(len, index, ids, mask))
        .map_err(|e| PyValueError::new_err(format!("corrupt RenderedChunk state: {e}")))?;
    if len > isize::MAX as usize {
        return Err(PyValueError::new_err(format!(
            "corrupt RenderedChunk state: a chunk of {len} conversations"
        )));
    }
    let mut bad: Vec<usize> = errors.iter().map(|(i, _)| *i).collect();
    bad.sort_unstable();
    if let Some(i) = bad.iter().find(|&&i| i >= len) {
        return Err(PyValueError::new_err(format!(
            "corrupt RenderedChunk state: error at position {i} outside a chunk of {len}"
        )));
    }
    let twice = bad
        .windows(2)
        .find(|w| w[0] == w[1])
        .map(|w| w[0])
        .or_else(|| {
            bad.iter()
                .copied()
                .find(|i| items.binary_search_by_key(i, |(p, _, _)| *p).is_ok())
        });
    if let Some(i) = twice {
        return Err(PyValueError::new_err(format!(
            "corrupt RenderedChunk state: position {i} is listed twice"
        )));
    }
    if items.len() + errors.len() != len && !fed {
        return Err(PyValueError::new_err(format!(
            "corrupt RenderedChunk state: {} rendered + {} bad != {len} conversations",
            items.len(),
            errors.len()
        )));
    }
    Ok(PyRenderedChunk {
        items,
        errors,
        len,
        fed,
    })
}

impl PyRenderedChunk {
    /// A chunk of `len` conversations not yet fed: the good ones as `items`, the bad as
    /// (position, message) `errors`.
    pub(crate) fn unfed(
        items: Vec<RenderedItem>,
        errors: Vec<(usize, String)>,
        len: usize,
    ) -> Self {
        Self {
            items,
            errors,
            len,
            fed: false,
        }
    }
}

#[pymethods]
impl PyRenderedChunk {
    /// A chunk from pre-rendered (ids, mask) pairs (lists or 1-D integer arrays), each checked
    /// as `Packer.feed` checks it, so a source of pairs (a preprocessed shard, a list) gets what
    /// a source of conversations gets: errors that name `indices[i]` (default: i), and
    /// on_error="skip" keeping the bad ones as (position, message) instead of raising
    /// ConversationError at the first.
    #[staticmethod]
    #[pyo3(signature = (pairs, indices=None, on_error="fail"))]
    fn from_pairs(
        py: Python<'_>,
        pairs: &Bound<'_, PyAny>,
        indices: Option<Vec<u64>>,
        on_error: &str,
    ) -> PyResult<Self> {
        let skip = parse_on_error(on_error)?;
        let n = pairs.len()?;
        check_len("indices", indices.as_deref(), n, "pairs")?;
        let mut items = Vec::with_capacity(n);
        let mut errors = Vec::new();
        for i in 0..n {
            let who = indices.as_ref().map_or(i as u64, |ix| ix[i]);
            match read_pair(py, &pairs.get_item(i)?, who)? {
                Ok((ids, mask)) => items.push((i, ids, mask)),
                Err(msg) if skip => errors.push((i, msg)),
                Err(msg) => return Err(super::errors::ConversationError::new_err(msg)),
            }
        }
        Ok(Self::unfed(items, errors, n))
    }

    fn __len__(&self) -> usize {
        self.len
    }
    /// Pickles by value (a loader worker process sends chunks to the packer's process).
    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        Bound<'py, PyAny>,
        (
            usize,
            bool,
            Bound<'py, PyBytes>,
            Bound<'py, PyBytes>,
            Bound<'py, PyBytes>,
            Vec<(usize, String)>,
        ),
    )> {
        let rebuild = py
            .import(intern!(py, "sftfast._core"))?
            .getattr(intern!(py, "_rendered_chunk_from_state"))?;
        let (index, ids, mask) = chunk_to_bytes(py, &self.items)?;
        Ok((
            rebuild,
            (self.len, self.fed, index, ids, mask, self.errors.clone()),
        ))
    }
    /// Tokens held (0 once fed).
    #[getter]
    fn num_tokens(&self) -> usize {
        self.items.iter().map(|(_, ids, _)| ids.len()).sum()
    }
    /// (position in the chunk, message) of the conversations that failed (on_error="skip").
    #[getter]
    fn errors(&self) -> Vec<(usize, String)> {
        self.errors.clone()
    }
    fn __repr__(&self) -> String {
        format!(
            "RenderedChunk(conversations={}, rendered={}, bad={}, fed={})",
            self.len,
            self.items.len(),
            self.errors.len(),
            self.fed
        )
    }
}

/// Walks `conversations` (GIL held), then renders the good ones with the GIL released.
fn render_chunk(
    py: Python<'_>,
    tok: &PyCoreTokenizer,
    conversations: &Bound<'_, PyAny>,
    max_tokens: usize,
    num_threads: Option<usize>,
    on_error: &str,
    indices: Option<Vec<i64>>,
) -> PyResult<PyRenderedChunk> {
    let skip = parse_on_error(on_error)?;
    let (ok, bad) = parse_many(conversations, &indices, skip)?;
    let rendered = py.detach(|| render_all(tok, &ok, max_tokens, num_threads))?;
    let len = ok.len() + bad.len();
    let mut errors = Vec::with_capacity(bad.len());
    for (i, e) in bad {
        errors.push((i, e.value(py).str()?.to_string()));
    }
    Ok(PyRenderedChunk {
        items: ok
            .iter()
            .zip(rendered)
            .map(|((i, _), (ids, mask))| (*i, ids, mask))
            .collect(),
        errors,
        len,
        fed: false,
    })
}

/// The extension tokenizer behind either it or the Python `Tokenizer` wrapper (`._core`).
fn core_tokenizer<'py>(tokenizer: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyCoreTokenizer>> {
    match tokenizer.cast::<PyCoreTokenizer>() {
        Ok(c) => Ok(c.clone()),
        Err(_) => Ok(tokenizer.getattr("_core")?.cast_into::<PyCoreTokenizer>()?),
    }
}

#[pymethods]
impl PyCoreTokenizer {
    /// Renders `conversations` into a RenderedChunk held in Rust, for `Packer.feed_rendered`
    /// (walked with the GIL held, rendered in parallel without it). `indices` name the
    /// conversations in error messages (default: their positions); on_error="skip" keeps the
    /// bad ones' messages in `chunk.errors` instead of raising at the first.
    #[pyo3(name = "render_chunk", signature = (conversations, max_tokens=2048, num_threads=None, on_error="fail", indices=None))]
    fn py_render_chunk(
        &self,
        py: Python<'_>,
        conversations: &Bound<'_, PyAny>,
        max_tokens: usize,
        num_threads: Option<usize>,
        on_error: &str,
        indices: Option<Vec<i64>>,
    ) -> PyResult<PyRenderedChunk> {
        render_chunk(
            py,
            self,
            conversations,
            max_tokens,
            num_threads,
            on_error,
            indices,
        )
    }

    /// (ids, mask) of one conversation, truncated to max_tokens.
    #[pyo3(signature = (conversation, max_tokens=2048))]
    fn render_conversation<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        max_tokens: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let conv = conversation_from_py(conversation, "conversation")?;
        let bpe = &*self.inner;
        let (ids, mask) = py.detach(|| chat::render(bpe, &conv, max_tokens))?;
        ids_mask_to_py(py, &ids, &mask)
    }

    /// Many conversations in parallel (GIL released). on_error="skip" returns
    /// (rendered, [(index, message), ...]) instead of raising at the first bad one.
    #[pyo3(signature = (conversations, max_tokens=2048, num_threads=None, on_error="fail", indices=None))]
    fn render_batch<'py>(
        &self,
        py: Python<'py>,
        conversations: &Bound<'py, PyAny>,
        max_tokens: usize,
        num_threads: Option<usize>,
        on_error: &str,
        indices: Option<Vec<i64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let skip = parse_on_error(on_error)?;
        let chunk = render_chunk(
            py,
            self,
            conversations,
            max_tokens,
            num_threads,
            on_error,
            indices.clone(),
        )?;
        let out = PyList::empty(py);
        for (_, ids, mask) in &chunk.items {
            out.append(ids_mask_to_py(py, ids, mask)?)?;
        }
        if !skip {
            return Ok(out.into_any());
        }
        let errors = PyList::empty(py);
        for (i, message) in &chunk.errors {
            let idx = indices.as_ref().map_or(*i as i64, |ix| ix[*i]);
            errors.append((idx, message))?;
        }
        Ok(PyTuple::new(py, [out.into_any(), errors.into_any()])?.into_any())
    }

    /// The prompt for generation: without the final assistant message, plus <|assistant_start|>.
    #[pyo3(signature = (conversation, max_tokens=2048))]
    fn render_for_completion(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        max_tokens: usize,
    ) -> PyResult<Vec<Rank>> {
        let conv = conversation_from_py(conversation, "conversation")?;
        let bpe = &*self.inner;
        Ok(py.detach(|| chat::render_for_completion(bpe, &conv, max_tokens, "conversation"))?)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading rendered (ids, mask) pairs from Python: the packer's input path.
//
// Performance notes (2-core x86_64 EPYC shared with other jobs, CPython 3.11; `Packer.pack`
// over the data benchmark's stream: 20,000 rendered conversations, 7.2 M tokens, as
// render_batch's lists; CPU time, best of 5-12, so that other jobs' load counts less):
// - Before (PyList_GET_ITEM + PyLong_AsLongLong per id, pointer compares for the mask, the
//   whole stream fed before packing): pack 31-46 M tok/s, `feed` alone 64-110 M tok/s; NumPy
//   arrays slower than lists (25-33 M tok/s: failed dtype probes and rust-numpy borrow flags
//   per array). perf: a quarter of the time in malloc + page faults (all 7.2 M tokens held as
//   Vecs at once, every page touched fresh), a sixth in PyLong_AsLongLong and its caller.
// - `pack` feeds PACK_CHUNK conversations at a time and drains the batches each chunk
//   completes (flush=false, so the batches are those of feeding everything first): only a
//   chunk is held, freed Vecs are reused.
// - Exact `int`s below 2^30 (every token id) are read straight from the PyLongObject (one
//   digit) instead of calling PyLong_AsLongLong; the layout is checked against the C API at
//   import (`detect_int_layout`), and anything else (bool, NumPy scalars, big or negative
//   ints, non-ints) takes the C API path, so results and error messages are unchanged.
//   The mask is one branch-free pass of pointer compares (the general loop only on failure).
// - NumPy arrays: typed probes in order of likelihood, then a plain slice read (no borrow
//   flag, range check vectorised before the cast).
// - After: `feed` from lists 100-196 M tok/s, pack from lists 85-99 M tok/s and from NumPy
//   120-164 M tok/s when malloc reuses its memory; 43-56 M tok/s when every batch's output
//   lands on fresh pages (a process that has not yet freed a large block: glibc then trims
//   the 112 MB that a pack returns and faults it back in on the next call; perf: 18-27 k
//   minor faults per pack, half its time). The list reading is bound by the cache misses on
//   the int objects: an ids list read from an unpickled (contiguous) copy goes 1.4x faster
//   than render_batch's own output made in a process with a fragmented heap.
// - Tried and left out: software prefetch of the int objects 16-64 items ahead (no gain on
//   scattered ints, `feed` a third slower on contiguous ones); writing `pack`'s batches into
//   shared 4-8 MiB NumPy arrays (a view per batch), hoping for huge pages: none came (still
//   ~10 k faults), 55 vs 44-53 M tok/s cold but 53 vs 90 M tok/s warm, and a kept batch
//   would pin its whole group. Not tried: one pass over ids and mask together.
// - Then the extension's global allocator became mimalloc (py/mod.rs): freed batch arrays stay
//   mapped for reuse, so the fault cost above is gone after the first call: pack from lists
//   67-111 M tok/s wall in the data benchmark (41-50 before). Also tried: skipping the
//   zero-fill of `commit_owned`'s vectors (no gain beyond noise, so no unsafe for it); mimalloc
//   3.x, whose arenas take transparent huge pages here (same steady state; the first call 3-5x
//   slower while the kernel compacts memory for them; more global locks, see py/mod.rs).
// The figures after these changes are in docs/BENCHMARKS.md ("Data plane").
// ---------------------------------------------------------------------------------------------

use pyo3::ffi;
use std::sync::OnceLock;

/// Conversations fed per step by `Packer.pack` before draining the batches they complete.
const PACK_CHUNK: usize = 512;

/// How this interpreter lays out an `int` (PyLongObject), for reading small ones in place.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum IntLayout {
    /// CPython <= 3.11: PyVarObject header, `ob_size` = signed digit count, then 30-bit digits.
    ObSize,
    /// CPython >= 3.12: `lv_tag` = digit count << 3 | sign (0 positive, 1 zero, 2 negative).
    LvTag,
}

static INT_LAYOUT: OnceLock<Option<IntLayout>> = OnceLock::new();

/// Reads an exact `int` in [0, 2^30) straight from the object; None for anything else
/// (bigger or negative ints, bool and other subclasses, non-ints): those take the C API.
///
/// SAFETY: `item` is a live object and the GIL is held (or the object is otherwise pinned).
#[inline(always)]
unsafe fn small_int(item: *mut ffi::PyObject, layout: IntLayout) -> Option<u32> {
    unsafe {
        if ffi::Py_TYPE(item) != std::ptr::addr_of_mut!(ffi::PyLong_Type) {
            return None;
        }
        let hdr = std::mem::size_of::<ffi::PyObject>();
        let base = item as *const u8;
        let tag = std::ptr::read(base.add(hdr) as *const isize);
        match (layout, tag) {
            (IntLayout::ObSize, 1) | (IntLayout::LvTag, 8) => Some(std::ptr::read(
                base.add(hdr + std::mem::size_of::<isize>()) as *const u32,
            )),
            (IntLayout::ObSize, 0) | (IntLayout::LvTag, 1) => Some(0),
            _ => None,
        }
    }
}

/// The layout if this is CPython with 30-bit digits and `small_int` agrees with the C API on
/// values around every boundary; None (C API only) otherwise.
fn detect_int_layout(py: Python<'_>) -> Option<IntLayout> {
    let sys = py.import("sys").ok()?;
    let name: String = sys
        .getattr("implementation")
        .ok()?
        .getattr("name")
        .ok()?
        .extract()
        .ok()?;
    let info = sys.getattr("int_info").ok()?;
    let bits: u32 = info.getattr("bits_per_digit").ok()?.extract().ok()?;
    let size: u32 = info.getattr("sizeof_digit").ok()?.extract().ok()?;
    if name != "cpython" || bits != 30 || size != 4 {
        return None;
    }
    let layout = if py.version_info() >= (3, 12) {
        IntLayout::LvTag
    } else {
        IntLayout::ObSize
    };
    let values: [i64; 14] = [
        0,
        1,
        2,
        7,
        255,
        256,
        257,
        100_276,
        (1 << 30) - 1,
        1 << 30,
        1 << 31,
        -1,
        -(1 << 29),
        1 << 62,
    ];
    for v in values {
        let obj = v.into_pyobject(py).ok()?;
        // SAFETY: `obj` is alive and the GIL is held.
        let got = unsafe { small_int(obj.as_ptr(), layout) };
        let want = if (0..1 << 30).contains(&v) {
            Some(v as u32)
        } else {
            None
        };
        if got != want {
            return None;
        }
    }
    let t = pyo3::types::PyBool::new(py, true);
    // SAFETY: as above.
    if unsafe { small_int(t.as_ptr(), layout) }.is_some() {
        return None;
    }
    Some(layout)
}

fn int_layout(py: Python<'_>) -> Option<IntLayout> {
    *INT_LAYOUT.get_or_init(|| detect_int_layout(py))
}

fn bad_id(tag: u64, what: &str, k: usize, x: &dyn std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!(
        "conversation tag {tag}: {what}[{k}] = {x} is not a non-negative 32-bit int"
    ))
}

fn bad_mask(tag: u64, k: usize, x: &dyn std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!(
        "conversation tag {tag}: mask[{k}] = {x} (must be 0 or 1)"
    ))
}

/// The general path for `list[k]` (C API conversion, which may run Python code such as
/// `__index__`): the item is held by an owned reference, and a list changed meanwhile is an
/// error rather than a stale length.
fn slow_item(list: &Bound<'_, PyList>, n: usize, k: usize, what: &str, tag: u64) -> PyResult<i64> {
    let item = list.get_item(k)?;
    let x = item
        .extract::<i64>()
        .map_err(|_| bad_id(tag, what, k, &item))?;
    if list.len() != n {
        return Err(PyValueError::new_err(format!(
            "conversation tag {tag}: {what} list changed while it was read"
        )));
    }
    Ok(x)
}

/// The two halves of an (ids, mask) pair: a 2-tuple, or any length-2 indexable.
fn unpack_pair<'py>(pair: &Bound<'py, PyAny>) -> Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    match pair.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => Some((t.get_item(0).ok()?, t.get_item(1).ok()?)),
        _ => match (pair.get_item(0), pair.get_item(1), pair.len()) {
            (Ok(a), Ok(b), Ok(2)) => Some((a, b)),
            _ => None,
        },
    }
}

/// A checked (ids, mask) pair, or why it is bad.
type PairRead = Result<(Vec<Rank>, Vec<u8>), String>;

/// One pre-rendered pair read and checked as `Packer.feed` would, for `RenderedChunk.from_pairs`:
/// Err(message naming conversation `who`) for a bad pair; other exceptions (MemoryError, a
/// KeyboardInterrupt) propagate as themselves.
fn read_pair(py: Python<'_>, pair: &Bound<'_, PyAny>, who: u64) -> PyResult<PairRead> {
    let Some((ids, mask)) = unpack_pair(pair) else {
        return Ok(Err(format!(
            "conversation {who}: must be an (ids, mask) pair"
        )));
    };
    let read = extract_u32s(&ids, "ids", who).and_then(|ids| Ok((ids, extract_mask(&mask, who)?)));
    let (ids, mask) = match read {
        Ok(v) => v,
        Err(e)
            if e.is_instance_of::<PyValueError>(py)
                || e.is_instance_of::<PyTypeError>(py)
                || e.is_instance_of::<PyOverflowError>(py) =>
        {
            // the readers name a packer's "conversation tag {who}"; here `who` is the source's index
            let msg = e.value(py).str()?.to_string();
            let tagged = format!("conversation tag {who}: ");
            let why = msg.strip_prefix(&tagged).unwrap_or(&msg);
            return Ok(Err(format!("conversation {who}: {why}")));
        }
        Err(e) => return Err(e),
    };
    Ok(crate::pack::check_rendered(&ids, &mask)
        .map(|()| (ids, mask))
        .map_err(|why| format!("conversation {who}: {why}")))
}

/// The error for an `out` buffer numpy will not lend for writing: a read-only array, or one
/// passed twice (inputs and position_ids are both int32, so `out=(a, t, a)` is an easy slip).
fn not_writable(k: usize, name: &str, e: numpy::BorrowError) -> PyErr {
    PyValueError::new_err(format!(
        "out[{k}] ({name}) must be a writable array distinct from the other out arrays ({e})"
    ))
}

fn ids_from_list(list: &Bound<'_, PyList>, what: &str, tag: u64) -> PyResult<Vec<u32>> {
    let n = list.len();
    let ptr = list.as_ptr();
    let mut v: Vec<u32> = Vec::with_capacity(n);
    // Fast loop: exact small ints read in place, until the first item that is not one.
    if let Some(layout) = int_layout(list.py()) {
        for k in 0..n {
            // SAFETY: GIL held, k < len, no Python code runs in this loop; PyList_GET_ITEM
            // returns a borrowed reference.
            let x = unsafe { small_int(ffi::PyList_GET_ITEM(ptr, k as ffi::Py_ssize_t), layout) };
            match x {
                Some(x) => v.push(x),
                None => break,
            }
        }
    }
    // General loop for the rest (bool, NumPy scalars, big ints, errors...).
    for k in v.len()..n {
        // SAFETY: as above; `slow_item` re-checks the length after running any Python code.
        let fast = match int_layout(list.py()) {
            Some(l) => unsafe { small_int(ffi::PyList_GET_ITEM(ptr, k as ffi::Py_ssize_t), l) },
            None => None,
        };
        let x = match fast {
            Some(x) => x,
            None => {
                let x = slow_item(list, n, k, what, tag)?;
                if !(0..=u32::MAX as i64).contains(&x) {
                    return Err(bad_id(tag, what, k, &x));
                }
                x as u32
            }
        };
        v.push(x);
    }
    Ok(v)
}

fn mask_from_list(list: &Bound<'_, PyList>, tag: u64) -> PyResult<Vec<u8>> {
    // CPython caches small ints and the bools, so 0/1 items are recognised by pointer: a
    // branch-free pass first, the general loop only if some item was none of the four.
    let py = list.py();
    let zero = 0i64.into_pyobject(py)?;
    let one = 1i64.into_pyobject(py)?;
    let (zero, one) = (zero.as_ptr(), one.as_ptr());
    let (f, t) = (
        pyo3::types::PyBool::new(py, false).as_ptr(),
        pyo3::types::PyBool::new(py, true).as_ptr(),
    );
    let n = list.len();
    let ptr = list.as_ptr();
    let mut ok = true;
    let v: Vec<u8> = (0..n)
        .map(|k| {
            // SAFETY: GIL held, k < len, no Python code runs here; borrowed reference,
            // compared by address only.
            let item = unsafe { ffi::PyList_GET_ITEM(ptr, k as ffi::Py_ssize_t) };
            let is_one = (item == one) | (item == t);
            ok &= is_one | (item == zero) | (item == f);
            is_one as u8
        })
        .collect();
    if ok {
        return Ok(v);
    }
    let mut v = Vec::with_capacity(n);
    for k in 0..n {
        // SAFETY: as above; the length is re-checked after any call that runs Python code.
        let item = unsafe { ffi::PyList_GET_ITEM(ptr, k as ffi::Py_ssize_t) };
        if item == zero || item == f {
            v.push(0);
        } else if item == one || item == t {
            v.push(1);
        } else {
            let item = list.get_item(k)?;
            match item.extract::<i64>() {
                Ok(m @ 0..=1) => v.push(m as u8),
                _ => return Err(bad_mask(tag, k, &item)),
            }
            if list.len() != n {
                return Err(PyValueError::new_err(format!(
                    "conversation tag {tag}: mask list changed while it was read"
                )));
            }
        }
    }
    Ok(v)
}

/// The elements of a 1-D NumPy array as a slice, or None when it is not C-contiguous and
/// aligned (the caller then copies it with NumPy first).
///
/// SAFETY: the caller reads the slice with the GIL held and runs no Python code meanwhile
/// (a read-only view that skips rust-numpy's borrow flags, which cost more than the read).
unsafe fn array_slice<'a, T: numpy::Element>(a: &'a Bound<'_, PyArray1<T>>) -> Option<&'a [T]> {
    let p = a.data();
    if !a.is_c_contiguous() || (p as usize) % std::mem::align_of::<T>() != 0 {
        return None;
    }
    if a.len() == 0 {
        return Some(&[]);
    }
    Some(unsafe { std::slice::from_raw_parts(p as *const T, a.len()) })
}

/// 1-D integer arrays -> ids: None if `obj` is not a 1-D integer (or bool) array.
fn ids_from_array(obj: &Bound<'_, PyAny>, what: &str, tag: u64) -> Option<PyResult<Vec<u32>>> {
    macro_rules! try_np {
        ($t:ty) => {
            if let Ok(a) = obj.cast::<PyArray1<$t>>() {
                // SAFETY: see `array_slice`; the slice is dropped before this returns.
                let s = match unsafe { array_slice(a) } {
                    Some(s) => s,
                    None => {
                        return Some(contiguous_copy(obj).and_then(|c| extract_u32s(&c, what, tag)))
                    }
                };
                // Range check first (branch-free, vectorised), then the cast.
                #[allow(unused_comparisons, clippy::absurd_extreme_comparisons)]
                let in_range = |x: $t| (x >= 0) & ((x as i128) <= u32::MAX as i128);
                if !s.iter().fold(true, |ok, &x| ok & in_range(x)) {
                    let k = s
                        .iter()
                        .position(|&x| !in_range(x))
                        .expect("an element is out of range");
                    return Some(Err(bad_id(tag, what, k, &s[k])));
                }
                return Some(Ok(s.iter().map(|&x| x as u32).collect()));
            }
        };
    }
    try_np!(u32);
    try_np!(i32);
    try_np!(i64);
    try_np!(u64);
    try_np!(u16);
    try_np!(i16);
    try_np!(u8);
    try_np!(i8);
    if let Ok(a) = obj.cast::<PyArray1<bool>>() {
        return Some(bool_bytes(obj, a).map(|b| b.into_iter().map(u32::from).collect()));
    }
    None
}

/// A bool array's elements as 0/1 bytes (any nonzero byte is True, as in NumPy).
fn bool_bytes(obj: &Bound<'_, PyAny>, a: &Bound<'_, PyArray1<bool>>) -> PyResult<Vec<u8>> {
    if !a.is_c_contiguous() {
        let c = contiguous_copy(obj)?;
        let a = c.cast::<PyArray1<bool>>()?;
        return bool_bytes(&c, a);
    }
    // Read as bytes, not `bool`s: a bool array viewed from arbitrary bytes may hold values
    // other than 0 and 1, which would be undefined behaviour as Rust `bool`.
    // SAFETY: GIL held, contiguous, `len` one-byte elements; no Python code runs meanwhile.
    let s = unsafe { std::slice::from_raw_parts(a.data() as *const u8, a.len()) };
    Ok(s.iter().map(|&b| (b != 0) as u8).collect())
}

fn contiguous_copy<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    obj.call_method0("copy")
}

/// ids or mask from a list of ints or a 1-D integer NumPy array (anything else that
/// converts to a sequence of ints, e.g. a tuple, through PyO3).
fn extract_u32s(obj: &Bound<'_, PyAny>, what: &str, tag: u64) -> PyResult<Vec<u32>> {
    if let Ok(list) = obj.cast::<PyList>() {
        return ids_from_list(list, what, tag);
    }
    if let Some(r) = ids_from_array(obj, what, tag) {
        return r;
    }
    obj.extract::<Vec<u32>>().map_err(|_| {
        PyValueError::new_err(format!("conversation tag {tag}: {what} must be a list of non-negative ints or a 1-D integer array"))
    })
}

fn extract_mask(obj: &Bound<'_, PyAny>, tag: u64) -> PyResult<Vec<u8>> {
    if let Ok(list) = obj.cast::<PyList>() {
        return mask_from_list(list, tag);
    }
    if let Ok(a) = obj.cast::<PyArray1<u8>>() {
        // SAFETY: see `array_slice`; the slice is dropped before this returns.
        if let Some(s) = unsafe { array_slice(a) } {
            if s.iter().fold(true, |ok, &m| ok & (m <= 1)) {
                return Ok(s.to_vec());
            }
            let k = s
                .iter()
                .position(|&m| m > 1)
                .expect("an element is out of range");
            return Err(bad_mask(tag, k, &s[k]));
        }
    }
    if let Ok(a) = obj.cast::<PyArray1<bool>>() {
        return bool_bytes(obj, a);
    }
    let v = extract_u32s(obj, "mask", tag)?;
    v.iter()
        .enumerate()
        .map(|(k, &m)| {
            if m <= 1 {
                Ok(m as u8)
            } else {
                Err(bad_mask(tag, k, &m))
            }
        })
        .collect()
}

/// One packed batch. Arrays are (num_rows, T): inputs int32, targets int64 (-1 = ignore),
/// position_ids int32 (restart at each conversation).
#[pyclass(name = "Batch", module = "sftfast._core", frozen)]
pub struct PyBatch {
    #[pyo3(get)]
    inputs: Py<PyAny>,
    #[pyo3(get)]
    targets: Py<PyAny>,
    #[pyo3(get)]
    position_ids: Py<PyAny>,
    info: BatchInfo,
}

#[pymethods]
impl PyBatch {
    /// Per row, segment lengths over the T input positions (conversations, then the padding
    /// tail if any); each row's segments sum to T.
    #[getter]
    fn doc_lens(&self) -> Vec<Vec<u32>> {
        self.info.doc_lens.clone()
    }
    /// Per row, the number of conversations in it.
    #[getter]
    fn row_docs(&self) -> Vec<u32> {
        self.info.row_docs.clone()
    }
    /// Cumulative segment offsets over the flattened (num_rows * T) inputs, int32, starting
    /// with 0 (flash-attention varlen's `cu_seqlens`).
    #[getter]
    fn cu_seqlens<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i32>> {
        let mut v = vec![0i32];
        let mut acc = 0i32;
        for row in &self.info.doc_lens {
            for &l in row {
                acc += l as i32;
                v.push(acc);
            }
        }
        PyArray1::from_vec(py, v)
    }
    #[getter]
    fn num_rows(&self) -> usize {
        self.info.num_rows
    }
    #[getter]
    fn seq_len(&self) -> usize {
        self.info.t
    }
    #[getter]
    fn num_supervised(&self) -> usize {
        self.info.num_supervised
    }
    #[getter]
    fn num_pad(&self) -> usize {
        self.info.num_pad
    }
    #[getter]
    fn num_truncated(&self) -> usize {
        self.info.num_truncated
    }
    #[getter]
    fn truncated_tokens(&self) -> usize {
        self.info.truncated_tokens
    }
    #[getter]
    fn empty_rows(&self) -> usize {
        self.info.empty_rows
    }
    /// Tags (source indices) of the conversations in this batch, in placement order.
    #[getter]
    fn tags(&self) -> Vec<u64> {
        self.info.tags.clone()
    }
    fn __repr__(&self) -> String {
        format!(
            "Batch(rows={}, T={}, supervised={}, pad={}, truncated={}, empty_rows={})",
            self.info.num_rows,
            self.info.t,
            self.info.num_supervised,
            self.info.num_pad,
            self.info.num_truncated,
            self.info.empty_rows
        )
    }
}

#[pyclass(name = "Packer", module = "sftfast._core")]
pub struct PyPacker {
    inner: Packer,
    mode: &'static str,
}

/// First `n` elements of a contiguous array, viewed as (rows, t) (Python-level view ops).
fn view2<'py>(buf: &Bound<'py, PyAny>, rows: usize, t: usize) -> PyResult<Bound<'py, PyAny>> {
    let flat = buf.call_method1("reshape", (-1,))?;
    let head = flat.get_item(pyo3::types::PySlice::new(
        buf.py(),
        0,
        (rows * t) as isize,
        1,
    ))?;
    head.call_method1("reshape", ((rows, t),))
}

fn slice_mut<'a, T: numpy::Element>(
    a: &'a mut numpy::PyReadwriteArrayDyn<'_, T>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("out buffer {what} must be C-contiguous")))
}

impl PyPacker {
    fn feed_chunk(
        &mut self,
        chunk: &mut PyRenderedChunk,
        tags: &[u64],
    ) -> PyResult<Vec<(u64, String)>> {
        if chunk.fed {
            return Err(PyValueError::new_err(
                "this RenderedChunk was already fed to a packer",
            ));
        }
        check_len("tags", Some(tags), chunk.len, "conversations in the chunk")?;
        chunk.fed = true;
        for (i, ids, mask) in std::mem::take(&mut chunk.items) {
            self.inner.feed(ids, mask, tags[i])?;
        }
        Ok(chunk
            .errors
            .iter()
            .map(|(i, m)| (tags[*i], m.clone()))
            .collect())
    }

    /// Feeds `rendered[start..end]`; conversation i's tag is `tags[i]`, or i.
    fn feed_range(
        &mut self,
        rendered: &Bound<'_, PyAny>,
        start: usize,
        end: usize,
        tags: Option<&[u64]>,
    ) -> PyResult<()> {
        let list = rendered.cast::<PyList>().ok();
        for i in start..end {
            let tag = tags.map_or(i as u64, |t| t[i]);
            let pair = match list {
                Some(l) => l.get_item(i)?,
                None => rendered.get_item(i)?,
            };
            let (ids, mask) = unpack_pair(&pair).ok_or_else(|| {
                PyValueError::new_err(format!("rendered[{i}] must be an (ids, mask) pair"))
            })?;
            let ids = extract_u32s(&ids, "ids", tag)?;
            let mask = extract_mask(&mask, tag)?;
            self.inner.feed(ids, mask, tag)?;
        }
        Ok(())
    }
}

#[pymethods]
impl PyPacker {
    #[new]
    #[pyo3(signature = (mode, batch_size, seq_len, bos_id, buffer_size=100))]
    fn new(
        mode: &str,
        batch_size: usize,
        seq_len: usize,
        bos_id: u32,
        buffer_size: usize,
    ) -> PyResult<Self> {
        let m = Mode::parse(mode)?;
        let inner = Packer::new(m, batch_size, seq_len, bos_id, buffer_size)?;
        Ok(Self {
            inner,
            mode: if m == Mode::BestFit {
                "bestfit"
            } else {
                "padded"
            },
        })
    }

    #[getter]
    fn mode(&self) -> &'static str {
        self.mode
    }
    #[getter]
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }
    #[getter]
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }
    /// Conversations held (not yet in a batch).
    #[getter]
    fn num_held(&self) -> usize {
        self.inner.num_held()
    }
    /// Tags of the held conversations, in the order a fresh packer must be fed to continue.
    fn held_tags(&self) -> Vec<u64> {
        self.inner.held_tags()
    }
    fn clear(&mut self) {
        self.inner.clear()
    }

    /// Appends rendered conversations: (ids, mask) pairs of lists or 1-D integer arrays.
    /// tags default to 0, 1, 2, ... within this call.
    #[pyo3(signature = (rendered, tags=None))]
    fn feed(&mut self, rendered: &Bound<'_, PyAny>, tags: Option<Vec<u64>>) -> PyResult<()> {
        let n = rendered.len()?;
        check_len("tags", tags.as_deref(), n, "conversations")?;
        self.feed_range(rendered, 0, n, tags.as_deref())
    }

    /// Walks, renders (in parallel, GIL released) and feeds conversation dicts, with no Python
    /// lists of tokens in between: `tokenizer.render_chunk` + `feed_rendered` in one call.
    /// Returns [(tag, message)] of the bad ones when on_error="skip" (empty otherwise; "fail"
    /// raises at the first). `indices` (default: the tags) name the conversations in errors.
    #[pyo3(signature = (tokenizer, conversations, tags, max_tokens=2048, num_threads=None, on_error="fail", indices=None))]
    #[allow(clippy::too_many_arguments)]
    fn feed_conversations(
        &mut self,
        py: Python<'_>,
        tokenizer: &Bound<'_, PyAny>,
        conversations: &Bound<'_, PyAny>,
        tags: Vec<u64>,
        max_tokens: usize,
        num_threads: Option<usize>,
        on_error: &str,
        indices: Option<Vec<i64>>,
    ) -> PyResult<Vec<(u64, String)>> {
        check_len("tags", Some(&tags), conversations.len()?, "conversations")?;
        let core = core_tokenizer(tokenizer)?;
        let indices = Some(indices.unwrap_or_else(|| tags.iter().map(|&t| t as i64).collect()));
        let mut chunk = render_chunk(
            py,
            &core.borrow(),
            conversations,
            max_tokens,
            num_threads,
            on_error,
            indices,
        )?;
        self.feed_chunk(&mut chunk, &tags)
    }

    /// Feeds a chunk from `Tokenizer.render_chunk`: its conversations move into the packer
    /// (the chunk is empty afterwards and cannot feed again); `tags[i]` is the tag of the
    /// chunk's conversation i. Returns [(tag, message)] of its bad ones (on_error="skip").
    fn feed_rendered(
        &mut self,
        chunk: &Bound<'_, PyRenderedChunk>,
        tags: Vec<u64>,
    ) -> PyResult<Vec<(u64, String)>> {
        self.feed_chunk(&mut chunk.borrow_mut(), &tags)
    }

    /// The next batch, or None (flush=False: not enough conversations fed yet; flush=True:
    /// nothing left; the last flushed batch may have fewer rows). `out`: optional
    /// (inputs int32, targets int64, position_ids int32) C-contiguous arrays with at least
    /// batch_size * seq_len elements each (e.g. pinned torch tensors' .numpy()); the batch's
    /// arrays are then views of their first rows * T elements.
    #[pyo3(signature = (flush=false, out=None))]
    fn next_batch(
        &mut self,
        py: Python<'_>,
        flush: bool,
        out: Option<(Bound<'_, PyAny>, Bound<'_, PyAny>, Bound<'_, PyAny>)>,
    ) -> PyResult<Option<PyBatch>> {
        let plan = match self.inner.plan(flush) {
            Some(p) => p,
            None => return Ok(None),
        };
        let (rows, t) = (plan.num_rows, plan.t);
        let inner = &mut self.inner;
        match out {
            None => {
                let (info, a, b, c) = py.detach(|| inner.commit_owned(&plan))?;
                let a = PyArray1::from_vec(py, a).reshape([rows, t])?;
                let b = PyArray1::from_vec(py, b).reshape([rows, t])?;
                let c = PyArray1::from_vec(py, c).reshape([rows, t])?;
                Ok(Some(PyBatch {
                    inputs: a.into_any().unbind(),
                    targets: b.into_any().unbind(),
                    position_ids: c.into_any().unbind(),
                    info,
                }))
            }
            Some((oa, ob, oc)) => {
                let mut ra = oa
                    .cast::<numpy::PyArrayDyn<i32>>()
                    .map_err(|_| {
                        PyValueError::new_err("out[0] (inputs) must be an int32 numpy array")
                    })?
                    .try_readwrite()
                    .map_err(|e| not_writable(0, "inputs", e))?;
                let mut rb = ob
                    .cast::<numpy::PyArrayDyn<i64>>()
                    .map_err(|_| {
                        PyValueError::new_err("out[1] (targets) must be an int64 numpy array")
                    })?
                    .try_readwrite()
                    .map_err(|e| not_writable(1, "targets", e))?;
                let mut rc = oc
                    .cast::<numpy::PyArrayDyn<i32>>()
                    .map_err(|_| {
                        PyValueError::new_err("out[2] (position_ids) must be an int32 numpy array")
                    })?
                    .try_readwrite()
                    .map_err(|e| not_writable(2, "position_ids", e))?;
                let (sa, sb, sc) = (
                    slice_mut(&mut ra, "inputs")?,
                    slice_mut(&mut rb, "targets")?,
                    slice_mut(&mut rc, "position_ids")?,
                );
                let info = py.detach(|| {
                    inner.commit(
                        &plan,
                        BatchOut {
                            inputs: sa,
                            targets: sb,
                            position_ids: sc,
                        },
                    )
                })?;
                drop((ra, rb, rc));
                Ok(Some(PyBatch {
                    inputs: view2(&oa, rows, t)?.unbind(),
                    targets: view2(&ob, rows, t)?.unbind(),
                    position_ids: view2(&oc, rows, t)?.unbind(),
                    info,
                }))
            }
        }
    }

    /// One shot: feeds `rendered` (tags 0..n) and returns every batch (flushing at the end).
    /// Fed PACK_CHUNK conversations at a time, taking the batches each chunk completes: the
    /// same batches as feeding everything first (a batch that needs unfed input waits), with
    /// only a chunk's tokens held in between.
    fn pack(&mut self, py: Python<'_>, rendered: &Bound<'_, PyAny>) -> PyResult<Vec<PyBatch>> {
        let n = rendered.len()?;
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + PACK_CHUNK).min(n);
            self.feed_range(rendered, start, end, None)?;
            while let Some(b) = self.next_batch(py, false, None)? {
                out.push(b);
            }
            start = end;
        }
        while let Some(b) = self.next_batch(py, true, None)? {
            out.push(b);
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "Packer(mode={:?}, batch_size={}, seq_len={}, held={})",
            self.mode,
            self.inner.batch_size(),
            self.inner.seq_len(),
            self.inner.num_held()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Record the importing process now, so a child forked before any parallel call still
    // knows it is a child.
    int_layout(m.py());
    m.add_class::<PyPacker>()?;
    m.add_class::<PyBatch>()?;
    m.add_class::<PyRenderedChunk>()?;
    m.add_function(wrap_pyfunction!(_rendered_chunk_from_state, m)?)?;
    Ok(())
}
