//! Where weights live: the memory-type choice, a pure function of the device's memory types.
//!
//! Weights are uploaded once per model and read by every step, so they belong in device-local
//! memory. Where that memory is also host-visible and the device shares memory with the host
//! (integrated GPUs, lavapipe) they are mapped and written directly; elsewhere (discrete GPUs,
//! whose host-visible device memory is a small PCIe window at best) they go to device-local
//! memory through a staging buffer.

use crate::context::DeviceType;

/// The properties of one memory type that matter here (a plain copy of Vulkan's
/// `VkMemoryPropertyFlags`, so that the choice is testable without a device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryType {
    pub device_local: bool,
    pub host_visible: bool,
    pub host_coherent: bool,
}

/// How a weight buffer gets its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMemory {
    /// Memory of this type index, mapped and written by the host.
    Mapped { type_index: u32 },
    /// Memory of this type index, written by a copy from a host-visible staging buffer.
    Staged { type_index: u32 },
}

/// The memory type for a weight buffer that accepts the types in `type_bits` (Vulkan's
/// `memoryTypeBits`), on a device of type `device` with the memory types `types` in the driver's
/// order (earlier is preferred among equals, as Vulkan orders them):
///
/// 1. Unless `force_staging`, on a device with unified memory (integrated GPU, CPU): the first
///    device-local, host-visible, host-coherent type, mapped.
/// 2. Otherwise the first device-local type that is not host-visible, then any device-local
///    type, staged; with `force_staging`, then any accepted type, staged.
/// 3. No device-local type at all: the first host-visible, host-coherent type, mapped (as every
///    other buffer).
///
/// `None` when the buffer accepts no usable type.
pub fn choose_weight_memory(
    types: &[MemoryType],
    type_bits: u32,
    device: DeviceType,
    force_staging: bool,
) -> Option<WeightMemory> {
    let first = |pred: &dyn Fn(&MemoryType) -> bool| {
        types
            .iter()
            .enumerate()
            .take(32)
            .find(|&(i, t)| type_bits & (1u32 << i) != 0 && pred(t))
            .map(|(i, _)| i as u32)
    };
    let mappable = |t: &MemoryType| t.host_visible && t.host_coherent;
    let unified = matches!(device, DeviceType::IntegratedGpu | DeviceType::Cpu);
    if unified && !force_staging {
        if let Some(i) = first(&|t| t.device_local && mappable(t)) {
            return Some(WeightMemory::Mapped { type_index: i });
        }
    }
    let staged = first(&|t| t.device_local && !t.host_visible)
        .or_else(|| first(&|t| t.device_local))
        .or_else(|| if force_staging { first(&|_| true) } else { None });
    if let Some(i) = staged {
        return Some(WeightMemory::Staged { type_index: i });
    }
    first(&mappable).map(|i| WeightMemory::Mapped { type_index: i })
}
