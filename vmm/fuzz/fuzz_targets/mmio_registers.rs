//! The virtio-mmio register file under arbitrary guest accesses: reads and writes of 1 to 8
//! bytes anywhere in the slot, status transitions in any order, queue selection and layout
//! with out-of-range indices and addresses, and notifications that make the device walk
//! whatever queues the registers ended up describing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use termlab_vmm_fuzz::*;

/// Registers picked by index, so that the fuzzer reaches meaningful writes in one byte.
const REGISTERS: [u64; 20] = [
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_STATUS,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_CONFIG_GENERATION,
    CONFIG_SPACE,
];
const MAGIC_VALUE: u32 = 0x7472_6976;
const VIRTIO_ID_VSOCK: u32 = 19;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut vm = Machine::new();
    while !input.is_empty() {
        match input.u8() % 7 {
            0 => {
                let offset = u64::from(input.u16()) % MMIO_SLOT_SIZE;
                let mut buf = [0u8; 8];
                let len = 1 + usize::from(input.u8()) % buf.len();
                vm.mmio_read(offset, &mut buf[..len]);
            }
            1 => {
                let offset = u64::from(input.u16()) % MMIO_SLOT_SIZE;
                let len = 1 + usize::from(input.u8()) % 8;
                let value = input.u64().to_le_bytes();
                vm.mmio_write(offset, &value[..len]);
            }
            2 => {
                let offset = REGISTERS[usize::from(input.u8()) % REGISTERS.len()];
                let value = input.u32();
                vm.write_reg(offset, value);
                if offset == REG_STATUS && value == 0 {
                    assert_eq!(vm.read_reg(REG_STATUS), 0, "writing 0 to Status resets the device");
                    assert_eq!(
                        vm.read_reg(REG_INTERRUPT_STATUS),
                        0,
                        "a reset clears pending interrupts"
                    );
                }
            }
            3 => {
                let value = input.u32();
                vm.notify(value);
            }
            4 => {
                // The guest lays out rings and packets for whatever queues it configured.
                let addr = u64::from(input.u32() % GUEST_SPAN);
                let len = usize::from(input.u8());
                vm.guest_write(addr, input.bytes(len));
            }
            5 => vm.backend_ready(),
            _ => {
                let log2 = input.u8();
                vm.driver_init(log2);
            }
        }
        // Whatever happened, the identification registers still identify the device.
        assert_eq!(vm.read_reg(0x000), MAGIC_VALUE);
        assert_eq!(vm.read_reg(0x008), VIRTIO_ID_VSOCK);
    }
});
