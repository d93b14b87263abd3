//! Tests of the harness the real-storage binaries share (tests/common/real.rs): they would
//! run nowhere else, because those binaries are built without libtest.

#[path = "common/real.rs"]
mod real;
