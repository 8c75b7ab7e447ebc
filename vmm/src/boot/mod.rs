//! Kernel loading and boot-time guest memory layout.
