//! Random bytes for answers, from a per-loop CSPRNG instead of a syscall
//! per request.
//!
//! The API renders a fresh 512-byte `random_seed` into every
//! `meta_data.json`, as Nova does (`os.urandom(512)` per render). Taking it
//! from `getrandom(2)` each time was the one syscall per request the API
//! made outside its ring (`scripts/bench-hops.sh` with `COUNT=1`: 1.09
//! syscalls per request, 0.09 of them `io_uring_enter`). Here each loop
//! thread keeps a ChaCha20 generator (the same cipher the kernel's own
//! generator uses) keyed from `getrandom(2)`, and takes a fresh key after
//! [`RESEED_AFTER_BYTES`] of output: one syscall per 128 seeds, and what a
//! VM gets is still unpredictable to every other VM.
//!
//! Thread-local (one per loop) because loops share nothing (STYLE habit 7)
//! and a generator behind a lock would put every loop on one cache line.
//! No fork follows the loops' start, so no two processes share a state.
//! Rejected: `rand::rng()` (ThreadRng), which panics if a reseed fails
//! where this returns the error for the handler to turn into a 500.

use std::cell::RefCell;

use rand::rngs::ChaCha20Rng;
use rand::{Rng, SeedableRng};

/// Output after which the generator is keyed afresh from the kernel.
pub const RESEED_AFTER_BYTES: usize = 64 * 1024;

struct Local {
    rng: ChaCha20Rng,
    /// Bytes handed out since the last key.
    since_key: usize,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Fill `out` with cryptographically secure random bytes.
///
/// # Errors
/// The kernel's random source failed while (re)keying the generator.
pub fn fill_random(out: &mut [u8]) -> Result<(), getrandom::Error> {
    LOCAL.with(|cell| {
        let mut slot = cell.borrow_mut();
        let local = match slot.take() {
            Some(l) if l.since_key < RESEED_AFTER_BYTES => l,
            _ => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)?;
                Local {
                    rng: ChaCha20Rng::from_seed(key),
                    since_key: 0,
                }
            }
        };
        let local = slot.insert(local);
        local.rng.fill_bytes(out);
        local.since_key += out.len();
        Ok(())
    })
}

/// Bytes handed out on this thread since the generator was last keyed
/// (`None` before the first use).
#[cfg(test)]
fn since_key() -> Option<usize> {
    LOCAL.with(|cell| cell.borrow().as_ref().map(|l| l.since_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_seeds_differ() {
        let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 512]);
    }

    #[test]
    fn loops_do_not_share_a_stream() {
        let mut here = [0u8; 64];
        fill_random(&mut here).unwrap();
        let there = std::thread::spawn(|| {
            let mut b = [0u8; 64];
            fill_random(&mut b).unwrap();
            b
        })
        .join()
        .unwrap();
        assert_ne!(here, there);
    }

    #[test]
    fn the_generator_is_rekeyed_after_its_budget() {
        let mut seed = [0u8; 512];
        fill_random(&mut seed).unwrap();
        let mut used = since_key().unwrap();
        while used < RESEED_AFTER_BYTES {
            fill_random(&mut seed).unwrap();
            let now = since_key().unwrap();
            assert!(now > used, "no rekey before the budget is spent");
            used = now;
        }
        fill_random(&mut seed).unwrap();
        assert_eq!(
            since_key(),
            Some(seed.len()),
            "rekeyed once the budget was spent"
        );
    }
}
