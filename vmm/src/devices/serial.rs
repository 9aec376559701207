//! COM1: a vm-superio 8250 whose interrupt line is a KVM irqfd.

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleSink;

/// Raises the serial IRQ by signalling an eventfd that KVM routes to the IOAPIC pin.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>;
