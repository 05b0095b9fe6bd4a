#![no_std]
// The programs live in main.rs, built for bpfel-unknown-none by aya-build;
// this empty library lets the daemon's build script depend on the crate so
// cargo rebuilds the object when it changes.
