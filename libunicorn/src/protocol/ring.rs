//! The data channel: a submission queue and a completion queue in one shared memfd.
//!
//! Layout of the memfd (all offsets in bytes; every counter on its own cache line):
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | header `{magic "UNIR", version, sq_entries, cq_entries}` | daemon, once |
//! | 64 | SQ tail | client |
//! | 128 | SQ head | daemon |
//! | 192 | SQ flags ([`SQ_NEED_WAKEUP`]) | daemon |
//! | 256 | CQ tail | daemon |
//! | 320 | CQ head | client |
//! | 384 | CQ flags ([`CQ_WAITING`]) | client |
//! | 512 | `sq_entries` submission entries of 64 bytes | client |
//! | then | `cq_entries` completion entries of 32 bytes | daemon |
//!
//! Counters are free-running `u32`s, masked with `entries - 1` on use (entries are powers of
//! two). A producer writes its entries, then publishes its tail with `Release`; the consumer
//! reads the tail with `Acquire`, copies each entry out once, and publishes its head with
//! `Release` so the slots can be reused. Each side keeps its own counter privately and never
//! reads it back from shared memory: only the other side's counter is read, and it is checked
//! (`tail - head <= entries`) before use, because the other process may have written anything.
//!
//! Doorbells: a consumer that goes to sleep first sets its "sleeping" flag, then re-checks the
//! queue; a producer publishes, then checks the flag, and rings the doorbell only when it is set.
//! Both sides put a `SeqCst` fence between their store and their load (the store-buffer case
//! that `Release`/`Acquire` alone does not order), so a wake-up is never lost.

use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};

use crate::error::Error;
use crate::status::Status;
use crate::sys::SharedMemory;

/// "UNIR", little-endian.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"UNIR");
pub const RING_VERSION: u32 = 1;
/// Largest submission queue a daemon hands out.
pub const MAX_SQ_ENTRIES: u32 = 4096;
/// Bytes of a submission entry.
pub const SQE_BYTES: usize = 64;
/// Bytes of a completion entry.
pub const CQE_BYTES: usize = 32;

/// Byte offsets of the fields in the table above.
pub mod offsets {
    pub const HEADER: usize = 0;
    pub const SQ_TAIL: usize = 64;
    pub const SQ_HEAD: usize = 128;
    pub const SQ_FLAGS: usize = 192;
    pub const CQ_TAIL: usize = 256;
    pub const CQ_HEAD: usize = 320;
    pub const CQ_FLAGS: usize = 384;
    pub const SQ_ENTRIES: usize = 512;
}
use offsets::{
    CQ_FLAGS as CQ_FLAGS_OFF, CQ_HEAD as CQ_HEAD_OFF, CQ_TAIL as CQ_TAIL_OFF, HEADER as HEADER_OFF,
    SQ_ENTRIES as SQ_ENTRIES_OFF, SQ_FLAGS as SQ_FLAGS_OFF, SQ_HEAD as SQ_HEAD_OFF,
    SQ_TAIL as SQ_TAIL_OFF,
};
const PAGE: usize = 4096;

/// SQ flag: the daemon stopped polling this ring; ring the submission doorbell after publishing.
pub const SQ_NEED_WAKEUP: u32 = 1;
/// CQ flag: the client sleeps on its completion doorbell; ring it after publishing.
pub const CQ_WAITING: u32 = 1;

/// Why a ring cannot be used any more. Always the other side's fault; the session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The other side's counter is more than a queue length away from ours.
    CorruptIndex { queue: &'static str, ours: u32, theirs: u32, entries: u32 },
}

impl From<RingError> for Error {
    fn from(e: RingError) -> Error {
        match e {
            RingError::CorruptIndex { queue, ours, theirs, entries } => Error::protocol(format!(
                "{queue} ring index out of range: ours {ours}, theirs {theirs}, {entries} entries"
            )),
        }
    }
}

/// Sizes and offsets of a ring memfd. Both sides compute it from the two entry counts alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    sq_entries: u32,
    cq_entries: u32,
}

impl RingLayout {
    /// A layout for `sq_entries` submissions (a power of two up to [`MAX_SQ_ENTRIES`]) and
    /// twice as many completion slots, so that every accepted job has a completion slot.
    pub fn new(sq_entries: u32) -> Result<RingLayout, Error> {
        if !sq_entries.is_power_of_two() || !(2..=MAX_SQ_ENTRIES).contains(&sq_entries) {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("ring size {sq_entries}: must be a power of two in 2..={MAX_SQ_ENTRIES}"),
            ));
        }
        Ok(RingLayout { sq_entries, cq_entries: sq_entries * 2 })
    }

    /// The layout for a requested size: 0 picks `default`, other values round up to a power of
    /// two; the result is capped at `max`.
    pub fn negotiate(requested: u32, default: u32, max: u32) -> Result<RingLayout, Error> {
        let want = if requested == 0 { default } else { requested };
        let want = want.checked_next_power_of_two().unwrap_or(u32::MAX).min(max.max(2));
        RingLayout::new(want.clamp(2, MAX_SQ_ENTRIES))
    }

    pub fn sq_entries(&self) -> u32 {
        self.sq_entries
    }

    pub fn cq_entries(&self) -> u32 {
        self.cq_entries
    }

    fn cq_entries_off(&self) -> usize {
        SQ_ENTRIES_OFF + self.sq_entries as usize * SQE_BYTES
    }

    /// Total bytes of the memfd, a whole number of pages.
    pub fn size(&self) -> usize {
        let end = self.cq_entries_off() + self.cq_entries as usize * CQE_BYTES;
        end.div_ceil(PAGE) * PAGE
    }

    /// Writes the header into a fresh ring (daemon side).
    pub fn write_header(&self, mem: &SharedMemory) {
        mem.atomic_u32(HEADER_OFF).store(RING_MAGIC, Ordering::Relaxed);
        mem.atomic_u32(HEADER_OFF + 4).store(RING_VERSION, Ordering::Relaxed);
        mem.atomic_u32(HEADER_OFF + 8).store(self.sq_entries, Ordering::Relaxed);
        mem.atomic_u32(HEADER_OFF + 12).store(self.cq_entries, Ordering::Release);
    }

    /// Checks that a mapped ring carries this layout's header (client side).
    pub fn check_header(&self, mem: &SharedMemory) -> Result<(), Error> {
        if mem.len() < self.size() {
            return Err(Error::protocol(format!(
                "ring memory is {} bytes, the layout needs {}",
                mem.len(),
                self.size()
            )));
        }
        let words = [0, 4, 8, 12].map(|o| mem.atomic_u32(HEADER_OFF + o).load(Ordering::Acquire));
        if words != [RING_MAGIC, RING_VERSION, self.sq_entries, self.cq_entries] {
            return Err(Error::protocol(format!("ring header {words:x?} does not match {self:?}")));
        }
        Ok(())
    }

    fn sq(&self) -> Queue {
        Queue {
            name: "submission",
            tail: SQ_TAIL_OFF,
            head: SQ_HEAD_OFF,
            slots: SQ_ENTRIES_OFF,
            entries: self.sq_entries,
            slot_bytes: SQE_BYTES,
        }
    }

    fn cq(&self) -> Queue {
        Queue {
            name: "completion",
            tail: CQ_TAIL_OFF,
            head: CQ_HEAD_OFF,
            slots: self.cq_entries_off(),
            entries: self.cq_entries,
            slot_bytes: CQE_BYTES,
        }
    }

    pub fn sq_producer(&self) -> Producer<SqeWords> {
        Producer::new(self.sq())
    }

    pub fn sq_consumer(&self) -> Consumer<SqeWords> {
        Consumer::new(self.sq())
    }

    pub fn cq_producer(&self) -> Producer<CqeWords> {
        Producer::new(self.cq())
    }

    pub fn cq_consumer(&self) -> Consumer<CqeWords> {
        Consumer::new(self.cq())
    }
}

/// The raw words of an entry as they sit in a slot.
pub trait EntryWords: Copy + Default + AsRef<[u64]> + AsMut<[u64]> {}

/// A submission entry as 8 little-endian words.
pub type SqeWords = [u64; SQE_BYTES / 8];
/// A completion entry as 4 little-endian words.
pub type CqeWords = [u64; CQE_BYTES / 8];
impl EntryWords for SqeWords {}
impl EntryWords for CqeWords {}

#[derive(Clone, Copy, Debug)]
struct Queue {
    name: &'static str,
    tail: usize,
    head: usize,
    slots: usize,
    entries: u32,
    slot_bytes: usize,
}

impl Queue {
    fn slot(&self, counter: u32) -> usize {
        self.slots + (counter & (self.entries - 1)) as usize * self.slot_bytes
    }

    /// `ours - theirs` or `theirs - ours`, checked to be a possible fill level.
    fn distance(&self, from: u32, to: u32, ours: u32, theirs: u32) -> Result<u32, RingError> {
        let d = to.wrapping_sub(from);
        if d > self.entries {
            return Err(RingError::CorruptIndex {
                queue: self.name,
                ours,
                theirs,
                entries: self.entries,
            });
        }
        Ok(d)
    }
}

/// The writing side of a queue. Its tail lives here, privately; it is copied out on `publish`.
#[derive(Debug)]
pub struct Producer<W> {
    q: Queue,
    tail: u32,
    _w: PhantomData<W>,
}

impl<W: EntryWords> Producer<W> {
    fn new(q: Queue) -> Self {
        Producer { q, tail: 0, _w: PhantomData }
    }

    /// Free slots, from the consumer's published head (checked).
    pub fn free(&self, mem: &SharedMemory) -> Result<u32, RingError> {
        let head = mem.atomic_u32(self.q.head).load(Ordering::Acquire);
        let used = self.q.distance(head, self.tail, self.tail, head)?;
        Ok(self.q.entries - used)
    }

    /// Writes an entry into the next slot. The caller has checked [`Producer::free`]; the entry
    /// becomes visible with the next [`Producer::publish`].
    pub fn push(&mut self, mem: &SharedMemory, words: &W) {
        mem.store_u64s(self.q.slot(self.tail), words.as_ref());
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed entry visible to the consumer.
    pub fn publish(&self, mem: &SharedMemory) {
        mem.atomic_u32(self.q.tail).store(self.tail, Ordering::Release);
    }

    /// True when the consumer flagged (in `flags_off`) that it sleeps and needs the doorbell.
    /// Call after [`Producer::publish`].
    fn consumer_sleeps(&self, mem: &SharedMemory, flags_off: usize, bit: u32) -> bool {
        fence(Ordering::SeqCst);
        mem.atomic_u32(flags_off).load(Ordering::Relaxed) & bit != 0
    }

    /// Entries pushed since the counter started (wrapping).
    pub fn tail(&self) -> u32 {
        self.tail
    }
}

impl Producer<SqeWords> {
    /// After publishing submissions: does the daemon need the doorbell?
    pub fn daemon_sleeps(&self, mem: &SharedMemory) -> bool {
        self.consumer_sleeps(mem, SQ_FLAGS_OFF, SQ_NEED_WAKEUP)
    }
}

impl Producer<CqeWords> {
    /// After publishing completions: does the client need the doorbell?
    pub fn client_sleeps(&self, mem: &SharedMemory) -> bool {
        self.consumer_sleeps(mem, CQ_FLAGS_OFF, CQ_WAITING)
    }
}

/// The reading side of a queue. Its head lives here, privately; it is copied out on `release`.
#[derive(Debug)]
pub struct Consumer<W> {
    q: Queue,
    head: u32,
    _w: PhantomData<W>,
}

impl<W: EntryWords> Consumer<W> {
    fn new(q: Queue) -> Self {
        Consumer { q, head: 0, _w: PhantomData }
    }

    /// Entries ready to read, from the producer's published tail (checked).
    pub fn available(&self, mem: &SharedMemory) -> Result<u32, RingError> {
        let tail = mem.atomic_u32(self.q.tail).load(Ordering::Acquire);
        self.q.distance(self.head, tail, self.head, tail)
    }

    /// Copies the next entry out of its slot, once. The caller has checked
    /// [`Consumer::available`]; the slot is handed back with the next [`Consumer::release`].
    pub fn pop(&mut self, mem: &SharedMemory) -> W {
        let mut words = W::default();
        mem.load_u64s(self.q.slot(self.head), words.as_mut());
        self.head = self.head.wrapping_add(1);
        words
    }

    /// Hands every popped slot back to the producer.
    pub fn release(&self, mem: &SharedMemory) {
        mem.atomic_u32(self.q.head).store(self.head, Ordering::Release);
    }

    /// Sets or clears this consumer's "sleeping" flag. Setting it is followed by a `SeqCst`
    /// fence: the caller must then re-check [`Consumer::available`] before it sleeps.
    fn set_sleeping(&self, mem: &SharedMemory, flags_off: usize, bit: u32, on: bool) {
        let flags = mem.atomic_u32(flags_off);
        if on {
            flags.fetch_or(bit, Ordering::Relaxed);
            fence(Ordering::SeqCst);
        } else {
            flags.fetch_and(!bit, Ordering::Relaxed);
        }
    }
}

impl Consumer<SqeWords> {
    /// The daemon announces (or withdraws) that it sleeps on the submission doorbell.
    pub fn set_daemon_sleeping(&self, mem: &SharedMemory, on: bool) {
        self.set_sleeping(mem, SQ_FLAGS_OFF, SQ_NEED_WAKEUP, on)
    }
}

impl Consumer<CqeWords> {
    /// The client announces (or withdraws) that it sleeps on the completion doorbell.
    pub fn set_client_waiting(&self, mem: &SharedMemory, on: bool) {
        self.set_sleeping(mem, CQ_FLAGS_OFF, CQ_WAITING, on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::memfd::create_sealed_memfd;

    fn ring(sq: u32) -> (RingLayout, SharedMemory) {
        let layout = RingLayout::new(sq).unwrap();
        let fd = create_sealed_memfd("ring-test", layout.size()).unwrap();
        let mem = SharedMemory::map(&fd, layout.size()).unwrap();
        layout.write_header(&mem);
        (layout, mem)
    }

    fn sqe(n: u64) -> SqeWords {
        [n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7]
    }

    #[test]
    fn layout_sizes() {
        let l = RingLayout::new(256).unwrap();
        assert_eq!(l.cq_entries(), 512);
        assert_eq!(l.size(), (512 + 256 * 64 + 512 * 32usize).div_ceil(4096) * 4096);
        for bad in [0, 1, 3, 100, MAX_SQ_ENTRIES * 2] {
            assert!(RingLayout::new(bad).is_err(), "{bad}");
        }
        assert_eq!(RingLayout::negotiate(0, 256, 1024).unwrap().sq_entries(), 256);
        assert_eq!(RingLayout::negotiate(100, 256, 1024).unwrap().sq_entries(), 128);
        assert_eq!(RingLayout::negotiate(u32::MAX, 256, 1024).unwrap().sq_entries(), 1024);
        assert_eq!(RingLayout::negotiate(1, 256, 1024).unwrap().sq_entries(), 2);
    }

    #[test]
    fn header_is_checked() {
        let (l, mem) = ring(8);
        l.check_header(&mem).unwrap();
        assert!(RingLayout::new(16).unwrap().check_header(&mem).is_err());
        mem.atomic_u32(0).store(0, Ordering::Relaxed);
        assert!(l.check_header(&mem).is_err());
    }

    #[test]
    fn fill_drain_and_wrap_around() {
        let (l, mem) = ring(4);
        let mut p = l.sq_producer();
        let mut c = l.sq_consumer();
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        // Many laps, so the free-running counters wrap the slot index many times.
        for lap in 0..100 {
            assert_eq!(c.available(&mem).unwrap(), 0, "empty at lap {lap}");
            let free = p.free(&mem).unwrap();
            assert_eq!(free, 4);
            for _ in 0..free {
                p.push(&mem, &sqe(next_in));
                next_in += 1;
            }
            p.publish(&mem);
            assert_eq!(p.free(&mem).unwrap(), 0, "full");
            assert_eq!(c.available(&mem).unwrap(), 4);
            // Drain in two steps; slots come back only on release.
            for _ in 0..2 {
                assert_eq!(c.pop(&mem), sqe(next_out));
                next_out += 1;
            }
            assert_eq!(p.free(&mem).unwrap(), 0);
            c.release(&mem);
            assert_eq!(p.free(&mem).unwrap(), 2);
            for _ in 0..2 {
                assert_eq!(c.pop(&mem), sqe(next_out));
                next_out += 1;
            }
            c.release(&mem);
        }
    }

    #[test]
    fn counters_wrap_at_u32_max() {
        let (l, mem) = ring(4);
        let mut p = l.cq_producer();
        let mut c = l.cq_consumer();
        // Start both sides just below the wrap point of the free-running counters.
        let start = u32::MAX - 1;
        p.tail = start;
        c.head = start;
        c.release(&mem);
        p.publish(&mem);
        for i in 0..10u64 {
            assert_eq!(p.free(&mem).unwrap(), l.cq_entries());
            p.push(&mem, &[i; 4]);
            p.publish(&mem);
            assert_eq!(c.available(&mem).unwrap(), 1);
            assert_eq!(c.pop(&mem), [i; 4]);
            c.release(&mem);
        }
        assert!(p.tail() < start);
    }

    #[test]
    fn corrupted_indices_are_refused() {
        let (l, mem) = ring(8);
        let mut c = l.sq_consumer();
        let p = l.sq_producer();
        // A client that claims more entries than the ring holds.
        mem.atomic_u32(SQ_TAIL_OFF).store(9, Ordering::Release);
        assert!(matches!(c.available(&mem), Err(RingError::CorruptIndex { .. })));
        // ... or moves its tail backwards.
        mem.atomic_u32(SQ_TAIL_OFF).store(u32::MAX, Ordering::Release);
        assert!(c.available(&mem).is_err());
        // A legal tail works again.
        mem.atomic_u32(SQ_TAIL_OFF).store(8, Ordering::Release);
        assert_eq!(c.available(&mem).unwrap(), 8);
        for _ in 0..8 {
            c.pop(&mem);
        }
        c.release(&mem);
        // The producer side refuses a head the consumer could not have written.
        mem.atomic_u32(SQ_HEAD_OFF).store(1000, Ordering::Release);
        assert!(p.free(&mem).is_err());
        // A completion head beyond the daemon's tail is refused too.
        let cp = l.cq_producer();
        mem.atomic_u32(CQ_HEAD_OFF).store(5, Ordering::Release);
        assert!(cp.free(&mem).is_err());
    }

    #[test]
    fn doorbell_flags() {
        let (l, mem) = ring(2);
        let p = l.sq_producer();
        let c = l.sq_consumer();
        assert!(!p.daemon_sleeps(&mem));
        c.set_daemon_sleeping(&mem, true);
        assert!(p.daemon_sleeps(&mem));
        c.set_daemon_sleeping(&mem, false);
        assert!(!p.daemon_sleeps(&mem));
        let cp = l.cq_producer();
        let cc = l.cq_consumer();
        cc.set_client_waiting(&mem, true);
        assert!(cp.client_sleeps(&mem));
        cc.set_client_waiting(&mem, false);
        assert!(!cp.client_sleeps(&mem));
    }

    #[test]
    fn threads_pass_every_entry_once_in_order() {
        let (l, mem) = ring(8);
        let mem = std::sync::Arc::new(mem);
        const N: u64 = 200_000;
        let m2 = mem.clone();
        let producer = std::thread::spawn(move || {
            let mut p = l.sq_producer();
            let mut n = 0;
            while n < N {
                let free = p.free(&m2).unwrap();
                for _ in 0..free.min((N - n) as u32) {
                    p.push(&m2, &sqe(n));
                    n += 1;
                }
                p.publish(&m2);
                std::hint::spin_loop();
            }
        });
        let mut c = l.sq_consumer();
        let mut expect = 0;
        while expect < N {
            let n = c.available(&mem).unwrap();
            for _ in 0..n {
                assert_eq!(c.pop(&mem), sqe(expect));
                expect += 1;
            }
            c.release(&mem);
        }
        producer.join().unwrap();
    }
}
