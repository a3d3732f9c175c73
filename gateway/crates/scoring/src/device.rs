//! Finding and opening a compute device, kept apart from the kernels so that tests and callers
//! can pass in a device of their own ([`GpuDevice::new`]).
//!
//! Only the Vulkan backend is compiled in: a real GPU's driver, or Mesa's lavapipe (software
//! Vulkan, `DeviceType::Cpu`) on machines without one.

use std::sync::Arc;

use super::config::BackendChoice;
use super::error::GpuError;

/// An open wgpu device and its queue. Cheap to clone (handles are reference counted); one
/// device is meant to be shared by every model loaded on it.
#[derive(Clone, Debug)]
pub struct GpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
}

impl GpuDevice {
    /// Wraps a device the caller opened itself. Its limits must allow the model's buffers
    /// (`Model::load` checks and says which buffer does not fit).
    pub fn new(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> GpuDevice {
        GpuDevice {
            device,
            queue,
            info,
        }
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether kernels may use f16 (the device was opened with `SHADER_F16`).
    pub fn has_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }

    /// True for a software adapter (lavapipe).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// "name (device type, backend, driver)".
    pub fn describe(&self) -> String {
        describe(&self.info)
    }
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{} ({:?}, {:?}, {} {})",
        info.name, info.device_type, info.backend, info.driver, info.driver_info
    )
    .trim_end()
    .to_string()
}

/// Where models run: a GPU device (real or software) or the CPU path.
// One per process, made once and cloned at model loads: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ComputeDevice {
    Gpu(GpuDevice),
    Cpu,
}

impl ComputeDevice {
    pub fn gpu(&self) -> Option<&GpuDevice> {
        match self {
            ComputeDevice::Gpu(g) => Some(g),
            ComputeDevice::Cpu => None,
        }
    }

    /// "cpu", or the adapter's description.
    pub fn describe(&self) -> String {
        match self {
            ComputeDevice::Gpu(g) => g.describe(),
            ComputeDevice::Cpu => "cpu".to_string(),
        }
    }
}

/// All Vulkan adapters of this machine (empty when there is no Vulkan loader or driver).
pub fn vulkan_adapters() -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::VULKAN,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN))
}

/// Picks an adapter for `choice`: `Ok(None)` means "use the CPU path".
///
/// Preference among real GPUs: discrete, integrated, virtual, other.
pub fn select_adapter(
    choice: BackendChoice,
    allow_software_gpu: bool,
) -> Result<Option<wgpu::Adapter>, GpuError> {
    if choice == BackendChoice::Cpu {
        return Ok(None);
    }
    let adapters = vulkan_adapters();
    let seen = || {
        let names: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join("; ")
        }
    };
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let real = adapters
        .iter()
        .filter(|a| a.get_info().device_type != wgpu::DeviceType::Cpu)
        .min_by_key(|a| rank(a.get_info().device_type))
        .cloned();
    let software = adapters
        .iter()
        .find(|a| a.get_info().device_type == wgpu::DeviceType::Cpu)
        .cloned();
    match choice {
        BackendChoice::Cpu => Ok(None),
        BackendChoice::Gpu => real.map(Some).ok_or_else(|| GpuError::NoAdapter {
            wanted: "hardware GPU",
            seen: seen(),
        }),
        BackendChoice::SoftwareGpu => software.map(Some).ok_or_else(|| GpuError::NoAdapter {
            wanted: "software Vulkan (lavapipe)",
            seen: seen(),
        }),
        BackendChoice::Auto => Ok(real.or(if allow_software_gpu { software } else { None })),
    }
}

/// Opens a device on `adapter` with the adapter's own limits (so large catalogs fit where the
/// hardware allows) and, of the optional features, only `SHADER_F16` where the adapter has it
/// (for f16 table storage). Uncaptured wgpu errors are logged rather than
/// panicking; every operation is validated on the host before it reaches the device anyway.
pub fn open_device(adapter: &wgpu::Adapter) -> Result<GpuDevice, GpuError> {
    let info = adapter.get_info();
    let desc = wgpu::DeviceDescriptor {
        label: Some("gateway scoring"),
        required_features: adapter.features() & wgpu::Features::SHADER_F16,
        required_limits: adapter.limits(),
        ..Default::default()
    };
    let (device, queue) =
        pollster::block_on(adapter.request_device(&desc)).map_err(|e| GpuError::RequestDevice {
            adapter: describe(&info),
            message: e.to_string(),
        })?;
    device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
        tracing::error!(target: "scoring", "uncaptured GPU error: {e}");
    }));
    Ok(GpuDevice::new(device, queue, info))
}

/// [`select_adapter`] then [`open_device`]: the device for `choice`, or the CPU path.
pub fn acquire_device(
    choice: BackendChoice,
    allow_software_gpu: bool,
) -> Result<ComputeDevice, GpuError> {
    match select_adapter(choice, allow_software_gpu)? {
        Some(adapter) => Ok(ComputeDevice::Gpu(open_device(&adapter)?)),
        None => Ok(ComputeDevice::Cpu),
    }
}
