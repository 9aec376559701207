//! The virtio-mmio register file (virtio 1.2 spec, section 4.2.2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // same as QEMU's: no vendor quirks in drivers

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;

/// A guest-physical window handled by a device model.
pub trait MmioRegion: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// One virtio-mmio slot holding device `D`.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// Written on QueueNotify. KVM normally consumes notify writes via an ioeventfd on the
    /// same eventfd; this path covers accesses that still exit to userspace.
    queue_kick: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_kick: EventFd,
    ) -> Self {
        let queues = fresh_queues(&device);
        Self {
            device,
            mem,
            interrupt,
            queue_kick,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        }
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = fresh_queues(&self.device);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        self.status = status;
        if status & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: we only implement the modern interface.
            self.status &= !STATUS_FEATURES_OK;
        }
        if status & STATUS_DRIVER_OK != 0 && !self.activated {
            match self.activate() {
                Ok(()) => self.activated = true,
                Err(e) => {
                    log::error!(
                        "virtio device {} activation failed: {e}",
                        self.device.device_type()
                    );
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                }
            }
        }
    }

    fn activate(&mut self) -> Result<(), super::ActivateError> {
        if let Some(bad) = self.queues.iter().position(|q| !q.ready() || !q.is_valid(&self.mem)) {
            return Err(super::ActivateError::BadQueue(bad));
        }
        // The transport keeps its copies for register reads; the device gets working ones.
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| super::ActivateError::Backend(format!("queue state: {e}")))?;
        self.device.activate(self.mem.clone(), queues)
    }

    fn read_u32(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_u32(&mut self, offset: u64, value: u32) {
        // Queue layout may only change before the device is live (spec 4.2.2.3).
        let configurable = !self.activated;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                let offered = self.device.features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
                self.driver_features &= offered;
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if configurable =>
            {
                if let Some(q) = self.selected_queue() {
                    let (low, high) =
                        if offset & 4 == 0 { (Some(value), None) } else { (None, Some(value)) };
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            REG_QUEUE_NOTIFY => {
                if let Err(e) = self.queue_kick.write(1) {
                    log::warn!("cannot signal queue notification: {e}");
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => log::debug!("ignored virtio-mmio write of {value:#x} at {offset:#x}"),
        }
    }
}

impl<D: VirtioDevice> MmioRegion for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) {
            *word = self.read_u32(offset).to_le_bytes();
        } else {
            // Registers are 32-bit only; other widths are a driver bug (spec 4.2.2.2).
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset < CONFIG_SPACE => self.write_u32(offset, u32::from_le_bytes(word)),
            // vsock's config space is read-only; non-32-bit register writes are driver bugs.
            _ => log::debug!("ignored {}-byte virtio-mmio write at {offset:#x}", data.len()),
        }
    }
}

fn fresh_queues<D: VirtioDevice>(device: &D) -> Vec<Queue> {
    device.queue_max_sizes().iter().filter_map(|&max| Queue::new(max).ok()).collect()
}
