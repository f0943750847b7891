//! The backend's one error type.

use ash::vk;
use unicorn_kernels::GgmlType;

/// Why a Vulkan operation failed. None of these is a panic: the daemon falls back to the CPU
/// backend on [`VulkanError::Loader`] and [`VulkanError::NoSuitableDevice`].
#[derive(Debug, thiserror::Error)]
pub enum VulkanError {
    /// The Vulkan loader (`libvulkan.so.1`) could not be loaded.
    #[error("Vulkan loader not available: {0}")]
    Loader(String),
    /// The loader or driver supports only Vulkan 1.0; the shaders need 1.1.
    #[error("Vulkan {major}.{minor} instance; 1.1 or newer is needed")]
    InstanceVersion { major: u32, minor: u32 },
    /// No device the options allow. `skipped` names each device seen and why it was passed over.
    #[error("no suitable Vulkan device{}", describe_skipped(.skipped))]
    NoSuitableDevice { skipped: Vec<String> },
    /// A Vulkan call returned an error.
    #[error("{call} failed: {result}")]
    Vk { call: &'static str, result: vk::Result },
    /// No memory type with the properties a buffer needs (host-visible and host-coherent for
    /// host buffers; for weights, see [`crate::choose_weight_memory`]).
    #[error("no suitable memory type for a buffer")]
    NoMemoryType,
    /// A buffer or a dispatch exceeds a device limit (buffer splitting is not implemented yet).
    #[error("{what}: {value} exceeds the device limit {limit}")]
    Limit { what: &'static str, value: u64, limit: u64 },
    /// The weights are in a type that has no shader yet.
    #[error("no Vulkan shader for {} weights", .0.name())]
    UnsupportedType(GgmlType),
    /// The host asked for memory the device may still use (a recording that names it was not
    /// submitted and waited for, nor dropped).
    #[error("{0} is in use by the device")]
    InUse(&'static str),
    /// Arguments that do not fit together (lengths, shapes).
    #[error("invalid arguments: {0}")]
    Shape(String),
}

impl VulkanError {
    /// Whether the device was lost (`VK_ERROR_DEVICE_LOST`): the contents of its memory are
    /// undefined from then on.
    pub fn is_device_lost(&self) -> bool {
        matches!(self, VulkanError::Vk { result: vk::Result::ERROR_DEVICE_LOST, .. })
    }
}

fn describe_skipped(skipped: &[String]) -> String {
    if skipped.is_empty() {
        " (no Vulkan driver or device found)".to_string()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    }
}

/// Result of this crate.
pub type Result<T, E = VulkanError> = std::result::Result<T, E>;

/// Maps a `vk::Result` error to [`VulkanError::Vk`] naming the call.
pub(crate) trait VkContext<T> {
    fn vk(self, call: &'static str) -> Result<T>;
}

impl<T> VkContext<T> for std::result::Result<T, vk::Result> {
    fn vk(self, call: &'static str) -> Result<T> {
        self.map_err(|result| VulkanError::Vk { call, result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lost_device_is_lost() {
        let e = |result| VulkanError::Vk { call: "vkWaitForFences", result };
        assert!(e(vk::Result::ERROR_DEVICE_LOST).is_device_lost());
        assert!(!e(vk::Result::ERROR_OUT_OF_DEVICE_MEMORY).is_device_lost());
        assert!(!VulkanError::Shape("x".into()).is_device_lost());
    }
}
