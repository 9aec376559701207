use std::time::Duration;
use termlab_vmm::*;
fn main() {
    let mut c = VmConfig::new("/work/kbuild/base/arch/x86/boot/bzImage".into(), None, "console=ttyS0 reboot=k panic=-1 nokaslr earlyprintk=serial,ttyS0".into());
    c.vcpus = 1;
    let mut vm = Vm::new(c).unwrap();
    vm.start().unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        vm.pause().unwrap();
        let r = vm.regs(0).unwrap();
        let s = vm.sregs(0).unwrap();
        println!("rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} exit={:?}", r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer, vm.wait_exit(Some(Duration::ZERO)));
        vm.resume().unwrap();
    }
    println!("console: {:?}", vm.console().text());
}
