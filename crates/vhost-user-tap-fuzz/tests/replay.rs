//! The fuzz targets on stable, so CI keeps them: every file of `fuzz/corpus/<target>/` (the
//! committed, minimized corpus), then seeded random inputs, then every input in `fuzz/findings/`
//! as a regression test (`fuzz/campaign.log` has their stacks).
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

/// Every input in `fuzz/findings/`, named `<target>-<what>`, as a regression test. What each
/// was:
/// - `ring-avail-at-gpa0`: an avail ring at guest address 0 is refused by virtio-queue as a
///   queue never set up, so the pair stops with "ring memory is not accessible at 0x0"; the
///   harness accepts exactly that.
/// - `datapath-rx-frames-over-tx-used-ring`: the guest pointed RX buffers at TX's used ring, so
///   RX wrote frame data over its index and the next TX batch seemed to publish 27,244 entries;
///   the harness now counts used entries only from an index the device itself left.
/// - `datapath-unfit-drop-uncounted-across-restarts` (a daemon bug): the guest posted one RX
///   buffer twice, so a staged frame's header was overwritten by its own data; the restarted RX
///   dropped it as unfit for the guest's offloads, but counted that drop only at its first
///   batch, and a second restart before that batch lost the count (a frame taken from the tap,
///   neither delivered nor counted). The drop is now counted when it is made.
/// - `datapath-tx-held-frames-wait-a-second-each` (a daemon bug): io_uring sent a small frame
///   after larger ones the full wire refused; those could no longer go back to the ring and
///   were written waiting for room, up to a second each, so one TX batch took 2 s (up to 64 s
///   for a batch of them), past the worker's stop deadline. The waits now share one 100 ms
///   deadline per batch.
#[test]
fn findings() {
    // Read under the targets' lock, as the corpus is.
    exclusive(findings_locked);
}

fn findings_locked() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/findings");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/findings")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no findings in {}", dir.display());
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let f = target(name.split('-').next().unwrap());
        let input = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| f(&input));
        if let Err(e) = r {
            eprintln!("finding {name} failed");
            std::panic::resume_unwind(e);
        }
    }
}

fn target(name: &str) -> fn(&[u8]) {
    match name {
        "ring" => ring,
        "datapath" => datapath,
        "session" => session,
        other => panic!("no target {other}"),
    }
}

/// Reproduce one input: `VUT_FUZZ_TARGET=ring VUT_FUZZ_INPUT=path cargo test -p
/// vhost-user-tap-fuzz --test replay one_input -- --nocapture` (does nothing without them).
#[test]
fn one_input() {
    let (Ok(name), Ok(path)) = (
        std::env::var("VUT_FUZZ_TARGET"),
        std::env::var("VUT_FUZZ_INPUT"),
    ) else {
        return;
    };
    let f = target(&name);
    let input = std::fs::read(&path).unwrap();
    let t = std::time::Instant::now();
    f(&input);
    eprintln!("{name} {path}: {} bytes, {:?}", input.len(), t.elapsed());
}
