//! Which backend runs which class of operations, and the Vulkan state the forward pass uses.
//!
//! A [`Placement`] maps each [`OpClass`] to a [`Backend`]. `UNICORN_BACKEND` asks for one
//! (`cpu`, `vulkan`, `vulkan-all`, or per class: `feed_forward=vulkan,output=vulkan`);
//! [`Backends::resolve`] turns the request into what runs, falling back per class along
//! xdna -> vulkan -> cpu when a backend is not available (logged once at warn, never a panic).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use unicorn_vulkan::{
    timing_from_env, Context, OpTime, Options, Step, StepStats, VulkanError, Weight,
};

use unicorn_xdna::hwctx::QosPriority;
use unicorn_xdna::manifest::Kernel;
use unicorn_xdna::runtime::Runtime;

use super::npu::{Npu, NpuPass};
use super::weights::Matrix;
use super::ModelError;

/// The environment variable that chooses the placement.
pub const BACKEND_ENV: &str = "UNICORN_BACKEND";

/// A class of operations placed as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// The attention block's matrix products: Q, K, V and the output projection `wo`.
    Attention,
    /// The feed-forward's matrix products: gate, up and down.
    FeedForward,
    /// The output projection (logits).
    Output,
    /// The RMSNorms.
    Norms,
}

impl OpClass {
    pub const ALL: [OpClass; 4] =
        [OpClass::Attention, OpClass::FeedForward, OpClass::Output, OpClass::Norms];

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Attention => "attention",
            OpClass::FeedForward => "feed_forward",
            OpClass::Output => "output",
            OpClass::Norms => "norms",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A backend an operation class can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Cpu,
    Vulkan,
    /// The AMD NPU: available for a class only when the process's [`NpuOffer`] covers it
    /// (otherwise the class falls back to Vulkan, then the CPU).
    Xdna,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Vulkan => "vulkan",
            Backend::Xdna => "xdna",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `UNICORN_BACKEND` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{BACKEND_ENV}={value:?}: {reason} (expected cpu, vulkan, vulkan-all, or class=backend pairs \
     separated by commas, classes attention, feed_forward, output, norms, backends cpu, vulkan, \
     xdna)"
)]
pub struct PlacementError {
    pub value: String,
    pub reason: String,
}

/// The backend of every operation class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Placement([Backend; 4]);

impl Default for Placement {
    fn default() -> Placement {
        Placement::cpu()
    }
}

impl Placement {
    /// Everything on the CPU.
    pub const fn cpu() -> Placement {
        Placement([Backend::Cpu; 4])
    }

    /// `UNICORN_BACKEND=vulkan`: the feed-forward and output products on Vulkan, the rest on the
    /// CPU.
    pub fn vulkan() -> Placement {
        Placement::cpu()
            .with(OpClass::FeedForward, Backend::Vulkan)
            .with(OpClass::Output, Backend::Vulkan)
    }

    /// `UNICORN_BACKEND=vulkan-all`: every class on Vulkan.
    pub const fn vulkan_all() -> Placement {
        Placement([Backend::Vulkan; 4])
    }

    pub fn get(&self, class: OpClass) -> Backend {
        self.0[class.index()]
    }

    /// This placement with `class` on `backend`.
    #[must_use]
    pub fn with(mut self, class: OpClass, backend: Backend) -> Placement {
        self.0[class.index()] = backend;
        self
    }

    /// Whether some class is on `backend`.
    pub fn uses(&self, backend: Backend) -> bool {
        self.0.contains(&backend)
    }

    /// Parses a `UNICORN_BACKEND` value. Classes a per-class list leaves out stay on the CPU.
    pub fn parse(value: &str) -> Result<Placement, PlacementError> {
        let err = |reason: String| PlacementError { value: value.to_owned(), reason };
        match value.trim() {
            "cpu" => return Ok(Placement::cpu()),
            "vulkan" => return Ok(Placement::vulkan()),
            "vulkan-all" => return Ok(Placement::vulkan_all()),
            "" => return Err(err("empty".into())),
            _ => {}
        }
        let mut p = Placement::cpu();
        let mut seen = Vec::new();
        for item in value.split(',') {
            let item = item.trim();
            let (class, backend) = item
                .split_once('=')
                .ok_or_else(|| err(format!("{item:?} is not class=backend")))?;
            let class = OpClass::ALL
                .into_iter()
                .find(|c| c.name() == class.trim())
                .ok_or_else(|| err(format!("unknown operation class {:?}", class.trim())))?;
            let backend = backend.trim().parse::<Backend>().map_err(err)?;
            if seen.contains(&class) {
                return Err(err(format!("{} is given twice", class.name())));
            }
            seen.push(class);
            p = p.with(class, backend);
        }
        Ok(p)
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "vulkan" => Ok(Backend::Vulkan),
            "xdna" => Ok(Backend::Xdna),
            other => Err(format!("unknown backend {other:?}")),
        }
    }
}

impl FromStr for Placement {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Placement, PlacementError> {
        Placement::parse(s)
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in OpClass::ALL.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}={}", c.name(), self.get(c))?;
        }
        Ok(())
    }
}

/// The process's Vulkan context, opened once per `allow_cpu` value (the first caller's outcome is
/// kept: a failure is reported once, not on every model load).
pub fn shared_vulkan_context(allow_cpu: bool) -> Result<&'static Context, &'static VulkanError> {
    static WITH_CPU: OnceLock<Result<Context, VulkanError>> = OnceLock::new();
    static GPU_ONLY: OnceLock<Result<Context, VulkanError>> = OnceLock::new();
    let cell = if allow_cpu { &WITH_CPU } else { &GPU_ONLY };
    cell.get_or_init(|| Context::new(Options { allow_cpu, ..Options::from_env() })).as_ref()
}

/// What the NPU can take in this process: the classes that a usable amdxdna device with loaded
/// kernels runs, the runtime that runs them, and why the others cannot run there. The daemon
/// sets it once at start ([`set_npu_offer`]) from discovery and the kernel manifest; without it
/// no class is offered.
#[derive(Clone, Debug)]
pub struct NpuOffer {
    classes: Vec<OpClass>,
    runtime: Option<Arc<Runtime>>,
    reason: String,
}

impl NpuOffer {
    /// The classes whose operations the NPU path runs: the matrix products of attention,
    /// feed-forward and output, and the RMSNorms (RoPE and attention itself stay where they
    /// are).
    pub const CLASSES: [OpClass; 4] =
        [OpClass::Attention, OpClass::FeedForward, OpClass::Output, OpClass::Norms];

    /// The product classes, offered when a product kernel is driven.
    const PRODUCTS: [OpClass; 3] = [OpClass::Attention, OpClass::FeedForward, OpClass::Output];

    /// Nothing offered, because of `reason`.
    pub fn none(reason: impl Into<String>) -> NpuOffer {
        NpuOffer { classes: Vec::new(), runtime: None, reason: reason.into() }
    }

    /// `classes` offered, run by `runtime` (classes outside [`NpuOffer::CLASSES`] are not);
    /// `reason` says why the others are not.
    pub fn new(runtime: Arc<Runtime>, classes: &[OpClass], reason: impl Into<String>) -> NpuOffer {
        let classes = classes.iter().copied().filter(|c| NpuOffer::CLASSES.contains(c)).collect();
        NpuOffer { classes, runtime: Some(runtime), reason: reason.into() }
    }

    /// Whether the engine's NPU path runs kernel `k` (a matvec or matmul with bf16 or f32
    /// activations and row-major bf16 or int8-with-row-scale weights, or an rms_norm with bf16
    /// or f32 activations, an f32 weight vector and a declared eps).
    pub fn drives(k: &Kernel) -> bool {
        super::npu::drivable(k)
    }

    /// The offer of `runtime`: the product classes when some product kernel of it is one the
    /// engine drives, `norms` when some rms_norm kernel is ([`NpuOffer::drives`]), nothing
    /// when neither.
    pub fn for_runtime(runtime: Arc<Runtime>) -> NpuOffer {
        let names = |f: fn(&Kernel) -> bool| -> Vec<String> {
            runtime.kernels().filter(|k| f(k)).map(|k| k.name.clone()).collect()
        };
        let products = names(super::npu::drivable_product);
        let norms = names(super::npu::drivable_norm);
        if products.is_empty() && norms.is_empty() {
            return NpuOffer::none("the NPU has no kernel the engine runs");
        }
        let mut classes = Vec::new();
        let mut says = Vec::new();
        if products.is_empty() {
            says.push("no product kernel the engine runs is ready".to_owned());
        } else {
            classes.extend(NpuOffer::PRODUCTS);
            says.push(format!(
                "product kernels {}; a product without a kernel of its shape runs on the cpu",
                products.join(", ")
            ));
        }
        if norms.is_empty() {
            says.push("norms stay off the NPU: no rms_norm kernel the engine runs is ready".into());
        } else {
            classes.push(OpClass::Norms);
            says.push(format!(
                "norm kernels {}; a norm without a kernel of its width and eps, or without a \
                 weight, runs on the cpu",
                norms.join(", ")
            ));
        }
        NpuOffer::new(runtime, &classes, says.join("; "))
    }

    pub fn covers(&self, class: OpClass) -> bool {
        self.runtime.is_some() && self.classes.contains(&class)
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The runtime, when something is offered.
    pub fn runtime(&self) -> Option<&Arc<Runtime>> {
        self.runtime.as_ref()
    }
}

static NPU_OFFER: OnceLock<NpuOffer> = OnceLock::new();

/// Sets the process's NPU offer; only the first call counts (returns whether this one did).
/// Call it before the first [`Backends::from_env`].
pub fn set_npu_offer(offer: NpuOffer) -> bool {
    NPU_OFFER.set(offer).is_ok()
}

fn npu_offer() -> NpuOffer {
    NPU_OFFER
        .get()
        .cloned()
        .unwrap_or_else(|| NpuOffer::none("no NPU discovery ran in this process"))
}

/// What runs where, resolved: the placement after fallbacks, the Vulkan context when some class
/// is on it, and why classes fell back.
#[derive(Clone, Debug)]
pub struct Backends {
    placement: Placement,
    requested: Placement,
    vulkan: Option<&'static Context>,
    /// The NPU runtime, when some class runs on it.
    npu: Option<Arc<Runtime>>,
    fallbacks: Vec<String>,
}

impl Default for Backends {
    fn default() -> Backends {
        Backends::cpu()
    }
}

impl Backends {
    /// Everything on the CPU.
    pub fn cpu() -> Backends {
        Backends {
            placement: Placement::cpu(),
            requested: Placement::cpu(),
            vulkan: None,
            npu: None,
            fallbacks: Vec::new(),
        }
    }

    /// [`Backends::resolve_with_npu`] with the process's NPU offer.
    pub fn resolve_with(
        requested: Placement,
        open_vulkan: impl FnOnce() -> Result<&'static Context, String>,
    ) -> Backends {
        Backends::resolve_with_npu(requested, &npu_offer(), open_vulkan)
    }

    /// `requested` with each class moved along xdna -> vulkan -> cpu until its backend is
    /// available: xdna when `npu` covers the class. `open_vulkan` is called at most once, only
    /// when some class wants Vulkan. Each fallback is logged at warn and kept in
    /// [`Backends::fallbacks`].
    pub fn resolve_with_npu(
        requested: Placement,
        npu: &NpuOffer,
        open_vulkan: impl FnOnce() -> Result<&'static Context, String>,
    ) -> Backends {
        let mut fallbacks = Vec::new();
        let mut placement = requested;
        let moved: Vec<&str> = OpClass::ALL
            .into_iter()
            .filter(|&c| placement.get(c) == Backend::Xdna && !npu.covers(c))
            .map(OpClass::name)
            .collect();
        if !moved.is_empty() {
            let msg = format!(
                "xdna cannot run {} ({}); they run on vulkan",
                moved.join(", "),
                npu.reason()
            );
            log::warn!("{msg}");
            fallbacks.push(msg);
            for c in OpClass::ALL {
                if placement.get(c) == Backend::Xdna && !npu.covers(c) {
                    placement = placement.with(c, Backend::Vulkan);
                }
            }
        }
        let mut vulkan = None;
        if placement.uses(Backend::Vulkan) {
            match open_vulkan() {
                Ok(ctx) => {
                    let i = ctx.info();
                    log::info!("vulkan backend on {} ({})", i.name, i.device_type);
                    vulkan = Some(ctx);
                }
                Err(e) => {
                    let msg = format!("vulkan is not available ({e}); its classes run on the cpu");
                    log::warn!("{msg}");
                    fallbacks.push(msg);
                    for c in OpClass::ALL {
                        if placement.get(c) == Backend::Vulkan {
                            placement = placement.with(c, Backend::Cpu);
                        }
                    }
                }
            }
        }
        let npu = npu.runtime().filter(|_| placement.uses(Backend::Xdna)).cloned();
        if let Some(rt) = &npu {
            log::info!("xdna backend on {}", rt.device().name());
        }
        Backends { placement, requested, vulkan, npu, fallbacks }
    }

    /// [`Backends::resolve_with`] on the process's shared Vulkan context; `allow_cpu` accepts a
    /// CPU Vulkan device (lavapipe).
    pub fn resolve(requested: Placement, allow_cpu: bool) -> Backends {
        Backends::resolve_with(requested, || {
            shared_vulkan_context(allow_cpu).map_err(|e| e.to_string())
        })
    }

    /// What the environment asks for: `UNICORN_BACKEND` (a bad value is logged at error and the
    /// CPU used), by default the CPU (Vulkan is opt-in until it is measured faster);
    /// `UNICORN_VULKAN_ALLOW_CPU=1` accepts lavapipe. Resolved once per process and logged.
    pub fn from_env() -> Backends {
        static ENV: OnceLock<Backends> = OnceLock::new();
        ENV.get_or_init(|| {
            let requested = match std::env::var(BACKEND_ENV) {
                Ok(v) => Placement::parse(&v).unwrap_or_else(|e| {
                    log::error!("{e}; using the cpu");
                    Placement::cpu()
                }),
                // The Vulkan path submits and waits per operation and has not been measured
                // faster than the CPU on any GPU yet, so it is asked for, never the default.
                Err(_) => Placement::cpu(),
            };
            let b = Backends::resolve(requested, Options::from_env().allow_cpu);
            log::info!("placement: {}", b.describe());
            b
        })
        .clone()
    }

    /// The placement that runs (after fallbacks).
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The placement that was asked for.
    pub fn requested(&self) -> Placement {
        self.requested
    }

    /// Why classes fell back, one line each.
    pub fn fallbacks(&self) -> &[String] {
        &self.fallbacks
    }

    /// The Vulkan device's name, when some class runs on it.
    pub fn vulkan_device(&self) -> Option<&str> {
        self.vulkan.map(|c| c.info().name.as_str())
    }

    /// One line: the placement, the Vulkan device, and fallbacks.
    pub fn describe(&self) -> String {
        let mut s = self.placement.to_string();
        if let Some(d) = self.vulkan_device() {
            s.push_str(&format!(" (vulkan: {d})"));
        }
        if let Some(rt) = &self.npu {
            s.push_str(&format!(" (xdna: {})", rt.device().name()));
        }
        if self.placement != self.requested {
            s.push_str(&format!("; asked for {}", self.requested));
        }
        s
    }

    /// The NPU runtime, when some class runs on it.
    pub fn npu_runtime(&self) -> Option<&Arc<Runtime>> {
        self.npu.as_ref()
    }

    /// The Vulkan context when `class` runs on it.
    pub(crate) fn vulkan_for(&self, class: OpClass) -> Option<&'static Context> {
        match self.placement.get(class) {
            Backend::Vulkan => self.vulkan,
            _ => None,
        }
    }
}

/// A model's backends and, once a pass has run on Vulkan, its device state: the weights uploaded
/// (each tensor once, shared by every forward pass) and the [`Step`] the passes record into.
#[derive(Debug)]
pub(crate) struct Exec {
    backends: Backends,
    gpu: Mutex<Option<Gpu>>,
    /// The model's NPU side, when some class runs on the NPU.
    npu: Option<Npu>,
    /// A Vulkan call failed during a pass: every class runs on the CPU from then on.
    failed: AtomicBool,
    /// That failure was a lost device, whose memory (the contexts' device KV caches) can no
    /// longer be trusted.
    lost: AtomicBool,
    /// Device KV caches of this model's contexts whose memory is allocated.
    live_kv: Arc<AtomicUsize>,
}

/// Rows `row0..row0 + rows` of a weight tensor in one device buffer (a tensor larger than the
/// device's largest storage buffer is split by rows).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part {
    pub row0: usize,
    pub rows: usize,
    pub w: Weight,
}

/// The device side of a model: its step and the weights uploaded into it.
#[derive(Debug)]
pub(crate) struct Gpu {
    pub step: Step<'static>,
    /// Matrices by their offset in the model file.
    mats: HashMap<usize, Arc<[Part]>>,
    /// Norm weights by the address of their (never moved) values.
    vecs: HashMap<usize, Weight>,
    /// Device time per operation kind of the last pass (with `UNICORN_VULKAN_TIMING=1`).
    pub last_timings: Vec<OpTime>,
}

impl Gpu {
    /// `m` on the device, uploaded on first use.
    pub fn matrix(&mut self, m: &Matrix, bytes: &[u8]) -> Result<Arc<[Part]>, ModelError> {
        if let Some(p) = self.mats.get(&m.offset()) {
            return Ok(Arc::clone(p));
        }
        let data = m.gguf_bytes(bytes)?;
        let row_bytes = data.len() / m.rows.max(1);
        let info = self.step.context().info();
        let limit = usize::try_from(info.max_storage_buffer_range).unwrap_or(usize::MAX);
        let per = (limit / row_bytes.max(1)).clamp(1, m.rows.max(1));
        let mut parts = Vec::with_capacity(m.rows.div_ceil(per));
        for row0 in (0..m.rows).step_by(per) {
            let rows = per.min(m.rows - row0);
            let w = self.step.weight(&data[row0 * row_bytes..][..rows * row_bytes])?;
            parts.push(Part { row0, rows, w });
        }
        if parts.len() > 1 {
            log::debug!(
                "a {} x {} tensor is on the device in {} parts",
                m.rows,
                m.cols,
                parts.len()
            );
        }
        let parts: Arc<[Part]> = parts.into();
        self.mats.insert(m.offset(), Arc::clone(&parts));
        Ok(parts)
    }

    /// The norm weight `v` on the device, uploaded on first use. `v` must not move or change
    /// while the model lives (the layers' vectors never do).
    pub fn vector(&mut self, v: &[f32]) -> Result<Weight, ModelError> {
        let key = v.as_ptr() as usize;
        if let Some(&w) = self.vecs.get(&key) {
            return Ok(w);
        }
        let w = self.step.weight_f32(v)?;
        self.vecs.insert(key, w);
        Ok(w)
    }
}

impl Exec {
    pub fn new(backends: Backends) -> Exec {
        let npu = backends.npu.clone().map(Npu::new);
        Exec {
            backends,
            gpu: Mutex::new(None),
            npu,
            failed: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            live_kv: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether `class` runs on the NPU.
    pub fn on_npu(&self, class: OpClass) -> bool {
        self.npu.is_some() && self.backends.placement.get(class) == Backend::Xdna
    }

    /// The model's NPU state for a pass at priority `qos`, when some class runs on the NPU.
    pub fn npu(&self, qos: QosPriority) -> Option<NpuPass<'_>> {
        self.npu.as_ref().map(|n| n.pass(qos))
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Whether `class` runs on the Vulkan device.
    #[inline]
    pub fn on_device(&self, class: OpClass) -> bool {
        self.backends.vulkan_for(class).is_some() && !self.failed.load(Ordering::Relaxed)
    }

    /// Whether some class runs on the Vulkan device.
    pub fn uses_device(&self) -> bool {
        OpClass::ALL.into_iter().any(|c| self.on_device(c))
    }

    /// After a Vulkan error in a pass: every class on the CPU from now on (logged at error).
    /// The device state (weights, the step) is dropped; its recording was waited for or never
    /// submitted, so it holds the contexts' device caches no longer, and they can be copied back
    /// to the host unless the device was lost.
    pub fn fail_over(&self, e: &VulkanError) {
        log::error!("vulkan failed during a forward pass ({e}); this model runs on the cpu now");
        self.lost.fetch_or(e.is_device_lost(), Ordering::Relaxed);
        self.failed.store(true, Ordering::Relaxed);
        self.gpu.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Whether a failure lost the device (see [`Exec::fail_over`]).
    pub fn device_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// The counter of this model's device KV caches.
    pub fn live_kv(&self) -> &Arc<AtomicUsize> {
        &self.live_kv
    }

    /// The device state, locked for a pass, with a new step begun; `None` when no class is on
    /// the device. Passes on the device take turns (they share the step's buffers).
    pub fn gpu(&self) -> Result<Option<MutexGuard<'_, Option<Gpu>>>, ModelError> {
        let Some(ctx) = self.backends.vulkan.filter(|_| self.uses_device()) else {
            return Ok(None);
        };
        let mut g = self.gpu.lock().unwrap_or_else(|e| e.into_inner());
        let gpu = match g.as_mut() {
            Some(gpu) => gpu,
            None => g.insert(Gpu {
                step: Step::new(ctx, timing_from_env())?,
                mats: HashMap::new(),
                vecs: HashMap::new(),
                last_timings: Vec::new(),
            }),
        };
        gpu.step.begin()?;
        Ok(Some(g))
    }

    /// Submissions, dispatches and transfers of this model's passes on the device so far.
    pub fn stats(&self) -> Option<StepStats> {
        self.gpu.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|g| g.step.stats())
    }

    /// Device time per operation kind of the last pass (with `UNICORN_VULKAN_TIMING=1`).
    pub fn timings(&self) -> Vec<OpTime> {
        let g = self.gpu.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|g| g.last_timings.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicorn_vulkan::DeviceType;

    #[test]
    fn parses_the_named_placements() {
        assert_eq!(Placement::parse("cpu").unwrap(), Placement::cpu());
        let v = Placement::parse("vulkan").unwrap();
        assert_eq!(v.get(OpClass::FeedForward), Backend::Vulkan);
        assert_eq!(v.get(OpClass::Output), Backend::Vulkan);
        assert_eq!(v.get(OpClass::Attention), Backend::Cpu);
        assert_eq!(v.get(OpClass::Norms), Backend::Cpu);
        assert_eq!(Placement::parse("vulkan-all").unwrap(), Placement::vulkan_all());
    }

    #[test]
    fn parses_per_class_lists() {
        let p = Placement::parse(" feed_forward=vulkan, output = vulkan,attention=xdna").unwrap();
        assert_eq!(p.get(OpClass::FeedForward), Backend::Vulkan);
        assert_eq!(p.get(OpClass::Output), Backend::Vulkan);
        assert_eq!(p.get(OpClass::Attention), Backend::Xdna);
        assert_eq!(p.get(OpClass::Norms), Backend::Cpu);
        assert_eq!(p.to_string(), "attention=xdna,feed_forward=vulkan,output=vulkan,norms=cpu");
        assert_eq!(Placement::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn rejects_bad_values_with_a_clear_message() {
        for (v, what) in [
            ("", "empty"),
            ("gpu", "not class=backend"),
            ("ffn=vulkan", "unknown operation class \"ffn\""),
            ("output=cuda", "unknown backend \"cuda\""),
            ("output=vulkan,output=cpu", "output is given twice"),
        ] {
            let e = Placement::parse(v).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(what), "{v:?}: {msg}");
            assert!(msg.contains("UNICORN_BACKEND"), "{msg}");
        }
    }

    #[test]
    fn no_vulkan_device_falls_back_to_the_cpu_with_a_warning() {
        let mut opened = 0;
        let b = Backends::resolve_with(Placement::vulkan_all(), || {
            opened += 1;
            Err(VulkanError::NoSuitableDevice { skipped: Vec::new() }.to_string())
        });
        assert_eq!(opened, 1);
        assert_eq!(b.placement(), Placement::cpu());
        assert_eq!(b.requested(), Placement::vulkan_all());
        assert_eq!(b.fallbacks().len(), 1);
        assert!(b.fallbacks()[0].contains("no suitable Vulkan device"), "{:?}", b.fallbacks());
        assert!(b.vulkan_device().is_none());
    }

    #[test]
    fn xdna_falls_back_to_vulkan_then_cpu() {
        let p = Placement::cpu().with(OpClass::Attention, Backend::Xdna);
        let b = Backends::resolve_with(p, || Err("no device".into()));
        assert_eq!(b.placement(), Placement::cpu());
        assert_eq!(b.fallbacks().len(), 2);
        assert!(b.fallbacks()[0].contains("xdna"));
    }

    /// A runtime on the test double with no kernels: enough for placement.
    fn test_runtime() -> Arc<Runtime> {
        let dev: Arc<dyn unicorn_xdna::device::Device> =
            Arc::new(unicorn_xdna::fake::FakeDevice::new());
        let m = unicorn_xdna::manifest::Manifest {
            dir: "none".into(),
            ready: Vec::new(),
            unusable: Vec::new(),
        };
        Arc::new(Runtime::new(dev, &m, 4).unwrap())
    }

    #[test]
    fn xdna_keeps_the_classes_the_npu_offer_covers() {
        let p = Placement::cpu()
            .with(OpClass::Attention, Backend::Xdna)
            .with(OpClass::Norms, Backend::Xdna);
        let offer = NpuOffer::new(
            test_runtime(),
            &[OpClass::Attention],
            "no feed-forward kernels in the manifest, no rms_norm kernel",
        );
        // A class the offer leaves out falls back, with the offer's reason.
        assert!(!offer.covers(OpClass::Norms));
        assert!(NpuOffer::new(test_runtime(), &[OpClass::Norms], "").covers(OpClass::Norms));
        // No kernel the engine drives: nothing offered, norms included.
        let none = NpuOffer::for_runtime(test_runtime());
        assert!(OpClass::ALL.iter().all(|&c| !none.covers(c)), "{}", none.reason());
        let b = Backends::resolve_with_npu(p, &offer, || Err("no device".into()));
        assert_eq!(b.placement().get(OpClass::Attention), Backend::Xdna);
        assert_eq!(b.placement().get(OpClass::Norms), Backend::Cpu);
        assert_eq!(b.fallbacks().len(), 2);
        assert!(b.fallbacks()[0].contains("xdna cannot run norms"), "{:?}", b.fallbacks());
        assert!(b.fallbacks()[0].contains("no feed-forward kernels"), "{:?}", b.fallbacks());
        assert!(b.npu_runtime().is_some());
        assert!(b.describe().contains("test double"), "{}", b.describe());
        // Nothing offered: every xdna class falls back, naming the reason.
        let none = NpuOffer::none("no NPU: no /dev/accel node");
        let b = Backends::resolve_with_npu(p, &none, || Err("no device".into()));
        assert_eq!(b.placement(), Placement::cpu());
        assert!(b.fallbacks()[0].contains("no /dev/accel node"), "{:?}", b.fallbacks());
        assert!(b.npu_runtime().is_none());
    }

    #[test]
    fn the_cpu_placement_never_opens_vulkan() {
        let b = Backends::resolve_with(Placement::cpu(), || panic!("opened vulkan"));
        assert_eq!(b.placement(), Placement::cpu());
        assert!(b.fallbacks().is_empty());
    }

    /// lavapipe is not taken unless allowed: on a machine whose only Vulkan devices are CPU
    /// devices, asking for Vulkan without `allow_cpu` runs on the CPU.
    #[test]
    fn lavapipe_needs_allow_cpu() {
        let Ok(devs) = unicorn_vulkan::list_devices() else {
            eprintln!("no Vulkan loader or instance: nothing to check");
            return;
        };
        if devs.is_empty() || devs.iter().any(|d| d.device_type != DeviceType::Cpu) {
            eprintln!("not a CPU-only Vulkan machine ({devs:?}): nothing to check");
            return;
        }
        let b = Backends::resolve(Placement::vulkan(), false);
        assert_eq!(b.placement(), Placement::cpu());
        assert_eq!(b.fallbacks().len(), 1, "{:?}", b.fallbacks());
    }
}
