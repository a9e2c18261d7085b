//! Byte storage behind tensors: 64-byte aligned heap buffers, memory-mapped plan
//! regions and slices of an execution context's activation arena.

use std::cell::UnsafeCell;
use std::sync::Arc;

/// Alignment of every tensor buffer kiln allocates (one cache line, AVX-512 friendly).
pub const ALIGN: usize = 64;

#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Block([u8; ALIGN]);

/// A zero-initialised, 64-byte aligned, fixed-length byte buffer.
#[derive(Clone)]
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            blocks: vec![Block([0; ALIGN]); len.div_ceil(ALIGN)],
            len,
        }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut buf = Self::zeroed(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<Block, u8>(&self.blocks)[..self.len]
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Block, u8>(&mut self.blocks)[..self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// The activation arena of one execution context: one aligned allocation that the memory
/// planner carves into tensor slots whose lifetimes do not overlap.
///
/// Slots are read through [`crate::Tensor`]s and written through `&mut [u8]` handed out
/// by [`Arena::slot_mut`]. The executor guarantees that a slot being written is never read
/// at the same time (the planner gives overlapping offsets only to tensors whose lifetimes
/// are disjoint), which is what makes the interior mutability below sound.
pub struct Arena {
    buf: UnsafeCell<AlignedBuf>,
}

// SAFETY: an Arena belongs to one ExecutionContext, which is `Send` but not `Sync`; the
// arena is shared (through Arc) only with tensors created by that context's executor on the
// thread that runs it. Concurrent access from several threads never happens because the
// context's `execute` takes `&mut self`.
unsafe impl Send for Arena {}
// SAFETY: see above; `Sync` is needed only so `Arc<Arena>` inside tensors is `Send`. Reads
// and writes of one slot are ordered by the executor (a slot is written by exactly one
// kernel before any reader sees it, and intra-op threads join before the next layer).
unsafe impl Sync for Arena {}

impl Arena {
    /// An arena of `len` bytes.
    pub fn new(len: usize) -> Self {
        Arena {
            buf: UnsafeCell::new(AlignedBuf::zeroed(len)),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        // SAFETY: reading the length never races with slot writes (they do not resize).
        unsafe { (*self.buf.get()).len() }
    }

    /// True when the arena is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `[offset, offset+len)` for reading.
    ///
    /// # Safety
    /// No `slot_mut` borrow of an overlapping range may be alive while the returned slice is
    /// used (the memory planner's invariant).
    pub unsafe fn slot(&self, offset: usize, len: usize) -> &[u8] {
        // SAFETY: caller guarantees no overlapping mutable borrow; bounds are checked by
        // the slice index.
        let all = unsafe { (*self.buf.get()).as_slice() };
        &all[offset..offset + len]
    }

    /// Bytes `[offset, offset+len)` for writing.
    ///
    /// # Safety
    /// No other borrow (shared or mutable) of an overlapping range may be alive while the
    /// returned slice is used (the memory planner's invariant).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        // SAFETY: caller guarantees exclusivity of the range; the slice index checks bounds.
        let all = unsafe { (*self.buf.get()).as_mut_slice() };
        &mut all[offset..offset + len]
    }
}

/// Where a tensor's bytes live.
#[derive(Clone)]
pub enum Bytes {
    /// An owned heap buffer, shared by clones of the tensor.
    Heap(Arc<AlignedBuf>),
    /// A region of a memory-mapped file (plan weights).
    Mapped {
        /// The mapping, kept alive by every tensor that points into it.
        map: Arc<memmap2::Mmap>,
        /// Start of the region.
        offset: usize,
        /// Length of the region.
        len: usize,
    },
    /// A slot of an execution context's arena.
    Arena {
        /// The arena, kept alive by the tensor.
        arena: Arc<Arena>,
        /// Start of the slot.
        offset: usize,
        /// Length of the slot.
        len: usize,
    },
}

impl Bytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Heap(b) => b.as_slice(),
            Bytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            // SAFETY: an arena tensor is only read while its slot holds its value and no
            // kernel writes an overlapping slot (the planner's invariant, upheld by the
            // executor that creates these tensors).
            Bytes::Arena { arena, offset, len } => unsafe { arena.slot(*offset, *len) },
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Bytes::Heap(b) => b.len(),
            Bytes::Mapped { len, .. } | Bytes::Arena { len, .. } => *len,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
