//! Target (a): one device queue on an arbitrary memory image. The input lays out guest memory
//! (one or two regions, adjacent or not), the ring (size, addresses, indices, EVENT_IDX), and
//! then a program: descriptors and indirect tables written anywhere, avail entries and index,
//! raw bytes, batch pops in either direction with any verdicts, used entries, publish,
//! interrupt, kick arming, rewinds.
//!
//! Checked at every pop:
//! - a corrupted avail index (more than a ring ahead) is reported, and only then;
//! - no more chains are shown than asked for or posted; the count returned and `next_avail`
//!   agree with the verdicts;
//! - an accepted chain's segments each lie inside one region of guest memory, their host
//!   pointers are the mapping of their guest address, they add up to the chain's length, there
//!   are at most `MAX_CHAIN_SEGS` of them, the length is at least `min_len`, the head is in range;
//! - at most `MAX_CHAIN_DESCS` descriptors were visited per chain shown (`take_visited`);
//! - a pop writes nothing in guest memory but the used ring's elements;
//! - every chain shown is the one `virtio_queue` parses at that point (`reference`): same head,
//!   same result, same segments.

use std::num::Wrapping;
use std::sync::Arc;

use vhost_user_tap::ring::{
    ChainError, DeviceQueue, Notifier, RingError, Segment, Verdict, MAX_CHAIN_DESCS, MAX_CHAIN_SEGS,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::reference;
use crate::Input;

/// Operations per input: enough for several pops over a changing ring.
const MAX_OPS: usize = 96;

pub fn ring(data: &[u8]) {
    crate::exclusive(|| run(data))
}

fn run(data: &[u8]) {
    let mut r = Input::new(data);

    // Guest memory: one or two regions, the second adjacent to the first or after a gap.
    let first = 4096 * (1 + usize::from(r.u8() % 32));
    let second = 4096 * usize::from(r.u8() % 16);
    let gap = 4096 * u64::from(r.u8() % 3);
    let mut ranges = vec![(GuestAddress(0), first)];
    if second > 0 {
        ranges.push((GuestAddress(first as u64 + gap), second));
    }
    let span = ranges.last().map_or(0, |&(a, l)| a.0 + l as u64);
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&ranges).expect("anonymous memory"));

    // The ring, as SET_VRING_NUM/ADDR/BASE would set it.
    let size = 1u16 << (r.u8() % 16);
    let mut q = Queue::new(32768).expect("the largest split ring");
    if q.try_set_size(size).is_err() {
        return;
    }
    let desc = r.addr(span) & !15;
    let avail = r.addr(span) & !1;
    let used = r.addr(span) & !3;
    if q.try_set_desc_table_address(GuestAddress(desc)).is_err()
        || q.try_set_avail_ring_address(GuestAddress(avail)).is_err()
        || q.try_set_used_ring_address(GuestAddress(used)).is_err()
    {
        return;
    }
    q.set_next_avail(r.u16());
    q.set_next_used(r.u16());
    q.set_ready(true);
    // The session starts only rings that fit in guest memory.
    if !q.is_valid(&*mem) {
        return;
    }
    let event_idx = r.bool();
    let mut dq = DeviceQueue::new(q, event_idx, &mem, Notifier::default());
    if dq.avail_idx().is_err() {
        // A ring split across two regions (valid for virtio-queue) is not mapped: every pop
        // says so and does nothing.
        let mut segs = Vec::new();
        let r = dq.pop_batch(r.bool(), 0, 64, &mut segs, |_, _, _| {
            panic!("a chain shown")
        });
        assert!(matches!(r, Err(RingError::RingMemory(_))), "{r:?}");
        return;
    }
    let avail_idx_at = GuestAddress(avail + 2);
    let used_elems = (used + 4)..(used + 4 + 8 * u64::from(size));

    // Chains popped and kept, not yet used.
    let mut kept: Vec<u16> = Vec::new();
    let mut segs: Vec<Segment> = Vec::with_capacity(MAX_CHAIN_SEGS);
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 10 {
            // A descriptor in the table.
            0 | 1 => {
                let i = r.index(size);
                let at = desc + 16 * u64::from(i);
                let d = encode(&mut r, span, size);
                let _ = mem.write_slice(&d, GuestAddress(at));
            }
            // A descriptor anywhere (an indirect table's entry).
            2 => {
                let at = r.addr(span) & !15;
                let d = encode(&mut r, span, size);
                let _ = mem.write_slice(&d, GuestAddress(at));
            }
            // Avail entries, then the index moved past them (or anywhere).
            3 | 4 => {
                let n = u16::from(r.u8() % 16);
                let idx: u16 = mem.read_obj(avail_idx_at).unwrap_or(0);
                for k in 0..n {
                    let slot = idx.wrapping_add(k) % size;
                    let head = r.index(size);
                    let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(slot)));
                }
                let new = if r.u8() % 8 == 0 {
                    r.u16()
                } else {
                    idx.wrapping_add(n)
                };
                let _ = mem.write_obj(new, avail_idx_at);
            }
            5 | 6 => pop(&mut r, &mut dq, &mem, &mut segs, &mut kept, &used_elems),
            // Use kept chains (out of order, any length), publish, interrupt.
            7 => {
                let n = usize::from(r.u8() % 8).min(kept.len());
                for _ in 0..n {
                    let k = usize::from(r.u8()) % kept.len();
                    let head = kept.swap_remove(k);
                    dq.add_used(head, r.u32())
                        .expect("the used ring was mapped");
                }
                dq.publish().expect("the used ring was mapped");
                let _ = dq.interrupt().expect("the rings were mapped");
            }
            8 => match r.u8() % 5 {
                0 => {
                    let _ = dq.arm_kick().expect("the rings were mapped");
                }
                1 => dq.suppress_kicks().expect("the used ring was mapped"),
                2 => {
                    // Kept chains handed back, as RX does with its window on stop.
                    let n = usize::from(r.u8()).min(kept.len());
                    kept.truncate(kept.len() - n);
                    dq.rewind(n as u16);
                }
                3 => {
                    let _ = dq.pending();
                }
                _ => {
                    // The guest's suppression words: avail flags and used_event.
                    let _ = mem.write_obj(r.u16(), GuestAddress(avail));
                    let at = avail + 4 + 2 * u64::from(size);
                    let _ = mem.write_obj(r.u16(), GuestAddress(at));
                }
            },
            // Raw bytes anywhere.
            _ => {
                let at = r.addr(span);
                let n = usize::from(r.u8() % 32);
                let b = r.bytes(n).to_vec();
                let _ = mem.write_slice(&b, GuestAddress(at));
            }
        }
    }
    let _ = dq.into_queue(0);
}

/// A descriptor's 16 bytes: address, length, flags (NEXT, WRITE, INDIRECT, or anything), next.
fn encode(r: &mut Input, span: u64, size: u16) -> [u8; 16] {
    let addr = r.addr(span);
    let len = match r.u8() % 8 {
        0 => r.u32(),
        1 => 0,
        // Indirect tables: a multiple of 16.
        2 => 16 * u32::from(r.u8()),
        _ => u32::from(r.u16()) % 4096,
    };
    let flags = match r.u8() {
        f @ 0..=247 => u16::from(f % 8),
        _ => r.u16(),
    };
    let next = r.index(size);
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// A copy of all guest memory, region by region.
fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    mem.iter()
        .map(|reg| {
            let mut v = vec![0u8; reg.len() as usize];
            mem.read_slice(&mut v, reg.start_addr())
                .expect("a region reads whole");
            v
        })
        .collect()
}

/// Whether `[addr, addr + len)` lies in one region and `host` is its mapping.
fn mapped_in_one_region(mem: &GuestMemoryMmap, s: &Segment) -> bool {
    let Some(reg) = mem.find_region(s.addr) else {
        return false;
    };
    let off = s.addr.0 - reg.start_addr().0;
    off + u64::from(s.len) <= reg.len()
        && reg.get_host_address(MemoryRegionAddress(off)).ok() == Some(s.host)
}

fn pop(
    r: &mut Input,
    dq: &mut DeviceQueue,
    mem: &GuestMemoryMmap,
    segs: &mut Vec<Segment>,
    kept: &mut Vec<u16>,
    used_elems: &std::ops::Range<u64>,
) {
    let device_writes = r.bool();
    let min_len = match r.u8() % 4 {
        0 => 0,
        1 => 10,
        2 => 12,
        _ => usize::from(r.u16()),
    };
    let max = usize::from(r.u8() % 130);
    // Two bits of verdict per chain shown: keep (most), complete, rewind.
    let script = r.u64();
    let size = dq.size();
    let next_before = Wrapping(dq.queue.next_avail());
    let posted = dq.avail_idx().expect("the avail ring was mapped") - next_before;
    let before = snapshot(mem);

    let mut shown = 0usize;
    let mut rewound = false;
    let mut kept_now = Vec::new();
    // virtio-queue on a twin of the queue, in step with the pop (a chain completed in the
    // batch writes the used ring, which may overlap what the next chain reads).
    let mut twin = reference::twin(&dq.queue);
    let mut ref_iter = twin.iter(mem);
    let res = dq.pop_batch(device_writes, min_len, max, segs, |head, res, segs| {
        let k = shown;
        shown += 1;
        match ref_iter.as_mut() {
            Ok(it) => {
                let expected = reference::next_chain(it, mem, device_writes, min_len);
                assert_eq!(
                    Some(reference::shown(head, res, segs)),
                    expected,
                    "chain {k}: the walk differs from virtio-queue's"
                );
            }
            // virtio-queue refuses an avail ring at guest address 0 (it takes it for a queue
            // never set up); the walk serves it like any other address.
            Err(virtio_queue::Error::QueueNotReady) => {}
            Err(e) => panic!("chain {k} shown, but virtio-queue refused the ring: {e}"),
        }
        match res {
            Ok(len) => {
                assert!(
                    head < size,
                    "chain {k}: head {head} accepted in a ring of {size}"
                );
                assert!(
                    len as usize >= min_len,
                    "chain {k}: {len} < min_len {min_len}"
                );
                assert!(
                    segs.len() <= MAX_CHAIN_SEGS,
                    "chain {k}: {} segments",
                    segs.len()
                );
                let sum: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                assert_eq!(sum, u64::from(len), "chain {k}: segments do not add up");
                for s in segs {
                    assert!(
                        mapped_in_one_region(mem, s),
                        "chain {k}: segment {:#x}+{} outside guest memory or mis-mapped",
                        s.addr.0,
                        s.len
                    );
                }
            }
            Err(ChainError::TooSmall(len, min)) => {
                assert!(
                    min == min_len && (len as usize) < min,
                    "chain {k}: {len} < {min}?"
                );
            }
            Err(_) => {}
        }
        match (script >> (2 * (k % 32))) & 3 {
            0 | 1 => {
                kept_now.push(head);
                Verdict::Keep
            }
            2 => Verdict::Complete,
            _ => {
                rewound = true;
                Verdict::Rewind
            }
        }
    });
    let visited = dq.take_visited();
    match res {
        Err(RingError::AvailIndex { .. }) => {
            assert!(
                posted.0 > size,
                "index error with {} posted in {size}",
                posted.0
            );
            assert_eq!(shown, 0);
        }
        Err(e) => panic!("pop on a mapped ring failed: {e}"),
        Ok(n) => {
            assert!(
                posted.0 <= size,
                "{} posted in a ring of {size} went unnoticed",
                posted.0
            );
            assert!(shown <= max, "{shown} chains shown, {max} asked for");
            assert!(
                shown <= usize::from(posted.0),
                "{shown} chains shown, {} posted",
                posted.0
            );
            assert_eq!(n + usize::from(rewound), shown, "count returned");
            let advanced = (Wrapping(dq.queue.next_avail()) - next_before).0;
            assert_eq!(
                usize::from(advanced),
                n,
                "next_avail moved by {advanced}, {n} popped"
            );
            if rewound {
                kept_now.pop();
            }
            kept.extend(kept_now);
        }
    }
    assert!(
        visited <= (shown * MAX_CHAIN_DESCS) as u64,
        "{visited} descriptors visited for {shown} chains"
    );
    // A pop writes used elements (completed chains) and nothing else.
    let after = snapshot(mem);
    for ((reg, b), a) in mem.iter().zip(&before).zip(&after) {
        if b == a {
            continue;
        }
        for (i, (x, y)) in b.iter().zip(a).enumerate() {
            let at = reg.start_addr().0 + i as u64;
            assert!(
                x == y || used_elems.contains(&at),
                "a pop wrote guest memory at {at:#x}"
            );
        }
    }
}
