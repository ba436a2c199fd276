//! Python binding of the BPE tokenizer. `sftfast.tokenizer.Tokenizer` (Python) wraps this.

use crate::bpe::{CoreBPE, Rank};
use pyo3::prelude::*;
use rustc_hash::FxHashMap;
use std::sync::Arc;

#[pyclass(name = "CoreTokenizer", module = "sftfast._core", frozen)]
pub struct PyCoreTokenizer {
    pub inner: Arc<CoreBPE>,
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
        Ok(Self { inner: Arc::new(inner) })
    }

    fn encode(&self, py: Python<'_>, text: &str) -> Vec<Rank> {
        let inner = &self.inner;
        py.detach(|| inner.encode_ordinary(text))
    }

    fn decode_bytes(&self, py: Python<'_>, ids: Vec<Rank>) -> PyResult<std::borrow::Cow<'static, [u8]>> {
        let inner = &self.inner;
        Ok(std::borrow::Cow::Owned(py.detach(|| inner.decode_bytes(&ids))?))
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
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
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCoreTokenizer>()?;
    Ok(())
}
