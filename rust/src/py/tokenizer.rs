//! Python binding of the BPE tokenizer. `sftfast.tokenizer.Tokenizer` (Python) wraps this.
//!
//! Every method that does real work releases the GIL (`py.detach`); batch work runs on the
//! sized rayon pools of `crate::parallel`.

use crate::bpe::{CoreBPE, Rank};
use crate::error::Error;
use crate::parallel;
use crate::pretokenize::{CL100K_PATTERN, NANOCHAT_PATTERN, O200K_PATTERN};
use crate::train::Trainer;
use crate::vocab_io;
use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyList;
use pyo3::types::{PyBytes, PyDict};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Python ints 0..n, shared by every tokenizer (an int is an int): building the list of ids
/// then costs one reference-count increment per id instead of allocating an int object per
/// id (ids above 256 are not cached by CPython). Capped so a huge vocabulary cannot make it
/// large: ~3 MB for cl100k; ids above the cap get fresh ints.
static INT_CACHE: Mutex<Vec<Py<PyAny>>> = Mutex::new(Vec::new());
const INT_CACHE_MAX: usize = 1 << 20;

fn ids_to_list<'py>(py: Python<'py>, ids: &[Rank], n_vocab: usize) -> PyResult<Bound<'py, PyList>> {
    // Only taken with the GIL held, and nothing below releases it: no deadlock.
    let mut cache = INT_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let want = n_vocab.min(INT_CACHE_MAX);
    while cache.len() < want {
        let i = cache.len();
        cache.push(i.into_pyobject(py)?.into_any().unbind());
    }
    // SAFETY: a new list of len(ids) slots, each filled exactly once with a new reference
    // (PyList_SET_ITEM steals it) before the list is exposed to Python.
    unsafe {
        let list = ffi::PyList_New(ids.len() as ffi::Py_ssize_t);
        if list.is_null() {
            return Err(PyErr::fetch(py));
        }
        let list = Bound::from_owned_ptr(py, list).cast_into_unchecked::<PyList>();
        for (i, &id) in ids.iter().enumerate() {
            let item = match cache.get(id as usize) {
                Some(obj) => {
                    let p = obj.as_ptr();
                    ffi::Py_INCREF(p);
                    p
                }
                None => {
                    let p = ffi::PyLong_FromUnsignedLong(id as std::os::raw::c_ulong);
                    if p.is_null() {
                        return Err(PyErr::fetch(py)); // the list's empty slots are NULL-safe
                    }
                    p
                }
            };
            ffi::PyList_SET_ITEM(list.as_ptr(), i as ffi::Py_ssize_t, item);
        }
        Ok(list)
    }
}

#[pyclass(name = "CoreTokenizer", module = "sftfast._core", frozen)]
pub struct PyCoreTokenizer {
    pub inner: Arc<CoreBPE>,
}

/// Special tokens get the ids right after the largest rank, in the order given.
fn specials_after(ranks: &FxHashMap<Vec<u8>, Rank>, names: Vec<String>) -> Vec<(String, Rank)> {
    let base = ranks.values().copied().max().map_or(0, |r| r + 1);
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, base + i as Rank))
        .collect()
}

fn check_threads(num_threads: Option<usize>) -> PyResult<Option<usize>> {
    match num_threads {
        Some(0) => {
            Err(Error::Other("num_threads must be at least 1 (or None for all CPUs)".into()).into())
        }
        n => Ok(n),
    }
}

#[pymethods]
impl PyCoreTokenizer {
    /// ranks: bytes -> rank; specials: (name, id) pairs.
    #[staticmethod]
    fn from_ranks(
        py: Python<'_>,
        ranks: FxHashMap<Vec<u8>, Rank>,
        pattern: &str,
        specials: Vec<(String, Rank)>,
    ) -> PyResult<Self> {
        let pattern = pattern.to_string();
        let inner = py.detach(move || CoreBPE::new(ranks, &pattern, specials))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Reads a tiktoken rank file; special tokens get the ids after the largest rank.
    #[staticmethod]
    fn from_tiktoken_file(
        py: Python<'_>,
        path: PathBuf,
        pattern: &str,
        special_tokens: Vec<String>,
    ) -> PyResult<Self> {
        let pattern = pattern.to_string();
        let inner = py.detach(move || {
            let ranks = vocab_io::load_tiktoken_file(&path)?;
            let specials = specials_after(&ranks, special_tokens);
            CoreBPE::new(ranks, &pattern, specials)
        })?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Reads a file written by `save` (format in `sftfast.tokenizer`'s docstring).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(move || vocab_io::load_tokenizer(&path))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Parses the bytes of a tokenizer file (what `to_bytes` returns).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let inner = py.detach(|| vocab_io::parse_tokenizer_file(data, "<bytes>"))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The tokenizer file's contents, as bytes (used to pickle a Tokenizer).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let inner = &self.inner;
        let data = py.detach(|| vocab_io::to_tokenizer_file(inner));
        PyBytes::new(py, &data)
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let inner = &self.inner;
        Ok(py.detach(|| vocab_io::save_tokenizer(inner, &path))?)
    }

    /// Trains on the strings of `texts` (any iterable), pulled in batches; `vocab_size`
    /// counts the special tokens. Returns the tokenizer and a dict of corpus facts.
    #[staticmethod]
    #[pyo3(signature = (texts, vocab_size, pattern, special_tokens, num_threads=None, batch_size=4096))]
    fn train<'py>(
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        vocab_size: usize,
        pattern: &str,
        special_tokens: Vec<String>,
        num_threads: Option<usize>,
        batch_size: usize,
    ) -> PyResult<(Self, Bound<'py, PyDict>)> {
        let num_threads = check_threads(num_threads)?;
        let n_ranks = vocab_size.checked_sub(special_tokens.len()).filter(|&n| n >= 256).ok_or_else(|| {
            Error::Vocab(format!(
                "vocab_size {vocab_size} is too small: 256 byte tokens + {} special tokens at least",
                special_tokens.len()
            ))
        })?;
        let mut trainer = Trainer::new(pattern)?;
        let mut batch: Vec<PyBackedStr> = Vec::with_capacity(batch_size.max(1));
        let mut batch_bytes = 0usize;
        let flush = |trainer: &mut Trainer, batch: &mut Vec<PyBackedStr>| -> PyResult<()> {
            py.detach(|| parallel::install(num_threads, || trainer.add_documents(batch)))?;
            batch.clear();
            Ok(())
        };
        for (index, item) in texts.try_iter()?.enumerate() {
            let item = item?;
            let s: PyBackedStr = match item.extract() {
                Ok(s) => s,
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyUnicodeEncodeError>(py) => {
                    // Lone surrogates: the same repair tiktoken applies before encoding.
                    let fixed = item
                        .call_method1("encode", ("utf-16", "surrogatepass"))?
                        .call_method1("decode", ("utf-16", "replace"))?;
                    fixed.extract()?
                }
                Err(_) => {
                    return Err(PyTypeError::new_err(format!(
                        "texts[{index}] is a {}, not a str",
                        item.get_type().name()?
                    )))
                }
            };
            batch_bytes += s.len();
            batch.push(s);
            // Bound the batch by documents and by bytes, so memory stays flat on huge corpora.
            if batch.len() >= batch_size.max(1) || batch_bytes >= 64 << 20 {
                flush(&mut trainer, &mut batch)?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            flush(&mut trainer, &mut batch)?;
        }
        let specials_names = special_tokens;
        let (inner, stats) = py.detach(move || -> crate::error::Result<_> {
            let trained = parallel::install(num_threads, || trainer.train(n_ranks))??;
            let specials = specials_after(&trained.ranks, specials_names);
            let stats = (
                trained.n_documents,
                trained.n_bytes,
                trained.n_unique_pieces,
                trained.n_missing,
            );
            Ok((CoreBPE::new(trained.ranks, pattern, specials)?, stats))
        })?;
        let d = PyDict::new(py);
        d.set_item("n_documents", stats.0)?;
        d.set_item("n_bytes", stats.1)?;
        d.set_item("n_unique_pieces", stats.2)?;
        d.set_item("n_missing_merges", stats.3)?;
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            d,
        ))
    }

    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyList>> {
        let inner = &self.inner;
        let ids = py.detach(|| inner.encode_ordinary(text));
        ids_to_list(py, &ids, inner.n_vocab())
    }

    /// Encodes each text in parallel (GIL released) on `num_threads` threads (None: all CPUs).
    #[pyo3(signature = (texts, num_threads=None))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<PyBackedStr>,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let num_threads = check_threads(num_threads)?;
        let inner = &self.inner;
        let all = py.detach(|| -> crate::error::Result<Vec<Vec<Rank>>> {
            if num_threads == Some(1) || texts.len() <= 1 {
                return Ok(texts.iter().map(|t| inner.encode_ordinary(t)).collect());
            }
            parallel::install(num_threads, || {
                texts.par_iter().map(|t| inner.encode_ordinary(t)).collect()
            })
        })?;
        let n_vocab = inner.n_vocab();
        let lists = all
            .iter()
            .map(|ids| ids_to_list(py, ids, n_vocab))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, lists)
    }

    /// Bytes of `ids`; a negative or out-of-range id raises TokenOutOfRangeError naming its index.
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &self.inner;
        let bytes = py.detach(|| -> crate::error::Result<Vec<u8>> {
            let n_vocab = inner.n_vocab();
            let mut ids32 = Vec::with_capacity(ids.len());
            for (index, &id) in ids.iter().enumerate() {
                if id < 0 || id >= n_vocab as i64 {
                    return Err(Error::TokenOutOfRange {
                        id: id.clamp(0, u32::MAX as i64) as u32,
                        index,
                        n_vocab,
                    });
                }
                ids32.push(id as Rank);
            }
            inner.decode_bytes(&ids32)
        });
        match bytes {
            Ok(b) => Ok(PyBytes::new(py, &b)),
            Err(Error::TokenOutOfRange { index, n_vocab, .. }) => {
                Err(crate::py::errors::TokenOutOfRangeError::new_err(format!(
                    "token id {} at index {index} is out of range (vocabulary size {n_vocab})",
                    ids[index]
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }

    /// Number of ordinary (mergeable) tokens: the largest rank + 1.
    #[getter]
    fn n_ranks(&self) -> usize {
        self.inner.n_ranks()
    }

    #[getter]
    fn pattern(&self) -> &str {
        self.inner.pattern()
    }

    fn special_token_id(&self, name: &str) -> PyResult<Rank> {
        self.inner
            .special_token_id(name)
            .ok_or_else(|| crate::error::Error::UnknownSpecial(name.to_string()).into())
    }

    /// (name, id) of every special token, in order.
    fn specials(&self) -> Vec<(String, Rank)> {
        self.inner.specials().to_vec()
    }

    /// The mergeable ranks as a new dict bytes -> rank.
    fn ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (bytes, rank) in self.inner.ranks_in_order() {
            d.set_item(PyBytes::new(py, bytes), rank)?;
        }
        Ok(d)
    }

    /// Byte length of each token id (0 for special tokens), as int32.
    fn token_byte_lengths<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i32>> {
        let lens: Vec<i32> = self
            .inner
            .token_byte_lengths()
            .into_iter()
            .map(|l| l as i32)
            .collect();
        lens.into_pyarray(py)
    }
}

/// Called by the Python package in a forked child (os.register_at_fork): drops the rayon
/// pools, whose threads were not copied by fork.
#[pyfunction]
fn _reset_thread_pools() {
    parallel::forget_after_fork();
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCoreTokenizer>()?;
    m.add_function(wrap_pyfunction!(_reset_thread_pools, m)?)?;
    m.add("NANOCHAT_PATTERN", NANOCHAT_PATTERN)?;
    m.add("CL100K_PATTERN", CL100K_PATTERN)?;
    m.add("O200K_PATTERN", O200K_PATTERN)?;
    // The chat special tokens in SPEC order: the one list Python uses too.
    m.add("SPECIAL_TOKENS", crate::bpe::SPECIAL_TOKENS.to_vec())?;
    Ok(())
}
