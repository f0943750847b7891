//! Recording dispatches into one command buffer, submitting it once and waiting for it.
//!
//! Both paths use this: the op-level calls ([`crate::Context::matvec`] and the others record one
//! dispatch and submit) and a [`crate::Step`] (many dispatches, one submission). Every dispatch
//! is followed by a compute-to-compute memory barrier, so a dispatch sees every earlier one's
//! writes (read after write) and never overwrites what an earlier one still reads (write after
//! read): the caller may reuse buffers freely between dispatches of one recording.
//!
//! The recorder holds raw handles only: whoever calls it keeps the buffers alive until
//! [`Recorder::submit`] has returned (it waits for the device).

use ash::vk;

use crate::context::Context;
use crate::error::{Result, VkContext, VulkanError};
use crate::shaders::Kernel;

/// Descriptor sets per pool; more pools are created as a recording needs them.
const SETS_PER_POOL: u32 = 256;

/// Timestamp queries of a recording: one before the first dispatch, one after each.
struct Timestamps {
    pool: vk::QueryPool,
    /// Queries in `pool`.
    capacity: u32,
    /// The kernel of each timed dispatch, in order.
    labels: Vec<Kernel>,
    /// More dispatches were recorded than `capacity` allows: the next recording gets a larger pool.
    overflow: bool,
}

/// A command buffer, its fence, descriptor pools and (optionally) timestamp queries, reused
/// from one recording to the next.
pub(crate) struct Recorder {
    cmd_pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    desc_pools: Vec<vk::DescriptorPool>,
    /// Sets allocated from `desc_pools[pool]` in this recording.
    pool: usize,
    sets_in_pool: u32,
    recording: bool,
    dispatches: usize,
    timestamps: Option<Timestamps>,
}

/// What one submission took on the device, per dispatch, in nanoseconds.
pub(crate) type DispatchTimes = Vec<(Kernel, f64)>;

impl Recorder {
    /// A recorder on `ctx`'s compute queue family; with `timing`, when the queue has timestamps.
    pub(crate) fn new(ctx: &Context, timing: bool) -> Result<Recorder> {
        let d = ctx.device();
        let mut r = Recorder {
            cmd_pool: vk::CommandPool::null(),
            cmd: vk::CommandBuffer::null(),
            fence: vk::Fence::null(),
            desc_pools: Vec::new(),
            pool: 0,
            sets_in_pool: 0,
            recording: false,
            dispatches: 0,
            timestamps: None,
        };
        let ci = vk::CommandPoolCreateInfo::default()
            .queue_family_index(ctx.queue_family())
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: the family is the one the device's queue was created with.
        r.cmd_pool = unsafe { d.create_command_pool(&ci, None) }.vk("vkCreateCommandPool")?;
        let made = r.create_rest(ctx, timing);
        if let Err(e) = made {
            r.destroy(ctx);
            return Err(e);
        }
        Ok(r)
    }

    fn create_rest(&mut self, ctx: &Context, timing: bool) -> Result<()> {
        let d = ctx.device();
        let ci = vk::CommandBufferAllocateInfo::default()
            .command_pool(self.cmd_pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is live and only this recorder (behind `&mut`) uses it.
        self.cmd = unsafe { d.allocate_command_buffers(&ci) }.vk("vkAllocateCommandBuffers")?[0];
        // SAFETY: a live device; the fence starts unsignalled.
        self.fence =
            unsafe { d.create_fence(&vk::FenceCreateInfo::default(), None) }.vk("vkCreateFence")?;
        self.add_desc_pool(ctx)?;
        if timing && ctx.timestamp_period_ns().is_some() {
            self.timestamps = Some(Timestamps {
                pool: create_query_pool(ctx, 256)?,
                capacity: 256,
                labels: Vec::new(),
                overflow: false,
            });
        }
        Ok(())
    }

    fn add_desc_pool(&mut self, ctx: &Context) -> Result<()> {
        let sizes = [vk::DescriptorPoolSize {
            ty: vk::DescriptorType::STORAGE_BUFFER,
            descriptor_count: 3 * SETS_PER_POOL,
        }];
        let ci = vk::DescriptorPoolCreateInfo::default().max_sets(SETS_PER_POOL).pool_sizes(&sizes);
        // SAFETY: a live device; `ci` and `sizes` live through the call.
        let p = unsafe { ctx.device().create_descriptor_pool(&ci, None) }
            .vk("vkCreateDescriptorPool")?;
        self.desc_pools.push(p);
        Ok(())
    }

    /// Whether the recorder measures dispatch times.
    pub(crate) fn timed(&self) -> bool {
        self.timestamps.is_some()
    }

    /// Dispatches recorded since [`Recorder::begin`].
    pub(crate) fn dispatches(&self) -> usize {
        self.dispatches
    }

    /// Starts a recording, dropping one that was never submitted.
    pub(crate) fn begin(&mut self, ctx: &Context) -> Result<()> {
        let d = ctx.device();
        if let Some(t) = self.timestamps.as_mut().filter(|t| t.overflow) {
            let capacity = t.capacity * 2;
            let pool = create_query_pool(ctx, capacity)?;
            // SAFETY: no submission is pending (every submit waits), so the old pool is unused.
            unsafe { d.destroy_query_pool(t.pool, None) };
            *t = Timestamps { pool, capacity, labels: Vec::new(), overflow: false };
        }
        self.recording = false;
        self.dispatches = 0;
        self.pool = 0;
        self.sets_in_pool = 0;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: nothing recorded by this recorder is pending (every submission is waited for
        // before `submit` returns), so its pools and command buffer may be reset; the pool was
        // created with RESET_COMMAND_BUFFER.
        unsafe {
            for &p in &self.desc_pools {
                d.reset_descriptor_pool(p, vk::DescriptorPoolResetFlags::empty())
                    .vk("vkResetDescriptorPool")?;
            }
            d.reset_command_buffer(self.cmd, vk::CommandBufferResetFlags::empty())
                .vk("vkResetCommandBuffer")?;
            d.begin_command_buffer(self.cmd, &begin).vk("vkBeginCommandBuffer")?;
        }
        if let Some(t) = self.timestamps.as_mut() {
            t.labels.clear();
            // SAFETY: the command buffer is recording; the queries are in range and not in use.
            unsafe {
                d.cmd_reset_query_pool(self.cmd, t.pool, 0, t.capacity);
                d.cmd_write_timestamp(self.cmd, vk::PipelineStageFlags::TOP_OF_PIPE, t.pool, 0);
            }
        }
        self.recording = true;
        Ok(())
    }

    fn allocate_set(&mut self, ctx: &Context) -> Result<vk::DescriptorSet> {
        if self.sets_in_pool == SETS_PER_POOL {
            self.pool += 1;
            self.sets_in_pool = 0;
            if self.pool == self.desc_pools.len() {
                self.add_desc_pool(ctx)?;
            }
        }
        let layouts = [ctx.set_layout()];
        let ai = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(self.desc_pools[self.pool])
            .set_layouts(&layouts);
        // SAFETY: the pool has room (fewer than SETS_PER_POOL sets taken since its reset) and
        // only this recorder uses it.
        let set = unsafe { ctx.device().allocate_descriptor_sets(&ai) }
            .vk("vkAllocateDescriptorSets")?[0];
        self.sets_in_pool += 1;
        Ok(set)
    }

    /// Records `kernel` over `groups` workgroups with `buffers` at bindings 0, 1, 2 and `push` as
    /// push constants, then a barrier. The buffers must stay alive until [`Recorder::submit`]
    /// returns. A grid with a zero dimension records nothing.
    pub(crate) fn dispatch(
        &mut self,
        ctx: &Context,
        kernel: Kernel,
        buffers: [vk::Buffer; 3],
        push: &[u32],
        groups: [u32; 3],
    ) -> Result<()> {
        if !self.recording {
            return Err(VulkanError::Shape("dispatch outside a recording".into()));
        }
        let push_bytes: Vec<u8> = push.iter().flat_map(|w| w.to_ne_bytes()).collect();
        if push_bytes.len() > crate::context::PUSH_CONSTANT_BYTES as usize {
            return Err(VulkanError::Shape("push constants too large".into()));
        }
        ctx.check_groups(groups)?;
        if groups.contains(&0) {
            return Ok(());
        }
        let pipeline = ctx.pipeline(kernel)?;
        let set = self.allocate_set(ctx)?;
        let d = ctx.device();
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = buffers
            .iter()
            .map(|&buffer| [vk::DescriptorBufferInfo { buffer, offset: 0, range: vk::WHOLE_SIZE }])
            .collect();
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        let barrier = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
            .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE)];
        let cmd = self.cmd;
        // SAFETY: `set` was just allocated and no pending command buffer uses it; the buffers are
        // live storage buffers (the caller keeps them alive until the submission completes); the
        // command buffer is recording (checked above); the push constants fit the layout's range
        // (checked above) and the grid fits the device limits (`check_groups`). The barrier makes
        // this dispatch's writes available to, and orders it before, every later dispatch.
        unsafe {
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            d.cmd_bind_descriptor_sets(
                cmd,
                vk::PipelineBindPoint::COMPUTE,
                ctx.pipeline_layout(),
                0,
                &[set],
                &[],
            );
            d.cmd_push_constants(
                cmd,
                ctx.pipeline_layout(),
                vk::ShaderStageFlags::COMPUTE,
                0,
                &push_bytes,
            );
            d.cmd_dispatch(cmd, groups[0], groups[1], groups[2]);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &barrier,
                &[],
                &[],
            );
        }
        self.dispatches += 1;
        if let Some(t) = self.timestamps.as_mut() {
            let q = t.labels.len() as u32 + 1;
            if q < t.capacity {
                // SAFETY: recording; query `q` is in range, was reset at the start of the
                // recording and is written once.
                unsafe {
                    d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::BOTTOM_OF_PIPE, t.pool, q)
                };
                t.labels.push(kernel);
            } else {
                t.overflow = true;
            }
        }
        Ok(())
    }

    /// Ends the recording, submits it, waits for it, and returns the time of each timed dispatch
    /// (empty without timing). Afterwards the host sees every shader write.
    pub(crate) fn submit(&mut self, ctx: &Context) -> Result<DispatchTimes> {
        if !self.recording {
            return Err(VulkanError::Shape("submit outside a recording".into()));
        }
        self.recording = false;
        let d = ctx.device();
        let barrier = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ)];
        // SAFETY: the command buffer is recording; the barrier makes every shader write visible to
        // host reads after the fence wait.
        unsafe {
            d.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &barrier,
                &[],
                &[],
            );
            d.end_command_buffer(self.cmd).vk("vkEndCommandBuffer")?;
        }
        ctx.submit_and_wait(self.cmd, self.fence)?;
        self.read_timestamps(ctx)
    }

    fn read_timestamps(&mut self, ctx: &Context) -> Result<DispatchTimes> {
        let (Some(t), Some(period)) = (self.timestamps.as_ref(), ctx.timestamp_period_ns()) else {
            return Ok(Vec::new());
        };
        if t.labels.is_empty() {
            return Ok(Vec::new());
        }
        let mut ticks = vec![0u64; t.labels.len() + 1];
        // SAFETY: the queries 0..=labels.len() were reset and written by the submission that was
        // just waited for; `ticks` holds one u64 per query (TYPE_64, no availability word).
        unsafe {
            ctx.device().get_query_pool_results(
                t.pool,
                0,
                &mut ticks,
                vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
            )
        }
        .vk("vkGetQueryPoolResults")?;
        let mask = ctx.timestamp_mask();
        Ok(t.labels
            .iter()
            .zip(ticks.windows(2))
            .map(|(&k, w)| {
                let dt = (w[1] & mask).wrapping_sub(w[0] & mask) & mask;
                (k, dt as f64 * f64::from(period))
            })
            .collect())
    }

    /// Destroys every object. Call once, when no submission of this recorder is pending.
    pub(crate) fn destroy(&mut self, ctx: &Context) {
        let d = ctx.device();
        // SAFETY: every submission was waited for (or the device is lost or idle), so nothing
        // uses these objects; null handles are ignored by the destroy functions.
        unsafe {
            for p in self.desc_pools.drain(..) {
                d.destroy_descriptor_pool(p, None);
            }
            if let Some(t) = self.timestamps.take() {
                d.destroy_query_pool(t.pool, None);
            }
            d.destroy_fence(self.fence, None);
            d.destroy_command_pool(self.cmd_pool, None);
        }
        self.fence = vk::Fence::null();
        self.cmd_pool = vk::CommandPool::null();
    }
}

fn create_query_pool(ctx: &Context, capacity: u32) -> Result<vk::QueryPool> {
    let ci = vk::QueryPoolCreateInfo::default()
        .query_type(vk::QueryType::TIMESTAMP)
        .query_count(capacity);
    // SAFETY: a live device; `ci` lives through the call.
    unsafe { ctx.device().create_query_pool(&ci, None) }.vk("vkCreateQueryPool")
}
