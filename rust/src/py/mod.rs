//! The thin PyO3 layer: converts types, releases the GIL for real work, maps errors.
//! Every #[pyfunction] / #[pymethods] of the extension lives under this module.

use pyo3::prelude::*;

mod data;
mod errors;
mod shards;
mod tokenizer;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    tokenizer::register(m)?;
    data::register(m)?;
    shards::register(m)?;
    Ok(())
}
