//! Synthetic guest (placeholder).
