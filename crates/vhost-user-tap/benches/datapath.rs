//! Micro-benchmarks of the per-frame RX and TX code on in-memory queues (`loopback`): the
//! daemon's Rx/Tx against the synthetic guest's rings, a socketpair standing in for the tap.
//! The socket syscalls are part of what is measured, as the tap's are in production.
//!
//! `cargo bench --bench datapath`; criterion writes its numbers under target/criterion/.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vhost_user_tap_guest::loopback::{Loopback, LoopbackConfig};

const BATCH: usize = 64;

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 12];
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(len, 0x5a);
    f
}

fn rx(c: &mut Criterion) {
    let mut g = c.benchmark_group("rx");
    for (name, cfg) in [
        ("mrg_evidx", LoopbackConfig::default()),
        (
            "nomrg",
            LoopbackConfig {
                mrg_rxbuf: false,
                rx_buf_len: 12 + 1514,
                ..LoopbackConfig::default()
            },
        ),
    ] {
        for len in [64usize, 1514] {
            let mut lb = Loopback::new(cfg).unwrap();
            let f = frame(len);
            g.throughput(Throughput::Elements(BATCH as u64));
            g.bench_function(format!("{name}/{len}B/batch{BATCH}"), |b| {
                // Only the daemon's batch is timed; refilling the guest ring and the socket is
                // the setup of each iteration.
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        lb.guest.poll_rx(|_, _| {}).unwrap();
                        lb.guest.post_rx_buffers(usize::MAX).unwrap();
                        for _ in 0..BATCH {
                            lb.inject(&f).unwrap();
                        }
                        let t = Instant::now();
                        lb.rx_process().unwrap();
                        total += t.elapsed();
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

/// The floor: the same socket reads and writes with no rings at all.
fn floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    for len in [64usize, 1514] {
        let lb = Loopback::new(LoopbackConfig::default()).unwrap();
        let f = frame(len);
        let mut buf = vec![0u8; 70_000];
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(format!("read/{len}B/batch{BATCH}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        lb.inject(&f).unwrap();
                    }
                    let iov = [libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    let t = Instant::now();
                    for _ in 0..BATCH {
                        lb.tap.readv(&iov).unwrap();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
        let hdr_and_frame = [vec![0u8; 12], f.clone()].concat();
        g.bench_function(format!("write/{len}B/batch{BATCH}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    lb.drain_wire(&mut buf, |_| {});
                    let iov = [libc::iovec {
                        iov_base: hdr_and_frame.as_ptr() as *mut _,
                        iov_len: hdr_and_frame.len(),
                    }];
                    let t = Instant::now();
                    for _ in 0..BATCH {
                        lb.tap.writev(&iov).unwrap();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

fn tx(c: &mut Criterion) {
    let mut g = c.benchmark_group("tx");
    for len in [64usize, 1514] {
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap();
        let f = frame(len);
        let frames: Vec<&[u8]> = (0..BATCH).map(|_| f.as_slice()).collect();
        let mut wire = vec![0u8; 70_000];
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(format!("{len}B/batch{BATCH}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    lb.drain_wire(&mut wire, |_| {});
                    lb.guest.reclaim_tx().unwrap();
                    lb.guest.send_frames(&frames).unwrap();
                    let t = Instant::now();
                    lb.tx_process().unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, floor, rx, tx);
criterion_main!(benches);
