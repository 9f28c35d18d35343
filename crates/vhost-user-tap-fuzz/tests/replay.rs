//! The fuzz targets on stable, so CI keeps them: every file of `fuzz/corpus/<target>/` (the
//! committed, minimized corpus), then seeded random inputs, then each finding of the campaign
//! as a named regression test (`fuzz/campaign.log` has their stacks).
//!
//! `VUT_FUZZ_SEEDS=N` runs N seeded inputs per target instead of the default.

use std::path::PathBuf;

use vhost_user_tap_fuzz::{datapath, exclusive, ring, session, Rng};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

fn seeds(default: usize) -> usize {
    std::env::var("VUT_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Random inputs of random lengths up to `max_len`, from a fixed seed per target.
fn seeded(target: &str, f: fn(&[u8]), n: usize, max_len: usize) {
    let mut rng = Rng::new(target.bytes().map(u64::from).sum());
    for i in 0..n {
        let len = (rng.next_u64() as usize) % max_len;
        let input = rng.bytes(len);
        let r = std::panic::catch_unwind(|| f(&input));
        if let Err(e) = r {
            eprintln!("{target}: seeded input {i} failed: {:02x?}", input);
            std::panic::resume_unwind(e);
        }
    }
}

fn replay(target: &str, f: fn(&[u8])) {
    // Read and run under the targets' lock: they count open descriptors.
    exclusive(|| replay_locked(target, f));
}

fn replay_locked(target: &str, f: fn(&[u8])) {
    for (path, input) in corpus(target) {
        let r = std::panic::catch_unwind(|| f(&input));
        if let Err(e) = r {
            eprintln!("{target}: corpus file {} failed", path.display());
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn ring_corpus_and_seeds() {
    replay("ring", ring);
    seeded("ring", ring, seeds(3000), 1024);
}

#[test]
fn datapath_corpus_and_seeds() {
    replay("datapath", datapath);
    seeded("datapath", datapath, seeds(1000), 1024);
}

#[test]
fn session_corpus_and_seeds() {
    replay("session", session);
    seeded("session", session, seeds(1000), 1024);
}

/// Campaign note 1 (not a daemon crash): an avail ring at guest address 0 is refused by
/// virtio-queue as a queue never set up, so the pair stops with "ring memory is not accessible
/// at 0x0"; the harness accepts exactly that.
#[test]
fn ring_note_1_avail_ring_at_guest_address_0() {
    ring(include_bytes!("../../../fuzz/findings/ring-avail-at-gpa0"));
}

/// Reproduce one input: `VUT_FUZZ_TARGET=ring VUT_FUZZ_INPUT=path cargo test -p
/// vhost-user-tap-fuzz --test replay one_input -- --nocapture` (does nothing without them).
#[test]
fn one_input() {
    let (Ok(target), Ok(path)) = (
        std::env::var("VUT_FUZZ_TARGET"),
        std::env::var("VUT_FUZZ_INPUT"),
    ) else {
        return;
    };
    let f = match target.as_str() {
        "ring" => ring,
        "datapath" => datapath,
        "session" => session,
        other => panic!("no target {other}"),
    };
    let input = std::fs::read(&path).unwrap();
    let t = std::time::Instant::now();
    f(&input);
    eprintln!("{target} {path}: {} bytes, {:?}", input.len(), t.elapsed());
}
