//! The virtio-vsock device as a hostile guest drives it: descriptor tables, avail rings and
//! packet headers written into guest memory from the input, then TX/RX queue notifications,
//! device resets, and a host side that connects, writes, reads and closes mid-stream.
//!
//! Input: one byte picks the queue size (1 << (b % 9)), then operations until the end.

#![no_main]

use libfuzzer_sys::fuzz_target;
use termlab_vmm_fuzz::{GuestHeader, Input, Machine, GUEST_SPAN};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut vm = Machine::new();
    let queue_size_log2 = input.u8();
    vm.driver_init(queue_size_log2);
    while !input.is_empty() {
        match input.u8() % 11 {
            0 => {
                let addr = u64::from(input.u32() % GUEST_SPAN);
                let len = usize::from(input.u8());
                vm.guest_write(addr, input.bytes(len));
            }
            1 => {
                let (q, index) = (input.u8(), input.u8());
                let (addr, len, flags, next) = (input.u64(), input.u32(), input.u16(), input.u16());
                vm.guest_write_desc(q, index, addr, len, flags, next);
            }
            2 => {
                let (q, head) = (input.u8(), input.u16());
                vm.guest_publish(q, head);
            }
            3 => {
                let value = input.u32();
                vm.notify(value);
            }
            4 => vm.backend_ready(),
            5 => {
                let addr = u64::from(input.u32() % GUEST_SPAN);
                let header = GuestHeader::read(&mut input);
                vm.guest_write_header(addr, &header);
            }
            6 => {
                let len = usize::from(input.u8());
                vm.host_connect(input.bytes(len));
                vm.backend_ready();
            }
            7 => {
                let (index, len, fill) = (input.u8(), input.u16(), input.u8());
                vm.host_write(index, len, fill);
                vm.backend_ready();
            }
            8 => {
                let index = input.u8();
                vm.host_read(index);
                vm.backend_ready();
            }
            9 => {
                let (index, how) = (input.u8(), input.u8());
                vm.host_shutdown(index, how);
                vm.backend_ready();
            }
            _ => {
                // The driver resets the device with connections open and sets it up again.
                let log2 = input.u8();
                vm.driver_init(log2);
            }
        }
    }
});
