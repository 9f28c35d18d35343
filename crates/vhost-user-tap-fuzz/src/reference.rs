//! The reference the daemon's chain walk is checked against: the avail ring and descriptor
//! chains parsed by `virtio_queue` (`AvailIter`, `DescriptorChain`), mapped into segments as the
//! daemon mapped them before it walked chains through host pointers itself (`ring::Walk`). The
//! ring target runs it beside every pop and requires the same heads, results and segments,
//! chain by chain.

use vhost_user_tap::ring::{ChainError, Segment, MAX_CHAIN_DESCS, MAX_CHAIN_SEGS};
use virtio_queue::{AvailIter, DescriptorChain, Queue, QueueT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap};

/// A second queue at the same addresses and position, for `virtio_queue` to iterate.
pub fn twin(q: &Queue) -> Queue {
    let mut t = Queue::new(q.max_size()).expect("a valid maximum size");
    t.set_size(q.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(q.desc_table());
    t.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.avail_ring());
    t.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.used_ring());
    t.set_used_ring_address(lo, hi);
    t.set_next_avail(q.next_avail());
    t.set_ready(true);
    t
}

/// One chain: head, result, segments (guest address, length, host address).
pub type Chain = (u16, Result<u32, ChainError>, Vec<(u64, u32, usize)>);

/// The next chain of `it`, mapped as the daemon maps it, or None when none is posted.
pub fn next_chain(
    it: &mut AvailIter<'_, &GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    device_writes: bool,
    min_len: usize,
) -> Option<Chain> {
    let chain = it.next()?;
    let head = chain.head_index();
    let mut segs = Vec::new();
    let res = map_chain(mem, chain, device_writes, &mut segs).and_then(|len| {
        if (len as usize) < min_len {
            Err(ChainError::TooSmall(len, min_len))
        } else {
            Ok(len)
        }
    });
    Some(shown(head, res, &segs))
}

/// A chain as `pop_batch` showed it.
pub fn shown(head: u16, res: Result<u32, ChainError>, segs: &[Segment]) -> Chain {
    let segs = segs
        .iter()
        .map(|s| (s.addr.0, s.len, s.host as usize))
        .collect();
    (head, res, segs)
}

/// Map every descriptor of `chain` into host segments; returns the total length.
fn map_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    device_writes: bool,
    segs: &mut Vec<Segment>,
) -> Result<u32, ChainError> {
    let mut total: u32 = 0;
    let mut last_has_next = false;
    let mut count: usize = 0;
    for desc in chain {
        if count == MAX_CHAIN_DESCS {
            return Err(ChainError::TooManyDescriptors);
        }
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() != device_writes {
            return Err(ChainError::WrongDirection(count - 1));
        }
        if desc.len() == 0 {
            continue;
        }
        let bad = ChainError::BadAddress {
            addr: desc.addr().0,
            len: desc.len(),
        };
        if segs.len() == MAX_CHAIN_SEGS {
            return Err(ChainError::TooManySegments);
        }
        if let Ok(slice) = mem.get_slice(desc.addr(), desc.len() as usize) {
            segs.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
                host: slice.ptr_guard_mut().as_ptr(),
            });
        } else {
            let mut addr = desc.addr();
            for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), desc.len() as usize) {
                let slice = slice.map_err(|_| bad)?;
                if segs.len() == MAX_CHAIN_SEGS {
                    return Err(ChainError::TooManySegments);
                }
                let len = u32::try_from(slice.len()).map_err(|_| bad)?;
                segs.push(Segment {
                    addr,
                    len,
                    host: slice.ptr_guard_mut().as_ptr(),
                });
                addr = addr.unchecked_add(u64::from(len));
            }
        }
        total = total.checked_add(desc.len()).ok_or(ChainError::Truncated)?;
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    Ok(total)
}
