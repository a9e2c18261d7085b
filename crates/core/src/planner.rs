//! Activation memory planning: tensors whose lifetimes do not overlap share memory in one
//! arena per execution context.
//!
//! The planner takes, for every tensor, its size and its lifetime (the index of the step
//! that writes it and of the last step that reads it) and assigns byte offsets so that two
//! tensors alive at the same step never overlap. It uses greedy best-fit by decreasing size
//! (the heuristic of TFLite's and ONNX Runtime's planners), which lands within a few percent
//! of the liveness lower bound on typical CNNs; [`MemoryPlan::lower_bound`] reports that
//! bound so the gap is visible (`kiln inspect`).

use crate::buffer::ALIGN;

/// One tensor to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Size in bytes.
    pub size: usize,
    /// First step at which the tensor is alive (the step writing it).
    pub first: usize,
    /// Last step at which it is alive (the last reader; inclusive).
    pub last: usize,
}

/// The result of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Offset of each request, in request order.
    pub offsets: Vec<usize>,
    /// Total arena size in bytes.
    pub arena_size: usize,
    /// The largest total size of tensors alive at one step (no plan can be smaller).
    pub lower_bound: usize,
}

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Plans offsets for `requests`. Every offset is 64-byte aligned.
pub fn plan(requests: &[Request]) -> MemoryPlan {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // Largest first; ties by earlier start for determinism.
    order.sort_by(|&a, &b| {
        requests[b]
            .size
            .cmp(&requests[a].size)
            .then(requests[a].first.cmp(&requests[b].first))
            .then(a.cmp(&b))
    });
    let mut offsets = vec![0usize; requests.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(requests.len());
    let mut arena = 0usize;
    for &r in &order {
        let req = requests[r];
        let size = align_up(req.size.max(1));
        // Intervals of already placed tensors whose lifetimes overlap this one.
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&p| requests[p].first <= req.last && req.first <= requests[p].last)
            .map(|&p| (offsets[p], offsets[p] + align_up(requests[p].size.max(1))))
            .collect();
        busy.sort_unstable();
        // Best fit: the smallest gap that holds `size`; otherwise the end.
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0usize;
        for &(start, end) in &busy {
            if start > cursor {
                let gap = start - cursor;
                if gap >= size && best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(end);
        }
        let offset = best.map(|(_, o)| o).unwrap_or(cursor);
        offsets[r] = offset;
        arena = arena.max(offset + size);
        placed.push(r);
    }
    MemoryPlan {
        offsets,
        arena_size: arena,
        lower_bound: lower_bound(requests),
    }
}

/// The largest sum of (aligned) sizes of tensors alive at one step.
pub fn lower_bound(requests: &[Request]) -> usize {
    // Sweep over start/end events (an end at step e frees before a start at e); `last` may
    // be huge (kept to the end of the run) and a request never ends before it starts.
    let mut events: Vec<(usize, i128)> = Vec::with_capacity(2 * requests.len());
    for r in requests {
        let size = align_up(r.size.max(1)) as i128;
        events.push((r.first, size));
        events.push((r.last.max(r.first).saturating_add(1), -size));
    }
    events.sort_unstable();
    let (mut cur, mut best) = (0i128, 0i128);
    for (_, d) in events {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_bound_handles_requests_kept_to_the_end() {
        let r = [
            Request {
                size: 64,
                first: 2,
                last: usize::MAX,
            },
            Request {
                size: 128,
                first: 0,
                last: 1,
            },
            Request {
                size: 64,
                first: 1,
                last: 3,
            },
        ];
        assert_eq!(lower_bound(&r), 192);
        assert!(plan(&r).arena_size >= 192);
    }

    fn overlaps(a: &Request, oa: usize, b: &Request, ob: usize) -> bool {
        let time = a.first <= b.last && b.first <= a.last;
        let space = oa < ob + b.size && ob < oa + a.size;
        time && space
    }

    #[test]
    fn plans_never_overlap_live_tensors() {
        // Deterministic pseudo-random requests.
        let mut seed = 12345u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50 {
            let reqs: Vec<Request> = (0..40)
                .map(|_| {
                    let first = (next() % 30) as usize;
                    let len = (next() % 8) as usize;
                    Request {
                        size: 1 + (next() % 5000) as usize,
                        first,
                        last: first + len,
                    }
                })
                .collect();
            let p = plan(&reqs);
            for i in 0..reqs.len() {
                assert_eq!(p.offsets[i] % ALIGN, 0);
                assert!(p.offsets[i] + reqs[i].size <= p.arena_size);
                for j in 0..i {
                    assert!(
                        !overlaps(&reqs[i], p.offsets[i], &reqs[j], p.offsets[j]),
                        "{i} and {j} overlap"
                    );
                }
            }
            assert!(p.arena_size >= p.lower_bound);
        }
    }

    #[test]
    fn chain_reuses_memory() {
        // a -> b -> c -> d: each tensor lives two steps; two buffers suffice.
        let reqs: Vec<Request> = (0..4)
            .map(|i| Request {
                size: 1024,
                first: i,
                last: i + 1,
            })
            .collect();
        let p = plan(&reqs);
        assert_eq!(p.arena_size, 2048);
        assert_eq!(p.lower_bound, 2048);
    }
}
