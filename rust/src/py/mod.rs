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

/// The extension's Rust allocations (token vectors, packed batches handed to NumPy) come from
/// mimalloc, not glibc malloc. Why: `Packer.pack` returns ~16 bytes of fresh batch arrays per
/// token (112 MB for the data benchmark's 7.2 M tokens); glibc gives those blocks back to the
/// OS when they are freed (until its dynamic trim threshold has grown) and faults every page
/// in again on the next call, which was half of `pack`'s time (18-27 k minor faults per call).
/// mimalloc keeps freed pages for reuse instead of handing them back at once: best-fit `pack`
/// from lists went from 41-50 to 67-114 M tokens/s in the same benchmark (docs/BENCHMARKS.md).
/// `local_dynamic_tls`: this library is dlopen()ed by Python after many others, so it must not
/// take a slot of the static TLS block. `v2`: the mature 2.x line, whose thread start and exit
/// take no global lock (3.x takes several and, like 2.x, installs no fork handlers: a process
/// forked while another thread starts or exits could inherit one held); same `pack` speed.
/// Tuning knobs are mimalloc's `MIMALLOC_*` environment variables (e.g. `MIMALLOC_PURGE_DELAY`).
/// Python objects still come from Python's allocator, and NumPy frees our arrays through Rust,
/// so memory never crosses allocators. `cargo test` (no `python` feature) keeps the system one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
