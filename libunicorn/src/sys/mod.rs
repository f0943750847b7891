//! Thin, safe wrappers over the system calls both sides of the protocol need: memfds and their
//! seals, shared mappings accessed through atomics, descriptor passing, doorbells and peer
//! credentials. Together with the C ABI (`ffi`), this is where libunicorn's `unsafe` lives.

pub mod doorbell;
pub mod fdpass;
pub mod memfd;
pub mod peer;
mod shm;

pub use shm::SharedMemory;
