//! A one-entry memo for the shape-dependent plans of ops (resize coefficient tables, pooling
//! and transposed-convolution geometry, …), so that steady-state inference, which calls an
//! op with the same shapes and parameters every time, computes the plan once and then
//! allocates nothing.
//!
//! The key is built on the stack ([`PlanKey`]: input shapes and the bytes of small
//! parameter tensors, packed into words) and compared with the cached entry's key; on a
//! hit the entry is shared by reference count, which does not allocate. A miss (the first
//! call, or a shape change in a dynamic engine) builds the plan and replaces the entry.
//! Keys too long for the inline buffer are never cached: the op then builds its plan on
//! every call, which is correct, only slower.

use std::sync::{Arc, RwLock};

use kiln_core::{Result, Tensor};

/// Words a key can hold inline.
const KEY_WORDS: usize = 96;

/// A plan's cache key: a short sequence of words kept on the stack.
#[derive(Clone, PartialEq, Eq)]
pub struct PlanKey {
    len: usize,
    /// True when more words were pushed than fit: such a key never matches.
    overflowed: bool,
    words: [u64; KEY_WORDS],
}

impl Default for PlanKey {
    fn default() -> Self {
        Self::new()
    }
}

impl PlanKey {
    /// An empty key.
    pub fn new() -> Self {
        Self {
            len: 0,
            overflowed: false,
            words: [0; KEY_WORDS],
        }
    }

    /// Appends one word.
    pub fn push(&mut self, word: u64) -> &mut Self {
        if self.len == KEY_WORDS {
            self.overflowed = true;
        } else {
            self.words[self.len] = word;
            self.len += 1;
        }
        self
    }

    /// Appends a length-prefixed list of dimensions.
    pub fn push_dims(&mut self, dims: &[usize]) -> &mut Self {
        self.push(dims.len() as u64);
        for &d in dims {
            self.push(d as u64);
        }
        self
    }

    /// Appends an optional tensor: absent, or its dtype, shape and contents (8 bytes per
    /// word, zero-padded). Meant for small parameter tensors (scales, sizes, pads).
    pub fn push_tensor(&mut self, t: Option<&Tensor>) -> &mut Self {
        let Some(t) = t else {
            return self.push(u64::MAX);
        };
        self.push(t.dtype() as u64);
        self.push_dims(t.shape());
        let bytes = t.bytes();
        self.push(bytes.len() as u64);
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.push(u64::from_le_bytes(w));
        }
        self
    }

    /// Whether the key fits the inline buffer (only such keys are cached).
    pub fn is_cacheable(&self) -> bool {
        !self.overflowed
    }

    fn as_words(&self) -> &[u64] {
        &self.words[..self.len]
    }
}

/// The one cached `(key, plan)` pair of an op instance.
pub struct PlanCache<P> {
    slot: RwLock<Option<Arc<(PlanKey, P)>>>,
}

impl<P> Default for PlanCache<P> {
    fn default() -> Self {
        Self {
            slot: RwLock::new(None),
        }
    }
}

impl<P> Clone for PlanCache<P> {
    /// A clone starts empty: plans are cheap to rebuild and keyed per instance.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<P> std::fmt::Debug for PlanCache<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let filled = self.slot.read().map(|s| s.is_some()).unwrap_or(false);
        f.debug_struct("PlanCache")
            .field("filled", &filled)
            .finish()
    }
}

/// A plan taken from a [`PlanCache`] (shared, read-only).
pub struct CachedPlan<P>(Arc<(PlanKey, P)>);

impl<P> std::ops::Deref for CachedPlan<P> {
    type Target = P;
    fn deref(&self) -> &P {
        &self.0 .1
    }
}

impl<P> PlanCache<P> {
    /// The plan for `key`: the cached one when the key matches, else `build()`'s result,
    /// which replaces the cached entry when the key is cacheable.
    pub fn get_or_build(
        &self,
        key: &PlanKey,
        build: impl FnOnce() -> Result<P>,
    ) -> Result<CachedPlan<P>> {
        if key.is_cacheable() {
            // A poisoned lock only means another thread panicked mid-update of the slot,
            // which holds a complete entry or none: keep using it.
            let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = slot.as_ref() {
                if entry.0.as_words() == key.as_words() {
                    return Ok(CachedPlan(Arc::clone(entry)));
                }
            }
        }
        let entry = Arc::new((key.clone(), build()?));
        if key.is_cacheable() {
            let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
            *slot = Some(Arc::clone(&entry));
        }
        Ok(CachedPlan(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn same_key_builds_once_and_a_new_key_rebuilds() {
        let cache = PlanCache::<usize>::default();
        let builds = Cell::new(0);
        let build = |v: usize| {
            builds.set(builds.get() + 1);
            Ok(v)
        };
        let mut a = PlanKey::new();
        a.push_dims(&[1, 3, 8, 8]);
        let mut b = PlanKey::new();
        b.push_dims(&[1, 3, 8, 9]);
        assert_eq!(*cache.get_or_build(&a, || build(10)).unwrap(), 10);
        assert_eq!(*cache.get_or_build(&a, || build(11)).unwrap(), 10);
        assert_eq!(builds.get(), 1);
        assert_eq!(*cache.get_or_build(&b, || build(12)).unwrap(), 12);
        assert_eq!(*cache.get_or_build(&a, || build(13)).unwrap(), 13);
        assert_eq!(builds.get(), 3);
    }

    #[test]
    fn tensor_contents_are_part_of_the_key() {
        let t1 = Tensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
        let t2 = Tensor::from_vec(&[2], vec![1.0f32, 2.5]).unwrap();
        let mut a = PlanKey::new();
        a.push_tensor(Some(&t1));
        let mut b = PlanKey::new();
        b.push_tensor(Some(&t2));
        let mut c = PlanKey::new();
        c.push_tensor(None);
        assert!(a != b && a != c);
        let mut a2 = PlanKey::new();
        a2.push_tensor(Some(&t1));
        assert!(a == a2);
    }

    #[test]
    fn oversized_keys_are_never_cached() {
        let cache = PlanCache::<u32>::default();
        let mut k = PlanKey::new();
        for i in 0..(KEY_WORDS as u64 + 5) {
            k.push(i);
        }
        assert!(!k.is_cacheable());
        assert_eq!(*cache.get_or_build(&k, || Ok(1)).unwrap(), 1);
        assert_eq!(*cache.get_or_build(&k, || Ok(2)).unwrap(), 2);
    }
}
