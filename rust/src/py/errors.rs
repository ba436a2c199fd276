//! Each core error variant gets its own Python exception class (polars' error.rs is the model).
//! All derive from `SftfastError`, which derives from `ValueError` so callers that catch
//! ValueError keep working.

use crate::error::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyIOError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    sftfast._core,
    SftfastError,
    PyValueError,
    "Base class of sftfast's errors."
);
create_exception!(
    sftfast._core,
    PatternError,
    SftfastError,
    "A split pattern that does not compile."
);
create_exception!(
    sftfast._core,
    RankFileError,
    SftfastError,
    "A malformed rank/vocabulary file (names the line)."
);
create_exception!(
    sftfast._core,
    VocabError,
    SftfastError,
    "An inconsistent vocabulary."
);
create_exception!(
    sftfast._core,
    UnknownSpecialTokenError,
    SftfastError,
    "A special token name that is not in the vocabulary."
);
create_exception!(
    sftfast._core,
    TokenOutOfRangeError,
    SftfastError,
    "A token id outside the vocabulary (names its index)."
);
create_exception!(
    sftfast._core,
    ConversationError,
    SftfastError,
    "A malformed conversation (names where and which message)."
);
create_exception!(
    sftfast._core,
    BadRecordError,
    SftfastError,
    "A preprocessing input record that cannot be parsed or rendered (names file:line or index)."
);
create_exception!(
    sftfast._core,
    ShardError,
    SftfastError,
    "A missing or inconsistent shard directory, or an index outside it."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Pattern(_) => PatternError::new_err(msg),
            Error::RankFile { .. } => RankFileError::new_err(msg),
            Error::Vocab(_) => VocabError::new_err(msg),
            Error::UnknownSpecial(_) => UnknownSpecialTokenError::new_err(msg),
            Error::TokenOutOfRange { .. } => TokenOutOfRangeError::new_err(msg),
            Error::Conversation { .. } => ConversationError::new_err(msg),
            Error::Record { .. } => BadRecordError::new_err(msg),
            Error::Shard(_) => ShardError::new_err(msg),
            Error::Io(_) => PyIOError::new_err(msg),
            Error::Other(_) => SftfastError::new_err(msg),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SftfastError", py.get_type::<SftfastError>())?;
    m.add("PatternError", py.get_type::<PatternError>())?;
    m.add("RankFileError", py.get_type::<RankFileError>())?;
    m.add("VocabError", py.get_type::<VocabError>())?;
    m.add(
        "UnknownSpecialTokenError",
        py.get_type::<UnknownSpecialTokenError>(),
    )?;
    m.add(
        "TokenOutOfRangeError",
        py.get_type::<TokenOutOfRangeError>(),
    )?;
    m.add("ConversationError", py.get_type::<ConversationError>())?;
    m.add("BadRecordError", py.get_type::<BadRecordError>())?;
    m.add("ShardError", py.get_type::<ShardError>())?;
    Ok(())
}
