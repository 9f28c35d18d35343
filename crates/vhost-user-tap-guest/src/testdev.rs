//! Test-only device side of a virtio-net queue pair, built on virtio-queue's `Queue`, used to
//! exercise the guest without a daemon (in-process, and behind the fake vhost-user backend).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::net::VirtioNetHdr;
use super::ring::{vring_need_event, RingLayout, VRING_AVAIL_F_NO_INTERRUPT};

/// Signals an interrupt ("call").
pub type Notify = Box<dyn Fn() + Send>;

/// Device side of one queue pair.
pub struct TestDevice {
    pub mem: GuestMemoryMmap,
    pub rxq: Queue,
    pub txq: Queue,
    pub hdr_len: usize,
    pub mrg: bool,
    pub rx_notify: Notify,
    pub tx_notify: Notify,
    /// Publish used.idx after every element instead of once per frame.
    pub split_publish: bool,
    /// Used elements written but not yet published (see `flush_rx`).
    pub hold_back: usize,
    held: Vec<(u16, u32)>,
    pub rx_signals: u64,
    pub tx_signals: u64,
}

pub fn device_queue(layout: &RingLayout, event_idx: bool) -> Queue {
    let mut q = Queue::new(layout.size).unwrap();
    q.try_set_desc_table_address(layout.desc_table).unwrap();
    q.try_set_avail_ring_address(layout.avail_ring).unwrap();
    q.try_set_used_ring_address(layout.used_ring).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

fn needs_notify(mem: &GuestMemoryMmap, q: &Queue, old: u16, new: u16) -> bool {
    if old == new {
        return false;
    }
    let avail = GuestAddress(q.avail_ring());
    if q.event_idx_enabled() {
        let ev: u16 = mem
            .load(
                avail.unchecked_add(4 + 2 * u64::from(q.size())),
                Ordering::Acquire,
            )
            .unwrap();
        vring_need_event(ev, new, old)
    } else {
        let flags: u16 = mem.load(avail, Ordering::Acquire).unwrap();
        flags & VRING_AVAIL_F_NO_INTERRUPT == 0
    }
}

impl TestDevice {
    pub fn new(
        mem: GuestMemoryMmap,
        rxq: Queue,
        txq: Queue,
        hdr_len: usize,
        mrg: bool,
        rx_notify: Notify,
        tx_notify: Notify,
    ) -> Self {
        TestDevice {
            mem,
            rxq,
            txq,
            hdr_len,
            mrg,
            rx_notify,
            tx_notify,
            split_publish: false,
            hold_back: 0,
            held: Vec::new(),
            rx_signals: 0,
            tx_signals: 0,
        }
    }

    fn write_used(&mut self, q_rx: bool, elems: &[(u16, u32)], publish_each: bool) {
        let q = if q_rx { &mut self.rxq } else { &mut self.txq };
        let used = GuestAddress(q.used_ring());
        let size = q.size();
        let mut next = q.next_used();
        for &(head, len) in elems {
            let at = used.unchecked_add(4 + 8 * u64::from(next % size));
            let v = u64::from(head) | (u64::from(len) << 32);
            self.mem.write_obj(v.to_le(), at).unwrap();
            next = next.wrapping_add(1);
            if publish_each {
                self.mem
                    .store(next.to_le(), used.unchecked_add(2), Ordering::Release)
                    .unwrap();
            }
        }
        self.mem
            .store(next.to_le(), used.unchecked_add(2), Ordering::Release)
            .unwrap();
        q.set_next_used(next);
    }

    fn signal(&mut self, rx: bool, old: u16) {
        std::sync::atomic::fence(Ordering::SeqCst);
        let q = if rx { &self.rxq } else { &self.txq };
        if needs_notify(&self.mem, q, old, q.next_used()) {
            if rx {
                self.rx_signals += 1;
                (self.rx_notify)();
            } else {
                self.tx_signals += 1;
                (self.tx_notify)();
            }
        }
    }

    /// Put one frame into RX buffers. Returns false if there were not enough buffers (the
    /// popped chains are rolled back; nothing is written) or, without MRG_RXBUF, if the buffer
    /// was too small (it is then returned with used len 0).
    pub fn deliver(&mut self, frame: &[u8]) -> bool {
        let total = self.hdr_len + frame.len();
        let start = self.rxq.next_avail();
        let mut chains = Vec::new();
        let mut cap = 0usize;
        while cap < total {
            let Some(c) = self.rxq.pop_descriptor_chain(&self.mem) else {
                self.rxq.set_next_avail(start);
                return false;
            };
            let w: usize = c.clone().writable().map(|d| d.len() as usize).sum();
            cap += w;
            chains.push((c, w));
            if !self.mrg {
                break;
            }
        }
        let old = self.rxq.next_used();
        if cap < total {
            // Without MRG_RXBUF: too small.
            let head = chains[0].0.head_index();
            self.write_used(true, &[(head, 0)], false);
            self.signal(true, old);
            return false;
        }
        let hdr = VirtioNetHdr {
            num_buffers: if self.mrg { chains.len() as u16 } else { 1 },
            ..Default::default()
        };
        let mut bytes = vec![0u8; self.hdr_len];
        hdr.write(&mut bytes);
        bytes.extend_from_slice(frame);
        let mut off = 0;
        let mut elems = Vec::new();
        for (c, w) in chains {
            let head = c.head_index();
            let n = w.min(bytes.len() - off);
            let mut wr = c.writer(&self.mem).unwrap();
            std::io::Write::write_all(&mut wr, &bytes[off..off + n]).unwrap();
            off += n;
            elems.push((head, n as u32));
        }
        if self.hold_back > 0 {
            let keep = self.hold_back.min(elems.len() - 1);
            let tail = elems.split_off(elems.len() - keep);
            self.held.extend(tail);
        }
        let split = self.split_publish;
        self.write_used(true, &elems, split);
        self.signal(true, old);
        true
    }

    /// Publish used elements held back by `hold_back`.
    pub fn flush_rx(&mut self) {
        let held = std::mem::take(&mut self.held);
        let old = self.rxq.next_used();
        self.write_used(true, &held, false);
        self.signal(true, old);
    }

    /// Take every TX chain: returns (header, frame) per chain, completes them with len 0.
    pub fn drain_tx(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut elems = Vec::new();
        while let Some(c) = self.txq.pop_descriptor_chain(&self.mem) {
            let head = c.head_index();
            let mut r = c.reader(&self.mem).unwrap();
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut all).unwrap();
            let frame = all.split_off(self.hdr_len.min(all.len()));
            out.push((all, frame));
            elems.push((head, 0));
        }
        if !elems.is_empty() {
            let old = self.txq.next_used();
            self.write_used(false, &elems, false);
            self.signal(false, old);
        }
        out
    }

    /// Arm avail_event / clear NO_NOTIFY for both queues (what a device does before sleeping).
    pub fn enable_kicks(&mut self) {
        self.rxq.enable_notification(&self.mem).unwrap();
        self.txq.enable_notification(&self.mem).unwrap();
    }
}
