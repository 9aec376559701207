//! Legacy platform devices and the dispatch of port-I/O and MMIO exits to devices.

pub mod console;
mod serial;

use std::sync::{Arc, Mutex};

use crate::layout::{COM1_PORT, I8042_COMMAND_PORT, MMIO_START, VIRTIO_MMIO_SIZE};
use crate::virtio::MmioRegion;
pub use serial::{IrqTrigger, SerialDevice};

/// Writing this to the i8042 command port pulses the reset line.
const I8042_CMD_RESET_CPU: u8 = 0xfe;
/// What the i8042 status register always reads: output buffer full, input buffer empty.
/// Linux's probe drains the output buffer first; when it never empties (16 reads) Linux
/// reports "i8042: No controller found" at once. An empty output buffer instead passes that
/// check, and the probe then waits about a second for the controller to answer a command.
/// The clear input-buffer bit lets the reboot path (`kb_wait()`) write the reset command
/// without delay.
const I8042_STATUS: u8 = 0x01;
/// Reading an unclaimed port on a PC returns all ones.
const OPEN_BUS: u8 = 0xff;

/// What a port write asked the platform to do.
#[derive(Debug, PartialEq, Eq)]
pub enum PioEffect {
    None,
    Reset,
}

/// All devices a vCPU exit can reach.
pub struct DeviceBus {
    serial: Mutex<SerialDevice>,
    virtio: Vec<Arc<Mutex<dyn MmioRegion>>>,
}

impl DeviceBus {
    pub fn new(serial: SerialDevice, virtio: Vec<Arc<Mutex<dyn MmioRegion>>>) -> Self {
        Self { serial: Mutex::new(serial), virtio }
    }

    pub fn serial(&self) -> &Mutex<SerialDevice> {
        &self.serial
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(OPEN_BUS);
        if let (Some(offset), [byte]) = (com1_offset(port), &mut *data) {
            *byte = lock(&self.serial).read(offset);
        } else if port == I8042_COMMAND_PORT {
            data.fill(I8042_STATUS);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioEffect {
        match (com1_offset(port), data) {
            (Some(offset), [byte]) => {
                if let Err(e) = lock(&self.serial).write(offset, *byte) {
                    log::warn!("serial write failed: {e}");
                }
                PioEffect::None
            }
            _ if port == I8042_COMMAND_PORT && data == [I8042_CMD_RESET_CPU] => PioEffect::Reset,
            _ => PioEffect::None,
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_slot(addr) {
            Some((transport, offset)) => lock(transport).read(offset, data),
            None => data.fill(0),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((transport, offset)) = self.virtio_slot(addr) {
            lock(transport).write(offset, data);
        }
    }

    fn virtio_slot(&self, addr: u64) -> Option<(&Mutex<dyn MmioRegion>, u64)> {
        let rel = addr.checked_sub(MMIO_START)?;
        let transport = self.virtio.get(usize::try_from(rel / VIRTIO_MMIO_SIZE).ok()?)?;
        Some((transport, rel % VIRTIO_MMIO_SIZE))
    }
}

fn com1_offset(port: u16) -> Option<u8> {
    port.checked_sub(COM1_PORT).filter(|o| *o < 8).map(|o| o as u8)
}

/// Device state stays consistent across a panicking holder (every critical section is a
/// single register access), so a poisoned lock is still safe to use.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::console::{ConsoleLog, ConsoleSink};
    use super::*;

    fn bus() -> DeviceBus {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let sink = ConsoleSink::new(None, false, Arc::new(ConsoleLog::default()));
        DeviceBus::new(SerialDevice::new(IrqTrigger(irq), sink), Vec::new())
    }

    #[test]
    fn i8042_reads_as_absent_but_takes_the_reset_command() {
        const OUTPUT_FULL: u8 = 0x01;
        const INPUT_FULL: u8 = 0x02;
        let bus = bus();
        let mut status = [0u8];
        bus.pio_read(I8042_COMMAND_PORT, &mut status);
        assert_eq!(status[0] & (OUTPUT_FULL | INPUT_FULL), OUTPUT_FULL);
        assert_eq!(bus.pio_write(I8042_COMMAND_PORT, &[0x20]), PioEffect::None);
        assert_eq!(bus.pio_write(I8042_COMMAND_PORT, &[I8042_CMD_RESET_CPU]), PioEffect::Reset);
    }
}
