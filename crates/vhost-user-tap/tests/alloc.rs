//! The per-frame path does not allocate: RX and TX batches, after warm-up, run with a counting
//! global allocator watching the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vhost_user_tap_guest::loopback::{Loopback, LoopbackConfig};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the thread-local counter is const-initialised, so
// touching it never allocates (no recursion).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

fn frame(i: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 12];
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&i.to_be_bytes());
    f.resize(len, 0x5a);
    f
}

fn body(cfg: LoopbackConfig) {
    let mut lb = Loopback::new(cfg).unwrap();
    let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(i, 64 + i as usize * 20)).collect();
    let mut wire = vec![0u8; 70_000];
    let mut in_daemon = 0;
    for round in 0..200 {
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        for f in &frames {
            assert!(lb.inject(f).unwrap());
        }
        let before = allocations();
        lb.rx_kick().unwrap();
        lb.rx_process().unwrap();
        let after = allocations();
        if round >= 2 {
            in_daemon += after - before;
        }
        let mut n = 0;
        lb.guest.poll_rx(|_, _| n += 1).unwrap();
        assert_eq!(n, frames.len());

        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        assert_eq!(lb.guest.send_frames(&refs).unwrap(), frames.len());
        let before = allocations();
        lb.tx_process().unwrap();
        let after = allocations();
        if round >= 2 {
            in_daemon += after - before;
        }
        assert_eq!(lb.drain_wire(&mut wire, |_| {}), frames.len());
        lb.guest.reclaim_tx().unwrap();
    }
    assert_eq!(
        in_daemon, 0,
        "the daemon's RX/TX path allocated {in_daemon} times in 198 batches of 64 frames each way"
    );
}

#[test]
fn rx_and_tx_batches_do_not_allocate_with_mergeable_buffers() {
    body(LoopbackConfig::default());
}

#[test]
fn rx_and_tx_batches_do_not_allocate_without_mergeable_buffers_or_event_idx() {
    body(LoopbackConfig {
        mrg_rxbuf: false,
        event_idx: false,
        rx_buf_len: 12 + 1514,
        ..LoopbackConfig::default()
    });
}
