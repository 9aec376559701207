/* SPDX-License-Identifier: GPL-2.0 */
/* The guest's test network for packet programs (lab_net.c). */
#ifndef LAB_NET_H
#define LAB_NET_H

/* The other end of the veth pair lab_interface() makes: "<name>_peer". */
#define LAB_PEER_SUFFIX "_peer"

/* Exit status of `bpf_loader packet` when the frame did not arrive. */
#define LAB_PACKET_LOST 3

/*
 * The index of network interface @name; a missing one is created first, as
 * one end of a veth pair whose other end is "<name>_peer", both set up.
 * -1 after a message on stderr.
 */
int lab_interface(const char *name);

/*
 * bpf_loader packet --out IF --in IF [--wait-ms N]: sends one frame of the
 * lab's ethertype (0x88b5) with a fresh nonce out of --out and waits up to N
 * ms (3000) after the send returned for it on --in, where a packet socket
 * sees a frame only once XDP and tc ingress have passed it.
 *
 * bpf_loader packet --udp PORT [--wait-ms N]: the same with one datagram to
 * a UDP socket this process binds on 127.0.0.1:PORT, which gets it only once
 * the cgroup_skb ingress programs of the process's cgroup have allowed it.
 *
 * Prints
 *   packet out=IF in=IF send_ms=T received=0|1   (or packet udp=127.0.0.1:PORT ...)
 * (T: how long the send took, which includes the receiving end's program
 * run when the sender's CPU runs it); exits 0 when it arrived,
 * LAB_PACKET_LOST when not, 1 on an error, 2 for bad arguments.
 */
int lab_packet(int argc, char **argv);

#endif
