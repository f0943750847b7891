//! Instance, device choice, queue, pipelines and the submit path.
//!
//! Every Vulkan call of the crate goes through this module and [`crate::buffer`]; each `unsafe`
//! block states why the call is sound.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ash::vk;

use crate::error::{Result, VkContext, VulkanError};
use crate::memory::WeightMemory;
use crate::recorder::Recorder;
use crate::shaders::{self, Kernel};

/// Environment variable that lets [`Options::from_env`] choose a CPU device (e.g. lavapipe).
pub const ALLOW_CPU_ENV: &str = "UNICORN_VULKAN_ALLOW_CPU";

/// Environment variable that makes [`Options::from_env`] set [`Options::force_staging`].
pub const STAGING_ENV: &str = "UNICORN_VULKAN_STAGING";

/// Bytes a weight upload through a staging buffer copies at a time, unless
/// [`Options::staging_chunk`] says otherwise.
pub const DEFAULT_STAGING_CHUNK: usize = 64 << 20;

/// How [`Context::new`] chooses a device.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Accept a CPU device (Mesa's lavapipe) when no GPU is present. Off by default: on the CPU
    /// the CPU backend is faster; tests and CI turn it on.
    pub allow_cpu: bool,
    /// Never use subgroup operations, even where the device has them: the reductions then go
    /// through shared memory only. For testing that path, and for drivers whose subgroup support
    /// misbehaves.
    pub no_subgroup_ops: bool,
    /// Put weights in device-local memory through a staging buffer even where device-local,
    /// host-visible memory could be mapped directly (integrated GPUs, lavapipe): for testing the
    /// path discrete GPUs take. See [`crate::choose_weight_memory`].
    pub force_staging: bool,
    /// Bytes per staging copy (rounded down to a multiple of 4); `None`: [`DEFAULT_STAGING_CHUNK`].
    pub staging_chunk: Option<usize>,
}

impl Options {
    /// The defaults, with `allow_cpu` set when `UNICORN_VULKAN_ALLOW_CPU=1` and `force_staging`
    /// when `UNICORN_VULKAN_STAGING=1`.
    pub fn from_env() -> Options {
        let on = |name| std::env::var(name).is_ok_and(|v| v == "1");
        Options {
            allow_cpu: on(ALLOW_CPU_ENV),
            force_staging: on(STAGING_ENV),
            ..Options::default()
        }
    }
}

/// What was learned about the chosen device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The driver's device name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Integrated GPU, discrete GPU, CPU, ...
    pub device_type: DeviceType,
    /// The subgroup size the device reports (a dispatch may still run narrower; the shaders never
    /// assume it).
    pub subgroup_size: u32,
    /// Whether the reductions use subgroup arithmetic (`subgroupAdd`): the device offers it in
    /// compute shaders and [`Options::no_subgroup_ops`] is off.
    pub subgroup_arithmetic: bool,
    /// The largest storage-buffer binding, in bytes.
    pub max_storage_buffer_range: u64,
    /// The largest workgroup count per dimension.
    pub max_workgroup_count: [u32; 3],
    /// The workgroup size the reduction shaders are specialised to.
    pub workgroup_size: u32,
}

/// The type of a physical device, as Vulkan reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    Cpu,
    Other,
}

impl DeviceType {
    fn from_vk(t: vk::PhysicalDeviceType) -> DeviceType {
        match t {
            vk::PhysicalDeviceType::DISCRETE_GPU => DeviceType::DiscreteGpu,
            vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceType::IntegratedGpu,
            vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceType::VirtualGpu,
            vk::PhysicalDeviceType::CPU => DeviceType::Cpu,
            _ => DeviceType::Other,
        }
    }

    /// Preference order, lower first: GPUs, then virtual GPUs, then anything else, CPUs last.
    fn rank(self) -> u32 {
        match self {
            DeviceType::DiscreteGpu => 0,
            DeviceType::IntegratedGpu => 1,
            DeviceType::VirtualGpu => 2,
            DeviceType::Other => 3,
            DeviceType::Cpu => 4,
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceType::DiscreteGpu => "discrete GPU",
            DeviceType::IntegratedGpu => "integrated GPU",
            DeviceType::VirtualGpu => "virtual GPU",
            DeviceType::Cpu => "CPU",
            DeviceType::Other => "other",
        })
    }
}

/// One compute pipeline (all share one descriptor set layout and pipeline layout).
#[derive(Clone, Copy)]
struct Pipeline {
    module: vk::ShaderModule,
    pipeline: vk::Pipeline,
}

/// A Vulkan device ready for compute: one queue, the pipelines (created once, on first use), and
/// a synchronous submit path. `Send + Sync`; operations from several threads take turns.
pub struct Context {
    _entry: ash::Entry,
    instance: ash::Instance,
    pub(crate) device: ash::Device,
    pub(crate) memory: vk::PhysicalDeviceMemoryProperties,
    /// The compute queue: externally synchronised in Vulkan, so submitted to under this lock.
    queue: Mutex<vk::Queue>,
    family: u32,
    /// Nanoseconds per timestamp tick and the mask of valid bits, when the queue has timestamps.
    timestamps: Option<(f32, u64)>,
    set_layout: vk::DescriptorSetLayout,
    pipeline_layout: vk::PipelineLayout,
    pipelines: Mutex<Vec<Option<Pipeline>>>,
    /// The recorder of the op-level calls (one dispatch per submission), created on first use.
    exec: Mutex<Option<Recorder>>,
    info: DeviceInfo,
    force_staging: bool,
    staging_chunk: usize,
    /// Whether the weight memory choice was logged.
    weights_logged: AtomicBool,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("info", &self.info).finish_non_exhaustive()
    }
}

/// A physical device as [`list_devices`] reports it.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    pub name: String,
    pub device_type: DeviceType,
    /// `major.minor` API version of the device.
    pub api_version: (u32, u32),
}

/// Loads the Vulkan loader. Errors (never panics) when it is missing.
fn load_entry() -> Result<ash::Entry> {
    // SAFETY: loading libvulkan runs its initialisers; the Vulkan loader is a system library meant
    // to be loaded this way, and the returned `Entry` keeps it loaded while any handle lives.
    unsafe { ash::Entry::load() }.map_err(|e| VulkanError::Loader(e.to_string()))
}

fn create_instance(entry: &ash::Entry) -> Result<ash::Instance> {
    // SAFETY: a global command with no arguments besides the loaded entry points.
    let version = unsafe { entry.try_enumerate_instance_version() }
        .vk("vkEnumerateInstanceVersion")?
        .unwrap_or(vk::API_VERSION_1_0);
    if version < vk::API_VERSION_1_1 {
        return Err(VulkanError::InstanceVersion {
            major: vk::api_version_major(version),
            minor: vk::api_version_minor(version),
        });
    }
    let app = vk::ApplicationInfo::default()
        .application_name(c"unicornd")
        .engine_name(c"unicorn")
        .api_version(vk::API_VERSION_1_1);
    let ci = vk::InstanceCreateInfo::default().application_info(&app);
    // SAFETY: `ci` and what it points to (`app`, static strings) outlive the call.
    match unsafe { entry.create_instance(&ci, None) } {
        // The loader found no driver at all: as far as the caller is concerned, no device.
        Err(vk::Result::ERROR_INCOMPATIBLE_DRIVER) => {
            Err(VulkanError::NoSuitableDevice { skipped: Vec::new() })
        }
        r => r.vk("vkCreateInstance"),
    }
}

/// The name, type and API version of every Vulkan device, without creating a device. Errors when
/// there is no loader or no instance can be created.
pub fn list_devices() -> Result<Vec<DeviceSummary>> {
    let entry = load_entry()?;
    let instance = create_instance(&entry)?;
    let out = physical_devices(&instance).map(|devs| {
        devs.iter()
            .map(|&pd| {
                let p = properties(&instance, pd);
                DeviceSummary {
                    name: device_name(&p),
                    device_type: DeviceType::from_vk(p.device_type),
                    api_version: (
                        vk::api_version_major(p.api_version),
                        vk::api_version_minor(p.api_version),
                    ),
                }
            })
            .collect()
    });
    // SAFETY: nothing created from `instance` outlives it (physical devices need no destruction).
    unsafe { instance.destroy_instance(None) };
    out
}

fn physical_devices(instance: &ash::Instance) -> Result<Vec<vk::PhysicalDevice>> {
    // SAFETY: `instance` is a live instance.
    unsafe { instance.enumerate_physical_devices() }.vk("vkEnumeratePhysicalDevices")
}

fn properties(instance: &ash::Instance, pd: vk::PhysicalDevice) -> vk::PhysicalDeviceProperties {
    // SAFETY: `pd` was enumerated from the live `instance`.
    unsafe { instance.get_physical_device_properties(pd) }
}

fn device_name(p: &vk::PhysicalDeviceProperties) -> String {
    p.device_name_as_c_str()
        .map_or_else(|_| "(unnamed)".to_string(), |s| s.to_string_lossy().into())
}

/// A queue family with compute, preferring one without graphics (a dedicated compute queue).
fn compute_queue_family(instance: &ash::Instance, pd: vk::PhysicalDevice) -> Option<u32> {
    // SAFETY: `pd` was enumerated from the live `instance`.
    let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
    let compute = |f: &vk::QueueFamilyProperties| {
        f.queue_count > 0 && f.queue_flags.contains(vk::QueueFlags::COMPUTE)
    };
    let dedicated = families
        .iter()
        .position(|f| compute(f) && !f.queue_flags.contains(vk::QueueFlags::GRAPHICS));
    dedicated.or_else(|| families.iter().position(compute)).map(|i| i as u32)
}

struct Candidate {
    pd: vk::PhysicalDevice,
    props: vk::PhysicalDeviceProperties,
    ty: DeviceType,
    family: u32,
}

fn choose_device(instance: &ash::Instance, options: &Options) -> Result<Candidate> {
    let mut skipped = Vec::new();
    let mut best: Option<Candidate> = None;
    for pd in physical_devices(instance)? {
        let props = properties(instance, pd);
        let name = device_name(&props);
        let ty = DeviceType::from_vk(props.device_type);
        if props.api_version < vk::API_VERSION_1_1 {
            skipped.push(format!("{name} ({ty}): Vulkan 1.0 only"));
            continue;
        }
        if ty == DeviceType::Cpu && !options.allow_cpu {
            skipped.push(format!("{name} ({ty}): CPU devices not allowed (set {ALLOW_CPU_ENV}=1)"));
            continue;
        }
        let Some(family) = compute_queue_family(instance, pd) else {
            skipped.push(format!("{name} ({ty}): no compute queue"));
            continue;
        };
        log::debug!("vulkan: candidate device {name} ({ty})");
        if best.as_ref().is_none_or(|b| ty.rank() < b.ty.rank()) {
            best = Some(Candidate { pd, props, ty, family });
        }
    }
    best.ok_or(VulkanError::NoSuitableDevice { skipped })
}

impl Context {
    /// Loads Vulkan, chooses a device (discrete GPU, integrated GPU, virtual GPU, other, then a
    /// CPU device only when `options.allow_cpu`) and creates a compute queue on it.
    ///
    /// Errors, never panics, when there is no loader ([`VulkanError::Loader`]), no suitable
    /// device ([`VulkanError::NoSuitableDevice`]) or a Vulkan call fails.
    pub fn new(options: Options) -> Result<Context> {
        let entry = load_entry()?;
        let instance = create_instance(&entry)?;
        let mut guard = InstanceGuard(Some(instance.clone()));
        let ctx = Self::with_instance(entry.clone(), instance, &mut guard, &options);
        // On error the guard destroys the instance here, while `entry` still keeps the loader
        // loaded (destroying it after the last `Entry` is gone calls into an unloaded library).
        drop(guard);
        drop(entry);
        ctx
    }

    /// Creates the device and the rest. Until the `Context` exists the guard destroys the instance
    /// on error; from then on the `Context` owns it and its `Drop` destroys everything.
    fn with_instance(
        entry: ash::Entry,
        instance: ash::Instance,
        guard: &mut InstanceGuard,
        options: &Options,
    ) -> Result<Self> {
        let c = choose_device(&instance, options)?;
        let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut subgroup);
        // SAFETY: `c.pd` belongs to the live instance (Vulkan 1.1, checked), and `props2` chains
        // only `subgroup`, which lives through the call.
        unsafe { instance.get_physical_device_properties2(c.pd, &mut props2) };
        let limits = c.props.limits;
        let subgroup_arithmetic = !options.no_subgroup_ops
            && subgroup.supported_stages.contains(vk::ShaderStageFlags::COMPUTE)
            && subgroup
                .supported_operations
                .contains(vk::SubgroupFeatureFlags::BASIC | vk::SubgroupFeatureFlags::ARITHMETIC);
        let subgroup_size = subgroup.subgroup_size.max(1);
        let workgroup_size = workgroup_size(
            subgroup_size,
            limits.max_compute_work_group_size[0],
            limits.max_compute_work_group_invocations,
        );
        let info = DeviceInfo {
            name: device_name(&c.props),
            device_type: c.ty,
            subgroup_size,
            subgroup_arithmetic,
            max_storage_buffer_range: u64::from(limits.max_storage_buffer_range),
            max_workgroup_count: limits.max_compute_work_group_count,
            workgroup_size,
        };
        log::info!(
            "vulkan: using {} ({}), subgroup size {}{}, maxStorageBufferRange {} bytes, \
             workgroup size {}",
            info.name,
            info.device_type,
            info.subgroup_size,
            if subgroup_arithmetic { " with arithmetic" } else { " without arithmetic" },
            info.max_storage_buffer_range,
            info.workgroup_size,
        );

        let priorities = [1.0f32];
        let queue_ci = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(c.family)
            .queue_priorities(&priorities)];
        let device_ci = vk::DeviceCreateInfo::default().queue_create_infos(&queue_ci);
        // SAFETY: `c.pd` belongs to the live instance; `device_ci` and the arrays it points to
        // live through the call; no features or extensions are requested.
        let device =
            unsafe { instance.create_device(c.pd, &device_ci, None) }.vk("vkCreateDevice")?;
        // SAFETY: `c.pd` belongs to the live instance.
        let memory = unsafe { instance.get_physical_device_memory_properties(c.pd) };
        // SAFETY: queue 0 of family `c.family` was requested at device creation.
        let queue = unsafe { device.get_device_queue(c.family, 0) };
        // SAFETY: `c.pd` belongs to the live instance.
        let families = unsafe { instance.get_physical_device_queue_family_properties(c.pd) };
        let valid_bits = families.get(c.family as usize).map_or(0, |f| f.timestamp_valid_bits);
        let timestamps = (valid_bits > 0 && limits.timestamp_period > 0.0).then(|| {
            let mask = if valid_bits >= 64 { u64::MAX } else { (1u64 << valid_bits) - 1 };
            (limits.timestamp_period, mask)
        });

        // The context owns the instance from here on (`ash::Instance` is a handle and a table of
        // entry points; dropping the guard's copy destroys nothing).
        guard.0 = None;
        let mut ctx = Context {
            _entry: entry,
            instance,
            device,
            memory,
            queue: Mutex::new(queue),
            family: c.family,
            timestamps,
            set_layout: vk::DescriptorSetLayout::null(),
            pipeline_layout: vk::PipelineLayout::null(),
            pipelines: Mutex::new(vec![None; Kernel::COUNT]),
            exec: Mutex::new(None),
            info,
            force_staging: options.force_staging,
            staging_chunk: options.staging_chunk.unwrap_or(DEFAULT_STAGING_CHUNK).max(4),
            weights_logged: AtomicBool::new(false),
        };
        // On error `ctx` is dropped, which destroys what was created (null handles are skipped
        // by Vulkan's destroy functions), the device and the instance.
        ctx.create_objects()?;
        Ok(ctx)
    }

    fn create_objects(&mut self) -> Result<()> {
        let d = &self.device;
        let bindings: Vec<_> = (0..3)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let ci = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: `d` is a live device; `ci` and `bindings` live through the call.
        self.set_layout = unsafe { d.create_descriptor_set_layout(&ci, None) }
            .vk("vkCreateDescriptorSetLayout")?;
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .offset(0)
            .size(PUSH_CONSTANT_BYTES)];
        let layouts = [self.set_layout];
        let ci = vk::PipelineLayoutCreateInfo::default()
            .set_layouts(&layouts)
            .push_constant_ranges(&ranges);
        // SAFETY: as above; `set_layout` is live.
        self.pipeline_layout =
            unsafe { d.create_pipeline_layout(&ci, None) }.vk("vkCreatePipelineLayout")?;

        Ok(())
    }

    /// Destroys every object created from the device, then the device. Runs once, from `Drop`.
    fn destroy_device_objects(&mut self) {
        if let Some(mut rec) = self.exec.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            rec.destroy(self);
        }
        let d = &self.device;
        let pipelines = self.pipelines.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: we hold `&mut self`, so no submission is being recorded; waiting for idle makes
        // sure the device no longer uses any object destroyed below. Every handle was created from
        // `d` (or is null, which the destroy functions ignore), and none is used afterwards.
        unsafe {
            let _ = d.device_wait_idle();
            for p in pipelines.iter().flatten() {
                d.destroy_pipeline(p.pipeline, None);
                d.destroy_shader_module(p.module, None);
            }
            d.destroy_pipeline_layout(self.pipeline_layout, None);
            d.destroy_descriptor_set_layout(self.set_layout, None);
            d.destroy_device(None);
        }
    }

    /// The chosen device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The pipeline of `kernel`, created on first use.
    pub(crate) fn pipeline(&self, kernel: Kernel) -> Result<vk::Pipeline> {
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pipelines[kernel.index()] {
            return Ok(p.pipeline);
        }
        let name = kernel.spirv_name(self.info.subgroup_arithmetic);
        let words = shaders::spirv(&name)?;
        let ci = vk::ShaderModuleCreateInfo::default().code(&words);
        // SAFETY: the device is live; `words` is SPIR-V that glslc produced for Vulkan 1.1 and
        // the subgroup variant is chosen only when the device reports arithmetic subgroup ops.
        let module =
            unsafe { self.device.create_shader_module(&ci, None) }.vk("vkCreateShaderModule")?;
        let wg = self.info.workgroup_size.to_ne_bytes();
        let entries = [vk::SpecializationMapEntry::default().constant_id(0).offset(0).size(4)];
        let spec = vk::SpecializationInfo::default().map_entries(&entries).data(&wg);
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main")
            .specialization_info(&spec);
        let ci =
            [vk::ComputePipelineCreateInfo::default().stage(stage).layout(self.pipeline_layout)];
        // SAFETY: the module and layout are live; `ci`, `spec`, `entries` and `wg` live through
        // the call; the specialization constant 0 is the shader's 4-byte `WG`.
        let created =
            unsafe { self.device.create_compute_pipelines(vk::PipelineCache::null(), &ci, None) };
        let pipeline = match created {
            Ok(p) => p[0],
            Err((_, e)) => {
                // SAFETY: the module is not referenced by any pipeline.
                unsafe { self.device.destroy_shader_module(module, None) };
                return Err(VulkanError::Vk { call: "vkCreateComputePipelines", result: e });
            }
        };
        log::debug!("vulkan: created pipeline {name}");
        pipelines[kernel.index()] = Some(Pipeline { module, pipeline });
        Ok(pipeline)
    }

    /// Runs `kernel` once over `groups` workgroups with `buffers` at bindings 0, 1, 2 and `push`
    /// as push constants, and waits for it. Afterwards the host sees every shader write.
    pub(crate) fn dispatch(
        &self,
        kernel: Kernel,
        buffers: [&crate::Buffer<'_>; 3],
        push: &[u32],
        groups: [u32; 3],
    ) -> Result<()> {
        self.check_groups(groups)?;
        if groups.contains(&0) {
            return Ok(());
        }
        let mut exec = self.exec.lock().unwrap_or_else(|p| p.into_inner());
        let rec = match exec.as_mut() {
            Some(r) => r,
            None => exec.insert(Recorder::new(self, false)?),
        };
        rec.begin(self)?;
        // The borrows in `buffers` outlive `submit`, which waits for the device.
        rec.dispatch(self, kernel, buffers.map(|b| b.raw()), push, groups)?;
        rec.submit(self)?;
        Ok(())
    }

    /// Errors when a grid exceeds `maxComputeWorkGroupCount`.
    pub(crate) fn check_groups(&self, groups: [u32; 3]) -> Result<()> {
        for (i, (&g, &max)) in groups.iter().zip(&self.info.max_workgroup_count).enumerate() {
            if g > max {
                const WHAT: [&str; 3] =
                    ["workgroup count x", "workgroup count y", "workgroup count z"];
                return Err(VulkanError::Limit {
                    what: WHAT[i],
                    value: u64::from(g),
                    limit: u64::from(max),
                });
            }
        }
        Ok(())
    }

    /// Submits the recorded command buffer `cmd` and waits for `fence`, which must be unsignalled
    /// and belong to the caller alone.
    pub(crate) fn submit_and_wait(&self, cmd: vk::CommandBuffer, fence: vk::Fence) -> Result<()> {
        let cmds = [cmd];
        let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
        let d = &self.device;
        {
            let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: the queue is used only under its lock; the fence is the caller's, reset
            // here and signalled only by this submission; host writes to the mapped, coherent
            // buffers happened before the submit, which makes them visible to the device.
            unsafe {
                d.reset_fences(&[fence]).vk("vkResetFences")?;
                d.queue_submit(*queue, &submit, fence).vk("vkQueueSubmit")?;
            }
        }
        // SAFETY: the fence is live; the caller keeps every recorded object alive until this
        // wait has returned.
        unsafe { d.wait_for_fences(&[fence], true, u64::MAX) }.vk("vkWaitForFences")
    }

    /// [`Options::force_staging`].
    pub(crate) fn force_staging(&self) -> bool {
        self.force_staging
    }

    /// Bytes per staging copy.
    pub(crate) fn staging_chunk(&self) -> usize {
        self.staging_chunk
    }

    /// Logs, once per context, where weights go.
    pub(crate) fn log_weight_memory(&self, how: WeightMemory) {
        if self.weights_logged.swap(true, Ordering::Relaxed) {
            return;
        }
        match how {
            WeightMemory::Staged { type_index } => log::info!(
                "vulkan: weights in device-local memory via staging (memory type {type_index}, \
                 {} KiB chunks)",
                self.staging_chunk >> 10
            ),
            WeightMemory::Mapped { type_index } => log::info!(
                "vulkan: weights in host-visible device-local memory (memory type {type_index})"
            ),
        }
    }

    pub(crate) fn device(&self) -> &ash::Device {
        &self.device
    }

    pub(crate) fn queue_family(&self) -> u32 {
        self.family
    }

    pub(crate) fn set_layout(&self) -> vk::DescriptorSetLayout {
        self.set_layout
    }

    pub(crate) fn pipeline_layout(&self) -> vk::PipelineLayout {
        self.pipeline_layout
    }

    /// Nanoseconds per timestamp tick, when the compute queue writes timestamps
    /// (`timestampValidBits > 0`, `timestampPeriod > 0`).
    pub fn timestamp_period_ns(&self) -> Option<f32> {
        self.timestamps.map(|(p, _)| p)
    }

    /// The valid bits of a timestamp.
    pub(crate) fn timestamp_mask(&self) -> u64 {
        self.timestamps.map_or(0, |(_, m)| m)
    }
}

/// Push constants of every shader fit in this many bytes (16 u32; attention takes 12). Every
/// device has at least 128 (`maxPushConstantsSize`).
pub(crate) const PUSH_CONSTANT_BYTES: u32 = 64;

/// The reduction workgroup size: at least 64 invocations, a power of two, a multiple of the
/// reported subgroup size (itself a power of two), within the device limits.
fn workgroup_size(subgroup: u32, max_x: u32, max_invocations: u32) -> u32 {
    let want = subgroup.max(64).next_power_of_two();
    let cap = max_x.min(max_invocations).max(1);
    // The largest power of two not above the cap.
    let cap = 1u32 << (31 - cap.leading_zeros());
    want.min(cap)
}

/// Destroys the instance on drop unless it was taken.
struct InstanceGuard(Option<ash::Instance>);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        if let Some(instance) = self.0.take() {
            // SAFETY: the instance was not handed to a `Context`, so whatever failed destroyed
            // the device it may have created (`create_device` failing creates none), and nothing
            // else created from it needs destruction (physical devices do not).
            unsafe { instance.destroy_instance(None) };
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.destroy_device_objects();
        // SAFETY: the device and everything created from it were destroyed above; nothing else
        // was created from the instance.
        unsafe { self.instance.destroy_instance(None) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workgroup_size_is_a_power_of_two_multiple_of_the_subgroup() {
        assert_eq!(workgroup_size(4, 1024, 1024), 64);
        assert_eq!(workgroup_size(8, 1024, 1024), 64);
        assert_eq!(workgroup_size(32, 1024, 1024), 64);
        assert_eq!(workgroup_size(64, 1024, 1024), 64);
        assert_eq!(workgroup_size(128, 1024, 1024), 128);
        assert_eq!(workgroup_size(32, 48, 1024), 32);
    }

    #[test]
    fn from_env_reads_allow_cpu() {
        // Only reads; tests never set process-wide variables.
        let expect = std::env::var(ALLOW_CPU_ENV).is_ok_and(|v| v == "1");
        assert_eq!(Options::from_env().allow_cpu, expect);
        let expect = std::env::var(STAGING_ENV).is_ok_and(|v| v == "1");
        assert_eq!(Options::from_env().force_staging, expect);
    }
}
