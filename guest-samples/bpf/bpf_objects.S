/*
 * The compiled BPF objects, embedded byte for byte into the loader so the
 * guest initramfs needs only the binary. The Makefile builds the objects
 * before assembling this file (paths are relative to the build directory,
 * passed with -I).
 */
	.section .rodata.bpf_objects, "a"

	.balign 8
	.global loops_kern_object, loops_kern_object_end
loops_kern_object:
	.incbin "loops_kern.bpf.o"
loops_kern_object_end:

	.balign 8
	.global bpftext_kern_object, bpftext_kern_object_end
bpftext_kern_object:
	.incbin "bpftext_kern.bpf.o"
bpftext_kern_object_end:

	.balign 8
	.global subprog_kern_object, subprog_kern_object_end
subprog_kern_object:
	.incbin "subprog_kern.bpf.o"
subprog_kern_object_end:

	.balign 8
	.global tailcall_kern_object, tailcall_kern_object_end
tailcall_kern_object:
	.incbin "tailcall_kern.bpf.o"
tailcall_kern_object_end:

	.section .note.GNU-stack, "", @progbits
