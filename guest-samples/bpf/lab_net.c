// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's test network for packet programs (bpf_loader load --xdp,
 * bpf_loader packet): a veth pair made over rtnetlink, and one frame sent
 * through it and looked for on the other end.
 */
#include <errno.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/if_ether.h>
#include <linux/if_link.h>
#include <linux/if_packet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>

#include "lab_net.h"

/* IEEE 802 local experimental ethertype 1: no protocol of the guest's answers frames of it. */
#define ETH_P_TERMLAB 0x88b5
/* The shortest Ethernet frame without its FCS. */
#define FRAME_BYTES 60

struct link_request {
	struct nlmsghdr header;
	struct ifinfomsg link;
	char attrs[256];
};

/* Appends attribute @type holding @len bytes of @data (none for a nest) to @msg. */
static struct rtattr *add_attr(struct nlmsghdr *msg, unsigned short type, const void *data,
			       size_t len)
{
	struct rtattr *attr = (struct rtattr *)((char *)msg + NLMSG_ALIGN(msg->nlmsg_len));

	attr->rta_type = type;
	attr->rta_len = RTA_LENGTH(len);
	if (len)
		memcpy(RTA_DATA(attr), data, len);
	msg->nlmsg_len = NLMSG_ALIGN(msg->nlmsg_len) + RTA_ALIGN(attr->rta_len);
	return attr;
}

/* Closes the nest @nest: it holds everything added to @msg since. */
static void end_nest(struct nlmsghdr *msg, struct rtattr *nest)
{
	nest->rta_len = (unsigned short)((char *)msg + msg->nlmsg_len - (char *)nest);
}

/* Creates the veth pair @name / @peer; 0 or a negative errno. */
static int create_veth(const char *name, const char *peer)
{
	struct link_request request = {
		.header = {
			.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)),
			.nlmsg_type = RTM_NEWLINK,
			.nlmsg_flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
		},
		.link = { .ifi_family = AF_UNSPEC },
	};
	struct ifinfomsg peer_link = { .ifi_family = AF_UNSPEC };
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	struct {
		struct nlmsghdr header;
		struct nlmsgerr error;
	} answer;
	/* The whole request, not its header alone, for the compiler's bounds. */
	struct nlmsghdr *msg = (struct nlmsghdr *)(void *)&request;
	struct rtattr *info, *data, *peer_info;
	ssize_t got;
	int fd, err;

	add_attr(msg, IFLA_IFNAME, name, strlen(name) + 1);
	info = add_attr(msg, IFLA_LINKINFO, NULL, 0);
	add_attr(msg, IFLA_INFO_KIND, "veth", strlen("veth"));
	data = add_attr(msg, IFLA_INFO_DATA, NULL, 0);
	/* The peer's own link message: its header, then its attributes. */
	peer_info = add_attr(msg, VETH_INFO_PEER, &peer_link, sizeof(peer_link));
	add_attr(msg, IFLA_IFNAME, peer, strlen(peer) + 1);
	end_nest(msg, peer_info);
	end_nest(msg, data);
	end_nest(msg, info);

	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0)
		return -errno;
	if (sendto(fd, &request, request.header.nlmsg_len, 0, (struct sockaddr *)&kernel,
		   sizeof(kernel)) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	got = recv(fd, &answer, sizeof(answer), 0);
	err = got < 0 ? -errno : 0;
	close(fd);
	if (err)
		return err;
	if (got < (ssize_t)sizeof(answer) || answer.header.nlmsg_type != NLMSG_ERROR)
		return -EPROTO;
	return answer.error.error;
}

/* Sets IFF_UP on interface @name; 0 or a negative errno. */
static int set_up(const char *name)
{
	struct ifreq request;
	int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, 0), err = 0;

	if (fd < 0)
		return -errno;
	memset(&request, 0, sizeof(request));
	snprintf(request.ifr_name, sizeof(request.ifr_name), "%s", name);
	if (ioctl(fd, SIOCGIFFLAGS, &request) == 0) {
		request.ifr_flags |= IFF_UP;
		if (ioctl(fd, SIOCSIFFLAGS, &request))
			err = -errno;
	} else {
		err = -errno;
	}
	close(fd);
	return err;
}

int lab_interface(const char *name)
{
	char peer[IF_NAMESIZE];
	unsigned int index = if_nametoindex(name);
	int err;

	if (index)
		return (int)index;
	if (snprintf(peer, sizeof(peer), "%s%s", name, LAB_PEER_SUFFIX) >= (int)sizeof(peer)) {
		fprintf(stderr, "bpf_loader: %s%s is longer than an interface name\n", name,
			LAB_PEER_SUFFIX);
		return -1;
	}
	err = create_veth(name, peer);
	if (!err)
		err = set_up(name);
	if (!err)
		err = set_up(peer);
	index = if_nametoindex(name);
	if (err || !index) {
		fprintf(stderr, "bpf_loader: making the veth pair %s / %s: %s\n", name, peer,
			strerror(err ? -err : errno));
		return -1;
	}
	return (int)index;
}

static uint64_t now_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

/* A packet socket for the lab's ethertype on interface @index, or -1 after a message. */
static int packet_socket(unsigned int index, const char *name)
{
	struct sockaddr_ll at = {
		.sll_family = AF_PACKET,
		.sll_protocol = htons(ETH_P_TERMLAB),
		.sll_ifindex = (int)index,
	};
	int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_TERMLAB));

	if (fd < 0 || bind(fd, (struct sockaddr *)&at, sizeof(at))) {
		fprintf(stderr, "bpf_loader: a packet socket on %s: %s\n", name, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/*
 * Waits up to @wait_ms for a message carrying @nonce at byte @at on @fd: 1 if
 * it came, 0 if not, -1 on an error.
 */
static int receive(int fd, uint64_t nonce, size_t at, unsigned int wait_ms)
{
	uint64_t deadline = now_ns() + (uint64_t)wait_ms * 1000000;
	unsigned char frame[2048];
	struct pollfd ready = { .fd = fd, .events = POLLIN };

	for (uint64_t now = now_ns(); now < deadline; now = now_ns()) {
		int left_ms = (int)((deadline - now + 999999) / 1000000);
		ssize_t got;

		if (poll(&ready, 1, left_ms) < 0 && errno != EINTR)
			break;
		if (!(ready.revents & POLLIN))
			continue;
		got = recv(fd, frame, sizeof(frame), MSG_DONTWAIT);
		if (got < 0 && errno != EAGAIN && errno != EINTR)
			break;
		if (got >= (ssize_t)(at + sizeof(nonce)) &&
		    memcmp(frame + at, &nonce, sizeof(nonce)) == 0)
			return 1;
	}
	if (now_ns() < deadline) {
		fprintf(stderr, "bpf_loader: receiving: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}

/* Sends @len bytes of @data with @tx to @to; 0, or 1 after a message. */
static int send_one(int tx, const void *data, size_t len, const struct sockaddr *to,
		    socklen_t to_len, const char *where, uint64_t *took_ns)
{
	uint64_t sent_ns = now_ns();

	if (sendto(tx, data, len, 0, to, to_len) < 0) {
		fprintf(stderr, "bpf_loader: sending to %s: %s\n", where, strerror(errno));
		return 1;
	}
	*took_ns = now_ns() - sent_ns;
	return 0;
}

/* One frame of the lab's ethertype out of @out, looked for on @in. */
static int frame_through(const char *out, const char *in, uint64_t nonce, unsigned int wait_ms,
			 uint64_t *took_ns)
{
	unsigned int out_index = if_nametoindex(out), in_index = if_nametoindex(in);
	struct sockaddr_ll to = {
		.sll_family = AF_PACKET,
		.sll_protocol = htons(ETH_P_TERMLAB),
		.sll_ifindex = (int)out_index,
		.sll_halen = ETH_ALEN,
	};
	unsigned char frame[FRAME_BYTES] = { 0 };
	int rx, tx, received = -1;

	if (!out_index || !in_index) {
		fprintf(stderr, "bpf_loader: no interface %s\n", out_index ? in : out);
		return -1;
	}
	/* Bound before the frame leaves: it cannot arrive unseen. */
	rx = packet_socket(in_index, in);
	tx = rx < 0 ? -1 : packet_socket(out_index, out);
	/* Broadcast from a locally administered address, the lab's ethertype, the nonce. */
	memset(frame, 0xff, ETH_ALEN);
	frame[ETH_ALEN] = 0x02;
	frame[2 * ETH_ALEN] = ETH_P_TERMLAB >> 8;
	frame[2 * ETH_ALEN + 1] = ETH_P_TERMLAB & 0xff;
	memcpy(frame + ETH_HLEN, &nonce, sizeof(nonce));
	memset(to.sll_addr, 0xff, ETH_ALEN);
	if (tx >= 0 &&
	    !send_one(tx, frame, sizeof(frame), (struct sockaddr *)&to, sizeof(to), out, took_ns))
		received = receive(rx, nonce, ETH_HLEN, wait_ms);
	if (tx >= 0)
		close(tx);
	if (rx >= 0)
		close(rx);
	return received;
}

/* A UDP socket on 127.0.0.1:@port (0: any), or -1 after a message. */
static int udp_socket(unsigned int port, struct sockaddr_in *at)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	*at = (struct sockaddr_in){
		.sin_family = AF_INET,
		.sin_port = htons((uint16_t)port),
		.sin_addr.s_addr = htonl(INADDR_LOOPBACK),
	};
	if (fd < 0 || bind(fd, (struct sockaddr *)at, sizeof(*at))) {
		fprintf(stderr, "bpf_loader: a UDP socket on 127.0.0.1:%u: %s\n", port,
			strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* One datagram to 127.0.0.1:@port, looked for on a socket of this process bound there. */
static int datagram_through(unsigned int port, uint64_t nonce, unsigned int wait_ms,
			    uint64_t *took_ns)
{
	struct sockaddr_in to, from;
	int rx = udp_socket(port, &to), tx = rx < 0 ? -1 : udp_socket(0, &from), received = -1;

	if (tx >= 0 && !send_one(tx, &nonce, sizeof(nonce), (struct sockaddr *)&to, sizeof(to),
				 "127.0.0.1", took_ns))
		received = receive(rx, nonce, 0, wait_ms);
	if (tx >= 0)
		close(tx);
	if (rx >= 0)
		close(rx);
	return received;
}

int lab_packet(int argc, char **argv)
{
	const char *out = NULL, *in = NULL;
	unsigned int wait_ms = 3000, port = 0;
	uint64_t took_ns = 0;
	int received, i;

	for (i = 0; i + 1 < argc; i += 2) {
		const char *value = argv[i + 1];

		if (strcmp(argv[i], "--out") == 0)
			out = value;
		else if (strcmp(argv[i], "--in") == 0)
			in = value;
		else if (strcmp(argv[i], "--udp") == 0 && value[0] >= '1' && value[0] <= '9')
			port = (unsigned int)strtoul(value, NULL, 10);
		else if (strcmp(argv[i], "--wait-ms") == 0 && value[0] >= '0' && value[0] <= '9')
			wait_ms = (unsigned int)strtoul(value, NULL, 10);
		else
			return 2;
	}
	if (i != argc || port > 65535 || (port ? out || in : !out || !in))
		return 2;
	received = port ? datagram_through(port, now_ns(), wait_ms, &took_ns)
			: frame_through(out, in, now_ns(), wait_ms, &took_ns);
	if (received < 0)
		return 1;
	if (port)
		printf("packet udp=127.0.0.1:%u", port);
	else
		printf("packet out=%s in=%s", out, in);
	printf(" send_ms=%.1f received=%d\n", (double)took_ns / 1e6, received);
	return received ? 0 : LAB_PACKET_LOST;
}
