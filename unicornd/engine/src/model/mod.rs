//! Models: a GGUF file turned into a network that can run, with its tokenizer.
//!
//! The layer that describes architectures is small on purpose: [`transformer`] is the one
//! decoder block and forward pass; each architecture is a file that reads its hyper-parameters
//! and says how its block differs (a [`transformer::Spec`]). Adding an architecture means adding
//! such a file and a line in [`Model::load`]; `docs/architecture.md` walks through it.

mod error;
mod flow;
mod gemma3;
mod gemma3n;
mod hparams;
mod kv;
mod llama;
mod npu;
mod placement;
mod qwen3;
mod transformer;
mod weights;

pub use error::ModelError;
pub use hparams::HParams;
pub use kv::{KvState, KvType};
pub use npu::{check_kernel, discover_npu, offer_for_manifest, KernelCheck, NpuDiscovery};
pub use placement::{
    set_npu_offer, shared_vulkan_context, Backend, Backends, NpuOffer, OpClass, Placement,
    PlacementError, BACKEND_ENV,
};
pub use transformer::{Logits, Seq};

use unicorn_kernels::ThreadPool;
pub use unicorn_xdna::hwctx::QosPriority;

use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// Architectures this engine runs.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, gemma3, gemma3n, qwen3";

/// A loaded model: the file, its tokenizer, and the network over the file's bytes.
#[derive(Debug)]
pub struct Model {
    gguf: GgufFile,
    hp: HParams,
    tokenizer: Tokenizer,
    net: Box<dyn transformer::Network>,
    exec: placement::Exec,
    name: String,
    file_type: String,
    n_params: u64,
    chat_template: String,
}

impl Model {
    /// Checks the file's architecture, hyper-parameters and tensors, and builds the model, with
    /// the placement the environment asks for ([`Backends::from_env`]).
    pub fn load(gguf: GgufFile) -> Result<Model, ModelError> {
        Model::load_with(gguf, Backends::from_env())
    }

    /// [`Model::load`] running on `backends`.
    pub fn load_with(mut gguf: GgufFile, backends: Backends) -> Result<Model, ModelError> {
        let arch = gguf.architecture()?.to_owned();
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let load = match arch.as_str() {
            "llama" => llama::load,
            "gemma3" => gemma3::load,
            "gemma3n" => gemma3n::load,
            "qwen3" => qwen3::load,
            other => {
                return Err(ModelError::UnsupportedArch(other.to_owned(), SUPPORTED_ARCHITECTURES))
            }
        };
        // What is missing or wrong in the file, said with the architecture that needs it.
        let in_arch = |e| ModelError::Arch { arch: arch.clone(), source: Box::new(e) };
        let mut hp = HParams::read(&gguf, &arch, tokenizer.n_vocab()).map_err(in_arch)?;
        let net = load(&gguf, &mut hp).map_err(in_arch)?;
        let md = gguf.metadata();
        let name = md.opt_str("general.name")?.unwrap_or("").to_owned();
        let chat_template = md.opt_str("tokenizer.chat_template")?.unwrap_or("").to_owned();
        let file_type = file_type_name(md.opt_uint("general.file_type")?);
        let n_params = gguf.tensor_infos().iter().map(|t| t.n_elements()).sum();
        let exec = placement::Exec::new(backends);
        // The vocabulary now lives in the tokenizer; a second copy in the metadata would stay
        // for the model's life (5 MB for SmolLM2's 49k tokens and merges).
        gguf.forget_metadata(crate::tokenizer::COPIED_ARRAYS);
        Ok(Model { gguf, hp, tokenizer, net, exec, name, file_type, n_params, chat_template })
    }

    /// Where the model's operations run.
    pub fn backends(&self) -> &Backends {
        self.exec.backends()
    }

    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// `general.name`, or the empty string.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file type (`general.file_type`), e.g. `Q4_1`.
    pub fn file_type(&self) -> &str {
        &self.file_type
    }

    pub fn n_params(&self) -> u64 {
        self.n_params
    }

    /// `tokenizer.chat_template`, or the empty string.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// Bytes of the model file.
    pub fn file_bytes(&self) -> u64 {
        self.gguf.len()
    }

    /// A fresh context state of `n_ctx` positions.
    pub fn new_state(&self, n_ctx: usize, ty: KvType) -> Result<KvState, ModelError> {
        KvState::new(&self.hp, n_ctx, ty)
    }

    /// Runs a batch of sequences (see [`transformer::Transformer::forward`]) at the normal
    /// NPU priority.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        seqs: &mut [Seq<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forward_at(pool, seqs, logits, QosPriority::Normal)
    }

    /// [`Model::forward`] with `qos` as the priority hint of the NPU contexts its products run
    /// in (the scheduler passes the batch's highest class; it stays the arbiter of what runs
    /// when, the driver does not schedule by the hint).
    pub fn forward_at(
        &self,
        pool: &ThreadPool,
        seqs: &mut [Seq<'_>],
        logits: &mut Vec<f32>,
        qos: QosPriority,
    ) -> Result<(), ModelError> {
        let run = transformer::Run { file: &self.gguf, exec: &self.exec, pool, qos };
        match self.net.forward(run, seqs, logits) {
            // A device error (e.g. a lost device): the pass left the sequences as they were, so
            // it runs again with every class on the CPU, as do all later ones.
            Err(ModelError::Vulkan(e)) if self.exec.uses_device() => {
                self.exec.fail_over(&e);
                self.net.forward(run, seqs, logits)
            }
            r => r,
        }
    }

    /// Submissions, dispatches and transfers of this model's passes on the Vulkan device so far
    /// (`None` before the first pass there).
    pub fn vulkan_stats(&self) -> Option<unicorn_vulkan::StepStats> {
        self.exec.stats()
    }

    /// Contexts of this model whose KV cache is allocated on the Vulkan device (each is freed
    /// when its context is dropped, once no submission uses it).
    pub fn device_kv_caches(&self) -> usize {
        self.exec.live_kv().load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Device time per kind of operation of the last pass on the Vulkan device, largest first;
    /// measured only with `UNICORN_VULKAN_TIMING=1` (empty otherwise).
    pub fn vulkan_timings(&self) -> Vec<unicorn_vulkan::OpTime> {
        self.exec.timings()
    }
}

/// The name of a `general.file_type` value (llama.cpp's `llama_ftype`).
fn file_type_name(ft: Option<u64>) -> String {
    let name = match ft {
        None => return "unknown".into(),
        Some(0) => "F32",
        Some(1) => "F16",
        Some(2) => "Q4_0",
        Some(3) => "Q4_1",
        Some(7) => "Q8_0",
        Some(8) => "Q5_0",
        Some(9) => "Q5_1",
        Some(10) => "Q2_K",
        Some(11) => "Q3_K_S",
        Some(12) => "Q3_K_M",
        Some(13) => "Q3_K_L",
        Some(14) => "Q4_K_S",
        Some(15) => "Q4_K_M",
        Some(16) => "Q5_K_S",
        Some(17) => "Q5_K_M",
        Some(18) => "Q6_K",
        Some(32) => "BF16",
        Some(n) => return format!("file type {n}"),
    };
    name.into()
}
