//! Packing rendered conversations into batches: padded and best-fit (SPEC 4).
