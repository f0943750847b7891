//! Matrix products of a GGUF weight matrix with a batch of activations, split across the pool.
//!
//! A weight matrix is `rows x cols` row-major, as GGUF stores it (`ne0 = cols` contiguous), and
//! `out = x W^T`: for each token `t` and row `r`, `out[t * rows + r] = dot(W[r], x[t])`.
//!
//! Quantized weights take activations quantized once per call ([`QuantizedActs`], in Q8_0/Q8_1 or,
//! for the k-quants, Q8_K format), packed once per call for the AVX2 tiles; callers that
//! multiply the same input by several matrices (Q, K and V; gate and up) use [`matmul_group`],
//! which quantizes and packs once and runs all the matrices as one parallel job. Rows are split
//! across the pool in chunks; inside a chunk the kernels work on tiles of rows x tokens so each
//! weight block is read and decoded once for up to 8 tokens; for batches, blocks of 64 rows by
//! 64 tokens keep both the rows' weights and the tokens' quants in L2 while they meet.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::act::{ActFormat, ActRow, QuantizedActs};
use crate::cpu::Isa;
use crate::dot::{
    act_format, f_rows, packs, q_rows, q_rows_packed, uses_quantized_acts, PackedActs,
};
use crate::error::check_len;
use crate::formats::dequantize_row;
use crate::kdot::{is_k, k_rows_packed, KPacked};
use crate::pool::ThreadPool;
use crate::tiled::{TiledView, GROUP};
use crate::{GgmlType, KernelError};

/// Tokens whose activations a block of rows works through at once.
const TOKEN_BLOCK: usize = 64;

/// Rows worked through all tokens before moving on, for batches: their weights stay in L2
/// while every token block passes over them (a multiple of the 4-row tiles).
const ROW_BLOCK: usize = 64;

/// The (rows, tokens) blocks a task's rows are computed in: the whole range for one token;
/// `ROW_BLOCK` rows by `TOKEN_BLOCK` tokens, rows outermost, for batches.
fn blocks(
    rows: std::ops::Range<usize>,
    n_tokens: usize,
) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>)> {
    let rb = if n_tokens <= 1 { rows.len().max(1) } else { ROW_BLOCK };
    let end = rows.end;
    rows.step_by(rb).flat_map(move |r0| {
        (0..n_tokens)
            .step_by(TOKEN_BLOCK)
            .map(move |t0| (r0..(r0 + rb).min(end), t0..(t0 + TOKEN_BLOCK).min(n_tokens)))
    })
}

/// A weight matrix in GGUF layout, borrowed from the mapped file, and optionally the same
/// matrix tiled eight rows wide ([`TiledView`]), which the AVX2 products then read instead; or
/// the tiles alone ([`WeightView::tiled_only`], a model stored tiled), which the other paths
/// read back into GGUF layout or refuse.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &'a [u8],
    tiles: Option<TiledView<'a>>,
}

impl<'a> WeightView<'a> {
    /// Checks that `data` is exactly `rows` rows of `cols` elements of `ty`.
    ///
    /// Errors when `cols` is not a whole number of blocks, the size overflows, or the length is
    /// wrong. Any type is accepted here; products reject types without kernels.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let rb = ty.row_bytes(cols as u64).ok_or(KernelError::NotBlockMultiple { ty, n: cols })?;
        let total =
            (rb as usize).checked_mul(rows).ok_or(KernelError::NotBlockMultiple { ty, n: cols })?;
        check_len("weight data", total, data.len())?;
        Ok(WeightView { ty, rows, cols, data, tiles: None })
    }

    /// This view with `tiles` (this matrix tiled, [`crate::tiled::TiledWeights::new`]) for
    /// the products to read. Errors when the tiles are of another type or shape.
    pub fn with_tiles(self, tiles: TiledView<'a>) -> Result<Self, KernelError> {
        tiles.check_matches(&self)?;
        Ok(WeightView { tiles: Some(tiles), ..self })
    }

    /// A matrix held only in the tiled layout: the AVX2 products read it, row lookups
    /// ([`WeightView::dequantize_row`]) read its rows back into GGUF layout, and the paths that
    /// need the GGUF bytes ([`WeightView::data`], [`WeightView::row`], products without AVX2)
    /// get nothing and refuse.
    pub fn tiled_only(tiles: TiledView<'a>) -> Self {
        let (ty, rows, cols) = (tiles.ty(), tiles.rows(), tiles.cols());
        WeightView { ty, rows, cols, data: &[], tiles: Some(tiles) }
    }

    /// The tiled copy products read, if any.
    pub fn tiles(&self) -> Option<TiledView<'a>> {
        self.tiles
    }

    /// Whether the GGUF bytes are absent ([`WeightView::tiled_only`]).
    pub(crate) fn is_tiled_only(&self) -> bool {
        self.data.is_empty() && self.rows > 0 && self.cols > 0
    }

    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features; the contiguous dimension).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The raw bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.data.len().checked_div(self.rows).unwrap_or(0)
    }

    /// Row `r`'s bytes.
    ///
    /// # Panics
    ///
    /// When `r >= rows`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `r` into `out` (`cols` values): the token embedding lookup.
    ///
    /// Errors when `out.len() != cols` or the type has no dequantization.
    ///
    /// # Panics
    ///
    /// When `r >= rows`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        check_len("output row", self.cols, out.len())?;
        match self.tiles {
            Some(t) if self.is_tiled_only() => dequantize_row(self.ty, &t.gguf_row(r), out),
            _ => dequantize_row(self.ty, self.row(r), out),
        }
    }
}

/// `out[t * rows + r] = dot(W[r], x[t])` for `n_tokens` rows of `x` (`n_tokens x cols`).
///
/// Errors (and leaves `out` unspecified) when the weight type has no kernel or a length is wrong.
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightView<'_>,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_on(Isa::current(), pool, w, x, n_tokens, out)
}

thread_local! {
    static ACTS: RefCell<QuantizedActs> = RefCell::new(QuantizedActs::new());
    static ACTS_K: RefCell<QuantizedActs> = RefCell::new(QuantizedActs::new());
    static PACKED: RefCell<PackedActs> = RefCell::new(PackedActs::default());
    static KPACKED: RefCell<KPacked> = RefCell::new(KPacked::default());
}

/// Runs `f` on this thread's scratch buffer `key`, or on a fresh one when the buffer is in use
/// (a product started from inside a task of another).
fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut t) => f(&mut t),
        Err(_) => f(&mut T::default()),
    })
}

/// [`matmul`] on a given instruction set.
pub fn matmul_on(
    isa: Isa,
    pool: &ThreadPool,
    w: &WeightView<'_>,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_group_on(isa, pool, x, n_tokens, &mut [(*w, out)])
}

/// [`matmul`] for several matrices of the same input (Q, K and V; gate and up), as one
/// parallel job: `group[m].1[t * rows_m + r] = dot(W_m[r], x[t])`. The input is quantized
/// and packed once per activation format instead of once per matrix, and the rows of all the
/// matrices are shared out together, so a small matrix does not leave threads idle at its end.
/// Each output is exactly what [`matmul`] gives for that matrix alone.
///
/// Errors, before computing anything, when a weight type has no kernel or a length is wrong.
pub fn matmul_group(
    pool: &ThreadPool,
    x: &[f32],
    n_tokens: usize,
    group: &mut [(WeightView<'_>, &mut [f32])],
) -> Result<(), KernelError> {
    matmul_group_on(Isa::current(), pool, x, n_tokens, group)
}

/// [`matmul_group`] on a given instruction set.
pub fn matmul_group_on(
    isa: Isa,
    pool: &ThreadPool,
    x: &[f32],
    n_tokens: usize,
    group: &mut [(WeightView<'_>, &mut [f32])],
) -> Result<(), KernelError> {
    let (mut q8_0, mut q8_k) = (false, false);
    for (w, out) in group.iter() {
        check_len("activations", n_tokens * w.cols, x.len())?;
        check_len("output", n_tokens * w.rows, out.len())?;
        match (uses_quantized_acts(w.ty), act_format(w.ty)) {
            (Some(true), Some(ActFormat::Q8K)) => q8_k = true,
            (Some(true), Some(_)) => q8_0 = true,
            (Some(false), _) => {}
            _ => return Err(KernelError::Unsupported { ty: w.ty, op: "matmul" }),
        }
    }
    let Some(cols) = group.first().map(|(w, _)| w.cols) else { return Ok(()) };
    // No Q8_0 rows when only tiled matrices read them: `run_group` quantizes the tokens
    // straight into the tiles' layout.
    let q8_0 = q8_0 && !straight_to_tiles(isa, group, n_tokens, cols);
    let quantize = |acts: &mut QuantizedActs, f: ActFormat, wanted: bool| {
        if wanted {
            acts.quantize_as_on(isa, f, pool, x, n_tokens, cols)
        } else {
            Ok(())
        }
    };
    with_scratch(&ACTS, |a8| {
        with_scratch(&ACTS_K, |ak| {
            quantize(a8, ActFormat::Q8_0, q8_0)?;
            quantize(ak, ActFormat::Q8K, q8_k)?;
            let acts = |f: ActFormat| match f {
                ActFormat::Q8K if q8_k => Some(&*ak),
                ActFormat::Q8K => None,
                _ if q8_0 => Some(&*a8),
                _ => None,
            };
            let xs: Vec<&[f32]> =
                if cols == 0 { vec![&[]; n_tokens] } else { x.chunks_exact(cols).collect() };
            run_group(isa, pool, n_tokens, &xs, &acts, group)
        })
    })
}

/// Whether the Q8_0 tokens of `group` go straight into the tiled layout
/// ([`crate::tiled::TiledActs::quantize`]), never quantized as rows: every member that reads
/// them is tiled, and they are few enough (a decode step's) for one task to quantize, as
/// [`QuantizedActs`] would too; a prefill's are quantized as rows across the pool, then laid out.
fn straight_to_tiles(
    isa: Isa,
    group: &[(WeightView<'_>, &mut [f32])],
    n_tokens: usize,
    cols: usize,
) -> bool {
    n_tokens <= crate::act::tokens_per_task(cols)
        && group.iter().all(|(w, _)| {
            act_format(w.ty) != Some(ActFormat::Q8_0) || (packs(isa, w.ty) && w.tiles.is_some())
        })
}

/// [`matmul`] with activations already quantized (for weights of a quantized type), in the
/// format the weights take ([`crate::dot::act_format`]).
pub fn matmul_quantized(
    pool: &ThreadPool,
    w: &WeightView<'_>,
    acts: &QuantizedActs,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_quantized_on(Isa::current(), pool, w, acts, out)
}

/// [`matmul_quantized`] on a given instruction set.
pub fn matmul_quantized_on(
    isa: Isa,
    pool: &ThreadPool,
    w: &WeightView<'_>,
    acts: &QuantizedActs,
    out: &mut [f32],
) -> Result<(), KernelError> {
    match act_format(w.ty) {
        None => {
            return Err(KernelError::Unsupported {
                ty: w.ty,
                op: "matmul with quantized activations",
            })
        }
        Some(f) if f != acts.format() => {
            return Err(KernelError::Unsupported {
                ty: w.ty,
                op: "matmul with activations quantized to another format",
            })
        }
        Some(_) => {}
    }
    check_len("activation columns", w.cols, acts.cols())?;
    let n_tokens = acts.n_tokens();
    check_len("output", n_tokens * w.rows, out.len())?;
    run_group(isa, pool, n_tokens, &[], &|_| Some(acts), &mut [(*w, out)])
}

/// How a member of a group product gets its tokens.
#[derive(Clone, Copy)]
enum Tokens<'a> {
    /// f32 rows, for float weights.
    Float(&'a [&'a [f32]]),
    /// Quantized rows, through the generic tiles.
    Rows(&'a [ActRow<'a>]),
    /// Quantized rows and their packing for the AVX2 tiles of Q4_0 .. Q8_0.
    Packed(&'a [ActRow<'a>], &'a PackedActs),
    /// Quantized rows and their packing for the AVX2 k-quant tiles.
    KPacked(&'a [ActRow<'a>], &'a KPacked),
}

/// Runs the products of `group` (checked by the caller) as one parallel job: float members
/// read `xs`, quantized ones `acts(their format)`, packed here once per format (tiled ones
/// quantized here from `xs` when there are no Q8_0 rows, see [`straight_to_tiles`]).
fn run_group<'q>(
    isa: Isa,
    pool: &ThreadPool,
    n_tokens: usize,
    xs: &[&[f32]],
    acts: &dyn Fn(ActFormat) -> Option<&'q QuantizedActs>,
    group: &mut [(WeightView<'_>, &mut [f32])],
) -> Result<(), KernelError> {
    let rows_q8_0: Vec<ActRow<'_>> =
        acts(ActFormat::Q8_0).map_or(Vec::new(), |a| (0..n_tokens).map(|t| a.row(t)).collect());
    let rows_q8_k: Vec<ActRow<'_>> =
        acts(ActFormat::Q8K).map_or(Vec::new(), |a| (0..n_tokens).map(|t| a.row(t)).collect());
    // Tiled matrices read their own layout of the tokens ([`crate::tiled::TiledActs`]); the
    // row-layout tiles need the whole packing.
    let pack_rows = group.iter().any(|(w, _)| packs(isa, w.ty) && w.tiles.is_none());
    let pack_tiled = group.iter().any(|(w, _)| packs(isa, w.ty) && w.tiles.is_some());
    let tiled_sums =
        group.iter().any(|(w, _)| w.tiles.is_some_and(|t| crate::tiled::reads_quant_sums(t.ty())));
    let pack_k = isa.avx2() && group.iter().any(|(w, _)| is_k(w.ty));
    with_scratch(&PACKED, |packed| {
        with_scratch(&KPACKED, |kpacked| {
            if pack_rows {
                packed.pack(&rows_q8_0);
            }
            if pack_tiled {
                match acts(ActFormat::Q8_0) {
                    Some(_) => packed.tiled.pack(&rows_q8_0, tiled_sums)?,
                    None => {
                        // Without rows, the floats themselves: one per token.
                        check_len("activation rows", n_tokens, xs.len())?;
                        packed.tiled.quantize(isa, xs, tiled_sums)?
                    }
                }
            }
            if pack_k {
                kpacked.pack(&rows_q8_k);
            }
            let (packed, kpacked) = (&*packed, &*kpacked);
            let tokens = |ty: GgmlType| match act_format(ty) {
                _ if uses_quantized_acts(ty) == Some(false) => Tokens::Float(xs),
                Some(ActFormat::Q8K) if pack_k => Tokens::KPacked(&rows_q8_k, kpacked),
                Some(ActFormat::Q8K) => Tokens::Rows(&rows_q8_k),
                _ if packs(isa, ty) => Tokens::Packed(&rows_q8_0, packed),
                _ => Tokens::Rows(&rows_q8_0),
            };
            parallel_group(pool, n_tokens, group, &|w, rows, sink| {
                member_rows(isa, w, tokens(w.ty), n_tokens, rows, sink)
            })
        })
    })
}
/// Rows `rows` of `w` for every token, into `sink`.
fn member_rows(
    isa: Isa,
    w: &WeightView<'_>,
    tokens: Tokens<'_>,
    n_tokens: usize,
    rows: std::ops::Range<usize>,
    sink: &Sink<'_>,
) -> Result<(), KernelError> {
    let (ty, data, row_bytes) = (w.ty, w.data, w.row_bytes());
    let mut emit = |r, t, v| sink.write(r, t, v);
    if w.is_tiled_only() && !matches!((tokens, w.tiles), (Tokens::Packed(..), Some(_))) {
        return Err(KernelError::Unsupported { ty, op: "a matrix held tiled, without AVX2" });
    }
    match (tokens, w.tiles) {
        #[cfg(target_arch = "x86_64")]
        (Tokens::Packed(_, p), Some(tiles)) => {
            // SAFETY: `Packed` tokens exist only where `packs(isa, ..)`, which requires an
            // `isa` with AVX2, and such an `Isa` comes from detection: the CPU has
            // AVX2+FMA+F16C.
            unsafe {
                crate::tiled::avx2::tiled_rows(tiles, &p.tiled, rows, &mut |r, t, v| {
                    sink.write_group(r, t, v)
                })
            }
        }
        (Tokens::Packed(acts, p), _) => {
            q_rows_packed(isa, ty, data, row_bytes, acts, p, rows, &mut emit)
        }
        (Tokens::KPacked(acts, p), _) => {
            k_rows_packed(isa, ty, data, row_bytes, acts, p, rows, &mut emit)
        }
        (Tokens::Float(xs), _) => {
            for (rs, ts) in blocks(rows, n_tokens) {
                let tb = ts.start;
                f_rows(isa, ty, data, row_bytes, &xs[ts], rs, &mut |r, t, v| {
                    sink.write(r, tb + t, v)
                })?;
            }
            Ok(())
        }
        (Tokens::Rows(acts), _) => {
            for (rs, ts) in blocks(rows, n_tokens) {
                let tb = ts.start;
                q_rows(isa, ty, data, row_bytes, &acts[ts], rs, &mut |r, t, v| {
                    sink.write(r, tb + t, v)
                })?;
            }
            Ok(())
        }
    }
}

/// Where tasks write their outputs: `out[t * rows + r]`, each task owning whole rows.
struct Sink<'a> {
    ptr: *mut f32,
    rows: usize,
    len: usize,
    owned: std::ops::Range<usize>,
    _out: PhantomData<&'a mut [f32]>,
}

impl Sink<'_> {
    #[inline]
    fn write(&self, r: usize, t: usize, v: f32) {
        let i = t * self.rows + r;
        assert!(self.owned.contains(&r) && i < self.len, "write outside the task's rows");
        // SAFETY: `ptr` is valid for `len` f32 writes for the borrow `'a` of `out`; `i < len`.
        // Each task gets a `Sink` with a disjoint `owned` row range and only writes rows in it,
        // so no two threads write the same element, and `out` is not read until all tasks end.
        unsafe { self.ptr.add(i).write(v) }
    }

    /// `write` of rows `r .. r + 8` of token `t`, with one check and one copy.
    #[inline]
    fn write_group(&self, r: usize, t: usize, v: &[f32; GROUP]) {
        let i = t * self.rows + r;
        let fits = r >= self.owned.start && r + GROUP <= self.owned.end && i + GROUP <= self.len;
        assert!(fits, "write outside the task's rows");
        // SAFETY: as in `write`, for the `GROUP` elements `i .. i + GROUP`, all below `len` and
        // in this task's rows: `v` is another allocation, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(i), GROUP) }
    }
}

struct OutPtr(*mut f32);
// SAFETY: the pointer is only used through `Sink::write`, whose row ownership makes writes from
// several threads disjoint.
unsafe impl Sync for OutPtr {}

/// A task's work: compute rows `rows` of a matrix for every token into the sink.
type RowsWork<'a> = dyn Fn(&WeightView<'_>, std::ops::Range<usize>, &Sink<'_>) -> Result<(), KernelError>
    + Sync
    + 'a;

/// Splits chunks of `rows` rows each, in order, into `n` runs of neighbouring chunks holding
/// about equal rows (a run ends with the chunk that reaches its share; some may be empty).
fn runs(
    rows: impl ExactSizeIterator<Item = usize> + Clone,
    n: usize,
) -> Vec<std::ops::Range<usize>> {
    let n = n.max(1);
    let (len, total) = (rows.len(), rows.clone().sum::<usize>());
    let mut out = Vec::with_capacity(n);
    let (mut start, mut acc) = (0, 0usize);
    for (i, r) in rows.enumerate() {
        acc += r;
        while out.len() + 1 < n && acc.saturating_mul(n) >= total.saturating_mul(out.len() + 1) {
            out.push(start..i + 1);
            start = i + 1;
        }
    }
    out.push(start..len);
    out.resize(n, len..len);
    out
}

/// The most weight bytes in one chunk of a parallel product (see [`parallel_group`]).
const CHUNK_BYTES: usize = 256 << 10;

/// The next chunk of a thread's run, on a cache line of its own: a thread claims its own
/// run's chunks, and counters sharing a line would move it between the cores at every claim
/// (the claims were about 1% of a 4-token decode step's samples on a 2-core Zen 3). 128 bytes:
/// some cores fetch lines in pairs.
#[repr(align(128))]
struct RunCounter(AtomicUsize);

/// Runs `work(w, rows, sink)` over chunks of every matrix's rows in the pool, all matrices in
/// one job; returns the first error.
fn parallel_group(
    pool: &ThreadPool,
    n_tokens: usize,
    group: &mut [(WeightView<'_>, &mut [f32])],
    work: &RowsWork<'_>,
) -> Result<(), KernelError> {
    if n_tokens == 0 {
        return Ok(());
    }
    let threads = pool.n_threads();
    let total: usize = group.iter().map(|(w, _)| w.rows).sum();
    // Several chunks per thread for balance, in multiples of 8 rows for the row tiles, but
    // with at least ~32 row-tokens each: below a microsecond of work a chunk costs more in
    // hand-out than it gains in balance. Each thread first works through its own run of
    // neighbouring chunks, one sequential stream of weights that the prefetchers follow
    // (with chunks dealt out in turn, every thread's stream restarted at each chunk: decode
    // steps took 7-8% longer on a 2-core Zen 3), then takes what is left of the others' runs.
    // Chunks of a big matrix (an output projection of 30 MB) are capped at
    // [`CHUNK_BYTES`] of weights: the threads end a job at most one chunk apart, and a
    // sixteenth of such a matrix is over 100 us of work.
    let min_rows = 32usize.div_ceil(n_tokens).next_multiple_of(8);
    let row_bytes = group.iter().map(|(w, _)| w.row_bytes()).max().unwrap_or(0).max(1);
    let max_rows = (CHUNK_BYTES / row_bytes) / 8 * 8;
    let chunk = if threads == 1 {
        total.max(1)
    } else {
        total.div_ceil(threads * 8).next_multiple_of(8).min(max_rows).max(min_rows)
    };
    let outs: Vec<(WeightView<'_>, OutPtr, usize)> =
        group.iter_mut().map(|(w, out)| (*w, OutPtr(out.as_mut_ptr()), out.len())).collect();
    let chunks: Vec<(usize, std::ops::Range<usize>)> = outs
        .iter()
        .enumerate()
        .flat_map(|(m, (w, _, _))| {
            (0..w.rows).step_by(chunk).map(move |r0| (m, r0..(r0 + chunk).min(w.rows)))
        })
        .collect();
    let runs = runs(chunks.iter().map(|(_, r)| r.len()), threads);
    let next: Vec<RunCounter> =
        runs.iter().map(|r| RunCounter(AtomicUsize::new(r.start))).collect();
    let err = std::sync::Mutex::new(None);
    pool.run(runs.len(), |i| {
        for j in (0..runs.len()).map(|k| (i + k) % runs.len()) {
            loop {
                let c = next[j].0.fetch_add(1, Ordering::Relaxed);
                if c >= runs[j].end {
                    break;
                }
                let (m, r) = (chunks[c].0, chunks[c].1.clone());
                let (w, base, len) = &outs[m];
                let owned = r.clone();
                let sink = Sink { ptr: base.0, rows: w.rows, len: *len, owned, _out: PhantomData };
                if let Err(e) = work(w, r, &sink) {
                    err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            }
        }
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::ActFormat;
    use crate::dot;
    use crate::formats::quantize_row;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
        let mut s = seed;
        let f: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut b = vec![0u8; rows * rb];
        for (src, dst) in f.chunks(cols).zip(b.chunks_mut(rb)) {
            quantize_row(ty, src, dst).unwrap();
        }
        (f, b)
    }

    #[test]
    fn a_matrix_cut_into_capped_chunks_gives_every_row_once() {
        // 8704-byte rows: chunks of 24 rows (CHUNK_BYTES), not a sixteenth of the 520.
        let (ty, rows, cols) = (GgmlType::Q8_0, 520, 8192);
        assert_eq!(CHUNK_BYTES / ty.row_bytes(cols as u64).unwrap() as usize / 8 * 8, 24);
        let (_, wb) = weights(ty, rows, cols, 3);
        let w = WeightView::new(ty, rows, cols, &wb).unwrap();
        let mut s = 5;
        for n_tokens in [1, 4] {
            let x: Vec<f32> = (0..n_tokens * cols).map(|_| lcg(&mut s)).collect();
            let mut one = vec![f32::NAN; n_tokens * rows];
            matmul(&ThreadPool::new(1), &w, &x, n_tokens, &mut one).unwrap();
            let mut two = vec![f32::NAN; n_tokens * rows];
            matmul(&ThreadPool::new(2), &w, &x, n_tokens, &mut two).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&two), "n={n_tokens}");
        }
    }

    #[test]
    fn matmul_matches_per_row_reference_dots() {
        let pool = ThreadPool::new(3);
        let (rows, cols) = (37, 96);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            // The k-quants need whole super-blocks.
            let cols = if dot::act_format(ty) == Some(ActFormat::Q8K) { 512 } else { cols };
            let (_, wb) = weights(ty, rows, cols, 1);
            let w = WeightView::new(ty, rows, cols, &wb).unwrap();
            for n_tokens in [1, 3, 4, 9, 70] {
                let mut s = 99;
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| lcg(&mut s) * 3.0).collect();
                let mut want = vec![0.0; n_tokens * rows];
                let mut bound = vec![0.0; n_tokens * rows];
                let mut acts = QuantizedActs::new();
                if let Some(f) = dot::act_format(ty) {
                    acts.quantize_as(f, &pool, &x, n_tokens, cols).unwrap();
                }
                let mut wrow = vec![0.0; cols];
                for t in 0..n_tokens {
                    let xt = &x[t * cols..][..cols];
                    for r in 0..rows {
                        let i = t * rows + r;
                        // The documented bound: 2 (n + 8) eps sum|terms|.
                        if uses_quantized_acts(ty).unwrap() {
                            want[i] =
                                dot::vec_dot_q(Isa::scalar(), ty, w.row(r), acts.row(t)).unwrap();
                            let terms = dot::scalar::abs_terms(ty, w.row(r), &acts.row(t)).unwrap();
                            bound[i] = 2.0 * (cols / 32 + 8) as f32 * f32::EPSILON * terms;
                        } else {
                            want[i] = dot::vec_dot_f(Isa::scalar(), ty, w.row(r), xt).unwrap();
                            w.dequantize_row(r, &mut wrow).unwrap();
                            let terms: f32 = wrow.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                            bound[i] = 2.0 * (cols + 8) as f32 * f32::EPSILON * terms;
                        }
                    }
                }
                for isa in Isa::all_supported() {
                    let mut out = vec![f32::NAN; n_tokens * rows];
                    matmul_on(isa, &pool, &w, &x, n_tokens, &mut out).unwrap();
                    for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= bound[i],
                            "{ty} {isa:?} n={n_tokens} [{i}] {g} vs {e}"
                        );
                        if isa == Isa::scalar() {
                            assert_eq!(g.to_bits(), e.to_bits(), "scalar path is the reference");
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Every shape of batch lands in some mix of token tiles (8, 4, 2, 1, padded) and row
        /// tiles (whole, partial): each (row, token) must still get the scalar reference's
        /// value (bit for bit for Q4_0 .. Q8_0, within the documented bound for the k-quants),
        /// and a token's value must not depend on the batch it came in.
        #[test]
        fn batched_products_match_the_reference_and_the_token_alone(
            rows in 1usize..41,
            n_tokens in 1usize..20,
            blocks in 1usize..4,
            threads in 1usize..4,
            seed in 0u64..1_000_000,
        ) {
            let pool = ThreadPool::new(threads);
            for ty in [
                GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0,
                GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K,
            ] {
                let exact = dot::act_format(ty) == Some(ActFormat::Q8_0);
                let cols = blocks * if exact { 32 } else { 256 };
                let (_, wb) = weights(ty, rows, cols, seed);
                let w = WeightView::new(ty, rows, cols, &wb).unwrap();
                let mut s = seed ^ 0x5eed;
                // Mixed magnitudes, so that blocks get very different scales.
                let x: Vec<f32> = (0..n_tokens * cols)
                    .map(|i| lcg(&mut s) * if i % 97 < 3 { 200.0 } else { 2.0 })
                    .collect();
                let mut acts = QuantizedActs::new();
                acts.quantize_as(dot::act_format(ty).unwrap(), &pool, &x, n_tokens, cols).unwrap();
                for isa in Isa::all_supported() {
                    let mut out = vec![f32::NAN; n_tokens * rows];
                    matmul_on(isa, &pool, &w, &x, n_tokens, &mut out).unwrap();
                    for t in 0..n_tokens {
                        let mut alone = vec![f32::NAN; rows];
                        matmul_on(isa, &pool, &w, &x[t * cols..][..cols], 1, &mut alone).unwrap();
                        for r in 0..rows {
                            let got = out[t * rows + r];
                            let want = dot::vec_dot_q(Isa::scalar(), ty, w.row(r), acts.row(t)).unwrap();
                            let terms = dot::scalar::abs_terms(ty, w.row(r), &acts.row(t)).unwrap();
                            let bound = 2.0 * (cols / 32 + 8) as f32 * f32::EPSILON * terms;
                            if exact || isa == Isa::scalar() {
                                proptest::prop_assert_eq!(got.to_bits(), want.to_bits(), "{} {:?} r{} t{}/{}: {} vs {}", ty, isa, r, t, n_tokens, got, want);
                            } else {
                                proptest::prop_assert!((got - want).abs() <= bound, "{} {:?} r{} t{}/{}: {} vs {} (tol {})", ty, isa, r, t, n_tokens, got, want, bound);
                            }
                            proptest::prop_assert_eq!(got.to_bits(), alone[r].to_bits(), "{} {:?} r{} t{}/{}: batch vs alone", ty, isa, r, t, n_tokens);
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// A group product (one quantization, one packing, one job for several matrices) gives
        /// every matrix exactly what it gets alone, whatever the mix of types and formats.
        #[test]
        fn a_group_product_equals_its_members_alone(
            types in proptest::collection::vec(0usize..7, 1..5),
            rows in proptest::collection::vec(1usize..50, 5),
            n_tokens in 1usize..12,
            threads in 1usize..4,
            seed in 0u64..1_000_000,
        ) {
            const TYPES: [GgmlType; 7] = [
                GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_1,
                GgmlType::Q4K, GgmlType::Q6K, GgmlType::F16,
            ];
            let pool = ThreadPool::new(threads);
            let cols = 256;
            let mats: Vec<(GgmlType, usize, Vec<u8>)> = types
                .iter()
                .zip(&rows)
                .enumerate()
                .map(|(i, (&k, &r))| (TYPES[k], r, weights(TYPES[k], r, cols, seed + i as u64).1))
                .collect();
            let mut s = seed ^ 0xabc;
            let x: Vec<f32> = (0..n_tokens * cols).map(|_| lcg(&mut s) * 4.0).collect();
            for isa in Isa::all_supported() {
                let views: Vec<WeightView<'_>> = mats
                    .iter()
                    .map(|(ty, r, b)| WeightView::new(*ty, *r, cols, b).unwrap())
                    .collect();
                let mut outs: Vec<Vec<f32>> =
                    views.iter().map(|w| vec![f32::NAN; n_tokens * w.rows()]).collect();
                let mut group: Vec<(WeightView<'_>, &mut [f32])> =
                    views.iter().copied().zip(outs.iter_mut().map(|o| o.as_mut_slice())).collect();
                matmul_group_on(isa, &pool, &x, n_tokens, &mut group).unwrap();
                drop(group);
                for (w, got) in views.iter().zip(&outs) {
                    let mut alone = vec![f32::NAN; got.len()];
                    matmul_on(isa, &pool, w, &x, n_tokens, &mut alone).unwrap();
                    let same = got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
                    proptest::prop_assert!(same, "{} {:?}: group differs from alone", w.ty(), isa);
                }
            }
        }
    }

    #[test]
    fn quantized_product_approximates_the_float_product() {
        // End to end: Q8_0 weights times Q8_0 activations is close to the exact product.
        let pool = ThreadPool::new(2);
        let (rows, cols) = (8, 256);
        let (wf, wb) = weights(GgmlType::Q8_0, rows, cols, 5);
        let mut s = 7;
        let x: Vec<f32> = (0..cols).map(|_| lcg(&mut s)).collect();
        let w = WeightView::new(GgmlType::Q8_0, rows, cols, &wb).unwrap();
        let mut out = vec![0.0; rows];
        matmul(&pool, &w, &x, 1, &mut out).unwrap();
        for r in 0..rows {
            let exact: f32 = wf[r * cols..][..cols].iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!((out[r] - exact).abs() < 0.05, "{} vs {exact}", out[r]);
        }
    }

    #[test]
    fn runs_cover_the_chunks_in_order_with_about_equal_rows() {
        let cases: [(&[usize], usize); 7] = [
            (&[40; 16], 2),
            (&[8, 8, 8], 4),
            (&[], 3),
            (&[96, 8, 96, 8, 40], 2),
            (&[24; 37], 3),
            (&[5], 1),
            (&[16, 16, 8], 0),
        ];
        for (rows, n) in cases {
            let rs = runs(rows.iter().copied(), n);
            assert_eq!(rs.len(), n.max(1), "{rows:?} in {n}");
            let mut at = 0;
            for r in &rs {
                assert_eq!(r.start, at, "{rs:?}");
                at = r.end;
            }
            assert_eq!(at, rows.len(), "{rs:?}");
            // No run holds more than its share and one chunk.
            let share = rows.iter().sum::<usize>().div_ceil(n.max(1));
            let biggest = rows.iter().copied().max().unwrap_or(0);
            for r in &rs {
                assert!(rows[r.clone()].iter().sum::<usize>() <= share + biggest, "{rs:?}");
            }
        }
        assert_eq!(runs([40; 16].into_iter(), 2), vec![0..8, 8..16]);
        assert_eq!(runs([24; 37].into_iter(), 3), vec![0..13, 13..25, 25..37]);
    }

    #[test]
    fn shapes_are_validated() {
        let pool = ThreadPool::new(1);
        assert!(WeightView::new(GgmlType::Q4_1, 2, 64, &[0; 79]).is_err());
        assert!(WeightView::new(GgmlType::Q4_1, 2, 48, &[0; 60]).is_err());
        let data = vec![0u8; 80];
        let w = WeightView::new(GgmlType::Q4_1, 2, 64, &data).unwrap();
        assert_eq!(w.row_bytes(), 40);
        let mut out = vec![0.0; 2];
        assert!(matches!(
            matmul(&pool, &w, &[0.0; 63], 1, &mut out),
            Err(KernelError::Length { what: "activations", .. })
        ));
        assert!(matches!(
            matmul(&pool, &w, &[0.0; 64], 1, &mut out[..1]),
            Err(KernelError::Length { what: "output", .. })
        ));
        let k = vec![0u8; 292];
        let wk = WeightView::new(GgmlType::Q8K, 1, 256, &k).unwrap();
        assert!(matches!(
            matmul(&pool, &wk, &[0.0; 256], 1, &mut out[..1]),
            Err(KernelError::Unsupported { .. })
        ));
        // Activations in the wrong format for the weights.
        let k = vec![0u8; 144];
        let wk = WeightView::new(GgmlType::Q4K, 1, 256, &k).unwrap();
        let mut acts = QuantizedActs::new();
        acts.quantize(&pool, &[0.0; 256], 1, 256).unwrap();
        assert!(matches!(
            matmul_quantized(&pool, &wk, &acts, &mut out[..1]),
            Err(KernelError::Unsupported { .. })
        ));
        // Q4_K rows must be whole super-blocks.
        assert!(WeightView::new(GgmlType::Q4K, 2, 64, &[0; 72]).is_err());
    }

    #[test]
    fn embedding_row_lookup() {
        let (rows, cols) = (5, 64);
        let (_, wb) = weights(GgmlType::Q8_0, rows, cols, 3);
        let w = WeightView::new(GgmlType::Q8_0, rows, cols, &wb).unwrap();
        let mut row = vec![0.0; cols];
        w.dequantize_row(3, &mut row).unwrap();
        let mut want = vec![0.0; cols];
        crate::formats::dequantize_row(GgmlType::Q8_0, &wb[3 * 68..4 * 68], &mut want).unwrap();
        assert_eq!(row, want);
        assert!(w.dequantize_row(0, &mut row[..10]).is_err());
    }
}
