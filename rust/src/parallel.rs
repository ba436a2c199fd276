//! Rayon thread pools by size, safe across fork.
//!
//! `encode_batch(num_threads=n)` and training run on a pool of `n` threads, built once and
//! reused. A process that forks after using a pool (DataLoader workers, multiprocessing)
//! gets a child with the pool's memory but none of its threads: using it would hang. So,
//! as HF tokenizers does, the child drops every pool (`forget_after_fork`, hooked to
//! `os.register_at_fork` by the Python package) and builds fresh ones on first use.
//!
//! The registry sits behind an `AtomicPtr` to a leaked mutex rather than a plain static
//! mutex: a parent thread may hold the lock at the moment of the fork, and the child must
//! not wait on it; it swaps in a new registry instead (the old one leaks, a few bytes).

use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

type Registry = Mutex<Vec<(usize, Arc<ThreadPool>)>>;

static REGISTRY: AtomicPtr<Registry> = AtomicPtr::new(std::ptr::null_mut());

fn registry() -> &'static Registry {
    let p = REGISTRY.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: registries are leaked, never freed, so the pointer stays valid.
        return unsafe { &*p };
    }
    let fresh = Box::into_raw(Box::new(Mutex::new(Vec::new())));
    match REGISTRY.compare_exchange(
        std::ptr::null_mut(),
        fresh,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => unsafe { &*fresh },
        Err(existing) => {
            // SAFETY: `fresh` was never shared; `existing` is leaked like every registry.
            drop(unsafe { Box::from_raw(fresh) });
            unsafe { &*existing }
        }
    }
}

/// Number of threads when the caller does not say: the CPUs this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The pool of `n` threads (`None`: `default_threads()`), built on first use. Fails (rather
/// than panics) when the threads cannot be spawned, e.g. under a process limit.
pub fn pool(n: Option<usize>) -> Result<Arc<ThreadPool>> {
    let n = n.unwrap_or_else(default_threads).max(1);
    let mut pools = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(k, _)| *k == n) {
        return Ok(p.clone());
    }
    let p = ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("sftfast-{i}"))
        .build()
        .map_err(|e| Error::Other(format!("could not start a pool of {n} threads: {e}")))?;
    let p = Arc::new(p);
    pools.push((n, p.clone()));
    Ok(p)
}

/// Runs `f` on the pool of `n` threads.
pub fn install<R: Send>(n: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(pool(n)?.install(f))
}

/// In a freshly forked child: forget every pool (their threads do not exist here).
pub fn forget_after_fork() {
    let fresh = Box::into_raw(Box::new(Mutex::new(Vec::new())));
    // The old registry and its pools are leaked on purpose: dropping a pool would try to
    // join threads that were not copied by fork.
    REGISTRY.store(fresh, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_reused_and_sized() {
        let a = pool(Some(2)).unwrap();
        let b = pool(Some(2)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(install(Some(3), rayon::current_num_threads).unwrap(), 3);
        forget_after_fork();
        assert!(!Arc::ptr_eq(&a, &pool(Some(2)).unwrap()));
    }
}
