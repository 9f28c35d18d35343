//! Private work directories, removed on drop.

use std::path::{Path, PathBuf};

use super::unique_name;

/// A private directory under the system temp dir, removed on drop (unless kept).
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// An empty directory `vut-<tag>-<pid>-<n>` under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(tag));
        // Left over from an earlier run whose pid was the same: start empty.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path, keep: false }
    }

    /// Keep the directory and its files after the test when `keep` (then its path is printed
    /// when it is dropped).
    pub fn kept_when(mut self, keep: bool) -> TempDir {
        self.keep = keep;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
