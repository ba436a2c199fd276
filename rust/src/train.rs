//! BPE training from text: incremental pair counts, parallel over documents.
