//! Weights as the model file holds them, checked against the shapes the architecture expects.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use std::borrow::Cow;
use unicorn_kernels::formats::dequantize_row;

use unicorn_kernels::tiled::{TiledView, TiledWeights};
use unicorn_kernels::{GgmlType, KernelError, WeightView};

use super::ModelError;
use crate::gguf::GgufFile;

/// A weight matrix: `rows` outputs of `cols` inputs, stored row-major in the file (ggml
/// dims `[cols, rows]`), and, once the CPU has multiplied it, the same weights tiled eight
/// rows wide for the AVX2 products ([`Matrix::cpu_view`]).
#[derive(Clone, Debug)]
pub(crate) struct Matrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    range: Range<usize>,
    tiles: Arc<OnceLock<Option<TiledWeights>>>,
    /// The file holds this matrix tiled ([`GgufFile::from_memfd_tiled`]), not in GGUF layout.
    stored_tiled: bool,
}

fn bad(name: &str, message: String) -> ModelError {
    ModelError::BadTensor { name: name.to_owned(), message }
}

impl Matrix {
    /// The tensor `name`, which must be `rows x cols`.
    pub fn load(
        gguf: &GgufFile,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Matrix, ModelError> {
        Ok(Matrix::load_stack(gguf, name, rows, cols, None)?.remove(0))
    }

    /// The 3-D tensor `name` as its `n` matrices of `rows x cols` (ggml dims `[cols, rows, n]`),
    /// or with `n = None` the 2-D tensor `name` as one matrix.
    pub fn load_stack(
        gguf: &GgufFile,
        name: &str,
        rows: usize,
        cols: usize,
        n: Option<usize>,
    ) -> Result<Vec<Matrix>, ModelError> {
        let t = gguf.tensor(name)?;
        let mut want = vec![cols as u64, rows as u64];
        want.extend(n.map(|n| n as u64));
        if t.dims != want {
            return Err(bad(name, format!("shape {:?}, expected {want:?}", t.dims)));
        }
        let base = gguf.bytes().as_ptr() as usize;
        let start = t.data.as_ptr() as usize - base;
        let each = t.data.len() / n.unwrap_or(1).max(1);
        let mut mats: Vec<Matrix> = (0..n.unwrap_or(1))
            .map(|i| Matrix {
                ty: t.ty,
                rows,
                cols,
                range: start + i * each..start + (i + 1) * each,
                tiles: Arc::default(),
                stored_tiled: false,
            })
            .collect();
        for m in mats.iter_mut() {
            match gguf.tiled(&m.range) {
                None => {}
                Some(true) => m.stored_tiled = true,
                Some(false) => {
                    return Err(bad(
                        name,
                        "stored tiled in a split this engine does not read".into(),
                    ))
                }
            }
        }
        // Checks the byte length and that the type has a matrix product.
        mats[0].view(gguf.bytes()).map_err(|e| bad(name, e.to_string()))?;
        if unicorn_kernels::dot::uses_quantized_acts(t.ty).is_none() {
            return Err(bad(name, format!("type {} has no matrix product on the CPU", t.ty)));
        }
        Ok(mats)
    }

    /// The matrix over the file's bytes (for dequantizing rows or a product anywhere): in GGUF
    /// layout, or, for a matrix the file holds tiled, the tiles alone
    /// ([`WeightView::tiled_only`]).
    pub fn view<'a>(&self, bytes: &'a [u8]) -> Result<WeightView<'a>, KernelError> {
        let data = &bytes[self.range.clone()];
        if self.stored_tiled {
            let tiles = TiledView::new(self.ty, self.rows, self.cols, data)?;
            return Ok(WeightView::tiled_only(tiles));
        }
        WeightView::new(self.ty, self.rows, self.cols, data)
    }

    /// The matrix for a product on the CPU: with its tiled copy where the CPU has the AVX2
    /// kernels for its type and the file is mapped. The copy is made on the first such product
    /// (the model's contexts share it, like the mapping) and the file's pages it replaces are
    /// released from this process, so the weights stay resident once, not twice. A model held
    /// as a copy in memory keeps the file's layout (releasing would not free its pages).
    pub fn cpu_view<'a>(&'a self, file: &'a GgufFile) -> Result<WeightView<'a>, KernelError> {
        let view = self.view(file.bytes())?;
        if self.stored_tiled
            || !file.releases_pages()
            || !TiledWeights::supports(self.ty, self.rows)
        {
            return Ok(view);
        }
        let tiles = self.tiles.get_or_init(|| {
            let tiles = TiledWeights::new(&view);
            if tiles.is_some() {
                file.release_pages(self.range.clone());
            }
            tiles
        });
        match tiles {
            Some(t) => view.with_tiles(t.view()),
            None => Ok(view),
        }
    }

    /// Where the tensor's data starts in the model file (a key naming the tensor).
    pub fn offset(&self) -> usize {
        self.range.start
    }

    /// The matrix in GGUF layout (to upload it): the file's bytes, or for a matrix the file
    /// holds tiled, its rows read back from the tiles.
    pub fn gguf_bytes<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, KernelError> {
        match self.view(bytes)?.tiles() {
            Some(t) if self.stored_tiled => Ok(Cow::Owned(t.gguf_bytes())),
            _ => Ok(Cow::Borrowed(&bytes[self.range.clone()])),
        }
    }

    /// Dequantizes row `r` (an embedding lookup).
    pub fn row(&self, bytes: &[u8], r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.view(bytes)?.dequantize_row(r, out)
    }
}

/// The vector `name` (a norm weight), of exactly `len` values, as f32.
pub(crate) fn vector(gguf: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = gguf.tensor(name)?;
    if t.dims != [len as u64] {
        return Err(bad(name, format!("shape {:?}, expected [{len}]", t.dims)));
    }
    let mut out = vec![0.0; len];
    dequantize_row(t.ty, t.data, &mut out).map_err(|e| bad(name, e.to_string()))?;
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(bad(name, format!("value {i} is not finite")));
    }
    Ok(out)
}
