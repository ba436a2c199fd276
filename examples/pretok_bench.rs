//! Pre-tokenizer throughput: fancy-regex (what tiktoken runs) vs the hand-written scanners.
//!
//!     cargo run --profile fast --example pretok_bench -- [FILE ...] [--mb N] [--fast-only]
//!
//! Reads the files (default: the crate's own sources and docs), repeats the text to about
//! N MB (default 8), splits it with each known pattern both ways and prints MB/s (best of
//! 3 runs) as one JSON line per pattern. Both ways must give the same pieces; the run
//! stops with an error if they do not. `--fast-only` skips the regex (for profiling).

use fancy_regex::Regex;
use sftfast::pretokenize::{Pretokenizer, CL100K_PATTERN, NANOCHAT_PATTERN, O200K_PATTERN};
use std::time::Instant;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("at least one run"))
}

/// FNV-1a over the piece boundaries: a cheap fingerprint to compare both ways.
fn fingerprint(h: u64, piece_len: usize) -> u64 {
    (h ^ piece_len as u64).wrapping_mul(0x0100_0000_01b3)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    let mut mb = 8.0f64;
    let mut fast_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--fast-only" {
            fast_only = true;
        } else if a == "--mb" {
            mb = args.next().ok_or("--mb needs a value")?.parse()?;
        } else {
            files.push(a);
        }
    }
    if files.is_empty() {
        let root = env!("CARGO_MANIFEST_DIR");
        for f in [
            "rust/src/bpe.rs",
            "rust/src/pretokenize.rs",
            "rust/src/chat.rs",
            "README.md",
            "Cargo.toml",
        ] {
            files.push(format!("{root}/{f}"));
        }
    }
    let mut sample = String::new();
    for f in &files {
        sample.push_str(&std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?);
        sample.push('\n');
    }
    if sample.trim().is_empty() {
        return Err("no text in the input files".into());
    }
    let reps = ((mb * 1e6) / sample.len() as f64).ceil().max(1.0) as usize;
    let text = sample.repeat(reps);
    let megabytes = text.len() as f64 / 1e6;

    // The first fast Pretokenizer builds the process-wide class table.
    let t = Instant::now();
    Pretokenizer::new(NANOCHAT_PATTERN)?;
    println!(
        "{{\"first_new_ms\": {:.2}}}",
        t.elapsed().as_secs_f64() * 1e3
    );

    for (name, pattern) in [
        ("nanochat", NANOCHAT_PATTERN),
        ("cl100k", CL100K_PATTERN),
        ("o200k", O200K_PATTERN),
    ] {
        let regex = Regex::new(pattern)?;
        let fast = Pretokenizer::new(pattern)?;
        assert!(fast.is_fast());
        let (t_fast, (n_fast, h_fast)) = best_of(if fast_only { 20 } else { 3 }, || {
            let (mut n, mut h) = (0usize, 0xcbf2_9ce4_8422_2325u64);
            fast.for_each_piece(&text, |p| {
                n += 1;
                h = fingerprint(h, p.len());
            });
            (n, h)
        });
        if fast_only {
            println!("{{\"pattern\": \"{name}\", \"mb\": {megabytes:.2}, \"pieces\": {n_fast}, \"fast_mb_s\": {:.1}}}", megabytes / t_fast);
            continue;
        }
        let (t_regex, (n_regex, h_regex)) = best_of(3, || {
            let (mut n, mut h) = (0usize, 0xcbf2_9ce4_8422_2325u64);
            for m in regex.find_iter(&text) {
                let m = m.expect("fancy-regex failed on the benchmark text");
                n += 1;
                h = fingerprint(h, m.as_str().len());
            }
            (n, h)
        });
        if (n_regex, h_regex) != (n_fast, h_fast) {
            return Err(format!("{name}: pieces differ ({n_regex} regex vs {n_fast} fast)").into());
        }
        println!(
            "{{\"pattern\": \"{name}\", \"mb\": {megabytes:.2}, \"pieces\": {n_fast}, \"regex_mb_s\": {:.1}, \"fast_mb_s\": {:.1}, \"speedup\": {:.1}}}",
            megabytes / t_regex,
            megabytes / t_fast,
            t_regex / t_fast
        );
    }
    Ok(())
}
